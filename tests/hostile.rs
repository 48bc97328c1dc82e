//! The relay as an adversary: a hostile server speaking the real protocol (built from the
//! library's public protocol and crypto API) against a real `dmr-agent`, a rogue TLS relay
//! between an agent and a real `dmr-server`, and a handshake that races a revocation.
//!
//! What must hold whatever the server does: no plaintext reaches it, no forged message
//! reaches the local service's webhook, and the agent stays up with bounded memory. Each
//! case prints what it tried and what the agent did (`--nocapture` shows it).

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::Message;
use futures_rustls::rustls;
use futures_rustls::{TlsAcceptor, TlsConnector};
use futures_util::StreamExt;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use dmr::crypto::{self, PublicKey, SecretKey};
use dmr::protocol::{
    AgentId, ClientFrame, DirectoryDocument, Envelope, Header, Kind, Limits, MessageId,
    ServerFrame, PROTOCOL_VERSION,
};
use support::*;

const SECOND: Duration = Duration::from_secs(1);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn free_addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

// ---------------------------------------------------------------------------------------
// A hostile server: accepts agents on plain ws://, does the handshake without checking the
// proof, sends whatever `Welcome` the test set, answers `Accepted` to every `Send` (keeping
// the envelope), counts `Ack`/`Nack`, and writes whatever the test pushes.
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Seen {
    sends: Mutex<Vec<Envelope>>,
    acks: AtomicUsize,
    nacks: AtomicUsize,
    nack_reasons: Mutex<Vec<String>>,
    logins: AtomicUsize,
    ended: AtomicUsize,
}

struct Hostile {
    addr: SocketAddr,
    welcome: Arc<Mutex<ServerFrame>>,
    seen: Arc<Seen>,
    push: async_channel::Sender<Message>,
}

impl Hostile {
    fn start(welcome: ServerFrame) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let welcome = Arc::new(Mutex::new(welcome));
        let seen = Arc::new(Seen::default());
        let (push, frames) = async_channel::unbounded::<Message>();
        let (w, s, p) = (welcome.clone(), seen.clone(), push.clone());
        std::thread::spawn(move || {
            let listener = smol::net::TcpListener::try_from(listener).unwrap();
            smol::block_on(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let conn = serve_agent(tcp, w.clone(), s.clone(), p.clone(), frames.clone());
                    smol::spawn(conn).detach();
                }
            })
        });
        Self {
            addr,
            welcome,
            seen,
            push,
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    fn set_welcome(&self, frame: ServerFrame) {
        *self.welcome.lock().unwrap() = frame;
    }

    fn send(&self, frame: &ServerFrame) {
        self.push
            .send_blocking(Message::binary(frame.encode()))
            .unwrap();
    }

    /// Ends the current connection; the agent will dial again.
    fn hang_up(&self) {
        self.push.send_blocking(Message::Close(None)).unwrap();
    }

    fn logins(&self) -> usize {
        self.seen.logins.load(Ordering::SeqCst)
    }
}

async fn serve_agent(
    tcp: smol::net::TcpStream,
    welcome: Arc<Mutex<ServerFrame>>,
    seen: Arc<Seen>,
    push: async_channel::Sender<Message>,
    frames: async_channel::Receiver<Message>,
) {
    let Ok(ws) = async_tungstenite::accept_async(tcp).await else {
        return;
    };
    let (mut tx, mut rx) = ws.split();
    let Some(ClientFrame::Hello { .. }) = next_client_frame(&mut rx).await else {
        return;
    };
    let challenge = ServerFrame::Challenge {
        ephemeral_pk: *SecretKey::generate().unwrap().public_key().as_bytes(),
        nonce: [7; 32],
        tls_bound: false,
    };
    if tx.send(Message::binary(challenge.encode())).await.is_err() {
        return;
    }
    let Some(ClientFrame::Proof { .. }) = next_client_frame(&mut rx).await else {
        return;
    };
    let welcome = welcome.lock().unwrap().encode();
    if tx.send(Message::binary(welcome)).await.is_err() {
        return;
    }
    seen.logins.fetch_add(1, Ordering::SeqCst);
    let reader = async {
        while let Some(Ok(m)) = rx.next().await {
            let Message::Binary(b) = m else { continue };
            match ClientFrame::decode(&b, 8 << 20) {
                Ok(ClientFrame::Send { envelope }) => {
                    let id = envelope.header().id;
                    seen.sends.lock().unwrap().push(envelope);
                    let ok = ServerFrame::Accepted { id };
                    let _ = push.send(Message::binary(ok.encode())).await;
                }
                Ok(ClientFrame::Ack { .. }) => {
                    seen.acks.fetch_add(1, Ordering::SeqCst);
                }
                Ok(ClientFrame::Nack { reason, .. }) => {
                    seen.nacks.fetch_add(1, Ordering::SeqCst);
                    let mut reasons = seen.nack_reasons.lock().unwrap();
                    if reasons.len() < 1000 {
                        reasons.push(reason);
                    }
                }
                _ => {}
            }
        }
    };
    let writer = async {
        while let Ok(m) = frames.recv().await {
            let close = matches!(m, Message::Close(_));
            if tx.send(m).await.is_err() || close {
                break;
            }
        }
    };
    futures_lite::future::or(reader, writer).await;
    seen.ended.fetch_add(1, Ordering::SeqCst);
}

