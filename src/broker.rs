//! RabbitMQ: the topology of DESIGN §6, publishing with confirms, consuming, reconnection.
//!
//! A [`Broker`] owns one AMQP connection that a background task keeps alive. It connects to
//! the first reachable node of `--amqp-url`, declares the exchanges, the dead-letter queue and
//! every known agent's queue, and opens a publishing channel in confirm mode. On any loss it
//! reconnects with exponential backoff (capped at 5 s, with jitter) and declares again. While
//! it is down, [`Broker::publish`] fails at once with [`BrokerError::NotConnected`]: nothing is
//! buffered in memory, so nothing reported durable can be lost.
//!
//! amqprs is tokio-based and this project runs on smol: every amqprs future here is awaited
//! inside [`async_compat::Compat`], and every amqprs value kept beyond one call is wrapped in
//! `Compat`, so that dropping it (amqprs spawns a tokio task to close it) works anywhere.
//! Nothing amqprs-typed leaves this module.
//!
//! `amqps://` nodes are reached over TLS (rustls with ring), trusting the CA file of
//! [`BrokerOptions::ca_file`] (`--amqp-ca-file`) or else the web PKI roots; the certificate
//! must name the URL's host.
//!
//! The parts: [`Topology`] (names and arguments), [`BrokerError`], `compat` (amqprs on smol),
//! `supervisor` (the reconnect loop), `connect` (setting up one connection), `url` (node
//! URLs), `tls` (amqps), `declare` (topology operations), `channel` (why RabbitMQ closed a
//! channel), `publisher` (confirms), [`Consumer`], `health` (are publishes confirmed, for
//! readiness) and `dlq` (reading, replaying and purging the dead-letter queue).

mod channel;
mod compat;
mod connect;
mod consumer;
mod declare;
mod dlq;
mod error;
mod health;
mod notice;
mod publisher;
mod supervisor;
mod tls;
mod topology;
mod url;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_compat::Compat;
use futures_lite::future;

pub use consumer::{Consumer, Delivery};
pub use dlq::{DeadLetter, DlqSnapshot};
pub use error::BrokerError;
pub use notice::HEADER_NOTICE;
pub use topology::Topology;

use crate::protocol::{AgentId, Header};
use crate::sync::lock;
use crate::wait::with_timeout;
use compat::detached;
use connect::Live;
use declare::{Declarer, Op};
use health::PublishHealth;
use tls::Tls;
use url::NodeUrl;

/// AMQP header naming the sending agent of a published envelope.
pub(crate) const HEADER_SENDER: &str = "dmr-sender";
/// AMQP header naming the recipient agent of a published envelope.
pub(crate) const HEADER_RECIPIENT: &str = "dmr-recipient";
/// AMQP header carrying why DMR dead-lettered a message itself (see [`Broker::dead_letter`]).
pub const HEADER_REASON: &str = "x-dmr-reason";
/// Longest reason kept in [`HEADER_REASON`]; reasons are one-line summaries, not logs.
const MAX_REASON_CHARS: usize = 300;
/// AMQP `content_type` of published envelopes.
pub(crate) const CONTENT_TYPE: &str = "application/x-dmr-envelope";

/// How long a publish waits for RabbitMQ's confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a caller waits for a declare, delete or consume.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to RabbitMQ that keeps itself alive. Clones share the connection.
#[derive(Clone)]
pub struct Broker {
    shared: Arc<Shared>,
}

/// What the [`Broker`] handles and its supervisor task share.
struct Shared {
    nodes: Vec<NodeUrl>,
    /// How `amqps://` nodes are reached; `None` when every node is `amqp://`.
    tls: Option<Tls>,
    topology: Topology,
    exchange: String,
    dlx: String,
    connection_name: String,
    state: Mutex<State>,
    generation: AtomicU64,
    stopping: AtomicBool,
    /// Closed by [`Broker::close`] to stop the supervisor.
    stop: async_channel::Sender<()>,
    stopped: async_channel::Receiver<()>,
    /// Closed by the supervisor when it has finished.
    done: async_channel::Receiver<()>,
    /// Whether publishes get their confirms, for readiness.
    health: PublishHealth,
}

