//! An external-style load generator: local services posting to agents' `POST /v1/messages`
//! over keep-alive connections, each sender one request at a time (so `senders` is the
//! concurrency), noting when each message id was sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::body::Bodies;

/// Where one local service posts: its agent's API, and the agent it writes to.
#[derive(Clone)]
pub struct Target {
    pub api: SocketAddr,
    pub recipient: String,
}

/// How long one `POST /v1/messages` may take (the agent answers once RabbitMQ confirmed).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(40);

/// Posts `n` messages in all from `senders` threads, sender `i` to `targets[i % len]`;
/// returns when every one was answered 202, with the send time of each message id.
pub fn post(
    targets: &[Target],
    senders: usize,
    n: usize,
    bodies: &Arc<Bodies>,
) -> HashMap<String, Instant> {
    let next = Arc::new(AtomicUsize::new(0));
    let sent_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let threads: Vec<_> = (0..senders.max(1))
        .map(|i| {
            let target = targets[i % targets.len()].clone();
            let (next, sent_at, bodies) = (next.clone(), sent_at.clone(), bodies.clone());
            std::thread::spawn(move || sender(&target, &next, n, &sent_at, &bodies))
        })
        .collect();
    for t in threads {
        t.join().expect("a sender thread failed");
    }
    let sent = std::mem::take(&mut *sent_at.lock().unwrap());
    sent
}

/// One local service: takes message numbers until `n` are taken.
fn sender(
    target: &Target,
    next: &AtomicUsize,
    n: usize,
    sent_at: &Mutex<HashMap<String, Instant>>,
    bodies: &Bodies,
) {
    // Real local services keep their connection to the agent open.
    let client = dmr::http::Client::new(None);
    let url = format!("http://{}/v1/messages", target.api);
    while next.fetch_add(1, Ordering::Relaxed) < n {
        let id = uuid::Uuid::new_v4().to_string();
        let body = bodies.body(&id, &target.recipient);
        let req = hyper::Request::post(&url)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        sent_at.lock().unwrap().insert(id, Instant::now());
        let (status, text) =
            smol::block_on(client.request(req, REQUEST_TIMEOUT)).expect("agent API unreachable");
        assert_eq!(status, 202, "agent API at {}: {text:?}", target.api);
    }
}

/// End-to-end latencies (POST sent → body at the webhook) of the messages that arrived.
pub fn latencies(
    sent: &HashMap<String, Instant>,
    arrived: &HashMap<String, Instant>,
) -> Vec<Duration> {
    arrived
        .iter()
        .filter_map(|(id, at)| Some(at.saturating_duration_since(*sent.get(id)?)))
        .collect()
}

/// When the last of `arrived` came, for the throughput of a run that started at `start`.
pub fn last_arrival(arrived: &HashMap<String, Instant>, start: Instant) -> Duration {
    arrived
        .values()
        .max()
        .map_or(Duration::ZERO, |t| t.saturating_duration_since(start))
}
