//! Key authenticity and the agent's state dir, end to end: real `dmr-server` and `dmr-agent`
//! binaries, real RabbitMQ, and a directory that changes underneath running agents.
//!
//! - Pinning (no `--directory-key`): a substituted key is not used — sends get 409, an
//!   envelope sealed with the substitute is dead-lettered — until `dmr-agent trust confirm`
//!   (through the drop-box, while the agent runs).
//! - Signed directories: an openssl-signed directory is accepted; one changed after signing,
//!   or signed by another key, is refused and the last good one stays in force.
//! - The replay guard on disk: a delivery recorded just before a crash, or a replayed
//!   envelope after a restart, never reaches the local service twice.
//! - One owner per state dir; a damaged store is named.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use dmr::crypto::SecretKey;
use dmr::protocol::ClientFrame;
use support::{
    agent_args, agent_args_in, agent_state_dir, envelope, expect_accepted, free_port, http_get,
    peek_queue, wait_until, AgentProc, Identity, Proc, Server, TestClient, Webhook, World,
    AGENT_BIN,
};

const LIMIT: Duration = Duration::from_secs(30);

fn loopback() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// `GET /v1/agents` of `agent`, as JSON.
fn agents(agent: &AgentProc) -> Vec<Value> {
    let (status, body) = http_get(agent.addr, "/v1/agents").expect("agent API unreachable");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Vec<Value>>(&body).unwrap()
}

fn entry(agent: &AgentProc, id: &str) -> Option<Value> {
    agents(agent).into_iter().find(|e| e["id"] == id)
}

/// Runs `dmr-agent` with `args` until it exits (at most 20 s); its status and stderr.
fn run_to_exit(args: &[String]) -> (bool, String) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(AGENT_BIN)
        .args(args)
        .env_remove("DMR_STATE_DIR")
        .env_remove("STATE_DIRECTORY")
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!(
                "dmr-agent {args:?} still runs after 20 s:\n{}",
                std::fs::read_to_string(log.path()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(log.path()).unwrap_or_default();
    (status.success(), text)
}

/// `dmr-agent trust confirm` for `id` in `state_dir`; its stdout.
fn trust_confirm(state_dir: &Path, id: &str) -> String {
    let out = Command::new(AGENT_BIN)
        .args(["trust", "confirm", "--state-dir"])
        .arg(state_dir)
        .args(["--id", id])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "trust confirm failed: {text}");
    text
}

