//! Consuming one agent's queue on a dedicated channel, with manual acks.

use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::Duration;

use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicNackArguments, BasicQosArguments, Channel,
    ConsumerMessage,
};
use amqprs::connection::Connection;
use amqprs::{BasicProperties, FieldValue};
use async_compat::Compat;
use tokio::sync::mpsc::UnboundedReceiver;

use super::channel::{ChannelWatch, CloseReason};
use super::compat::close_detached;
use super::BrokerError;

/// How long closing a consumer's channel may take before it is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// One message taken from an agent's queue, to be acked or nacked on its [`Consumer`].
#[derive(Clone, Debug)]
pub struct Delivery {
    /// Identifies the delivery on the consumer that received it (and only there).
    pub tag: u64,
    /// The message body, as published.
    pub body: Vec<u8>,
    /// RabbitMQ delivered this message before (to this or another consumer).
    pub redelivered: bool,
    /// How many times the quorum queue delivered it before (`x-delivery-count`), if set.
    pub delivery_count: Option<u64>,
    /// The AMQP `message_id` (the envelope id as a UUID string), if the message has one.
    pub message_id: Option<String>,
    /// The `dmr-sender` header (the sending agent's id), if present.
    pub sender: Option<String>,
    /// The `dmr-recipient` header (the recipient agent's id), if present.
    pub recipient: Option<String>,
    /// Why DMR dead-lettered it (the `x-dmr-reason` header), on messages read from the DLQ.
    pub reason: Option<String>,
    /// The message's AMQP properties as published, kept so that dead-lettering it with a
    /// reason ([`super::Broker::dead_letter`]) republishes the same message.
    pub(super) properties: BasicProperties,
    /// The routing key it was published with (the recipient's id).
    pub(super) routing_key: String,
}

/// A live subscription to one agent's queue.
///
/// Dropping it closes its channel in the background, which returns every unacked message
/// to the queue; [`Consumer::close`] does the same and waits for it.
pub struct Consumer {
    /// Wrapped so that dropping it anywhere enters the tokio context amqprs needs.
    channel: Compat<Channel>,
    /// Straight from amqprs' dispatcher: no task of ours (or amqprs') per consumer, which
    /// matters with one consumer per connected agent. Only the session's pump reads it.
    deliveries: async_lock::Mutex<UnboundedReceiver<Box<ConsumerMessage>>>,
    queue: String,
    generation: u64,
    closed: CloseReason,
}

impl Consumer {
    /// Opens a channel on `connection` and subscribes to `queue`. Runs inside `Compat`,
    /// never cancelled halfway (see `detached`).
    pub(super) async fn open(
        connection: &Connection,
        queue: String,
        prefetch: u16,
        generation: u64,
        closed_channels: Arc<AtomicU32>,
    ) -> Result<Self, BrokerError> {
        let fail = |e: amqprs::error::Error, closed: Option<&CloseReason>| match closed
            .and_then(CloseReason::get)
        {
            Some((404, _)) => BrokerError::NoQueue(queue.clone()),
            Some((code, text)) => {
                BrokerError::Refused(format!("cannot consume {queue}: {code} {text}"))
            }
            None => BrokerError::Closed(format!("cannot consume {queue}: {e}")),
        };
        let channel = connection
            .open_channel(None)
            .await
            .map_err(|e| fail(e, None))?;
        let (watch, closed) = ChannelWatch::new(closed_channels, Some(queue.clone()));
        let setup = async {
            channel.register_callback(watch).await?;
            channel
                .basic_qos(BasicQosArguments::new(0, prefetch, false))
                .await?;
            let args = BasicConsumeArguments::new(&queue, "")
                .manual_ack(true)
                .finish();
            channel.basic_consume_rx(args).await
        };
        let (_tag, deliveries) = setup.await.map_err(|e| fail(e, Some(&closed)))?;
        let channel = Compat::new(channel);
        Ok(Self {
            channel,
            deliveries: async_lock::Mutex::new(deliveries),
            queue,
            generation,
            closed,
        })
    }

