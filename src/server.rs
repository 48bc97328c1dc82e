//! `dmr-server run`: the stateless relay.
//!
//! One listener serves the agent WebSocket (`/v1/ws`) and the operator endpoints
//! (`/healthz`, `/readyz`, `/metrics`). Each authenticated agent gets a [`session`]; the
//! [`watch`] task keeps the directory current; the [`Broker`] holds the RabbitMQ side.
//! The server keeps no message state of its own: what it has accepted is in RabbitMQ.

mod admin;
mod admission;
mod guard;
mod outstanding;
mod quiet;
mod session;
mod sessions;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use crate::broker::{Broker, BrokerOptions, Topology};
use crate::config::{split_list, ConfigError, ServerArgs, UrlWithPassword};
use crate::directory::Directory;
use crate::http::{self, Body};
use crate::metrics::ServerMetrics;
use crate::protocol::{DirectoryDocument, Limits};
use crate::signals::{self, Signal};
use crate::transport;
use crate::wait::with_timeout;

use outstanding::Outstanding;
use sessions::Sessions;

/// Everything `run` needs, validated.
#[derive(Clone, Debug)]
pub(crate) struct ServerConfig {
    pub(crate) listen: SocketAddr,
    /// Each URL may carry a password: `Debug` masks it (as for `management_url`).
    pub(crate) amqp_urls: Vec<UrlWithPassword>,
    /// `--amqp-ca-file`: the CA trusted for `amqps://` nodes instead of the web PKI roots.
    pub(crate) amqp_ca_file: Option<PathBuf>,
    pub(crate) agents_file: Option<PathBuf>,
    pub(crate) centops_url: Option<String>,
    /// `--centops-signature-url`: the CentOps document's signature, forwarded to agents.
    pub(crate) centops_signature_url: Option<String>,
    pub(crate) centops_interval: Duration,
    pub(crate) tls: Option<(PathBuf, PathBuf)>,
    pub(crate) topology: Topology,
    pub(crate) max_message_bytes: usize,
    pub(crate) prefetch: u16,
    /// How long an agent has to finish the handshake.
    pub(crate) handshake_timeout: Duration,
    /// A session with no frame (not even a pong) for this long is dropped.
    pub(crate) idle_timeout: Duration,
    /// `--policy-file`: without one, everything the directory allows is allowed.
    pub policy_file: Option<PathBuf>,
    /// `--audit-log`: a path, or `-` for stdout.
    pub audit_log: Option<String>,
    /// This instance's name in audit lines.
    pub instance: String,
    /// `--max-connections`: open connections of the listener, sessions included.
    pub(crate) max_connections: usize,
    /// `--max-handshakes`: WebSocket handshakes in progress.
    pub(crate) max_handshakes: usize,
    /// `--centops-max-bytes`: the largest CentOps answer read.
    pub(crate) centops_max_bytes: usize,
    /// `--centops-ca-file`: CA certificates for an https:// CentOps.
    pub(crate) centops_ca_file: Option<PathBuf>,
    /// `--allow-empty-directory`: take a directory with no agents.
    pub(crate) allow_empty_directory: bool,
    /// `--metrics-listen`: `/metrics` only there, not on `listen`.
    pub(crate) metrics_listen: Option<SocketAddr>,
    /// `--management-url`: the RabbitMQ management API, to check the policies at start.
    pub(crate) management_url: Option<UrlWithPassword>,
}

