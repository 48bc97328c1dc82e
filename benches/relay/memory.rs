//! Memory per connected agent: resident memory of one `dmr-server` before and after
//! `count` agents have connected and authenticated (idle, each with its queue consumer
//! open), and what their queues cost RabbitMQ (the management API's per-queue `memory`,
//! summed, and the node's RSS growth from before the queues were declared).

use std::time::Duration;

use base64::Engine;

use crate::procs;
use crate::support::{Server, TestClient, World, MANAGEMENT_URL};

/// What the management API said about the queues of one prefix.
#[derive(Default)]
struct Queues {
    count: usize,
    memory_bytes: u64,
    /// Queues it has no memory figure for yet.
    without_stats: usize,
}

/// Connects `count` idle agents to one server and prints what they cost.
pub fn run(count: usize) {
    let ids: Vec<String> = (0..count).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let world = World::new("bench-mem", &refs);
    let mq_pid = procs::rabbitmq_pid();
    let mq_before = mq_pid.and_then(procs::rss_kib);
    let server = Server::start(&world, "bench-mem-server", &[]);
    let pid = server.proc.child.id();
    std::thread::sleep(Duration::from_millis(500));
    let before = procs::rss_kib(pid).unwrap_or(0);
    let clients = smol::block_on(async {
        let mut v = Vec::with_capacity(count);
        for a in &world.agents {
            match TestClient::connect(&server.ws_url(), &a.id, &a.key).await {
                Ok(c) => v.push(c),
                Err(e) => panic!("agent {} not let in: {e:?}", a.id),
            }
        }
        v
    });
    std::thread::sleep(Duration::from_millis(1000));
    let after = procs::rss_kib(pid).unwrap_or(0);
    let mq_after = mq_pid.and_then(procs::rss_kib);
    println!(
        "\nmemory: {count} authenticated idle agents on one server: RSS {before} KiB → {after} KiB, {:.1} KiB per agent",
        after.saturating_sub(before) as f64 / count as f64
    );
    idle_cpu(pid, count);
    let prefix = format!("{}dmr.agent.", world.prefix);
    match smol::block_on(queues(&prefix, count)) {
        Ok(q) => println!(
            "memory: RabbitMQ, {} agent queues (quorum) with a consumer each: {:.1} KiB per queue (management API `memory`, summed; {} without figures yet)",
            q.count,
            q.memory_bytes as f64 / 1024.0 / (q.count - q.without_stats).max(1) as f64,
            q.without_stats
        ),
        Err(e) => println!("memory: RabbitMQ queue memory unavailable: {e}"),
    }
    if let (Some(b), Some(a)) = (mq_before, mq_after) {
        println!(
            "memory: RabbitMQ beam.smp RSS {b} KiB → {a} KiB, {:.1} KiB per agent queue (includes anything else the node did meanwhile)",
            a.saturating_sub(b) as f64 / count as f64
        );
    }
    drop(clients);
}

/// How long [`idle_cpu`] watches: past one ping round (20 s) would be fairer, but the
/// pings and idle checks of 1000 sessions spread evenly, so 10 s shows their rate.
const IDLE_WATCH: Duration = Duration::from_secs(10);

/// Prints the CPU the server spends per second keeping `count` quiet sessions (pings,
/// idle checks, heartbeats).
fn idle_cpu(pid: u32, count: usize) {
    let (Some(start), t0) = (procs::cpu_ticks(pid), std::time::Instant::now()) else {
        return;
    };
    std::thread::sleep(IDLE_WATCH);
    let Some(end) = procs::cpu_ticks(pid) else {
        return;
    };
    let ms = (end - start) as f64 * 1000.0 / procs::clock_ticks_per_second();
    println!(
        "idle: the server spends {:.1} ms CPU per second with {count} quiet agents (± {:.1})",
        ms / t0.elapsed().as_secs_f64(),
        1000.0 / procs::clock_ticks_per_second() / t0.elapsed().as_secs_f64()
    );
}

/// How long the management API may take to have statistics for every new queue (it
/// collects them every 5 s by default).
const STATS_LIMIT: Duration = Duration::from_secs(20);

/// Counts and sums the `memory` of the queues named with `prefix`, once the management API
/// has statistics for `want` of them.
async fn queues(prefix: &str, want: usize) -> Result<Queues, String> {
    let end = std::time::Instant::now() + STATS_LIMIT;
    loop {
        let q = list_queues(prefix).await?;
        if (q.count >= want && q.without_stats == 0) || std::time::Instant::now() >= end {
            return Ok(q);
        }
        smol::Timer::after(Duration::from_millis(500)).await;
    }
}

/// One listing of the vhost's queues, reduced to those named with `prefix`.
async fn list_queues(prefix: &str) -> Result<Queues, String> {
    let (credentials, host) = MANAGEMENT_URL
        .trim_start_matches("http://")
        .split_once('@')
        .ok_or("MANAGEMENT_URL has no credentials")?;
    let auth = base64::engine::general_purpose::STANDARD.encode(credentials);
    let req = hyper::Request::get(format!("http://{host}/api/queues/%2F?columns=name,memory"))
        .header("authorization", format!("Basic {auth}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .map_err(|e| e.to_string())?;
    // A thousand queues' names and figures (and whatever else the vhost holds) are well
    // over the client's default 64 KiB answer limit.
    let (status, body) = dmr::http::request_limited(req, None, Duration::from_secs(30), 64 << 20)
        .await
        .map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("GET /api/queues answered {status}"));
    }
    let list: Vec<serde_json::Value> = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let mut q = Queues::default();
    for entry in list
        .iter()
        .filter(|e| e["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
    {
        q.count += 1;
        match entry["memory"].as_u64().filter(|m| *m > 0) {
            Some(m) => q.memory_bytes += m,
            None => q.without_stats += 1,
        }
    }
    Ok(q)
}
