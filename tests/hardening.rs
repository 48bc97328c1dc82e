//! Bounded resources before login and safe directory fetches (issue 10), against the real
//! `dmr-server` binary: what an unauthenticated peer can make the server hold, the caps on
//! connections and handshakes, a hostile or stalled CentOps, an empty directory, and how
//! many log lines a stream of refused logins can write.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dmr::protocol::{ClientFrame, PROTOCOL_VERSION};
use support::*;

const SECOND: Duration = Duration::from_secs(1);
const MIB: u64 = 1024 * 1024;

/// A field of /proc/PID/status in bytes (`VmRSS`, `VmHWM`: the peak RSS so far).
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Bytes received on loopback TCP sockets of local port `port` that their process has not
/// read yet (`rx_queue` in /proc/net/tcp).
fn unread_by(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let local_port = u16::from_str_radix(cols.get(1)?.rsplit(':').next()?, 16).ok()?;
            let rx = cols.get(4)?.split(':').nth(1)?;
            (local_port == port).then(|| u64::from_str_radix(rx, 16).ok())?
        })
        .sum()
}

/// Opens a TCP connection to `addr` and sends a WebSocket upgrade for /v1/ws; returns the
/// socket and the answer's status line.
fn raw_upgrade(addr: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(10 * SECOND)).unwrap();
    s.set_write_timeout(Some(20 * SECOND)).unwrap();
    write!(
        s,
        "GET /v1/ws HTTP/1.1\r\nhost: {addr}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    let head = read_head(&mut s);
    let status = head.lines().next().unwrap_or_default().to_owned();
    (s, status)
}

/// Reads an HTTP answer's head (up to the blank line), byte by byte so nothing after it is
/// consumed.
fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The header of a masked binary frame from a client announcing `len` payload bytes.
fn frame_header(len: u64) -> Vec<u8> {
    let mut h = vec![0x82, 0x80 | 127];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[1, 2, 3, 4]);
    h
}

/// `GET path` on a fresh connection that asks to be closed afterwards; the whole answer.
fn get_closing(addr: SocketAddr, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return String::new();
    };
    s.set_read_timeout(Some(5 * SECOND)).unwrap();
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    );
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn handshakes(server: &Server, result: &str) -> f64 {
    server.metric(&format!(
        "dmr_server_handshakes_total{{result=\"{result}\"}}"
    ))
}

fn refused(server: &Server, reason: &str) -> f64 {
    server.metric(&format!(
        "dmr_server_connections_refused_total{{reason=\"{reason}\"}}"
    ))
}

fn reloads(server: &Server, result: &str) -> f64 {
    server.metric(&format!(
        "dmr_server_directory_reloads_total{{result=\"{result}\"}}"
    ))
}

/// Logs `who` in with the protocol-level client; panics if refused.
fn logs_in(server: &Server, world: &World, who: &str) -> TestClient {
    let a = world.agent(who);
    smol::block_on(TestClient::connect(&server.ws_url(), &a.id, &a.key))
        .unwrap_or_else(|e| panic!("{who} could not log in: {e:?}"))
}