/// Whether `host` (from a URL) names this machine: `localhost` or a loopback address.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Checks `--centops-url` with `--allow-insecure-centops` and `--centops-ca-file`: the
/// directory decides who may log in, so a plain-HTTP fetch across a network is refused.
fn check_centops(a: &ServerArgs) -> Result<(), ConfigError> {
    let invalid = |flag, value: &str, why: &str| ConfigError::Invalid {
        flag,
        value: value.to_owned(),
        why: why.to_owned(),
    };
    let Some(u) = &a.centops_url else {
        return match &a.centops_ca_file {
            Some(p) => Err(invalid(
                "--centops-ca-file",
                &p.display().to_string(),
                "given without --centops-url",
            )),
            None => Ok(()),
        };
    };
    let uri = u
        .parse::<hyper::Uri>()
        .ok()
        .filter(|u| u.host().is_some() && matches!(u.scheme_str(), Some("http" | "https")))
        .ok_or_else(|| invalid("--centops-url", u, "not an http(s) URL"))?;
    if uri.scheme_str() == Some("https") {
        return Ok(());
    }
    if let Some(p) = &a.centops_ca_file {
        let why = "only used for an https:// --centops-url";
        return Err(invalid("--centops-ca-file", &p.display().to_string(), why));
    }
    let host = uri.host().unwrap_or_default();
    if !is_loopback(host) && !a.allow_insecure_centops {
        return Err(invalid(
            "--centops-url",
            u,
            "plain http:// to a host other than loopback lets anyone on the path rewrite the \
             agent directory; use https:// (with --centops-ca-file for a private CA), or \
             accept the risk with --allow-insecure-centops",
        ));
    }
    Ok(())
}

impl ServerConfig {
    /// Checks a flag combination and turns it into a configuration.
    pub(crate) fn from_args(a: ServerArgs) -> Result<Self, ConfigError> {
        let amqp_urls = split_list(std::slice::from_ref(a.amqp_url.expose()));
        if amqp_urls.is_empty() {
            return Err(ConfigError::Empty { flag: "--amqp-url" });
        }
        if a.agents_file.is_none() && a.centops_url.is_none() {
            return Err(ConfigError::MissingEither {
                first: "--agents-file",
                second: "--centops-url",
                why: "the server needs the agent directory",
            });
        }
        check_centops(&a)?;
        if a.centops_signature_url.is_some() && a.centops_url.is_none() {
            return Err(ConfigError::Together {
                first: "--centops-signature-url",
                second: "--centops-url",
            });
        }
        let tls = match (a.tls_cert, a.tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Together {
                    first: "--tls-cert",
                    second: "--tls-key",
                })
            }
        };
        let at_least_one = [
            ("--message-ttl", a.message_ttl, "1 second"),
            ("--delivery-limit", a.delivery_limit.into(), "1"),
            ("--max-message-bytes", a.max_message_bytes.into(), "1"),
            ("--prefetch", a.prefetch.into(), "1"),
            ("--handshake-timeout", a.handshake_timeout, "1 second"),
            ("--centops-interval", a.centops_interval, "1 second"),
            ("--max-connections", a.max_connections.into(), "1"),
            ("--max-handshakes", a.max_handshakes.into(), "1"),
            ("--centops-max-bytes", a.centops_max_bytes.into(), "1"),
        ];
        if let Some(&(flag, _, min)) = at_least_one.iter().find(|(_, v, _)| *v == 0) {
            return Err(ConfigError::TooSmall { flag, min });
        }
        let instance = a
            .instance
            .unwrap_or_else(|| format!("{}:{}", crate::audit::hostname(), a.listen.port()));
        Ok(Self {
            metrics_listen: a.metrics_listen,
            management_url: a
                .management_url
                .filter(|u| !u.is_empty())
                .map(|u| u.as_str().into()),
            policy_file: a.policy_file,
            audit_log: a.audit_log,
            instance,
            listen: a.listen,
            amqp_urls: amqp_urls.iter().map(|u| u.as_str().into()).collect(),
            amqp_ca_file: a.amqp_ca_file,
            agents_file: a.agents_file,
            centops_url: a.centops_url,
            centops_signature_url: a.centops_signature_url,
            centops_interval: Duration::from_secs(a.centops_interval),
            tls,
            topology: Topology {
                prefix: a.queue_prefix,
                message_ttl_ms: a.message_ttl.saturating_mul(1000),
                delivery_limit: a.delivery_limit,
            },
            max_message_bytes: a.max_message_bytes as usize,
            prefetch: a.prefetch,
            handshake_timeout: Duration::from_secs(a.handshake_timeout),
            idle_timeout: transport::IDLE_TIMEOUT,
            max_connections: a.max_connections as usize,
            max_handshakes: a.max_handshakes as usize,
            centops_max_bytes: a.centops_max_bytes as usize,
            centops_ca_file: a.centops_ca_file,
            allow_empty_directory: a.allow_empty_directory,
        })
    }

    /// The AMQP URLs, passwords included: only for connecting.
    pub(crate) fn amqp_urls(&self) -> Vec<String> {
        self.amqp_urls.iter().map(|u| u.expose().clone()).collect()
    }

    fn limits(&self) -> Limits {
        Limits {
            max_message_bytes: self.max_message_bytes as u32,
            message_ttl_ms: self.topology.message_ttl_ms,
        }
    }
}

