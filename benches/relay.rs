//! End-to-end throughput, latency, CPU and memory of the relay, beside a raw-RabbitMQ
//! baseline measured in the same run (these machines are shared and noisy: compare within
//! a run).
//!
//! `cargo bench --bench relay` (release build of the real binaries; RabbitMQ on
//! 127.0.0.1:5672 with the management API on 15672; Linux, for `/proc`).
//!
//! Scenarios (`DMR_BENCH_ONLY=<name>` runs one):
//! 1. `baseline`: publish with confirms into the same kind of quorum queue, consume with
//!    manual acks (through the project's broker module: same client, same topology); once
//!    with `DMR_BENCH_WINDOW` in flight and once one at a time (the yardstick of the
//!    sequential `agents` row; `DMR_BENCH_ONLY=agents` runs this one too).
//! 2. `relay`: a protocol-level agent sends sealed envelopes through a real `dmr-server` to
//!    a second agent on a second `dmr-server`, which acks them (this process plays both
//!    agents, so only the servers' and RabbitMQ's CPU is measured).
//! 3. `policy`: the relay again with a 100-rule `--policy-file` (the allowing rule last, a
//!    rate limit that never bites) and `--audit-log` on, beside a plain relay row.
//! 4. `agents`: a local service posts to agent A's HTTP API (`POST /v1/messages`), B
//!    delivers to a webhook and sends a receipt back; one row per body size × concurrency.
//! 5. `scale`: `DMR_BENCH_PAIRS` sender/recipient agent pairs over two servers, each pair
//!    crossing servers, one local service per sender.
//! 6. `crypto`: HPKE seal and open of one default payload, one core.
//! 7. `memory`: `DMR_BENCH_AGENTS` authenticated idle agents on one server: the server's RSS
//!    per agent, and RabbitMQ's memory per agent queue.
//!
//! Every row with processes also gets CPU per message (user+system time from
//! `/proc/<pid>/stat` before and after the run, ÷ messages) per process: sender agent,
//! recipient agent, each server, RabbitMQ's `beam.smp`; the table compares them with the
//! goals of issue 15 (sender ≤ 0.20 ms, recipient ≤ 0.18 ms, both servers together ≤ 0.25
//! of RabbitMQ: each message passes one server going in and one going out). RabbitMQ's
//! figure includes whatever else uses the node meanwhile; its idle rate is printed first.
//! A second table splits that CPU: the kernel's share, and per message how often each
//! process's threads slept (voluntary context switches: one wake-up each) and were
//! preempted, from `/proc/<pid>/task/*/status`. A process at its fewest system calls is
//! bounded by these.
//!
//! Knobs (environment):
//! - `DMR_BENCH_MESSAGES` (default 5000): messages of `baseline`, `relay`, `policy` and
//!   `scale`; each `agents` row (and the one-at-a-time baseline) sends at most
//!   `DMR_BENCH_ROW_MESSAGES` (default 2000) of them: raise both for finer CPU figures,
//!   since one clock tick is 10 ms ÷ messages.
//! - `DMR_BENCH_WINDOW` (default 64): sends in flight in `baseline` and `relay`.
//! - `DMR_BENCH_CONCURRENCY` (default `1,16`): local services posting at once, one `agents`
//!   row each.
//! - `DMR_BENCH_SIZES` (default `default,4k,64k`): request bodies of the `agents` rows;
//!   `default` is a ≈ 670-byte forwarded question, a number the whole body in bytes.
//! - `DMR_BENCH_PAIRS` (default 50): agent pairs of `scale`.
//! - `DMR_BENCH_AGENTS` (default 1000): idle agents of `memory`.
//! - `DMR_BENCH_ONLY`: one scenario, by the names above.
//! - `DMR_CHILD_LOG` (default `info`): their `RUST_LOG`.

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "relay/agents.rs"]
mod agents;
#[path = "relay/baseline.rs"]
mod baseline;
#[path = "relay/body.rs"]
mod body;
#[path = "relay/cpu.rs"]
mod cpu;
#[path = "relay/crypto.rs"]
mod crypto;
#[path = "relay/loadgen.rs"]
mod loadgen;
#[path = "relay/memory.rs"]
mod memory;
#[path = "relay/procs.rs"]
mod procs;
#[path = "relay/report.rs"]
mod report;
#[path = "relay/scale.rs"]
mod scale;
#[path = "relay/webhook.rs"]
mod webhook;
#[path = "relay/wire.rs"]
mod wire;

