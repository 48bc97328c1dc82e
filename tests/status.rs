//! Delivery status the sender can see (issue 12): receipts, `GET /v1/messages/{id}`,
//! `--status-url`, failure notices from the relay, reply correlation and the durable
//! outbox. Real binaries, real RabbitMQ, a queue prefix per test.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_tungstenite::tungstenite::Message;
use futures_util::StreamExt;
use serde_json::{json, Value};

use dmr::crypto::{self, SecretKey};
use dmr::protocol::{
    ClientFrame, DirectoryDocument, Envelope, Header, Kind, Limits, MessageId, ServerFrame,
};
use support::{
    agent_args, free_port, http_call, http_get, wait_until, AgentProc, Proc, Server, Webhook,
    World, AGENT_BIN,
};

const SECOND: Duration = Duration::from_secs(1);

fn loopback() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// `GET /v1/messages/{id}` on `agent`: status code and body.
fn status_of(addr: SocketAddr, id: &str) -> (u16, Value) {
    let (code, body) = http_get(addr, &format!("/v1/messages/{id}")).expect("agent API");
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// Waits until message `id`'s status at `addr` is `want`; returns the body.
fn wait_status(addr: SocketAddr, id: &str, want: &str, limit: Duration) -> Value {
    let mut last = Value::Null;
    wait_until(limit, &format!("message {id} to become {want}"), || {
        last = status_of(addr, id).1;
        last["status"] == json!(want)
    });
    last
}

fn send(agent: &AgentProc, body: Value) -> (u16, Value) {
    agent.post("/v1/messages", &body.to_string(), &[])
}

/// A local service that answers every POST with a fixed status and records the bodies.
struct Service {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<Value>>>,
    _stop: async_channel::Sender<()>,
}

impl Service {
    fn start(status: u16) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let code = Arc::new(AtomicU16::new(status));
        let (stop, stopped) = async_channel::bounded::<()>(1);
        let (b, c) = (bodies.clone(), code.clone());
        std::thread::spawn(move || {
            let listener = smol::net::TcpListener::try_from(listener).unwrap();
            smol::block_on(dmr::http::serve(
                listener,
                None,
                move |req: hyper::Request<hyper::body::Incoming>, _| {
                    let (b, c) = (b.clone(), c.clone());
                    async move {
                        let body = dmr::http::read_body(req.into_body(), 1 << 20)
                            .await
                            .unwrap_or_default();
                        b.lock()
                            .unwrap()
                            .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
                        let status = hyper::StatusCode::from_u16(c.load(Ordering::SeqCst))
                            .unwrap_or(hyper::StatusCode::OK);
                        dmr::http::json(status, &json!({}))
                    }
                },
                async move {
                    let _ = stopped.recv().await;
                },
            ));
        });
        Self {
            addr,
            bodies,
            _stop: stop,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }

    /// The statuses posted for message `id`, in order.
    fn statuses_of(&self, id: &str) -> Vec<String> {
        self.bodies()
            .iter()
            .filter(|b| b["id"] == json!(id))
            .filter_map(|b| b["status"].as_str().map(String::from))
            .collect()
    }
}

// 1 ---------------------------------------------------------------------------------------

/// sent → delivered, seen through `GET /v1/messages/{id}` and `--status-url`; a repeated id
/// is answered 200 with its status; the receipt never reaches any webhook.
#[test]
fn a_receipt_turns_sent_into_delivered() {
    let world = World::new("receipt", &["a", "b"]);
    let server = Server::start(&world, "server", &[]);
    let statuses = Service::start(200);
    let a_hook = Webhook::start();
    let status_url = statuses.url();
    let a = AgentProc::start(
        &world,
        "a",
        &[&server],
        Some(&a_hook),
        &["--status-url", &status_url],
    );
    let b_hook = Webhook::start();
    let b = AgentProc::start(&world, "b", &[&server], Some(&b_hook), &[]);

    let (code, v) = status_of(a.addr, &uuid::Uuid::new_v4().to_string());
    assert_eq!(code, 404, "{v}");
    assert_eq!(status_of(a.addr, "not-a-uuid").0, 400);

    let (code, v) = a.send("b", json!({"hello": "b"}));
    assert_eq!(code, 202, "{v}");
    assert_eq!(v["status"], json!("sent"), "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let done = wait_status(a.addr, &id, "delivered", 20 * SECOND);
    assert_eq!(done["recipientId"], json!("b"), "{done}");
    assert!(done["updatedAt"].is_string(), "{done}");
    assert!(done.get("reason").is_none(), "{done}");
    wait_until(10 * SECOND, "both statuses at --status-url", || {
        statuses.statuses_of(&id) == ["sent", "delivered"]
    });
    let posted = statuses.bodies();
    let last = posted.last().unwrap();
    assert_eq!(last["recipientId"], json!("b"), "{last}");
    assert!(last["timestamp"].is_string(), "{last}");

    // The same id again: 200 with what became of it, nothing sent twice.
    let again = json!({"id": id, "recipientId": "b", "payload": {"hello": "again"}});
    let (code, v) = send(&a, again);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["status"], json!("delivered"), "{v}");
    std::thread::sleep(SECOND);
    assert_eq!(b_hook.bodies().len(), 1, "{:?}", b_hook.bodies());
    // The receipt went to A's agent, not to A's local service, and was not receipted.
    assert!(a_hook.bodies().is_empty(), "{:?}", a_hook.bodies());
    assert_eq!(a_hook.attempts.load(Ordering::SeqCst), 0);
    assert_eq!(b.metric("dmr_agent_delivered_total"), 1.0);
}

/// Many messages at once: receipts are batched (many ids per receipt under load), and
/// every message still becomes delivered.
#[test]
fn every_message_of_a_burst_becomes_delivered() {
    let world = World::new("receipt-burst", &["a", "b"]);
    let server = Server::start(&world, "server", &[]);
    let a = AgentProc::start(&world, "a", &[&server], None, &[]);
    let b_hook = Webhook::start();
    let _b = AgentProc::start(&world, "b", &[&server], Some(&b_hook), &[]);
    let addr = a.addr;
    let senders: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                (0..8)
                    .map(|i| {
                        let body = json!({"recipientId": "b", "payload": {"n": t * 8 + i}});
                        let (code, v) =
                            http_call("POST", addr, "/v1/messages", Some(&body.to_string()), &[])
                                .expect("agent API");
                        assert_eq!(code, 202, "{v}");
                        let v: Value = serde_json::from_str(&v).unwrap();
                        v["id"].as_str().unwrap().to_owned()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let ids: Vec<String> = senders
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(ids.len(), 64);
    for id in &ids {
        wait_status(a.addr, id, "delivered", 30 * SECOND);
    }
    assert_eq!(b_hook.bodies().len(), 64);
}

// 2 ---------------------------------------------------------------------------------------

/// The recipient's local service refuses with 400: the relay dead-letters the message and
/// tells the sender, whose status becomes failed with a reason naming the 400.
#[test]
fn a_permanent_refusal_by_the_recipient_service_is_failed_with_its_reason() {
    let world = World::new("refused", &["a", "b"]);
    let server = Server::start(&world, "server", &[]);
    let statuses = Service::start(200);
    let status_url = statuses.url();
    let a = AgentProc::start(
        &world,
        "a",
        &[&server],
        None,
        &["--status-url", &status_url],
    );
    let refusing = Service::start(400);
    let b = AgentProc::start_with(
        &world,
        "b",
        &server.ws_url(),
        loopback(),
        Some(refusing.url()),
        &[],
    );
    let (code, v) = a.send("b", json!({"unwanted": true}));
    assert_eq!(code, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let failed = wait_status(a.addr, &id, "failed", 20 * SECOND);
    let reason = failed["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("400"), "{failed}");
    wait_until(10 * SECOND, "failed at --status-url", || {
        statuses.statuses_of(&id) == ["sent", "failed"]
    });
    assert_eq!(refusing.bodies().len(), 1);
    drop(b);
}

// 3 ---------------------------------------------------------------------------------------

/// A message that waits in the recipient's queue past the relay's TTL expires there; the
/// sender learns `failed` (expired).
#[test]
fn a_message_expired_in_the_queue_is_failed() {
    let world = World::new("expired", &["a", "b"]);
    let server = Server::start(&world, "server", &["--message-ttl", "2"]);
    let a = AgentProc::start(&world, "a", &[&server], None, &[]);
    let (code, v) = a.send("b", json!({"nobody": "home"}));
    assert_eq!(code, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let failed = wait_status(a.addr, &id, "failed", 30 * SECOND);
    let reason = failed["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("expired"), "{failed}");
}

// 4 ---------------------------------------------------------------------------------------

/// With every server down, sends are stored (202 queued); they survive an agent restart and
/// are sent, then delivered, once a server is back.
#[test]
fn queued_messages_survive_a_restart_and_are_delivered_later() {
    let world = World::new("queued", &["a", "b"]);
    let server_addr = loopback();
    let mut server = Server::start_on(&world, "server-1", server_addr, &[]);
    let state = world.dir.path().join("a-state").display().to_string();
    let extra = ["--state-dir", state.as_str()];
    // The first run learns the directory (recipients must be known), then loses the server.
    let mut a1 = AgentProc::start(&world, "a", &[&server], None, &extra);
    assert!(server.proc.stop().success());
    wait_until(20 * SECOND, "the agent to notice", || {
        http_get(a1.addr, "/readyz").is_some_and(|r| r.0 == 503)
    });
    let ids: Vec<String> = (0..3)
        .map(|i| {
            let (code, v) = a1.send("b", json!({"n": i}));
            assert_eq!(code, 202, "{v}");
            assert_eq!(v["status"], json!("queued"), "{v}");
            v["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(status_of(a1.addr, &ids[0]).1["status"], json!("queued"));
    assert!(a1.proc.stop().success());

    // Restarted, still without a server: the queued messages are still there.
    let addr2 = loopback();
    let url = format!("ws://{server_addr}/v1/ws");
    let mut args = agent_args("a", &world.agent("a").key_path, &url, addr2, None);
    let i = args.iter().position(|a| a == "--state-dir").unwrap();
    args[i + 1] = state.clone();
    let _a2 = Proc::spawn("a-second", AGENT_BIN, &args, world.dir.path());
    wait_until(10 * SECOND, "the restarted agent's API", || {
        http_get(addr2, "/healthz").is_some_and(|r| r.0 == 200)
    });
    assert_eq!(status_of(addr2, &ids[2]).1["status"], json!("queued"));

    let server = Server::start_on(&world, "server-2", server_addr, &[]);
    for id in &ids {
        wait_status(addr2, id, "sent", 30 * SECOND);
    }
    // Sent in the order they were queued (B's webhook may see them in any order: it
    // delivers concurrently).
    let queued: Vec<String> = support::peek_queue(&world.queue("b"), 4, SECOND)
        .into_iter()
        .filter_map(|m| m.message_id)
        .collect();
    assert_eq!(queued, ids, "in order, once each");
    let hook = Webhook::start();
    let _b = AgentProc::start(&world, "b", &[&server], Some(&hook), &[]);
    for id in &ids {
        wait_status(addr2, id, "delivered", 30 * SECOND);
    }
    let mut got: Vec<String> = hook
        .bodies()
        .iter()
        .map(|b| b["id"].as_str().unwrap_or("").to_owned())
        .collect();
    got.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(got, want, "each delivered once");
}

// 5 ---------------------------------------------------------------------------------------

/// `inReplyTo` and `conversationId` travel sealed and appear in the recipient's webhook
/// body; bad values are refused with 400 naming the field.
#[test]
fn reply_correlation_reaches_the_webhook() {
    let world = World::new("correlate", &["a", "b"]);
    let server = Server::start(&world, "server", &[]);
    let a = AgentProc::start(&world, "a", &[&server], None, &[]);
    let hook = Webhook::start();
    let b = AgentProc::start(&world, "b", &[&server], Some(&hook), &[]);
    let question = uuid::Uuid::new_v4().to_string();
    let body = json!({
        "recipientId": "b", "payload": {"answer": 42},
        "inReplyTo": question, "conversationId": "case-2025/17",
    });
    let (code, v) = send(&a, body);
    assert_eq!(code, 202, "{v}");
    wait_until(15 * SECOND, "the reply at B's webhook", || {
        !hook.bodies().is_empty()
    });
    let got = &hook.bodies()[0];
    assert_eq!(got["inReplyTo"], json!(question), "{got}");
    assert_eq!(got["conversationId"], json!("case-2025/17"), "{got}");
    assert_eq!(got["payload"], json!({"answer": 42}), "{got}");
    // A message without them has neither key.
    let (code, _) = a.send("b", json!("plain"));
    assert_eq!(code, 202);
    wait_until(15 * SECOND, "the plain one", || hook.bodies().len() == 2);
    let plain = &hook.bodies()[1];
    assert!(plain.get("inReplyTo").is_none() && plain.get("conversationId").is_none());
    for (extra, field) in [
        (json!({"inReplyTo": "yesterday"}), "inReplyTo"),
        (json!({"conversationId": "x".repeat(129)}), "conversationId"),
        (json!({"type": "dmr.receipt"}), "type"),
    ] {
        let mut body = json!({"recipientId": "b", "payload": 1});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (code, v) = send(&a, body);
        assert_eq!(code, 400, "{v}");
        assert!(v["error"].as_str().unwrap_or("").starts_with(field), "{v}");
    }
    drop(b);
}

// 6 ---------------------------------------------------------------------------------------

/// A relay that forges a receipt (it cannot seal as the recipient) does not make a message
/// delivered; the recipient's genuine receipt, relayed the same way, does.
#[test]
fn a_receipt_forged_by_the_relay_is_refused() {
    let world = World::new("forged", &["a", "b"]);
    let relay = FakeRelay::start(&world);
    let a = AgentProc::start_with(&world, "a", &relay.url(), loopback(), None, &[]);
    let (code, v) = a.send("b", json!({"secret": 1}));
    assert_eq!(code, 202, "{v}");
    assert_eq!(v["status"], json!("sent"), "{v}");
    let id = MessageId(uuid::Uuid::parse_str(v["id"].as_str().unwrap()).unwrap());

    // Sealed with a key the relay made up, claiming to be from B.
    let relay_key = SecretKey::generate().unwrap();
    let a_pub = world.agent("a").key.public_key();
    let forged = receipt(&relay_key, &a_pub, id);
    assert!(matches!(relay.deliver(forged), ClientFrame::Nack { .. }));
    std::thread::sleep(SECOND / 2);
    assert_eq!(
        status_of(a.addr, &id.to_string()).1["status"],
        json!("sent")
    );

    // B's own receipt (sealed with B's key) is accepted.
    let genuine = receipt(&world.agent("b").key, &a_pub, id);
    assert!(matches!(relay.deliver(genuine), ClientFrame::Ack { .. }));
    wait_status(a.addr, &id.to_string(), "delivered", 10 * SECOND);
    // And a failure notice after that changes nothing: delivered is final.
    relay.notice(id, "b", "the relay says so");
    std::thread::sleep(SECOND / 2);
    assert_eq!(
        status_of(a.addr, &id.to_string()).1["status"],
        json!("delivered")
    );
}

/// A receipt from `from`'s key to `to` naming `id`, claiming to come from agent `b`.
fn receipt(from: &SecretKey, to: &crypto::PublicKey, id: MessageId) -> Envelope {
    let header = Header {
        id: MessageId::random(),
        sender: "b".parse().unwrap(),
        recipient: "a".parse().unwrap(),
        created_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
        kind: Kind::receipt(),
        seq: 0,
    };
    let body = json!({"receipt": id.to_string()}).to_string();
    crypto::seal(from, to, header, body.as_bytes()).unwrap()
}

/// A hostile relay speaking the public protocol: accepts every agent (it does not check
/// proofs), answers `Accepted` to every send, and delivers what the test tells it to.
struct FakeRelay {
    addr: SocketAddr,
    orders: async_channel::Sender<ServerFrame>,
    answers: async_channel::Receiver<ClientFrame>,
}

impl FakeRelay {
    fn start(world: &World) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let entries: Vec<serde_json::Value> = world
            .agents
            .iter()
            .map(|a| {
                serde_json::json!({
                    "id": a.id,
                    "name": a.id.to_string(),
                    "authentication_certificate": a.key.public_key().to_pem(),
                })
            })
            .collect();
        let directory = vec![DirectoryDocument {
            json: serde_json::to_vec(&serde_json::json!({ "response": entries })).unwrap(),
            signature: None,
        }];
        let (orders, orders_rx) = async_channel::unbounded::<ServerFrame>();
        let (answers_tx, answers) = async_channel::unbounded::<ClientFrame>();
        std::thread::spawn(move || {
            smol::block_on(async move {
                let listener = smol::net::TcpListener::try_from(listener).unwrap();
                let (stream, _) = listener.accept().await.unwrap();
                let ws = async_tungstenite::accept_async(stream).await.unwrap();
                let (mut tx, mut rx) = ws.split();
                let Some(ClientFrame::Hello { .. }) = next(&mut rx).await else {
                    return;
                };
                let challenge = ServerFrame::Challenge {
                    ephemeral_pk: [9; 32],
                    nonce: [7; 32],
                    tls_bound: false,
                };
                let _ = tx.send(Message::binary(challenge.encode())).await;
                let Some(ClientFrame::Proof { .. }) = next(&mut rx).await else {
                    return;
                };
                let welcome = ServerFrame::Welcome {
                    directory,
                    limits: Limits {
                        max_message_bytes: 1 << 20,
                        message_ttl_ms: 86_400_000,
                    },
                };
                let _ = tx.send(Message::binary(welcome.encode())).await;
                let tx = Arc::new(async_lock::Mutex::new(tx));
                let writer = tx.clone();
                let orders_task = smol::spawn(async move {
                    while let Ok(frame) = orders_rx.recv().await {
                        let _ = writer
                            .lock()
                            .await
                            .send(Message::binary(frame.encode()))
                            .await;
                    }
                });
                while let Some(frame) = next(&mut rx).await {
                    if let ClientFrame::Send { envelope } = &frame {
                        let ok = ServerFrame::Accepted {
                            id: envelope.header().id,
                        };
                        let _ = tx.lock().await.send(Message::binary(ok.encode())).await;
                    }
                    let _ = answers_tx.send(frame).await;
                }
                drop(orders_task);
            })
        });
        Self {
            addr,
            orders,
            answers,
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// Delivers `envelope`; returns the agent's `Ack` or `Nack` for it.
    fn deliver(&self, envelope: Envelope) -> ClientFrame {
        let delivery = fastrand::u64(..);
        smol::block_on(async {
            self.orders
                .send(ServerFrame::Deliver { delivery, envelope })
                .await
                .unwrap();
            self.answer_for(delivery).await
        })
    }

    fn notice(&self, id: MessageId, recipient: &str, reason: &str) -> ClientFrame {
        let delivery = fastrand::u64(..);
        smol::block_on(async {
            let frame = ServerFrame::Notice {
                delivery,
                id,
                recipient: recipient.parse().unwrap(),
                reason: reason.into(),
            };
            self.orders.send(frame).await.unwrap();
            self.answer_for(delivery).await
        })
    }

    async fn answer_for(&self, delivery: u64) -> ClientFrame {
        loop {
            let frame = dmr::wait::with_timeout(10 * SECOND, self.answers.recv())
                .await
                .expect("an answer from the agent within 10 s")
                .unwrap();
            match &frame {
                ClientFrame::Ack { delivery: d } | ClientFrame::Nack { delivery: d, .. }
                    if *d == delivery =>
                {
                    return frame
                }
                _ => continue,
            }
        }
    }
}

/// The next frame the agent sent the fake relay; `None` once it is gone.
async fn next<S>(rx: &mut S) -> Option<ClientFrame>
where
    S: futures_util::Stream<Item = Result<Message, async_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match rx.next().await {
            Some(Ok(Message::Binary(b))) => return ClientFrame::decode(&b, 4 << 20).ok(),
            Some(Ok(_)) => continue,
            _ => return None,
        }
    }
}

// 7 ---------------------------------------------------------------------------------------

/// The outbox is bounded: past `--outbox-max-messages` sends are refused with 503 and
/// `Retry-After`.
#[test]
fn a_full_outbox_refuses_with_503() {
    let world = World::new("full", &["a", "b"]);
    // A first run learns the directory from a server, so that "b" is a known recipient.
    let server = Server::start(&world, "server", &[]);
    let state_dir = world.dir.path().join("full-state");
    let state = state_dir.display().to_string();
    let extra = ["--state-dir", state.as_str(), "--outbox-max-messages", "2"];
    let a = AgentProc::start(&world, "a", &[&server], None, &extra);
    let (_, v) = a.send("b", json!(0));
    assert_eq!(v["status"], json!("sent"), "{v}");
    // Then every server goes away.
    drop(server);
    wait_until(20 * SECOND, "the agent to notice", || {
        http_get(a.addr, "/readyz").is_some_and(|r| r.0 == 503)
    });
    for i in 1..3 {
        let (code, v) = a.send("b", json!(i));
        assert_eq!(code, 202, "{v}");
        assert_eq!(v["status"], json!("queued"), "{v}");
    }
    let (code, headers, body) = raw(a.addr, r#"{"recipientId":"b","payload":3}"#);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("outbox is full"), "{body}");
    assert!(headers.contains("retry-after"), "{headers}");
    // An unknown recipient is still 404, not queued.
    let (code, v) = a.send("nobody", json!(4));
    assert_eq!(code, 404, "{v}");
}

/// A POST over a plain TCP connection: status, raw lower-cased headers, body.
fn raw(addr: SocketAddr, body: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(40 * SECOND)).unwrap();
    write!(
        s,
        "POST /v1/messages HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head.to_lowercase(), body.to_owned())
}
