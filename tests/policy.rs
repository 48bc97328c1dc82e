//! The relay's policy, audit log and JSON logs (issue 13), end to end: the real
//! `dmr-server` and `dmr-agent` binaries on the real RabbitMQ at 127.0.0.1:5672.
//!
//! Each test writes its own policy file into its `World`'s directory and has its own queue
//! prefix and ports, so the tests run in parallel.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use dmr::protocol::{ClientFrame, RejectCode};
use serde_json::{json, Value};
use support::{
    envelope, expect_accepted, expect_rejected, peek_queue, wait_until, AgentProc, Server,
    TestClient, World, SERVER_BIN,
};

const SECOND: Duration = Duration::from_secs(1);

/// Writes `policy` to `path` atomically (a reader never sees half a file).
fn write_policy(path: &Path, policy: &Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(policy).unwrap()).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

fn policy_path(world: &World) -> String {
    world.dir.path().join("policy.json").display().to_string()
}

/// POSTs a message of `type` to the agent; returns status, `Retry-After` and body.
fn post(agent: &AgentProc, to: &str, kind: &str, payload: Value) -> (u16, Option<u64>, String) {
    let body = json!({"recipientId": to, "type": kind, "payload": payload}).to_string();
    raw_post(agent.addr, "/v1/messages", &body)
}

/// A plain HTTP/1.1 POST over a fresh connection, to read a response header.
fn raw_post(addr: SocketAddr, path: &str, body: &str) -> (u16, Option<u64>, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
    let retry_after = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
        .and_then(|(_, v)| v.trim().parse().ok());
    (status, retry_after, body.to_owned())
}

fn refusals(server: &Server, sender: &str, reason: &str) -> f64 {
    server.metric(&format!(
        "dmr_policy_refusals_total{{sender=\"{sender}\",reason=\"{reason}\"}}"
    ))
}

#[test]
fn a_denied_pair_gets_403_naming_the_rule_and_nothing_is_queued() {
    let world = World::new("policy-deny", &["a", "b", "c"]);
    let path = policy_path(&world);
    write_policy(
        Path::new(&path),
        &json!({
            "groups": {"police": ["a", "c"]},
            "rules": [
                {"name": "no-police-questions-to-b", "action": "deny", "from": ["@police"], "to": ["b"], "types": ["Question"]},
                {"name": "police-out", "from": ["@police"], "to": ["*"]}
            ]
        }),
    );
    let server = Server::start(&world, "server", &["--policy-file", &path]);
    let a = AgentProc::start(&world, "a", &[&server], None, &[]);
    let mut b = AgentProc::start(&world, "b", &[&server], None, &[]);

    let (status, _, body) = post(&a, "b", "ChatMessage", json!("allowed"));
    assert_eq!(status, 202, "{body}");
    let allowed: Value = serde_json::from_str(&body).unwrap();
    let (status, _, body) = post(&a, "b", "Question", json!("denied by a rule"));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("no-police-questions-to-b"), "{body}");
    let (status, _, body) = post(&b, "a", "ChatMessage", json!("denied by default"));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("no policy rule allows b → a"), "{body}");

    // b has no webhook, so what was accepted stays in its queue: only the allowed message.
    // (Stopped, so its session's unacked deliveries go back and the queue can be read.)
    b.proc.stop();
    let queued = peek_queue(&world.queue("b"), 10, 2 * SECOND);
    let ids: Vec<_> = queued.iter().filter_map(|m| m.message_id.clone()).collect();
    assert_eq!(ids, [allowed["id"].as_str().unwrap()]);
    assert!(peek_queue(&world.queue("a"), 10, SECOND).is_empty());
    assert_eq!(refusals(&server, "a", "forbidden"), 1.0);
    assert_eq!(refusals(&server, "b", "forbidden"), 1.0);
    assert_eq!(
        a.metric("dmr_agent_rejected_total{code=\"forbidden\"}"),
        1.0
    );
}

#[test]
fn size_and_rate_limits_give_413_and_429_with_retry_after() {
    let world = World::new("policy-limits", &["a", "b"]);
    let path = policy_path(&world);
    write_policy(
        Path::new(&path),
        &json!({
            "default": "allow",
            "limits": [{"from": ["a"], "messagesPerSecond": 0.5, "burst": 1, "maxBytes": 2000}]
        }),
    );
    let server = Server::start(&world, "server", &["--policy-file", &path]);
    let a = AgentProc::start(&world, "a", &[&server], None, &[]);

    let (status, _, body) = post(&a, "b", "ChatMessage", json!("x".repeat(3000)));
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("policy's 2000"), "{body}");
    // The refused message cost no token: the burst of one is still there.
    let (status, _, body) = post(&a, "b", "ChatMessage", json!("first"));
    assert_eq!(status, 202, "{body}");
    let (status, retry_after, body) = post(&a, "b", "ChatMessage", json!("too soon"));
    assert_eq!(status, 429, "{body}");
    let wait = retry_after.expect("429 carries Retry-After");
    assert!((1..=2).contains(&wait), "Retry-After {wait}");
    std::thread::sleep(Duration::from_secs(wait));
    let (status, _, body) = post(&a, "b", "ChatMessage", json!("after waiting"));
    assert_eq!(status, 202, "after Retry-After: {body}");
    assert_eq!(refusals(&server, "a", "too_large"), 1.0);
    assert_eq!(refusals(&server, "a", "rate_limited"), 1.0);
}