    /// The next delivery; `None` once the consumer's channel or connection has closed
    /// (broker restart, consumer cancelled by RabbitMQ, …). Then call [`Consumer::close`]
    /// and, after [`super::Broker::connected`], consume again.
    pub async fn next(&self) -> Option<Delivery> {
        loop {
            let message = self.deliveries.lock().await.recv().await?;
            // amqprs fills all three for every delivery; skip anything else.
            if let Some(d) = delivery(message) {
                return Some(d);
            }
        }
    }

    /// Acknowledges a delivery of this consumer: RabbitMQ forgets the message.
    pub async fn ack(&self, tag: u64) -> Result<(), BrokerError> {
        self.usable()?;
        let channel = self.channel.get_ref();
        Compat::new(channel.basic_ack(BasicAckArguments::new(tag, false)))
            .await
            .map_err(|e| self.lost(e))
    }

    /// Returns a delivery to the queue (`requeue=true`). The quorum queue counts
    /// deliveries and dead-letters the message to the DLQ past `x-delivery-limit`.
    pub async fn nack(&self, tag: u64) -> Result<(), BrokerError> {
        self.usable()?;
        let channel = self.channel.get_ref();
        Compat::new(channel.basic_nack(BasicNackArguments::new(tag, false, true)))
            .await
            .map_err(|e| self.lost(e))
    }

    /// Closes the channel, so every unacked message returns to the queue (cancelling the
    /// consumer alone does not return them on RabbitMQ 3.10).
    pub async fn close(self) {
        let channel = self.channel.into_inner();
        let what = format!("the consumer channel of {}", self.queue);
        close_detached(&what, CLOSE_TIMEOUT, channel.close()).await;
    }

    /// The broker connection generation this consumer belongs to (see `Broker::generation`).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn usable(&self) -> Result<(), BrokerError> {
        if self.channel.get_ref().is_open() {
            Ok(())
        } else {
            Err(self.lost("the channel is closed"))
        }
    }

    fn lost(&self, e: impl std::fmt::Display) -> BrokerError {
        let reason = match self.closed.get() {
            Some((code, text)) => format!("{code} {text}"),
            None => e.to_string(),
        };
        BrokerError::Closed(format!(
            "the consumer of {} is gone ({reason}); its unacked messages return to the queue",
            self.queue
        ))
    }
}

/// A [`Delivery`] from what amqprs' dispatcher assembled (method, properties, body).
fn delivery(message: Box<ConsumerMessage>) -> Option<Delivery> {
    let ConsumerMessage {
        deliver,
        basic_properties,
        content,
        ..
    } = *message;
    let (deliver, properties, body) = (deliver?, basic_properties?, content?);
    let header = |name: &str| {
        let value = properties.headers()?.get(&name.try_into().ok()?)?;
        Some(value)
    };
    let text = |name: &str| match header(name)? {
        FieldValue::S(s) => Some(String::from(s.clone())),
        _ => None,
    };
    Some(Delivery {
        tag: deliver.delivery_tag(),
        body,
        redelivered: deliver.redelivered(),
        delivery_count: header("x-delivery-count").and_then(as_count),
        message_id: properties.message_id().cloned(),
        sender: text(super::HEADER_SENDER),
        recipient: text(super::HEADER_RECIPIENT),
        reason: text(super::HEADER_REASON),
        routing_key: deliver.routing_key().clone(),
        properties,
    })
}

fn as_count(v: &FieldValue) -> Option<u64> {
    match *v {
        FieldValue::b(n) => u64::try_from(n).ok(),
        FieldValue::B(n) => Some(n.into()),
        FieldValue::s(n) => u64::try_from(n).ok(),
        FieldValue::u(n) => Some(n.into()),
        FieldValue::I(n) => u64::try_from(n).ok(),
        FieldValue::i(n) => Some(n.into()),
        FieldValue::l(n) => u64::try_from(n).ok(),
        FieldValue::T(n) => Some(n),
        _ => None,
    }
}
