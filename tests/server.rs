//! `dmr-server` against the real RabbitMQ (DESIGN §4, §5, §6, §7): what the server refuses,
//! what it stores, how it delivers, and how it behaves when the directory changes, a second
//! instance joins, an instance dies or is asked to stop. Every test runs the real binary
//! and speaks the real protocol through `support::TestClient`.

mod support;

use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::Message;

use dmr::crypto::{self, SecretKey};
use dmr::protocol::{AgentId, ClientFrame, RejectCode, ServerFrame, PROTOCOL_VERSION};
use support::{
    dead_letters, directory_of, envelope, expect_accepted, expect_rejected, http_call, http_get,
    peek_queue, Identity, Refused, Server, TestClient, World,
};

const SECOND: Duration = Duration::from_secs(1);

/// Connects and authenticates `id` with its key from `world`, or panics with the refusal.
async fn login(server: &Server, world: &World, id: &str) -> TestClient {
    let a = world.agent(id);
    TestClient::connect(&server.ws_url(), &a.id, &a.key)
        .await
        .unwrap_or_else(|e| panic!("{id} could not connect to {}: {e:?}", server.proc.name))
}

/// Sends `env` and returns the server's answer to it.
async fn send(c: &mut TestClient, env: dmr::protocol::Envelope) -> ServerFrame {
    let id = env.header().id;
    c.send(ClientFrame::Send { envelope: env }).await;
    c.answer_for(id).await
}

/// Reads frames until the server closes the connection; returns the close reason.
async fn close_reason(c: &mut TestClient, limit: Duration) -> String {
    let end = Instant::now() + limit;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match c.recv_within(left).await {
            Some(Ok(ServerFrame::Deliver { envelope, .. })) => {
                panic!(
                    "got a Deliver of {} while waiting for a close",
                    envelope.header().id
                )
            }
            Some(Ok(_)) => continue,
            Some(Err(Refused::Closed(reason))) => return reason,
            Some(Err(Refused::Other(e))) => panic!("connection ended without a close frame: {e}"),
            None => panic!("no close within {limit:?}"),
        }
    }
}

/// Closes a client's connection politely and waits (briefly) for the server's answer, so
/// everything the client sent before has been read by the server.
async fn hang_up(mut c: TestClient) {
    let _ = c.send_raw(Message::Close(None)).await;
    let _ = c.recv_within(2 * SECOND).await;
}

/// The handshake counter of one result, as the server reports it.
fn handshakes(server: &Server, result: &str) -> f64 {
    server.metric(&format!(
        "dmr_server_handshakes_total{{result=\"{result}\"}}"
    ))
}

#[test]
fn forged_sender_is_rejected_and_the_session_survives() {
    let world = World::new("forged", &["alice", "bob"]);
    let server = Server::start(&world, "server", &[]);
    let (alice, bob) = (world.agent("alice"), world.agent("bob"));
    smol::block_on(async {
        let mut c = login(&server, &world, "alice").await;
        // Alice claims to be Bob (sealed with Bob's key, so only the session binding is wrong).
        let forged = envelope(bob, alice, b"I am bob, honest");
        let reason = expect_rejected(&send(&mut c, forged).await, RejectCode::ForgedSender);
        assert!(
            reason.contains("bob") && reason.contains("alice"),
            "{reason}"
        );
        // The session is still usable.
        expect_accepted(&send(&mut c, envelope(alice, bob, b"hello bob")).await);
    });
    assert_eq!(
        server.metric("dmr_server_rejected_total{code=\"forged_sender\"}"),
        1.0
    );
    // Nothing forged reached Alice's queue: only the genuine message is in Bob's.
    assert!(
        peek_queue(&world.queue("alice"), 5, SECOND).is_empty(),
        "the forged envelope was stored"
    );
    assert_eq!(peek_queue(&world.queue("bob"), 5, SECOND).len(), 1);
}