async fn next_client_frame(
    rx: &mut async_tungstenite::WebSocketReceiver<smol::net::TcpStream>,
) -> Option<ClientFrame> {
    match rx.next().await {
        Some(Ok(Message::Binary(b))) => ClientFrame::decode(&b, 8 << 20).ok(),
        _ => None,
    }
}

/// One directory entry, in the CentOps shape a server forwards.
fn entry(id: &str, pk: PublicKey) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "name": format!("Agency {id}"),
        "authentication_certificate": pk.to_pem(),
    })
}

/// An unsigned directory document holding `entries`, as a server without `FILE.sig` sends.
fn documents(entries: &[serde_json::Value]) -> Vec<DirectoryDocument> {
    let json = serde_json::json!({ "response": entries });
    vec![DirectoryDocument {
        json: serde_json::to_vec(&json).unwrap(),
        signature: None,
    }]
}

fn welcome(entries: Vec<serde_json::Value>, max_message_bytes: u32) -> ServerFrame {
    ServerFrame::Welcome {
        directory: documents(&entries),
        limits: Limits {
            max_message_bytes,
            message_ttl_ms: 86_400_000,
        },
    }
}

fn header(sender: &str, recipient: &str, created_at_ms: u64) -> Header {
    Header {
        id: MessageId::random(),
        sender: AgentId::new(sender).unwrap(),
        recipient: AgentId::new(recipient).unwrap(),
        created_at_ms,
        kind: Kind::chat_message(),
        seq: 0,
    }
}

/// A real agent `id` of `world` against `server_url`, with its state in the test's
/// directory (`DMR_STATE_DIR`, for builds that pin keys there).
fn agent(world: &World, id: &str, server_url: &str, hook: Option<&Webhook>) -> AgentProc {
    let addr = free_addr();
    let key = &world.agent(id).key_path;
    let args = agent_args(id, key, server_url, addr, hook.map(|h| h.url()));
    let state = world.dir.path().join(format!("state-{id}"));
    let env = [("DMR_STATE_DIR", state.to_str().unwrap())];
    let name = format!("agent-{id}-{}", addr.port());
    let mut a = AgentProc {
        proc: Proc::spawn_env(&name, AGENT_BIN, &args, world.dir.path(), &env),
        addr,
    };
    a.wait_ready();
    a
}

/// Resident and peak resident memory of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn opens_with(key: &SecretKey, sender: &PublicKey, e: &Envelope) -> Option<Vec<u8>> {
    crypto::open(key, sender, e).ok()
}

// ---------------------------------------------------------------------------------------
// (a) Public keys swapped in `Welcome` and `Directory`.
// ---------------------------------------------------------------------------------------

