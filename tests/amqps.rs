//! `amqps://` end to end: a throw-away RabbitMQ node that speaks only AMQP over TLS
//! (`scripts/rabbitmq-tls-node.sh`, 127.0.0.1:56710, with its own test CA), a real
//! `dmr-server` relaying through it with `--amqp-ca-file`, and two real agents. A second
//! server without the CA file must refuse the node's certificate and say how to fix it.
//!
//! One test, so the node starts once; a guard stops it (and deletes its certificates) even
//! when an assertion fails. The system node on 5672 is never touched.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::{free_port, http_get, wait_until, AgentProc, Proc, Server, Webhook, World};

const SECOND: Duration = Duration::from_secs(1);

/// The TLS node, stopped when dropped.
struct TlsNode {
    url: String,
    ca: PathBuf,
}

impl TlsNode {
    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/rabbitmq-tls-node.sh")
    }

    /// Starts the node (or finds it running) and reads how to connect from the script's
    /// `KEY=VALUE` lines. The script bounds its own waits.
    fn start() -> Self {
        let out = Command::new("bash")
            .arg(Self::script())
            .arg("start")
            .output()
            .expect("bash runs scripts/rabbitmq-tls-node.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        // Stop whatever half-started, even when the start failed.
        let mut node = Self {
            url: String::new(),
            ca: PathBuf::new(),
        };
        assert!(
            out.status.success(),
            "rabbitmq-tls-node.sh start failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in stdout.lines() {
            if let Some(url) = line.strip_prefix("DMR_TLS_NODE_URL=") {
                node.url = url.to_owned();
            } else if let Some(ca) = line.strip_prefix("DMR_TLS_NODE_CA=") {
                node.ca = PathBuf::from(ca);
            }
        }
        assert!(
            node.url.starts_with("amqps://") && node.ca.is_file(),
            "no DMR_TLS_NODE_URL / DMR_TLS_NODE_CA in:\n{stdout}"
        );
        node
    }
}

impl Drop for TlsNode {
    fn drop(&mut self) {
        // Never panic here: a panic while unwinding would abort the test binary.
        match Command::new("bash")
            .arg(Self::script())
            .arg("stop")
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "rabbitmq-tls-node.sh stop failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("could not run rabbitmq-tls-node.sh stop: {e}"),
        }
    }
}

/// A `dmr-server` on `url`, with `extra` flags, not yet waited for.
fn spawn_server(world: &World, name: &str, url: &str, extra: &[&str]) -> Server {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut args: Vec<String> = [
        "run",
        "--listen",
        &addr.to_string(),
        "--amqp-url",
        url,
        "--agents-file",
        &world.agents_file().display().to_string(),
        "--queue-prefix",
        &world.prefix,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    Server {
        proc: Proc::spawn(name, support::SERVER_BIN, &args, world.dir.path()),
        addr,
    }
}

#[test]
fn relay_over_amqps_with_a_private_ca_and_a_clear_refusal_without_it() {
    // Dropped last: every process is gone before the node stops.
    let node = TlsNode::start();
    let world = World::new("amqps", &["police", "tax-board"]);

    // Started first, so its refusals are logged while the relay below is set up.
    let untrusting = spawn_server(&world, "server-no-ca", &node.url, &[]);
    // The operator commands take the same flag; without it they give up after their
    // connect timeout, so this one runs while the relay is tested.
    let dlq_untrusting = dlq_list(&world, &node.url, None)
        .spawn()
        .expect("dmr-server dlq list starts");

    let ca = node.ca.display().to_string();
    let mut server = spawn_server(&world, "server-amqps", &node.url, &["--amqp-ca-file", &ca]);
    server.wait_ready();
    let hook = Webhook::start();
    let a = AgentProc::start(&world, "police", &[&server], None, &[]);
    let _b = AgentProc::start(&world, "tax-board", &[&server], Some(&hook), &[]);

    let payload = json!({"text": "over TLS", "n": 1});
    let (status, body) = a.send("tax-board", payload.clone());
    assert_eq!(status, 202, "send answered {status}: {body}");
    let id = body["id"].as_str().expect("202 with an id").to_owned();
    wait_until(20 * SECOND, "delivery through the amqps node", || {
        hook.bodies().iter().any(|b| b["id"] == id.as_str())
    });
    let delivered = hook.bodies();
    let m = delivered.iter().find(|b| b["id"] == id.as_str()).unwrap();
    assert_eq!(m["payload"], payload, "payload changed on the way");
    assert_eq!(m["senderId"], "police", "{m}");

    let log = server.proc.log_text();
    let shown = node.url.replace("guest:guest@", "guest:***@");
    assert!(
        log.contains(&format!("at {shown}")),
        "no connection to {shown} logged:\n{log}"
    );
    assert!(!log.contains("guest:guest"), "password in the log:\n{log}");

    // Without --amqp-ca-file the web PKI roots are trusted, and the test CA is not among them.
    wait_until(30 * SECOND, "the certificate refusal in the log", || {
        untrusting
            .proc
            .log_text()
            .contains("certificate verification failed")
    });
    let refused = untrusting.proc.log_text();
    assert!(
        refused.contains("not signed by a public CA") && refused.contains("--amqp-ca-file"),
        "the refusal does not say what to do:\n{refused}"
    );
    assert!(
        !refused.contains("guest:guest"),
        "password in the log:\n{refused}"
    );
    assert!(!refused.contains("connected to RabbitMQ"), "{refused}");
    let ready = http_get(untrusting.addr, "/readyz").map(|(s, _)| s);
    assert_ne!(ready, Some(200), "ready without a trusted RabbitMQ");

    // `dlq list` reads the DLQ through the TLS node with the CA file, and without it
    // fails saying which flag is missing.
    let out = dlq_list(&world, &node.url, Some(&node.ca))
        .output()
        .expect("dmr-server dlq list runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "dlq list with the CA failed:\n{stderr}"
    );
    let listed: serde_json::Value = serde_json::from_str(&stdout).expect("dlq list --json");
    assert_eq!(listed, json!([]), "the DLQ should be empty: {stdout}");
    let out = dlq_untrusting
        .wait_with_output()
        .expect("dmr-server dlq list ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "dlq list trusted the test CA without --amqp-ca-file"
    );
    assert!(
        stderr.contains("--amqp-ca-file") && !stderr.contains("guest:guest"),
        "dlq list without the CA does not say what to do:\n{stderr}"
    );
}

/// `dmr-server dlq list --json` against `url`, trusting `ca` if given.
fn dlq_list(world: &World, url: &str, ca: Option<&Path>) -> Command {
    let mut cmd = Command::new(support::SERVER_BIN);
    cmd.args(["dlq", "list", "--json", "--amqp-url", url])
        .args(["--queue-prefix", &world.prefix])
        .env_remove("RUST_LOG")
        .env_remove("DMR_AMQP_CA_FILE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(ca) = ca {
        cmd.arg("--amqp-ca-file").arg(ca);
    }
    cmd
}
