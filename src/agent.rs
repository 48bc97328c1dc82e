//! `dmr-agent`: an agency's end of DMR.
//!
//! The agent holds the agency's private key. It serves the local [`api`], keeps a [`link`]
//! to one of the servers (failing over between them), seals outgoing messages to the
//! recipient's key and opens incoming ones in the [`inbox`], which delivers them to the
//! local service's webhook exactly once per message id thanks to the [`replay`] guard.
//! Sends waiting for the server's answer live in the [`outbox`]; the JSON bodies of both
//! edges are in [`bodies`].

mod api;
mod bodies;
mod inbox;
mod link;
mod outbox;
mod replay;
mod webhook;

/// The `POST /v1/messages` body parser, public so it can be fuzzed (`fuzz/`, `tests/fuzz.rs`).
pub use bodies::{SendRequest, SendRequestError};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_lock::Semaphore;

use crate::config::{require_agent_id, split_list, AgentArgs, ConfigError, KeygenArgs};
use crate::crypto::SecretKey;
use crate::directory::Directory;
use crate::metrics::AgentMetrics;
use crate::protocol::{AgentId, ClientFrame, Limits};
use crate::signals::{self, Signal};
use crate::sync::{lock, read};

/// The largest envelope this agent sends or takes (1 MiB, the server's default
/// `--max-message-bytes`). A server announcing a larger limit in `Welcome` cannot raise it:
/// the agent never reads a frame over this plus `FRAME_OVERHEAD`.
const AGENT_MAX_MESSAGE: usize = 1 << 20;

/// Everything `run` needs, validated.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub id: AgentId,
    pub key_path: PathBuf,
    pub servers: Vec<link::ServerUrl>,
    pub listen: SocketAddr,
    pub deliver_url: Option<hyper::Uri>,
    pub api_token: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub max_concurrent_deliveries: usize,
    /// The freshness window (`--message-ttl`), in milliseconds.
    pub message_ttl_ms: u64,
    /// Longest pause between delivery attempts during a local service outage.
    pub webhook_retry_max: Duration,
    /// How long `POST /v1/messages` waits for the server's answer.
    pub send_timeout: Duration,
}

impl AgentConfig {
    /// Checks a flag combination and turns it into a configuration.
    pub fn from_args(a: AgentArgs) -> Result<Self, ConfigError> {
        let id = require_agent_id(&a.id)?;
        let key_path = a.key.ok_or(ConfigError::Missing {
            flag: "--key",
            example: None,
        })?;
        let servers = split_list(&a.server)
            .iter()
            .map(|s| link::ServerUrl::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        if servers.is_empty() {
            return Err(ConfigError::Missing {
                flag: "--server",
                example: Some("ws://127.0.0.1:8075/v1/ws"),
            });
        }
        let deliver_url = match a.deliver_url {
            None => None,
            Some(u) => Some(
                u.parse::<hyper::Uri>()
                    .ok()
                    .filter(|u| {
                        u.host().is_some() && matches!(u.scheme_str(), Some("http" | "https"))
                    })
                    .ok_or_else(|| ConfigError::Invalid {
                        flag: "--deliver-url",
                        value: u.clone(),
                        why: "not an http(s) URL".into(),
                    })?,
            ),
        };
        if a.max_concurrent_deliveries == 0 {
            return Err(ConfigError::TooSmall {
                flag: "--max-concurrent-deliveries",
                min: "1",
            });
        }
        Ok(Self {
            id,
            key_path,
            servers,
            listen: a.listen,
            deliver_url,
            api_token: a.api_token.filter(|t| !t.is_empty()),
            ca_file: a.ca_file,
            max_concurrent_deliveries: a.max_concurrent_deliveries,
            message_ttl_ms: a.message_ttl.saturating_mul(1000),
            webhook_retry_max: Duration::from_secs(a.webhook_retry_max.max(1)),
            send_timeout: Duration::from_secs(30),
        })
    }
}

/// The current server connection: its number and its outgoing frame queue.
#[derive(Clone)]
struct Link {
    generation: u64,
    frames: async_channel::Sender<ClientFrame>,
}

/// State shared by the API, the link and the inbox.
struct Agent {
    config: AgentConfig,
    key: SecretKey,
    directory: RwLock<Arc<Directory>>,
    limits: RwLock<Option<Limits>>,
    link: Mutex<Option<Link>>,
    outbox: outbox::Outbox,
    replay: Mutex<replay::Guard>,
    deliveries: Semaphore,
    /// `Deliver` frames being handled; bounds the tasks a server can make us spawn.
    pending_deliveries: Arc<Semaphore>,
    metrics: AgentMetrics,
    tls: Option<futures_rustls::TlsConnector>,
    /// Delivery to the local service, shared by every delivery in progress.
    webhook: webhook::Webhook,
}

impl Agent {
    fn directory(&self) -> Arc<Directory> {
        read(&self.directory).clone()
    }