struct State {
    live: Option<Arc<Live>>,
    /// While disconnected: a channel that is closed on connection, to wake `connected()`.
    gate: Option<(async_channel::Sender<()>, async_channel::Receiver<()>)>,
    /// Agents whose queues are (re-)declared on every connection.
    agents: BTreeSet<AgentId>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn live(&self) -> Option<Arc<Live>> {
        self.state().live.clone()
    }
}

fn default_connection_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    let host = if host.is_empty() { "localhost" } else { host };
    format!("dmr-server@{host} pid {}", std::process::id())
}

/// Settings of a [`Broker`] beyond its URLs and topology.
#[derive(Clone, Debug, Default)]
pub struct BrokerOptions {
    /// The connection name RabbitMQ shows (management UI, `rabbitmqctl list_connections
    /// user_provided_name`); default `dmr-server@HOST pid N`.
    pub connection_name: Option<String>,
    /// PEM file of the CA certificates (one or more) trusted for `amqps://` nodes instead of
    /// the web PKI roots (`--amqp-ca-file`).
    pub ca_file: Option<PathBuf>,
}

/// The TLS settings the nodes need: loaded (and checked) whenever a CA file is given.
fn tls_for(
    nodes: &[NodeUrl],
    ca_file: Option<&std::path::Path>,
) -> Result<Option<Tls>, BrokerError> {
    let plain: Vec<&str> = nodes
        .iter()
        .filter(|n| !n.tls)
        .map(|n| n.display.as_str())
        .collect();
    if plain.len() == nodes.len() {
        if ca_file.is_some() {
            log::warn!("{} is ignored: no --amqp-url is amqps://", tls::CA_FLAG);
        }
        return ca_file.map(|f| Tls::new(Some(f))).transpose();
    }
    if !plain.is_empty() {
        log::warn!(
            "--amqp-url mixes amqps:// and amqp:// nodes: messages and the RabbitMQ password \
             cross the network unencrypted to {}",
            plain.join(", ")
        );
    }
    Tls::new(ca_file).map(Some)
}

/// Parses the comma-separated node URLs of every `--amqp-url`.
fn parse_nodes(urls: &[String]) -> Result<Vec<NodeUrl>, BrokerError> {
    let nodes = urls
        .iter()
        .flat_map(|u| u.split(','))
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            NodeUrl::parse(u)
                .map_err(|e| BrokerError::Config(format!("--amqp-url {}: {e}", url::mask(u))))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if nodes.is_empty() {
        return Err(BrokerError::Config(
            "no RabbitMQ URL given (--amqp-url)".to_owned(),
        ));
    }
    Ok(nodes)
}

/// The vhost of the first node of `--amqp-url` (as given, e.g. `/` for `%2f`).
pub fn vhost_of(urls: &[String]) -> Result<String, BrokerError> {
    let nodes = parse_nodes(urls)?;
    Ok(nodes.first().map(|n| n.vhost.clone()).unwrap_or_default())
}

impl Broker {
    /// Starts the background task that connects, declares the topology and keeps the
    /// connection alive; returns at once (see [`Broker::connected`]).
    ///
    /// Each entry of `urls` is an `amqp://user:password@host:port/vhost` URL (`amqps://`
    /// for TLS, port 5671 by default) or several of them separated by commas (the nodes of
    /// a cluster, tried in turn). Fails only on a URL or topology setting that can never
    /// work.
    pub fn start(urls: Vec<String>, topology: Topology) -> Result<Broker, BrokerError> {
        Self::start_with(urls, topology, BrokerOptions::default())
    }

    /// [`Broker::start`] with the connection name RabbitMQ shows (management UI,
    /// `rabbitmqctl list_connections user_provided_name`).
    pub fn start_named(
        urls: Vec<String>,
        topology: Topology,
        connection_name: &str,
    ) -> Result<Broker, BrokerError> {
        let options = BrokerOptions {
            connection_name: Some(connection_name.to_owned()),
            ..BrokerOptions::default()
        };
        Self::start_with(urls, topology, options)
    }