#[test]
fn a_substituted_key_is_not_used_until_an_operator_confirms_it() {
    let world = World::new("trust-pin", &["a", "b"]);
    let server = Server::start(&world, "server", &[]);
    let hook = Webhook::start();
    let mut a = AgentProc::start(&world, "a", &[&server], Some(&hook), &[]);
    let a_state = agent_state_dir(&world.agent("a").key_path, "a", a.addr);
    // First sight pins b's key; sending works.
    let (status, body) = a.send("b", json!({"n": 1}));
    assert_eq!(status, 202, "{body}");
    assert_eq!(entry(&a, "b").unwrap().get("keyChanged"), None);

    // Whoever controls the directory substitutes b's key with one it holds.
    let mallory = Identity {
        id: world.agent("b").id.clone(),
        key: SecretKey::generate().unwrap(),
        key_path: PathBuf::from("unused"),
    };
    world.write_directory(&[
        ("a".into(), world.agent("a").key.public_key()),
        ("b".into(), mallory.key.public_key()),
    ]);
    wait_until(LIMIT, "keyChanged for b", || {
        entry(&a, "b").is_some_and(|e| e["keyChanged"] == true)
    });
    let (status, body) = a.send("b", json!({"n": 2}));
    assert_eq!(status, 409, "{body}");
    let error = body["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("key of agent b changed")
            && error.contains("dmr-agent trust confirm")
            && error.contains(&a_state.display().to_string()),
        "{error}"
    );
    assert_eq!(a.metric("dmr_agent_key_changes"), 1.0);
    assert!(
        a.proc.log_text().contains("KEY CHANGED"),
        "{}",
        a.proc.log_text()
    );

    // An envelope only the substituted key could have sealed is dead-lettered, not delivered.
    let forged = envelope(&mallory, world.agent("a"), br#"{"from":"mallory"}"#);
    let forged_mid = forged.header().id;
    let forged_id = forged_mid.to_string();
    smol::block_on(async {
        let mut m = TestClient::connect(&server.ws_url(), &mallory.id, &mallory.key)
            .await
            .expect("the server takes the substituted key");
        m.send(ClientFrame::Send { envelope: forged }).await;
        expect_accepted(&m.answer_for(forged_mid).await);
    });
    let mut dead = Vec::new();
    wait_until(LIMIT, "the forged envelope in the DLQ", || {
        dead = peek_queue(&world.dlq(), 10, Duration::from_millis(500));
        dead.iter()
            .any(|m| m.message_id.as_deref() == Some(forged_id.as_str()))
    });
    let reason = &dead
        .iter()
        .find(|m| m.message_id.as_deref() == Some(forged_id.as_str()))
        .unwrap()
        .headers;
    assert!(
        reason.contains("key changed") && reason.contains("not confirmed"),
        "{reason}"
    );
    assert!(hook.bodies().is_empty(), "delivered: {:?}", hook.bodies());

    // The operator confirms while the agent runs: the request goes through the drop-box.
    let out = trust_confirm(&a_state, "b");
    assert!(
        out.contains("confirm") && out.contains("applies it"),
        "{out}"
    );
    wait_until(LIMIT, "keyChanged cleared", || {
        entry(&a, "b").is_some_and(|e| e.get("keyChanged").is_none())
    });
    let (status, body) = a.send("b", json!({"n": 3}));
    assert_eq!(status, 202, "{body}");
    assert_eq!(a.metric("dmr_agent_key_changes"), 0.0);
    assert!(
        a.proc.log_text().contains("operator confirmation applied"),
        "{}",
        a.proc.log_text()
    );
    a.proc.stop();
}

/// Signs `file` with the Ed25519 key `key` using OpenSSL alone, writing `file.sig` (raw).
fn openssl_sign(key: &Path, file: &Path) {
    let sig = PathBuf::from(format!("{}.sig", file.display()));
    let tmp = PathBuf::from(format!("{}.sig.tmp", file.display()));
    let out = Command::new("openssl")
        .args(["pkeyutl", "-sign", "-rawin", "-inkey"])
        .arg(key)
        .arg("-in")
        .arg(file)
        .arg("-out")
        .arg(&tmp)
        .output()
        .expect("openssl is needed for this test");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(tmp, sig).unwrap();
}

/// An Ed25519 key pair made by OpenSSL: (private, public) paths.
fn openssl_keypair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (key, public) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.pub")),
    );
    let ok = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&key)
        .status()
        .unwrap()
        .success()
        && Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&public)
            .status()
            .unwrap()
            .success();
    assert!(ok, "openssl could not make an ed25519 key");
    (key, public)
}

#[test]
fn agents_accept_only_a_directory_their_operator_key_signed() {
    let world = World::new("trust-signed", &["a", "b", "c"]);
    let d = world.dir.path();
    let (op_key, op_pub) = openssl_keypair(d, "operator");
    let (other_key, other_pub) = openssl_keypair(d, "other");
    let file = world.agents_file();
    let keys = |ids: &[&str]| -> Vec<(String, dmr::crypto::PublicKey)> {
        ids.iter()
            .map(|id| (id.to_string(), world.agent(id).key.public_key()))
            .collect()
    };
    openssl_sign(&op_key, &file);
    let server = Server::start(&world, "server", &[]);
    let hook = Webhook::start();
    let trusting = ["--directory-key", op_pub.to_str().unwrap()];
    let mut a = AgentProc::start(&world, "a", &[&server], None, &trusting);
    let _b = AgentProc::start(&world, "b", &[&server], Some(&hook), &trusting);
    let (status, body) = a.send("b", json!({"n": 1}));
    assert_eq!(status, 202, "{body}");
    wait_until(LIMIT, "first delivery", || hook.bodies().len() == 1);

    // Changed after signing: a new agent appears, the signature no longer matches.
    let mallory = SecretKey::generate().unwrap();
    let mut tampered = keys(&["a", "b", "c"]);
    tampered.push(("mallory".into(), mallory.public_key()));
    world.write_directory(&tampered);
    wait_until(LIMIT, "the tampered directory refused", || {
        a.metric("dmr_agent_directory_refused_total") >= 1.0
    });
    assert!(
        a.proc.log_text().contains("does not match"),
        "{}",
        a.proc.log_text()
    );
    assert!(entry(&a, "mallory").is_none(), "{:?}", agents(&a));
    let (status, body) = a.send("mallory", json!({"n": 2}));
    assert_eq!(status, 404, "{body}");
    // The last good directory stays in force: messages still flow with the old keys.
    let (status, body) = a.send("b", json!({"n": 3}));
    assert_eq!(status, 202, "{body}");
    wait_until(LIMIT, "delivery under the last good directory", || {
        hook.bodies().len() == 2
    });

    // Signed, but by a key the agents do not trust.
    openssl_sign(&other_key, &file);
    wait_until(LIMIT, "the foreign signature refused", || {
        a.metric("dmr_agent_directory_refused_total") >= 2.0
    });
    assert!(entry(&a, "mallory").is_none(), "{:?}", agents(&a));

    // Signed again by the operator: accepted.
    openssl_sign(&op_key, &file);
    wait_until(LIMIT, "the signed directory accepted", || {
        entry(&a, "mallory").is_some()
    });
    let (status, body) = a.send("b", json!({"n": 4}));
    assert_eq!(status, 202, "{body}");

    // An agent that trusts only the other key refuses it and, having no directory, is not
    // ready, saying why.
    let c_addr = loopback();
    let key = &world.agent("c").key_path;
    let mut c_args = agent_args("c", key, &server.ws_url(), c_addr, None);
    c_args.extend(["--directory-key".into(), other_pub.display().to_string()]);
    let c = Proc::spawn("agent-c", AGENT_BIN, &c_args, d);
    let mut ready = None;
    wait_until(LIMIT, "c's /readyz naming the refusal", || {
        ready = http_get(c_addr, "/readyz");
        ready.as_ref().is_some_and(|(_, b)| b.contains("refused"))
    });
    let (status, body) = ready.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no trusted agent directory"), "{body}");
    drop(c);
    a.proc.stop();
}