#[test]
fn unknown_recipient_is_rejected() {
    let world = World::new("unknown", &["alice", "bob"]);
    // A key pair whose id is not in the server's directory.
    let stranger_world = World::new("unknown-x", &["mallory"]);
    let server = Server::start(&world, "server", &[]);
    smol::block_on(async {
        let mut c = login(&server, &world, "alice").await;
        let env = envelope(
            world.agent("alice"),
            stranger_world.agent("mallory"),
            b"anyone there?",
        );
        let reason = expect_rejected(&send(&mut c, env).await, RejectCode::UnknownRecipient);
        assert!(reason.contains("mallory"), "{reason}");
        expect_accepted(
            &send(
                &mut c,
                envelope(world.agent("alice"), world.agent("bob"), b"ok"),
            )
            .await,
        );
    });
    assert_eq!(
        server.metric("dmr_server_rejected_total{code=\"unknown_recipient\"}"),
        1.0
    );
}

#[test]
fn oversize_envelope_is_rejected() {
    let world = World::new("oversize", &["alice", "bob"]);
    let server = Server::start(&world, "server", &["--max-message-bytes", "2000"]);
    let (alice, bob) = (world.agent("alice"), world.agent("bob"));
    smol::block_on(async {
        let mut c = login(&server, &world, "alice").await;
        let big = envelope(alice, bob, &[b'x'; 2500]);
        assert!(big.encoded_len() > 2000);
        let reason = expect_rejected(&send(&mut c, big).await, RejectCode::TooLarge);
        assert!(reason.contains("2000"), "{reason}");
        // Under the limit still goes through, on the same session.
        expect_accepted(&send(&mut c, envelope(alice, bob, &[b'y'; 1500])).await);
    });
    assert_eq!(
        server.metric("dmr_server_rejected_total{code=\"too_large\"}"),
        1.0
    );
    let stored = peek_queue(&world.queue("bob"), 5, SECOND);
    assert_eq!(stored.len(), 1, "only the small envelope may be stored");
}

#[test]
fn impostors_are_refused_at_the_handshake() {
    let world = World::new("impostor", &["alice", "bob"]);
    let server = Server::start(&world, "server", &[]);
    let (alice, bob) = (world.agent("alice"), world.agent("bob"));
    let url = server.ws_url();
    // A message waits for Bob.
    let waiting = envelope(alice, bob, b"for bob only");
    let waiting_id = waiting.header().id;
    smol::block_on(async {
        let mut a = login(&server, &world, "alice").await;
        expect_accepted(&send(&mut a, waiting).await);
    });

    // Right id, wrong key.
    let wrong_key = SecretKey::generate().unwrap();
    let r = smol::block_on(TestClient::connect(&url, &bob.id, &wrong_key));
    match r {
        Err(Refused::Closed(reason)) => assert!(reason.contains("proof"), "{reason}"),
        other => panic!(
            "wrong key: expected a close, got {:?}",
            other.map(|_| "Welcome")
        ),
    }
    assert_eq!(handshakes(&server, "bad_proof"), 1.0);

    // Unknown id.
    let nobody = AgentId::new("nobody").unwrap();
    let r = smol::block_on(TestClient::connect(&url, &nobody, &wrong_key));
    match r {
        Err(Refused::Closed(reason)) => assert!(reason.contains("directory"), "{reason}"),
        other => panic!(
            "unknown id: expected a close, got {:?}",
            other.map(|_| "Welcome")
        ),
    }
    assert_eq!(handshakes(&server, "unknown_agent"), 1.0);

    // Wrong protocol version.
    let reason = smol::block_on(async {
        let mut c = TestClient::open(&url).await;
        c.send(ClientFrame::Hello {
            version: PROTOCOL_VERSION + 41,
            agent_id: bob.id.clone(),
        })
        .await;
        match c.recv_within(5 * SECOND).await {
            Some(Err(Refused::Closed(reason))) => reason,
            other => panic!("bad version: expected a close, got {other:?}"),
        }
    });
    assert!(reason.contains("version"), "{reason}");
    assert_eq!(handshakes(&server, "bad_version"), 1.0);

    // An impostor that keeps the socket open after its proof still gets nothing.
    let leaked = smol::block_on(async {
        let mut c = TestClient::open(&url).await;
        c.send(ClientFrame::Hello {
            version: PROTOCOL_VERSION,
            agent_id: bob.id.clone(),
        })
        .await;
        let ServerFrame::Challenge {
            ephemeral_pk,
            nonce,
            ..
        } = c.recv().await.unwrap()
        else {
            panic!("expected Challenge")
        };
        let mac = crypto::prove(
            &wrong_key,
            &bob.id,
            &ephemeral_pk,
            &nonce,
            crypto::ChannelBinding::Unbound,
        )
        .unwrap();
        c.send(ClientFrame::Proof { mac }).await;
        let mut frames = Vec::new();
        while let Some(Ok(f)) = c.recv_within(2 * SECOND).await {
            frames.push(f);
        }
        frames
    });
    assert!(leaked.is_empty(), "an impostor received {leaked:?}");
    assert_eq!(handshakes(&server, "bad_proof"), 2.0);
    assert_eq!(server.metric("dmr_server_deliveries_total"), 0.0);
    assert_eq!(handshakes(&server, "ok"), 1.0);

    // The message is still there, untouched, for the real Bob.
    let stored = peek_queue(&world.queue("bob"), 5, SECOND);
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].message_id.as_deref(),
        Some(waiting_id.to_string().as_str())
    );
    smol::block_on(async {
        let mut b = login(&server, &world, "bob").await;
        let (_, env) = b
            .next_delivery(10 * SECOND)
            .await
            .expect("Bob gets his message");
        assert_eq!(env.header().id, waiting_id);
    });
}

