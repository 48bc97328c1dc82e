//! Reading, replaying and purging the dead-letter queue, for `dmr-server dlq`.
//!
//! `basic.get` is refused on some quorum queues (single active consumer, RabbitMQ 3.10),
//! so the DLQ is read by consuming it with manual acks: a [`DlqSnapshot`] takes the
//! messages that were ready when it started (prefetch = that count) and holds them unacked.
//! A message leaves the DLQ only when the snapshot acks it (after a confirmed replay);
//! closing the snapshot returns every other one to the queue.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use amqprs::{FieldTable, FieldValue};
use async_compat::Compat;

use super::{Broker, BrokerError, Consumer, Delivery, CONFIRM_TIMEOUT, HEADER_REASON};
use crate::wait::with_timeout;

/// AMQP header with the time (Unix seconds, AMQP timestamp) DMR dead-lettered a message.
pub(super) const HEADER_DEAD_LETTERED_AT: &str = "x-dmr-dead-lettered-at";

/// Headers RabbitMQ or DMR add when dead-lettering or redelivering; a replayed message
/// starts without them.
const DEATH_HEADERS: &[&str] = &[
    "x-death",
    "x-first-death-reason",
    "x-first-death-queue",
    "x-first-death-exchange",
    "x-last-death-reason",
    "x-last-death-queue",
    "x-last-death-exchange",
    "x-delivery-count",
    HEADER_REASON,
    HEADER_DEAD_LETTERED_AT,
];

/// Most messages one snapshot takes (its prefetch).
const MAX_SNAPSHOT: u32 = u16::MAX as u32;

/// What is known about one dead-lettered message, without its (sealed) content.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The envelope id (AMQP `message_id`).
    pub id: String,
    pub sender: Option<String>,
    /// The recipient agent: the `dmr-recipient` header, else the routing key.
    pub recipient: String,
    /// The message type (`ChatMessage`, …).
    pub kind: Option<String>,
    /// Size of the sealed envelope.
    pub bytes: usize,
    /// Why: `x-dmr-reason` when DMR dead-lettered it, else RabbitMQ's latest reason
    /// (`delivery_limit`, `expired`, `rejected`, `maxlen`).
    pub reason: Option<String>,
    /// How many times it was dead-lettered.
    pub deaths: u64,
    /// When it was first dead-lettered, Unix seconds.
    pub first_death_at: Option<u64>,
    /// When the sender created it, Unix seconds (AMQP `timestamp`).
    pub created_at: Option<u64>,
    /// Every header but the content, as text, sorted by name.
    pub headers: Vec<(String, String)>,
    delivery: Delivery,
}

impl DeadLetter {
    fn from_delivery(delivery: Delivery) -> Self {
        let properties = &delivery.properties;
        let empty = FieldTable::new();
        let headers = properties.headers().unwrap_or(&empty);
        let get = |name: &str| headers.get(&name.try_into().ok()?);
        let deaths = get("x-death").map(x_death).unwrap_or_default();
        let dmr_reason = delivery.reason.clone();
        let dmr_at = get(HEADER_DEAD_LETTERED_AT).and_then(as_u64);
        let first_death_at = deaths.iter().filter_map(|d| d.time).chain(dmr_at).min();
        let mut shown: Vec<(String, String)> = headers
            .as_ref()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        shown.sort();
        Self {
            id: delivery.message_id.clone().unwrap_or_default(),
            sender: delivery.sender.clone(),
            recipient: delivery
                .recipient
                .clone()
                .unwrap_or_else(|| delivery.routing_key.clone()),
            kind: properties.message_type().cloned(),
            bytes: delivery.body.len(),
            // x-death lists the latest death first.
            reason: dmr_reason
                .clone()
                .or_else(|| deaths.first().and_then(|d| d.reason.clone())),
            deaths: deaths.iter().map(|d| d.count).sum::<u64>() + u64::from(dmr_reason.is_some()),
            first_death_at,
            created_at: properties.timestamp(),
            headers: shown,
            delivery,
        }
    }
}

/// One entry of RabbitMQ's `x-death` header.
struct Death {
    reason: Option<String>,
    count: u64,
    time: Option<u64>,
}