#[test]
fn a_delivery_recorded_before_a_crash_or_replayed_after_a_restart_is_posted_once() {
    let world = World::new("trust-replay", &["a", "b"]);
    let server = Server::start(&world, "server", &[]);
    let hook = Webhook::start();
    let a = AgentProc::start(&world, "a", &[&server], None, &[]);
    // b dies right after recording the delivery, before its Ack: the worst moment.
    let b_addr = loopback();
    let key = &world.agent("b").key_path;
    let args = agent_args("b", key, &server.ws_url(), b_addr, Some(hook.url()));
    let log = world.dir.path().join("agent-b-crashing.log");
    let mut crashing = Command::new(AGENT_BIN)
        .args(&args)
        .env("DMR_TEST_ABORT_AFTER_RECORD", "1")
        .env("RUST_LOG", "info,dmr=debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_until(LIMIT, "b ready", || {
        http_get(b_addr, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    let (status, body) = a.send("b", json!({"n": 1}));
    assert_eq!(status, 202, "{body}");
    wait_until(LIMIT, "b crashing after the webhook's 2xx", || {
        crashing.try_wait().unwrap().is_some()
    });
    assert_eq!(hook.bodies().len(), 1);
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("aborting before the Ack"));

    // Restarted on the same state dir: the redelivered copy is acked, not posted again.
    let servers = server.ws_url();
    let mut b = AgentProc::start_with(&world, "b", &servers, b_addr, Some(hook.url()), &[]);
    wait_until(LIMIT, "the redelivered copy dropped", || {
        b.metric("dmr_agent_duplicates_total") >= 1.0
    });
    assert_eq!(hook.bodies().len(), 1, "{:?}", hook.bodies());

    // A replayed envelope: the same bytes sent again after another restart.
    let replayed = envelope(world.agent("a"), world.agent("b"), br#"{"n":2}"#);
    let send = |env: dmr::protocol::Envelope| {
        smol::block_on(async {
            let (id, who) = (world.agent("a").id.clone(), &world.agent("a").key);
            let mut c = TestClient::connect(&servers, &id, who).await.unwrap();
            let mid = env.header().id;
            c.send(ClientFrame::Send { envelope: env }).await;
            expect_accepted(&c.answer_for(mid).await);
        })
    };
    send(replayed.clone());
    wait_until(LIMIT, "the first copy delivered", || {
        hook.bodies().len() == 2
    });
    b.proc.stop();
    let b = AgentProc::start_with(&world, "b", &servers, b_addr, Some(hook.url()), &[]);
    send(replayed);
    wait_until(LIMIT, "the replayed copy dropped", || {
        b.metric("dmr_agent_duplicates_total") >= 1.0
    });
    assert_eq!(hook.bodies().len(), 2, "{:?}", hook.bodies());
}

#[test]
fn a_state_dir_has_one_owner_and_a_damaged_store_is_named() {
    let world = World::new("trust-state", &["a"]);
    let server = Server::start(&world, "server", &[]);
    let a = AgentProc::start(&world, "a", &[&server], None, &[]);
    let key = &world.agent("a").key_path;
    let state = agent_state_dir(key, "a", a.addr);

    let second = agent_args_in("a", key, &server.ws_url(), loopback(), None, &state);
    let (ok, err) = run_to_exit(&second);
    assert!(!ok, "a second agent started on {}", state.display());
    assert!(
        err.contains("in use by another process") && err.contains("--state-dir"),
        "{err}"
    );

    let damaged = world.dir.path().join("damaged");
    std::fs::create_dir(&damaged).unwrap();
    std::fs::write(damaged.join("state.redb"), vec![0x5a; 8192]).unwrap();
    let args = agent_args_in("a", key, &server.ws_url(), loopback(), None, &damaged);
    let (ok, err) = run_to_exit(&args);
    assert!(!ok, "the agent started on a damaged store");
    let file = damaged.join("state.redb").display().to_string();
    assert!(
        err.contains(&file) && err.contains("move it aside"),
        "{err}"
    );

    let args = agent_args_in(
        "a",
        key,
        &server.ws_url(),
        loopback(),
        None,
        Path::new("/proc/no-such-dir/state"),
    );
    let (ok, err) = run_to_exit(&args);
    assert!(!ok);
    assert!(
        err.contains("cannot create the state dir /proc/no-such-dir/state")
            && err.contains("--state-dir"),
        "{err}"
    );
}

/// A fake CentOps serving a document and its signature, each set by the test.
fn centops(doc: Vec<u8>, sig: String) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let listener = smol::net::TcpListener::try_from(listener).unwrap();
        smol::block_on(dmr::http::serve(
            listener,
            None,
            move |req: hyper::Request<hyper::body::Incoming>, _| {
                let body = match req.uri().path() {
                    "/agents.sig" => sig.clone().into_bytes(),
                    _ => doc.clone(),
                };
                let text = String::from_utf8(body).unwrap();
                async move { dmr::http::text(hyper::StatusCode::OK, "application/json", text) }
            },
            std::future::pending(),
        ));
    });
    addr
}

