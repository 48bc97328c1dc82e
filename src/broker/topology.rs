//! The RabbitMQ topology of DESIGN §6: exchange and queue names, and the agent queues'
//! arguments.

use amqprs::{FieldTable, FieldValue};

use super::BrokerError;
use crate::protocol::AgentId;

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
    pub(crate) fn exchange(&self) -> String {
        format!("{}dmr.messages", self.prefix)
    }

    /// The quorum queue of one agent: `{prefix}dmr.agent.{id}`.
    pub(crate) fn queue(&self, agent: &AgentId) -> String {
        format!("{}dmr.agent.{agent}", self.prefix)
    }

    /// The dead-letter exchange (fanout): `{prefix}dmr.dlx`.
    pub(crate) fn dlx(&self) -> String {
        format!("{}dmr.dlx", self.prefix)
    }

    /// The dead-letter queue bound to [`Topology::dlx`]: `{prefix}dmr.dlq`.
    pub(crate) fn dlq(&self) -> String {
        format!("{}dmr.dlq", self.prefix)
    }

    /// The queue of dead-lettered copies that servers turn into failure notices for the
    /// senders (bound to [`Topology::dlx`] beside the DLQ): `{prefix}dmr.failures`.
    pub(crate) fn failures(&self) -> String {
        format!("{}dmr.failures", self.prefix)
    }

    /// Checks that RabbitMQ will accept these names and arguments.
    pub(crate) fn validate(&self) -> Result<(), BrokerError> {
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

    /// Arguments of every agent queue: quorum, dead-lettered at least once to the DLX,
    /// refusing publishes when full, with the configured TTL and delivery limit.
    pub(super) fn agent_queue_arguments(&self) -> FieldTable {
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

    /// Arguments of the dead-letter queue: a plain quorum queue.
    pub(super) fn dlq_arguments(&self) -> FieldTable {
        table([("x-queue-type", "quorum".into())])
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
}
