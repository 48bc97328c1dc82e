//! The two tables the benchmark prints: throughput and latency per scenario (streamed as
//! each finishes), then CPU per message per process (gathered, printed at the end).

use std::time::Duration;

use crate::cpu::{CpuUse, Role};

/// Goals of issue 15, in ms of CPU per message.
const SENDER_GOAL_MS: f64 = 0.20;
const RECIPIENT_GOAL_MS: f64 = 0.18;
/// Both servers' CPU over RabbitMQ's, for the same messages.
const SERVERS_OVER_MQ_GOAL: f64 = 0.25;

/// Throughput and latency percentiles of one scenario, and its CPU when measured.
pub struct Report {
    pub name: String,
    pub messages: usize,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
    pub cpu: Option<CpuUse>,
}

pub fn print_header() {
    println!(
        "| {:<36} | {:>6} | {:>9} | {:>7} | {:>7} | {:>7} | {:>7} |",
        "scenario", "msgs", "msg/s", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    println!(
        "|{:-<38}|{:-<8}|{:-<11}|{:-<9}|{:-<9}|{:-<9}|{:-<9}|",
        "", "", "", "", "", "", ""
    );
}

impl Report {
    /// Prints the throughput row; the CPU figures wait for [`print_cpu`].
    pub fn print(&mut self) {
        self.latencies.sort();
        let pct = |p: f64| {
            let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
            self.latencies
                .get(i)
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        println!(
            "| {:<36} | {:>6} | {:>9.0} | {:>7.2} | {:>7.2} | {:>7.2} | {:>7.2} |",
            self.name,
            self.messages,
            self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9),
            pct(0.5),
            pct(0.9),
            pct(0.99),
            pct(1.0)
        );
    }
}

fn cell(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{v:.3}"))
}

/// Each measured figure over its goal: at most 1.00 meets it.
fn versus_goals(cpu: &CpuUse) -> String {
    let mut parts = Vec::new();
    if let Some(a) = cpu.ms(Role::Sender) {
        parts.push(format!("A {:.2}", a / SENDER_GOAL_MS));
    }
    if let Some(b) = cpu.ms(Role::Recipient) {
        parts.push(format!("B {:.2}", b / RECIPIENT_GOAL_MS));
    }
    if let Some(r) = cpu.servers_over_rabbitmq() {
        parts.push(format!("S/MQ {:.2}", r / SERVERS_OVER_MQ_GOAL));
    }
    parts.join(" ")
}

/// The CPU table of every report that measured it; `±` is one clock tick per message,
/// the resolution of each figure (short runs are coarse).
pub fn print_cpu(reports: &[(String, CpuUse)]) {
    if reports.is_empty() {
        return;
    }
    println!(
        "\nCPU per message, ms (utime+stime from /proc; goals: sender agent {SENDER_GOAL_MS}, \
         recipient agent {RECIPIENT_GOAL_MS}, both servers ÷ RabbitMQ {SERVERS_OVER_MQ_GOAL}; \
         'vs goal' is figure ÷ goal, ≤ 1 meets it; ± is one clock tick per message)"
    );
    println!(
        "| {:<36} | {:>7} | {:>9} | {:>8} | {:>8} | {:>8} | {:>10} | {:>6} | {:<23} |",
        "scenario",
        "sender",
        "recipient",
        "server-1",
        "server-2",
        "RabbitMQ",
        "servers÷MQ",
        "±",
        "vs goal"
    );
    println!(
        "|{:-<38}|{:-<9}|{:-<11}|{:-<10}|{:-<10}|{:-<10}|{:-<12}|{:-<8}|{:-<25}|",
        "", "", "", "", "", "", "", "", ""
    );
    for (name, cpu) in reports {
        println!(
            "| {:<36} | {:>7} | {:>9} | {:>8} | {:>8} | {:>8} | {:>10} | {:>6.3} | {:<23} |",
            name,
            cell(cpu.ms(Role::Sender)),
            cell(cpu.ms(Role::Recipient)),
            cell(cpu.ms(Role::Server(0))),
            cell(cpu.ms(Role::Server(1))),
            cell(cpu.ms(Role::RabbitMq)),
            cpu.servers_over_rabbitmq()
                .map_or_else(|| "–".into(), |r| format!("{r:.2}")),
            cpu.resolution_ms,
            versus_goals(cpu)
        );
    }
}

/// Where each process's CPU went in the runs of [`print_cpu`]: the kernel's share, and per
/// message how often its threads slept (each sleep is a wake-up someone paid for) and were
/// preempted. This is what bounds a process that makes no more system calls than it must.
pub fn print_kernel_share(reports: &[(String, CpuUse)]) {
    const ROLES: [(Role, &str); 5] = [
        (Role::Sender, "sender"),
        (Role::Recipient, "recipient"),
        (Role::Server(0), "server-1"),
        (Role::Server(1), "server-2"),
        (Role::RabbitMq, "RabbitMQ"),
    ];
    if reports.is_empty() {
        return;
    }
    println!(
        "\nKernel share of that CPU, and sleeps / preemptions per message (context switches \
         from /proc/<pid>/task/*/status; RabbitMQ's count every scheduler thread)"
    );
    print!("| {:<36} |", "scenario");
    for (_, name) in ROLES {
        print!(" {name:>17} |");
    }
    println!();
    print!("|{:-<38}|", "");
    for _ in ROLES {
        print!("{:-<19}|", "");
    }
    println!();
    for (name, cpu) in reports {
        print!("| {name:<36} |");
        for (role, _) in ROLES {
            let cell = cpu.kernel_share(role).map_or_else(
                || "–".to_owned(),
                |k| {
                    let system = k
                        .system
                        .map_or_else(|| "–".to_owned(), |s| format!("{:.0}%", s * 100.0));
                    format!(
                        "{system} {:.2}/{:.2}",
                        k.sleeps_per_message, k.preempted_per_message
                    )
                },
            );
            print!(" {cell:>17} |");
        }
        println!();
    }
}
