//! Black-box tests of `dmr-agent`: the real binaries (`dmr-server`, `dmr-agent`) and the
//! real RabbitMQ on 127.0.0.1:5672. Every test has its own queue prefix (see `World`) and
//! its own ports, so the tests run in parallel.
//!
//! Helpers beyond the shared harness live at the top of this file: a raw HTTP/1.1 call that
//! also returns the response headers (for `Retry-After`), counters over webhook bodies, and a
//! spawner for agent processes that must not be waited on for readiness.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};
use support::{
    agent_args, free_port, http_call, http_get, peek_queue, wait_until, write_private_key,
    AgentProc, Proc, Server, Webhook, World, AGENT_BIN,
};

const SECOND: Duration = Duration::from_secs(1);

/// Sends `payload` from `agent` to `to`; asserts 202 and returns the id of the answer.
fn send_ok(agent: &AgentProc, to: &str, payload: Value) -> String {
    let (status, body) = agent.send(to, payload);
    assert_eq!(status, 202, "send to {to} answered {status}: {body}");
    body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("202 without an id: {body}"))
        .to_owned()
}

/// How many webhook bodies carry each message id.
fn id_counts(hook: &Webhook) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for b in hook.bodies() {
        let id = b["id"].as_str().unwrap_or("<no id>").to_owned();
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

fn delivered_count(hook: &Webhook, id: &str) -> usize {
    id_counts(hook).get(id).copied().unwrap_or(0)
}

/// The value of AMQP header `key` in the harness's `Debug` rendering of the header table,
/// e.g. `{ShortStr(10, "dmr-sender"): S(LongStr(6, "police")), …}`: the first quoted string
/// after the quoted key.
fn header_value(headers: &str, key: &str) -> Option<String> {
    let rest = &headers[headers.find(&format!("\"{key}\""))? + key.len() + 2..];
    let start = rest.find('"')? + 1;
    let len = rest[start..].find('"')?;
    Some(rest[start..start + len].to_owned())
}

/// A plain HTTP/1.1 exchange over a fresh TCP connection: status, lower-cased headers, body.
fn raw_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, BTreeMap<String, String>, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

/// Starts a `dmr-agent run` without waiting for it to become ready.
fn spawn_agent(
    world: &World,
    name: &str,
    id: &str,
    key: &std::path::Path,
    servers: &str,
    listen: SocketAddr,
    deliver: Option<&Webhook>,
) -> Proc {
    let args = agent_args(id, key, servers, listen, deliver.map(Webhook::url));
    Proc::spawn(name, AGENT_BIN, &args, world.dir.path())
}

fn loopback() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// A payload that is easy to get subtly wrong: nesting, unicode, numbers, null, empty values.
fn tricky_payload(tag: &str) -> Value {
    json!({
        "tag": tag,
        "question": "Kas maksuvõlg takistab relvaloa saamist? Ärge muretsege — 🚓 税務署 «ñ»",
        "nested": {
            "list": [1, -2, 2.5, null, true, false, "žš\u{0000}\"\\", [], {}],
            "deep": {"a": {"b": {"c": [{"d": "õäöü ÕÄÖÜ"}]}}},
            "empty": "",
        },
    })
}

fn field_names(body: &Value) -> BTreeSet<String> {
    body.as_object()
        .unwrap_or_else(|| panic!("webhook body is not an object: {body}"))
        .keys()
        .cloned()
        .collect()
}

fn expected_fields() -> BTreeSet<String> {
    [
        "id",
        "senderId",
        "recipientId",
        "timestamp",
        "type",
        "payload",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

fn parse_rfc3339_ms(s: &str) -> i128 {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("timestamp {s:?} is not RFC 3339: {e}"))
        .unix_timestamp_nanos()
        / 1_000_000
}

fn now_ms() -> i128 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000
}

// 1 ---------------------------------------------------------------------------------------

#[test]
fn round_trip_both_ways_delivers_the_exact_body() {
    let world = World::new("rt", &["police", "tax-board"]);
    let server = Server::start(&world, "server", &[]);
    let (hook_a, hook_b) = (Webhook::start(), Webhook::start());
    let a = AgentProc::start(&world, "police", &[&server], Some(&hook_a), &[]);
    let b = AgentProc::start(&world, "tax-board", &[&server], Some(&hook_b), &[]);

    // A → B with the defaults filled in by the agent.
    let before = now_ms();
    let payload_ab = tricky_payload("police→tax-board");
    let id_ab = send_ok(&a, "tax-board", payload_ab.clone());
    let after = now_ms();

    // B → A with every optional field given by the caller.
    let id_ba = uuid::Uuid::new_v4().to_string();
    let ts_ms = now_ms() - 1234;
    let ts = time::OffsetDateTime::from_unix_timestamp_nanos(ts_ms * 1_000_000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let payload_ba = tricky_payload("tax-board→police");
    let request = json!({
        "id": id_ba, "recipientId": "police", "type": "Answer", "timestamp": ts,
        "payload": payload_ba,
    });
    let (status, answer) = b.post("/v1/messages", &request.to_string(), &[]);
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        answer,
        json!({ "id": id_ba, "status": "sent" }),
        "the 202 carries the caller's id"
    );

    wait_until(15 * SECOND, "both deliveries", || {
        !hook_a.bodies().is_empty() && !hook_b.bodies().is_empty()
    });
    std::thread::sleep(SECOND); // room for an unwanted second copy to show up

    let got_b = hook_b.bodies();
    assert_eq!(got_b.len(), 1, "tax-board got {got_b:?}");
    let m = &got_b[0];
    assert_eq!(field_names(m), expected_fields(), "{m}");
    assert_eq!(m["id"], json!(id_ab));
    assert_eq!(m["senderId"], json!("police"));
    assert_eq!(m["recipientId"], json!("tax-board"));
    assert_eq!(m["type"], json!("ChatMessage"));
    assert_eq!(m["payload"], payload_ab, "payload changed on the way");
    let t = parse_rfc3339_ms(m["timestamp"].as_str().expect("timestamp is a string"));
    assert!(
        (before..=after).contains(&t),
        "timestamp {t} not within the send call [{before}, {after}]"
    );

    let got_a = hook_a.bodies();
    assert_eq!(got_a.len(), 1, "police got {got_a:?}");
    let m = &got_a[0];
    assert_eq!(field_names(m), expected_fields(), "{m}");
    assert_eq!(m["id"], json!(id_ba));
    assert_eq!(m["senderId"], json!("tax-board"));
    assert_eq!(m["recipientId"], json!("police"));
    assert_eq!(m["type"], json!("Answer"));
    assert_eq!(m["payload"], payload_ba, "payload changed on the way");
    assert_eq!(
        parse_rfc3339_ms(m["timestamp"].as_str().unwrap()),
        ts_ms,
        "caller's timestamp {ts} not kept: {}",
        m["timestamp"]
    );
}

// 2 ---------------------------------------------------------------------------------------

#[test]
fn payload_never_appears_in_rabbitmq() {
    let world = World::new("confidential", &["police", "tax-board"]);
    let server = Server::start(&world, "server", &[]);
    let a = AgentProc::start(&world, "police", &[&server], None, &[]);
    // tax-board's agent is not running: its messages wait in its queue, where we look.
    let marker = "PLAINTEXT-MARKER-d7f0c3a9e1";
    let n = 5;
    let ids: BTreeSet<String> = (0..n)
        .map(|i| {
            send_ok(
                &a,
                "tax-board",
                json!({"secret": format!("{marker} #{i}"), "again": [marker, {"k": marker}]}),
            )
        })
        .collect();
    assert_eq!(ids.len(), n, "ids must be distinct");

    let stored = peek_queue(&world.queue("tax-board"), n + 1, 2 * SECOND);
    assert_eq!(stored.len(), n, "messages waiting in the queue");
    let stored_ids: BTreeSet<String> = stored.iter().filter_map(|m| m.message_id.clone()).collect();
    assert_eq!(
        stored_ids, ids,
        "message_id of each queued message = the 202's id"
    );
    let needles: Vec<&[u8]> = vec![marker.as_bytes(), b"PLAINTEXT-MARKER", b"\"secret\""];
    for m in &stored {
        for needle in &needles {
            assert!(
                !m.body.windows(needle.len()).any(|w| w == *needle),
                "message {:?} body contains {:?} in clear",
                m.message_id,
                String::from_utf8_lossy(needle)
            );
        }
        assert!(
            !m.headers.contains("MARKER"),
            "headers leak content: {}",
            m.headers
        );
        assert_eq!(
            header_value(&m.headers, "dmr-sender").as_deref(),
            Some("police"),
            "headers should name the sender: {}",
            m.headers
        );
        assert_eq!(
            header_value(&m.headers, "dmr-recipient").as_deref(),
            Some("tax-board"),
            "headers should name the recipient: {}",
            m.headers
        );
    }

    // The marker did travel, encrypted: the real recipient reads it.
    let hook = Webhook::start();
    let _b = AgentProc::start(&world, "tax-board", &[&server], Some(&hook), &[]);
    wait_until(15 * SECOND, "all messages delivered", || {
        hook.bodies().len() >= n
    });
    for body in hook.bodies() {
        assert!(
            body["payload"]["secret"]
                .as_str()
                .is_some_and(|s| s.starts_with(marker)),
            "{body}"
        );
    }
    let delivered: BTreeSet<String> = id_counts(&hook).into_keys().collect();
    assert_eq!(delivered, ids);
}

// 3 ---------------------------------------------------------------------------------------

#[test]
fn webhook_down_then_up_delivers_exactly_once() {
    let world = World::new("hookdown", &["a", "b"]);
    let server = Server::start(&world, "server", &[]);
    let hook = Webhook::start();
    hook.failing.store(true, Ordering::SeqCst);
    let a = AgentProc::start(&world, "a", &[&server], None, &[]);
    let b = AgentProc::start(&world, "b", &[&server], Some(&hook), &[]);

    let id = send_ok(&a, "b", json!({"q": "are you there?"}));
    wait_until(10 * SECOND, "a first webhook attempt", || {
        hook.attempts.load(Ordering::SeqCst) > 0
    });
    std::thread::sleep(2 * SECOND);
    let failed = hook.attempts.load(Ordering::SeqCst);
    assert!(
        failed >= 2,
        "the agent should retry the webhook, tried {failed} times"
    );
    assert!(hook.bodies().is_empty());
    assert!(b.metric("dmr_agent_webhook_failures_total") >= failed as f64);
    assert_eq!(b.metric("dmr_agent_delivered_total"), 0.0);

    hook.failing.store(false, Ordering::SeqCst);
    wait_until(20 * SECOND, "delivery once the webhook is back", || {
        delivered_count(&hook, &id) > 0
    });
    std::thread::sleep(2 * SECOND);
    assert_eq!(delivered_count(&hook, &id), 1, "{:?}", hook.bodies());
    assert_eq!(hook.bodies().len(), 1, "{:?}", hook.bodies());
    assert_eq!(b.metric("dmr_agent_delivered_total"), 1.0);
    // It was acknowledged: nothing left for B in RabbitMQ (the agent is stopped first so
    // that the single-active-consumer queue lets us look).
    let mut b = b;
    b.proc.stop();
    let left = peek_queue(&world.queue("b"), 5, SECOND);
    assert!(left.is_empty(), "{} messages left in B's queue", left.len());
}

// 4 ---------------------------------------------------------------------------------------

/// A local service that answers "never" (400, 404, 410, 413, 422) gets each message once:
/// B's agent dead-letters it at once, not after `--delivery-limit` attempts, and the DLQ copy
/// keeps its headers and carries the reason in `x-dmr-reason`. (A 5xx is an outage instead:
/// see `webhook_down_then_up_delivers_exactly_once` and tests/faults.rs.)
#[test]
fn a_webhook_refusing_for_good_sends_the_message_to_the_dlq_at_once() {
    const NEVER: [u16; 5] = [400, 404, 410, 413, 422];
    let world = World::new("dlq", &["a", "b"]);
    let server = Server::start(&world, "server", &["--delivery-limit", "5"]);
    let hook = Webhook::start();
    let a = AgentProc::start(&world, "a", &[&server], None, &[]);
    let b = AgentProc::start(&world, "b", &[&server], Some(&hook), &[]);

    let mut ids = BTreeMap::new();
    for (i, status) in NEVER.into_iter().enumerate() {
        hook.answer.store(status, Ordering::SeqCst);
        let id = send_ok(
            &a,
            "b",
            json!({"q": "nobody will take this", "status": status}),
        );
        wait_until(10 * SECOND, "the webhook asked", || {
            hook.attempts.load(Ordering::SeqCst) > i
        });
        ids.insert(id, status);
    }
    let dead = support::dead_letters(&world, NEVER.len(), 20 * SECOND);
    assert_eq!(dead.len(), NEVER.len(), "DLQ of {}: {dead:?}", world.dlq());
    for d in &dead {
        let id = d.message_id.clone().unwrap_or_default();
        let status = ids
            .get(&id)
            .unwrap_or_else(|| panic!("unexpected message {id} in the DLQ: {d:?}"));
        let reason = d.reason.as_deref().unwrap_or_default();
        assert!(
            reason.contains(&status.to_string()) && reason.contains("local service"),
            "{id} (answered {status}): x-dmr-reason {reason:?}"
        );
        assert_eq!(d.recipient.as_deref(), Some("b"), "headers kept: {d:?}");
        assert_eq!(d.sender.as_deref(), Some("a"), "headers kept: {d:?}");
    }
    // One attempt each: a "never" is not retried, and spends no delivery limit.
    let attempts = hook.attempts.load(Ordering::SeqCst);
    assert_eq!(attempts, NEVER.len(), "webhook attempts");
    assert!(hook.bodies().is_empty(), "webhook took {:?}", hook.bodies());
    assert_eq!(b.metric("dmr_agent_delivered_total"), 0.0);
    assert_eq!(
        b.metric("dmr_agent_dead_lettered_total"),
        NEVER.len() as f64
    );
    assert_eq!(
        b.metric("dmr_agent_webhook_up"),
        1.0,
        "an answer means it is up"
    );
    assert!(
        b.proc.log_text().contains("dead-lettering it"),
        "the agent should log why it refused the delivery"
    );
    // Stop B, then check that its queue is empty: the messages left it for the DLQ.
    let mut b = b;
    b.proc.stop();
    let left = peek_queue(&world.queue("b"), 5, SECOND);
    assert!(left.is_empty(), "{} messages left in B's queue", left.len());
}

// 5 ---------------------------------------------------------------------------------------

/// Agent B is SIGKILLed and restarted while A keeps sending; every accepted id must reach
/// B's webhook, and exactly once.
///
/// Why zero duplicates is a fair assertion here: the one documented repeat (DESIGN §4.4) is
/// a crash between the webhook's 2xx and B's `Ack`, because the replay guard is in memory.
/// This test kills B only when that window is provably empty:
/// 1. 20 messages are delivered with the webhook up, and we wait until the server has
///    counted 20 acks from B (so no 2xx is waiting for its Ack);
/// 2. the webhook starts failing, A sends 10 more, and B is seen retrying them: none of
///    them can be in the 2xx→Ack window because no 2xx is ever answered;
/// 3. B is SIGKILLed; A sends 20 more while B is gone (still 202: they are durable in
///    RabbitMQ);
/// 4. B restarts on the same port with the same webhook, which comes back up.
///
/// `restarted_agent_loses_nothing_even_in_the_ack_window` below kills B at a random moment
/// instead and reports the duplicates it sees.
#[test]
fn restarted_agent_delivers_every_accepted_message_once() {
    let world = World::new("restart", &["a", "b"]);
    let server = Server::start(&world, "server", &[]);
    let hook = Webhook::start();
    let a = AgentProc::start(&world, "a", &[&server], None, &[]);
    let mut b = AgentProc::start(&world, "b", &[&server], Some(&hook), &[]);
    let b_addr = b.addr;
    let send = |range: std::ops::Range<usize>| -> Vec<String> {
        range
            .map(|i| send_ok(&a, "b", json!({"n": i, "text": "järjekord"})))
            .collect()
    };

    let mut ids = send(0..20);
    wait_until(20 * SECOND, "20 deliveries acked", || {
        id_counts(&hook).len() == 20 && server.metric("dmr_server_acks_total") >= 20.0
    });

    hook.failing.store(true, Ordering::SeqCst);
    let tried = hook.attempts.load(Ordering::SeqCst);
    ids.extend(send(20..30));
    wait_until(10 * SECOND, "B trying the new messages", || {
        hook.attempts.load(Ordering::SeqCst) >= tried + 10
    });
    b.proc.kill();

    ids.extend(send(30..50));
    hook.failing.store(false, Ordering::SeqCst);
    let servers = server.ws_url();
    let _b2 = AgentProc::start_with(&world, "b", &servers, b_addr, Some(hook.url()), &[]);

    wait_until(30 * SECOND, "all 50 delivered", || {
        id_counts(&hook).len() >= ids.len()
    });
    std::thread::sleep(2 * SECOND); // room for late duplicates
    let counts = id_counts(&hook);
    let missing: Vec<_> = ids.iter().filter(|id| !counts.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "accepted but never delivered: {missing:?}"
    );
    let accepted: BTreeSet<&String> = ids.iter().collect();
    let strangers: Vec<_> = counts.keys().filter(|id| !accepted.contains(id)).collect();
    assert!(
        strangers.is_empty(),
        "delivered but never sent: {strangers:?}"
    );
    let dups: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "restart test: {} accepted, {} delivered bodies, duplicates {dups:?}",
        ids.len(),
        hook.bodies().len()
    );
    assert!(dups.is_empty(), "delivered more than once: {dups:?}");
}

