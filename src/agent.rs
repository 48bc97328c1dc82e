//! `dmr-agent`: an agency's end of DMR.
//!
//! The agent holds the agency's private key. It serves the local [`api`], keeps a [`link`]
//! to one of the servers (failing over between them), seals outgoing messages to the
//! recipient's key and opens incoming ones in the [`inbox`], which delivers them to the
//! local service's webhook exactly once per message id thanks to the [`replay`] guard,
//! which lives in the agent's state dir ([`crate::state`]). Which key belongs to which
//! agent is decided by [`trust`]: a directory signed by an operator key, or keys pinned on
//! first use. Sends waiting for the server's answer live in the [`outbox`]; the JSON bodies
//! of both edges are in [`bodies`].

mod api;
mod bodies;
mod hosts;
mod inbox;
mod link;
mod outbox;
mod receipt;
mod replay;
mod status;
mod trust;
mod webhook;

/// The `POST /v1/messages` body parser, public so it can be fuzzed (`fuzz/`, `tests/fuzz.rs`).
pub use bodies::{SendRequest, SendRequestError};
/// `--api-host` values and the `Host` check they feed.
pub use hosts::{AllowedHosts, ApiHost};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_lock::Semaphore;

use crate::config::{require_agent_id, split_list, AgentArgs, ConfigError, KeygenArgs, Secret};
use crate::crypto::{Opener, Sealer};
use crate::directory::Directory;
use crate::metrics::AgentMetrics;
use crate::protocol::{AgentId, ClientFrame, Limits};
use crate::runtime;
use crate::signals::{self, Signal};
use crate::signing::DirectoryKeys;
use crate::state::State;
use crate::sync::{lock, read};

/// The largest envelope this agent sends or takes (1 MiB, the server's default
/// `--max-message-bytes`). A server announcing a larger limit in `Welcome` cannot raise it:
/// the agent never reads a frame over this plus `FRAME_OVERHEAD`.
const AGENT_MAX_MESSAGE: usize = 1 << 20;
/// Largest request head (request line and headers) the local API reads, as on the server.
const API_MAX_HEAD: usize = 16 * 1024;

/// Everything `run` needs, validated. `Debug` never shows the API token.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub id: AgentId,
    pub key_path: PathBuf,
    pub servers: Vec<link::ServerUrl>,
    pub listen: SocketAddr,
    pub deliver_url: Option<hyper::Uri>,
    pub api_token: Option<Secret>,
    /// `--api-host`: names accepted in `Host` besides the listen address and loopback.
    pub api_hosts: Vec<ApiHost>,
    /// `--allow-no-token`: listening off loopback without a token was asked for.
    pub allow_no_token: bool,
    pub ca_file: Option<PathBuf>,
    pub max_concurrent_deliveries: usize,
    /// `--max-api-connections`: connections the local API holds at once.
    pub max_api_connections: usize,
    /// The freshness window (`--message-ttl`), in milliseconds.
    pub message_ttl_ms: u64,
    /// Longest pause between delivery attempts during a local service outage.
    pub webhook_retry_max: Duration,
    /// How long `POST /v1/messages` waits for the server's answer.
    pub send_timeout: Duration,
    /// `--previous-key`: the private key before the last rotation, tried when a message
    /// does not open with the current one.
    pub previous_key_path: Option<PathBuf>,
    /// `--metrics-listen`: `/metrics` only there, not on `listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// `--state-dir`, or its default for this agent id.
    pub state_dir: PathBuf,
    /// `--directory-key` files; none means keys are pinned on first use.
    pub directory_keys: Vec<PathBuf>,
    /// `--status-url`: where each status change of a sent message is posted.
    pub status_url: Option<hyper::Uri>,
    /// `--outbox-max-messages`.
    pub outbox_max_messages: u64,
}

/// Where systemd's `StateDirectory=` puts an agent's state unless `--state-dir` says
/// otherwise: `$STATE_DIRECTORY/<id>` (the first one, when systemd lists several), else
/// `/var/lib/dmr-agent/<id>`. The id is part of it, so agents on one host never share one.
pub fn default_state_dir(id: &AgentId, state_directory: Option<&str>) -> PathBuf {
    let base = state_directory
        .and_then(|v| v.split(':').find(|p| !p.is_empty()))
        .unwrap_or("/var/lib/dmr-agent");
    Path::new(base).join(id.as_str())
}