#[test]
fn the_policy_reloads_on_change_and_on_sighup_and_a_bad_file_keeps_the_last_good() {
    let world = World::new("policy-reload", &["a", "b"]);
    let path = policy_path(&world);
    let only = |from: &str, to: &str| json!({"rules": [{"name": format!("only-{from}-to-{to}"), "from": [from], "to": [to]}]});
    write_policy(Path::new(&path), &only("a", "b"));
    let mut server = Server::start(&world, "server", &["--policy-file", &path]);
    let a = AgentProc::start(&world, "a", &[&server], None, &[]);
    let b = AgentProc::start(&world, "b", &[&server], None, &[]);
    let status = |from: &AgentProc, to: &str| post(from, to, "ChatMessage", json!("hi")).0;
    assert_eq!(status(&a, "b"), 202);
    assert_eq!(status(&b, "a"), 403);

    // A changed file is picked up without a restart.
    write_policy(Path::new(&path), &only("b", "a"));
    wait_until(20 * SECOND, "b → a allowed after the change", || {
        status(&b, "a") == 202
    });
    assert_eq!(status(&a, "b"), 403);

    // A broken file is refused, named in the log, and the last good policy stays.
    std::fs::write(&path, "{\"rules\": [{\"from\": [\"a\"]}]}").unwrap();
    wait_until(20 * SECOND, "the bad file reported", || {
        server.proc.log_text().contains("missing field `to`")
    });
    let log = server.proc.log_text();
    assert!(log.contains(&format!("--policy-file {path}")), "{log}");
    assert!(log.contains("keeping the last good policy"), "{log}");
    assert_eq!(status(&b, "a"), 202);
    assert_eq!(status(&a, "b"), 403);

    // SIGHUP re-reads even a file whose size and time look unchanged.
    write_policy(Path::new(&path), &only("b", "a"));
    wait_until(20 * SECOND, "the good file back", || {
        server.metric("dmr_policy_reloads_total{result=\"ok\"}") >= 2.0
    });
    let stamp = std::fs::metadata(&path).unwrap().modified().unwrap();
    // Same length, and the old time set before the rename, so no poll sees a change.
    let tmp = world.dir.path().join("policy.next");
    std::fs::write(&tmp, serde_json::to_string_pretty(&only("a", "b")).unwrap()).unwrap();
    let f = std::fs::File::options().write(true).open(&tmp).unwrap();
    f.set_modified(stamp).unwrap();
    drop(f);
    std::fs::rename(&tmp, &path).unwrap();
    std::thread::sleep(3 * SECOND); // several polls: the watcher must not see a change
    assert_eq!(status(&a, "b"), 403, "unchanged stamp: not re-read yet");
    server.proc.signal("HUP");
    wait_until(20 * SECOND, "a → b allowed after SIGHUP", || {
        status(&a, "b") == 202
    });
    assert_eq!(status(&b, "a"), 403);
    assert!(server.proc.is_running());
}

#[test]
fn a_bad_policy_file_stops_the_start_with_a_clear_error() {
    let world = World::new("policy-bad-start", &["a"]);
    let path = policy_path(&world);
    std::fs::write(&path, r#"{"rules": [{"from": ["a"], "to": ["@nobody"]}]}"#).unwrap();
    let args = support::server_args(
        &world,
        "127.0.0.1:1".parse().unwrap(),
        &["--policy-file", &path],
    );
    let out = Command::new(SERVER_BIN).args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("--policy-file {path}")),
        "{stderr}"
    );
    assert!(stderr.contains("unknown group \"@nobody\""), "{stderr}");
}

