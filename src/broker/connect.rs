//! One live connection: opening it, declaring the topology on it, opening its publishing
//! channel, and recording what RabbitMQ says about it (closed, blocked) outside any request.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqprs::callbacks::ConnectionCallback;
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::Close;
use async_compat::Compat;
use async_trait::async_trait;

use super::compat::within;
use super::declare::{Declarer, Op};
use super::publisher::Publisher;
use super::tls::Tls;
use super::url::NodeUrl;
use super::{BrokerError, Shared, Topology};
use crate::net::TcpStream;
use crate::protocol::AgentId;
use crate::sync::lock;
use crate::wait::with_timeout;

/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long declaring the topology and opening the publishing channel may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Receives why the publishing channel died (the connection must then be rebuilt).
pub(super) type Kicked = async_channel::Receiver<String>;

/// One established connection with its publishing channel.
pub(super) struct Live {
    pub(super) connection: Compat<Connection>,
    pub(super) publisher: Publisher,
    pub(super) signals: Arc<Signals>,
    /// The node's URL, password masked.
    pub(super) node: String,
    pub(super) generation: u64,
    /// Channels RabbitMQ closed on this connection; amqprs never reuses their ids.
    pub(super) closed_channels: Arc<AtomicU32>,
    /// How many closed channels make the supervisor recycle the connection.
    pub(super) recycle_after: u32,
}

/// What RabbitMQ told us about a connection, outside of any request.
#[derive(Default)]
pub(super) struct Signals {
    closed: Mutex<Option<String>>,
    pub(super) blocked: Mutex<Option<String>>,
}

impl Signals {
    pub(super) fn loss_reason(&self) -> String {
        lock(&self.closed).clone().unwrap_or_else(|| {
            "the network connection failed or RabbitMQ stopped answering heartbeats".to_owned()
        })
    }
}