fn http_url(flag: &'static str, u: String) -> Result<hyper::Uri, ConfigError> {
    u.parse::<hyper::Uri>()
        .ok()
        .filter(|u| u.host().is_some() && matches!(u.scheme_str(), Some("http" | "https")))
        .ok_or_else(|| ConfigError::Invalid {
            flag,
            value: u.clone(),
            why: "not an http(s) URL".into(),
        })
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
        let status_url = a
            .status_url
            .filter(|u| !u.is_empty())
            .map(|u| http_url("--status-url", u))
            .transpose()?;
        let api_token = a.api_token.filter(|t| !t.expose().is_empty());
        check_exposure(a.listen, api_token.is_some(), a.allow_no_token)?;
        let api_hosts = split_list(&a.api_host)
            .iter()
            .map(|h| ApiHost::parse(h))
            .collect::<Result<Vec<_>, _>>()?;
        for (flag, value) in [
            ("--max-concurrent-deliveries", a.max_concurrent_deliveries),
            ("--max-api-connections", a.max_api_connections),
        ] {
            if value == 0 {
                return Err(ConfigError::TooSmall { flag, min: "1" });
            }
        }
        let state_dir = a.state_dir.unwrap_or_else(|| {
            default_state_dir(&id, std::env::var("STATE_DIRECTORY").ok().as_deref())
        });
        let directory_keys = split_list(&a.directory_key)
            .into_iter()
            .map(PathBuf::from)
            .collect();
        Ok(Self {
            state_dir,
            directory_keys,
            id,
            key_path,
            servers,
            listen: a.listen,
            deliver_url,
            api_token,
            api_hosts,
            allow_no_token: a.allow_no_token,
            ca_file: a.ca_file,
            max_concurrent_deliveries: a.max_concurrent_deliveries,
            max_api_connections: a.max_api_connections,
            message_ttl_ms: a.message_ttl.saturating_mul(1000),
            webhook_retry_max: Duration::from_secs(a.webhook_retry_max.max(1)),
            send_timeout: Duration::from_secs(30),
            status_url,
            outbox_max_messages: a.outbox_max_messages,
            previous_key_path: a.previous_key,
            metrics_listen: a.metrics_listen,
        })
    }
}

/// Off loopback, anyone who reaches the API could send as this agent: a token is needed
/// unless the operator says a firewall does the job (`--allow-no-token`).
fn check_exposure(listen: SocketAddr, token: bool, allowed: bool) -> Result<(), ConfigError> {
    if listen.ip().is_loopback() || token || allowed {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        flag: "--listen",
        value: listen.to_string(),
        why: "off loopback, anyone who can reach the API could send as this agent: set \
              --api-token (DMR_API_TOKEN), or pass --allow-no-token (DMR_ALLOW_NO_TOKEN=1) if \
              a firewall lets only the local service in"
            .into(),
    })
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
    /// Seals with our key, one HPKE epoch per recipient key (also holds the key for the
    /// handshake proof).
    sealer: Sealer,
    /// Opens with our key and the one before the last rotation (`--previous-key`), if
    /// given, one cached HPKE context per sender epoch.
    opener: Opener,
    directory: RwLock<Arc<Directory>>,
    limits: RwLock<Option<Limits>>,
    link: Mutex<Option<Link>>,
    outbox: outbox::Outbox,
    /// The state dir: pinned keys, the replay guard, statuses and the outbox.
    state: Arc<State>,
    /// Commits delivered-message records in batches, before their `Ack`.
    recorder: replay::Recorder,
    /// Which directory and keys this agent accepts.
    trust: trust::Trust,
    deliveries: Semaphore,
    /// `Deliver` frames being handled; bounds the tasks a server can make us spawn.
    pending_deliveries: Arc<Semaphore>,
    metrics: AgentMetrics,
    tls: Option<futures_rustls::TlsConnector>,
    /// Delivery to the local service, shared by every delivery in progress.
    webhook: webhook::Webhook,
    /// Statuses of the messages this agent sent.
    statuses: Arc<status::Statuses>,
    /// Deliveries to receipt, waiting to be batched, sealed and sent (see `receipt::run`).
    receipts: (
        async_channel::Sender<receipt::Owed>,
        async_channel::Receiver<receipt::Owed>,
    ),
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

