//! Operating the server: TLS (wss:// end to end through real agents), the directory from a
//! CentOps URL, and losing the RabbitMQ connection.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl must be installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn agents_talk_over_wss_with_a_private_ca() {
    let world = World::new("tls", &["a", "b"]);
    let d = world.dir.path();
    let (cert, key) = make_ca_and_leaf(d);
    let ca_path = d.join("ca.crt");
    let addr = free_addr();
    let tls_flags = [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let args = server_args(&world, addr, &tls_flags);
    let _server = Proc::spawn("server-tls", SERVER_BIN, &args, d);
    let tls = dmr::transport::client_tls(Some(&ca_path)).unwrap();
    let ready = || {
        let req = hyper::Request::get(format!("https://localhost:{}/readyz", addr.port()))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        smol::block_on(dmr::http::request(req, Some(&tls), Duration::from_secs(5)))
            .is_ok_and(|(s, _)| s == 200)
    };
    wait_until(
        Duration::from_secs(30),
        "TLS server ready over https",
        ready,
    );
    // Plain HTTP on the TLS port gets no answer.
    assert!(http_get(addr, "/readyz").is_none_or(|(s, _)| s != 200));
    let wss = format!("wss://localhost:{}/v1/ws", addr.port());
    let hook = Webhook::start();
    let ca = ["--ca-file", ca_path.to_str().unwrap()];
    let b = AgentProc::start_with(&world, "b", &wss, free_addr(), Some(hook.url()), &ca);
    let a = AgentProc::start_with(&world, "a", &wss, free_addr(), None, &ca);
    let (status, body) = a.send("b", serde_json::json!({"over": "tls"}));
    assert_eq!(status, 202, "{body}");
    wait_until(Duration::from_secs(15), "delivery over wss", || {
        !hook.bodies().is_empty()
    });
    assert_eq!(hook.bodies()[0]["payload"]["over"], "tls");
    drop(b);

    // Without the CA the agent must refuse the server's certificate and never get ready.
    let mut untrusting = Proc::spawn(
        "agent-no-ca",
        AGENT_BIN,
        &[
            "run",
            "--id",
            "b",
            "--key",
            world.agent("b").key_path.to_str().unwrap(),
            "--server",
            &wss,
            "--listen",
            &free_addr().to_string(),
            "--state-dir",
            &d.join("state-no-ca").display().to_string(),
        ]
        .map(String::from),
        d,
    );
    wait_until(
        Duration::from_secs(10),
        "certificate error in the log",
        || untrusting.log_text().to_lowercase().contains("certificate"),
    );
    assert!(untrusting.is_running());
}

/// An https:// CentOps signed by a private CA: trusted with --centops-ca-file, refused
/// (certificate error, no directory) without it.
#[test]
fn centops_over_https_with_a_private_ca() {
    let world = World::new("centops-tls", &["a"]);
    let d = world.dir.path();
    let (cert, key) = make_ca_and_leaf(d);
    let ca = d.join("ca.crt");
    let acceptor = dmr::transport::server_tls(&cert, &key).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = centops_json(&world, &["a"]);
    std::thread::spawn(move || {
        let listener = smol::net::TcpListener::try_from(listener).unwrap();
        smol::block_on(dmr::http::serve(
            listener,
            Some(acceptor),
            move |_req, _| {
                let text = body.clone();
                async move { dmr::http::text(hyper::StatusCode::OK, "application/json", text) }
            },
            std::future::pending(),
        ));
    });
    let url = format!("https://localhost:{port}/agents");
    let centops_only = |name: &str, extra: &[&str]| {
        let addr = free_addr();
        let mut args: Vec<String> = [
            "run",
            "--listen",
            &addr.to_string(),
            "--amqp-url",
            AMQP_URL,
            "--centops-url",
            &url,
            "--queue-prefix",
            &world.prefix,
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        Server {
            proc: Proc::spawn(name, SERVER_BIN, &args, d),
            addr,
        }
    };
    let mut trusting = centops_only(
        "server-centops-ca",
        &["--centops-ca-file", ca.to_str().unwrap()],
    );
    trusting.wait_ready();
    let a = world.agent("a");
    assert!(smol::block_on(TestClient::connect(&trusting.ws_url(), &a.id, &a.key)).is_ok());
    drop(trusting);

    let untrusting = centops_only("server-centops-webpki", &[]);
    wait_until(Duration::from_secs(20), "a certificate error", || {
        untrusting
            .proc
            .log_text()
            .to_lowercase()
            .contains("certificate")
    });
    assert_eq!(http_get(untrusting.addr, "/readyz").map(|r| r.0), Some(503));
}

/// A private CA and a `localhost` server certificate it signed (webpki refuses a
/// self-signed CA certificate used directly as the server's).
fn make_ca_and_leaf(d: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let p = |n: &str| d.join(n).to_str().unwrap().to_owned();
    openssl(&[
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
        &p("ca.key.pem"),
        "-out",
        &p("ca.crt"),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        &p("server.key.pem"),
        "-out",
        &p("server.csr"),
    ]);
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("server.csr"),
        "-CA",
        &p("ca.crt"),
        "-CAkey",
        &p("ca.key.pem"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &p("ext.cnf"),
        "-out",
        &p("server.crt"),
    ]);
    (d.join("server.crt"), d.join("server.key.pem"))
}

fn free_addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// A fake CentOps: serves whatever body the test sets.
fn centops(body: Arc<Mutex<String>>) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let listener = smol::net::TcpListener::try_from(listener).unwrap();
        smol::block_on(dmr::http::serve(
            listener,
            None,
            move |_req, _| {
                let text = body.lock().unwrap().clone();
                async move { dmr::http::text(hyper::StatusCode::OK, "application/json", text) }
            },
            std::future::pending(),
        ));
    });
    addr
}