#[test]
fn message_for_offline_agent_waits_in_its_queue_until_acked() {
    let world = World::new("offline", &["alice", "bob"]);
    let server = Server::start(&world, "server", &[]);
    let (alice, bob) = (world.agent("alice"), world.agent("bob"));
    let plaintext = b"PLAINTEXT-MARKER-the tax question about form 42";
    let env = envelope(alice, bob, plaintext);
    let id = env.header().id;
    smol::block_on(async {
        let mut a = login(&server, &world, "alice").await;
        expect_accepted(&send(&mut a, env).await);
    });

    let stored = peek_queue(&world.queue("bob"), 5, 2 * SECOND);
    assert_eq!(stored.len(), 1, "the message must wait in Bob's queue");
    let m = &stored[0];
    assert_eq!(m.message_id.as_deref(), Some(id.to_string().as_str()));
    assert!(
        m.headers.contains("alice") && m.headers.contains("bob"),
        "headers: {}",
        m.headers
    );
    let marker = b"PLAINTEXT-MARKER";
    assert!(
        !m.body.windows(marker.len()).any(|w| w == marker),
        "the stored body contains the plaintext"
    );
    assert!(!m.body.is_empty());

    smol::block_on(async {
        let mut b = login(&server, &world, "bob").await;
        let (delivery, got) = b
            .next_delivery(10 * SECOND)
            .await
            .expect("delivered on connect");
        assert_eq!(got.header().id, id);
        assert_eq!(
            crypto::open(&bob.key, &alice.key.public_key(), &got).unwrap(),
            plaintext
        );
        b.send(ClientFrame::Ack { delivery }).await;
        hang_up(b).await;
    });
    // Acked means gone: neither a new session nor a look into the queue finds it.
    smol::block_on(async {
        let mut b = login(&server, &world, "bob").await;
        assert!(
            b.next_delivery(2 * SECOND).await.is_none(),
            "an acked message came back"
        );
        hang_up(b).await;
    });
    assert!(peek_queue(&world.queue("bob"), 5, SECOND).is_empty());
    assert_eq!(server.metric("dmr_server_acks_total"), 1.0);
}

