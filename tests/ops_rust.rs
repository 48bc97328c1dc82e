//! Operator commands against the real RabbitMQ and binaries: `dmr-server dlq …`,
//! `rabbitmq setup` (policies that change live queues), `--version`, `health`,
//! `--metrics-listen`, and an agent's `--previous-key` during a key rotation.

mod support;

use std::process::Command;
use std::time::Duration;

use dmr::broker::{Broker, Topology};
use dmr::protocol::{AgentId, Header, Kind, MessageId};
use dmr::rabbitmq_admin::Admin;
use serde_json::Value;
use support::*;

fn dmr_server(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(SERVER_BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn admin() -> Admin {
    Admin::new(MANAGEMENT_URL).unwrap()
}

/// A broker under `prefix`, connected.
fn broker(prefix: &str) -> Broker {
    let topology = Topology {
        prefix: prefix.to_owned(),
        ..Topology::default()
    };
    let b = Broker::start_named(vec![AMQP_URL.into()], topology, "dmr-tests-ops").unwrap();
    smol::block_on(dmr::wait::with_timeout(
        Duration::from_secs(10),
        b.connected(),
    ))
    .expect("RabbitMQ must be running on 127.0.0.1:5672");
    b
}

fn header(sender: &str, recipient: &str) -> Header {
    Header {
        id: MessageId::random(),
        sender: AgentId::new(sender).unwrap(),
        recipient: AgentId::new(recipient).unwrap(),
        created_at_ms: 1_700_000_000_000,
        kind: Kind::chat_message(),
        seq: 0,
    }
}

#[test]
fn rabbitmq_setup_applies_policies_that_change_live_queues() {
    let world = World::new("setup", &["bob"]);
    let prefix = world.prefix.as_str();
    rabbitmq_setup(prefix, &["--delivery-limit", "3", "--message-ttl", "600"]);
    let admin = admin();
    let policy = smol::block_on(admin.policy("/", &format!("{prefix}dmr-agents")))
        .unwrap()
        .expect("agent policy");
    assert_eq!(policy["apply-to"], "queues");
    assert_eq!(policy["definition"]["delivery-limit"], 3);
    assert_eq!(policy["definition"]["message-ttl"], 600_000);
    assert_eq!(
        policy["definition"]["dead-letter-exchange"],
        format!("{prefix}dmr.dlx")
    );
    assert_eq!(policy["definition"]["overflow"], "reject-publish");
    assert_eq!(
        policy["definition"]["dead-letter-strategy"],
        "at-least-once"
    );
    let dlq = smol::block_on(admin.policy("/", &format!("{prefix}dmr-dlq")))
        .unwrap()
        .expect("dlq policy");
    assert_eq!(dlq["definition"]["message-ttl"], 14 * 24 * 3600 * 1000u64);

    // A queue declared by the relay takes the policy, and a new setup changes it live.
    let b = broker(prefix);
    smol::block_on(b.declare_agents(&[AgentId::new("bob").unwrap()])).unwrap();
    let queue = world.queue("bob");
    let effective = |admin: &Admin| {
        smol::block_on(admin.queue("/", &queue))
            .unwrap()
            .map(|q| q["effective_policy_definition"]["delivery-limit"].clone())
    };
    wait_until(
        Duration::from_secs(10),
        "delivery-limit 3 on the queue",
        || effective(&admin) == Some(Value::from(3)),
    );
    rabbitmq_setup(prefix, &["--delivery-limit", "5"]);
    wait_until(
        Duration::from_secs(10),
        "delivery-limit 5 on the queue",
        || effective(&admin) == Some(Value::from(5)),
    );
    smol::block_on(b.close());
}

#[test]
fn rabbitmq_setup_refuses_nonsense_and_explains_a_wrong_password() {
    let (ok, _, err) = dmr_server(&["rabbitmq", "setup", "--delivery-limit", "0"]);
    assert!(!ok && err.contains("--delivery-limit"), "{err}");
    let (ok, _, err) = dmr_server(&[
        "rabbitmq",
        "setup",
        "--management-url",
        "http://guest:wrong-secret@127.0.0.1:15672",
        "--queue-prefix",
        "t-never.",
    ]);
    assert!(!ok, "{err}");
    assert!(err.contains("401"), "{err}");
    assert!(
        !err.contains("wrong-secret"),
        "the password was shown: {err}"
    );
}

/// Dead-letters a published message the way the relay does (`Broker::dead_letter`).
fn dead_letter(b: &Broker, sender: &str, recipient: &str, body: &[u8], reason: &str) -> String {
    let h = header(sender, recipient);
    let id = h.id.0.to_string();
    smol::block_on(async {
        b.publish(&h, body.to_vec()).await.unwrap();
        let consumer = b.consume(&h.recipient, 10).await.unwrap();
        let d = consumer.next().await.unwrap();
        b.dead_letter(&d, reason).await.unwrap();
        consumer.ack(d.tag).await.unwrap();
        consumer.close().await;
    });
    id
}

fn dlq_list(prefix: &str) -> Vec<Value> {
    let (ok, out, err) = dmr_server(&["dlq", "list", "--json", "--queue-prefix", prefix]);
    assert!(ok, "dlq list: {err}");
    serde_json::from_str::<Value>(&out)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn dlq_list_show_replay_and_purge() {
    let world = World::new("dlq", &["alice", "bob", "carol"]);
    let prefix = world.prefix.as_str();
    // Delivery limit 1: a message nacked twice is dead-lettered by RabbitMQ itself.
    rabbitmq_setup(prefix, &["--delivery-limit", "1"]);
    let b = broker(prefix);
    let ids: Vec<AgentId> = ["alice", "bob", "carol"]
        .iter()
        .map(|a| AgentId::new(*a).unwrap())
        .collect();
    smol::block_on(b.declare_agents(&ids)).unwrap();

    let secret = b"SEALED-CONTENT-NEVER-SHOWN";
    let to_bob_1 = dead_letter(&b, "alice", "bob", secret, "unopenable: wrong key");
    let to_bob_2 = dead_letter(&b, "alice", "bob", b"xx", "stale: too old");
    // carol nacks until RabbitMQ gives up on the message.
    let h = header("alice", "carol");
    let to_carol = h.id.0.to_string();
    smol::block_on(async {
        b.publish(&h, vec![7; 10]).await.unwrap();
        let consumer = b.consume(&ids[2], 10).await.unwrap();
        while let Some(Some(d)) =
            dmr::wait::with_timeout(Duration::from_secs(2), consumer.next()).await
        {
            consumer.nack(d.tag).await.unwrap();
        }
        consumer.close().await;
    });

    let listed = dlq_list(prefix);
    assert_eq!(listed.len(), 3, "{listed:?}");
    let entry = |id: &str| listed.iter().find(|m| m["id"] == id).unwrap().clone();
    let first = entry(&to_bob_1);
    for key in [
        "id",
        "sender",
        "recipient",
        "type",
        "bytes",
        "reason",
        "deaths",
        "firstDeathAt",
    ] {
        assert!(first.get(key).is_some(), "{key} missing: {first}");
    }
    assert_eq!(first["sender"], "alice");
    assert_eq!(first["recipient"], "bob");
    assert_eq!(first["type"], "ChatMessage");
    assert_eq!(first["bytes"], secret.len());
    assert_eq!(first["reason"], "unopenable: wrong key");
    assert_eq!(first["deaths"], 1);
    assert!(first["firstDeathAt"].as_str().unwrap().ends_with('Z'));
    let carol = entry(&to_carol);
    assert_eq!(carol["reason"], "delivery_limit", "{carol}");
    assert!(carol["deaths"].as_u64().unwrap() >= 1, "{carol}");
    assert!(carol["firstDeathAt"].is_string(), "{carol}");
    // Reading put everything back.
    assert_eq!(smol::block_on(b.dlq_depth()).unwrap(), 3);

    // The table and show: metadata, never the content.
    let (ok, table, err) = dmr_server(&["dlq", "list", "--queue-prefix", prefix]);
    assert!(ok, "{err}");
    assert!(
        table.contains(&to_carol) && table.contains("3 messages"),
        "{table}"
    );
    let (ok, shown, err) = dmr_server(&["dlq", "show", &to_bob_1, "--queue-prefix", prefix]);
    assert!(ok, "{err}");
    assert!(shown.contains("unopenable: wrong key"), "{shown}");
    assert!(
        shown.contains(&format!("{} (sealed", secret.len())),
        "{shown}"
    );
    assert!(!shown.contains("SEALED-CONTENT"), "content shown: {shown}");
    let (ok, _, err) = dmr_server(&["dlq", "show", "no-such-id", "--queue-prefix", prefix]);
    assert!(!ok && err.contains("no message no-such-id"), "{err}");

    // Replay: a dry run changes nothing; then bob's two go back to bob's queue.
    let (ok, out, err) = dmr_server(&[
        "dlq",
        "replay",
        "--recipient",
        "bob",
        "--dry-run",
        "--queue-prefix",
        prefix,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("would replay 2 of 2"), "{out}");
    assert_eq!(smol::block_on(b.dlq_depth()).unwrap(), 3);
    let (ok, _, err) = dmr_server(&["dlq", "replay", "--queue-prefix", prefix]);
    assert!(
        !ok && err.contains("--all"),
        "replay without a selection: {err}"
    );
    let (ok, out, err) = dmr_server(&[
        "dlq",
        "replay",
        "--recipient",
        "bob",
        "--queue-prefix",
        prefix,
    ]);
    assert!(ok, "{out}{err}");
    assert_eq!(smol::block_on(b.dlq_depth()).unwrap(), 1);
    assert_eq!(smol::block_on(b.queue_depth(&ids[1])).unwrap(), 2);
    let back = peek_queue(&world.queue("bob"), 2, Duration::from_secs(3));
    let back_ids: Vec<_> = back.iter().filter_map(|m| m.message_id.clone()).collect();
    assert!(back_ids.contains(&to_bob_1) && back_ids.contains(&to_bob_2));
    for m in &back {
        assert!(!m.headers.contains("x-dmr-reason"), "{}", m.headers);
        assert!(m.headers.contains("dmr-sender"), "{}", m.headers);
    }
    assert!(back.iter().any(|m| m.body == secret));
    let remaining = dlq_list(prefix);
    assert_eq!(remaining.len(), 1);
    assert_eq!(remaining[0]["id"], to_carol.as_str());

    // Purge: refused without --yes.
    let (ok, _, err) = dmr_server(&["dlq", "purge", "--queue-prefix", prefix]);
    assert!(!ok && err.contains("--yes"), "{err}");
    assert_eq!(smol::block_on(b.dlq_depth()).unwrap(), 1);
    let (ok, out, err) = dmr_server(&["dlq", "purge", "--yes", "--queue-prefix", prefix]);
    assert!(ok, "{err}");
    assert!(out.contains("purged 1"), "{out}");
    assert_eq!(smol::block_on(b.dlq_depth()).unwrap(), 0);
    smol::block_on(b.close());
}

#[test]
fn both_binaries_tell_their_version() {
    for (bin, name) in [(SERVER_BIN, "dmr-server"), (AGENT_BIN, "dmr-agent")] {
        let out = Command::new(bin).arg("--version").output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with(&format!("{name} {}", env!("CARGO_PKG_VERSION"))),
            "{text}"
        );
    }
}

#[test]
fn health_metrics_listen_and_build_info() {
    let world = World::new("health", &["alice"]);
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let m = metrics.to_string();
    let server = Server::start(&world, "server", &["--metrics-listen", &m]);

    let (status, _) = http_get(server.addr, "/metrics").unwrap();
    assert_eq!(
        status, 404,
        "/metrics stays off --listen with --metrics-listen"
    );
    let (status, text) = http_get(metrics, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(text.contains("dmr_build_info{"), "{text}");
    assert!(text.contains("dmr_server_dlq_messages"), "{text}");
    assert!(text.contains("dmr_server_sessions"), "{text}");

    let listen = server.addr.to_string();
    let (ok, out, err) = dmr_server(&["health", "--listen", &listen]);
    assert!(ok, "{out}{err}");
    // DMR_LISTEN with a wildcard address is asked on loopback, as in the container.
    let out = Command::new(SERVER_BIN)
        .arg("health")
        .env("DMR_LISTEN", format!("0.0.0.0:{}", server.addr.port()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let nobody = format!("127.0.0.1:{}", free_port());
    let (ok, _, err) = dmr_server(&["health", "--listen", &nobody]);
    assert!(!ok && err.contains("unhealthy"), "{err}");

    // The agent's metrics listener too.
    let agent_metrics = format!("127.0.0.1:{}", free_port());
    let agent = AgentProc::start(
        &world,
        "alice",
        &[&server],
        None,
        &["--metrics-listen", &agent_metrics],
    );
    assert_eq!(http_get(agent.addr, "/metrics").unwrap().0, 404);
    let (status, text) = http_get(agent_metrics.parse().unwrap(), "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(text.contains("dmr_agent_connected 1"), "{text}");
    assert!(text.contains("dmr_build_info{"), "{text}");
}

#[test]
fn previous_key_opens_messages_sealed_before_a_rotation() {
    let world = World::new("rotate", &["alice", "bob"]);
    let server = Server::start(&world, "server", &[]);
    let hook = Webhook::start();
    // Bob rotates: the old key moves to bob.key.old, the directory lists the new one.
    let bob = world.agent("bob");
    let old_path = world.dir.path().join("bob.key.old");
    std::fs::copy(&bob.key_path, &old_path).unwrap();
    let new_key = dmr::crypto::SecretKey::generate().unwrap();
    std::fs::write(&bob.key_path, new_key.to_pem()).unwrap();
    world.write_directory(&[
        ("alice".into(), world.agent("alice").key.public_key()),
        ("bob".into(), new_key.public_key()),
    ]);
    let old = old_path.display().to_string();
    let _bob = AgentProc::start(
        &world,
        "bob",
        &[&server],
        Some(&hook),
        &["--previous-key", &old],
    );

    // Alice sealed this one to Bob's old key, before she learnt the new one.
    let sealed = envelope(world.agent("alice"), bob, br#"{"before":"rotation"}"#);
    smol::block_on(async {
        let alice = world.agent("alice");
        let mut c = TestClient::connect(&server.ws_url(), &alice.id, &alice.key)
            .await
            .unwrap();
        let id = sealed.header().id;
        c.send(dmr::protocol::ClientFrame::Send { envelope: sealed })
            .await;
        expect_accepted(&c.answer_for(id).await);
    });
    wait_until(Duration::from_secs(15), "delivery to bob's webhook", || {
        !hook.bodies().is_empty()
    });
    assert_eq!(hook.bodies()[0]["payload"]["before"], "rotation");
}
