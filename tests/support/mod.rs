//! Shared harness for the integration tests: real RabbitMQ, real binaries, a protocol-level
//! test agent, and a recording webhook. Every test gets its own queue prefix and removes
//! its RabbitMQ objects when done, so tests never see each other's messages.
#![allow(dead_code)]

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use amqprs::channel::{
    BasicConsumeArguments, BasicQosArguments, ExchangeDeleteArguments, QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use async_compat::Compat;
use async_tungstenite::tungstenite::Message;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::Full;

use dmr::crypto::{self, SecretKey};
use dmr::protocol::{
    AgentId, ClientFrame, Envelope, Header, Kind, MessageId, ServerFrame, PROTOCOL_VERSION,
};

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const SERVER_BIN: &str = env!("CARGO_BIN_EXE_dmr-server");
pub const AGENT_BIN: &str = env!("CARGO_BIN_EXE_dmr-agent");

/// How long one test binary may run before the watchdog ends it (override with
/// `DMR_TEST_BINARY_TIMEOUT_SECS`). The whole suite takes about five minutes; no binary
/// needs more than a few.
const BINARY_BUDGET: Duration = Duration::from_secs(15 * 60);

/// Children of this test binary that are still running, for the watchdog to kill.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

static WATCHDOG: Once = Once::new();

/// Keeps the watchdog from starting in this process (benchmarks run for longer).
pub fn no_watchdog() {
    WATCHDOG.call_once(|| {});
}

/// Starts (once per test binary) a watchdog that ends a hung binary with a message, kills
/// the processes it started, and exits non-zero. A test stuck on a wedged broker must fail
/// the run in minutes rather than hold CI until its deadline: libtest has no timeout of
/// its own, and its "running for over 60 seconds" lines then say which test hung.
pub fn watchdog() {
    WATCHDOG.call_once(|| {
        let budget = std::env::var("DMR_TEST_BINARY_TIMEOUT_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(BINARY_BUDGET, Duration::from_secs);
        std::thread::spawn(move || {
            std::thread::sleep(budget);
            // Straight to fd 2: libtest captures `eprintln!` of test threads.
            let _ = writeln!(
                std::io::stderr(),
                "\nwatchdog: this test binary ran for more than {budget:?}; a test is hung \
                 (see the \"running for over 60 seconds\" lines above). Killing its processes."
            );
            for pid in CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            std::process::exit(3);
        });
    });
}

/// A fresh, unused loopback port.
/// A port free right now for a child process to listen on.
///
/// Chosen below Linux's ephemeral range (32768 and up): a port the kernel handed out for
/// `:0` is free only until it hands it out again, and with a hundred agents and servers
/// making outgoing connections, one of those took a bench agent's port before it could
/// bind it. Never the same port twice in one process; RabbitMQ's 25672 is well below.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};

    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    loop {
        let port = fastrand::u16(26_000..32_000);
        if !given.lock().unwrap().insert(port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn unique_prefix(test: &str) -> String {
    format!(
        "t-{test}-{}.",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Polls `cond` every 50 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// One agent's identity for a test: id and key pair.
pub struct Identity {
    pub id: AgentId,
    pub key: SecretKey,
    pub key_path: PathBuf,
}

/// A temporary directory with agent keys and the directory file the server reads.
pub struct World {
    pub dir: tempfile::TempDir,
    pub prefix: String,
    pub agents: Vec<Identity>,
}

/// Writes a private key file as an operator must: mode 0600 (the agent refuses looser).
pub fn write_private_key(path: &Path, pem: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(pem.as_bytes()))
        .unwrap();
}

impl World {
    pub fn new(test: &str, ids: &[&str]) -> Self {
        watchdog();
        let dir = tempfile::tempdir().unwrap();
        let agents = ids
            .iter()
            .map(|id| {
                let key = SecretKey::generate().unwrap();
                let key_path = dir.path().join(format!("{id}.key"));
                write_private_key(&key_path, &key.to_pem());
                Identity {
                    id: AgentId::new(*id).unwrap(),
                    key,
                    key_path,
                }
            })
            .collect();
        let w = Self {
            dir,
            prefix: unique_prefix(test),
            agents,
        };
        w.write_directory(
            &w.agents
                .iter()
                .map(|a| (a.id.as_str().to_owned(), a.key.public_key()))
                .collect::<Vec<_>>(),
        );
        w
    }

    pub fn agent(&self, id: &str) -> &Identity {
        self.agents.iter().find(|a| a.id.as_str() == id).unwrap()
    }

    pub fn agents_file(&self) -> PathBuf {
        self.dir.path().join("agents.json")
    }

    /// Writes the directory file (CentOps shape) atomically.
    pub fn write_directory(&self, entries: &[(String, crypto::PublicKey)]) {
        let list: Vec<_> = entries.iter().map(|(id, pk)| serde_json::json!({
            "id": id, "name": format!("Agency {id}"), "authentication_certificate": pk.to_pem(),
            "created_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-01T00:00:00Z",
        })).collect();
        let tmp = self.dir.path().join("agents.json.tmp");
        std::fs::write(&tmp, serde_json::json!({ "response": list }).to_string()).unwrap();
        std::fs::rename(tmp, self.agents_file()).unwrap();
    }

    pub fn queue(&self, id: &str) -> String {
        format!("{}dmr.agent.{id}", self.prefix)
    }

    pub fn dlq(&self) -> String {
        format!("{}dmr.dlq", self.prefix)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let mut queues: Vec<String> = self
            .agents
            .iter()
            .map(|a| self.queue(a.id.as_str()))
            .collect();
        queues.push(self.dlq());
        queues.push(format!("{}dmr.failures", self.prefix));
        let exchanges = [
            format!("{}dmr.messages", self.prefix),
            format!("{}dmr.dlx", self.prefix),
        ];
        let clean_up = Compat::new(async {
            // Never panic here: a Drop during a failing test's unwinding would abort.
            let Ok(conn) = Connection::open(&amqp_args()).await else {
                return;
            };
            // A failed delete closes its channel, so each gets a fresh one and one retry.
            for q in &queues {
                for _ in 0..2 {
                    let Ok(ch) = conn.open_channel(None).await else {
                        break;
                    };
                    if ch.queue_delete(QueueDeleteArguments::new(q)).await.is_ok() {
                        let _ = ch.close().await;
                        break;
                    }
                }
            }
            if let Ok(ch) = conn.open_channel(None).await {
                for e in &exchanges {
                    let _ = ch.exchange_delete(ExchangeDeleteArguments::new(e)).await;
                }
            }
            let _ = conn.close().await;
        });
        // Bounded: a broker that stopped answering must not turn clean-up into a hang.
        if smol::block_on(dmr::wait::with_timeout(AMQP_DEADLINE, clean_up)).is_none() {
            eprintln!(
                "RabbitMQ clean-up of {} took over {AMQP_DEADLINE:?}; left",
                self.prefix
            );
        }
        remove_policies(&self.prefix);
    }
}

/// The RabbitMQ management API of the test node.
pub const MANAGEMENT_URL: &str = "http://guest:guest@127.0.0.1:15672";

/// Runs `dmr-server rabbitmq setup` for `prefix` on vhost `/`, passing on the queue
/// settings among `flags` (`--delivery-limit N`, `--message-ttl S`): queues get those from
/// the policy, not from `run`'s flags.
pub fn rabbitmq_setup(prefix: &str, flags: &[&str]) {
    let mut args: Vec<String> = vec![
        "rabbitmq".into(),
        "setup".into(),
        "--management-url".into(),
        MANAGEMENT_URL.into(),
        "--queue-prefix".into(),
        prefix.into(),
    ];
    for pair in flags.windows(2) {
        if matches!(
            pair[0],
            "--delivery-limit" | "--message-ttl" | "--dlq-retention"
        ) {
            args.extend([pair[0].to_owned(), pair[1].to_owned()]);
        }
    }
    let out = Command::new(SERVER_BIN).args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "dmr-server {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes the policies `rabbitmq_setup` made for `prefix`, if any. Never panics.
pub fn remove_policies(prefix: &str) {
    let Ok(admin) = dmr::rabbitmq_admin::Admin::new(MANAGEMENT_URL) else {
        return;
    };
    smol::block_on(async {
        for name in [format!("{prefix}dmr-agents"), format!("{prefix}dmr-dlq")] {
            let _ = admin.delete_policy("/", &name).await;
        }
    });
}

fn amqp_args() -> OpenConnectionArguments {
    let mut args = OpenConnectionArguments::new("127.0.0.1", 5672, "guest", "guest");
    args.connection_name("dmr-tests");
    args
}

/// Longest wait for one RabbitMQ step in the harness: a node out of file handles accepts
/// TCP and then never answers the AMQP handshake.
pub const AMQP_DEADLINE: Duration = Duration::from_secs(30);

async fn amqp() -> Connection {
    dmr::wait::with_timeout(AMQP_DEADLINE, Connection::open(&amqp_args()))
        .await
        .expect("RabbitMQ did not answer the AMQP handshake within 30 s (scripts/ensure-rabbitmq.sh checks the node)")
        .expect("RabbitMQ must be running on 127.0.0.1:5672 (.ci/run starts it)")
}

/// A message read straight from RabbitMQ.
pub struct RawMessage {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub headers: String,
}

/// Reads (without removing) up to `max` messages of `queue`, waiting at most `wait`.
pub fn peek_queue(queue: &str, max: usize, wait: Duration) -> Vec<RawMessage> {
    smol::block_on(Compat::new(async {
        let conn = amqp().await;
        let ch = conn.open_channel(None).await.unwrap();
        ch.basic_qos(BasicQosArguments::new(0, max as u16, false))
            .await
            .unwrap();
        let (_, mut rx) = ch
            .basic_consume_rx(
                BasicConsumeArguments::new(queue, "")
                    .manual_ack(true)
                    .finish(),
            )
            .await
            .unwrap();
        let mut out = Vec::new();
        let end = tokio_sleep_until(wait);
        tokio_pin(&mut out, &mut rx, max, end).await;
        // Closing without acks puts everything back.
        let _ = ch.close().await;
        let _ = conn.close().await;
        out
    }))
}

/// Reads (without removing) the dead-letter queue of `world` through the relay's own
/// [`dmr::broker::Broker::consume_dlq`], so each copy's `x-dmr-reason` comes back as
/// [`dmr::broker::Delivery::reason`]. Waits until `want` copies are there or `wait` passes
/// (an empty DLQ answers nothing, so `want` = 0 just waits `wait`). The copies return to the
/// queue when the consumer's channel closes.
pub fn dead_letters(world: &World, want: usize, wait: Duration) -> Vec<dmr::broker::Delivery> {
    use dmr::broker::{Broker, Topology};
    let topology = Topology {
        prefix: world.prefix.clone(),
        ..Topology::default()
    };
    let name = format!("{}dlq-reader", world.prefix);
    let broker = Broker::start_named(vec![AMQP_URL.into()], topology, &name).unwrap();
    smol::block_on(async {
        dmr::wait::with_timeout(Duration::from_secs(10), broker.connected())
            .await
            .expect("RabbitMQ not connected within 10 s for reading the DLQ");
        let prefetch = u16::try_from(want + 10).unwrap_or(u16::MAX);
        let consumer = broker.consume_dlq(prefetch).await.unwrap();
        let mut out = Vec::new();
        let end = Instant::now() + wait;
        while out.len() < want {
            let left = end.saturating_duration_since(Instant::now());
            match dmr::wait::with_timeout(left, consumer.next()).await {
                Some(Some(d)) => out.push(d),
                _ => break,
            }
        }
        // Take what else is already there, so a surplus shows.
        while let Some(Some(d)) =
            dmr::wait::with_timeout(Duration::from_millis(300), consumer.next()).await
        {
            out.push(d);
        }
        consumer.close().await;
        broker.close().await;
        out
    })
}

fn tokio_sleep_until(wait: Duration) -> Instant {
    Instant::now() + wait
}

async fn tokio_pin(
    out: &mut Vec<RawMessage>,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Box<amqprs::channel::ConsumerMessage>>,
    max: usize,
    end: Instant,
) {
    while out.len() < max {
        let left = end.saturating_duration_since(Instant::now());
        let Ok(Some(m)) = tokio::time::timeout(left, rx.recv()).await else {
            break;
        };
        let props = m.basic_properties;
        out.push(RawMessage {
            body: m.content.unwrap_or_default(),
            message_id: props.as_ref().and_then(|p| p.message_id().cloned()),
            headers: props
                .as_ref()
                .and_then(|p| p.headers().map(|h| format!("{h:?}")))
                .unwrap_or_default(),
        });
    }
}

/// A running binary, killed when dropped. Its stderr goes to a file for post-mortems.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    /// Adopts a started child: it is killed when dropped, or by the watchdog.
    pub fn new(child: Child, log: PathBuf, name: impl Into<String>) -> Self {
        watchdog();
        CHILDREN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        Self {
            child,
            log,
            name: name.into(),
        }
    }

    pub fn spawn(name: &str, bin: &str, args: &[String], log_dir: &Path) -> Self {
        Self::spawn_env(name, bin, args, log_dir, &[])
    }

    /// Like [`Proc::spawn`], with extra environment variables.
    pub fn spawn_env(
        name: &str,
        bin: &str,
        args: &[String],
        log_dir: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin)
            .args(args)
            .envs(env.iter().copied())
            // Debug lines help a failing test's post-mortem; benchmarks ask for less.
            .env(
                "RUST_LOG",
                std::env::var("DMR_CHILD_LOG").unwrap_or_else(|_| "info,dmr=debug".into()),
            )
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Self::new(child, log, name)
    }

    /// Waits up to 30 s for `GET /readyz` on `addr` to answer 200, failing early if the
    /// process exits.
    pub fn wait_ready(&mut self, addr: SocketAddr) {
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if let Some((200, _)) = http_get(addr, "/readyz") {
                return;
            }
            assert!(
                self.is_running(),
                "{} exited:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{} not ready in 30 s:\n{}", self.name, self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} did not stop within 15 s of SIGTERM:\n{}",
            self.name,
            self.log_text()
        );
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let pid = self.child.id();
        CHILDREN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| *p != pid);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}", self.name, self.log_text());
        }
    }
}