#[test]
fn a_nack_dead_letters_the_message_at_once_with_its_reason() {
    let world = World::new("dlq", &["alice", "bob"]);
    let server = Server::start(&world, "server", &["--delivery-limit", "5"]);
    let env = envelope(
        world.agent("alice"),
        world.agent("bob"),
        b"nobody wants this",
    );
    let id = env.header().id;
    let deliveries = smol::block_on(async {
        let mut a = login(&server, &world, "alice").await;
        expect_accepted(&send(&mut a, env).await);
        let mut b = login(&server, &world, "bob").await;
        let mut n = 0;
        while let Some((delivery, got)) = b.next_delivery(3 * SECOND).await {
            assert_eq!(got.header().id, id);
            n += 1;
            b.send(ClientFrame::Nack {
                delivery,
                reason: "refused by the local service: 400 Bad Request".into(),
            })
            .await;
        }
        hang_up(b).await;
        n
    });
    // A Nack means "never": no redelivery spends the delivery limit first.
    assert_eq!(deliveries, 1, "delivered {deliveries} times");
    let dead = dead_letters(&world, 1, 10 * SECOND);
    assert_eq!(dead.len(), 1, "the message did not reach {}", world.dlq());
    assert_eq!(dead[0].message_id.as_deref(), Some(id.to_string().as_str()));
    assert_eq!(dead[0].sender.as_deref(), Some("alice"));
    assert_eq!(
        dead[0].reason.as_deref(),
        Some("refused by the local service: 400 Bad Request")
    );
    assert!(
        peek_queue(&world.queue("bob"), 5, SECOND).is_empty(),
        "the message is still in Bob's queue"
    );
    assert_eq!(server.metric("dmr_server_nacks_total"), 1.0);
    assert_eq!(server.metric("dmr_server_dead_lettered_total"), 1.0);
}

#[test]
fn two_instances_relay_between_their_agents() {
    let world = World::new("two", &["alice", "bob"]);
    let s1 = Server::start(&world, "server-1", &[]);
    let s2 = Server::start(&world, "server-2", &[]);
    let (alice, bob) = (world.agent("alice"), world.agent("bob"));
    smol::block_on(async {
        let mut a = login(&s1, &world, "alice").await;
        let mut b = login(&s2, &world, "bob").await;
        for text in ["across instances", "and once more"] {
            let env = envelope(alice, bob, text.as_bytes());
            let id = env.header().id;
            expect_accepted(&send(&mut a, env).await);
            let (delivery, got) = b
                .next_delivery(10 * SECOND)
                .await
                .expect("Bob on server 2 gets it");
            assert_eq!(got.header().id, id);
            assert_eq!(got.header().sender, alice.id);
            assert_eq!(
                crypto::open(&bob.key, &alice.key.public_key(), &got).unwrap(),
                text.as_bytes()
            );
            b.send(ClientFrame::Ack { delivery }).await;
        }
        // And back.
        let env = envelope(bob, alice, b"reply");
        let id = env.header().id;
        expect_accepted(&send(&mut b, env).await);
        let (_, got) = a
            .next_delivery(10 * SECOND)
            .await
            .expect("Alice on server 1 gets the reply");
        assert_eq!(got.header().id, id);
        assert_eq!(
            crypto::open(&alice.key, &bob.key.public_key(), &got).unwrap(),
            b"reply"
        );
    });
    assert_eq!(s1.metric("dmr_server_accepted_total"), 2.0);
    assert_eq!(s2.metric("dmr_server_deliveries_total"), 2.0);
    // Both relayed with the AMQP client on the thread that serves the WebSockets: had
    // amqprs started outside the server's tokio runtime, async-compat would have given it
    // a thread of its own, and every message would cross between the two.
    for s in [&s1, &s2] {
        let threads = thread_names(s.proc.child.id());
        assert!(
            !threads.iter().any(|t| t.starts_with("async-compat")),
            "{}: {threads:?}",
            s.proc.name
        );
    }
}

/// The names of a running process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim_end().to_owned())
        .collect()
}