/// State shared by the listener, the sessions and the directory watcher.
pub(crate) struct Shared {
    config: ServerConfig,
    directory: RwLock<Arc<Directory>>,
    /// The signed documents `directory` was parsed from, forwarded to agents as they are.
    documents: RwLock<Arc<Vec<DirectoryDocument>>>,
    /// The `Welcome` frame of these documents, encoded once per directory version and
    /// shared by every session (a large directory would otherwise be encoded per login).
    welcome: RwLock<bytes::Bytes>,
    directory_loaded: AtomicBool,
    sessions: Sessions,
    broker: Broker,
    metrics: ServerMetrics,
    /// Open sessions and publishes awaiting a confirm; shutdown waits for them.
    outstanding: Outstanding,
    /// Policy, rate limits and audit log (`--policy-file`, `--audit-log`).
    guard: guard::Guard,
    /// Caps and quiet logging before login.
    admission: admission::Admission,
    /// TLS for an https:// CentOps (`--centops-ca-file`, else the web roots).
    centops_tls: Option<futures_rustls::TlsConnector>,
    stopping: AtomicBool,
}

impl Shared {
    fn directory(&self) -> Arc<Directory> {
        crate::sync::read(&self.directory).clone()
    }

    /// The directory documents as agents get them in `Welcome` and `Directory`.
    fn documents(&self) -> Arc<Vec<DirectoryDocument>> {
        crate::sync::read(&self.documents).clone()
    }

    /// The encoded `Welcome` frame of the directory in force.
    fn welcome(&self) -> bytes::Bytes {
        crate::sync::read(&self.welcome).clone()
    }
}

