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

mod consumer;
mod publisher;
mod url;

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use amqprs::callbacks::{ChannelCallback, ConnectionCallback};
use amqprs::channel::{
    Channel, ExchangeDeclareArguments, ExchangeDeleteArguments, QueueBindArguments,
    QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{
    Ack, BasicProperties, Cancel, Close, CloseChannel, FieldTable, FieldValue, Nack, Return,
};
use async_compat::Compat;
use async_trait::async_trait;
use futures_lite::future;

pub use consumer::{Consumer, Delivery};

use crate::protocol::{AgentId, Header};
use publisher::Publisher;
use url::NodeUrl;

/// AMQP header naming the sending agent of a published envelope.
pub const HEADER_SENDER: &str = "dmr-sender";
/// AMQP header naming the recipient agent of a published envelope.
pub const HEADER_RECIPIENT: &str = "dmr-recipient";
/// AMQP `content_type` of published envelopes.
pub const CONTENT_TYPE: &str = "application/x-dmr-envelope";

/// How long a publish waits for RabbitMQ's confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long declaring the topology and opening the publishing channel may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a caller waits for a declare, delete or consume.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful close may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A connection that lived this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// How often the supervisor checks that amqprs' connection tasks are still alive.
const LIVENESS_INTERVAL: Duration = Duration::from_secs(1);

/// Names and arguments of the RabbitMQ topology (DESIGN §6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Prepended to every exchange and queue name (`--queue-prefix`); empty in production.
    pub prefix: String,
    /// `x-message-ttl` of the agent queues, in milliseconds (`--message-ttl`).
    pub message_ttl_ms: u64,
    /// `x-delivery-limit` of the agent queues (`--delivery-limit`).
    pub delivery_limit: u32,
}

impl Default for Topology {
    /// No prefix, 24 h TTL, delivery limit 10: the defaults of `dmr-server run`.
    fn default() -> Self {
        Self {
            prefix: String::new(),
            message_ttl_ms: 24 * 3600 * 1000,
            delivery_limit: 10,
        }
    }
}

impl Topology {
    /// The direct exchange every envelope is published to: `{prefix}dmr.messages`.
    pub fn exchange(&self) -> String {
        format!("{}dmr.messages", self.prefix)
    }

    /// The quorum queue of one agent: `{prefix}dmr.agent.{id}`.
    pub fn queue(&self, agent: &AgentId) -> String {
        format!("{}dmr.agent.{agent}", self.prefix)
    }

    /// The dead-letter exchange (fanout): `{prefix}dmr.dlx`.
    pub fn dlx(&self) -> String {
        format!("{}dmr.dlx", self.prefix)
    }

    /// The dead-letter queue bound to [`Topology::dlx`]: `{prefix}dmr.dlq`.
    pub fn dlq(&self) -> String {
        format!("{}dmr.dlq", self.prefix)
    }

    /// Checks that RabbitMQ will accept these names and arguments.
    pub fn validate(&self) -> Result<(), BrokerError> {
        // The longest name is the queue of an agent with a 64-character id.
        let room = 255 - "dmr.agent.".len() - 64;
        if self.prefix.len() > room {
            return Err(BrokerError::Config(format!(
                "--queue-prefix is {} bytes long; at most {room} fit RabbitMQ's 255-byte names",
                self.prefix.len()
            )));
        }
        // RabbitMQ's own upper limit (about 8.9 years on 3.10) is reported by the declaration.
        if self.message_ttl_ms == 0 || i64::try_from(self.message_ttl_ms).is_err() {
            return Err(BrokerError::Config(format!(
                "--message-ttl must be a positive number of milliseconds; got {}",
                self.message_ttl_ms
            )));
        }
        if self.delivery_limit == 0 {
            return Err(BrokerError::Config(
                "--delivery-limit must be at least 1".to_owned(),
            ));
        }
        Ok(())
    }

    fn agent_queue_arguments(&self) -> FieldTable {
        table([
            ("x-queue-type", FieldValue::from("quorum")),
            ("x-dead-letter-exchange", FieldValue::from(self.dlx())),
            ("x-dead-letter-strategy", FieldValue::from("at-least-once")),
            ("x-overflow", FieldValue::from("reject-publish")),
            (
                "x-delivery-limit",
                FieldValue::l(self.delivery_limit.into()),
            ),
            (
                "x-message-ttl",
                FieldValue::l(i64::try_from(self.message_ttl_ms).unwrap_or(i64::MAX)),
            ),
            ("x-single-active-consumer", FieldValue::t(true)),
        ])
    }
}

