//! Adversarial input against the real binaries (DESIGN §4, docs/SECURITY.md): a hostile
//! peer on the server's WebSocket, hostile envelopes relayed to a real recipient agent, and
//! hostile bodies on an agent's local HTTP API. Every case must get its documented refusal;
//! afterwards the server and both agents must still be up and still relay a normal message
//! from A to B, and no process log may contain a private key, the API token or a plaintext.
//!
//! Three tests, each with its own server, agents and queues, so they run in parallel. Every
//! loop is bounded in count and every wait in time.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_tungstenite::tungstenite::Message;
use base64::Engine as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use dmr::crypto::{self, SecretKey};
use dmr::protocol::{
    AgentId, ClientFrame, Envelope, Header, Kind, MessageId, RejectCode, ServerFrame,
    PROTOCOL_VERSION,
};
use support::{
    agent_args, expect_accepted, expect_rejected, free_port, http_get, peek_queue, wait_until,
    AgentProc, Identity, Proc, Refused, Server, TestClient, Webhook, World, AGENT_BIN,
};

const SECOND: Duration = Duration::from_secs(1);
/// `--max-message-bytes` of every server here: small, so "too large" is cheap to reach.
const MAX_MESSAGE: usize = 64 * 1024;
/// The server's WebSocket limit: one envelope plus `FRAME_OVERHEAD`.
const WS_LIMIT: usize = MAX_MESSAGE + dmr::protocol::FRAME_OVERHEAD;

// Harness ---------------------------------------------------------------------------------

/// What must never show in a log: the API token and the plaintext markers of this test.
struct Secrets {
    token: String,
    markers: Vec<String>,
}

impl Secrets {
    fn new() -> Self {
        Self {
            token: format!("tok-{}", uuid::Uuid::new_v4().simple()),
            markers: Vec::new(),
        }
    }

    /// A fresh plaintext marker, remembered for the log scan.
    fn marker(&mut self, what: &str) -> String {
        let m = format!("PLAINTEXT-MARKER-{what}-{}", uuid::Uuid::new_v4().simple());
        self.markers.push(m.clone());
        m
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }
}

/// Starts `dmr-agent run` for `id`, with the API token in `DMR_API_TOKEN` (never on the
/// command line) and every crate logging at debug, so the secret scan sees as much as can be.
fn spawn_agent(
    world: &World,
    id: &str,
    server: &Server,
    hook: Option<&Webhook>,
    secrets: &Secrets,
) -> AgentProc {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let name = format!("agent-{id}");
    let log = world.dir.path().join(format!("{name}.log"));
    let key = &world.agent(id).key_path;
    let args = agent_args(id, key, &server.ws_url(), addr, hook.map(Webhook::url));
    let child = Command::new(AGENT_BIN)
        .args(&args)
        .env("DMR_API_TOKEN", &secrets.token)
        .env("RUST_LOG", "debug")
        .env("SMOL_THREADS", "2")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut a = AgentProc {
        proc: Proc { child, log, name },
        addr,
    };
    a.wait_ready();
    a
}

/// Scans every process log for the private keys of all agents in `world` (line 2 of the
/// PEM, and the raw key bytes in hex and base64), the API token and every plaintext marker.
fn assert_no_secrets(world: &World, procs: &[&Proc], secrets: &Secrets) {
    let mut needles: Vec<(String, String)> = Vec::new();
    for a in &world.agents {
        let pem = a.key.to_pem();
        let body = pem.lines().nth(1).expect("a PEM body line").to_owned();
        let der = base64::engine::general_purpose::STANDARD
            .decode(&body)
            .unwrap();
        let raw = &der[der.len() - 32..];
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        needles.push((format!("{}'s private key PEM", a.id), body));
        needles.push((format!("{}'s private key (hex)", a.id), hex));
        needles.push((format!("{}'s private key (base64)", a.id), b64));
    }
    needles.push(("the API token".into(), secrets.token.clone()));
    for m in &secrets.markers {
        needles.push((format!("plaintext marker {m}"), m.clone()));
    }
    for p in procs {
        let log = p.log_text();
        assert!(!log.is_empty(), "{} wrote no log at all", p.name);
        for (what, needle) in &needles {
            assert!(
                !log.contains(needle.as_str()),
                "{what} appears in the log of {}",
                p.name
            );
        }
    }
}

/// One HTTP/1.1 exchange on a fresh TCP connection with a raw byte body (which may be
/// invalid UTF-8, or bigger than the server will read). The body is written from a second
/// thread so an early answer (413) is read even while the rest is still being sent.
/// Returns the status and the body parsed as JSON (a string when it is not JSON).
fn raw_post(addr: SocketAddr, path: &str, headers: &[(&str, String)], body: &[u8]) -> (u16, Value) {
    let mut head = format!("POST {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(15 * SECOND)).unwrap();
    s.set_write_timeout(Some(15 * SECOND)).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&out);
    });
    let mut raw = Vec::new();
    let _ = (&s).read_to_end(&mut raw);
    let _ = writer.join();
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let value = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()));
    (status, value)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Seals `payload` from `from` to `to` with a chosen creation time.