/// 100 unauthenticated sockets each send 1 MB of an unfinished frame before Hello. Before
/// the fix the server buffered all of it (up to the 1 MiB message limit each); now each
/// may read 8 KiB before login, so the server's peak memory barely moves, and a real agent
/// still logs in.
#[test]
fn unfinished_frames_before_login_cost_a_few_kib_each() {
    let world = World::new("hard-prelogin", &["alice", "bob"]);
    let server = Server::start(&world, "server", &["--handshake-timeout", "60"]);
    let pid = server.proc.child.id();
    let peak_before = proc_status_bytes(pid, "VmHWM");
    let mut sockets = Vec::new();
    for i in 0..100 {
        let (s, status) = raw_upgrade(server.addr);
        assert!(status.contains(" 101 "), "socket {i}: {status}");
        sockets.push(s);
    }
    let mut sent = 0u64;
    let chunk = vec![b'x'; 64 * 1024];
    for s in &mut sockets {
        // Announces 1 MiB (within the message limit), sends 960 KiB of it: never finished.
        let _ = s.write_all(&frame_header(MIB));
        for _ in 0..15 {
            match s.write_all(&chunk) {
                Ok(()) => sent += chunk.len() as u64,
                Err(_) => break,
            }
        }
    }
    eprintln!("wrote {} MiB in unfinished frames", sent / MIB);
    // The kernel may still hold what was written; wait until the server has read it (or
    // closed the sockets), so the memory below is what the server chose to keep.
    wait_until(
        30 * SECOND,
        "the server to read or drop what was sent",
        || unread_by(server.addr.port()) == 0,
    );
    let grew = proc_status_bytes(pid, "VmHWM").saturating_sub(peak_before);
    eprintln!(
        "peak RSS grew by {:.1} MiB (RSS now {:.1} MiB)",
        grew as f64 / MIB as f64,
        proc_status_bytes(pid, "VmRSS") as f64 / MIB as f64
    );
    assert!(
        grew < 30 * MIB,
        "the server's peak RSS grew by {} MiB for 100 unauthenticated sockets",
        grew / MIB
    );
    // Every one of them ends refused (its read budget gone), long before the deadline.
    wait_until(20 * SECOND, "all 100 refused before login", || {
        handshakes(&server, "malformed") >= 100.0
    });
    assert!(server.proc.log_text().contains("before login"));
    assert_eq!(server.metric("dmr_server_handshakes_in_progress"), 0.0);
    drop(sockets);
    // A real agent (its readiness means logged in), and a protocol-level one sending.
    let _bob = AgentProc::start(&world, "bob", &[&server], None, &[]);
    let mut alice = logs_in(&server, &world, "alice");
    let env = envelope(
        world.agent("alice"),
        world.agent("bob"),
        b"{\"after\":\"flood\"}",
    );
    let id = env.header().id;
    smol::block_on(async {
        alice.send(ClientFrame::Send { envelope: env }).await;
        expect_accepted(&alice.answer_for(id).await);
    });
}

/// Over --max-connections new connections get a 503 at once, HTTP endpoints included, and
/// are counted; once connections close, the server answers again.
#[test]
fn connections_over_the_cap_are_refused_and_counted() {
    let world = World::new("hard-conncap", &["alice"]);
    let server = Server::start(&world, "server", &["--max-connections", "4"]);
    assert!(get_closing(server.addr, "/healthz").starts_with("HTTP/1.1 200"));
    let idle = support::hold_idle_connections(server.addr, 4);
    let answer = get_closing(server.addr, "/healthz");
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("too many connections"),
        "with 4 idle connections: {answer:?}"
    );
    let (_, status) = raw_upgrade(server.addr);
    assert!(
        !status.contains(" 101 "),
        "upgraded over the cap: {status:?}"
    );
    drop(idle);
    wait_until(10 * SECOND, "the server to answer again", || {
        get_closing(server.addr, "/healthz").starts_with("HTTP/1.1 200")
    });
    assert!(refused(&server, "connections") >= 2.0);
    assert!(server
        .proc
        .log_text()
        .contains("refused a connection from 127.0.0.1"));
    drop(logs_in(&server, &world, "alice"));
}

/// Over --max-handshakes an upgrade gets 503 before it is answered; the ones in progress
/// are shown in a gauge, and a real agent logs in once they are gone.
#[test]
fn handshakes_over_the_cap_are_refused_and_counted() {
    let world = World::new("hard-hscap", &["alice"]);
    let server = Server::start(
        &world,
        "server",
        &["--max-handshakes", "3", "--handshake-timeout", "60"],
    );
    let pending: Vec<_> = (0..3)
        .map(|i| {
            let (s, status) = raw_upgrade(server.addr);
            assert!(status.contains(" 101 "), "handshake {i}: {status}");
            s
        })
        .collect();
    let (_, status) = raw_upgrade(server.addr);
    assert!(status.contains(" 503 "), "a 4th handshake: {status:?}");
    assert_eq!(refused(&server, "handshakes"), 1.0);
    assert_eq!(server.metric("dmr_server_handshakes_in_progress"), 3.0);
    // Health and metrics are not handshakes.
    assert_eq!(http_get(server.addr, "/healthz").map(|r| r.0), Some(200));
    drop(pending);
    wait_until(10 * SECOND, "the 3 abandoned handshakes to end", || {
        server.metric("dmr_server_handshakes_in_progress") == 0.0
    });
    drop(logs_in(&server, &world, "alice"));
}

