//! End-to-end throughput, latency and memory of the relay, beside a raw-RabbitMQ baseline
//! measured in the same run (these machines are shared and noisy: compare within a run).
//!
//! `cargo bench --bench relay` (release build; RabbitMQ on 127.0.0.1:5672). Scale with
//! `DMR_BENCH_MESSAGES` (default 5000) and `DMR_BENCH_WINDOW` (messages in flight, default 64).
//!
//! 1. baseline: publish with confirms into the same kind of quorum queue, consume with
//!    manual acks (through the project's broker module: same client, same topology).
//! 2. relay: a protocol-level agent seals and sends through a real `dmr-server` to a second
//!    agent on a second `dmr-server`, which opens each envelope and acks it.
//! 3. agents: local HTTP API of one `dmr-agent` → webhook behind another `dmr-agent`.
//! 4. memory per connected (authenticated, idle) agent on one server.
//! 5. relay+policy: the relay scenario again with a 100-rule `--policy-file` (the allowing
//!    rule last, a rate limit that never bites) and `--audit-log` on; `DMR_BENCH_ONLY=policy`
//!    runs it beside the plain relay row.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmr::broker::{Broker, Topology};
use dmr::protocol::{AgentId, ClientFrame, Header, Kind, MessageId, ServerFrame};
use support::*;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Throughput and latency percentiles of one scenario.
struct Report {
    name: &'static str,
    messages: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Report {
    fn print(&mut self) {
        self.latencies.sort();
        let pct = |p: f64| {
            let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
            self.latencies
                .get(i)
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        println!(
            "| {:<34} | {:>6} | {:>9.0} | {:>7.2} | {:>7.2} | {:>7.2} | {:>7.2} |",
            self.name,
            self.messages,
            self.messages as f64 / self.elapsed.as_secs_f64(),
            pct(0.5),
            pct(0.9),
            pct(0.99),
            pct(1.0)
        );
    }
}

fn payload() -> Vec<u8> {
    // A realistic small chat message: ~200 bytes of JSON.
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

/// Raw RabbitMQ through the broker module: publish+confirm with `window` in flight, consume+ack.
fn baseline(world: &World, n: usize, window: usize) -> Report {
    let topology = Topology {
        prefix: world.prefix.clone(),
        ..Topology::default()
    };
    let broker = Broker::start(vec![AMQP_URL.into()], topology).unwrap();
    let b = AgentId::new("b").unwrap();
    smol::block_on(async {
        broker.connected().await;
        broker
            .declare_agents(&[AgentId::new("a").unwrap(), b.clone()])
            .await
            .unwrap();
        let sent_at: Arc<Mutex<HashMap<MessageId, Instant>>> = Arc::default();
        let consumer = broker.consume(&b, 256).await.unwrap();
        let body = support::envelope(world.agent("a"), world.agent("b"), &payload()).to_bytes();
        let started = Instant::now();
        let receiver = {
            let sent_at = sent_at.clone();
            smol::spawn(async move {
                let mut lat = Vec::with_capacity(n);
                while lat.len() < n {
                    let d = consumer.next().await.expect("consumer ended");
                    let id = MessageId(d.message_id.as_deref().unwrap().parse().unwrap());
                    if let Some(t) = sent_at.lock().unwrap().remove(&id) {
                        lat.push(t.elapsed());
                    }
                    consumer.ack(d.tag).await.unwrap();
                }
                lat
            })
        };
        let next = Arc::new(AtomicUsize::new(0));
        let publishers: Vec<_> = (0..window)
            .map(|_| {
                let (broker, next, sent_at, body) =
                    (broker.clone(), next.clone(), sent_at.clone(), body.clone());
                smol::spawn(async move {
                    while next.fetch_add(1, Ordering::Relaxed) < n {
                        let header = Header {
                            id: MessageId::random(),
                            sender: AgentId::new("a").unwrap(),
                            recipient: AgentId::new("b").unwrap(),
                            created_at_ms: now_ms(),
                            kind: Kind::chat_message(),
                        };
                        sent_at.lock().unwrap().insert(header.id, Instant::now());
                        broker.publish(&header, body.clone()).await.unwrap();
                    }
                })
            })
            .collect();
        for p in publishers {
            p.await;
        }
        let latencies = receiver.await;
        let elapsed = started.elapsed();
        broker.close().await;
        Report {
            name: "raw RabbitMQ (confirm + ack)",
            messages: n,
            elapsed,
            latencies,
        }
    })
}

/// Protocol-level agents through two real servers. Envelopes are sealed before the clock
/// starts and not opened on arrival: agents run in their own processes, so their crypto is
/// measured separately (`crypto` row) instead of serialising this one bench thread.
fn relay(world: &World, n: usize, window: usize) -> Report {
    relay_with(world, n, window, &[])
}

/// The relay with `extra` server flags (a policy, an audit log).
fn relay_with(world: &World, n: usize, window: usize, extra: &[&str]) -> Report {
    let flags: Vec<&str> = ["--prefetch", "256"].iter().chain(extra).copied().collect();
    let s1 = Server::start(world, "bench-server-1", &flags);
    let s2 = Server::start(world, "bench-server-2", &flags);
    let (a, b) = (world.agent("a"), world.agent("b"));
    let envelopes: Vec<_> = (0..n)
        .map(|_| support::envelope(a, b, &payload()))
        .collect();
    let sent_at: Arc<Mutex<HashMap<MessageId, Instant>>> = Arc::default();
    let (url2, b_id) = (s2.ws_url(), b.id.clone());
    let b_key = dmr::crypto::SecretKey::from_pem(&b.key.to_pem()).unwrap();
    let receiver = smol::block_on(TestClient::connect(&url2, &b_id, &b_key)).unwrap();
    let mut sender = smol::block_on(TestClient::connect(&s1.ws_url(), &a.id, &a.key)).unwrap();
    let cpu = CpuMeter::start(&[&s1, &s2]);
    let started = Instant::now();
    let recv_thread = {
        let sent_at = sent_at.clone();
        std::thread::spawn(move || {
            let mut receiver = receiver;
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
        })
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
    cpu.print(n);
    Report {
        name: "relay: agent→server→MQ→server→agent",
        messages: n,
        elapsed: started.elapsed(),
        latencies,
    }
}

/// The agents' own cost per message: seal at the sender plus open at the recipient, on one core.
fn crypto(world: &World, n: usize) {
    let (a, b) = (world.agent("a"), world.agent("b"));
    let plain = payload();
    let t = Instant::now();
    let sealed: Vec<_> = (0..n).map(|_| support::envelope(a, b, &plain)).collect();
    let seal = t.elapsed();
    let t = Instant::now();
    for e in &sealed {
        dmr::crypto::open(&b.key, &a.key.public_key(), e).unwrap();
    }
    let open = t.elapsed();
    println!(
        "\ncrypto per {} B message, one core: seal {:.0} µs, open {:.0} µs (HPKE Auth, X25519 + ChaCha20-Poly1305)",
        plain.len(),
        seal.as_secs_f64() * 1e6 / n as f64,
        open.as_secs_f64() * 1e6 / n as f64
    );
}

/// Real agents: HTTP POST on A → webhook behind B.
fn agents(world: &World, n: usize, window: usize) -> Report {
    let s1 = Server::start(world, "bench-agents-server-1", &[]);
    let s2 = Server::start(world, "bench-agents-server-2", &[]);
    let hook = Webhook::start();
    let _b = AgentProc::start(
        world,
        "b",
        &[&s2],
        Some(&hook),
        &["--max-concurrent-deliveries", "64"],
    );
    let a = AgentProc::start(world, "a", &[&s1], None, &[]);
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let sent_at: Arc<Mutex<HashMap<String, Duration>>> = Arc::default();
    let threads: Vec<_> = (0..window.min(32))
        .map(|_| {
            let (next, sent_at, addr) = (next.clone(), sent_at.clone(), a.addr);
            std::thread::spawn(move || {
                // A local service keeps its connection to the agent open, as real clients do.
                let client = dmr::http::Client::new(None);
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    let id = uuid::Uuid::new_v4().to_string();
                    sent_at.lock().unwrap().insert(id.clone(), started.elapsed());
                    let body = serde_json::json!({"id": id, "recipientId": "b", "payload": {"q": "Kas maksuvõlg takistab relvaloa saamist?"}}).to_string();
                    let req = hyper::Request::post(format!("http://{addr}/v1/messages"))
                        .header("content-type", "application/json")
                        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                        .unwrap();
                    let (status, text) = smol::block_on(client.request(req, Duration::from_secs(40))).expect("agent API");
                    assert_eq!(status, 202, "{text:?}");
                }
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(n);
    let mut seen = 0usize;
    let deadline = Instant::now() + Duration::from_secs(300);
    while latencies.len() < n && Instant::now() < deadline {
        let bodies = hook.bodies();
        for b in &bodies[seen..] {
            // The webhook records arrival order; approximate arrival by when we see it.
            if let Some(t) = sent_at.lock().unwrap().get(b["id"].as_str().unwrap_or("")) {
                latencies.push(started.elapsed().saturating_sub(*t));
            }
        }
        seen = bodies.len();
        std::thread::sleep(Duration::from_millis(1));
    }
    let elapsed = started.elapsed();
    for t in threads {
        t.join().unwrap();
    }
    Report {
        name: "agents: HTTP API → webhook",
        messages: latencies.len(),
        elapsed,
        latencies,
    }
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
fn relay_policy(world: &World, n: usize, window: usize) -> Report {
    let policy = world.dir.path().join("policy.json");
    std::fs::write(&policy, hundred_rules().to_string()).unwrap();
    let audit = world.dir.path().join("audit.jsonl");
    let (policy, audit) = (policy.display().to_string(), audit.display().to_string());
    let flags = ["--policy-file", &policy, "--audit-log", &audit];
    let mut r = relay_with(world, n, window, &flags);
    r.name = "relay + 100-rule policy + audit log";
    let lines = std::fs::read_to_string(&audit).map_or(0, |t| t.lines().count());
    eprintln!("(audit log: {lines} lines for {n} messages over two servers)");
    r
}

/// CPU time (user + system) a process has used so far, from `/proc/PID/stat`.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after its `)`.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_micros(ticks * 1_000_000 / hz))
}

/// The RabbitMQ node's Erlang VM on this machine, if one runs (for its CPU time).
fn rabbitmq_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

/// CPU used by the two servers and RabbitMQ during one scenario.
struct CpuMeter {
    pids: Vec<(&'static str, u32, Duration)>,
}

impl CpuMeter {
    fn start(servers: &[&Server; 2]) -> Self {
        let mut pids = vec![
            ("server 1", servers[0].proc.child.id()),
            ("server 2", servers[1].proc.child.id()),
        ];
        pids.extend(rabbitmq_pid().map(|p| ("RabbitMQ", p)));
        let pids = pids
            .into_iter()
            .filter_map(|(name, pid)| Some((name, pid, cpu_time(pid)?)))
            .collect();
        Self { pids }
    }

    /// Prints CPU ms per message of each process (servers and RabbitMQ).
    fn print(&self, n: usize) {
        let per_msg: Vec<String> = self
            .pids
            .iter()
            .filter_map(|(name, pid, before)| {
                let used = cpu_time(*pid)?.saturating_sub(*before);
                Some(format!(
                    "{name} {:.3}",
                    used.as_secs_f64() * 1000.0 / n as f64
                ))
            })
            .collect();
        eprintln!("(CPU ms per message: {})", per_msg.join(", "));
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

/// Resident memory added per authenticated idle agent session.
fn memory(count: usize) {
    let ids: Vec<String> = (0..count).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let world = World::new("bench-mem", &refs);
    let server = Server::start(&world, "bench-mem-server", &[]);
    let pid = server.proc.child.id();
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_kib(pid);
    let clients = smol::block_on(async {
        let mut v = Vec::with_capacity(count);
        for a in &world.agents {
            v.push(
                TestClient::connect(&server.ws_url(), &a.id, &a.key)
                    .await
                    .unwrap(),
            );
        }
        v
    });
    std::thread::sleep(Duration::from_millis(1000));
    let after = rss_kib(pid);
    println!(
        "\nmemory: {count} authenticated idle agents on one server: RSS {before} KiB → {after} KiB, {:.1} KiB per agent",
        (after.saturating_sub(before)) as f64 / count as f64
    );
    drop(clients);
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` asks; the benchmark runs only under `cargo bench`.
    }
    let n = env_usize("DMR_BENCH_MESSAGES", 5000);
    let window = env_usize("DMR_BENCH_WINDOW", 64);
    println!(
        "DMR relay benchmark: {n} messages of ~200 B, {window} in flight, SMOL_THREADS={}",
        std::env::var("SMOL_THREADS").unwrap_or_default()
    );
    println!(
        "| {:<34} | {:>6} | {:>9} | {:>7} | {:>7} | {:>7} | {:>7} |",
        "scenario", "msgs", "msg/s", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    println!(
        "|{:-<36}|{:-<8}|{:-<11}|{:-<9}|{:-<9}|{:-<9}|{:-<9}|",
        "", "", "", "", "", "", ""
    );
    // DMR_BENCH_ONLY=memory (or baseline, relay, agents, crypto) runs one scenario;
    // DMR_BENCH_ONLY=policy runs the relay with and without the policy and audit log.
    let only = std::env::var("DMR_BENCH_ONLY").unwrap_or_default();
    let run = |name: &str| only.is_empty() || only == name;
    if run("baseline") {
        baseline(&World::new("bench-base", &["a", "b"]), n, window).print();
    }
    if run("relay") || only == "policy" {
        relay(&World::new("bench-relay", &["a", "b"]), n, window).print();
    }
    if run("policy") {
        relay_policy(&World::new("bench-policy", &["a", "b"]), n, window).print();
    }
    if run("agents") {
        agents(
            &World::new("bench-agents", &["a", "b"]),
            n.min(2000),
            window,
        )
        .print();
    }
    if run("crypto") {
        crypto(&World::new("bench-crypto", &["a", "b"]), 2000);
    }
    if run("memory") {
        memory(env_usize("DMR_BENCH_AGENTS", 300));
    }
}