fn sealed_at(from: &Identity, to: &Identity, payload: &[u8], created_at_ms: u64) -> Envelope {
    let header = Header {
        id: MessageId::random(),
        sender: from.id.clone(),
        recipient: to.id.clone(),
        created_at_ms,
        kind: Kind::chat_message(),
    };
    crypto::seal(&from.key, &to.key.public_key(), header, payload).unwrap()
}

fn handshakes(server: &Server, result: &str) -> f64 {
    server.metric(&format!(
        "dmr_server_handshakes_total{{result=\"{result}\"}}"
    ))
}

fn open_fds(p: &Proc) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", p.child.id()))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Connects and authenticates as `who`, or panics with the refusal.
async fn login(server: &Server, who: &Identity) -> TestClient {
    TestClient::connect(&server.ws_url(), &who.id, &who.key)
        .await
        .unwrap_or_else(|e| panic!("{} could not log in: {e:?}", who.id))
}

/// A handshake refused with a close frame whose reason contains `want`.
fn expect_refused(r: Result<TestClient, Refused>, want: &str) -> String {
    match r {
        Err(Refused::Closed(reason)) => {
            assert!(
                reason.contains(want),
                "close reason {reason:?} lacks {want:?}"
            );
            reason
        }
        Err(other) => panic!("expected a close frame naming {want:?}, got {other:?}"),
        Ok(_) => panic!("expected a refusal naming {want:?}, got Welcome"),
    }
}

/// Reads until the server ends the connection. `Ok(reason)` for a close frame, `Err` for a
/// connection that ended without one. Panics if the peer is welcomed or handed a message,
/// or if nothing ends it within `limit`.
async fn ended(c: &mut TestClient, limit: Duration) -> Result<String, String> {
    let end = Instant::now() + limit;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match c.recv_within(left).await {
            Some(Ok(f @ (ServerFrame::Welcome { .. } | ServerFrame::Deliver { .. }))) => {
                panic!("a hostile peer was sent {f:?}")
            }
            Some(Ok(_)) => continue,
            Some(Err(Refused::Closed(reason))) => return Ok(reason),
            Some(Err(Refused::Other(e))) => return Err(e),
            None => panic!("the server did not end the connection within {limit:?}"),
        }
    }
}

/// Sends `env` and returns the server's answer to it.
async fn send(c: &mut TestClient, env: Envelope) -> ServerFrame {
    let id = env.header().id;
    c.send(ClientFrame::Send { envelope: env }).await;
    c.answer_for(id).await
}

/// Webhook bodies carrying `id`.
fn deliveries_of(hook: &Webhook, id: &str) -> usize {
    hook.bodies()
        .iter()
        .filter(|b| b["id"].as_str() == Some(id))
        .count()
}

/// The closing check of every test: all processes are up, and a normal message from A's
/// agent reaches B's webhook exactly once, promptly.
fn still_relays(
    server: &mut Server,
    alice: &mut AgentProc,
    bob: &mut AgentProc,
    hook: &Webhook,
    secrets: &mut Secrets,
) {
    for p in [&mut server.proc, &mut alice.proc, &mut bob.proc] {
        assert!(p.is_running(), "{} died:\n{}", p.name, p.log_text());
    }
    let marker = secrets.marker("after-barrage");
    let body = json!({"recipientId": "bob", "payload": {"text": marker}}).to_string();
    let started = Instant::now();
    let (status, v) = raw_post(
        alice.addr,
        "/v1/messages",
        &[("authorization", secrets.bearer())],
        body.as_bytes(),
    );
    assert_eq!(status, 202, "A's agent no longer sends: {v}");
    let id = v["id"].as_str().expect("202 carries the id").to_owned();
    wait_until(10 * SECOND, "the message after the barrage at B", || {
        deliveries_of(hook, &id) == 1
    });
    let got = hook
        .bodies()
        .into_iter()
        .find(|b| b["id"].as_str() == Some(&id))
        .unwrap();
    assert_eq!(got["senderId"], json!("alice"));
    assert_eq!(got["payload"]["text"], json!(marker));
    assert!(
        started.elapsed() < 5 * SECOND,
        "A → B took {:?} after the barrage",
        started.elapsed()
    );
}

// 1. The handshake and the frame layer -------------------------------------------------------