/// What the fake CentOps answers.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Answer {
    /// The directory JSON set in `Centops::body`.
    Good,
    /// 200 and no length, then body bytes until the client stops reading.
    Endless,
    /// 200 with `Content-Length: 768 MiB`, then nothing.
    Announced,
    /// Reads the request and never answers.
    Stall,
}

/// A tiny CentOps on loopback (raw HTTP/1.1, one request per connection).
struct Centops {
    addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    body: Arc<Mutex<String>>,
    /// Connections answered `Stall`, kept open.
    stalled: Arc<Mutex<Vec<TcpStream>>>,
    /// Bytes of `Endless` bodies written.
    streamed: Arc<AtomicUsize>,
}

impl Centops {
    fn start(answer: Answer, body: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = Self {
            addr: listener.local_addr().unwrap(),
            answer: Arc::new(Mutex::new(answer)),
            body: Arc::new(Mutex::new(body)),
            stalled: Arc::default(),
            streamed: Arc::default(),
        };
        let (answer, body, stalled, streamed) = (
            c.answer.clone(),
            c.body.clone(),
            c.stalled.clone(),
            c.streamed.clone(),
        );
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { continue };
                let (answer, body) = (*answer.lock().unwrap(), body.lock().unwrap().clone());
                let (stalled, streamed) = (stalled.clone(), streamed.clone());
                std::thread::spawn(move || {
                    let _ = s.set_write_timeout(Some(20 * SECOND));
                    read_head(&mut s);
                    let _ = serve_centops(&mut s, answer, &body, &streamed);
                    if answer == Answer::Stall {
                        stalled.lock().unwrap().push(s);
                    }
                });
            }
        });
        c
    }

    fn url(&self) -> String {
        format!("http://{}/agents", self.addr)
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }
}

