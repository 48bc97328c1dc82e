//! Issue 10, the agent's half: a local API that web pages cannot drive, and key files.
//!
//! A page in a browser on the agent's machine can POST `text/plain` to any address without
//! a CORS preflight, and through DNS rebinding can send with a name of its choosing as
//! `Host`. These tests drive the real `dmr-agent` binary with what such a page can send
//! and check that nothing leaves the agent; then they check the refusal to listen off
//! loopback without a token, key file permissions, `keygen` against planted symlinks, and
//! that config `Debug` output never shows a secret.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use support::{
    agent_args, free_port, http_get, wait_until, write_private_key, AgentProc, Proc, Server,
    Webhook, World, AGENT_BIN,
};

const SECOND: Duration = Duration::from_secs(1);

/// One HTTP/1.1 request on a fresh connection with exactly the headers given (`Host`
/// included, when given); returns the status and the body as JSON (a string if not JSON).
fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(20 * SECOND)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let value = serde_json::from_str(body).unwrap_or(Value::String(body.to_owned()));
    (status, value)
}

fn message(marker: &str) -> String {
    json!({"recipientId": "bob", "payload": {"marker": marker}}).to_string()
}

fn error_of(v: &Value) -> String {
    v["error"].as_str().unwrap_or_default().to_owned()
}