#[test]
fn unacked_message_survives_a_killed_instance() {
    let world = World::new("kill", &["alice", "bob"]);
    let mut s1 = Server::start(&world, "server-1", &[]);
    let s2 = Server::start(&world, "server-2", &[]);
    let env = envelope(world.agent("alice"), world.agent("bob"), b"do not lose me");
    let id = env.header().id;
    let first = smol::block_on(async {
        let mut a = login(&s2, &world, "alice").await;
        let mut b = login(&s1, &world, "bob").await;
        expect_accepted(&send(&mut a, env).await);
        let (_, got) = b
            .next_delivery(10 * SECOND)
            .await
            .expect("Bob on server 1 gets it");
        assert_eq!(got.header().id, id);
        // No Ack: the server dies with the message in flight.
        b
    });
    s1.proc.kill();
    drop(first);
    smol::block_on(async {
        let mut b = login(&s2, &world, "bob").await;
        let (delivery, got) = b
            .next_delivery(15 * SECOND)
            .await
            .expect("redelivered after the kill");
        assert_eq!(got.header().id, id);
        b.send(ClientFrame::Ack { delivery }).await;
        hang_up(b).await;
    });
    assert!(peek_queue(&world.queue("bob"), 5, SECOND).is_empty());
}

#[test]
fn unacked_message_returns_when_the_session_ends() {
    let world = World::new("requeue", &["alice", "bob"]);
    let server = Server::start(&world, "server", &[]);
    let env = envelope(world.agent("alice"), world.agent("bob"), b"come back");
    let id = env.header().id;
    smol::block_on(async {
        let mut a = login(&server, &world, "alice").await;
        expect_accepted(&send(&mut a, env).await);
        let mut b = login(&server, &world, "bob").await;
        let (_, got) = b.next_delivery(10 * SECOND).await.expect("delivered");
        assert_eq!(got.header().id, id);
        // No Ack: the session ends with the delivery outstanding.
        hang_up(b).await;
        let mut b = login(&server, &world, "bob").await;
        let (delivery, got) = b
            .next_delivery(10 * SECOND)
            .await
            .expect("the unacked message is delivered again to the next session");
        assert_eq!(got.header().id, id);
        b.send(ClientFrame::Ack { delivery }).await;
        hang_up(b).await;
    });
    assert!(peek_queue(&world.queue("bob"), 5, SECOND).is_empty());
    assert_eq!(server.metric("dmr_server_deliveries_total"), 2.0);
}

#[test]
fn a_second_session_replaces_the_first() {
    let world = World::new("replace", &["alice", "bob"]);
    let server = Server::start(&world, "server", &[]);
    let (alice, bob) = (world.agent("alice"), world.agent("bob"));
    let clients = smol::block_on(async {
        let mut old = login(&server, &world, "bob").await;
        let mut new = login(&server, &world, "bob").await;
        let reason = close_reason(&mut old, 5 * SECOND).await;
        assert!(reason.contains("replaced"), "{reason}");
        // The newer session is the one that gets Bob's messages.
        let mut a = login(&server, &world, "alice").await;
        let env = envelope(alice, bob, b"to the new session");
        let id = env.header().id;
        expect_accepted(&send(&mut a, env).await);
        let (_, got) = new
            .next_delivery(10 * SECOND)
            .await
            .expect("the new session gets it");
        assert_eq!(got.header().id, id);
        (a, new)
    });
    // Bob's newer session and Alice's: the replaced one is gone.
    assert_eq!(server.metric("dmr_server_sessions"), 2.0);
    drop(clients);
}

