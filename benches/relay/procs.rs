//! What the kernel knows about the processes of a run: CPU time used (`/proc/<pid>/stat`),
//! resident memory (`/proc/<pid>/status`), and which process is RabbitMQ's Erlang VM.
//!
//! Reading `/proc` instead of asking each process keeps the measured binaries unchanged and
//! costs them nothing; it makes the benchmark Linux-only, like its deployment target.

use std::path::Path;

/// Clock ticks per second of the `/proc/<pid>/stat` CPU fields.
pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value; it has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // -1 means unknown; 100 is what Linux uses on every common architecture.
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// User plus system CPU time `pid` has used so far, in clock ticks; `None` once it is gone.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count fields after
    // its closing one. There field 3 (state) comes first, so utime (14) is the 12th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Resident memory of `pid` in KiB (`VmRSS`); `None` once it is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// The pid of the local RabbitMQ node's `beam.smp` (its command line boots `rabbit`), if
/// one runs here. Looked up per measurement: the node may have been restarted meanwhile.
pub fn rabbitmq_pid() -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| is_rabbitmq(Path::new(&format!("/proc/{pid}"))))
}

fn is_rabbitmq(proc_dir: &Path) -> bool {
    let comm = std::fs::read_to_string(proc_dir.join("comm")).unwrap_or_default();
    if !comm.trim_end().starts_with("beam") {
        return false;
    }
    // Arguments are NUL-separated; RabbitMQ's VM is started with `-s rabbit boot`.
    let cmdline = std::fs::read(proc_dir.join("cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2).any(|w| w[0] == b"-s" && w[1] == b"rabbit")
}