/// The server announces the attacker's key as the recipient's, first in a `Directory`
/// update, then in the `Welcome` of a new connection. The agent must not seal to it.
#[test]
fn a_swapped_recipient_key_never_gets_plaintext() {
    let world = World::new("hostile-seal", &["a", "b"]);
    let (a, b) = (world.agent("a"), world.agent("b"));
    let mallory = SecretKey::generate().unwrap();
    let honest = vec![
        entry("a", a.key.public_key()),
        entry("b", b.key.public_key()),
    ];
    let swapped = vec![
        entry("a", a.key.public_key()),
        entry("b", mallory.public_key()),
    ];
    let hostile = Hostile::start(welcome(honest, 1 << 20));
    let agent_a = agent(&world, "a", &hostile.url(), None);

    // Control: under the true directory the message is sealed to b's real key.
    let (status, body) = agent_a.send("b", serde_json::json!({"secret": "control"}));
    assert_eq!(status, 202, "{body}");
    let first = hostile.seen.sends.lock().unwrap()[0].clone();
    assert!(opens_with(&b.key, &a.key.public_key(), &first).is_some());
    println!("control: sealed to b's real key, as it should be");

    let marker = "never-for-mallory";
    let mut answers = vec![];
    hostile.send(&ServerFrame::Directory {
        directory: documents(&swapped),
    });
    std::thread::sleep(SECOND);
    answers.push(agent_a.send("b", serde_json::json!({ "secret": marker })));
    println!(
        "tried: Directory frame with mallory's key for b; agent answered {:?}",
        answers[0]
    );

    hostile.set_welcome(welcome(swapped, 1 << 20));
    let logins = hostile.logins();
    hostile.hang_up();
    wait_until(20 * SECOND, "the agent to log in again", || {
        hostile.logins() > logins
    });
    answers.push(agent_a.send("b", serde_json::json!({ "secret": marker })));
    println!(
        "tried: Welcome with mallory's key for b; agent answered {:?}",
        answers[1]
    );

    let sends = hostile.seen.sends.lock().unwrap().clone();
    let leaked: Vec<_> = sends
        .iter()
        .filter_map(|e| opens_with(&mallory, &a.key.public_key(), e))
        .collect();
    assert!(
        leaked.is_empty(),
        "the agent sealed {} message(s) to the substituted key: {:?}",
        leaked.len(),
        leaked
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect::<Vec<_>>()
    );
    println!("result: mallory opened nothing of {} sends", sends.len());
}

