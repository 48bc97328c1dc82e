//! The whole product path: a local service posts to agent A's HTTP API, A seals and sends
//! through server 1, agent B (on server 2) opens each envelope and posts it to a webhook,
//! then sends A a receipt. One row per body size and sender concurrency, each with the CPU
//! per message of A, B, both servers and RabbitMQ.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::body::{Bodies, Size};
use crate::cpu::{CpuMeter, Role, Watched};
use crate::loadgen::{self, Target};
use crate::report::Report;
use crate::support::{self, free_port, AgentProc, Server, World};
use crate::webhook::Webhook;

/// How long the messages of one row may take to arrive before the row is cut short.
const ARRIVAL_LIMIT: Duration = Duration::from_secs(300);

/// Flags of the recipient agent: enough webhook deliveries in flight for 16 senders.
const RECIPIENT_FLAGS: &[&str] = &["--max-concurrent-deliveries", "64"];

/// A `dmr-agent` on a fresh port of `world`, on `server`, delivering to `deliver` if given.
fn start_agent(
    world: &World,
    id: &str,
    server: &Server,
    deliver: Option<&Webhook>,
    extra: &[&str],
) -> AgentProc {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    AgentProc::start_with(
        world,
        id,
        &server.ws_url(),
        addr,
        deliver.map(Webhook::url),
        extra,
    )
}

/// Runs `n` messages for every size × concurrency, handing `emit` each row as it is done.
pub fn run(n: usize, concurrency: &[usize], sizes: &[Size], mut emit: impl FnMut(Report)) {
    let world = World::new("bench-agents", &["a", "b"]);
    let s1 = Server::start(&world, "bench-agents-server-1", &[]);
    let s2 = Server::start(&world, "bench-agents-server-2", &[]);
    let hook = Webhook::start();
    let b = start_agent(&world, "b", &s2, Some(&hook), RECIPIENT_FLAGS);
    let a = start_agent(&world, "a", &s1, None, &[]);
    let target = [Target {
        api: a.addr,
        recipient: "b".into(),
    }];
    // The first messages also pin B's key and open the keep-alive connections.
    let warm = Arc::new(Bodies::new(Size::Default, 1));
    loadgen::post(&target, 4, 40, &warm);
    hook.wait_for(40, ARRIVAL_LIMIT);
    hook.take_arrivals();
    let watched = || {
        [
            Some(Watched::new(Role::Sender, a.proc.child.id())),
            Some(Watched::new(Role::Recipient, b.proc.child.id())),
            Some(Watched::new(Role::Server(0), s1.proc.child.id())),
            Some(Watched::new(Role::Server(1), s2.proc.child.id())),
            Watched::rabbitmq(),
        ]
    };
    for &size in sizes {
        let bodies = Arc::new(Bodies::new(size, 1));
        let body_bytes = bodies.body(&uuid::Uuid::nil().to_string(), "b").len();
        for &c in concurrency {
            let receipts_before = receipts_sent(b.addr);
            let meter = CpuMeter::start(watched());
            let started = Instant::now();
            let sent = loadgen::post(&target, c, n, &bodies);
            let got = hook.wait_for(n, ARRIVAL_LIMIT);
            if got < n {
                eprintln!(
                    "(agents c={c} {size}: only {got} of {n} arrived within {ARRIVAL_LIMIT:?})"
                );
            }
            let arrived = hook.take_arrivals();
            meter.settle();
            let receipts = receipts_sent(b.addr) - receipts_before;
            println!(
                "(agents c={c} {size}: {receipts} receipt envelopes for {} messages, {:.2} per message)",
                arrived.len(),
                receipts / arrived.len().max(1) as f64
            );
            emit(Report {
                name: format!("agents: API→webhook c={c}, {body_bytes} B"),
                messages: arrived.len(),
                elapsed: loadgen::last_arrival(&arrived, started),
                latencies: loadgen::latencies(&sent, &arrived),
                cpu: Some(meter.stop(arrived.len())),
            });
        }
    }
}

/// Receipt envelopes the recipient agent has sent so far: each costs a trip through the
/// servers and RabbitMQ of its own, so receipts per message is their share of that CPU.
fn receipts_sent(agent: SocketAddr) -> f64 {
    support::scrape_metric(agent, "dmr_agent_receipts_sent_total")
}
