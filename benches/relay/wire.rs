//! The relay at the protocol level: this process plays both agents (envelopes sealed before
//! the clock starts, not opened on arrival) so the row measures the servers and RabbitMQ,
//! not the agents' crypto (the `crypto` line does that). Also run with a 100-rule policy
//! and the audit log on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmr::protocol::{ClientFrame, MessageId, ServerFrame};

use crate::cpu::{CpuMeter, Role, Watched};
use crate::report::Report;
use crate::support::{self, Server, TestClient, World};

/// A sends through server 1 to B on server 2, `window` sends in flight; B acks each.
pub fn relay(world: &World, n: usize, window: usize) -> Report {
    relay_with(world, n, window, &[])
}

/// The relay with `extra` server flags (a policy, an audit log).
fn relay_with(world: &World, n: usize, window: usize, extra: &[&str]) -> Report {
    let flags: Vec<&str> = ["--prefetch", "256"].iter().chain(extra).copied().collect();
    let s1 = Server::start(world, "bench-server-1", &flags);
    let s2 = Server::start(world, "bench-server-2", &flags);
    let (a, b) = (world.agent("a"), world.agent("b"));
    let envelopes: Vec<_> = (0..n)
        .map(|_| support::envelope(a, b, &crate::payload()))
        .collect();
    let sent_at: Arc<Mutex<HashMap<MessageId, Instant>>> = Arc::default();
    let (url2, b_id) = (s2.ws_url(), b.id.clone());
    let b_key = dmr::crypto::SecretKey::from_pem(&b.key.to_pem()).unwrap();
    let receiver = smol::block_on(TestClient::connect(&url2, &b_id, &b_key)).unwrap();
    let mut sender = smol::block_on(TestClient::connect(&s1.ws_url(), &a.id, &a.key)).unwrap();
    let meter = CpuMeter::start([
        Some(Watched::new(Role::Server(0), s1.proc.child.id())),
        Some(Watched::new(Role::Server(1), s2.proc.child.id())),
        Watched::rabbitmq(),
    ]);
    let started = Instant::now();
    let recv_thread = {
        let sent_at = sent_at.clone();
        std::thread::spawn(move || receive(receiver, n, &sent_at))
    };
    smol::block_on(async {
        let (mut in_flight, mut accepted) = (0usize, 0usize);
        let mut queue = envelopes.into_iter();
        while accepted < n {
            while in_flight < window {
                let Some(envelope) = queue.next() else { break };
                sent_at
                    .lock()
                    .unwrap()
                    .insert(envelope.header().id, Instant::now());
                sender.send(ClientFrame::Send { envelope }).await;
                in_flight += 1;
            }
            match sender.recv().await {
                Ok(ServerFrame::Accepted { .. }) => {
                    accepted += 1;
                    in_flight -= 1;
                }
                Ok(ServerFrame::Rejected { reason, .. }) => panic!("rejected: {reason}"),
                Ok(_) => {}
                Err(e) => panic!("sender lost: {e:?}"),
            }
        }
    });
    let latencies = recv_thread.join().unwrap();
    let elapsed = started.elapsed();
    meter.settle();
    Report {
        name: "relay: agent→server→MQ→server→agent".into(),
        messages: n,
        elapsed,
        latencies,
        cpu: Some(meter.stop(n)),
    }
}

/// B's side: takes `n` deliveries, acks each, returns their latencies.
fn receive(
    mut receiver: TestClient,
    n: usize,
    sent_at: &Mutex<HashMap<MessageId, Instant>>,
) -> Vec<Duration> {
    smol::block_on(async {
        let mut lat = Vec::with_capacity(n);
        while lat.len() < n {
            let (delivery, env) = receiver
                .next_delivery(Duration::from_secs(30))
                .await
                .expect("delivery");
            let t = sent_at
                .lock()
                .unwrap()
                .remove(&env.header().id)
                .expect("known id");
            lat.push(t.elapsed());
            receiver.send(ClientFrame::Ack { delivery }).await;
        }
        lat
    })
}

/// A policy of 100 rules where only the last allows a → b, so every message is checked
/// against all of them, plus a per-sender rate far above the benchmark's.
fn hundred_rules() -> serde_json::Value {
    let mut rules: Vec<_> = (0..99)
        .map(|i| serde_json::json!({"name": format!("r{i}"), "action": "deny", "from": [format!("x{i}"), "@g"], "to": ["b"], "types": ["Bulk"]}))
        .collect();
    rules.push(serde_json::json!({"name": "a-to-b", "from": ["a"], "to": ["b"]}));
    serde_json::json!({
        "groups": {"g": ["y1", "y2", "y3"]},
        "rules": rules,
        "limits": [{"from": ["*"], "messagesPerSecond": 1_000_000, "maxBytes": 1_048_576}]
    })
}

/// The relay scenario with the 100-rule policy and the audit log (to a file) on.
pub fn relay_policy(world: &World, n: usize, window: usize) -> Report {
    let policy = world.dir.path().join("policy.json");
    std::fs::write(&policy, hundred_rules().to_string()).unwrap();
    let audit = world.dir.path().join("audit.jsonl");
    let (policy, audit) = (policy.display().to_string(), audit.display().to_string());
    let flags = ["--policy-file", &policy, "--audit-log", &audit];
    let mut r = relay_with(world, n, window, &flags);
    r.name = "relay + 100-rule policy + audit log".into();
    let lines = std::fs::read_to_string(&audit).map_or(0, |t| t.lines().count());
    eprintln!("(audit log: {lines} lines for {n} messages over two servers)");
    r
}