fn table<const N: usize>(entries: [(&str, FieldValue); N]) -> FieldTable {
    let mut t = FieldTable::new();
    for (key, value) in entries {
        if let Ok(key) = key.try_into() {
            t.insert(key, value);
        }
    }
    t
}

/// What went wrong talking to RabbitMQ. Every message says what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerError {
    /// Not connected right now (the broker is reconnecting); nothing was sent.
    NotConnected,
    /// RabbitMQ blocks publishers (memory or disk alarm); nothing was sent.
    Blocked(String),
    /// RabbitMQ refused: `basic.nack` (e.g. queue full), `basic.return` (no queue for the
    /// recipient), or a refused consume. Sending the same thing again will not help.
    Refused(String),
    /// RabbitMQ did not answer in time (10 s for a publish's confirm). For a publish: the
    /// message may or may not be stored.
    Timeout,
    /// The channel or connection closed while the request was in flight; for a publish the
    /// message may or may not be stored, so send it again (recipients drop duplicates).
    Closed(String),
    /// Declaring the topology failed; quotes RabbitMQ and says how to fix it.
    Declare(String),
    /// The named queue does not exist.
    NoQueue(String),
    /// A URL or topology setting RabbitMQ cannot use.
    Config(String),
}

impl BrokerError {
    /// Whether trying the same request again later may succeed (as opposed to a refusal or
    /// a setting that must be fixed first).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::NotConnected | Self::Blocked(_) | Self::Timeout | Self::Closed(_)
        )
    }
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotConnected => f.write_str(
                "not connected to RabbitMQ (reconnecting); nothing was sent, try again shortly",
            ),
            Self::Blocked(reason) => write!(
                f,
                "RabbitMQ is blocking publishers ({reason}); free memory or disk on the RabbitMQ \
                 node; nothing was sent"
            ),
            Self::Refused(reason) => write!(f, "refused by RabbitMQ: {reason}"),
            Self::Timeout => f.write_str(
                "RabbitMQ did not answer in time; if this was a publish, the message may or may \
                 not be stored: send it again (recipients drop duplicates)",
            ),
            Self::Closed(reason) => write!(f, "RabbitMQ channel or connection closed: {reason}"),
            Self::Declare(reason) => f.write_str(reason),
            Self::NoQueue(queue) => write!(f, "queue {queue} does not exist in RabbitMQ"),
            Self::Config(reason) => write!(f, "invalid RabbitMQ setting: {reason}"),
        }
    }
}

impl std::error::Error for BrokerError {}

/// Awaits `fut` for at most `limit`, then gives up with [`BrokerError::Timeout`].
async fn within<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, BrokerError>>,
) -> Result<T, BrokerError> {
    future::or(fut, async {
        async_io::Timer::after(limit).await;
        Err(BrokerError::Timeout)
    })
    .await
}

/// Runs `fut` inside `Compat` on a task of its own and waits at most `limit` for its result.
///
/// The caller may drop the returned future at any point without cancelling `fut`: amqprs
/// panics in its own tasks, or drops the whole connection, when a request it is waiting on
/// is abandoned halfway (e.g. an `open_channel` whose answer finds no one listening).
async fn detached<T: Send + 'static>(
    limit: Duration,
    fut: impl Future<Output = Result<T, BrokerError>> + Send + 'static,
) -> Result<T, BrokerError> {
    let (tx, rx) = async_channel::bounded(1);
    smol::spawn(Compat::new(async move {
        // If the caller is gone, the result (say, a Consumer) is dropped here, in context.
        let _ = tx.send(fut.await).await;
    }))
    .detach();
    within(limit, async {
        rx.recv().await.unwrap_or_else(|_| {
            Err(BrokerError::Closed(
                "the RabbitMQ request task ended unexpectedly".to_owned(),
            ))
        })
    })
    .await
}

/// A connection to RabbitMQ that keeps itself alive. Clones share the connection.
#[derive(Clone)]
pub struct Broker {
    shared: Arc<Shared>,
}

struct Shared {
    nodes: Vec<NodeUrl>,
    topology: Topology,
    exchange: String,
    connection_name: String,
    state: Mutex<State>,
    generation: AtomicU64,
    stopping: AtomicBool,
    /// Closed by [`Broker::close`] to stop the supervisor.
    stop: async_channel::Sender<()>,
    stopped: async_channel::Receiver<()>,
    /// Closed by the supervisor when it has finished.
    done: async_channel::Receiver<()>,
}

