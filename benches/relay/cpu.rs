//! CPU time per message of each process taking part in a measured run: a snapshot of every
//! watched process's user+system ticks (and its threads' context switches) before, another
//! after, divided by the messages.
//!
//! Each process has a [`Role`], so a run with many agents can be summed per class (all
//! senders, all recipients) and compared with the goals of issue 15.

use std::time::{Duration, Instant};

use crate::procs::{self, Usage};

/// What a watched process does in the run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// A `dmr-agent` whose local service posts the messages.
    Sender,
    /// A `dmr-agent` that delivers them to its webhook.
    Recipient,
    /// A `dmr-server` (index 0 or 1 among the run's two).
    Server(usize),
    /// RabbitMQ's `beam.smp`.
    RabbitMq,
}

/// A process to watch.
pub struct Watched {
    pub role: Role,
    pub pid: u32,
}

impl Watched {
    pub fn new(role: Role, pid: u32) -> Self {
        Self { role, pid }
    }

    /// RabbitMQ's VM, when it can be found (else the row shows no RabbitMQ figure).
    pub fn rabbitmq() -> Option<Self> {
        procs::rabbitmq_pid().map(|pid| Self::new(Role::RabbitMq, pid))
    }
}

/// Usage of every watched process at the start of a run.
pub struct CpuMeter {
    watched: Vec<(Watched, Usage)>,
}

/// Milliseconds of CPU per message, per role (summed over the processes of that role).
#[derive(Clone, Debug, Default)]
pub struct CpuUse {
    /// One clock tick per message: no figure is finer than this.
    pub resolution_ms: f64,
    /// What each role used in the run, summed over its processes.
    used: Vec<(Role, Usage)>,
    messages: usize,
}

/// Where a role's CPU went: the kernel's share, and the sleeps and preemptions per message
/// that much of the kernel's share pays for.
pub struct KernelShare {
    /// System ticks over all ticks, 0 to 1 (`None` if the role used no measurable CPU).
    pub system: Option<f64>,
    pub sleeps_per_message: f64,
    pub preempted_per_message: f64,
}

/// How long a run's processes may stay busy after its last message (receipts, acks).
const SETTLE_LIMIT: Duration = Duration::from_secs(10);

impl CpuMeter {
    /// Snapshots `watched` now; `None` entries (RabbitMQ not found) are skipped.
    pub fn start(watched: impl IntoIterator<Item = Option<Watched>>) -> Self {
        let watched = watched
            .into_iter()
            .flatten()
            .map(|w| {
                let u = procs::usage(w.pid).unwrap_or_default();
                (w, u)
            })
            .collect();
        Self { watched }
    }

    /// Ticks used so far by the processes other than RabbitMQ (whose node others share).
    fn own_ticks(&self) -> u64 {
        self.watched
            .iter()
            .filter(|(w, _)| w.role != Role::RabbitMq)
            .filter_map(|(w, _)| procs::cpu_ticks(w.pid))
            .sum()
    }

    /// Waits until the relay's own processes have gone quiet (at most one tick in 300 ms),
    /// so the work a message causes after it is delivered (its receipt, the acks) is
    /// counted with it rather than with the next run.
    pub fn settle(&self) {
        let end = Instant::now() + SETTLE_LIMIT;
        let mut last = self.own_ticks();
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(300));
            let now = self.own_ticks();
            if now.saturating_sub(last) <= 1 {
                return;
            }
            last = now;
        }
    }

    /// CPU used since [`CpuMeter::start`], per message of `messages`.
    pub fn stop(&self, messages: usize) -> CpuUse {
        let tick_ms = 1000.0 / procs::clock_ticks_per_second();
        let mut used: Vec<(Role, Usage)> = Vec::new();
        for (w, before) in &self.watched {
            let run = procs::usage(w.pid).unwrap_or(*before).since(before);
            match used.iter_mut().find(|(r, _)| *r == w.role) {
                Some((_, sum)) => *sum = sum.plus(&run),
                None => used.push((w.role, run)),
            }
        }
        CpuUse {
            resolution_ms: tick_ms / messages.max(1) as f64,
            used,
            messages,
        }
    }
}

impl CpuUse {
    /// Milliseconds per message of `role`, if the run watched such a process.
    pub fn ms(&self, role: Role) -> Option<f64> {
        let u = self.used(role)?;
        Some((u.user + u.system) as f64 * self.resolution_ms)
    }

    fn used(&self, role: Role) -> Option<&Usage> {
        self.used.iter().find(|(r, _)| *r == role).map(|(_, u)| u)
    }

    /// Where `role`'s CPU went in the run, if the run watched such a process.
    pub fn kernel_share(&self, role: Role) -> Option<KernelShare> {
        let u = self.used(role)?;
        let n = self.messages.max(1) as f64;
        let ticks = u.user + u.system;
        Some(KernelShare {
            system: (ticks > 0).then(|| u.system as f64 / ticks as f64),
            sleeps_per_message: u.sleeps as f64 / n,
            preempted_per_message: u.preempted as f64 / n,
        })
    }

    /// Both servers together: every message passes one on its way in, one on its way out.
    pub fn servers(&self) -> Option<f64> {
        let (a, b) = (self.ms(Role::Server(0)), self.ms(Role::Server(1)));
        a.or(b).map(|_| a.unwrap_or(0.0) + b.unwrap_or(0.0))
    }

    /// The relay's CPU over RabbitMQ's for the same messages.
    pub fn servers_over_rabbitmq(&self) -> Option<f64> {
        let mq = self.ms(Role::RabbitMq)?;
        Some(self.servers()? / mq).filter(|r| r.is_finite())
    }
}

/// RabbitMQ's CPU while this benchmark sends it nothing, in ms per second: other users of
/// the node (and its own housekeeping) count toward every RabbitMQ figure of the run.
pub fn rabbitmq_background(over: Duration) -> Option<f64> {
    let meter = CpuMeter::start([Watched::rabbitmq()]);
    meter.watched.first()?;
    std::thread::sleep(over);
    let per_run = meter.stop(1).ms(Role::RabbitMq)?;
    Some(per_run / over.as_secs_f64())
}