/// Unknown id, wrong key, a replayed proof, wrong versions, random bytes before and after
/// the handshake, oversized frames, 200 connections that never finish the handshake and
/// sockets that never finish their HTTP request: each is refused or closed with its reason,
/// on time, while real agents keep relaying.
#[test]
fn hostile_peers_are_refused_and_bounded() {
    let world = World::new("adv-peer", &["alice", "bob", "carol"]);
    let max = MAX_MESSAGE.to_string();
    let mut server = Server::start(
        &world,
        "server",
        &["--handshake-timeout", "2", "--max-message-bytes", &max],
    );
    let mut secrets = Secrets::new();
    let hook = Webhook::start();
    let mut alice = spawn_agent(&world, "alice", &server, None, &secrets);
    let mut bob = spawn_agent(&world, "bob", &server, Some(&hook), &secrets);
    let url = server.ws_url();
    let (carol, bob_id) = (world.agent("carol"), world.agent("bob"));
    let mut rng = StdRng::seed_from_u64(0xD3_A7);

    // Sockets that never complete an HTTP request, to the server and to an agent's API:
    // silent, or a request line and one header and then nothing (slowloris). hyper's
    // header-read deadline (10 s) must close them; they are checked at the end.
    let mut stalled: Vec<(TcpStream, Instant, String)> = Vec::new();
    for (target, addr) in [("server", server.addr), ("agent API", alice.addr)] {
        for i in 0..10 {
            let mut s = TcpStream::connect(addr).unwrap();
            let what = if i % 2 == 0 {
                "silent"
            } else {
                s.write_all(b"GET /v1/ws HTTP/1.1\r\nhost: x\r\n").unwrap();
                "slowloris"
            };
            stalled.push((s, Instant::now(), format!("{what} socket to the {target}")));
        }
    }

    smol::block_on(async {
        // Unknown id.
        let stranger = SecretKey::generate().unwrap();
        let nobody = AgentId::new("nobody").unwrap();
        expect_refused(
            TestClient::connect(&url, &nobody, &stranger).await,
            "directory",
        );

        // Right id (of a connected agent), wrong key: refused, and the real session stays.
        expect_refused(
            TestClient::connect(&url, &bob_id.id, &stranger).await,
            "proof",
        );
        assert_eq!(bob.metric("dmr_agent_connected"), 1.0);

        // A proof recorded from one good handshake, replayed on a new connection: the new
        // challenge has a fresh ephemeral key and nonce, so the old MAC is worthless.
        let mut first = TestClient::open(&url).await;
        first
            .send(ClientFrame::Hello {
                version: PROTOCOL_VERSION,
                agent_id: carol.id.clone(),
            })
            .await;
        let Ok(ServerFrame::Challenge {
            ephemeral_pk,
            nonce,
        }) = first.recv().await
        else {
            panic!("expected Challenge")
        };
        let recorded = crypto::prove(&carol.key, &carol.id, &ephemeral_pk, &nonce).unwrap();
        first.send(ClientFrame::Proof { mac: recorded }).await;
        assert!(
            matches!(first.recv().await, Ok(ServerFrame::Welcome { .. })),
            "the genuine proof must be welcomed"
        );
        for _ in 0..3 {
            let mut replay = TestClient::open(&url).await;
            replay
                .send(ClientFrame::Hello {
                    version: PROTOCOL_VERSION,
                    agent_id: carol.id.clone(),
                })
                .await;
            replay.send(ClientFrame::Proof { mac: recorded }).await;
            let reason = ended(&mut replay, 5 * SECOND).await.expect("a close frame");
            assert!(reason.contains("proof"), "{reason}");
        }
        drop(first);

        // Versions this server does not speak.
        for version in [0, PROTOCOL_VERSION + 1, 0x7fff, u16::MAX] {
            let mut c = TestClient::open(&url).await;
            c.send(ClientFrame::Hello {
                version,
                agent_id: carol.id.clone(),
            })
            .await;
            let reason = ended(&mut c, 5 * SECOND).await.expect("a close frame");
            assert!(
                reason.contains("version") && reason.contains(&version.to_string()),
                "{reason}"
            );
        }

        // Random bytes instead of Hello, as binary and as text frames, and random bytes
        // instead of Proof: every connection is closed with a reason, nobody is welcomed.
        for round in 0..60 {
            let mut c = TestClient::open(&url).await;
            let len = rng.gen_range(0..300);
            let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            match round % 3 {
                0 => {
                    c.send_raw(Message::binary(bytes)).await;
                }
                1 => {
                    let text: String = bytes.iter().map(|&b| char::from(b)).collect();
                    c.send_raw(Message::text(text)).await;
                }
                _ => {
                    c.send(ClientFrame::Hello {
                        version: PROTOCOL_VERSION,
                        agent_id: carol.id.clone(),
                    })
                    .await;
                    c.send_raw(Message::binary(bytes)).await;
                }
            }
            let reason = ended(&mut c, 5 * SECOND)
                .await
                .unwrap_or_else(|e| panic!("round {round}: no close frame: {e}"));
            assert!(
                !reason.is_empty(),
                "round {round}: a close without a reason"
            );
        }

        // Random bytes after a good handshake. Frames that do not decode end the session
        // with "bad frame"; random frames that do decode (Ack/Nack of deliveries this
        // session never got) are ignored, and the session goes on working.
        let mut closed = 0;
        let mut ignored = 0;
        for round in 0..40 {
            let mut c = login(&server, carol).await;
            let frame: Vec<u8> = if round % 4 == 3 {
                let f = if round % 8 == 3 {
                    ClientFrame::Ack {
                        delivery: rng.gen(),
                    }
                } else {
                    ClientFrame::Nack {
                        delivery: rng.gen(),
                        reason: "x".repeat(rng.gen_range(0..5000)),
                    }
                };
                f.encode()
            } else {
                let len = rng.gen_range(1..2000);
                (0..len).map(|_| rng.gen()).collect()
            };
            let decodes = ClientFrame::decode(&frame, WS_LIMIT).is_ok();
            c.send_raw(Message::binary(frame)).await;
            if decodes {
                let env = support::envelope(carol, bob_id, b"{\"after\":\"ack noise\"}");
                expect_accepted(&send(&mut c, env).await);
                ignored += 1;
            } else {
                let reason = ended(&mut c, 5 * SECOND).await.expect("a close frame");
                assert!(reason.contains("bad frame"), "round {round}: {reason}");
                closed += 1;
            }
        }
        assert!(
            closed >= 20 && ignored >= 5,
            "closed {closed}, ignored {ignored}"
        );

        // Oversized frames. Before the handshake the limit is 1 KiB; after it the WebSocket
        // limit is --max-message-bytes + 4 KiB, and anything larger ends the connection.
        let mut c = TestClient::open(&url).await;
        c.send_raw(Message::binary(vec![0u8; 2000])).await;
        let reason = ended(&mut c, 5 * SECOND).await.expect("a close frame");
        assert!(reason.contains("exceeds limit of 1024"), "{reason}");
        for size in [WS_LIMIT + 1, 4 * WS_LIMIT] {
            let mut c = TestClient::open(&url).await;
            c.send_raw(Message::binary(vec![0u8; size])).await;
            // A close frame or a reset: either way the connection must end, promptly.
            let _ = ended(&mut c, 5 * SECOND).await;
        }
        for size in [WS_LIMIT + 1, 4 * WS_LIMIT] {
            let mut c = login(&server, carol).await;
            c.send_raw(Message::binary(vec![2u8; size])).await;
            let _ = ended(&mut c, 5 * SECOND).await;
        }
        // An envelope just over the message limit but inside the frame limit is refused
        // as TooLarge, and the session survives.
        let mut c = login(&server, carol).await;
        let big = support::envelope(carol, bob_id, &vec![b'x'; MAX_MESSAGE + 100]);
        expect_rejected(&send(&mut c, big).await, RejectCode::TooLarge);
        let ok = support::envelope(carol, bob_id, b"{\"still\":\"here\"}");
        expect_accepted(&send(&mut c, ok).await);
        drop(c);
    });
    assert_eq!(handshakes(&server, "unknown_agent"), 1.0);
    assert_eq!(handshakes(&server, "bad_proof"), 4.0);
    assert_eq!(handshakes(&server, "bad_version"), 4.0);
    assert_eq!(handshakes(&server, "timeout"), 0.0);

    // 200 connections that never finish the handshake: half say nothing after the upgrade,
    // half send Hello and never answer the Challenge. A real client is served at once
    // meanwhile; all 200 are closed at the 2 s deadline and their sockets released.
    let fds_before = open_fds(&server.proc);
    let marker = secrets.marker("during-flood");
    let flood_id = smol::block_on(async {
        let started = Instant::now();
        let mut idle = Vec::new();
        for i in 0..200 {
            let mut c = TestClient::open(&url).await;
            if i % 2 == 1 {
                c.send(ClientFrame::Hello {
                    version: PROTOCOL_VERSION,
                    agent_id: carol.id.clone(),
                })
                .await;
            }
            idle.push(c);
        }
        let opened = started.elapsed();
        assert!(
            opened < Duration::from_millis(1500),
            "opening took {opened:?}"
        );

        let t = Instant::now();
        let mut real = login(&server, carol).await;
        let env = support::envelope(carol, bob_id, json!({ "m": marker }).to_string().as_bytes());
        let id = env.header().id;
        expect_accepted(&send(&mut real, env).await);
        let served = t.elapsed();
        assert!(
            served < SECOND,
            "a real client waited {served:?} behind the idle ones"
        );
        if started.elapsed() < Duration::from_millis(1800) {
            assert_eq!(
                handshakes(&server, "timeout"),
                0.0,
                "closed before the deadline"
            );
        }

        for (i, c) in idle.iter_mut().enumerate() {
            let reason = ended(c, 8 * SECOND)
                .await
                .unwrap_or_else(|e| panic!("idle connection {i} ended without a close: {e}"));
            assert!(
                reason.contains("timed out"),
                "idle connection {i}: {reason}"
            );
        }
        let all_closed = started.elapsed();
        assert!(
            all_closed >= 2 * SECOND && all_closed < opened + 5 * SECOND,
            "the 200 idle connections were closed after {all_closed:?}"
        );
        drop(idle);
        id.to_string()
    });
    wait_until(5 * SECOND, "200 handshake timeouts counted", || {
        handshakes(&server, "timeout") == 200.0
    });
    wait_until(5 * SECOND, "the server to release the idle sockets", || {
        open_fds(&server.proc) <= fds_before + 5
    });
    wait_until(
        10 * SECOND,
        "the message sent during the flood at B",
        || deliveries_of(&hook, &flood_id) == 1,
    );

    // The stalled HTTP sockets: closed by the header deadline, not left open forever.
    for (mut s, opened, what) in stalled {
        let left = (opened + 16 * SECOND).saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(10))))
            .unwrap();
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset) => break,
                Err(e) => panic!("{what} still open after {:?}: {e}", opened.elapsed()),
            }
        }
    }

    still_relays(&mut server, &mut alice, &mut bob, &hook, &mut secrets);
    assert_eq!(alice.metric("dmr_agent_reconnects_total"), 0.0);
    assert_eq!(bob.metric("dmr_agent_reconnects_total"), 0.0);
    assert_no_secrets(&world, &[&server.proc, &alice.proc, &bob.proc], &secrets);
}