    /// [`Broker::start`] with [`BrokerOptions`]; a CA file that cannot be read or holds no
    /// usable certificate is refused here.
    pub fn start_with(
        urls: Vec<String>,
        topology: Topology,
        options: BrokerOptions,
    ) -> Result<Broker, BrokerError> {
        topology.validate()?;
        let nodes = parse_nodes(&urls)?;
        let tls = tls_for(&nodes, options.ca_file.as_deref())?;
        let connection_name = options
            .connection_name
            .unwrap_or_else(default_connection_name);
        let (stop, stopped) = async_channel::bounded(1);
        let (done_tx, done) = async_channel::bounded(1);
        let shared = Arc::new(Shared {
            nodes,
            tls,
            exchange: topology.exchange(),
            dlx: topology.dlx(),
            topology,
            connection_name,
            state: Mutex::new(State {
                live: None,
                gate: Some(async_channel::bounded(1)),
                agents: BTreeSet::new(),
            }),
            generation: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            stop,
            stopped,
            done,
            health: PublishHealth::default(),
        });
        crate::runtime::spawn(Compat::new(supervisor::supervise(shared.clone(), done_tx))).detach();
        Ok(Broker { shared })
    }

    /// The topology this broker declares.
    #[cfg(feature = "test-support")]
    pub fn topology(&self) -> &Topology {
        &self.shared.topology
    }

    /// Whether a connection (with its publishing channel) is up right now.
    pub fn is_connected(&self) -> bool {
        self.shared.state().live.is_some()
    }

    /// Resolves when connected, at once if connected now. After [`Broker::close`] it never
    /// resolves.
    pub async fn connected(&self) {
        loop {
            let gate = {
                let state = self.shared.state();
                if state.live.is_some() {
                    return;
                }
                state.gate.as_ref().map(|(_, rx)| rx.clone())
            };
            match gate {
                // Nothing is ever sent: recv() returns when the sender is dropped on connect.
                Some(rx) => {
                    let _ = rx.recv().await;
                }
                None => future::pending::<()>().await,
            }
        }
    }

