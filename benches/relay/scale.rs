//! Many agents at once: `pairs` sender/recipient agent pairs spread over two servers (each
//! pair crossing from one to the other), one local service per sender posting one message
//! at a time. Throughput, and CPU per message per class: all senders, all recipients, each
//! server, RabbitMQ.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::body::{Bodies, Size};
use crate::cpu::{CpuMeter, Role, Watched};
use crate::loadgen::{self, Target};
use crate::report::Report;
use crate::support::{agent_args, free_port, AgentProc, Proc, Server, World, AGENT_BIN};
use crate::webhook::Webhook;

/// How long the run's messages may take to arrive before the row is cut short.
const ARRIVAL_LIMIT: Duration = Duration::from_secs(300);

/// Starts agent `id` on `server` without waiting for it (a hundred agents start together).
fn spawn_agent(world: &World, id: &str, server: &Server, deliver: Option<&Webhook>) -> AgentProc {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let key = &world.agent(id).key_path;
    let args = agent_args(id, key, &server.ws_url(), addr, deliver.map(Webhook::url));
    let name = format!("agent-{id}-{}", addr.port());
    AgentProc {
        proc: Proc::spawn(&name, AGENT_BIN, &args, world.dir.path()),
        addr,
    }
}

/// `n` messages over `pairs` pairs (a0 → b0, a1 → b1, …).
pub fn run(pairs: usize, n: usize) -> Report {
    let senders: Vec<String> = (0..pairs).map(|i| format!("a{i}")).collect();
    let recipients: Vec<String> = (0..pairs).map(|i| format!("b{i}")).collect();
    let ids: Vec<&str> = senders
        .iter()
        .chain(&recipients)
        .map(String::as_str)
        .collect();
    let world = World::new("bench-scale", &ids);
    let servers = [
        Server::start(&world, "bench-scale-server-1", &[]),
        Server::start(&world, "bench-scale-server-2", &[]),
    ];
    let hook = Webhook::start();
    let mut agents: Vec<(Role, AgentProc)> = Vec::with_capacity(2 * pairs);
    for i in 0..pairs {
        let (here, there) = (&servers[i % 2], &servers[(i + 1) % 2]);
        agents.push((Role::Sender, spawn_agent(&world, &senders[i], here, None)));
        agents.push((
            Role::Recipient,
            spawn_agent(&world, &recipients[i], there, Some(&hook)),
        ));
    }
    for (_, agent) in &mut agents {
        agent.wait_ready();
    }
    let targets: Vec<Target> = agents
        .iter()
        .filter(|(role, _)| *role == Role::Sender)
        .zip(&recipients)
        .map(|((_, a), b)| Target {
            api: a.addr,
            recipient: b.clone(),
        })
        .collect();
    let bodies = Arc::new(Bodies::new(Size::Default, recipients[pairs - 1].len()));
    // One message per pair first: keys pinned, connections open.
    loadgen::post(&targets, pairs, pairs, &bodies);
    hook.wait_for(pairs, ARRIVAL_LIMIT);
    hook.take_arrivals();

    let watched = agents
        .iter()
        .map(|(role, a)| Some(Watched::new(*role, a.proc.child.id())))
        .chain([
            Some(Watched::new(Role::Server(0), servers[0].proc.child.id())),
            Some(Watched::new(Role::Server(1), servers[1].proc.child.id())),
            Watched::rabbitmq(),
        ]);
    let meter = CpuMeter::start(watched);
    let started = Instant::now();
    let sent = loadgen::post(&targets, pairs, n, &bodies);
    let got = hook.wait_for(n, ARRIVAL_LIMIT);
    if got < n {
        eprintln!("(scale: only {got} of {n} arrived within {ARRIVAL_LIMIT:?})");
    }
    let arrived = hook.take_arrivals();
    meter.settle();
    Report {
        name: format!("scale: {pairs} pairs over 2 servers"),
        messages: arrived.len(),
        elapsed: loadgen::last_arrival(&arrived, started),
        latencies: loadgen::latencies(&sent, &arrived),
        cpu: Some(meter.stop(arrived.len())),
    }
}