/// The non-deterministic twin of the test above: B is killed while deliveries succeed, so a
/// message may sit between the webhook's 2xx and the Ack (DESIGN §4.4). Every accepted id
/// must still arrive; repeats are allowed only from that window, and the window holds at
/// most the server's prefetch (unacked deliveries), so that bounds them. The count is
/// printed for the record.
#[test]
fn restarted_agent_loses_nothing_even_in_the_ack_window() {
    const PREFETCH: usize = 8;
    let world = World::new("restart2", &["a", "b"]);
    let server = Server::start(&world, "server", &["--prefetch", &PREFETCH.to_string()]);
    let hook = Webhook::start();
    let a = AgentProc::start(&world, "a", &[&server], None, &[]);
    let mut b = AgentProc::start(&world, "b", &[&server], Some(&hook), &[]);
    let b_addr = b.addr;

    let (ids, killed_after, _b2) = std::thread::scope(|s| {
        let sender = s.spawn(|| {
            (0..50)
                .map(|i| send_ok(&a, "b", json!({"n": i})))
                .collect::<Vec<_>>()
        });
        // Kill B once it is busy delivering, while A is still sending.
        wait_until(20 * SECOND, "B delivering", || hook.bodies().len() >= 15);
        b.proc.kill();
        let killed_after = hook.bodies().len();
        std::thread::sleep(Duration::from_millis(500));
        let servers = server.ws_url();
        let b2 = AgentProc::start_with(&world, "b", &servers, b_addr, Some(hook.url()), &[]);
        (sender.join().unwrap(), killed_after, b2)
    });

    wait_until(30 * SECOND, "all 50 delivered", || {
        id_counts(&hook).len() >= ids.len()
    });
    std::thread::sleep(2 * SECOND);
    let counts = id_counts(&hook);
    let missing: Vec<_> = ids.iter().filter(|id| !counts.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "accepted but never delivered: {missing:?}"
    );
    let dups: usize = counts.values().map(|n| n - 1).sum();
    eprintln!(
        "ack-window test: killed after {killed_after} deliveries; {} accepted, {} bodies, {dups} repeated",
        ids.len(),
        hook.bodies().len()
    );
    assert!(
        dups <= PREFETCH,
        "{dups} repeats: more than could be in the 2xx→Ack window ({PREFETCH})"
    );
}