#[test]
fn directory_changes_reach_sessions() {
    let world = World::new("dirchange", &["alice", "bob", "carol"]);
    let server = Server::start(&world, "server", &[]);
    let url = server.ws_url();
    let (alice, bob) = (world.agent("alice"), world.agent("bob"));
    let rekeyed = Identity {
        id: alice.id.clone(),
        key: SecretKey::generate().unwrap(),
        key_path: world.dir.path().join("alice-new.key"),
    };
    let new_key = &rekeyed.key;
    smol::block_on(async {
        let mut a = login(&server, &world, "alice").await;
        let mut c = login(&server, &world, "carol").await;
        assert_eq!(a.directory.len(), 3);

        // Carol is removed.
        world.write_directory(&[
            ("alice".into(), alice.key.public_key()),
            ("bob".into(), bob.key.public_key()),
        ]);
        let reason = close_reason(&mut c, 10 * SECOND).await;
        assert!(reason.contains("removed"), "{reason}");
        let directory = loop {
            match a.recv_within(10 * SECOND).await {
                Some(Ok(ServerFrame::Directory { directory })) => break directory_of(&directory),
                Some(Ok(_)) => continue,
                other => panic!("Alice got no Directory frame: {other:?}"),
            }
        };
        let ids: Vec<&str> = directory.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert!(
            ids.contains(&"alice") && ids.contains(&"bob") && !ids.contains(&"carol"),
            "{ids:?}"
        );
        // Carol can no longer log in.
        match TestClient::connect(&url, &world.agent("carol").id, &world.agent("carol").key).await {
            Err(Refused::Closed(reason)) => assert!(reason.contains("directory"), "{reason}"),
            other => panic!(
                "removed agent: expected a close, got {:?}",
                other.map(|_| "Welcome")
            ),
        }

        // Alice is re-keyed.
        world.write_directory(&[
            ("alice".into(), new_key.public_key()),
            ("bob".into(), bob.key.public_key()),
        ]);
        let reason = close_reason(&mut a, 10 * SECOND).await;
        assert!(reason.contains("key"), "{reason}");
        let mut a = TestClient::connect(&url, &alice.id, new_key)
            .await
            .expect("the new key works");
        let entry = a.directory.iter().find(|e| e.id == alice.id).unwrap();
        assert_eq!(entry.public_key, new_key.public_key());
        match TestClient::connect(&url, &alice.id, &alice.key).await {
            Err(Refused::Closed(reason)) => assert!(reason.contains("proof"), "{reason}"),
            other => panic!(
                "old key: expected a close, got {:?}",
                other.map(|_| "Welcome")
            ),
        }
        // The re-keyed session works.
        let env = envelope(&rekeyed, bob, b"sent with the new key");
        expect_accepted(&send(&mut a, env).await);
    });
}