// 2. Hostile envelopes through the relay to a real agent -------------------------------------

/// What the relay cannot judge (it cannot read content) the recipient agent must: forged
/// senders are stopped at the server; tampered or unreadable envelopes are counted, never
/// delivered, and end in the dead-letter queue; a replayed envelope reaches the webhook once;
/// stale or future-dated ones are dropped; a removed agent is cut off and what it had queued
/// is dead-lettered, not delivered.
#[test]
fn hostile_envelopes_never_reach_the_webhook() {
    let world = World::new("adv-env", &["alice", "bob", "carol", "dave"]);
    let max = MAX_MESSAGE.to_string();
    let mut server = Server::start(
        &world,
        "server",
        &["--delivery-limit", "2", "--max-message-bytes", &max],
    );
    let url = server.ws_url();
    let mut secrets = Secrets::new();
    let (alice_id, bob_id) = (world.agent("alice"), world.agent("bob"));
    let (carol, dave) = (world.agent("carol"), world.agent("dave"));

    // Dave queues a message for Bob (offline), then is removed from the directory: his
    // session is closed, he cannot log in again, and what he queued is not delivered.
    let dave_marker = secrets.marker("from-removed-dave");
    let dave_id = smol::block_on(async {
        let mut d = login(&server, dave).await;
        let env = support::envelope(
            dave,
            bob_id,
            json!({ "m": dave_marker }).to_string().as_bytes(),
        );
        let id = env.header().id;
        expect_accepted(&send(&mut d, env).await);
        world.write_directory(
            &["alice", "bob", "carol"].map(|id| (id.to_owned(), world.agent(id).key.public_key())),
        );
        let reason = ended(&mut d, 10 * SECOND).await.expect("a close frame");
        assert!(reason.contains("removed"), "{reason}");
        expect_refused(
            TestClient::connect(&url, &dave.id, &dave.key).await,
            "directory",
        );
        id.to_string()
    });

    let hook = Webhook::start();
    let mut alice = spawn_agent(&world, "alice", &server, None, &secrets);
    let mut bob = spawn_agent(&world, "bob", &server, Some(&hook), &secrets);

    let mut dead: Vec<String> = vec![dave_id.clone()];
    let mut never: Vec<String> = vec![dave_id];
    let (replay_id, tampered_count) = smol::block_on(async {
        let mut c = login(&server, carol).await;

        // Forged sender: sealed by Alice's key and naming Alice, sent on Carol's session;
        // and Carol's own envelope relabelled as Alice's.
        let forged = support::envelope(alice_id, bob_id, b"{\"forged\":1}");
        let reason = expect_rejected(&send(&mut c, forged).await, RejectCode::ForgedSender);
        assert!(
            reason.contains("alice") && reason.contains("carol"),
            "{reason}"
        );
        let mut relabelled = support::envelope(carol, bob_id, b"{\"forged\":2}");
        relabelled.tamper().0.sender = alice_id.id.clone();
        expect_rejected(&send(&mut c, relabelled).await, RejectCode::ForgedSender);

        // Tampered envelopes: the server cannot tell, B's agent must.
        type Tamper = fn(&mut Envelope);
        let tampers: [(&str, Tamper); 9] = [
            ("ciphertext bit", |e| e.tamper().2[3] ^= 0x01),
            ("tag bit", |e| *e.tamper().2.last_mut().unwrap() ^= 0x80),
            ("enc bit", |e| e.tamper().1[0] ^= 0x40),
            ("kind", |e| {
                e.tamper().0.kind = Kind::new("Question").unwrap()
            }),
            ("created_at", |e| e.tamper().0.created_at_ms += 1),
            ("id", |e| e.tamper().0.id = MessageId::random()),
            ("truncated", |e| e.tamper().2.truncate(5)),
            ("empty", |e| e.tamper().2.clear()),
            ("extended", |e| e.tamper().2.push(0)),
        ];
        for (what, tamper) in tampers {
            let marker = secrets.marker(&format!("tampered-{}", what.replace(' ', "-")));
            let mut env =
                support::envelope(carol, bob_id, json!({ "m": marker }).to_string().as_bytes());
            tamper(&mut env);
            let id = env.header().id.to_string();
            expect_accepted(&send(&mut c, env).await);
            dead.push(id.clone());
            never.push(id);
        }
        // Genuine, but the plaintext is not JSON: refused the same way, never delivered.
        let env = support::envelope(carol, bob_id, b"\xff\xfe not json at all");
        let id = env.header().id.to_string();
        expect_accepted(&send(&mut c, env).await);
        dead.push(id.clone());
        never.push(id);

        // Stale and future-dated (but genuinely sealed): dropped and acknowledged.
        for (what, at) in [
            ("stale", now_ms() - 2 * 24 * 3600 * 1000),
            ("future", now_ms() + 3600 * 1000),
        ] {
            let marker = secrets.marker(what);
            let env = sealed_at(
                carol,
                bob_id,
                json!({ "m": marker }).to_string().as_bytes(),
                at,
            );
            let id = env.header().id.to_string();
            expect_accepted(&send(&mut c, env).await);
            never.push(id);
        }

        // The exact same envelope twice.
        let marker = secrets.marker("replayed");
        let env = support::envelope(carol, bob_id, json!({ "m": marker }).to_string().as_bytes());
        let replay_id = env.header().id.to_string();
        expect_accepted(&send(&mut c, env.clone()).await);
        expect_accepted(&send(&mut c, env).await);

        // Acks and nacks for deliveries this session never had change nothing.
        for delivery in [0, 1, 2, 7, u64::MAX] {
            c.send(ClientFrame::Ack { delivery }).await;
            c.send(ClientFrame::Nack {
                delivery,
                reason: "not mine".into(),
            })
            .await;
        }
        (replay_id, tampers.len() + 1)
    });

    // The replayed envelope: delivered once, the copy counted as a duplicate.
    wait_until(15 * SECOND, "the replayed envelope handled twice", || {
        bob.metric("dmr_agent_duplicates_total") >= 1.0 && deliveries_of(&hook, &replay_id) >= 1
    });
    // Stale and future: counted.
    wait_until(
        10 * SECOND,
        "the stale and future envelopes dropped",
        || bob.metric("dmr_agent_stale_total") == 2.0,
    );
    // Everything unreadable: in the DLQ after --delivery-limit 2.
    let want: std::collections::BTreeSet<String> = dead.iter().cloned().collect();
    let end = Instant::now() + 20 * SECOND;
    let found = loop {
        let got: std::collections::BTreeSet<String> =
            peek_queue(&world.dlq(), want.len() + 5, SECOND)
                .into_iter()
                .filter_map(|m| m.message_id)
                .collect();
        if got == want || Instant::now() > end {
            break got;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(
        found, want,
        "the dead-letter queue should hold exactly the unreadable ones"
    );
    let failures = bob.metric("dmr_agent_decrypt_failures_total");
    let n = tampered_count as f64;
    assert!(
        (2.0 * n..=3.0 * n).contains(&failures),
        "{failures} decrypt failures for {tampered_count} envelopes delivered 2-3 times each"
    );
    assert!(
        bob.proc
            .log_text()
            .contains("sender dave is not in the directory"),
        "B's agent should say why it refused Dave's message"
    );

    still_relays(&mut server, &mut alice, &mut bob, &hook, &mut secrets);
    assert_eq!(deliveries_of(&hook, &replay_id), 1);
    assert_eq!(bob.metric("dmr_agent_duplicates_total"), 1.0);
    for id in &never {
        assert_eq!(deliveries_of(&hook, id), 0, "{id} reached the webhook");
    }
    // Only the replayed envelope and the closing message got through.
    assert_eq!(hook.bodies().len(), 2, "{:?}", hook.bodies());
    assert_eq!(bob.metric("dmr_agent_delivered_total"), 2.0);
    assert_eq!(
        server.metric("dmr_server_rejected_total{code=\"forged_sender\"}"),
        2.0
    );
    assert_no_secrets(&world, &[&server.proc, &alice.proc, &bob.proc], &secrets);
}

// 3. Hostile bodies on the agent's HTTP API --------------------------------------------------

/// Bodies that are not JSON, nested 100 000 deep, too large, or with wrong types: each gets
/// the documented status (400/413, 401 without the token, 405 for a wrong method) and a JSON
/// `{"error": …}` naming the problem; nothing is sent, and the agent keeps serving.
#[test]
fn hostile_api_bodies_get_clear_errors() {
    let world = World::new("adv-http", &["alice", "bob"]);
    let max = MAX_MESSAGE.to_string();
    let mut server = Server::start(&world, "server", &["--max-message-bytes", &max]);
    let mut secrets = Secrets::new();
    let hook = Webhook::start();
    let mut alice = spawn_agent(&world, "alice", &server, None, &secrets);
    let mut bob = spawn_agent(&world, "bob", &server, Some(&hook), &secrets);
    // The agent reads at most max-message-bytes + 64 KiB of body.
    let body_limit = MAX_MESSAGE + 64 * 1024;

    // Uploads that stall (10 of 100 announced bytes, then nothing) or trickle (a byte every
    // 300 ms): answered 408 at the 10 s body deadline. Started first so the wait overlaps
    // with the other cases.
    let slow: Vec<_> = [("stalled", 0u64), ("trickling", 300)]
        .into_iter()
        .map(|(what, every_ms)| {
            let (addr, bearer) = (alice.addr, secrets.bearer());
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(20 * SECOND)).unwrap();
                let head = format!(
                    "POST /v1/messages HTTP/1.1\r\nhost: {addr}\r\nauthorization: {bearer}\r\ncontent-length: 100\r\n\r\n{{\"recipie"
                );
                s.write_all(head.as_bytes()).unwrap();
                if every_ms > 0 {
                    let mut r = s.try_clone().unwrap();
                    std::thread::spawn(move || {
                        for _ in 0..80 {
                            std::thread::sleep(Duration::from_millis(every_ms));
                            if r.write_all(b" ").is_err() {
                                break;
                            }
                        }
                    });
                }
                let mut raw = Vec::new();
                let _ = s.read_to_end(&mut raw);
                let (status, v) = parse_response(&raw);
                (what, status, v, started.elapsed())
            })
        })
        .collect();

    let marker = secrets.marker("in-a-refused-body");
    let nested = |open: &str, close: &str, depth: usize| {
        format!(
            r#"{{"recipientId":"bob","payload":{}{}}}"#,
            open.repeat(depth),
            close.repeat(depth)
        )
    };
    let mut cases: Vec<(String, Vec<u8>, u16, &str)> = vec![
        ("empty".into(), b"".to_vec(), 400, "JSON"),
        ("not JSON".into(), b"{not json".to_vec(), 400, "JSON"),
        (
            "truncated".into(),
            br#"{"recipientId":"bob","payl"#.to_vec(),
            400,
            "JSON",
        ),
        (
            "trailing garbage".into(),
            br#"{"recipientId":"bob","payload":1} x"#.to_vec(),
            400,
            "JSON",
        ),
        (
            "invalid UTF-8".into(),
            b"{\"recipientId\":\"bob\",\"payload\":\"\xff\xfe\"}".to_vec(),
            400,
            "JSON",
        ),
        ("NUL bytes".into(), vec![0u8; 64], 400, "JSON"),
        ("null".into(), b"null".to_vec(), 400, "object"),
        ("number".into(), b"42".to_vec(), 400, "object"),
        ("string".into(), br#""recipientId""#.to_vec(), 400, "object"),
        (
            "array".into(),
            br#"[{"recipientId":"bob","payload":1}]"#.to_vec(),
            400,
            "object",
        ),
        (
            "100k [".into(),
            "[".repeat(100_000).into_bytes(),
            400,
            "JSON",
        ),
        (
            "100k {\"a\":".into(),
            "{\"a\":".repeat(20_000).into_bytes(),
            400,
            "JSON",
        ),
        (
            "payload 50k deep".into(),
            nested("[", "]", 50_000).into_bytes(),
            400,
            "JSON",
        ),
        (
            "payload 200 deep".into(),
            nested("{\"a\":", "}", 200).into_bytes(),
            400,
            "JSON",
        ),
        (
            "over the body limit".into(),
            json!({"recipientId": "bob", "payload": marker.repeat(body_limit / marker.len() + 10)})
                .to_string()
                .into_bytes(),
            413,
            "bytes",
        ),
        (
            "sealed size over the server's limit".into(),
            json!({"recipientId": "bob", "payload": "x".repeat(MAX_MESSAGE + 10)})
                .to_string()
                .into_bytes(),
            413,
            "limit",
        ),
    ];
    let typed: Vec<(&str, Value, &str)> = vec![
        (
            "recipientId number",
            json!({"recipientId": 7, "payload": 1}),
            "recipientId:",
        ),
        (
            "recipientId null",
            json!({"recipientId": null, "payload": 1}),
            "recipientId:",
        ),
        (
            "recipientId array",
            json!({"recipientId": ["bob"], "payload": 1}),
            "recipientId:",
        ),
        (
            "recipientId object",
            json!({"recipientId": {"id": "bob"}, "payload": 1}),
            "recipientId:",
        ),
        (
            "recipientId empty",
            json!({"recipientId": "", "payload": 1}),
            "recipientId:",
        ),
        (
            "recipientId 65 chars",
            json!({"recipientId": "b".repeat(65), "payload": 1}),
            "recipientId:",
        ),
        (
            "recipientId space",
            json!({"recipientId": "bob smith", "payload": 1}),
            "recipientId:",
        ),
        (
            "recipientId unicode",
            json!({"recipientId": "böb", "payload": 1}),
            "recipientId:",
        ),
        (
            "recipientId path",
            json!({"recipientId": "../bob", "payload": 1}),
            "recipientId:",
        ),
        ("recipientId missing", json!({"payload": 1}), "recipientId:"),
        ("payload missing", json!({"recipientId": "bob"}), "payload:"),
        (
            "id number",
            json!({"recipientId": "bob", "payload": 1, "id": 42}),
            "id:",
        ),
        (
            "id bool",
            json!({"recipientId": "bob", "payload": 1, "id": true}),
            "id:",
        ),
        (
            "id not a UUID",
            json!({"recipientId": "bob", "payload": 1, "id": "nope"}),
            "id:",
        ),
        (
            "id object",
            json!({"recipientId": "bob", "payload": 1, "id": {}}),
            "id:",
        ),
        (
            "type number",
            json!({"recipientId": "bob", "payload": 1, "type": 7}),
            "type:",
        ),
        (
            "type empty",
            json!({"recipientId": "bob", "payload": 1, "type": ""}),
            "type:",
        ),
        (
            "type newline",
            json!({"recipientId": "bob", "payload": 1, "type": "a\nb"}),
            "type:",
        ),
        (
            "timestamp number",
            json!({"recipientId": "bob", "payload": 1, "timestamp": 5}),
            "timestamp:",
        ),
        (
            "timestamp words",
            json!({"recipientId": "bob", "payload": 1, "timestamp": "yesterday"}),
            "timestamp:",
        ),
        (
            "timestamp before 1970",
            json!({"recipientId": "bob", "payload": 1, "timestamp": "1969-12-31T23:59:59Z"}),
            "timestamp:",
        ),
        (
            "timestamp no zone",
            json!({"recipientId": "bob", "payload": 1, "timestamp": "2025-01-01T00:00:00"}),
            "timestamp:",
        ),
        (
            "timestamp array",
            json!({"recipientId": "bob", "payload": 1, "timestamp": []}),
            "timestamp:",
        ),
        (
            "timestamp month 13",
            json!({"recipientId": "bob", "payload": 1, "timestamp": "2025-13-01T00:00:00Z"}),
            "timestamp:",
        ),
    ];
    for (name, body, field) in typed {
        cases.push((name.into(), body.to_string().into_bytes(), 400, field));
    }
    // Duplicate keys: the last one counts, and it is wrong.
    cases.push((
        "duplicate key".into(),
        br#"{"recipientId":"bob","payload":1,"recipientId":7}"#.to_vec(),
        400,
        "recipientId",
    ));

    let auth = [("authorization", secrets.bearer())];
    let mut failures = Vec::new();
    let started = Instant::now();
    for (name, body, want_status, want_word) in &cases {
        let (status, v) = raw_post(alice.addr, "/v1/messages", &auth, body);
        let error = v["error"].as_str().unwrap_or_default();
        if status != *want_status || error.is_empty() || !error.contains(want_word) {
            failures.push(format!(
                "{name}: want {want_status} naming {want_word:?}, got {status} {v}"
            ));
        }
    }
    // A body announced as 10 GB: refused as too large, without waiting for it.
    let t = Instant::now();
    let (status, v) = raw_post(
        alice.addr,
        "/v1/messages",
        &[
            ("authorization", secrets.bearer()),
            ("content-length", "10000000000".into()),
        ],
        br#"{"recipientId":"bob","#,
    );
    if status != 413
        || v["error"].as_str().unwrap_or_default().is_empty()
        || t.elapsed() > 5 * SECOND
    {
        failures.push(format!(
            "content-length 10 GB: want a prompt 413, got {status} {v} after {:?}",
            t.elapsed()
        ));
    }
    // No token, a wrong one, a wrong method: 401, 401, 405, each a JSON error.
    let good = br#"{"recipientId":"bob","payload":{"q":1}}"#;
    for (name, headers, want) in [
        ("no token", vec![], 401),
        (
            "wrong token",
            vec![("authorization", "Bearer nope".to_owned())],
            401,
        ),
        (
            "token with a suffix",
            vec![("authorization", format!("{}x", secrets.bearer()))],
            401,
        ),
    ] {
        let (status, v) = raw_post(alice.addr, "/v1/messages", &headers, good);
        if status != want || v["error"].as_str().unwrap_or_default().is_empty() {
            failures.push(format!("{name}: want {want}, got {status} {v}"));
        }
    }
    let r = support::http_call("PUT", alice.addr, "/v1/messages", Some("{}"), &[]);
    if r.as_ref().map(|r| r.0) != Some(401) {
        failures.push(format!("PUT without a token: want 401, got {r:?}"));
    }
    let bearer = secrets.bearer();
    let r = support::http_call(
        "PUT",
        alice.addr,
        "/v1/messages",
        Some("{}"),
        &[("authorization", bearer.as_str())],
    );
    if r.as_ref().map(|r| r.0) != Some(405) {
        failures.push(format!("PUT with the token: want 405, got {r:?}"));
    }
    // A 1 MiB header: hyper refuses it (431) or drops the connection; the agent goes on.
    let (status, _) = raw_post(
        alice.addr,
        "/v1/messages",
        &[("x-junk", "j".repeat(1 << 20))],
        good,
    );
    if !(status == 431 || status == 0) {
        failures.push(format!(
            "1 MiB header: want 431 or a dropped connection, got {status}"
        ));
    }
    for t in slow {
        let (what, status, v, took) = t.join().unwrap();
        let error = v["error"].as_str().unwrap_or_default();
        if status != 408 || !error.contains("body") || !(9 * SECOND..15 * SECOND).contains(&took) {
            failures.push(format!(
                "{what} upload: want 408 naming the body after 10 s, got {status} {v} after {took:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        started.elapsed() < 20 * SECOND,
        "the refusals took {:?}",
        started.elapsed()
    );

    // Nothing was sealed or sent for any of them.
    assert_eq!(alice.metric("dmr_agent_sent_total"), 0.0);
    assert_eq!(server.metric("dmr_server_frames_in_total"), 0.0);
    assert_eq!(http_get(alice.addr, "/healthz").map(|r| r.0), Some(200));
    still_relays(&mut server, &mut alice, &mut bob, &hook, &mut secrets);
    assert_eq!(alice.metric("dmr_agent_sent_total"), 1.0);
    assert_no_secrets(&world, &[&server.proc, &alice.proc, &bob.proc], &secrets);
}

// 4. A damaged key file ----------------------------------------------------------------------

/// A key file with a blank line before END used to make `dmr-agent` print the whole private
/// key in its startup error (the PEM parser quoted the line it choked on; see
/// `tests/fuzz.rs`). It must refuse the file, name it, and quote none of it.
#[test]
fn a_damaged_key_file_is_refused_without_quoting_it() {
    let dir = tempfile::tempdir().unwrap();
    let pem = SecretKey::generate().unwrap().to_pem();
    let body = pem.lines().nth(1).unwrap().to_owned();
    let path = dir.path().join("damaged.key");
    let damaged = pem.replacen(&format!("{body}\n"), &format!("{body}\n\n"), 1);
    std::fs::write(&path, damaged).unwrap();
    let out = Command::new(AGENT_BIN)
        .args(["run", "--id", "alice", "--key"])
        .arg(&path)
        .args(["--server", "ws://127.0.0.1:9/v1/ws", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the agent started with a damaged key"
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("damaged.key") && text.contains("PEM"),
        "{text}"
    );
    for window in body.as_bytes()[22..].windows(8) {
        let w = std::str::from_utf8(window).unwrap();
        assert!(!text.contains(w), "the key leaks into the error: {text}");
    }
}