/// The server announces the attacker's key as a sender's and delivers a message the
/// attacker sealed in that sender's name. It must never reach the webhook.
#[test]
fn a_swapped_sender_key_never_gets_a_forgery_delivered() {
    let world = World::new("hostile-forge", &["a", "b"]);
    let (a, b) = (world.agent("a"), world.agent("b"));
    let mallory = SecretKey::generate().unwrap();
    let honest = vec![
        entry("a", a.key.public_key()),
        entry("b", b.key.public_key()),
    ];
    let swapped = vec![
        entry("a", mallory.public_key()),
        entry("b", b.key.public_key()),
    ];
    let hostile = Hostile::start(welcome(honest, 1 << 20));
    let hook = Webhook::start();
    let _agent_b = agent(&world, "b", &hostile.url(), Some(&hook));

    // Control: a genuine message from a is delivered.
    let genuine = envelope(a, b, br#"{"genuine":true}"#);
    hostile.send(&ServerFrame::Deliver {
        delivery: 1,
        envelope: genuine,
    });
    wait_until(15 * SECOND, "the genuine delivery", || {
        hook.bodies().len() == 1
    });
    println!("control: a genuine message from a reached the webhook");

    let forged = |delivery| {
        let h = header("a", "b", now_ms());
        let e = crypto::seal(&mallory, &b.key.public_key(), h, br#"{"forged":true}"#);
        ServerFrame::Deliver {
            delivery,
            envelope: e.unwrap(),
        }
    };
    hostile.send(&ServerFrame::Directory {
        directory: documents(&swapped),
    });
    hostile.send(&forged(2));
    println!("tried: Directory frame with mallory's key for a, then a message mallory sealed as a");
    hostile.set_welcome(welcome(swapped, 1 << 20));
    let logins = hostile.logins();
    hostile.hang_up();
    wait_until(20 * SECOND, "the agent to log in again", || {
        hostile.logins() > logins
    });
    hostile.send(&forged(3));
    println!("tried: Welcome with mallory's key for a, then a message mallory sealed as a");
    // Every forgery gets an answer (a Nack), or a decision to hold it: wait for either.
    let answered =
        || hostile.seen.nacks.load(Ordering::SeqCst) + hostile.seen.acks.load(Ordering::SeqCst);
    let end = Instant::now() + 10 * SECOND;
    while Instant::now() < end && answered() < 3 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let bodies = hook.bodies();
    println!(
        "result: webhook got {} message(s), agent nacked {:?}",
        bodies.len(),
        hostile.seen.nack_reasons.lock().unwrap()
    );
    assert_eq!(bodies.len(), 1, "a forgery reached the webhook: {bodies:?}");
    assert_eq!(bodies[0]["payload"]["genuine"], true);
}

// ---------------------------------------------------------------------------------------
// (c) A flood of `Deliver` frames, (d) frames over the agent's own limit.
// ---------------------------------------------------------------------------------------

/// 100 000 small `Deliver` frames (not for this agent, stale, and forged in a real sender's
/// name) as fast as the socket takes them: the agent answers each, delivers none, stays
/// responsive and its memory stays bounded.
#[test]
fn a_deliver_flood_is_absorbed_with_bounded_memory() {
    let world = World::new("hostile-flood", &["a", "b"]);
    let (a, b) = (world.agent("a"), world.agent("b"));
    let mallory = SecretKey::generate().unwrap();
    let honest = vec![
        entry("a", a.key.public_key()),
        entry("b", b.key.public_key()),
    ];
    let hostile = Hostile::start(welcome(honest, 1 << 20));
    let hook = Webhook::start();
    let mut agent_b = agent(&world, "b", &hostile.url(), Some(&hook));
    let pid = agent_b.proc.child.id();
    std::thread::sleep(SECOND);
    let (base, _) = memory_kib(pid);

    const TOTAL: u64 = 100_000;
    const FORGED: u64 = 1_000;
    const STALE: u64 = 2_000;
    let not_for_me = crypto::seal(
        &a.key,
        &a.key.public_key(),
        header("a", "a", now_ms()),
        b"{}",
    );
    let not_for_me = not_for_me.unwrap();
    let started = Instant::now();
    let (mut peak, mut samples) = (base, 0u64);
    for delivery in 0..TOTAL {
        let envelope = match delivery {
            d if d < FORGED => {
                let h = header("a", "b", now_ms());
                crypto::seal(&mallory, &b.key.public_key(), h, b"{\"forged\":1}").unwrap()
            }
            d if d < FORGED + STALE => {
                let h = header("a", "b", 1_000);
                crypto::seal(&a.key, &b.key.public_key(), h, b"{\"stale\":1}").unwrap()
            }
            _ => not_for_me.clone(),
        };
        hostile.send(&ServerFrame::Deliver { delivery, envelope });
        if delivery % 5_000 == 0 {
            peak = peak.max(memory_kib(pid).0);
            samples += 1;
        }
    }
    println!(
        "tried: {TOTAL} Deliver frames ({FORGED} forged as a, {STALE} stale, the rest for another agent)"
    );
    let nacks = || hostile.seen.nacks.load(Ordering::SeqCst) as u64;
    let end = Instant::now() + Duration::from_secs(240);
    while nacks() < TOTAL && Instant::now() < end {
        peak = peak.max(memory_kib(pid).0);
        samples += 1;
        assert!(agent_b.proc.is_running(), "the agent died under the flood");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (rss, hwm) = memory_kib(pid);
    println!(
        "agent: nacked {} of {TOTAL} in {:?}; RSS {base} KiB before, peak sampled {peak} KiB ({samples} samples), high-water {hwm} KiB, now {rss} KiB",
        nacks(),
        started.elapsed()
    );
    assert_eq!(nacks(), TOTAL, "every frame gets its answer");
    assert!(agent_b.proc.is_running());
    assert!(hook.bodies().is_empty(), "forged: {:?}", hook.bodies());
    let reasons = hostile.seen.nack_reasons.lock().unwrap().clone();
    assert!(
        reasons.iter().any(|r| r.contains("unopenable")),
        "{reasons:?}"
    );
    // Without a bound the agent held a task (and an envelope) per frame read.
    let grown_mib = hwm.saturating_sub(base) / 1024;
    assert!(
        grown_mib < 64,
        "the agent grew by {grown_mib} MiB under the flood"
    );

    // Still serving: a genuine message goes through.
    let genuine = envelope(a, b, br#"{"after":"flood"}"#);
    hostile.send(&ServerFrame::Deliver {
        delivery: TOTAL,
        envelope: genuine,
    });
    wait_until(15 * SECOND, "a genuine delivery after the flood", || {
        hook.bodies().len() == 1
    });
    assert_eq!(hook.bodies()[0]["payload"]["after"], "flood");
    println!("result: nothing forged delivered; a genuine message after the flood was");
}

/// A server announcing a 64 MiB limit in `Welcome`, then sending a 48 MiB frame: the agent
/// reads at most its own limit (1 MiB + framing), drops the connection, never buffers it.
#[test]
fn frames_over_the_agents_own_limit_are_refused() {
    let world = World::new("hostile-big", &["a", "b"]);
    let (a, b) = (world.agent("a"), world.agent("b"));
    let directory = vec![
        entry("a", a.key.public_key()),
        entry("b", b.key.public_key()),
    ];
    let hostile = Hostile::start(welcome(directory, 64 << 20));
    let hook = Webhook::start();
    let mut agent_b = agent(&world, "b", &hostile.url(), Some(&hook));
    let pid = agent_b.proc.child.id();
    // A second connection, so any limit remembered from the first `Welcome` is in force.
    let logins = hostile.logins();
    hostile.hang_up();
    wait_until(20 * SECOND, "the agent to log in again", || {
        hostile.logins() > logins
    });
    std::thread::sleep(SECOND);
    let (base, _) = memory_kib(pid);

    for (size, what) in [
        (48 << 20, "48 MiB"),
        ((1 << 20) + 64 * 1024, "1 MiB + 64 KiB"),
    ] {
        let ended = hostile.seen.ended.load(Ordering::SeqCst);
        let logins = hostile.logins();
        let mut e = envelope(a, b, b"{}");
        e.tamper().2.resize(size, 0x41);
        hostile.send(&ServerFrame::Deliver {
            delivery: 1,
            envelope: e,
        });
        wait_until(30 * SECOND, "the agent to drop the connection", || {
            hostile.seen.ended.load(Ordering::SeqCst) > ended
        });
        wait_until(20 * SECOND, "the agent to log in again", || {
            hostile.logins() > logins
        });
        let (_, hwm) = memory_kib(pid);
        println!(
            "tried: a {what} Deliver after announcing 64 MiB; agent dropped the connection and reconnected (high-water {hwm} KiB, {base} KiB before)"
        );
        assert!(
            hwm.saturating_sub(base) < 24 * 1024,
            "the agent buffered the frame"
        );
    }
    assert!(agent_b.proc.is_running());
    assert!(hook.bodies().is_empty());
    let log = agent_b.proc.log_text();
    assert!(
        log.contains("too long") || log.contains("exceeds") || log.contains("Space limit"),
        "no size refusal in the log"
    );
}

// ---------------------------------------------------------------------------------------
// (b) Item 5: the handshake is bound to the TLS channel.
// ---------------------------------------------------------------------------------------

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl must be installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private CA (`ca.crt`) and two `localhost` certificates it signed, with their own keys:
/// `real` for the dmr-server, `rogue` for the relay (the agent trusts both through the CA).
fn make_certs(d: &Path) {
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=DMR test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
            "-keyout",
            "ca.key.pem",
            "-out",
            "ca.crt",
        ],
    );
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    for name in ["real", "rogue"] {
        let (key, csr, crt) = (
            format!("{name}.key.pem"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=localhost",
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key.pem",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
                "-out",
                &crt,
            ],
        );
    }
}

fn acceptor(d: &Path, name: &str) -> TlsAcceptor {
    let certs = CertificateDer::pem_file_iter(d.join(format!("{name}.crt")))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(d.join(format!("{name}.key.pem"))).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

/// How the rogue relay passes an agent's connection on.
#[derive(Clone, Copy, Debug)]
enum Relay {
    /// Terminates TLS with its own certificate and copies bytes to the upstream (over TLS
    /// when given a connector): a transparent man in the middle, or an honest TLS ingress.
    Bytes,
    /// Terminates TLS and the WebSocket, relays frames, and clears `Challenge.tls_bound`.
    StripBinding,
}

/// Starts a TLS-terminating relay on a free port in front of `upstream` (`localhost:port`).
fn start_relay(
    acceptor: TlsAcceptor,
    upstream_port: u16,
    upstream_tls: Option<TlsConnector>,
    mode: Relay,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let relayed = Arc::new(AtomicUsize::new(0));
    let count = relayed.clone();
    std::thread::spawn(move || {
        let listener = smol::net::TcpListener::try_from(listener).unwrap();
        smol::block_on(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, tls) = (acceptor.clone(), upstream_tls.clone());
                count.fetch_add(1, Ordering::SeqCst);
                smol::spawn(async move {
                    let Ok(agent_side) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(upstream) =
                        dmr::transport::dial("localhost", upstream_port, tls.as_ref()).await
                    else {
                        return;
                    };
                    match mode {
                        Relay::Bytes => copy_both_ways(agent_side, upstream).await,
                        Relay::StripBinding => {
                            relay_frames(agent_side, upstream, upstream_port).await
                        }
                    }
                })
                .detach();
            }
        })
    });
    (addr, relayed)
}