/// What a page can send: `text/plain` (no preflight) and foreign `Host` names are refused,
/// and none of it is sent; JSON with the API's own names goes through.
#[test]
fn requests_a_web_page_can_make_are_refused_and_nothing_is_sent() {
    let world = World::new("hardening-page", &["alice", "bob"]);
    let server = Server::start(&world, "server", &[]);
    let hook = Webhook::start();
    let _bob = AgentProc::start(&world, "bob", &[&server], Some(&hook), &[]);
    let alice = AgentProc::start(&world, "alice", &[&server], None, &[]);
    let (addr, port) = (alice.addr, alice.addr.port());
    let own = addr.to_string();
    let evil = format!("evil.example:{port}");
    let origin = ("origin", "https://evil.example");

    // The finding: text/plain from a foreign page with its own Host.
    let (status, v) = raw(
        addr,
        "POST",
        "/v1/messages",
        &[("host", &evil), origin, ("content-type", "text/plain")],
        &message("refused-1"),
    );
    assert_eq!(status, 421, "{v}");
    assert!(error_of(&v).contains("Host"), "{v}");
    // Right Host, but a body type a page can send without a preflight.
    for ct in [
        Some("text/plain"),
        Some("text/plain;charset=UTF-8"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/jsonx"),
        None,
    ] {
        let mut headers = vec![("host", own.as_str()), origin];
        headers.extend(ct.map(|c| ("content-type", c)));
        let (status, v) = raw(
            addr,
            "POST",
            "/v1/messages",
            &headers,
            &message("refused-2"),
        );
        assert_eq!(status, 415, "{ct:?}: {v}");
        assert!(error_of(&v).contains("application/json"), "{v}");
    }
    // JSON, but a name the API does not answer to (DNS rebinding), on every /v1 endpoint.
    let json_ct = ("content-type", "application/json");
    for host in [
        evil.as_str(),
        "evil.example",
        "localhost:1",
        "127.0.0.1.nip.io:80",
    ] {
        let (status, v) = raw(
            addr,
            "POST",
            "/v1/messages",
            &[("host", host), json_ct],
            &message("refused-3"),
        );
        assert_eq!(status, 421, "{host}: {v}");
    }
    let (status, _) = raw(
        addr,
        "POST",
        "/v1/messages",
        &[json_ct],
        &message("refused-4"),
    );
    assert_eq!(status, 421, "a request without Host");
    for path in ["/v1/agents", "/v1/health", "/v1/nope"] {
        let (status, v) = raw(addr, "GET", path, &[("host", &evil)], "");
        assert_eq!(status, 421, "{path}: {v}");
    }
    // Probes keep answering whatever name reaches them.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, v) = raw(addr, "GET", path, &[("host", &evil)], "");
        assert_eq!(status, 200, "{path}: {v}");
    }

    // The API's own names, with or without parameters on the media type.
    let mut accepted = Vec::new();
    for (host, ct) in [
        (own.clone(), "application/json"),
        (
            format!("localhost:{port}"),
            "application/json; charset=utf-8",
        ),
        (format!("LocalHost:{port}"), "Application/JSON"),
        (
            format!("127.0.0.1:{port}"),
            "application/json;charset=UTF-8",
        ),
    ] {
        let (status, v) = raw(
            addr,
            "POST",
            "/v1/messages",
            &[("host", &host), ("content-type", ct)],
            &message(&format!("accepted-{}", accepted.len())),
        );
        assert_eq!(status, 202, "{host} {ct}: {v}");
        accepted.push(v["id"].as_str().unwrap().to_owned());
    }
    wait_until(20 * SECOND, "the accepted messages at B", || {
        hook.bodies().len() >= accepted.len()
    });
    let delivered: Vec<String> = hook
        .bodies()
        .iter()
        .map(|b| {
            b["payload"]["marker"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert!(
        delivered.iter().all(|m| m.starts_with("accepted-")),
        "a refused request was delivered: {delivered:?}"
    );
    assert_eq!(delivered.len(), accepted.len(), "{delivered:?}");
    assert_eq!(alice.metric("dmr_agent_sent_total"), accepted.len() as f64);
}

/// A request's name, headers, body and the status it must get.
type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str, u16);

/// 421 before 401 before 415 before 400, and `--api-host` names (here from DMR_API_HOST,
/// comma-separated) accepted:
/// `NAME` on any port, `NAME:PORT` on that port only.
#[test]
fn refusals_come_in_order_and_api_host_names_are_accepted() {
    let world = World::new("hardening-order", &["alice", "bob"]);
    let server = Server::start(&world, "server", &[]);
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let args = agent_args(
        "alice",
        &world.agent("alice").key_path,
        &server.ws_url(),
        addr,
        None,
    );
    let log = world.dir.path().join("alice.log");
    let child = Command::new(AGENT_BIN)
        .args(&args)
        .env("DMR_API_TOKEN", "hardening-token")
        .env(
            "DMR_API_HOST",
            "agent.internal,proxy.example:443, [fd00::1]:8080",
        )
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut proc = Proc::new(child, log, "alice");
    proc.wait_ready(addr);

    let own = addr.to_string();
    let evil = format!("evil.example:{}", addr.port());
    let bearer = ("authorization", "Bearer hardening-token");
    let (plain, json_ct) = (
        ("content-type", "text/plain"),
        ("content-type", "application/json"),
    );
    let cases: [Case; 5] = [
        (
            "foreign Host, no token, text/plain",
            vec![("host", evil.as_str()), plain],
            "{",
            421,
        ),
        (
            "no token, text/plain",
            vec![("host", own.as_str()), plain],
            "{",
            401,
        ),
        (
            "token, text/plain",
            vec![("host", own.as_str()), bearer, plain],
            "{",
            415,
        ),
        (
            "token, JSON, bad body",
            vec![("host", own.as_str()), bearer, json_ct],
            "{",
            400,
        ),
        (
            "no token, JSON",
            vec![("host", own.as_str()), json_ct],
            "{}",
            401,
        ),
    ];
    for (name, headers, body, want) in &cases {
        let (status, v) = raw(addr, "POST", "/v1/messages", headers, body);
        assert_eq!(status, *want, "{name}: {v}");
        assert!(!error_of(&v).is_empty(), "{name}: a JSON error: {v}");
    }

    let port = addr.port();
    let get = |host: &str| raw(addr, "GET", "/v1/agents", &[("host", host), bearer], "").0;
    for ok in [
        format!("agent.internal:{port}"),
        "agent.internal:18077".into(),
        "AGENT.internal".into(),
        "proxy.example:443".into(),
        "[fd00::1]:8080".into(),
    ] {
        assert_eq!(get(&ok), 200, "{ok}");
    }
    for refused in [
        format!("proxy.example:{port}"),
        "proxy.example".into(),
        format!("[fd00::1]:{port}"),
        format!("agent.internal.evil.example:{port}"),
    ] {
        assert_eq!(get(&refused), 421, "{refused}");
    }
    let (status, v) = raw(
        addr,
        "POST",
        "/v1/messages",
        &[("host", "agent.internal"), bearer, json_ct],
        &message("via-api-host"),
    );
    assert_eq!(status, 202, "{v}");
    assert!(
        !proc.log_text().contains("hardening-token"),
        "the token reached the log"
    );
}

fn run_agent(args: &[String]) -> (bool, String) {
    let out = Command::new(AGENT_BIN)
        .args(args)
        .env_remove("DMR_API_TOKEN")
        .env_remove("DMR_ALLOW_NO_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.success(), text)
}

/// Off loopback without a token the agent does not start unless told; told, it starts,
/// warns, and still refuses foreign `Host` names.
#[test]
fn listening_off_loopback_needs_a_token_or_allow_no_token() {
    let world = World::new("hardening-exposed", &["alice"]);
    let key = &world.agent("alice").key_path;
    let args = agent_args(
        "alice",
        key,
        "ws://127.0.0.1:9/v1/ws",
        "0.0.0.0:0".parse().unwrap(),
        None,
    );
    let (ok, text) = run_agent(&args);
    assert!(!ok, "started off loopback without a token:\n{text}");
    for word in ["0.0.0.0:0", "--api-token", "--allow-no-token"] {
        assert!(text.contains(word), "the error should name {word}:\n{text}");
    }

    let port = free_port();
    let args = agent_args(
        "alice",
        key,
        "ws://127.0.0.1:9/v1/ws",
        format!("0.0.0.0:{port}").parse().unwrap(),
        None,
    );
    let mut allowed = args.clone();
    allowed.push("--allow-no-token".into());
    let agent = Proc::spawn("alice-exposed", AGENT_BIN, &allowed, world.dir.path());
    let local: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_until(20 * SECOND, "the agent's /healthz", || {
        http_get(local, "/healthz").is_some_and(|r| r.0 == 200)
    });
    wait_until(10 * SECOND, "the warning", || {
        agent.log_text().contains("--allow-no-token")
    });
    let (status, _) = raw(
        local,
        "GET",
        "/v1/health",
        &[("host", &format!("localhost:{port}"))],
        "",
    );
    assert_eq!(status, 200);
    let (status, _) = raw(
        local,
        "GET",
        "/v1/health",
        &[("host", &format!("10.1.2.3:{port}"))],
        "",
    );
    assert_eq!(status, 421, "an address not given with --api-host");
    drop(agent);
    // The machine's own address must be named with --api-host (the flag, this time).
    allowed.extend(["--api-host".into(), format!("10.1.2.3:{port}")]);
    let _agent = Proc::spawn("alice-exposed-2", AGENT_BIN, &allowed, world.dir.path());
    wait_until(20 * SECOND, "the agent's /healthz", || {
        http_get(local, "/healthz").is_some_and(|r| r.0 == 200)
    });
    let (status, _) = raw(
        local,
        "GET",
        "/v1/health",
        &[("host", &format!("10.1.2.3:{port}"))],
        "",
    );
    assert_eq!(status, 200, "an address given with --api-host");
}

/// A private key others can read is refused, naming the file and the fix.
#[test]
fn a_key_file_open_to_others_is_refused() {
    let world = World::new("hardening-keymode", &["alice"]);
    let key = world.agent("alice").key_path.clone();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let args = agent_args("alice", &key, "ws://127.0.0.1:9/v1/ws", listen, None);
    for mode in [0o644, 0o640, 0o604] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let (ok, text) = run_agent(&args);
        assert!(!ok, "started with a {mode:o} key file");
        assert!(
            text.contains(&key.display().to_string()) && text.contains("chmod 600"),
            "mode {mode:o}: the error should name the file and chmod 600:\n{text}"
        );
        let pem = world.agent("alice").key.to_pem();
        let line = pem.lines().nth(1).unwrap();
        assert!(!text.contains(line), "the key was quoted");
    }
}

fn keygen(args: &[&str]) -> (bool, String) {
    let out = Command::new(AGENT_BIN)
        .arg("keygen")
        .args(args)
        .env_remove("DMR_OUT")
        .env_remove("DMR_FORCE")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.success(), text)
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// `keygen` never writes through a planted symlink; `--force` replaces the link itself,
/// and keeps a previous key file as `.key.old` (0600).
#[test]
fn keygen_never_follows_a_symlink_and_force_keeps_the_old_key() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("police");
    let p = prefix.to_str().unwrap();
    let (key, public, old) = (
        dir.path().join("police.key"),
        dir.path().join("police.pub"),
        dir.path().join("police.key.old"),
    );
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    std::os::unix::fs::symlink(&victim, &key).unwrap();
    let (ok, text) = keygen(&["--out", p]);
    assert!(!ok && text.contains("--force"), "{text}");
    // A dangling link is refused as well: creating through it would make its target.
    let dangling = dir.path().join("dangling");
    std::fs::remove_file(&key).unwrap();
    std::os::unix::fs::symlink(&dangling, &key).unwrap();
    let (ok, text) = keygen(&["--out", p]);
    assert!(!ok, "{text}");
    assert!(!dangling.exists(), "keygen created the link's target");

    // --force removes the links themselves, never writes through them.
    std::fs::remove_file(&key).unwrap();
    std::os::unix::fs::symlink(&victim, &key).unwrap();
    std::os::unix::fs::symlink(&victim, &public).unwrap();
    let (ok, text) = keygen(&["--out", p, "--force"]);
    assert!(ok, "{text}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    for f in [&key, &public] {
        assert!(
            std::fs::symlink_metadata(f).unwrap().is_file(),
            "{f:?} is still a link"
        );
    }
    assert_eq!(mode(&key), 0o600);
    assert!(!old.exists(), "a link is not a key to keep");
    let first = std::fs::read_to_string(&key).unwrap();
    dmr::crypto::SecretKey::from_pem(&first).unwrap();

    // Rotation: the previous key stays as .key.old, private even if it was not.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, text) = keygen(&["--out", p, "--force"]);
    assert!(ok && text.contains("police.key.old"), "{text}");
    assert_eq!(std::fs::read_to_string(&old).unwrap(), first);
    assert_eq!(mode(&old), 0o600);
    assert_eq!(mode(&key), 0o600);
    assert_ne!(std::fs::read_to_string(&key).unwrap(), first);
    // A link planted at .key.old is replaced, not written through.
    std::fs::remove_file(&old).unwrap();
    std::os::unix::fs::symlink(&victim, &old).unwrap();
    let second = std::fs::read_to_string(&key).unwrap();
    let (ok, text) = keygen(&["--out", p, "--force"]);
    assert!(ok, "{text}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert!(std::fs::symlink_metadata(&old).unwrap().is_file());
    assert_eq!(std::fs::read_to_string(&old).unwrap(), second);
}

/// `Debug` of every config struct hides the API token and AMQP passwords.
#[test]
fn config_debug_output_hides_secrets() {
    use dmr::config::{AgentCli, AgentCommand, ServerCli, ServerCommand};
    let token = "tok-3b9f7a1c";
    let password = "pw-5e2d8c4f";
    let agent: AgentCli = dmr::config::parse(
        "dmr-agent",
        [
            "run",
            "--id",
            "alice",
            "--key",
            "/k",
            "--server",
            "ws://127.0.0.1:1/v1/ws",
            "--api-token",
            token,
        ]
        .map(String::from)
        .to_vec(),
        &[],
        |_| None,
    );
    let shown = format!("{agent:?}");
    assert!(!shown.contains(token), "{shown}");
    let AgentCommand::Run(args) = agent.command else {
        panic!("expected run");
    };
    let config = dmr::agent::AgentConfig::from_args(args.clone()).unwrap();
    assert_eq!(config.api_token.as_ref().map(|t| t.expose()), Some(token));
    for shown in [
        format!("{args:?}"),
        format!("{config:?}"),
        format!("{config:#?}"),
    ] {
        assert!(!shown.contains(token), "{shown}");
        assert!(shown.contains("***"), "{shown}");
    }

    let urls = format!("amqp://dmr:{password}@rabbit-1:5672/%2f,amqps://dmr:{password}@rabbit-2/v");
    let server: ServerCli = dmr::config::parse(
        "dmr-server",
        vec!["run".into(), "--amqp-url".into(), urls.clone()],
        &[],
        |_| None,
    );
    let shown = format!("{server:?}");
    assert!(!shown.contains(password), "{shown}");
    assert!(
        shown.contains("amqp://dmr:***@rabbit-1:5672/%2f")
            && shown.contains("amqps://dmr:***@rabbit-2/v"),
        "{shown}"
    );
    let ServerCommand::Run(args) = server.command else {
        panic!("expected run");
    };
    assert_eq!(
        args.amqp_url.expose(),
        &urls,
        "the real value is kept for use"
    );
}

/// The key file a test writes through the harness is private, as the agent requires.
#[test]
fn the_harness_writes_private_keys() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k.key");
    write_private_key(&p, "x");
    assert_eq!(mode(&p), 0o600);
}

/// Over --max-api-connections the local API answers 503 at once instead of holding another
/// connection; once connections close it answers again.
#[test]
fn api_connections_over_the_cap_get_503() {
    let world = World::new("hardening-apicap", &["alice"]);
    let server = Server::start(&world, "server", &[]);
    let alice = AgentProc::start(
        &world,
        "alice",
        &[&server],
        None,
        &["--max-api-connections", "3"],
    );
    assert_eq!(raw(alice.addr, "GET", "/healthz", &[], "").0, 200);
    let idle = support::hold_idle_connections(alice.addr, 3);
    let (status, _) = raw(alice.addr, "GET", "/healthz", &[], "");
    assert_eq!(status, 503, "with 3 idle connections held");
    drop(idle);
    wait_until(10 * SECOND, "the API to answer again", || {
        http_get(alice.addr, "/healthz").is_some_and(|r| r.0 == 200)
    });
}