/// hyper's read buffer per connection: the largest request head (request line and
/// headers) the server holds. An upgrade request with an ingress's extra headers fits
/// many times over; hyper's default (about 400 KiB) would let idle sockets hold far more.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Runs the server until SIGTERM or SIGINT.
pub fn run(args: ServerArgs) -> Result<(), Box<dyn std::error::Error>> {
    let config = ServerConfig::from_args(args)?;
    let tls = match &config.tls {
        Some((cert, key)) => Some(transport::server_tls(cert, key)?),
        None => None,
    };
    let guard = guard::Guard::new(
        config.policy_file.as_deref(),
        config.audit_log.as_deref(),
        &config.instance,
    )?;
    let centops_tls = match &config.centops_ca_file {
        Some(ca) => Some(transport::client_tls_from("--centops-ca-file", Some(ca))?),
        None => None,
    };
    if let Some(url) = config
        .centops_url
        .as_deref()
        .filter(|u| u.starts_with("http:"))
    {
        log::warn!(
            "--centops-url {url} is plain http://: the agent directory (who may log in, with \
             which key) travels unprotected; use https:// outside a single host"
        );
    }
    let options = BrokerOptions {
        ca_file: config.amqp_ca_file.clone(),
        ..BrokerOptions::default()
    };
    let signals = signals::listen()?;
    crate::runtime::block_on(async move {
        // Inside `block_on`: the broker's supervisor is the first task spawned.
        let broker = Broker::start_with(config.amqp_urls(), config.topology.clone(), options)?;
        let listener = crate::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        log::info!(
            "listening on {scheme}://{}/v1/ws (health: /healthz /readyz, metrics: /metrics)",
            config.listen
        );
        let metrics = ServerMetrics::default();
        let admission =
            admission::Admission::new(config.max_handshakes, metrics.connections_refused.clone());
        let shared = Arc::new(Shared {
            broker,
            admission,
            centops_tls,
            directory: RwLock::default(),
            documents: RwLock::default(),
            welcome: RwLock::default(),
            directory_loaded: AtomicBool::new(false),
            config,
            sessions: Sessions::default(),
            metrics,
            outstanding: Outstanding::default(),
            guard,
            stopping: AtomicBool::new(false),
        });
        let (reload_tx, reload_rx) = async_channel::unbounded();
        let watcher = crate::runtime::spawn(watch::run(shared.clone(), reload_rx));
        // Every server relays failure notices to senders (competing consumers).
        let notices = crate::runtime::spawn(shared.broker.clone().relay_failures());
        let policy_watcher = (shared.config.policy_file.clone())
            .map(|path| crate::runtime::spawn(guard::watch(shared.clone(), path)));
        let background = admin::start(&shared).await?;
        let stop = async {
            while let Ok(sig) = signals.recv().await {
                match sig {
                    Signal::Reload => {
                        let _ = reload_tx.send(()).await;
                        shared.guard.sighup();
                    }
                    Signal::Terminate => break,
                }
            }
        };
        let handler = {
            let shared = shared.clone();
            move |req, peer| route(shared.clone(), req, peer)
        };
        let options = http::ServeOptions {
            max_connections: Some(shared.config.max_connections),
            on_refused: Some({
                let shared = shared.clone();
                Arc::new(move |peer| {
                    (shared.admission).refuse_connection(peer, "connections", "--max-connections")
                })
            }),
            max_head_bytes: Some(MAX_REQUEST_HEAD),
        };
        http::serve_with(listener, tls, options, handler, stop).await;
        drop(watcher);
        drop(policy_watcher);
        notices.cancel().await;
        drop(background);
        shutdown(&shared).await;
        Ok(())
    })
    .map_err(|e| format!("cannot start the server's runtime: {e}"))?
}

/// Stop order: no new sessions, sessions closed (agents fail over), confirms awaited,
/// RabbitMQ closed — so nothing already accepted is left unconfirmed.
async fn shutdown(shared: &Shared) {
    log::info!("stopping: closing {} sessions", shared.sessions.len());
    shared.stopping.store(true, Ordering::SeqCst);
    shared.sessions.close_all("server shutting down");
    // Sessions end once their close frame is written: exiting earlier would reset the
    // sockets and agents would not learn why.
    let limit = Duration::from_secs(10);
    if with_timeout(limit, shared.outstanding.finished())
        .await
        .is_none()
    {
        let left = shared.outstanding.count();
        log::warn!("stopping anyway: {left} sessions or publishes still busy after {limit:?}");
    }
    shared.broker.close().await;
    log::info!("stopped");
}

async fn route(shared: Arc<Shared>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/ws") => upgrade(shared, req, peer),
        (&Method::GET, "/healthz") => http::text(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => readyz(&shared),
        (&Method::GET, "/metrics") if shared.config.metrics_listen.is_some() => http::error(
            StatusCode::NOT_FOUND,
            "metrics are served on --metrics-listen",
        ),
        (&Method::GET, "/metrics") => http::text(
            StatusCode::OK,
            crate::metrics::CONTENT_TYPE,
            metrics(&shared),
        ),
        (_, "/v1/ws" | "/healthz" | "/readyz" | "/metrics") => {
            http::error(StatusCode::METHOD_NOT_ALLOWED, "use GET")
        }
        _ => http::error(
            StatusCode::NOT_FOUND,
            "no such endpoint; try /v1/ws, /healthz, /readyz, /metrics",
        ),
    }
}