    fn limits(&self) -> Option<Limits> {
        *read(&self.limits)
    }

    /// The largest message both the server (once it said) and this agent take.
    fn max_message_bytes(&self) -> usize {
        self.limits().map_or(AGENT_MAX_MESSAGE, |l| {
            (l.max_message_bytes as usize).min(AGENT_MAX_MESSAGE)
        })
    }

    fn link(&self) -> Option<Link> {
        lock(&self.link).clone()
    }
}

/// `dmr-agent keygen`: writes PREFIX.key (0600) and PREFIX.pub.
pub fn keygen(args: &KeygenArgs) -> Result<(), Box<dyn std::error::Error>> {
    let out = args.out.as_ref().ok_or(ConfigError::Missing {
        flag: "--out",
        example: Some("--out /etc/dmr/police (writes police.key and police.pub)"),
    })?;
    let (key, public) = crate::crypto::write_key_pair(out, args.force)
        .map_err(|e| format!("cannot write the key pair: {e}"))?;
    println!(
        "wrote {} (private, keep it secret) and {} (public, for the directory)",
        key.display(),
        public.display()
    );
    Ok(())
}

impl Agent {
    /// Reads the key and prepares TLS; fails with a message naming the flag at fault.
    fn new(config: AgentConfig) -> Result<Arc<Self>, Box<dyn std::error::Error>> {
        let path = config.key_path.display();
        let pem = std::fs::read_to_string(&config.key_path)
            .map_err(|e| format!("cannot read --key {path}: {e}"))?;
        let key = SecretKey::from_pem(&pem).map_err(|e| format!("--key {path}: {e}"))?;
        let https_webhook = config
            .deliver_url
            .as_ref()
            .is_some_and(|u| u.scheme_str() == Some("https"));
        let tls = match config.servers.iter().any(|s| s.tls) || https_webhook {
            true => Some(crate::transport::client_tls(config.ca_file.as_deref())?),
            false => None,
        };
        let webhook_retry_max = config.webhook_retry_max;
        Ok(Arc::new(Agent {
            deliveries: Semaphore::new(config.max_concurrent_deliveries),
            pending_deliveries: Arc::new(Semaphore::new(
                link::MAX_PENDING_DELIVERIES.max(config.max_concurrent_deliveries),
            )),
            replay: Mutex::new(replay::Guard::default()),
            config,
            key,
            directory: RwLock::default(),
            limits: RwLock::default(),
            link: Mutex::default(),
            outbox: outbox::Outbox::default(),
            metrics: AgentMetrics::default(),
            webhook: webhook::Webhook::new(
                crate::http::Client::new(tls.clone()),
                webhook_retry_max,
            ),
            tls,
        }))
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(args: AgentArgs) -> Result<(), Box<dyn std::error::Error>> {
    let agent = Agent::new(AgentConfig::from_args(args)?)?;
    let signals = signals::listen()?;
    smol::block_on(serve(agent, signals))
}

async fn serve(
    agent: Arc<Agent>,
    signals: async_channel::Receiver<Signal>,
) -> Result<(), Box<dyn std::error::Error>> {
    let listen = agent.config.listen;
    let listener = smol::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let (id, public) = (&agent.config.id, agent.key.public_key());
    log::info!("agent {id} API on http://{listen}/v1/messages; public key {public:?}");
    if agent.config.deliver_url.is_none() {
        log::warn!("no --deliver-url: incoming messages stay in the queue until one is configured");
    }
    let link = smol::spawn(link::run(agent.clone()));
    let stop = async {
        while let Ok(sig) = signals.recv().await {
            if sig == Signal::Terminate {
                break;
            }
        }
    };
    let handler = {
        let agent = agent.clone();
        move |req, _peer| api::route(agent.clone(), req)
    };
    crate::http::serve(listener, None, handler, stop).await;
    log::info!("stopping: finishing deliveries in progress");
    inbox::drain(&agent, Duration::from_secs(10)).await;
    drop(link);
    log::info!("stopped");
    Ok(())
}
