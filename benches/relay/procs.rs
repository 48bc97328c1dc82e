//! What the kernel knows about the processes of a run: CPU time used (`/proc/<pid>/stat`),
//! how often each thread slept or was preempted (`/proc/<pid>/task/*/status`), resident
//! memory (`/proc/<pid>/status`), and which process is RabbitMQ's Erlang VM.
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
    let (utime, stime) = user_system_ticks(pid)?;
    Some(utime + stime)
}

/// What a process has used so far, counters only (subtract two snapshots).
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// Clock ticks in user space.
    pub user: u64,
    /// Clock ticks in the kernel (system calls, and the network stack they drive).
    pub system: u64,
    /// Times a thread gave up the CPU to wait (`voluntary_ctxt_switches`): each is a sleep
    /// and a wake-up, the kernel's fixed price per event a process waits for.
    pub sleeps: u64,
    /// Times a thread was taken off the CPU while it could run (`nonvoluntary_ctxt_switches`).
    pub preempted: u64,
}

impl Usage {
    /// `self + other`, counter by counter (a role's processes together).
    pub fn plus(&self, other: &Usage) -> Usage {
        Usage {
            user: self.user + other.user,
            system: self.system + other.system,
            sleeps: self.sleeps + other.sleeps,
            preempted: self.preempted + other.preempted,
        }
    }

    /// `self - earlier`, counter by counter.
    pub fn since(&self, earlier: &Usage) -> Usage {
        Usage {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
            sleeps: self.sleeps.saturating_sub(earlier.sleeps),
            preempted: self.preempted.saturating_sub(earlier.preempted),
        }
    }
}

/// `pid`'s CPU ticks and its threads' context switches so far; `None` once it is gone.
/// Threads that ended meanwhile take their switches with them (ours keep theirs for life).
pub fn usage(pid: u32) -> Option<Usage> {
    let (user, system) = user_system_ticks(pid)?;
    let mut usage = Usage {
        user,
        system,
        ..Usage::default()
    };
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            let count =
                |prefix: &str| -> Option<u64> { line.strip_prefix(prefix)?.trim().parse().ok() };
            if let Some(n) = count("voluntary_ctxt_switches:") {
                usage.sleeps += n;
            } else if let Some(n) = count("nonvoluntary_ctxt_switches:") {
                usage.preempted += n;
            }
        }
    }
    Some(usage)
}

fn user_system_ticks(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count fields after
    // its closing one. There field 3 (state) comes first, so utime (14) is the 12th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime, stime))
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