async fn copy_both_ways<A, B>(a: A, b: B)
where
    A: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin,
    B: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin,
{
    let (ar, aw) = futures_lite::io::split(a);
    let (br, bw) = futures_lite::io::split(b);
    let _ = futures_lite::future::or(
        futures_lite::io::copy(ar, bw),
        futures_lite::io::copy(br, aw),
    )
    .await;
}

async fn relay_frames<A>(agent_side: A, upstream: dmr::transport::Stream, port: u16)
where
    A: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin,
{
    let Ok(agent_ws) = async_tungstenite::accept_async(agent_side).await else {
        return;
    };
    let url = format!("wss://localhost:{port}/v1/ws");
    let Ok((server_ws, _)) = async_tungstenite::client_async(url, upstream).await else {
        return;
    };
    let (mut atx, mut arx) = agent_ws.split();
    let (mut stx, mut srx) = server_ws.split();
    let up = async {
        while let Some(Ok(m)) = arx.next().await {
            if stx.send(m).await.is_err() {
                break;
            }
        }
    };
    let down = async {
        while let Some(Ok(m)) = srx.next().await {
            let m = match &m {
                Message::Binary(b) => match ServerFrame::decode(b, 8 << 20) {
                    Ok(ServerFrame::Challenge {
                        ephemeral_pk,
                        nonce,
                        ..
                    }) => Message::binary(
                        ServerFrame::Challenge {
                            ephemeral_pk,
                            nonce,
                            tls_bound: false,
                        }
                        .encode(),
                    ),
                    _ => m,
                },
                _ => m,
            };
            if atx.send(m).await.is_err() {
                break;
            }
        }
    };
    futures_lite::future::or(up, down).await;
}