/// Every audit line of `path`, parsed.
fn audit_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn the_audit_log_records_each_decision_with_metadata_only() {
    let world = World::new("policy-audit", &["a", "b"]);
    let path = policy_path(&world);
    write_policy(
        Path::new(&path),
        &json!({"default": "allow", "rules": [{"name": "b-quiet", "action": "deny", "from": ["b"], "to": ["a"]}]}),
    );
    let audit = world.dir.path().join("audit.jsonl");
    let audit_arg = audit.display().to_string();
    let server = Server::start(
        &world,
        "server",
        &[
            "--policy-file",
            &path,
            "--audit-log",
            &audit_arg,
            "--instance",
            "relay-7",
        ],
    );
    let (ia, ib) = (world.agent("a"), world.agent("b"));
    let marker = "PLAINTEXT-MARKER-4f1d";
    let sealed = envelope(ia, ib, json!({"secret": marker}).to_string().as_bytes());
    let refused = envelope(ib, ia, b"never relayed");
    let ciphertext = sealed.ciphertext().to_vec();
    let id = sealed.header().id;
    smol::block_on(async {
        let mut a = TestClient::connect(&server.ws_url(), &ia.id, &ia.key)
            .await
            .unwrap();
        let mut b = TestClient::connect(&server.ws_url(), &ib.id, &ib.key)
            .await
            .unwrap();
        // B's refusal first: reading its answer must not skip a delivery meant for B.
        let refused_id = refused.header().id;
        b.send(ClientFrame::Send { envelope: refused }).await;
        let reason = expect_rejected(&b.answer_for(refused_id).await, RejectCode::Forbidden);
        assert!(reason.contains("b-quiet"), "{reason}");
        a.send(ClientFrame::Send { envelope: sealed }).await;
        expect_accepted(&a.answer_for(id).await);
        let (d1, _) = b.next_delivery(20 * SECOND).await.expect("a delivery");
        b.send(ClientFrame::Nack {
            delivery: d1,
            reason: "refused by the local service: 400".into(),
        })
        .await;
        // A Nack dead-letters; a second message is acked.
        let second = envelope(ia, ib, b"second");
        let second_id = second.header().id;
        a.send(ClientFrame::Send { envelope: second }).await;
        expect_accepted(&a.answer_for(second_id).await);
        let (d2, _) = b
            .next_delivery(20 * SECOND)
            .await
            .expect("a second delivery");
        b.send(ClientFrame::Ack { delivery: d2 }).await;
        wait_until(20 * SECOND, "the acked line", || {
            audit_lines(&audit).iter().any(|l| l["event"] == "acked")
        });
    });

    let lines = audit_lines(&audit);
    let events: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    for want in [
        "accepted",
        "refused",
        "delivered",
        "nacked",
        "dead_lettered",
        "acked",
    ] {
        assert!(events.contains(&want), "no {want} in {events:?}");
    }
    assert_eq!(events.iter().filter(|e| **e == "delivered").count(), 2);
    for l in &lines {
        for key in [
            "time",
            "event",
            "id",
            "sender",
            "recipient",
            "type",
            "bytes",
            "instance",
        ] {
            assert!(l.get(key).is_some(), "{key} missing in {l}");
        }
        assert_eq!(l["instance"], "relay-7");
        assert_eq!(l["type"], "ChatMessage");
        let time = l["time"].as_str().unwrap();
        assert!(time.ends_with('Z') && time.contains('T'), "{time}");
    }
    let line = |event: &str| lines.iter().find(|l| l["event"] == event).unwrap();
    assert_eq!(line("accepted")["id"], id.to_string());
    assert_eq!(line("accepted")["sender"], "a");
    assert_eq!(line("accepted")["recipient"], "b");
    assert!(line("accepted")["bytes"].as_u64().unwrap() > ciphertext.len() as u64);
    assert!(line("accepted").get("reason").is_none());
    assert_eq!(line("refused")["sender"], "b");
    assert!(line("refused")["reason"]
        .as_str()
        .unwrap()
        .starts_with("forbidden: "));
    assert_eq!(
        line("nacked")["reason"],
        "refused by the local service: 400"
    );
    assert_eq!(line("dead_lettered")["id"], id.to_string());
    assert_eq!(
        line("dead_lettered")["reason"],
        "refused by the local service: 400"
    );

    // Metadata only: neither the plaintext nor the ciphertext in any common encoding.
    let text = std::fs::read_to_string(&audit).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&ciphertext);
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&ciphertext);
    let hex: String = ciphertext.iter().map(|b| format!("{b:02x}")).collect();
    assert!(!text.contains(marker));
    for encoded in [&b64, &b64url, &hex] {
        // A 24-character slice from the middle is enough to find any copy of it.
        let probe = &encoded[encoded.len() / 2..encoded.len() / 2 + 24];
        assert!(!text.contains(probe), "ciphertext found in the audit log");
    }
    assert_eq!(server.metric("dmr_audit_dropped_total"), 0.0);
}

#[test]
fn log_format_json_writes_one_object_per_line_on_both_binaries() {
    let world = World::new("policy-logjson", &["a"]);
    let server = Server::start(&world, "server", &["--log-format", "json"]);
    let agent = AgentProc::start(&world, "a", &[&server], None, &["--log-format", "json"]);
    for log in [server.proc.log_text(), agent.proc.log_text()] {
        let lines: Vec<&str> = log.lines().filter(|l| !l.is_empty()).collect();
        assert!(!lines.is_empty());
        for l in lines {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            for key in ["time", "level", "target", "message"] {
                assert!(v[key].is_string(), "{key} missing in {l}");
            }
        }
    }
    let text = agent.proc.log_text();
    assert!(text.contains("\"level\":\"INFO\""), "{text}");
}