#[test]
fn servers_forward_the_exact_documents_and_signatures() {
    let world = World::new("trust-forward", &["a", "b"]);
    let op = dmr::signing::SigningKey::generate().unwrap();
    let file = world.agents_file();
    let file_bytes = std::fs::read(&file).unwrap();
    let file_sig = op.sign(&file_bytes);
    let sig_path = PathBuf::from(format!("{}.sig", file.display()));
    std::fs::write(&sig_path, file_sig.to_base64()).unwrap();
    // CentOps lists b again, in its own bytes (a bare array, odd spacing).
    let b_pem = world.agent("b").key.public_key().to_pem();
    let centops_bytes = format!(
        "[ {{\"id\":\"b\",  \"name\":\"B from CentOps\",\"authentication_certificate\":{}}} ]",
        serde_json::to_string(&b_pem).unwrap()
    )
    .into_bytes();
    let centops_sig = op.sign(&centops_bytes);
    let addr = centops(centops_bytes.clone(), centops_sig.to_base64());
    let (doc_url, sig_url) = (
        format!("http://{addr}/agents"),
        format!("http://{addr}/agents.sig"),
    );
    let server = Server::start(
        &world,
        "server",
        &[
            "--centops-url",
            &doc_url,
            "--centops-signature-url",
            &sig_url,
        ],
    );
    let a = world.agent("a");
    let welcome = |server: &Server| {
        smol::block_on(TestClient::connect(&server.ws_url(), &a.id, &a.key))
            .unwrap()
            .documents
    };
    wait_until(LIMIT, "both documents in Welcome", || {
        welcome(&server).len() == 2
    });
    let docs = welcome(&server);
    assert_eq!(docs[0].json, file_bytes, "the agents file, byte for byte");
    assert_eq!(docs[0].signature.map(|s| s.0), Some(file_sig.to_bytes()));
    assert_eq!(
        docs[1].json, centops_bytes,
        "the CentOps answer, byte for byte"
    );
    assert_eq!(docs[1].signature.map(|s| s.0), Some(centops_sig.to_bytes()));

    // A .sig that is there but not a signature: refused, naming it; the last good stays.
    std::fs::write(&sig_path, "not a signature").unwrap();
    wait_until(LIMIT, "the bad .sig reported", || {
        server.proc.log_text().contains(&format!(
            "{}: not a directory signature",
            sig_path.display()
        ))
    });
    assert_eq!(
        welcome(&server)[0].signature.map(|s| s.0),
        Some(file_sig.to_bytes())
    );
    // Without a .sig the file is served unsigned.
    std::fs::remove_file(&sig_path).unwrap();
    wait_until(LIMIT, "the file served unsigned", || {
        welcome(&server)[0].signature.is_none()
    });
}