/// A `dmr-server` terminating TLS with the `real` certificate; waits until it is ready.
fn tls_server(world: &World) -> (Proc, u16) {
    let d = world.dir.path();
    let addr = free_addr();
    let (cert, key) = (d.join("real.crt"), d.join("real.key.pem"));
    let flags = [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let server = Proc::spawn(
        "server-tls",
        SERVER_BIN,
        &server_args(world, addr, &flags),
        d,
    );
    let tls = dmr::transport::client_tls(Some(&d.join("ca.crt"))).unwrap();
    wait_until(30 * SECOND, "the TLS server to be ready", || {
        let req = hyper::Request::get(format!("https://localhost:{}/readyz", addr.port()))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        smol::block_on(dmr::http::request(req, Some(&tls), 5 * SECOND)).is_ok_and(|(s, _)| s == 200)
    });
    (server, addr.port())
}

fn tls_metric(port: u16, ca: &Path, name: &str) -> f64 {
    let tls = dmr::transport::client_tls(Some(ca)).unwrap();
    let req = hyper::Request::get(format!("https://localhost:{port}/metrics"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let text = smol::block_on(dmr::http::request(req, Some(&tls), 5 * SECOND))
        .map(|(_, b)| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    metric_value(&text, name)
}

/// An agent process that may never get ready (it is not waited for).
fn spawn_agent(world: &World, id: &str, url: &str, ca: &Path) -> (Proc, SocketAddr) {
    let addr = free_addr();
    let mut args = agent_args(id, &world.agent(id).key_path, url, addr, None);
    args.extend(["--ca-file".into(), ca.display().to_string()]);
    let name = format!("agent-{id}-{}", addr.port());
    (Proc::spawn(&name, AGENT_BIN, &args, world.dir.path()), addr)
}

/// A rogue TLS server the agent trusts relays to the real TLS server: transparently (the
/// challenge passes untouched) and with `tls_bound` cleared. Neither logs the agent in.
#[test]
fn a_relayed_challenge_does_not_log_in() {
    let world = World::new("hostile-relay", &["a", "b"]);
    let d = world.dir.path();
    make_certs(d);
    let ca = d.join("ca.crt");
    let (_server, port) = tls_server(&world);
    let upstream = dmr::transport::client_tls(Some(&ca)).unwrap();

    // Control: directly over wss the agent logs in (the proof is bound to its channel).
    let direct = format!("wss://localhost:{port}/v1/ws");
    let (mut control, control_addr) = spawn_agent(&world, "b", &direct, &ca);
    control.wait_ready(control_addr);
    println!("control: agent b logged in directly over wss://");

    let bad_proof = "dmr_server_handshakes_total{result=\"bad_proof\"}";
    for mode in [Relay::Bytes, Relay::StripBinding] {
        let before = tls_metric(port, &ca, bad_proof);
        let (relay, relayed) =
            start_relay(acceptor(d, "rogue"), port, Some(upstream.clone()), mode);
        let url = format!("wss://localhost:{}/v1/ws", relay.port());
        let (mut a, a_addr) = spawn_agent(&world, "a", &url, &ca);
        wait_until(
            30 * SECOND,
            "the real server to refuse a relayed proof",
            || tls_metric(port, &ca, bad_proof) >= before + 2.0,
        );
        println!(
            "tried: {mode:?} relay ({} connections relayed); the real server refused the proof each time",
            relayed.load(Ordering::SeqCst)
        );
        assert!(a.is_running());
        assert_ne!(http_get(a_addr, "/readyz").map(|r| r.0), Some(200));
        let log = a.log_text();
        assert!(log.contains("proof of key possession failed"), "{log}");
        a.kill();
    }
    // Only the control agent ever had a session.
    assert_eq!(
        tls_metric(port, &ca, "dmr_server_handshakes_total{result=\"ok\"}"),
        1.0
    );
}

/// Behind a TLS ingress the server speaks plain WebSocket: nothing to bind, and agents over
/// wss:// (through the ingress) and plain ws:// both log in and talk.
#[test]
fn behind_a_tls_ingress_unbound_logins_work() {
    let world = World::new("hostile-ingress", &["a", "b"]);
    let d = world.dir.path();
    make_certs(d);
    let ca = d.join("ca.crt");
    let server = Server::start(&world, "server-plain", &[]);
    let (ingress, _) = start_relay(acceptor(d, "real"), server.addr.port(), None, Relay::Bytes);
    let hook = Webhook::start();
    let wss = format!("wss://localhost:{}/v1/ws", ingress.port());
    let b = AgentProc::start_with(
        &world,
        "b",
        &wss,
        free_addr(),
        Some(hook.url()),
        &["--ca-file", ca.to_str().unwrap()],
    );
    let a = AgentProc::start(&world, "a", &[&server], None, &[]);
    println!("b logged in over wss:// through the ingress, a over plain ws://");
    let (status, body) = a.send("b", serde_json::json!({"via": "ingress"}));
    assert_eq!(status, 202, "{body}");
    wait_until(15 * SECOND, "delivery through the ingress", || {
        !hook.bodies().is_empty()
    });
    assert_eq!(hook.bodies()[0]["payload"]["via"], "ingress");
    drop(b);
}

/// A plain `ws://` connection whose challenge claims TLS binding is refused by the agent:
/// no honest server sends that.
#[test]
fn a_bound_challenge_on_plain_ws_is_refused() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let proofs = Arc::new(AtomicUsize::new(0));
    let p = proofs.clone();
    std::thread::spawn(move || {
        let listener = smol::net::TcpListener::try_from(listener).unwrap();
        smol::block_on(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let p = p.clone();
                smol::spawn(async move {
                    let Ok(ws) = async_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    let (mut tx, mut rx) = ws.split();
                    let _hello = rx.next().await;
                    let challenge = ServerFrame::Challenge {
                        ephemeral_pk: *SecretKey::generate().unwrap().public_key().as_bytes(),
                        nonce: [1; 32],
                        tls_bound: true,
                    };
                    let _ = tx.send(Message::binary(challenge.encode())).await;
                    while let Some(Ok(m)) = rx.next().await {
                        if let Message::Binary(b) = m {
                            if let Ok(ClientFrame::Proof { .. }) = ClientFrame::decode(&b, 1024) {
                                p.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                })
                .detach();
            }
        })
    });
    let world = World::new("hostile-plainbound", &["a"]);
    let url = format!("ws://{addr}/v1/ws");
    let (a, _) = spawn_agent_plain(&world, "a", &url);
    wait_until(20 * SECOND, "the agent to refuse the challenge", || {
        a.log_text().contains("TLS-bound proof on a plain ws://")
    });
    println!("tried: tls_bound challenge over ws://; the agent refused it and sent no proof");
    assert_eq!(proofs.load(Ordering::SeqCst), 0);
}

fn spawn_agent_plain(world: &World, id: &str, url: &str) -> (Proc, SocketAddr) {
    let addr = free_addr();
    let args = agent_args(id, &world.agent(id).key_path, url, addr, None);
    let name = format!("agent-{id}-{}", addr.port());
    (Proc::spawn(&name, AGENT_BIN, &args, world.dir.path()), addr)
}

// ---------------------------------------------------------------------------------------
// Item 6: a handshake that races a revocation never ends as a live session.
// ---------------------------------------------------------------------------------------

/// Two agents pause between `Challenge` and `Proof`; meanwhile one is removed from the
/// directory and the other re-keyed. Their proofs (valid for the keys they were challenged
/// under) then end in a close, no session, and nothing consumed from their queues.
#[test]
fn a_handshake_racing_a_revocation_gets_no_session() {
    let world = World::new("hostile-revoke", &["alice", "carol", "dave"]);
    let server = Server::start(&world, "server", &[]);
    let url = server.ws_url();
    let (alice, carol, dave) = (
        world.agent("alice"),
        world.agent("carol"),
        world.agent("dave"),
    );
    smol::block_on(async {
        // A message waiting in each queue: a session would consume it.
        let mut sender = TestClient::connect(&url, &alice.id, &alice.key)
            .await
            .unwrap();
        for to in [carol, dave] {
            let e = envelope(alice, to, b"{\"waiting\":true}");
            let id = e.header().id;
            sender.send(ClientFrame::Send { envelope: e }).await;
            expect_accepted(&sender.answer_for(id).await);
        }

        let mut paused = vec![];
        for who in [carol, dave] {
            let mut c = TestClient::open(&url).await;
            c.send(ClientFrame::Hello {
                version: PROTOCOL_VERSION,
                agent_id: who.id.clone(),
            })
            .await;
            let Ok(ServerFrame::Challenge {
                ephemeral_pk,
                nonce,
                tls_bound,
            }) = c.recv().await
            else {
                panic!("expected Challenge")
            };
            assert!(
                !tls_bound,
                "a plain ws:// server must not ask for TLS binding"
            );
            let unbound = crypto::ChannelBinding::Unbound;
            let mac = crypto::prove(&who.key, &who.id, &ephemeral_pk, &nonce, unbound).unwrap();
            paused.push((c, mac));
        }
        // Carol removed, dave re-keyed, while both handshakes wait.
        let new_dave = SecretKey::generate().unwrap();
        world.write_directory(&[
            ("alice".into(), alice.key.public_key()),
            ("dave".into(), new_dave.public_key()),
        ]);
        let reloaded = || server.metric("dmr_server_directory_agents") == 2.0;
        let end = Instant::now() + 20 * SECOND;
        while !reloaded() && Instant::now() < end {
            smol::Timer::after(Duration::from_millis(50)).await;
        }
        assert!(reloaded(), "the server did not reload the agents file");

        for ((mut c, mac), who) in paused.into_iter().zip(["carol", "dave"]) {
            c.send(ClientFrame::Proof { mac }).await;
            match c.recv_within(10 * SECOND).await {
                Some(Err(Refused::Closed(reason))) => {
                    println!("tried: {who}'s proof after the directory changed; closed: {reason}");
                    assert!(reason.contains("removed or re-keyed"), "{reason}");
                }
                other => panic!("{who}: expected a close, got {other:?}"),
            }
        }
        // Checked while alice's client still lives: hers is the only session.
        assert_eq!(server.metric("dmr_server_sessions"), 1.0, "only alice's");
        drop(sender);
    });
    let revoked = "dmr_server_handshakes_total{result=\"revoked\"}";
    assert_eq!(server.metric(revoked), 2.0);
    assert_eq!(server.metric("dmr_server_deliveries_total"), 0.0);
    for who in ["carol", "dave"] {
        let waiting = peek_queue(&world.queue(who), 10, 2 * SECOND);
        assert_eq!(waiting.len(), 1, "{who}'s message must still be queued");
    }
}