fn x_death(value: &FieldValue) -> Vec<Death> {
    let FieldValue::A(entries) = value else {
        return Vec::new();
    };
    let entries: Vec<FieldValue> = entries.clone().into();
    entries
        .iter()
        .filter_map(|entry| match entry {
            FieldValue::F(table) => Some(table),
            _ => None,
        })
        .map(|table| {
            let get = |name: &str| table.get(&name.try_into().ok()?);
            Death {
                reason: get("reason").and_then(|v| match v {
                    FieldValue::S(s) => Some(s.to_string()),
                    _ => None,
                }),
                count: get("count").and_then(as_u64).unwrap_or(1),
                time: get("time").and_then(as_u64),
            }
        })
        .collect()
}

fn as_u64(v: &FieldValue) -> Option<u64> {
    match *v {
        FieldValue::T(n) => Some(n),
        FieldValue::l(n) => u64::try_from(n).ok(),
        FieldValue::I(n) => u64::try_from(n).ok(),
        FieldValue::i(n) => Some(n.into()),
        FieldValue::s(n) => u64::try_from(n).ok(),
        FieldValue::u(n) => Some(n.into()),
        FieldValue::b(n) => u64::try_from(n).ok(),
        FieldValue::B(n) => Some(n.into()),
        _ => None,
    }
}

/// The messages that were in the DLQ when the snapshot was taken, held until it closes.
pub struct DlqSnapshot {
    consumer: Option<Consumer>,
    messages: Vec<DeadLetter>,
}

impl DlqSnapshot {
    /// The messages, in queue order.
    pub fn messages(&self) -> &[DeadLetter] {
        &self.messages
    }

    /// Publishes `message` again to its recipient's queue (through the exchange, mandatory,
    /// persistent, without its dead-letter headers) and, once RabbitMQ confirmed that,
    /// removes it from the DLQ. On any error it stays in the DLQ.
    pub async fn replay(&self, broker: &Broker, message: &DeadLetter) -> Result<(), BrokerError> {
        let consumer = self.consumer.as_ref().ok_or(BrokerError::NotConnected)?;
        let live = broker.shared.live().ok_or(BrokerError::NotConnected)?;
        let d = &message.delivery;
        let mut properties = d.properties.clone();
        let mut headers = properties.headers().cloned().unwrap_or_default();
        for name in DEATH_HEADERS {
            if let Ok(key) = (*name).try_into() {
                headers.remove(&key);
            }
        }
        properties.with_headers(headers);
        Compat::new(live.publisher.send(
            &broker.shared.exchange,
            &message.recipient,
            &message.id,
            properties,
            d.body.clone(),
            CONFIRM_TIMEOUT,
        ))
        .await?;
        consumer.ack(d.tag).await
    }

    /// Returns every message not replayed to the DLQ.
    pub async fn close(mut self) {
        if let Some(consumer) = self.consumer.take() {
            consumer.close().await;
        }
    }
}

impl Broker {
    /// Messages ready in the dead-letter queue (not those another reader holds).
    pub async fn dlq_depth(&self) -> Result<u32, BrokerError> {
        self.run_ops(vec![super::declare::Op::Passive {
            queue: self.shared.topology.dlq(),
        }])
        .await
    }

    /// Takes every message ready in the DLQ (at most 65535), waiting at most `idle`
    /// for each next one. See [`DlqSnapshot`].
    pub async fn dlq_snapshot(&self, idle: Duration) -> Result<DlqSnapshot, BrokerError> {
        let ready = self.dlq_depth().await?.min(MAX_SNAPSHOT);
        if ready == 0 {
            return Ok(DlqSnapshot {
                consumer: None,
                messages: Vec::new(),
            });
        }
        let prefetch = u16::try_from(ready).unwrap_or(u16::MAX);
        let consumer = self
            .consume_queue(self.shared.topology.dlq(), prefetch)
            .await?;
        let mut messages = Vec::with_capacity(ready as usize);
        while messages.len() < ready as usize {
            match with_timeout(idle, consumer.next()).await {
                Some(Some(delivery)) => messages.push(DeadLetter::from_delivery(delivery)),
                // Idle: another reader holds the rest. Closed: keep what arrived.
                _ => break,
            }
        }
        Ok(DlqSnapshot {
            consumer: Some(consumer),
            messages,
        })
    }

    /// Deletes every ready message of the DLQ; how many there were.
    pub async fn dlq_purge(&self) -> Result<u32, BrokerError> {
        self.run_ops(vec![super::declare::Op::Purge {
            queue: self.shared.topology.dlq(),
        }])
        .await
    }
}

/// Now as an AMQP timestamp (Unix seconds).
pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