/// Opens `n` connections to `addr` that say nothing and hold a place under a connection
/// cap. One accepted while an earlier request still held its place (given back just after
/// that connection closes) is refused with a 503 instead and holds nothing: it is replaced.
pub fn hold_idle_connections(addr: SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    let mut idle: Vec<std::net::TcpStream> = Vec::new();
    for _ in 0..5 * n {
        idle.retain(|s| !was_refused(s));
        if idle.len() == n {
            break;
        }
        idle.push(std::net::TcpStream::connect(addr).unwrap());
    }
    assert_eq!(idle.len(), n, "could not hold {n} idle connections");
    idle
}

/// Whether the peer answered `s` (on which nothing was sent) with a 503 (over its cap).
fn was_refused(s: &std::net::TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut first = [0u8; 12];
    matches!(s.peek(&mut first), Ok(n) if n > 0 && first[..n].starts_with(b"HTTP/1.1 503"))
}

/// Plain HTTP GET on loopback; returns status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http_call("GET", addr, path, None, &[])
}

pub fn http_call(
    method: &str,
    addr: SocketAddr,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Option<(u16, String)> {
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    let req = b
        .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
        .unwrap();
    smol::block_on(dmr::http::request(req, None, Duration::from_secs(40)))
        .ok()
        .map(|(s, b)| (s.as_u16(), String::from_utf8_lossy(&b).into_owned()))
}

/// A `dmr-server` on a free port.
pub struct Server {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Server {
    pub fn start(world: &World, name: &str, extra: &[&str]) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        Self::start_on(world, name, addr, extra)
    }

    pub fn start_on(world: &World, name: &str, addr: SocketAddr, extra: &[&str]) -> Self {
        let queue_settings = ["--delivery-limit", "--message-ttl"];
        if extra.iter().any(|f| queue_settings.contains(f)) {
            rabbitmq_setup(&world.prefix, extra);
        }
        let args = server_args(world, addr, extra);
        let mut s = Self {
            proc: Proc::spawn(name, SERVER_BIN, &args, world.dir.path()),
            addr,
        };
        s.wait_ready();
        s
    }

    pub fn wait_ready(&mut self) {
        self.proc.wait_ready(self.addr);
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    pub fn metric(&self, name: &str) -> f64 {
        scrape_metric(self.addr, name)
    }
}

/// `dmr-server run` arguments for `world` (its directory file and queue prefix) on `addr`.
pub fn server_args(world: &World, addr: SocketAddr, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "run".into(),
        "--listen".into(),
        addr.to_string(),
        "--amqp-url".into(),
        AMQP_URL.into(),
        "--agents-file".into(),
        world.agents_file().display().to_string(),
        "--queue-prefix".into(),
        world.prefix.clone(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `dmr-agent run` arguments: agent `id` with the key at `key`, on `servers` (comma-separated
/// URLs), its API on `listen`, delivering to `deliver` when given. Its state dir is
/// [`agent_state_dir`]: one per agent id and API port, beside the key, so agents never share
/// one and an agent restarted on its port finds its state again.
pub fn agent_args(
    id: &str,
    key: &Path,
    servers: &str,
    listen: SocketAddr,
    deliver: Option<String>,
) -> Vec<String> {
    let state = agent_state_dir(key, id, listen);
    agent_args_in(id, key, servers, listen, deliver, &state)
}

/// The state dir [`agent_args`] gives the agent `id` listening on `listen`.
pub fn agent_state_dir(key: &Path, id: &str, listen: SocketAddr) -> PathBuf {
    let dir = key.parent().unwrap_or(Path::new("."));
    dir.join(format!("state-{id}-{}", listen.port()))
}

/// [`agent_args`] with the state dir `state`.
pub fn agent_args_in(
    id: &str,
    key: &Path,
    servers: &str,
    listen: SocketAddr,
    deliver: Option<String>,
    state: &Path,
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "run".into(),
        "--state-dir".into(),
        state.display().to_string(),
        "--id".into(),
        id.into(),
        "--key".into(),
        key.display().to_string(),
        "--server".into(),
        servers.into(),
        "--listen".into(),
        listen.to_string(),
    ];
    if let Some(d) = deliver {
        args.extend(["--deliver-url".into(), d]);
    }
    args
}

/// Drops the `--state-dir` of `args` when `extra` brings its own (argh takes one only).
fn override_state_dir(args: &mut Vec<String>, extra: &[&str]) {
    if extra.contains(&"--state-dir") {
        if let Some(i) = args.iter().position(|a| a == "--state-dir") {
            args.drain(i..i + 2);
        }
    }
}

/// One metric of the process serving `/metrics` on `addr` (0 when absent or unreachable).
pub fn scrape_metric(addr: SocketAddr, name: &str) -> f64 {
    let text = http_get(addr, "/metrics").map(|r| r.1).unwrap_or_default();
    metric_value(&text, name)
}

/// Asserts that `answer` is `Accepted`.
pub fn expect_accepted(answer: &ServerFrame) {
    assert!(
        matches!(answer, ServerFrame::Accepted { .. }),
        "expected Accepted, got {answer:?}"
    );
}

/// Asserts that `answer` is `Rejected` with `want`; returns the reason.
pub fn expect_rejected(answer: &ServerFrame, want: dmr::protocol::RejectCode) -> String {
    match answer {
        ServerFrame::Rejected { code, reason, .. } if *code == want => reason.clone(),
        other => panic!("expected Rejected {want:?}, got {other:?}"),
    }
}

/// Sums every sample of a metric whose line starts with `name` (labels included in `name`).
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with([' ', '{']) || name.ends_with('}'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A protocol-level agent for tests: speaks frames directly, so tests can also misbehave.
pub struct TestClient {
    pub tx: async_tungstenite::WebSocketSender<dmr::transport::Stream>,
    pub rx: async_tungstenite::WebSocketReceiver<dmr::transport::Stream>,
    /// The directory `Welcome` carried, parsed and merged as agents do.
    pub directory: Vec<dmr::directory::Agent>,
    /// The documents themselves, as the server forwarded them.
    pub documents: Vec<dmr::protocol::DirectoryDocument>,
}

/// The agents of a `Welcome` or `Directory` frame's documents (file, then CentOps).
pub fn directory_of(documents: &[dmr::protocol::DirectoryDocument]) -> Vec<dmr::directory::Agent> {
    let parsed: Vec<_> = documents
        .iter()
        .map(|d| dmr::directory::parse(&d.json).expect("the server forwards a valid directory"))
        .collect();
    dmr::directory::Directory::merge(&parsed)
        .iter()
        .cloned()
        .collect()
}

/// How a connection attempt ended.
#[derive(Debug)]
pub enum Refused {
    Closed(String),
    Other(String),
}

impl TestClient {
    pub async fn open(url: &str) -> Self {
        let (host, port) = {
            let u: hyper::Uri = url.parse().unwrap();
            (u.host().unwrap().to_owned(), u.port_u16().unwrap())
        };
        let stream = dmr::transport::dial(&host, port, None).await.unwrap();
        let (ws, _) = async_tungstenite::client_async(url, stream).await.unwrap();
        let (tx, rx) = ws.split();
        Self {
            tx,
            rx,
            directory: vec![],
            documents: vec![],
        }
    }

    /// Connects and authenticates as `id` with `key`.
    pub async fn connect(url: &str, id: &AgentId, key: &SecretKey) -> Result<Self, Refused> {
        let mut c = Self::open(url).await;
        c.send(ClientFrame::Hello {
            version: PROTOCOL_VERSION,
            agent_id: id.clone(),
        })
        .await;
        let ServerFrame::Challenge {
            ephemeral_pk,
            nonce,
            ..
        } = c.recv().await?
        else {
            panic!("expected Challenge")
        };
        let mac = crypto::prove(
            key,
            id,
            &ephemeral_pk,
            &nonce,
            crypto::ChannelBinding::Unbound,
        )
        .unwrap();
        c.send(ClientFrame::Proof { mac }).await;
        match c.recv().await? {
            ServerFrame::Welcome { directory, .. } => {
                c.directory = directory_of(&directory);
                c.documents = directory;
                Ok(c)
            }
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    pub async fn send(&mut self, f: ClientFrame) {
        self.tx.send(Message::binary(f.encode())).await.unwrap();
    }

    pub async fn send_raw(&mut self, m: Message) -> bool {
        self.tx.send(m).await.is_ok()
    }

    /// Next server frame; a close frame becomes `Refused::Closed(reason)`.
    pub async fn recv(&mut self) -> Result<ServerFrame, Refused> {
        loop {
            match self.rx.next().await {
                Some(Ok(Message::Binary(b))) => {
                    return Ok(ServerFrame::decode(&b, 4 << 20).unwrap())
                }
                Some(Ok(Message::Close(c))) => {
                    return Err(Refused::Closed(
                        c.map(|c| c.reason.to_string()).unwrap_or_default(),
                    ))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(Refused::Other(e.to_string())),
                None => return Err(Refused::Other("closed".into())),
            }
        }
    }

    /// Next frame within `limit`, or None.
    pub async fn recv_within(&mut self, limit: Duration) -> Option<Result<ServerFrame, Refused>> {
        dmr::wait::with_timeout(limit, self.recv()).await
    }

    /// Waits for the answer (Accepted/Rejected) to `id`, skipping other frames.
    pub async fn answer_for(&mut self, id: MessageId) -> ServerFrame {
        loop {
            match self.recv_within(Duration::from_secs(15)).await {
                Some(Ok(f @ ServerFrame::Accepted { id: i })) if i == id => return f,
                Some(Ok(f @ ServerFrame::Rejected { id: i, .. })) if i == id => return f,
                Some(Ok(_)) => continue,
                other => panic!("no answer for {id}: {other:?}"),
            }
        }
    }

    /// Waits for the next `Deliver`.
    pub async fn next_delivery(&mut self, limit: Duration) -> Option<(u64, Envelope)> {
        let end = Instant::now() + limit;
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            match self.recv_within(left).await? {
                Ok(ServerFrame::Deliver { delivery, envelope }) => {
                    return Some((delivery, envelope))
                }
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }
}

/// Seals `payload` from `from` to `to` with a fresh id and the current time.
pub fn envelope(from: &Identity, to: &Identity, payload: &[u8]) -> Envelope {
    let header = Header {
        id: MessageId::random(),
        sender: from.id.clone(),
        recipient: to.id.clone(),
        created_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
        kind: Kind::chat_message(),
        seq: 0,
    };
    crypto::seal(&from.key, &to.key.public_key(), header, payload).unwrap()
}

/// A local service's webhook: records every POST body; can be told to fail.
#[derive(Clone)]
pub struct Webhook {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Answer 500 while true.
    pub failing: Arc<std::sync::atomic::AtomicBool>,
    /// While non-zero, the status every request is answered with (nothing recorded).
    pub answer: Arc<std::sync::atomic::AtomicU16>,
    pub attempts: Arc<std::sync::atomic::AtomicUsize>,
    _stop: Arc<async_channel::Sender<()>>,
}

impl Webhook {
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let answer = Arc::new(std::sync::atomic::AtomicU16::new(0));
        let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (stop_tx, stop_rx) = async_channel::bounded::<()>(1);
        let (r, f, a, s) = (
            received.clone(),
            failing.clone(),
            attempts.clone(),
            answer.clone(),
        );
        std::thread::spawn(move || {
            let listener = smol::net::TcpListener::try_from(listener).unwrap();
            smol::block_on(dmr::http::serve(
                listener,
                None,
                move |req: hyper::Request<hyper::body::Incoming>, _| {
                    let (r, f, a, s) = (r.clone(), f.clone(), a.clone(), s.clone());
                    async move {
                        // The answer is fixed when the attempt is counted: a test that sees
                        // the count go up may set the next answer at once.
                        let failing = f.load(std::sync::atomic::Ordering::SeqCst);
                        let status = s.load(std::sync::atomic::Ordering::SeqCst);
                        a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let body = dmr::http::read_body(req.into_body(), 8 << 20)
                            .await
                            .unwrap_or_default();
                        if failing {
                            return dmr::http::error(
                                hyper::StatusCode::INTERNAL_SERVER_ERROR,
                                "failing on purpose",
                            );
                        }
                        if let Ok(status) = hyper::StatusCode::from_u16(status) {
                            return dmr::http::error(status, "answering so on purpose");
                        }
                        r.lock()
                            .unwrap()
                            .push(serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null));
                        dmr::http::json(hyper::StatusCode::OK, &serde_json::json!({"ok": true}))
                    }
                },
                async move {
                    let _ = stop_rx.recv().await;
                },
            ));
        });
        Self {
            addr,
            received,
            failing,
            answer,
            attempts,
            _stop: Arc::new(stop_tx),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/deliver", self.addr)
    }

    pub fn bodies(&self) -> Vec<serde_json::Value> {
        self.received.lock().unwrap().clone()
    }
}

/// A `dmr-agent` process on a free port.
pub struct AgentProc {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl AgentProc {
    pub fn start(
        world: &World,
        id: &str,
        servers: &[&Server],
        deliver: Option<&Webhook>,
        extra: &[&str],
    ) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let servers: Vec<String> = servers.iter().map(|s| s.ws_url()).collect();
        Self::start_with(
            world,
            id,
            &servers.join(","),
            addr,
            deliver.map(|w| w.url()),
            extra,
        )
    }

    pub fn start_with(
        world: &World,
        id: &str,
        servers: &str,
        addr: SocketAddr,
        deliver: Option<String>,
        extra: &[&str],
    ) -> Self {
        let key = &world.agent(id).key_path;
        let mut args = agent_args(id, key, servers, addr, deliver);
        override_state_dir(&mut args, extra);
        args.extend(extra.iter().map(|s| s.to_string()));
        let name = format!("agent-{id}-{}", addr.port());
        let mut a = Self {
            proc: Proc::spawn(&name, AGENT_BIN, &args, world.dir.path()),
            addr,
        };
        a.wait_ready();
        a
    }

    pub fn wait_ready(&mut self) {
        self.proc.wait_ready(self.addr);
    }

    /// POSTs a message; returns the status and the parsed body.
    pub fn send(&self, recipient: &str, payload: serde_json::Value) -> (u16, serde_json::Value) {
        let body = serde_json::json!({ "recipientId": recipient, "payload": payload }).to_string();
        self.post("/v1/messages", &body, &[])
    }

    pub fn post(
        &self,
        path: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> (u16, serde_json::Value) {
        let (s, b) =
            http_call("POST", self.addr, path, Some(body), headers).expect("agent API unreachable");
        (
            s,
            serde_json::from_str(&b).unwrap_or(serde_json::Value::String(b)),
        )
    }

    pub fn metric(&self, name: &str) -> f64 {
        scrape_metric(self.addr, name)
    }
}