/// `dmr-agent keygen`: writes PREFIX.key (0600) and PREFIX.pub; with `--force` the
/// previous private key stays as PREFIX.key.old (0600).
pub fn keygen(args: &KeygenArgs) -> Result<(), Box<dyn std::error::Error>> {
    let out = args.out.as_ref().ok_or(ConfigError::Missing {
        flag: "--out",
        example: Some("--out /etc/dmr/police (writes police.key and police.pub)"),
    })?;
    let key_path = crate::crypto::with_suffix(out, "key");
    // A regular file there is what --force keeps (a link is only removed).
    let replacing = std::fs::symlink_metadata(&key_path).is_ok_and(|m| m.is_file());
    let (key, public) = crate::crypto::write_key_pair(out, args.force)
        .map_err(|e| format!("cannot write the key pair: {e}"))?;
    println!(
        "wrote {} (private, keep it secret) and {} (public, for the directory)",
        key.display(),
        public.display()
    );
    if args.force && replacing {
        let old = crate::crypto::old_key_path(&key_path);
        println!("kept the previous private key as {}", old.display());
    }
    Ok(())
}

impl Agent {
    /// Reads the key and prepares TLS; fails with a message naming the flag at fault.
    fn new(config: AgentConfig) -> Result<Arc<Self>, Box<dyn std::error::Error>> {
        let key =
            crate::crypto::read_key_file(&config.key_path).map_err(|e| format!("--key: {e}"))?;
        let previous_key = match &config.previous_key_path {
            None => None,
            Some(p) => {
                let old =
                    crate::crypto::read_key_file(p).map_err(|e| format!("--previous-key: {e}"))?;
                log::info!(
                    "--previous-key {}: messages sealed to it still open; drop it once the \
                     message TTL has passed since the rotation",
                    p.display()
                );
                Some(old)
            }
        };
        let key = Arc::new(key);
        let sealer = Sealer::new(key.clone());
        let opener = match previous_key {
            Some(old) => Opener::new(key).with_previous(old),
            None => Opener::new(key),
        };
        let keys = DirectoryKeys::read(&config.directory_keys)
            .map_err(|e| format!("--directory-key: {e}"))?;
        let state = Arc::new(State::open(&config.state_dir)?);
        let https_webhook = [&config.deliver_url, &config.status_url]
            .iter()
            .any(|u| u.as_ref().is_some_and(|u| u.scheme_str() == Some("https")));
        let tls = match config.servers.iter().any(|s| s.tls) || https_webhook {
            true => Some(crate::transport::client_tls(config.ca_file.as_deref())?),
            false => None,
        };
        let webhook_retry_max = config.webhook_retry_max;
        let stored = state.outbox_len()?;
        if stored > 0 {
            log::info!("{stored} messages wait in the outbox from an earlier run");
        }
        let statuses = Arc::new(status::Statuses::new(
            state.clone(),
            config.message_ttl_ms,
            config.status_url.is_some(),
        ));
        Ok(Arc::new(Agent {
            outbox: outbox::Outbox::new(stored, config.outbox_max_messages),
            statuses,
            receipts: async_channel::unbounded(),
            deliveries: Semaphore::new(config.max_concurrent_deliveries),
            recorder: replay::Recorder::new(state.clone()),
            trust: trust::Trust::new(keys),
            state,
            pending_deliveries: Arc::new(Semaphore::new(
                link::MAX_PENDING_DELIVERIES.max(config.max_concurrent_deliveries),
            )),
            config,
            sealer,
            opener,
            directory: RwLock::default(),
            limits: RwLock::default(),
            link: Mutex::default(),
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
    runtime::block_on(serve(agent, signals))
        .map_err(|e| format!("cannot start the agent's runtime: {e}"))?
}

/// Off loopback the API is reachable by others: say what protects it, and what does not.
fn warn_if_exposed(config: &AgentConfig) {
    let listen = config.listen;
    if listen.ip().is_loopback() {
        return;
    }
    match config.api_token {
        None => log::warn!(
            "the API on {listen} is off loopback and has no --api-token (--allow-no-token): \
             whoever reaches it can send as this agent"
        ),
        Some(_) => log::warn!(
            "the API on {listen} is off loopback over plain HTTP: the bearer token and \
             messages cross the network in clear unless a TLS proxy fronts it"
        ),
    }
}

async fn serve(
    agent: Arc<Agent>,
    signals: async_channel::Receiver<Signal>,
) -> Result<(), Box<dyn std::error::Error>> {
    let listen = agent.config.listen;
    let listener = crate::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let bound = listener.local_addr().unwrap_or(listen);
    let hosts = Arc::new(AllowedHosts::new(bound, &agent.config.api_hosts));
    let (id, public) = (&agent.config.id, agent.sealer.key().public_key());
    log::info!("agent {id} API on http://{bound}/v1/messages; public key {public:?}");
    warn_if_exposed(&agent.config);
    if agent.config.deliver_url.is_none() {
        log::warn!("no --deliver-url: incoming messages stay in the queue until one is configured");
    }
    let metrics_task = match agent.config.metrics_listen {
        None => None,
        Some(addr) => {
            let listener = crate::metrics::bind_separately(addr).await?;
            log::info!("metrics on http://{addr}/metrics (not on --listen)");
            let render = {
                let agent = agent.clone();
                Arc::new(move || agent.metrics.render()) as Arc<dyn Fn() -> String + Send + Sync>
            };
            Some(crate::metrics::serve_separately(listener, render))
        }
    };
    log::info!(
        "state in {}; directory keys: {}",
        agent.config.state_dir.display(),
        match agent.trust.signed() {
            true => "only a directory signed by --directory-key is accepted",
            false => "none (agent keys are pinned on first use)",
        }
    );
    let recorder = runtime::spawn(replay::record(agent.clone()));
    let expiry = runtime::spawn(replay::expire(agent.clone()));
    let confirmations = runtime::spawn(trust::watch_confirmations(agent.clone()));
    let link = runtime::spawn(link::run(agent.clone()));
    let (stop_writer, writer_stop) = async_channel::bounded::<()>(1);
    let writer = runtime::spawn(status::run_writer(agent.statuses.clone(), writer_stop));
    let drain = runtime::spawn(outbox::drain(agent.clone()));
    let receipts = runtime::spawn(receipt::run(agent.clone()));
    let notifier = agent.config.status_url.clone().map(|url| {
        let client = crate::http::Client::new(agent.tls.clone());
        let retry = agent.config.webhook_retry_max;
        runtime::spawn(status::run_notifier(
            agent.statuses.clone(),
            client,
            url,
            retry,
        ))
    });
    let stop = async {
        while let Ok(sig) = signals.recv().await {
            match sig {
                Signal::Terminate => break,
                Signal::Reload => trust::apply_confirmations(&agent).await,
            }
        }
    };
    let handler = {
        let agent = agent.clone();
        move |req, _peer| api::route(agent.clone(), hosts.clone(), req)
    };
    let options = crate::http::ServeOptions {
        max_connections: Some(agent.config.max_api_connections),
        on_refused: None,
        max_head_bytes: Some(API_MAX_HEAD),
    };
    crate::http::serve_with(listener, None, options, handler, stop).await;
    log::info!("stopping: finishing deliveries in progress");
    inbox::drain(&agent, Duration::from_secs(10)).await;
    drop((link, drain, receipts, notifier));
    drop(metrics_task);
    drop((recorder, expiry, confirmations));
    stop_writer.close();
    writer.await;
    status::flush(&agent.statuses).await;
    log::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_state_dir_holds_the_agent_id() {
        let id = AgentId::new("police").unwrap();
        let dir = |v| default_state_dir(&id, v);
        assert_eq!(dir(None), PathBuf::from("/var/lib/dmr-agent/police"));
        assert_eq!(dir(Some("/var/lib/x")), PathBuf::from("/var/lib/x/police"));
        // systemd lists several StateDirectory= paths separated by colons: the first wins.
        assert_eq!(dir(Some("/s/a:/s/b")), PathBuf::from("/s/a/police"));
        assert_eq!(dir(Some("")), PathBuf::from("/var/lib/dmr-agent/police"));
    }
}