struct State {
    live: Option<Arc<Live>>,
    /// While disconnected: a channel that is closed on connection, to wake `connected()`.
    gate: Option<(async_channel::Sender<()>, async_channel::Receiver<()>)>,
    /// Agents whose queues are (re-)declared on every connection.
    agents: BTreeSet<AgentId>,
}

/// One established connection with its publishing channel.
struct Live {
    connection: Compat<Connection>,
    publisher: Publisher,
    signals: Arc<Signals>,
    node: String,
    generation: u64,
    /// Channels RabbitMQ closed on this connection (their ids are lost, see `set_up`).
    closed_channels: Arc<AtomicU32>,
    recycle_after: u32,
}

/// What RabbitMQ told us about a connection, outside of any request.
#[derive(Default)]
struct Signals {
    closed: Mutex<Option<String>>,
    blocked: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Signals {
    fn loss_reason(&self) -> String {
        lock(&self.closed).clone().unwrap_or_else(|| {
            "the network connection failed or RabbitMQ stopped answering heartbeats".to_owned()
        })
    }
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

impl Broker {
    /// Starts the background task that connects, declares the topology and keeps the
    /// connection alive; returns at once (see [`Broker::connected`]).
    ///
    /// Each entry of `urls` is an `amqp://user:password@host:port/vhost` URL or several of
    /// them separated by commas (the nodes of a cluster, tried in turn). Fails only on a URL
    /// or topology setting that can never work.
    pub fn start(urls: Vec<String>, topology: Topology) -> Result<Broker, BrokerError> {
        Self::start_named(urls, topology, &default_connection_name())
    }

    /// [`Broker::start`] with the connection name RabbitMQ shows (management UI,
    /// `rabbitmqctl list_connections user_provided_name`).
    pub fn start_named(
        urls: Vec<String>,
        topology: Topology,
        connection_name: &str,
    ) -> Result<Broker, BrokerError> {
        topology.validate()?;
        let raw: Vec<&str> = urls
            .iter()
            .flat_map(|u| u.split(','))
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        let nodes = raw
            .iter()
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
        let (stop, stopped) = async_channel::bounded(1);
        let (done_tx, done) = async_channel::bounded(1);
        let shared = Arc::new(Shared {
            nodes,
            exchange: topology.exchange(),
            topology,
            connection_name: connection_name.to_owned(),
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
        });
        smol::spawn(Compat::new(supervise(shared.clone(), done_tx))).detach();
        Ok(Broker { shared })
    }

    /// The topology this broker declares.
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
            let mut refusals = Vec::new();
            for agent in &agents {
                match declarer.agent(&topology, agent).await {
                    Ok(()) => {}
                    Err(BrokerError::Declare(e)) => refusals.push(e),
                    Err(e) => return Err(e),
                }
            }
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
    /// [`HEADER_SENDER`] and [`HEADER_RECIPIENT`], content type [`CONTENT_TYPE`].
    ///
    /// `Ok` means durable in the recipient's queue. `basic.nack` and `basic.return`
    /// (no queue for the recipient) give [`BrokerError::Refused`]; no confirm within 10 s
    /// gives [`BrokerError::Timeout`]; a connection that is down gives
    /// [`BrokerError::NotConnected`] at once (nothing is buffered); a connection lost while
    /// waiting gives [`BrokerError::Closed`], never `Ok`.
    pub async fn publish(&self, header: &Header, body: Vec<u8>) -> Result<(), BrokerError> {
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
        Compat::new(
            live.publisher
                .publish(&self.shared.exchange, header, body, CONFIRM_TIMEOUT),
        )
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
    pub async fn queue_depth(&self, agent: &AgentId) -> Result<u32, BrokerError> {
        self.depth(self.shared.topology.queue(agent)).await
    }

    /// Messages ready in the dead-letter queue.
    pub async fn dlq_depth(&self) -> Result<u32, BrokerError> {
        self.depth(self.shared.topology.dlq()).await
    }

    async fn depth(&self, queue: String) -> Result<u32, BrokerError> {
        let live = self.shared.live().ok_or(BrokerError::NotConnected)?;
        detached(OP_TIMEOUT, async move {
            let mut declarer = Declarer::new(live.connection.get_ref(), &live.closed_channels);
            let count = declarer.run(Op::Passive { queue }).await;
            declarer.finish().await;
            count
        })
        .await
    }

    /// Deletes the queues of these agents (messages and all), the dead-letter queue and both
    /// exchanges, and forgets the agents. For tests and tools, never for a running relay.
    #[doc(hidden)]
    pub async fn delete_topology(&self, agents: &[AgentId]) -> Result<(), BrokerError> {
        {
            let mut state = self.shared.state();
            for agent in agents {
                state.agents.remove(agent);
            }
        }
        let live = self.shared.live().ok_or(BrokerError::NotConnected)?;
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
        ops.push(Op::DeleteExchange {
            exchange: topology.exchange(),
        });
        ops.push(Op::DeleteExchange {
            exchange: topology.dlx(),
        });
        detached(OP_TIMEOUT, async move {
            let mut declarer = Declarer::new(live.connection.get_ref(), &live.closed_channels);
            for op in ops {
                declarer.run(op).await?;
            }
            declarer.finish().await;
            Ok(())
        })
        .await
    }

    /// Closes the connection for a graceful shutdown, after the publishes in flight have
    /// their confirms (at most 10 s). Later publishes fail; [`Broker::connected`] never
    /// resolves again.
    pub async fn close(&self) {
        if !self.shared.stopping.swap(true, Ordering::SeqCst) {
            let deadline = Instant::now() + CONFIRM_TIMEOUT;
            while let Some(live) = self.shared.live() {
                if live.publisher.confirms.in_flight() == 0 || Instant::now() > deadline {
                    break;
                }
                async_io::Timer::after(Duration::from_millis(5)).await;
            }
            self.shared.stop.close();
        }
        let _ = self.shared.done.recv().await;
    }
}

/// Connects, watches and reconnects until [`Broker::close`]. Runs inside `Compat`.
async fn supervise(shared: Arc<Shared>, _done: async_channel::Sender<()>) {
    let mut failures: u32 = 0;
    let mut first = 0;
    while !shared.stopping.load(Ordering::SeqCst) {
        let Some((index, live, kicked)) = connect_any(&shared, first).await else {
            if shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            let delay = backoff(failures);
            failures = failures.saturating_add(1);
            let nodes: Vec<_> = shared.nodes.iter().map(|n| n.display.as_str()).collect();
            let (nodes, ms) = (nodes.join(", "), delay.as_millis());
            log::warn!("no RabbitMQ node reachable ({nodes}); retrying in {ms} ms");
            pause(&shared, delay).await;
            continue;
        };
        first = index;
        let since = Instant::now();
        let end = watch(&shared, &live, &kicked).await;
        if retire(&shared, live, end).await {
            break;
        }
        if since.elapsed() >= STABLE_AFTER {
            failures = 0;
            log::info!("reconnecting to RabbitMQ");
        } else {
            let delay = backoff(failures);
            failures = failures.saturating_add(1);
            log::info!("reconnecting to RabbitMQ in {} ms", delay.as_millis());
            pause(&shared, delay).await;
        }
    }
    let mut state = shared.state();
    state.live = None;
    state.gate = None;
}

/// Tries every node once, starting with the one that worked last; `None` when none
/// answered (or the broker is stopping).
async fn connect_any(
    shared: &Shared,
    first: usize,
) -> Option<(usize, Arc<Live>, async_channel::Receiver<String>)> {
    let generation = shared.generation.load(Ordering::SeqCst) + 1;
    for i in 0..shared.nodes.len() {
        let index = (first + i) % shared.nodes.len();
        let node = &shared.nodes[index];
        let stop = async {
            let _ = shared.stopped.recv().await;
            Err(BrokerError::Closed("shutting down".to_owned()))
        };
        match future::or(stop, connect(shared, node, generation)).await {
            Ok((live, kicked)) => return Some((index, live, kicked)),
            Err(_) if shared.stopping.load(Ordering::SeqCst) => return None,
            Err(e) => log::warn!("could not connect to RabbitMQ at {}: {e}", node.display),
        }
    }
    None
}

/// Takes a connection out of service after `end`: publishes waiting for its confirms
/// fail, waiters for the next connection are re-armed. Returns whether to stop for good.
async fn retire(shared: &Shared, live: Arc<Live>, end: End) -> bool {
    let stopping = matches!(end, End::Stop);
    {
        let mut state = shared.state();
        state.live = None;
        state.gate = (!stopping).then(|| async_channel::bounded(1));
    }
    let reason = match &end {
        End::Lost(reason) | End::Kicked(reason) => reason.clone(),
        End::Stop => "this server is shutting down".to_owned(),
    };
    live.publisher
        .confirms
        .fail_all(&format!("connection to {} lost: {reason}", live.node));
    match end {
        End::Lost(reason) => {
            log::warn!("lost the connection to RabbitMQ at {}: {reason}", live.node)
        }
        End::Kicked(reason) => {
            log::warn!("{reason}; reconnecting");
            close_connection(&live).await;
        }
        End::Stop => {
            log::info!("closing the connection to RabbitMQ at {}", live.node);
            close_connection(&live).await;
        }
    }
    stopping
}

/// Sleeps for `delay`, or less if the broker is being closed.
async fn pause(shared: &Shared, delay: Duration) {
    let stop = async {
        let _ = shared.stopped.recv().await;
    };
    let sleep = async {
        async_io::Timer::after(delay).await;
    };
    future::or(stop, sleep).await;
}

/// `BACKOFF_MIN` doubled per failure, capped at `BACKOFF_MAX`, minus up to 25 % jitter so
/// that many servers do not reconnect in lockstep.
fn backoff(failures: u32) -> Duration {
    let capped = BACKOFF_MIN
        .saturating_mul(1 << failures.min(16))
        .min(BACKOFF_MAX);
    capped.mul_f64(1.0 - fastrand::f64() * 0.25)
}

async fn close_connection(live: &Live) {
    let connection = live.connection.get_ref().clone();
    let closing = async {
        connection
            .close()
            .await
            .map_err(|e| BrokerError::Closed(e.to_string()))
    };
    if let Err(e) = within(CLOSE_TIMEOUT, closing).await {
        log::debug!("closing the connection to {}: {e}", live.node);
    }
}

/// Opens a connection to `node`, declares the topology, opens the publishing channel and
/// makes it the live connection. Runs inside `Compat`.
async fn connect(
    shared: &Shared,
    node: &NodeUrl,
    generation: u64,
) -> Result<(Arc<Live>, async_channel::Receiver<String>), BrokerError> {
    let args = OpenConnectionArguments::new(&node.host, node.port, &node.user, &node.password)
        .virtual_host(&node.vhost)
        .connection_name(&shared.connection_name)
        .heartbeat(node.heartbeat)
        .finish();
    let opening = async {
        Connection::open(&args).await.map_err(|e| {
            BrokerError::Closed(format!("{e} (check host, port, user, password and vhost)"))
        })
    };
    let connection = within(CONNECT_TIMEOUT, opening)
        .await
        .map_err(|e| match e {
            BrokerError::Timeout => BrokerError::Closed(format!(
                "no AMQP handshake within {} s (RabbitMQ starting, stopping or overloaded?)",
                CONNECT_TIMEOUT.as_secs()
            )),
            e => e,
        })?;
    // On error or timeout below, dropping `connection` closes it.
    let setup = set_up(shared, node, generation, connection);
    within(SETUP_TIMEOUT, setup).await.map_err(|e| match e {
        BrokerError::Timeout => BrokerError::Closed(format!(
            "declaring the topology took over {} s",
            SETUP_TIMEOUT.as_secs()
        )),
        e => e,
    })
}

async fn set_up(
    shared: &Shared,
    node: &NodeUrl,
    generation: u64,
    connection: Connection,
) -> Result<(Arc<Live>, async_channel::Receiver<String>), BrokerError> {
    let lost = |e: amqprs::error::Error| BrokerError::Closed(e.to_string());
    let signals = Arc::new(Signals::default());
    let watch = ConnectionWatch {
        signals: signals.clone(),
        node: node.display.clone(),
    };
    connection.register_callback(watch).await.map_err(lost)?;

    let topology = &shared.topology;
    let closed_channels = Arc::new(AtomicU32::new(0));
    let mut declarer = Declarer::new(&connection, &closed_channels);
    for op in [
        Op::Exchange {
            exchange: topology.exchange(),
            kind: "direct",
        },
        Op::Exchange {
            exchange: topology.dlx(),
            kind: "fanout",
        },
        Op::Queue {
            queue: topology.dlq(),
            arguments: table([("x-queue-type", "quorum".into())]),
        },
        Op::Bind {
            queue: topology.dlq(),
            exchange: topology.dlx(),
            key: String::new(),
        },
    ] {
        match declarer.run(op).await {
            Ok(_) => {}
            Err(BrokerError::Declare(e)) => log::error!("{e}"),
            Err(e) => return Err(e),
        }
    }

    let (kick, kicked) = async_channel::bounded(1);
    let channel = connection.open_channel(None).await.map_err(lost)?;
    let publisher = Publisher::open(channel, node.display.clone(), kick)
        .await
        .map_err(|e| BrokerError::Closed(format!("could not open the publishing channel: {e}")))?;

    // Declare every remembered agent, then go live; agents that declare_agents() adds
    // meanwhile are seen under the same lock that installs the connection.
    let mut declared = BTreeSet::new();
    loop {
        let missing: Vec<AgentId> = {
            let state = shared.state();
            state.agents.difference(&declared).cloned().collect()
        };
        if missing.is_empty() {
            break;
        }
        for agent in missing {
            match declarer.agent(topology, &agent).await {
                Ok(()) => {}
                Err(BrokerError::Declare(e)) => log::error!("{e}"),
                Err(e) => return Err(e),
            }
            declared.insert(agent);
        }
    }
    declarer.finish().await;

    let properties = connection.server_properties();
    let about = format!(
        "{} {} (cluster {})",
        properties.product(),
        properties.version(),
        properties.cluster_name()
    );
    // amqprs never reuses the id of a channel that RabbitMQ closed (a refused declaration,
    // a consume of a missing queue): recycle the connection long before ids run out.
    let recycle_after = match connection.channel_max() {
        0 => u32::from(u16::MAX / 2),
        max => u32::from(max / 2).max(1),
    };
    let live = Arc::new(Live {
        connection: Compat::new(connection),
        publisher,
        signals,
        node: node.display.clone(),
        generation,
        closed_channels,
        recycle_after,
    });
    loop {
        let missing: Vec<AgentId> = {
            let mut state = shared.state();
            let missing: Vec<AgentId> = state.agents.difference(&declared).cloned().collect();
            if missing.is_empty() {
                state.live = Some(live.clone());
                state.gate = None;
                shared.generation.store(generation, Ordering::SeqCst);
                break;
            }
            missing
        };
        let mut declarer = Declarer::new(live.connection.get_ref(), &live.closed_channels);
        for agent in missing {
            if let Err(e) = declarer.agent(topology, &agent).await {
                log::error!("{e}");
            }
            declared.insert(agent);
        }
        declarer.finish().await;
    }
    log::info!(
        "connected to {about} at {} as {:?} (connection #{generation}, {} agent queues)",
        node.display,
        shared.connection_name,
        declared.len()
    );
    Ok((live, kicked))
}

enum End {
    /// The connection died.
    Lost(String),
    /// The publishing channel died; the connection must be rebuilt.
    Kicked(String),
    /// [`Broker::close`] was called.
    Stop,
}

/// Waits until the live connection ends, for whatever reason. Runs inside `Compat`.
async fn watch(shared: &Shared, live: &Live, kicked: &async_channel::Receiver<String>) -> End {
    let connection = live.connection.get_ref();
    let failed = async {
        connection.listen_network_io_failure().await;
        End::Lost(live.signals.loss_reason())
    };
    // listen_network_io_failure() misses a failure that happened before it subscribed, and
    // an amqprs task that panicked never reports one: check both every second.
    let probe = async {
        loop {
            async_io::Timer::after(LIVENESS_INTERVAL).await;
            let watch = ConnectionWatch {
                signals: live.signals.clone(),
                node: live.node.clone(),
            };
            if !connection.is_open() || connection.register_callback(watch).await.is_err() {
                return End::Lost(live.signals.loss_reason());
            }
            let closed = live.closed_channels.load(Ordering::Relaxed);
            if closed >= live.recycle_after {
                return End::Kicked(format!(
                    "RabbitMQ closed {closed} channels on the connection to {}, whose ids amqprs \
                     never reuses",
                    live.node
                ));
            }
        }
    };
    let kick = async {
        match kicked.recv().await {
            Ok(reason) => End::Kicked(reason),
            Err(_) => future::pending().await,
        }
    };
    let stop = async {
        let _ = shared.stopped.recv().await;
        End::Stop
    };
    future::or(future::or(stop, kick), future::or(failed, probe)).await
}

/// Logs and records what RabbitMQ says about the connection.
struct ConnectionWatch {
    signals: Arc<Signals>,
    node: String,
}

#[async_trait]
impl ConnectionCallback for ConnectionWatch {
    async fn close(&mut self, _c: &Connection, close: Close) -> Result<(), amqprs::error::Error> {
        let reason = format!(
            "RabbitMQ closed it: {} {}",
            close.reply_code(),
            close.reply_text()
        );
        *lock(&self.signals.closed) = Some(reason);
        Ok(())
    }

    async fn blocked(&mut self, _c: &Connection, reason: String) {
        log::warn!(
            "RabbitMQ at {} blocks publishing: {reason} (a memory or disk alarm); sends are \
             refused until it clears",
            self.node
        );
        *lock(&self.signals.blocked) = Some(reason);
    }

    async fn unblocked(&mut self, _c: &Connection) {
        log::info!("RabbitMQ at {} accepts publishing again", self.node);
        *lock(&self.signals.blocked) = None;
    }

    async fn secret_updated(&mut self, _c: &Connection) {}
}

/// A topology operation, run on a throwaway channel.
enum Op {
    Exchange {
        exchange: String,
        kind: &'static str,
    },
    Queue {
        queue: String,
        arguments: FieldTable,
    },
    Bind {
        queue: String,
        exchange: String,
        key: String,
    },
    Passive {
        queue: String,
    },
    DeleteQueue {
        queue: String,
    },
    DeleteExchange {
        exchange: String,
    },
}

impl Op {
    fn what(&self) -> String {
        match self {
            Op::Exchange { exchange, .. } => format!("cannot declare exchange {exchange}"),
            Op::Queue { queue, .. } => format!("cannot declare queue {queue}"),
            Op::Bind {
                queue, exchange, ..
            } => format!("cannot bind queue {queue} to {exchange}"),
            Op::Passive { queue } => format!("cannot inspect queue {queue}"),
            Op::DeleteQueue { queue } => format!("cannot delete queue {queue}"),
            Op::DeleteExchange { exchange } => format!("cannot delete exchange {exchange}"),
        }
    }

    /// The error for a channel RabbitMQ closed with `code` and `text` during this operation.
    fn refused(&self, code: u16, text: &str) -> BrokerError {
        let said = format!("{}: RabbitMQ says \"{code} {text}\"", self.what());
        match self {
            Op::Passive { queue } if code == 404 => BrokerError::NoQueue(queue.clone()),
            Op::Queue { queue, .. } if code == 406 && text.contains("inequivalent arg") => {
                BrokerError::Declare(format!(
                    "{said}. The queue exists with other arguments; drain and delete it \
                     (rabbitmqctl delete_queue {queue}) or start dmr-server with the matching \
                     --message-ttl/--delivery-limit"
                ))
            }
            Op::Queue { .. } if code == 406 && text.contains("invalid arg") => {
                BrokerError::Declare(format!(
                    "{said}. RabbitMQ does not accept this value; choose another \
                     --message-ttl/--delivery-limit"
                ))
            }
            Op::Exchange { exchange, .. } if code == 406 => BrokerError::Declare(format!(
                "{said}. The exchange exists with another type or flags; delete it \
                 (rabbitmqadmin delete exchange name={exchange}) if nothing else uses it, or \
                 choose another --queue-prefix"
            )),
            _ if code == 403 => BrokerError::Declare(format!(
                "{said}. The RabbitMQ user lacks permissions on this vhost; grant them \
                 (rabbitmqctl set_permissions -p VHOST USER '.*' '.*' '.*')"
            )),
            Op::Passive { .. } | Op::DeleteQueue { .. } | Op::DeleteExchange { .. } => {
                BrokerError::Refused(said)
            }
            _ => BrokerError::Declare(said),
        }
    }
}

/// Runs topology operations on one channel, opening a new one after RabbitMQ closed it
/// (a refused declaration closes the channel). Used only inside `Compat`, and never
/// cancelled halfway except together with its connection (see [`detached`]).
struct Declarer<'a> {
    connection: &'a Connection,
    closed_channels: &'a AtomicU32,
    channel: Option<(Channel, CloseSlot)>,
}

impl<'a> Declarer<'a> {
    fn new(connection: &'a Connection, closed_channels: &'a AtomicU32) -> Self {
        Self {
            connection,
            closed_channels,
            channel: None,
        }
    }

    async fn agent(&mut self, topology: &Topology, agent: &AgentId) -> Result<(), BrokerError> {
        let queue = topology.queue(agent);
        let arguments = topology.agent_queue_arguments();
        self.run(Op::Queue {
            queue: queue.clone(),
            arguments,
        })
        .await?;
        self.run(Op::Bind {
            queue,
            exchange: topology.exchange(),
            key: agent.to_string(),
        })
        .await?;
        Ok(())
    }

    /// Runs one operation; returns the message count for [`Op::Passive`], else 0.
    async fn run(&mut self, op: Op) -> Result<u32, BrokerError> {
        let lost = |e: amqprs::error::Error| BrokerError::Closed(format!("{}: {e}", op.what()));
        let (channel, slot) = match self.channel.take() {
            Some((channel, slot)) if channel.is_open() => (channel, slot),
            _ => {
                let channel = self.connection.open_channel(None).await.map_err(lost)?;
                let slot = CloseSlot::default();
                let watch = CloseWatch { slot: slot.clone() };
                channel.register_callback(watch).await.map_err(lost)?;
                (channel, slot)
            }
        };
        let result = match &op {
            Op::Exchange { exchange, kind } => {
                let args = ExchangeDeclareArguments::new(exchange, kind)
                    .durable(true)
                    .finish();
                channel.exchange_declare(args).await.map(|()| 0)
            }
            Op::Queue { queue, arguments } => {
                let args = QueueDeclareArguments::durable_client_named(queue)
                    .arguments(arguments.clone())
                    .finish();
                channel.queue_declare(args).await.map(|_| 0)
            }
            Op::Bind {
                queue,
                exchange,
                key,
            } => {
                let args = QueueBindArguments::new(queue, exchange, key);
                channel.queue_bind(args).await.map(|()| 0)
            }
            Op::Passive { queue } => {
                let args = QueueDeclareArguments::new(queue).passive(true).finish();
                let ok = channel.queue_declare(args).await;
                ok.map(|ok| ok.map_or(0, |(_, messages, _)| messages))
            }
            Op::DeleteQueue { queue } => {
                let args = QueueDeleteArguments::new(queue);
                channel.queue_delete(args).await.map(|_| 0)
            }
            Op::DeleteExchange { exchange } => {
                let args = ExchangeDeleteArguments::new(exchange);
                channel.exchange_delete(args).await.map(|()| 0)
            }
        };
        match result {
            Ok(n) => {
                self.channel = Some((channel, slot));
                Ok(n)
            }
            Err(e) => match lock(&slot).take() {
                Some((code, text)) => {
                    self.closed_channels.fetch_add(1, Ordering::Relaxed);
                    Err(op.refused(code, &text))
                }
                None => Err(lost(e)),
            },
        }
    }

    /// Closes the channel, if one is open.
    async fn finish(mut self) {
        if let Some((channel, _)) = self.channel.take() {
            let _ = channel.close().await;
        }
    }
}

/// Where [`CloseWatch`] puts the code and text RabbitMQ closed a channel with.
type CloseSlot = Arc<Mutex<Option<(u16, String)>>>;

/// Keeps the code and text RabbitMQ closed a channel with.
struct CloseWatch {
    slot: CloseSlot,
}

#[async_trait]
impl ChannelCallback for CloseWatch {
    async fn close(
        &mut self,
        _ch: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        *lock(&self.slot) = Some((close.reply_code(), close.reply_text().clone()));
        Ok(())
    }

    async fn cancel(&mut self, _ch: &Channel, _cancel: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }

    async fn flow(&mut self, _ch: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _ch: &Channel, _ack: Ack) {}

    async fn publish_nack(&mut self, _ch: &Channel, _nack: Nack) {}

    async fn publish_return(
        &mut self,
        _ch: &Channel,
        _ret: Return,
        _properties: BasicProperties,
        _content: Vec<u8>,
    ) {
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_validation() {
        let t = Topology {
            prefix: "p.".into(),
            ..Topology::default()
        };
        let a = AgentId::new("police").unwrap();
        assert_eq!(t.exchange(), "p.dmr.messages");
        assert_eq!(t.queue(&a), "p.dmr.agent.police");
        assert_eq!(
            (t.dlx().as_str(), t.dlq().as_str()),
            ("p.dmr.dlx", "p.dmr.dlq")
        );
        assert!(t.validate().is_ok());
        assert!(Topology {
            prefix: "x".repeat(182),
            ..t.clone()
        }
        .validate()
        .is_err());
        assert!(Topology {
            message_ttl_ms: u64::MAX,
            ..t.clone()
        }
        .validate()
        .is_err());
        assert!(Topology {
            message_ttl_ms: 0,
            ..t.clone()
        }
        .validate()
        .is_err());
        assert!(Topology {
            delivery_limit: 0,
            ..t
        }
        .validate()
        .is_err());
    }

    #[test]
    fn backoff_grows_to_the_cap() {
        assert!(backoff(0) <= BACKOFF_MIN && backoff(0) >= BACKOFF_MIN.mul_f64(0.75));
        assert!(backoff(40) <= BACKOFF_MAX && backoff(40) >= BACKOFF_MAX.mul_f64(0.75));
    }

    #[test]
    fn bad_urls_are_refused_at_start_without_leaking_passwords() {
        let e = Broker::start(vec!["amqp://u:hunter2@h:99999".into()], Topology::default())
            .err()
            .unwrap();
        assert!(matches!(e, BrokerError::Config(_)));
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(Broker::start(vec![" , ".into()], Topology::default()).is_err());
    }
}