// 6 ---------------------------------------------------------------------------------------

#[test]
fn impostor_agent_never_receives_anything() {
    let world = World::new("impostor", &["a", "b"]);
    let server = Server::start(&world, "server", &[]);
    let a = AgentProc::start(&world, "a", &[&server], None, &[]);

    // Right id, wrong key: its own key pair, its own webhook.
    let impostor_key = world.dir.path().join("impostor.key");
    write_private_key(
        &impostor_key,
        &dmr::crypto::SecretKey::generate().unwrap().to_pem(),
    );
    let impostor_hook = Webhook::start();
    let impostor_addr = loopback();
    let mut impostor = spawn_agent(
        &world,
        "impostor",
        "b",
        &impostor_key,
        &server.ws_url(),
        impostor_addr,
        Some(&impostor_hook),
    );
    wait_until(10 * SECOND, "the impostor's API", || {
        http_get(impostor_addr, "/healthz").is_some_and(|r| r.0 == 200)
    });

    // While the impostor is the only "b" around, messages for B arrive.
    let first: BTreeSet<String> = (0..3)
        .map(|i| send_ok(&a, "b", json!({"for": "b only", "i": i})))
        .collect();
    wait_until(10 * SECOND, "the refusal in the impostor's log", || {
        impostor
            .log_text()
            .contains("proof of key possession failed")
    });
    std::thread::sleep(2 * SECOND);
    assert!(
        impostor.is_running(),
        "the impostor keeps retrying, it does not exit"
    );
    assert_eq!(http_get(impostor_addr, "/readyz").map(|r| r.0), Some(503));
    assert!(impostor_hook.bodies().is_empty());
    assert_eq!(impostor_hook.attempts.load(Ordering::SeqCst), 0);
    // Nothing was consumed on the impostor's behalf.
    let queued: BTreeSet<String> = peek_queue(&world.queue("b"), 5, SECOND)
        .into_iter()
        .filter_map(|m| m.message_id)
        .collect();
    assert_eq!(queued, first, "the messages wait in B's queue");

    // The real B connects (the impostor keeps trying) and gets everything.
    let hook = Webhook::start();
    let b = AgentProc::start(&world, "b", &[&server], Some(&hook), &[]);
    let second = send_ok(&a, "b", json!({"for": "b only", "i": 3}));
    let mut all = first.clone();
    all.insert(second);
    wait_until(15 * SECOND, "the real B gets all four", || {
        id_counts(&hook).len() == 4
    });
    std::thread::sleep(2 * SECOND);
    let got: BTreeSet<String> = id_counts(&hook).into_keys().collect();
    assert_eq!(got, all);
    assert!(
        impostor_hook.bodies().is_empty(),
        "{:?}",
        impostor_hook.bodies()
    );
    assert_eq!(impostor_hook.attempts.load(Ordering::SeqCst), 0);
    assert_eq!(http_get(impostor_addr, "/readyz").map(|r| r.0), Some(503));
    assert_eq!(http_get(b.addr, "/readyz").map(|r| r.0), Some(200));
    let log = impostor.log_text();
    assert!(
        log.contains("server refused") && log.contains("proof of key possession failed"),
        "impostor log:\n{log}"
    );
    assert!(!log.contains("connected to"), "impostor log:\n{log}");
}

