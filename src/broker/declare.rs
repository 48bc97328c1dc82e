//! Topology operations (declare, bind, inspect, delete) and the [`Declarer`] that runs them
//! on a throwaway channel, turning RabbitMQ's refusals into errors that say what to fix.

use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use amqprs::channel::{
    Channel, ExchangeDeclareArguments, ExchangeDeleteArguments, QueueBindArguments,
    QueueDeclareArguments, QueueDeleteArguments, QueuePurgeArguments,
};
use amqprs::connection::Connection;
use amqprs::FieldTable;

use super::channel::{ChannelWatch, CloseReason};
use super::{BrokerError, Topology};
use crate::protocol::AgentId;

/// What RabbitMQ's 406 says when a queue exists with other arguments.
const INEQUIVALENT: &str = "inequivalent arg";

/// A topology operation, run on a throwaway channel.
// Inspecting and deleting are needed only by the test-support hooks.
#[cfg_attr(not(feature = "test-support"), allow(dead_code))]
pub(super) enum Op {
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
    Purge {
        queue: String,
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
            Op::Purge { queue } => format!("cannot purge queue {queue}"),
        }
    }

    /// The error for a channel RabbitMQ closed with `code` and `text` during this operation.
    fn refused(&self, code: u16, text: &str) -> BrokerError {
        let said = format!("{}: RabbitMQ says \"{code} {text}\"", self.what());
        match self {
            Op::Passive { queue } | Op::Purge { queue } if code == 404 => {
                BrokerError::NoQueue(queue.clone())
            }
            Op::Queue { queue, .. } if code == 406 && text.contains(INEQUIVALENT) => {
                BrokerError::Declare(format!(
                    "{said}. The queue exists with other arguments; drain and delete it \
                     (rabbitmqctl delete_queue {queue} --if-empty) so that it is declared \
                     again: see \"Queue settings by policy\" in docs/OPERATIONS.md"
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
            Op::Passive { .. }
            | Op::Purge { .. }
            | Op::DeleteQueue { .. }
            | Op::DeleteExchange { .. } => BrokerError::Refused(said),
            _ => BrokerError::Declare(said),
        }
    }

    /// Sends the operation on `channel`; the message count for [`Op::Passive`], else 0.
    async fn send(&self, channel: &Channel) -> Result<u32, amqprs::error::Error> {
        match self {
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
            Op::Purge { queue } => {
                let args = QueuePurgeArguments::new(queue);
                let purged = channel.queue_purge(args).await;
                purged.map(Option::unwrap_or_default)
            }
        }
    }
}

/// Runs topology operations on one channel, opening a new one after RabbitMQ closed it
/// (a refused declaration closes the channel). Used only inside `Compat`, and never
/// cancelled halfway except together with its connection (see [`super::compat::detached`]).
pub(super) struct Declarer<'a> {
    connection: &'a Connection,
    closed_channels: &'a Arc<AtomicU32>,
    channel: Option<(Channel, CloseReason)>,
}

impl<'a> Declarer<'a> {
    pub(super) fn new(connection: &'a Connection, closed_channels: &'a Arc<AtomicU32>) -> Self {
        Self {
            connection,
            closed_channels,
            channel: None,
        }
    }

    /// Declares the queues of `agents` and binds them to the exchange. Returns RabbitMQ's
    /// refusals (one message per refused agent, the others are still declared), or the first
    /// error that is not a refusal (the connection is unusable).
    pub(super) async fn agents(
        &mut self,
        topology: &Topology,
        agents: &[AgentId],
    ) -> Result<Vec<String>, BrokerError> {
        let mut refusals = Vec::new();
        for agent in agents {
            match self.agent(topology, agent).await {
                Ok(()) => {}
                Err(BrokerError::Declare(e)) => refusals.push(e),
                Err(e) => return Err(e),
            }
        }
        Ok(refusals)
    }

    async fn agent(&mut self, topology: &Topology, agent: &AgentId) -> Result<(), BrokerError> {
        let queue = topology.queue(agent);
        let declared = self
            .run(Op::Queue {
                queue: queue.clone(),
                arguments: topology.agent_queue_arguments(),
            })
            .await;
        match declared {
            Ok(_) => {}
            Err(BrokerError::Declare(e)) if e.contains(INEQUIVALENT) => {
                self.use_existing(&queue, &e).await?
            }
            Err(e) => return Err(e),
        }
        self.run(Op::Bind {
            queue,
            exchange: topology.exchange(),
            key: agent.to_string(),
        })
        .await?;
        Ok(())
    }

    /// A queue declared by a first-round server carries TTL and delivery limit as
    /// arguments, so declaring it without them fails (RabbitMQ 3.10); it still works as it
    /// is, so use it and tell the operator to migrate it.
    async fn use_existing(&mut self, queue: &str, refusal: &str) -> Result<(), BrokerError> {
        let queue = queue.to_owned();
        match self
            .run(Op::Passive {
                queue: queue.clone(),
            })
            .await
        {
            Ok(_) => {
                log::warn!(
                    "queue {queue} was declared with other arguments (by an older dmr-server: \
                     x-message-ttl, x-delivery-limit, …); using it as it is, but the policy of \
                     `dmr-server rabbitmq setup` can only tighten those. Migrate it (drain and \
                     recreate): see \"Queue settings by policy\" in docs/OPERATIONS.md"
                );
                Ok(())
            }
            Err(BrokerError::NoQueue(_)) => Err(BrokerError::Declare(refusal.to_owned())),
            Err(e) => Err(e),
        }
    }

    /// Runs one operation; returns the message count for [`Op::Passive`], else 0.
    pub(super) async fn run(&mut self, op: Op) -> Result<u32, BrokerError> {
        let lost = |e: amqprs::error::Error| BrokerError::Closed(format!("{}: {e}", op.what()));
        let (channel, reason) = match self.channel.take() {
            Some((channel, reason)) if channel.is_open() => (channel, reason),
            _ => self.open().await.map_err(lost)?,
        };
        match op.send(&channel).await {
            Ok(n) => {
                self.channel = Some((channel, reason));
                Ok(n)
            }
            Err(e) => match reason.get() {
                Some((code, text)) => Err(op.refused(code, &text)),
                None => Err(lost(e)),
            },
        }
    }

    async fn open(&self) -> Result<(Channel, CloseReason), amqprs::error::Error> {
        let channel = self.connection.open_channel(None).await?;
        let (watch, reason) = ChannelWatch::new(self.closed_channels.clone(), None);
        channel.register_callback(watch).await?;
        Ok((channel, reason))
    }

    /// Closes the channel, if one is open.
    pub(super) async fn finish(mut self) {
        if let Some((channel, _)) = self.channel.take() {
            let _ = channel.close().await;
        }
    }
}