/// The exposition, with the RabbitMQ gauge read at scrape time rather than kept current.
fn metrics(shared: &Shared) -> String {
    let up = shared.broker.is_connected();
    shared.metrics.rabbitmq_connected.set(up as i64);
    let handshaking = shared.admission.handshaking();
    shared
        .metrics
        .handshakes_in_progress
        .set(handshaking as i64);
    shared.metrics.render_with(shared.guard.registry())
}

fn readyz(shared: &Shared) -> Response<Body> {
    let broker = shared.broker.is_connected();
    let directory = shared.directory_loaded.load(Ordering::Relaxed);
    let reason = admin::not_ready_reason(shared);
    let status = match reason {
        None => StatusCode::OK,
        Some(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut body = serde_json::json!({
        "rabbitmq": broker, "directory": directory, "agents": shared.directory().len(),
        "sessions": shared.sessions.len(),
    });
    if let Some(reason) = reason {
        body["reason"] = reason.into();
    }
    http::json(status, &body)
}

/// Answers the WebSocket upgrade and starts the session once hyper hands the connection over.
fn upgrade(shared: Arc<Shared>, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    if shared.stopping.load(Ordering::Relaxed) {
        return http::error(StatusCode::SERVICE_UNAVAILABLE, "server shutting down");
    }
    let config = transport::ws_config(shared.config.max_message_bytes);
    let (response, websocket) = match http::upgrade_websocket(&mut req, config) {
        Ok(pair) => pair,
        Err(refusal) => return http::error(StatusCode::BAD_REQUEST, refusal),
    };
    // Taken before answering 101, so a flood of upgrades is refused while still cheap.
    let Some(ticket) = shared.admission.handshake(peer) else {
        let mut r = http::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many handshakes in progress; retry",
        );
        r.headers_mut().insert(
            hyper::header::RETRY_AFTER,
            hyper::header::HeaderValue::from(1),
        );
        return r;
    };
    crate::runtime::spawn(async move {
        match websocket.await {
            Ok((ws, budget)) => session::run(shared, ws, peer, ticket.with_budget(budget)).await,
            Err(e) => log::debug!("WebSocket upgrade from {peer} failed: {e}"),
        }
    })
    .detach();
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use argh::FromArgs;

    fn args(extra: &[&str]) -> ServerArgs {
        let mut all = vec!["--agents-file", "a.json"];
        all.extend_from_slice(extra);
        ServerArgs::from_args(&["run"], &all).unwrap()
    }

    #[test]
    fn loopback_hosts() {
        for h in ["localhost", "LOCALHOST", "127.0.0.1", "127.8.9.10", "[::1]"] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["192.0.2.1", "[2001:db8::1]", "localhost.example", "0.0.0.0"] {
            assert!(!is_loopback(h), "{h}");
        }
    }

    #[test]
    fn plain_http_centops_needs_loopback_or_the_flag() {
        let ok = |extra: &[&str]| ServerConfig::from_args(args(extra)).map(|_| ());
        assert!(ok(&["--centops-url", "http://127.0.0.1:9/a"]).is_ok());
        assert!(ok(&["--centops-url", "https://centops.example/a"]).is_ok());
        let e = ok(&["--centops-url", "http://192.0.2.1/a"]).unwrap_err();
        assert!(e.to_string().contains("--allow-insecure-centops"), "{e}");
        assert!(ok(&[
            "--centops-url",
            "http://192.0.2.1/a",
            "--allow-insecure-centops"
        ])
        .is_ok());
        let e = ok(&["--centops-ca-file", "ca.crt"]).unwrap_err();
        assert!(e.to_string().contains("without --centops-url"), "{e}");
        let e = ok(&["--max-handshakes", "0"]).unwrap_err();
        assert!(e.to_string().contains("--max-handshakes"), "{e}");
    }
}