use std::time::Duration;

use report::Report;
use support::World;

/// Most messages one `agents` row sends by default (rows are many; the product path is
/// the slow one).
const AGENT_ROW_MESSAGES: usize = 2000;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_list(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// A realistic small chat message for the protocol-level rows: ~200 bytes of JSON.
fn payload() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "question": "Kas maksuvõlg takistab relvaloa saamist? Palun vastake eesti keeles.",
        "chatId": "5f0c1b8e-3c1d-4c59-9a65-1d2b2f1e7d10",
        "lang": "et", "channel": "web", "authorId": "38001010000"
    }))
    .unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The measured rows' CPU figures, for the table printed at the end.
#[derive(Default)]
struct CpuRows(Vec<(String, cpu::CpuUse)>);

impl CpuRows {
    /// Prints `r`'s throughput row now and keeps its CPU figures.
    fn add(&mut self, mut r: Report) {
        r.print();
        if let Some(cpu) = r.cpu.take() {
            self.0.push((r.name, cpu));
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` asks; the benchmark runs only under `cargo bench`.
    }
    // A full run takes longer than a test binary may: the harness's watchdog stays off.
    support::no_watchdog();
    // Servers and agents log as in production: a debug line per message is CPU of its own.
    if std::env::var_os("DMR_CHILD_LOG").is_none() {
        std::env::set_var("DMR_CHILD_LOG", "info");
    }
    let n = env_usize("DMR_BENCH_MESSAGES", 5000);
    let window = env_usize("DMR_BENCH_WINDOW", 64);
    let per_row = n.min(env_usize("DMR_BENCH_ROW_MESSAGES", AGENT_ROW_MESSAGES));
    let only = std::env::var("DMR_BENCH_ONLY").unwrap_or_default();
    let run = |name: &str| only.is_empty() || only == name;
    println!(
        "DMR relay benchmark: {n} messages, {window} in flight, {} clock ticks/s",
        procs::clock_ticks_per_second()
    );
    match cpu::rabbitmq_background(Duration::from_secs(2)) {
        Some(ms) => println!(
            "RabbitMQ (beam.smp) while this bench sends nothing: {ms:.1} ms CPU per second"
        ),
        None => println!("RabbitMQ's beam.smp not found here: no RabbitMQ CPU figures"),
    }
    report::print_header();
    let mut rows = CpuRows::default();
    if run("baseline") || only == "agents" {
        let world = World::new("bench-base", &["a", "b"]);
        if run("baseline") {
            rows.add(baseline::run(&world, n, window));
        }
        // The yardstick of the sequential `agents` row (c=1): its p50 should stay within
        // about a millisecond of this one's.
        rows.add(baseline::run(&world, per_row, 1));
    }
    if run("relay") || only == "policy" {
        rows.add(wire::relay(
            &World::new("bench-relay", &["a", "b"]),
            n,
            window,
        ));
    }
    if run("policy") {
        let world = World::new("bench-policy", &["a", "b"]);
        rows.add(wire::relay_policy(&world, n, window));
    }
    if run("agents") {
        let concurrency: Vec<usize> = env_list("DMR_BENCH_CONCURRENCY", "1,16")
            .split(',')
            .filter_map(|c| c.trim().parse().ok())
            .collect();
        let sizes = body::parse_sizes(&env_list("DMR_BENCH_SIZES", "default,4k,64k"));
        agents::run(per_row, &concurrency, &sizes, |r| rows.add(r));
    }
    if run("scale") {
        rows.add(scale::run(env_usize("DMR_BENCH_PAIRS", 50).max(1), n));
    }
    report::print_cpu(&rows.0);
    report::print_kernel_share(&rows.0);
    if run("crypto") {
        crypto::run(&World::new("bench-crypto", &["a", "b"]), 2000);
    }
    if run("memory") {
        memory::run(env_usize("DMR_BENCH_AGENTS", 1000));
    }
}