fn serve_centops(
    s: &mut TcpStream,
    answer: Answer,
    body: &str,
    streamed: &AtomicUsize,
) -> std::io::Result<()> {
    match answer {
        Answer::Good => write!(
            s,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        ),
        Answer::Announced => s.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
              content-length: 805306368\r\n\r\n[",
        ),
        Answer::Endless => {
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n[")?;
            let chunk = vec![b' '; 64 * 1024];
            for _ in 0..(200 * MIB as usize / chunk.len()) {
                s.write_all(&chunk)?;
                streamed.fetch_add(chunk.len(), Ordering::SeqCst);
            }
            Ok(())
        }
        Answer::Stall => Ok(()),
    }
}

fn centops_json(world: &World, ids: &[&str]) -> String {
    let list: Vec<_> = ids
        .iter()
        .map(|id| {
            serde_json::json!({
                "id": id, "name": format!("Agency {id}"),
                "authentication_certificate": world.agent(id).key.public_key().to_pem(),
            })
        })
        .collect();
    serde_json::json!({ "response": list }).to_string()
}

/// A CentOps answering with a body far over --centops-max-bytes (streamed without a
/// length, or announced by Content-Length) is refused naming the flag; the server keeps
/// its directory and its memory stays bounded.
#[test]
fn a_huge_centops_answer_is_refused_and_memory_stays_bounded() {
    let world = World::new("hard-centops-huge", &["alice", "bob", "carol"]);
    let centops = Centops::start(Answer::Good, centops_json(&world, &["carol"]));
    world.write_directory(&[("alice".into(), world.agent("alice").key.public_key())]);
    let flags = [
        "--centops-url",
        &centops.url(),
        "--centops-interval",
        "1",
        "--centops-max-bytes",
        "1048576",
    ];
    let server = Server::start(&world, "server", &flags);
    wait_until(10 * SECOND, "carol from CentOps", || {
        server.metric("dmr_server_directory_agents") == 2.0
    });
    let pid = server.proc.child.id();
    let peak_before = proc_status_bytes(pid, "VmHWM");
    centops.set(Answer::Endless);
    wait_until(30 * SECOND, "three endless answers refused", || {
        reloads(&server, "error") >= 3.0
    });
    let grew = proc_status_bytes(pid, "VmHWM").saturating_sub(peak_before);
    eprintln!(
        "CentOps streamed {} MiB; peak RSS grew by {:.1} MiB",
        centops.streamed.load(Ordering::SeqCst) as u64 / MIB,
        grew as f64 / MIB as f64
    );
    assert!(grew < 30 * MIB, "peak RSS grew by {} MiB", grew / MIB);
    centops.set(Answer::Announced);
    let errors = reloads(&server, "error");
    wait_until(15 * SECOND, "an announced 768 MiB answer refused", || {
        reloads(&server, "error") >= errors + 2.0
    });
    let log = server.proc.log_text();
    assert!(
        log.contains("over 1048576 bytes (--centops-max-bytes)")
            && log.contains(&format!("CentOps directory from {}", centops.url())),
        "{log}"
    );
    assert!(log.contains("plain http://"), "no warning about http://");
    assert_eq!(server.metric("dmr_server_directory_agents"), 2.0);
    drop(logs_in(&server, &world, "alice"));
    drop(logs_in(&server, &world, "carol"));
}

/// A CentOps that never answers does not hold back the agents file: the server is ready
/// with the file's agents while the CentOps request is still open.
#[test]
fn a_stalled_centops_does_not_delay_the_agents_file() {
    let world = World::new("hard-centops-stall", &["alice"]);
    let centops = Centops::start(Answer::Stall, String::new());
    let server = Server::start(&world, "server", &["--centops-url", &centops.url()]);
    drop(logs_in(&server, &world, "alice"));
    wait_until(10 * SECOND, "the server to ask CentOps", || {
        !centops.stalled.lock().unwrap().is_empty()
    });
    let mut stalled = centops.stalled.lock().unwrap();
    let s = &mut stalled[0];
    s.set_nonblocking(true).unwrap();
    let still_open = matches!(s.read(&mut [0u8; 16]), Err(e) if e.kind() == ErrorKind::WouldBlock);
    assert!(
        still_open,
        "the server was ready only after giving up on CentOps"
    );
}

/// An http:// CentOps off loopback is refused at start, naming the way out; the address
/// is never contacted (start-up stops first).
#[test]
fn plain_http_centops_off_loopback_is_refused_at_start() {
    let world = World::new("hard-centops-http", &["alice"]);
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    for url in [
        "http://192.0.2.1/agents",
        "http://[2001:db8::1]:8080/agents",
    ] {
        let args = server_args(&world, addr, &["--centops-url", url]);
        let mut p = Proc::spawn("server-insecure", SERVER_BIN, &args, world.dir.path());
        wait_until(10 * SECOND, "the server to refuse to start", || {
            !p.is_running()
        });
        let status = p.child.wait().unwrap();
        let log = p.log_text();
        assert!(!status.success(), "{url}: {log}");
        assert!(
            log.contains("--centops-url")
                && log.contains("https://")
                && log.contains("--allow-insecure-centops"),
            "{url}: {log}"
        );
    }
    // A CA file for an http:// URL is a mistake, not silently ignored.
    let ca = world.dir.path().join("ca.crt");
    let args = server_args(
        &world,
        addr,
        &[
            "--centops-url",
            "http://127.0.0.1:1/agents",
            "--centops-ca-file",
            ca.to_str().unwrap(),
        ],
    );
    let mut p = Proc::spawn("server-ca-http", SERVER_BIN, &args, world.dir.path());
    wait_until(10 * SECOND, "the server to refuse to start", || {
        !p.is_running()
    });
    assert!(
        p.log_text().contains("--centops-ca-file"),
        "{}",
        p.log_text()
    );
}

/// An empty directory, from the file or from CentOps, is refused like a malformed one:
/// the last good directory stays and connected agents stay connected. With
/// --allow-empty-directory it is taken.
#[test]
fn an_empty_directory_is_refused_unless_allowed() {
    let world = World::new("hard-empty", &["alice", "bob"]);
    let centops = Centops::start(Answer::Good, centops_json(&world, &["bob"]));
    let flags = ["--centops-url", &centops.url(), "--centops-interval", "1"];
    let server = Server::start(&world, "server", &flags);
    let mut alice = logs_in(&server, &world, "alice");
    let errors = reloads(&server, "error");
    std::fs::write(world.agents_file(), "[]").unwrap();
    *centops.body.lock().unwrap() = "{\"response\": []}".into();
    wait_until(10 * SECOND, "both empty directories refused", || {
        let log = server.proc.log_text();
        log.contains(&format!(
            "--agents-file refused, keeping the last good directory: {}: the directory lists no agents",
            world.agents_file().display()
        )) && log.contains(&format!("CentOps directory from {} refused", centops.url()))
            && reloads(&server, "error") >= errors + 2.0
    });
    assert!(server.proc.log_text().contains("--allow-empty-directory"));
    assert_eq!(server.metric("dmr_server_directory_agents"), 2.0);
    let env = envelope(world.agent("alice"), world.agent("bob"), b"{\"still\":1}");
    let id = env.header().id;
    smol::block_on(async {
        alice.send(ClientFrame::Send { envelope: env }).await;
        expect_accepted(&alice.answer_for(id).await);
    });
    drop(alice);

    // Allowed: the empty file is taken (CentOps still lists bob).
    let world2 = World::new("hard-empty-ok", &["alice"]);
    std::fs::write(world2.agents_file(), "[]").unwrap();
    let mut p = Proc::spawn(
        "server-empty-ok",
        SERVER_BIN,
        &server_args(
            &world2,
            format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            &["--allow-empty-directory"],
        ),
        world2.dir.path(),
    );
    wait_until(10 * SECOND, "the empty directory taken", || {
        p.log_text().contains("directory: 0 agents")
    });
    assert!(p.is_running());
}

/// 50 refused logins from one address write one log line, not 50; every refusal is still
/// counted, and the next line (after the interval) says how many were left out.
#[test]
fn refused_logins_are_logged_once_per_interval() {
    let world = World::new("hard-loglimit", &["alice"]);
    let server = Server::start(&world, "server", &[]);
    let url = server.ws_url();
    let stranger = dmr::protocol::AgentId::new("stranger").unwrap();
    let try_login = || {
        smol::block_on(async {
            let mut c = TestClient::open(&url).await;
            c.send(ClientFrame::Hello {
                version: PROTOCOL_VERSION,
                agent_id: stranger.clone(),
            })
            .await;
            assert!(c.recv().await.is_err(), "a stranger was let in");
        })
    };
    for _ in 0..50 {
        try_login();
    }
    let lines = |log: &str| {
        log.lines()
            .filter(|l| l.contains("refused connection from 127.0.0.1"))
            .count()
    };
    assert_eq!(handshakes(&server, "unknown_agent"), 50.0);
    assert_eq!(
        lines(&server.proc.log_text()),
        1,
        "{}",
        server.proc.log_text()
    );
    wait_until(20 * SECOND, "a second line after the interval", || {
        try_login();
        lines(&server.proc.log_text()) >= 2
    });
    let log = server.proc.log_text();
    let second = log
        .lines()
        .filter(|l| l.contains("refused connection from 127.0.0.1"))
        .nth(1)
        .unwrap();
    let left_out: u64 = second
        .split(" (")
        .last()
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {second:?}"));
    assert!(left_out >= 49, "{second}");
}