// 7 ---------------------------------------------------------------------------------------

#[test]
fn api_errors_have_the_right_status_and_name_the_field() {
    let world = World::new("apierr", &["a", "b"]);
    let server = Server::start(&world, "server", &["--max-message-bytes", "4096"]);
    let token = "s3cret-token";
    let a = AgentProc::start(&world, "a", &[&server], None, &["--api-token", token]);
    let bearer = format!("Bearer {token}");
    let auth: &[(&str, &str)] = &[("authorization", &bearer)];

    let post = |body: &str| a.post("/v1/messages", body, auth);
    let error_of = |v: &Value| v["error"].as_str().unwrap_or_default().to_owned();

    // 400, the error names what is wrong.
    for (body, field) in [
        ("{not json", "JSON"),
        (r#"[1, 2]"#, "object"),
        (r#"{"payload": {"q": 1}}"#, "recipientId"),
        (r#"{"recipientId": 7, "payload": 1}"#, "recipientId"),
        (r#"{"recipientId": "b c", "payload": 1}"#, "recipientId"),
        (r#"{"recipientId": "b"}"#, "payload"),
        (
            r#"{"recipientId": "b", "payload": 1, "id": "not-a-uuid"}"#,
            "id",
        ),
        (r#"{"recipientId": "b", "payload": 1, "id": 42}"#, "id"),
        (
            r#"{"recipientId": "b", "payload": 1, "timestamp": "yesterday"}"#,
            "timestamp",
        ),
        (r#"{"recipientId": "b", "payload": 1, "type": 7}"#, "type"),
    ] {
        let (status, v) = post(body);
        assert_eq!(status, 400, "{body} → {status} {v}");
        let e = error_of(&v);
        assert!(e.contains(field), "{body}: error {e:?} should name {field}");
    }

    // 404 unknown recipient.
    let (status, v) = post(r#"{"recipientId": "nobody", "payload": 1}"#);
    assert_eq!(status, 404, "{v}");
    assert!(error_of(&v).contains("nobody"), "{v}");

    // 413 over the server's --max-message-bytes (4096): ~8 KiB payload.
    let big = json!({"recipientId": "b", "payload": {"blob": "x".repeat(8 * 1024)}}).to_string();
    let (status, v) = post(&big);
    assert_eq!(status, 413, "{v}");
    // Just under the limit still goes through.
    let small = json!({"recipientId": "b", "payload": {"blob": "x".repeat(2 * 1024)}}).to_string();
    let (status, v) = post(&small);
    assert_eq!(status, 202, "{v}");

    // 401 without or with a wrong token, on every /v1/ endpoint.
    let good = r#"{"recipientId": "b", "payload": {"q": "token?"}}"#;
    for headers in [
        vec![],
        vec![("authorization", "Bearer wrong-token")],
        vec![("authorization", "Bearer s3cret-token-and-more")],
        vec![("authorization", "Bearer ")],
        vec![("authorization", "s3cret-token")],
        vec![("authorization", "Basic czNjcmV0LXRva2Vu")],
    ] {
        let (status, v) = a.post("/v1/messages", good, &headers);
        assert_eq!(status, 401, "{headers:?} → {v}");
        let r = http_call("GET", a.addr, "/v1/agents", None, &headers).unwrap();
        assert_eq!(r.0, 401, "GET /v1/agents with {headers:?}");
    }
    // Probes stay open without the token.
    assert_eq!(http_get(a.addr, "/healthz").map(|r| r.0), Some(200));
    assert_eq!(http_get(a.addr, "/readyz").map(|r| r.0), Some(200));
    // The right token: 202 with the id.
    let (status, v) = post(good);
    assert_eq!(status, 202, "{v}");
    assert!(
        uuid::Uuid::parse_str(v["id"].as_str().unwrap_or("")).is_ok(),
        "{v}"
    );
    let (status, _) = a.post("/v1/messages", good, &[("Authorization", &bearer)]);
    assert_eq!(status, 202);

    // An agent that has never reached a server has no directory, so it cannot seal (nor
    // queue) anything yet: 503 with Retry-After (tests/status.rs covers the outbox, for an
    // agent that lost its servers). Point it
    // at a port where nobody listens (so it never becomes ready; do not wait for that).
    let nowhere = format!("ws://127.0.0.1:{}/v1/ws", free_port());
    let addr = loopback();
    let mut lonely = spawn_agent(
        &world,
        "lonely",
        "a",
        &world.agent("a").key_path,
        &nowhere,
        addr,
        None,
    );
    wait_until(10 * SECOND, "the lonely agent's API", || {
        http_get(addr, "/healthz").is_some_and(|r| r.0 == 200)
    });
    assert_eq!(http_get(addr, "/readyz").map(|r| r.0), Some(503));
    let (status, headers, body) = raw_http(addr, "POST", "/v1/messages", good, &[]);
    assert_eq!(status, 503, "{body}");
    let retry = headers.get("retry-after").expect("Retry-After on 503");
    assert!(
        retry.parse::<u64>().is_ok_and(|s| s > 0),
        "Retry-After {retry:?}"
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(error_of(&v).contains("directory"), "{v}");
    let health: Value = serde_json::from_str(&http_get(addr, "/v1/health").unwrap().1).unwrap();
    assert_eq!(health["connected"], json!(false), "{health}");
    assert!(lonely.is_running());
    assert!(
        lonely.log_text().contains("cannot connect"),
        "{}",
        lonely.log_text()
    );
}

// 8 ---------------------------------------------------------------------------------------

#[test]
fn agents_health_and_metrics() {
    let world = World::new("obs", &["a", "b", "c.d_e-1"]);
    let server = Server::start(&world, "server", &[]);
    let hook = Webhook::start();
    let a = AgentProc::start(&world, "a", &[&server], None, &[]);
    let b = AgentProc::start(&world, "b", &[&server], Some(&hook), &[]);

    let (status, body) = http_get(a.addr, "/v1/agents").unwrap();
    assert_eq!(status, 200, "{body}");
    let mut list: Vec<Value> = serde_json::from_str(&body).unwrap();
    list.sort_by_key(|v| v["id"].as_str().unwrap_or_default().to_owned());
    assert_eq!(
        list,
        vec![
            json!({"id": "a", "name": "Agency a"}),
            json!({"id": "b", "name": "Agency b"}),
            json!({"id": "c.d_e-1", "name": "Agency c.d_e-1"}),
        ]
    );

    let (status, body) = http_get(b.addr, "/v1/health").unwrap();
    assert_eq!(status, 200);
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], json!("ok"), "{health}");
    assert_eq!(health["id"], json!("b"), "{health}");
    assert_eq!(health["connected"], json!(true), "{health}");
    assert_eq!(health["agents"], json!(3), "{health}");

    let text = http_get(b.addr, "/metrics").unwrap().1;
    for name in [
        "dmr_agent_connected",
        "dmr_agent_sent_total",
        "dmr_agent_accepted_total",
        "dmr_agent_delivered_total",
        "dmr_agent_duplicates_total",
        "dmr_agent_webhook_failures_total",
        "dmr_agent_decrypt_failures_total",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing from /metrics:\n{text}"
        );
    }
    assert_eq!(b.metric("dmr_agent_connected"), 1.0);
    let delivered_before = b.metric("dmr_agent_delivered_total");
    assert_eq!(delivered_before, 0.0);

    let id = send_ok(&a, "b", json!({"q": "count me"}));
    wait_until(15 * SECOND, "delivery", || delivered_count(&hook, &id) == 1);
    wait_until(5 * SECOND, "the delivered counter", || {
        b.metric("dmr_agent_delivered_total") == delivered_before + 1.0
    });
    assert_eq!(a.metric("dmr_agent_sent_total"), 1.0);
    assert_eq!(a.metric("dmr_agent_accepted_total"), 1.0);
    assert_eq!(b.metric("dmr_agent_webhook_failures_total"), 0.0);
    assert_eq!(b.metric("dmr_agent_duplicates_total"), 0.0);
}

// 9 ---------------------------------------------------------------------------------------

/// The API says a retry "with the same id is safe" (after a 504, say): a repeated id is
/// answered 200 with the message's status and never sent twice.
#[test]
fn resending_the_same_id_reaches_the_webhook_once() {
    let world = World::new("sameid", &["a", "b"]);
    let server = Server::start(&world, "server", &[]);
    let a = AgentProc::start(&world, "a", &[&server], None, &[]);
    let id = uuid::Uuid::new_v4().to_string();
    for attempt in 0..3 {
        let body = json!({"id": id, "recipientId": "b", "payload": {"attempt": attempt}});
        let (status, v) = a.post("/v1/messages", &body.to_string(), &[]);
        assert_eq!(
            status,
            if attempt == 0 { 202 } else { 200 },
            "attempt {attempt}: {v}"
        );
        assert_eq!(v["id"], json!(id));
        assert_eq!(v["status"], json!("sent"), "attempt {attempt}: {v}");
    }
    // B is not running yet: one envelope waits in its queue.
    let stored = peek_queue(&world.queue("b"), 4, SECOND);
    assert_eq!(stored.len(), 1, "one envelope in B's queue");
    assert_eq!(stored[0].message_id.as_deref(), Some(id.as_str()));

    let hook = Webhook::start();
    let mut b = AgentProc::start(&world, "b", &[&server], Some(&hook), &[]);
    wait_until(15 * SECOND, "the message delivered", || {
        b.metric("dmr_agent_delivered_total") >= 1.0
    });
    std::thread::sleep(SECOND);
    let bodies = hook.bodies();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    assert_eq!(bodies[0]["id"], json!(id));
    assert_eq!(bodies[0]["payload"]["attempt"], json!(0), "{bodies:?}");
    b.proc.stop();
    assert!(peek_queue(&world.queue("b"), 4, SECOND).is_empty());
    assert!(peek_queue(&world.dlq(), 4, Duration::from_millis(300)).is_empty());
}

// 10 --------------------------------------------------------------------------------------

/// `--deliver-url` is optional; its help says "without it, incoming messages wait in the
/// queue". They must not be burnt through the delivery limit into the dead-letter queue.
#[test]
fn agent_without_deliver_url_leaves_messages_waiting() {
    let world = World::new("nohook", &["a", "b"]);
    let server = Server::start(&world, "server", &[]);
    let a = AgentProc::start(&world, "a", &[&server], None, &[]);
    let mut b = AgentProc::start(&world, "b", &[&server], None, &[]);
    let ids: BTreeSet<String> = (0..3).map(|i| send_ok(&a, "b", json!({"i": i}))).collect();
    std::thread::sleep(3 * SECOND);
    let dead = peek_queue(&world.dlq(), 4, Duration::from_millis(300));
    assert!(
        dead.is_empty(),
        "{} messages dead-lettered although B only lacks a --deliver-url",
        dead.len()
    );
    b.proc.stop();
    let waiting: BTreeSet<String> = peek_queue(&world.queue("b"), 4, SECOND)
        .into_iter()
        .filter_map(|m| m.message_id)
        .collect();
    assert_eq!(waiting, ids, "the messages wait in B's queue");
    // Once B has a webhook, they are delivered.
    let hook = Webhook::start();
    let _b = AgentProc::start(&world, "b", &[&server], Some(&hook), &[]);
    wait_until(
        15 * SECOND,
        "delivery after the webhook is configured",
        || id_counts(&hook).len() == 3,
    );
    let got: BTreeSet<String> = id_counts(&hook).into_keys().collect();
    assert_eq!(got, ids);
}

// 11 --------------------------------------------------------------------------------------

/// RFC 3339 for `age` before now (negative: in the future).
fn timestamp_aged(age: time::Duration) -> String {
    (time::OffsetDateTime::now_utc() - age)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// Freshness is checked where the sender can still be told: a `timestamp` outside the
/// agent's window (`--message-ttl` back, the clock skew ahead) is refused with 400 naming
/// the field and the window, instead of being sealed and dead-lettered on arrival.
#[test]
fn timestamps_outside_the_freshness_window_are_refused_at_the_api() {
    let world = World::new("fresh", &["a", "b", "c"]);
    let server = Server::start(&world, "server", &[]);
    let a = AgentProc::start(&world, "a", &[&server], None, &[]);
    let c = AgentProc::start(&world, "c", &[&server], None, &["--message-ttl", "60"]);
    let send_at = |agent: &AgentProc, timestamp: &str| {
        let body =
            json!({"recipientId": "b", "timestamp": timestamp, "payload": {"at": timestamp}});
        agent.post("/v1/messages", &body.to_string(), &[])
    };
    let assert_refused = |agent: &AgentProc, timestamp: &str, what: &str| {
        let (status, v) = send_at(agent, timestamp);
        assert_eq!(status, 400, "{what} ({timestamp}) → {status} {v}");
        let e = v["error"].as_str().unwrap_or_default();
        assert!(
            e.contains("timestamp") && e.contains("window"),
            "{what}: the error should name the field and the window: {e:?}"
        );
        e.to_owned()
    };

    // Default window (--message-ttl 86400): years off either way are refused.
    assert_refused(&a, "2020-01-01T00:00:00Z", "2020");
    let ahead = assert_refused(&a, "2030-01-01T00:00:00Z", "2030");
    assert!(ahead.contains("future"), "{ahead}");
    // A minute old is fine, and is what the recipient will see.
    let minute = timestamp_aged(time::Duration::minutes(1));
    let (status, v) = send_at(&a, &minute);
    assert_eq!(status, 202, "a minute-old timestamp: {v}");

    // --message-ttl 60 (plus the clock skew): ten minutes old is too old.
    let old = timestamp_aged(time::Duration::minutes(10));
    let e = assert_refused(&c, &old, "10 minutes old under --message-ttl 60");
    assert!(e.contains("--message-ttl"), "{e}");
    let (status, v) = send_at(&c, &minute);
    assert_eq!(
        status, 202,
        "a minute-old timestamp under --message-ttl 60: {v}"
    );

    // Only the two minute-old messages were sent.
    assert_eq!(a.metric("dmr_agent_accepted_total"), 1.0);
    assert_eq!(c.metric("dmr_agent_accepted_total"), 1.0);
}