#[test]
fn health_readiness_metrics_and_unknown_paths() {
    let world = World::new("health", &["alice", "bob"]);
    let server = Server::start(&world, "server", &[]);
    let (status, body) = http_get(server.addr, "/healthz").unwrap();
    assert_eq!(status, 200, "{body}");

    let (status, body) = http_get(server.addr, "/readyz").unwrap();
    assert_eq!(status, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).expect("/readyz is JSON");
    assert_eq!(ready["rabbitmq"], true, "{body}");
    assert_eq!(ready["directory"], true, "{body}");
    assert_eq!(ready["agents"], 2, "{body}");

    let (status, body) = http_get(server.addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    for name in [
        "dmr_server_sessions",
        "dmr_server_accepted_total",
        "dmr_server_rabbitmq_connected 1",
        "dmr_server_directory_agents 2",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics:\n{body}");
    }

    let (status, _) = http_get(server.addr, "/no/such/path").unwrap();
    assert_eq!(status, 404);
    let (status, _) = http_call("POST", server.addr, "/healthz", Some("{}"), &[]).unwrap();
    assert_eq!(status, 405);
    // A plain GET of the WebSocket path is not an upgrade.
    let (status, _) = http_get(server.addr, "/v1/ws").unwrap();
    assert_eq!(status, 400);
}

#[test]
fn sigterm_closes_sessions_and_exits_cleanly() {
    let ids: Vec<String> = (0..8).map(|i| format!("agency-{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let world = World::new("sigterm", &ids);
    let mut server = Server::start(&world, "server", &[]);
    let mut clients = smol::block_on(async {
        let mut v = Vec::new();
        for id in &ids {
            v.push(login(&server, &world, id).await);
        }
        v
    });
    let started = Instant::now();
    server.proc.signal("TERM");
    // Every connected agent is told, with a close frame, so it can fail over at once.
    let reasons = smol::block_on(async {
        let mut reasons = Vec::new();
        for c in clients.iter_mut() {
            reasons.push(close_reason(c, 5 * SECOND).await);
        }
        reasons
    });
    for reason in &reasons {
        assert!(reason.contains("shutting down"), "{reason}");
    }
    let status = loop {
        if let Some(s) = server.proc.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < 5 * SECOND,
            "still running 5 s after SIGTERM:\n{}",
            server.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "exit status {status:?}:\n{}",
        server.proc.log_text()
    );
    assert!(server.proc.log_text().contains("stopped"));
}

#[test]
fn silent_connection_is_dropped_at_the_handshake_deadline() {
    let world = World::new("deadline", &["alice", "bob"]);
    let server = Server::start(&world, "server", &["--handshake-timeout", "2"]);
    let started = Instant::now();
    let reason = smol::block_on(async {
        let mut c = TestClient::open(&server.ws_url()).await;
        // Says nothing at all.
        match c.recv_within(20 * SECOND).await {
            Some(Err(Refused::Closed(reason))) => reason,
            other => panic!("expected a close at the handshake deadline, got {other:?}"),
        }
    });
    assert!(reason.contains("timed out"), "{reason}");
    // Closed by the 2 s deadline, not earlier and not by some other timer.
    let waited = started.elapsed();
    assert!(
        waited >= 2 * SECOND && waited < 10 * SECOND,
        "closed after {waited:?}"
    );
    assert_eq!(handshakes(&server, "timeout"), 1.0);
}

#[test]
fn garbage_closes_the_connection_not_the_server() {
    let world = World::new("garbage", &["alice", "bob"]);
    let mut server = Server::start(&world, "server", &[]);
    let url = server.ws_url();
    smol::block_on(async {
        // Garbage instead of Hello.
        let mut c = TestClient::open(&url).await;
        c.send_raw(Message::binary(vec![0xff, 0x00, 0x13, 0x37]))
            .await;
        match c.recv_within(5 * SECOND).await {
            Some(Err(Refused::Closed(reason))) => assert!(reason.contains("malformed"), "{reason}"),
            other => panic!("garbage Hello: expected a close, got {other:?}"),
        }
        // A text frame instead of Hello.
        let mut c = TestClient::open(&url).await;
        c.send_raw(Message::text("{\"hello\":1}")).await;
        match c.recv_within(5 * SECOND).await {
            Some(Err(Refused::Closed(reason))) => assert!(reason.contains("binary"), "{reason}"),
            other => panic!("text Hello: expected a close, got {other:?}"),
        }
        // Garbage after a good handshake ends that session only.
        let mut a = login(&server, &world, "alice").await;
        a.send_raw(Message::binary(vec![0x02, 0xff, 0xff, 0xff]))
            .await;
        let reason = close_reason(&mut a, 5 * SECOND).await;
        assert!(reason.contains("bad frame"), "{reason}");
        // A second Hello after the handshake too.
        let mut a = login(&server, &world, "alice").await;
        a.send(ClientFrame::Hello {
            version: PROTOCOL_VERSION,
            agent_id: world.agent("alice").id.clone(),
        })
        .await;
        let reason = close_reason(&mut a, 5 * SECOND).await;
        assert!(reason.contains("handshake"), "{reason}");
        // The server carries on.
        let mut a = login(&server, &world, "alice").await;
        let env = envelope(world.agent("alice"), world.agent("bob"), b"still here");
        expect_accepted(&send(&mut a, env).await);
    });
    assert!(server.proc.is_running());
    assert_eq!(handshakes(&server, "malformed"), 2.0);
}
