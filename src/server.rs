//! `dmr-server run`: the stateless relay.
//!
//! One listener serves the agent WebSocket (`/v1/ws`) and the operator endpoints
//! (`/healthz`, `/readyz`, `/metrics`). Each authenticated agent gets a [`session`]; the
//! [`watch`] task keeps the directory current; the [`Broker`] holds the RabbitMQ side.
//! The server keeps no message state of its own: what it has accepted is in RabbitMQ.

mod guard;
mod outstanding;
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

use crate::broker::{Broker, Topology};
use crate::config::{split_list, ConfigError, ServerArgs};
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
    pub(crate) amqp_urls: Vec<String>,
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
}

impl ServerConfig {
    /// Checks a flag combination and turns it into a configuration.
    pub(crate) fn from_args(a: ServerArgs) -> Result<Self, ConfigError> {
        let amqp_urls = split_list(std::slice::from_ref(&a.amqp_url));
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
        for (flag, url) in [
            ("--centops-url", &a.centops_url),
            ("--centops-signature-url", &a.centops_signature_url),
        ] {
            if let Some(u) = url {
                u.parse::<hyper::Uri>()
                    .ok()
                    .filter(|u| {
                        u.host().is_some() && matches!(u.scheme_str(), Some("http" | "https"))
                    })
                    .ok_or_else(|| ConfigError::Invalid {
                        flag,
                        value: u.clone(),
                        why: "not an http(s) URL".into(),
                    })?;
            }
        }
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
        ];
        if let Some(&(flag, _, min)) = at_least_one.iter().find(|(_, v, _)| *v == 0) {
            return Err(ConfigError::TooSmall { flag, min });
        }
        let instance = a
            .instance
            .unwrap_or_else(|| format!("{}:{}", crate::audit::hostname(), a.listen.port()));
        Ok(Self {
            policy_file: a.policy_file,
            audit_log: a.audit_log,
            instance,
            listen: a.listen,
            amqp_urls,
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
        })
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
    directory_loaded: AtomicBool,
    sessions: Sessions,
    broker: Broker,
    metrics: ServerMetrics,
    /// Open sessions and publishes awaiting a confirm; shutdown waits for them.
    outstanding: Outstanding,
    /// Policy, rate limits and audit log (`--policy-file`, `--audit-log`).
    guard: guard::Guard,
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

    /// Ready = RabbitMQ connected, a directory loaded, and not stopping.
    fn ready(&self) -> bool {
        self.broker.is_connected()
            && self.directory_loaded.load(Ordering::Relaxed)
            && !self.stopping.load(Ordering::Relaxed)
    }
}

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
    let broker = Broker::start(config.amqp_urls.clone(), config.topology.clone())?;
    let signals = signals::listen()?;
    smol::block_on(async move {
        let listener = smol::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        log::info!(
            "listening on {scheme}://{}/v1/ws (health: /healthz /readyz, metrics: /metrics)",
            config.listen
        );
        let shared = Arc::new(Shared {
            broker,
            config,
            directory: RwLock::default(),
            documents: RwLock::default(),
            directory_loaded: AtomicBool::new(false),
            sessions: Sessions::default(),
            metrics: ServerMetrics::default(),
            outstanding: Outstanding::default(),
            guard,
            stopping: AtomicBool::new(false),
        });
        let (reload_tx, reload_rx) = async_channel::unbounded();
        let watcher = smol::spawn(watch::run(shared.clone(), reload_rx));
        let policy_watcher = (shared.config.policy_file.clone())
            .map(|path| smol::spawn(guard::watch(shared.clone(), path)));
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
        http::serve(listener, tls, handler, stop).await;
        drop(watcher);
        drop(policy_watcher);
        shutdown(&shared).await;
        Ok(())
    })
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
    shared.metrics.render_with(shared.guard.registry())
}

fn readyz(shared: &Shared) -> Response<Body> {
    let broker = shared.broker.is_connected();
    let directory = shared.directory_loaded.load(Ordering::Relaxed);
    let status = match shared.ready() {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    http::json(
        status,
        &serde_json::json!({
            "rabbitmq": broker, "directory": directory, "agents": shared.directory().len(),
            "sessions": shared.sessions.len(),
        }),
    )
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
    smol::spawn(async move {
        match websocket.await {
            Ok(ws) => session::run(shared, ws, peer).await,
            Err(e) => log::debug!("WebSocket upgrade from {peer} failed: {e}"),
        }
    })
    .detach();
    response
}