/// Opens a connection to `node`, declares the topology, opens the publishing channel and
/// makes it the live connection. Runs inside `Compat`.
pub(super) async fn connect(
    shared: &Shared,
    node: &NodeUrl,
    generation: u64,
) -> Result<(Arc<Live>, Kicked), BrokerError> {
    let connection = open(node, shared.tls.as_ref(), &shared.connection_name).await?;
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

/// Opens the AMQP connection (TCP, TLS for `amqps://`, handshake, login).
async fn open(
    node: &NodeUrl,
    tls: Option<&Tls>,
    connection_name: &str,
) -> Result<Connection, BrokerError> {
    let mut args = OpenConnectionArguments::new(&node.host, node.port, &node.user, &node.password);
    args.virtual_host(&node.vhost)
        .connection_name(connection_name)
        .heartbeat(node.heartbeat);
    let tls = match (node.tls, tls) {
        (true, Some(tls)) => {
            args.tls_adaptor(tls.adaptor(node));
            Some(tls)
        }
        // Broker::start_with sets up TLS whenever a node is amqps://.
        (true, None) => {
            return Err(BrokerError::Config(format!(
                "{}: TLS is not set up",
                node.display
            )))
        }
        (false, _) => None,
    };
    match with_timeout(CONNECT_TIMEOUT, Connection::open(&args)).await {
        Some(Ok(connection)) => Ok(connection),
        Some(Err(amqprs::error::Error::NetworkError(e))) => {
            Err(network_failure(node, tls, e).await)
        }
        Some(Err(e)) => Err(BrokerError::Closed(format!(
            "{e} (check host, port, user, password and vhost)"
        ))),
        None => Err(BrokerError::Closed(format!(
            "no AMQP handshake within {} s (RabbitMQ starting, stopping or overloaded?)",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

/// Tells a node nothing answers at (refused, unknown host, no route) from one that refused
/// TLS (`amqps://`) and from one that hung up during the AMQP handshake, which RabbitMQ
/// does on a bad login or vhost.
///
/// amqprs reports all of them as a network error, so a plain TCP connection, and for
/// `amqps://` a TLS handshake on it, is tried to tell.
async fn network_failure(node: &NodeUrl, tls: Option<&Tls>, amqp_error: String) -> BrokerError {
    let unreachable = |reason: String| BrokerError::Unreachable {
        url_without_password: node.display.clone(),
        reason,
    };
    match with_timeout(CONNECT_TIMEOUT, TcpStream::connect(&node.host, node.port)).await {
        Some(Ok(tcp)) => match tls {
            Some(tls) => match tls.probe(node, tcp, CONNECT_TIMEOUT).await {
                Err(refused) => refused,
                Ok(()) => login_failure(amqp_error),
            },
            None => login_failure(amqp_error),
        },
        Some(Err(e)) => unreachable(e.to_string()),
        None => unreachable(format!(
            "no TCP connection within {} s",
            CONNECT_TIMEOUT.as_secs()
        )),
    }
}

/// The node accepted the connection (and TLS), then hung up during the AMQP handshake.
fn login_failure(amqp_error: String) -> BrokerError {
    BrokerError::Closed(format!(
        "AMQP network error: {amqp_error} during the handshake (check user, password and \
             vhost)"
    ))
}

/// The steps after the handshake: watch the connection, declare the topology, open the
/// publishing channel, declare the agents' queues and go live.
async fn set_up(
    shared: &Shared,
    node: &NodeUrl,
    generation: u64,
    connection: Connection,
) -> Result<(Arc<Live>, Kicked), BrokerError> {
    let signals = Arc::new(Signals::default());
    let watch = ConnectionWatch::new(&signals, &node.display);
    connection
        .register_callback(watch)
        .await
        .map_err(|e| BrokerError::Closed(e.to_string()))?;
    let closed_channels = Arc::new(AtomicU32::new(0));
    declare_exchanges_and_dlq(&connection, &closed_channels, &shared.topology).await?;
    let (publisher, kicked) = open_publisher(&connection, node).await?;
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
    let agents = declare_agents_and_go_live(shared, &live).await?;
    log::info!(
        "connected to {} at {} as {:?} (connection #{generation}, {agents} agent queues)",
        server_description(live.connection.get_ref()),
        node.display,
        shared.connection_name,
    );
    Ok((live, kicked))
}

/// Declares both exchanges and the dead-letter queue. A refusal is logged, not fatal: the
/// operator sees what to fix while the rest of the relay keeps working.
async fn declare_exchanges_and_dlq(
    connection: &Connection,
    closed_channels: &Arc<AtomicU32>,
    topology: &Topology,
) -> Result<(), BrokerError> {
    let mut declarer = Declarer::new(connection, closed_channels);
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
            arguments: topology.dlq_arguments(),
        },
        Op::Bind {
            queue: topology.dlq(),
            exchange: topology.dlx(),
            key: String::new(),
        },
        Op::Queue {
            queue: topology.failures(),
            arguments: topology.dlq_arguments(),
        },
        Op::Bind {
            queue: topology.failures(),
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
    declarer.finish().await;
    Ok(())
}

/// Opens the publishing channel in confirm mode.
async fn open_publisher(
    connection: &Connection,
    node: &NodeUrl,
) -> Result<(Publisher, Kicked), BrokerError> {
    let (kick, kicked) = async_channel::bounded(1);
    let channel = connection
        .open_channel(None)
        .await
        .map_err(|e| BrokerError::Closed(e.to_string()))?;
    let publisher = Publisher::open(channel, node.display.clone(), kick)
        .await
        .map_err(|e| BrokerError::Closed(format!("could not open the publishing channel: {e}")))?;
    Ok((publisher, kicked))
}

/// Declares every remembered agent's queue, then installs `live` as the broker's
/// connection. Agents that `Broker::declare_agents` adds meanwhile are seen under the same
/// lock that installs the connection, so none is missed. Returns how many were declared.
async fn declare_agents_and_go_live(
    shared: &Shared,
    live: &Arc<Live>,
) -> Result<usize, BrokerError> {
    let mut declared = BTreeSet::new();
    loop {
        let missing: Vec<AgentId> = {
            let mut state = shared.state();
            let missing: Vec<AgentId> = state.agents.difference(&declared).cloned().collect();
            if missing.is_empty() {
                state.live = Some(live.clone());
                state.gate = None;
                shared.generation.store(live.generation, Ordering::SeqCst);
                return Ok(declared.len());
            }
            missing
        };
        let mut declarer = Declarer::new(live.connection.get_ref(), &live.closed_channels);
        let refusals = declarer.agents(&shared.topology, &missing).await?;
        declarer.finish().await;
        for refusal in refusals {
            log::error!("{refusal}");
        }
        declared.extend(missing);
    }
}

/// "RabbitMQ 3.12.1 (cluster rabbit@host)", for the log.
fn server_description(connection: &Connection) -> String {
    let properties = connection.server_properties();
    format!(
        "{} {} (cluster {})",
        properties.product(),
        properties.version(),
        properties.cluster_name()
    )
}

/// Logs and records what RabbitMQ says about the connection.
pub(super) struct ConnectionWatch {
    signals: Arc<Signals>,
    node: String,
}

impl ConnectionWatch {
    pub(super) fn new(signals: &Arc<Signals>, node: &str) -> Self {
        Self {
            signals: signals.clone(),
            node: node.to_owned(),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_port_is_unreachable_and_the_password_stays_out() {
        let node = NodeUrl::parse("amqp://u:hunter2@127.0.0.1:1/").unwrap();
        let e = smol::block_on(Compat::new(open(&node, None, "test")))
            .err()
            .unwrap();
        assert!(matches!(e, BrokerError::Unreachable { .. }), "{e:?}");
        assert!(e.is_retryable());
        assert!(!format!("{e} {e:?}").contains("hunter2"), "{e:?}");
    }
}