    /// Counts connections: 0 before the first, then +1 on every (re)connection, so a caller
    /// can tell that its consumer belongs to an old connection.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::SeqCst)
    }

    /// Declares the queues of these agents (idempotent) and remembers them, so they are
    /// declared again after every reconnection. Queues of agents no longer listed are not
    /// deleted.
    ///
    /// When not connected, the agents are remembered and [`BrokerError::NotConnected`] is
    /// returned; they are declared on connection.
    pub async fn declare_agents(&self, agents: &[AgentId]) -> Result<(), BrokerError> {
        self.shared.state().agents.extend(agents.iter().cloned());
        let live = self.shared.live().ok_or(BrokerError::NotConnected)?;
        let topology = self.shared.topology.clone();
        let agents = agents.to_vec();
        let per_agent = Duration::from_millis(20);
        let limit =
            OP_TIMEOUT + per_agent.saturating_mul(agents.len().try_into().unwrap_or(u32::MAX));
        detached(limit, async move {
            let mut declarer = Declarer::new(live.connection.get_ref(), &live.closed_channels);
            let refusals = declarer.agents(&topology, &agents).await?;
            declarer.finish().await;
            if refusals.is_empty() {
                Ok(())
            } else {
                Err(BrokerError::Declare(refusals.join("; ")))
            }
        })
        .await
    }

    /// Publishes one envelope and waits for RabbitMQ's confirm: persistent, `mandatory`,
    /// to the exchange with routing key = recipient id, `message_id` = envelope id, headers
    /// `dmr-sender` and `dmr-recipient`, content type `application/x-dmr-envelope`.
    ///
    /// `Ok` means durable in the recipient's queue. `basic.nack` and `basic.return`
    /// (no queue for the recipient) give [`BrokerError::Refused`]; no confirm within 10 s
    /// gives [`BrokerError::Timeout`]; a connection that is down gives
    /// [`BrokerError::NotConnected`] at once (nothing is buffered); a connection lost while
    /// waiting gives [`BrokerError::Closed`], never `Ok`.
    pub async fn publish(&self, header: &Header, body: Vec<u8>) -> Result<(), BrokerError> {
        self.begin_publish(header, body).await?.confirmed().await
    }

    /// [`Broker::publish`] in two steps: hands the envelope to RabbitMQ and returns at once
    /// with a [`Publish`] whose [`Publish::confirmed`] gives the same outcome. One caller can
    /// so keep many publishes in flight, in order, without a task per publish.
    pub async fn begin_publish(
        &self,
        header: &Header,
        body: Vec<u8>,
    ) -> Result<Publish, BrokerError> {
        if self.shared.stopping.load(Ordering::SeqCst) {
            return Err(BrokerError::Closed(
                "this server is shutting down".to_owned(),
            ));
        }
        let live = self.shared.live().ok_or(BrokerError::NotConnected)?;
        if !live.connection.get_ref().is_open() {
            // Lost a moment ago; the supervisor is about to notice and reconnect.
            return Err(BrokerError::NotConnected);
        }
        if let Some(reason) = lock(&live.signals.blocked).clone() {
            return Err(BrokerError::Blocked(reason));
        }
        let confirm =
            Compat::new(live.publisher.start(&self.shared.exchange, header, body)).await?;
        Ok(Publish {
            confirm,
            broker: self.clone(),
        })
    }

    /// Why publishing does not work right now although connected, if it does not: RabbitMQ
    /// blocks publishers (`connection.blocked`: a memory or disk alarm), or publishes time
    /// out (see `health`). `None` when not connected: [`Broker::is_connected`] says that.
    pub fn publish_problem(&self) -> Option<String> {
        let live = self.shared.live()?;
        if let Some(reason) = lock(&live.signals.blocked).clone() {
            return Some(format!("RabbitMQ blocks publishing: {reason}"));
        }
        self.shared.health.problem(Instant::now())
    }

    /// Moves `delivery` to the dead-letter exchange with `reason` in its `x-dmr-reason`
    /// header, and returns once RabbitMQ confirmed the copy. The caller then acks the
    /// original; if this fails, the original must stay unacked (nack it) so nothing is lost.
    ///
    /// A plain `basic.nack` cannot carry a reason, and RabbitMQ's own dead-lettering only
    /// happens past the delivery limit; a message that can never be delivered (unopenable,
    /// stale, refused for good by the local service) should not spend that limit first.
    pub async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), BrokerError> {
        let live = self.shared.live().ok_or(BrokerError::NotConnected)?;
        let mut properties = delivery.properties.clone();
        let mut headers = properties.headers().cloned().unwrap_or_default();
        let reason: String = reason.chars().take(MAX_REASON_CHARS).collect();
        if let Ok(key) = HEADER_REASON.try_into() {
            headers.insert(key, amqprs::FieldValue::from(reason.as_str()));
        }
        if let Ok(key) = dlq::HEADER_DEAD_LETTERED_AT.try_into() {
            headers.insert(key, amqprs::FieldValue::T(dlq::now_secs()));
        }
        properties.with_headers(headers);
        let message_id = delivery.message_id.clone().unwrap_or_default();
        Compat::new(live.publisher.send(
            &self.shared.dlx,
            &delivery.routing_key,
            &message_id,
            properties,
            delivery.body.clone(),
            CONFIRM_TIMEOUT,
        ))
        .await
    }

    /// Opens a dedicated channel with `basic_qos(prefetch)` and consumes the agent's queue
    /// with manual acks (not exclusive: the queue's single-active-consumer setting picks one
    /// consumer among server instances).
    pub async fn consume(&self, agent: &AgentId, prefetch: u16) -> Result<Consumer, BrokerError> {
        self.consume_queue(self.shared.topology.queue(agent), prefetch)
            .await
    }

    /// Consumes the dead-letter queue, like [`Broker::consume`]: for inspection tools and
    /// tests. An acked delivery is gone for good.
    #[cfg(feature = "test-support")]
    pub async fn consume_dlq(&self, prefetch: u16) -> Result<Consumer, BrokerError> {
        self.consume_queue(self.shared.topology.dlq(), prefetch)
            .await
    }

    async fn consume_queue(&self, queue: String, prefetch: u16) -> Result<Consumer, BrokerError> {
        let live = self.shared.live().ok_or(BrokerError::NotConnected)?;
        detached(OP_TIMEOUT, async move {
            let connection = live.connection.get_ref();
            let closed = live.closed_channels.clone();
            Consumer::open(connection, queue, prefetch, live.generation, closed).await
        })
        .await
    }

    /// Messages ready in the agent's queue (delivered but unacked ones are not counted);
    /// [`BrokerError::NoQueue`] if it does not exist.
    #[cfg(feature = "test-support")]
    pub async fn queue_depth(&self, agent: &AgentId) -> Result<u32, BrokerError> {
        self.depth(self.shared.topology.queue(agent)).await
    }

    #[cfg(feature = "test-support")]
    async fn depth(&self, queue: String) -> Result<u32, BrokerError> {
        self.run_ops(vec![Op::Passive { queue }]).await
    }

    /// Deletes the queues of these agents (messages and all), the dead-letter queue and both
    /// exchanges, and forgets the agents. For tests and tools, never for a running relay.
    #[cfg(feature = "test-support")]
    pub async fn delete_topology(&self, agents: &[AgentId]) -> Result<(), BrokerError> {
        {
            let mut state = self.shared.state();
            for agent in agents {
                state.agents.remove(agent);
            }
        }
        let topology = &self.shared.topology;
        let mut ops: Vec<Op> = agents
            .iter()
            .map(|a| Op::DeleteQueue {
                queue: topology.queue(a),
            })
            .collect();
        ops.push(Op::DeleteQueue {
            queue: topology.dlq(),
        });
        ops.push(Op::DeleteQueue {
            queue: topology.failures(),
        });
        ops.push(Op::DeleteExchange {
            exchange: topology.exchange(),
        });
        ops.push(Op::DeleteExchange {
            exchange: topology.dlx(),
        });
        self.run_ops(ops).await.map(|_| ())
    }

    /// Runs `ops` in turn on the live connection, stopping at the first error; the result of
    /// the last one.
    async fn run_ops(&self, ops: Vec<Op>) -> Result<u32, BrokerError> {
        let live = self.shared.live().ok_or(BrokerError::NotConnected)?;
        detached(OP_TIMEOUT, async move {
            let mut declarer = Declarer::new(live.connection.get_ref(), &live.closed_channels);
            let mut last = 0;
            for op in ops {
                last = declarer.run(op).await?;
            }
            declarer.finish().await;
            Ok(last)
        })
        .await
    }

    /// Closes the connection for a graceful shutdown, after the publishes in flight have
    /// their confirms (at most 10 s). Later publishes fail; [`Broker::connected`] never
    /// resolves again.
    pub async fn close(&self) {
        if !self.shared.stopping.swap(true, Ordering::SeqCst) {
            with_timeout(CONFIRM_TIMEOUT, self.confirms_settled()).await;
            self.shared.stop.close();
        }
        let _ = self.shared.done.recv().await;
    }

    /// Resolves once no publish waits for a confirm (a lost connection fails its waiters).
    async fn confirms_settled(&self) {
        while let Some(live) = self.shared.live() {
            live.publisher.confirms.settled().await;
            // Done unless a new connection replaced this one meanwhile.
            if self
                .shared
                .live()
                .is_none_or(|now| Arc::ptr_eq(&now, &live))
            {
                break;
            }
        }
    }
}

