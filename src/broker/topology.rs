//! The RabbitMQ topology of DESIGN §6: exchange and queue names, the agent queues'
//! arguments, and the policies that carry every setting that may change (TTL, delivery
//! limit, dead-lettering, overflow, DLQ retention).
//!
//! Queue arguments can never change on a live queue (a re-declaration with others fails
//! with 406), policies can: so queues are declared with only what is fixed for good (quorum,
//! single active consumer) and `dmr-server rabbitmq setup` applies the rest as policies.

use amqprs::{FieldTable, FieldValue};

use super::BrokerError;
use crate::protocol::AgentId;
use crate::rabbitmq_admin::Policy;

/// Priority of DMR's policies: RabbitMQ applies one policy per queue, the highest; above
/// the default 0 so a catch-all policy of the vhost does not replace them.
const POLICY_PRIORITY: i64 = 10;

/// Escapes the regular-expression characters of a queue prefix for a policy pattern.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.^$|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Names and arguments of the RabbitMQ topology (DESIGN §6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Prepended to every exchange and queue name (`--queue-prefix`); empty in production.
    pub prefix: String,
    /// `message-ttl` of the agent queues' policy, in milliseconds (`--message-ttl`).
    pub message_ttl_ms: u64,
    /// `delivery-limit` of the agent queues' policy (`--delivery-limit`).
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

    /// Arguments of every agent queue: only what never changes (quorum, one active
    /// consumer among the server instances). TTL, delivery limit, dead-lettering and
    /// overflow come from the policy of [`Topology::agent_policy`].
    pub(super) fn agent_queue_arguments(&self) -> FieldTable {
        table([
            ("x-queue-type", FieldValue::from("quorum")),
            ("x-single-active-consumer", FieldValue::t(true)),
        ])
    }

    /// The name of the agent queues' policy: `{prefix}dmr-agents`.
    pub fn agent_policy_name(&self) -> String {
        format!("{}dmr-agents", self.prefix)
    }

    /// The name of the dead-letter queue's policy: `{prefix}dmr-dlq`.
    pub fn dlq_policy_name(&self) -> String {
        format!("{}dmr-dlq", self.prefix)
    }

    /// The agent queues' policy: TTL, delivery limit, at-least-once dead-lettering to the
    /// DLX, and refusing publishes when full (which at-least-once requires).
    pub fn agent_policy(&self) -> Policy {
        let mut definition = serde_json::Map::new();
        for (key, value) in [
            ("message-ttl", serde_json::json!(self.message_ttl_ms)),
            ("delivery-limit", serde_json::json!(self.delivery_limit)),
            ("dead-letter-exchange", serde_json::json!(self.dlx())),
            ("dead-letter-strategy", serde_json::json!("at-least-once")),
            ("overflow", serde_json::json!("reject-publish")),
        ] {
            definition.insert(key.to_owned(), value);
        }
        Policy {
            pattern: format!("^{}dmr\\.agent\\.", regex_escape(&self.prefix)),
            apply_to: "queues",
            priority: POLICY_PRIORITY,
            definition,
        }
    }

    /// The dead-letter queue's policy: messages older than `retention_ms` are dropped.
    pub fn dlq_policy(&self, retention_ms: u64) -> Policy {
        let mut definition = serde_json::Map::new();
        definition.insert("message-ttl".to_owned(), serde_json::json!(retention_ms));
        Policy {
            pattern: format!("^{}dmr\\.dlq$", regex_escape(&self.prefix)),
            apply_to: "queues",
            priority: POLICY_PRIORITY,
            definition,
        }
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
        assert_eq!(t.agent_policy().pattern, r"^p\.dmr\.agent\.");
        assert_eq!(t.dlq_policy(1).pattern, r"^p\.dmr\.dlq$");
        assert_eq!(t.agent_policy_name(), "p.dmr-agents");
        assert_eq!(t.agent_policy().definition["delivery-limit"], 10);
        assert_eq!(
            t.agent_policy().definition["dead-letter-exchange"],
            "p.dmr.dlx"
        );
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