fn centops_json(world: &World, ids: &[&str]) -> String {
    let list: Vec<_> = ids
        .iter()
        .map(|id| {
            serde_json::json!({
                "id": id, "name": format!("Agency {id}"),
                "authentication_certificate": world.agent(id).key.public_key().to_pem(),
                "created_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-01T00:00:00Z",
            })
        })
        .collect();
    serde_json::json!({ "response": list }).to_string()
}

#[test]
fn directory_follows_centops_and_survives_a_bad_answer() {
    let world = World::new("centops", &["a", "b", "c"]);
    let body = Arc::new(Mutex::new(centops_json(&world, &["a", "b"])));
    let url = format!("http://{}/agents", centops(body.clone()));
    let addr: SocketAddr = free_addr();
    let args: Vec<String> = [
        "run",
        "--listen",
        &addr.to_string(),
        "--amqp-url",
        AMQP_URL,
        "--centops-url",
        &url,
        "--centops-interval",
        "1",
        "--queue-prefix",
        &world.prefix,
    ]
    .map(String::from)
    .to_vec();
    let mut server = Server {
        proc: Proc::spawn("server-centops", SERVER_BIN, &args, world.dir.path()),
        addr,
    };
    server.wait_ready();
    let url_ws = server.ws_url();
    smol::block_on(async {
        let c = world.agent("c");
        assert!(
            TestClient::connect(&url_ws, &c.id, &c.key).await.is_err(),
            "c is not listed yet"
        );
        *body.lock().unwrap() = centops_json(&world, &["a", "b", "c"]);
        let mut joined = false;
        for _ in 0..40 {
            if TestClient::connect(&url_ws, &c.id, &c.key).await.is_ok() {
                joined = true;
                break;
            }
            smol::Timer::after(Duration::from_millis(250)).await;
        }
        assert!(joined, "c was added in CentOps but never let in");
        // A broken answer is refused and the last good directory stays.
        *body.lock().unwrap() = "{\"response\": [{\"id\": \"bad id\"}]}".into();
        smol::Timer::after(Duration::from_millis(2500)).await;
        assert!(TestClient::connect(&url_ws, &c.id, &c.key).await.is_ok());
    });
    assert!(server.metric("dmr_server_directory_reloads_total{result=\"error\"}") >= 1.0);
    assert!(server
        .proc
        .log_text()
        .contains("keeping the last good directory"));
}

/// RabbitMQ's connection pids whose client-provided name ends in `pid {os_pid}`.
fn connections_of(os_pid: u32) -> Vec<String> {
    let out = Command::new("rabbitmqctl")
        .args([
            "-q",
            "--no-table-headers",
            "list_connections",
            "pid",
            "client_properties",
        ])
        .output()
        .expect("rabbitmqctl");
    let needle = format!("pid {os_pid}\"");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn server_reconnects_after_rabbitmq_drops_it_and_keeps_delivering() {
    let world = World::new("amqploss", &["a", "b"]);
    let server = Server::start(&world, "server-loss", &[]);
    let pid = server.proc.child.id();
    smol::block_on(async {
        let (a, b) = (world.agent("a"), world.agent("b"));
        let mut ca = TestClient::connect(&server.ws_url(), &a.id, &a.key)
            .await
            .unwrap();
        let mut cb = TestClient::connect(&server.ws_url(), &b.id, &b.key)
            .await
            .unwrap();
        // Drop exactly this server's connection, as a RabbitMQ restart or network cut would.
        let ours = connections_of(pid);
        assert_eq!(
            ours.len(),
            1,
            "expected one RabbitMQ connection of server pid {pid}: {ours:?}"
        );
        let st = Command::new("rabbitmqctl")
            .args(["-q", "close_connection", &ours[0], "test: simulated loss"])
            .status()
            .unwrap();
        assert!(st.success());
        // It comes back by itself, and a message sent afterwards reaches b on the resumed consumer.
        let mut accepted = false;
        for _ in 0..60 {
            let env = envelope(a, b, b"after reconnect");
            let id = env.header().id;
            ca.send(dmr::protocol::ClientFrame::Send { envelope: env })
                .await;
            if let dmr::protocol::ServerFrame::Accepted { .. } = ca.answer_for(id).await {
                accepted = true;
                break;
            }
            smol::Timer::after(Duration::from_millis(250)).await;
        }
        assert!(accepted, "no send accepted after the connection loss");
        let (_, env) = cb
            .next_delivery(Duration::from_secs(15))
            .await
            .expect("delivery after reconnect");
        assert_eq!(
            dmr::crypto::open(&b.key, &a.key.public_key(), &env).unwrap(),
            b"after reconnect"
        );
    });
    assert!(
        server.proc.log_text().contains("test: simulated loss")
            || server.proc.log_text().to_lowercase().contains("reconnect")
    );
}

#[test]
fn a_missing_agents_file_is_reported_and_picked_up_when_it_appears() {
    let world = World::new("nofile", &["a", "b"]);
    let written = std::fs::read_to_string(world.agents_file()).unwrap();
    std::fs::remove_file(world.agents_file()).unwrap();
    let addr = free_addr();
    let mut server = Proc::spawn(
        "server-nofile",
        SERVER_BIN,
        &server_args(&world, addr, &[]),
        world.dir.path(),
    );
    wait_until(Duration::from_secs(15), "the missing file reported", || {
        server.log_text().contains("--agents-file refused")
    });
    assert!(http_get(addr, "/readyz").is_some_and(|(s, _)| s == 503));
    std::fs::write(world.agents_file(), written).unwrap();
    server.wait_ready(addr);
}