/// A publish handed to RabbitMQ, awaiting its confirm (see [`Broker::begin_publish`]).
pub struct Publish {
    confirm: publisher::Confirm,
    broker: Broker,
}

impl Publish {
    /// `Ok` once the message is durable in the recipient's queue; the errors of
    /// [`Broker::publish`] otherwise.
    pub async fn confirmed(self) -> Result<(), BrokerError> {
        let result = self.confirm.wait(CONFIRM_TIMEOUT).await;
        let health = &self.broker.shared.health;
        match &result {
            Ok(()) | Err(BrokerError::Refused(_)) => health.answered(Instant::now()),
            Err(BrokerError::Timeout) => health.timed_out(Instant::now()),
            Err(_) => {}
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_are_refused_at_start_without_leaking_passwords() {
        let e = Broker::start(vec!["amqp://u:hunter2@h:99999".into()], Topology::default())
            .err()
            .unwrap();
        assert!(matches!(e, BrokerError::Config(_)));
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(Broker::start(vec![" , ".into()], Topology::default()).is_err());
    }

    #[test]
    fn an_unusable_ca_file_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        let options = BrokerOptions {
            ca_file: Some(not_pem),
            ..BrokerOptions::default()
        };
        let urls = vec!["amqps://u:hunter2@h".into()];
        let e = Broker::start_with(urls, Topology::default(), options)
            .err()
            .unwrap();
        assert!(matches!(e, BrokerError::Config(_)), "{e:?}");
        assert!(e.to_string().contains("--amqp-ca-file"), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}
