//! The publishing channel: publisher confirms matched to publishes by delivery tag.
//!
//! After `confirm.select`, RabbitMQ numbers the publishes of a channel 1, 2, 3, … in wire
//! order and answers each with `basic.ack` or `basic.nack` (possibly `multiple`, covering
//! every lower tag too). An unroutable `mandatory` publish first comes back as `basic.return`
//! and is then acked, so a return marks its publish as refused before the ack settles it.
//! amqprs does none of this bookkeeping; this module does.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{BasicPublishArguments, Channel};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, FieldTable, FieldValue, Nack, Return};
use async_compat::Compat;
use async_trait::async_trait;

use super::compat::within;
use super::BrokerError;
use crate::protocol::Header;
use crate::sync::lock;

/// The outcome a waiting publish receives.
type Outcome = Result<(), BrokerError>;

struct Pending {
    done: async_channel::Sender<Outcome>,
    message_id: String,
    recipient: String,
    /// Set by `basic.return`: the later ack must become a refusal.
    returned: Option<String>,
}

#[derive(Default)]
struct ConfirmState {
    /// Why the channel can take no more publishes, once it cannot.
    closed: Option<String>,
    pending: BTreeMap<u64, Pending>,
    /// Dropped (which wakes their receivers) once nothing is pending.
    settled_waiters: Vec<async_channel::Sender<()>>,
}

impl ConfirmState {
    /// Wakes [`Confirms::settled`] waiters if nothing is pending any more.
    fn wake_if_settled(&mut self) {
        if self.pending.is_empty() {
            self.settled_waiters.clear();
        }
    }
}

/// Publishes waiting for their confirm, by delivery tag.
#[derive(Default)]
pub(super) struct Confirms {
    state: Mutex<ConfirmState>,
}

impl Confirms {
    fn lock(&self) -> MutexGuard<'_, ConfirmState> {
        lock(&self.state)
    }

    fn register(
        &self,
        tag: u64,
        message_id: String,
        recipient: String,
    ) -> Result<async_channel::Receiver<Outcome>, BrokerError> {
        let mut state = self.lock();
        if let Some(reason) = &state.closed {
            return Err(BrokerError::Closed(reason.clone()));
        }
        let (done, rx) = async_channel::bounded(1);
        state.pending.insert(
            tag,
            Pending {
                done,
                message_id,
                recipient,
                returned: None,
            },
        );
        Ok(rx)
    }

    fn forget(&self, tag: u64) {
        let mut state = self.lock();
        state.pending.remove(&tag);
        state.wake_if_settled();
    }

    /// Removes and returns the publishes a confirm for `tag` settles.
    fn take(&self, tag: u64, multiple: bool) -> Vec<Pending> {
        let mut state = self.lock();
        let settled = if multiple {
            let rest = state.pending.split_off(&(tag.saturating_add(1)));
            std::mem::replace(&mut state.pending, rest)
                .into_values()
                .collect()
        } else {
            state.pending.remove(&tag).into_iter().collect()
        };
        state.wake_if_settled();
        settled
    }

    fn ack(&self, tag: u64, multiple: bool) {
        let settled = self.take(tag, multiple);
        for p in settled {
            let outcome = match p.returned {
                Some(reason) => Err(BrokerError::Refused(reason)),
                None => Ok(()),
            };
            let _ = p.done.try_send(outcome);
        }
    }

    fn nack(&self, tag: u64, multiple: bool) {
        let settled = self.take(tag, multiple);
        for p in settled {
            let reason = p.returned.unwrap_or_else(|| {
                format!(
                    "RabbitMQ refused message {} for {} (basic.nack): the recipient's queue is \
                     full (x-overflow=reject-publish) or has lost its quorum; try again later",
                    p.message_id, p.recipient
                )
            });
            let _ = p.done.try_send(Err(BrokerError::Refused(reason)));
        }
    }

    /// Marks the oldest unsettled publish of `message_id` as returned (unroutable).
    fn returned(&self, message_id: Option<&str>, reason: String) {
        let mut state = self.lock();
        let hit = state
            .pending
            .values_mut()
            .find(|p| p.returned.is_none() && Some(p.message_id.as_str()) == message_id);
        match hit {
            Some(p) => p.returned = Some(reason),
            None => {
                log::warn!("RabbitMQ returned a message this server is not waiting for: {reason}")
            }
        }
    }

    /// Fails every waiting publish and refuses new ones: the channel is gone.
    pub(super) fn fail_all(&self, reason: &str) {
        let settled = {
            let mut state = self.lock();
            if state.closed.is_none() {
                state.closed = Some(reason.to_owned());
            }
            let pending = std::mem::take(&mut state.pending);
            state.wake_if_settled();
            pending
        };
        for p in settled.into_values() {
            let _ = p.done.try_send(Err(BrokerError::Closed(format!(
                "{reason}; message {} may or may not be stored, send it again",
                p.message_id
            ))));
        }
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.lock().pending.len()
    }

    /// Resolves once no publish waits for its confirm.
    pub(super) async fn settled(&self) {
        let waiter = {
            let mut state = self.lock();
            if state.pending.is_empty() {
                return;
            }
            let (tx, rx) = async_channel::bounded::<()>(1);
            state.settled_waiters.push(tx);
            rx
        };
        // Nothing is ever sent: recv() fails when the sender is dropped.
        let _ = waiter.recv().await;
    }
}

/// The channel every publish goes through, in confirm mode.
pub(super) struct Publisher {
    /// Wrapped so that dropping it anywhere enters the tokio context amqprs needs.
    channel: Compat<Channel>,
    /// The tag the next publish gets; held across `basic_publish` so tag order is wire order.
    next_tag: smol::lock::Mutex<u64>,
    pub(super) confirms: Arc<Confirms>,
}

impl Publisher {
    /// Puts `channel` in confirm mode. Runs inside `Compat`.
    pub(super) async fn open(
        channel: Channel,
        node: String,
        kick: async_channel::Sender<String>,
    ) -> Result<Self, amqprs::error::Error> {
        let confirms = Arc::new(Confirms::default());
        channel
            .register_callback(PublisherWatch {
                confirms: confirms.clone(),
                kick,
                node,
            })
            .await?;
        channel
            .confirm_select(amqprs::channel::ConfirmSelectArguments::new(false))
            .await?;
        Ok(Self {
            channel: Compat::new(channel),
            next_tag: smol::lock::Mutex::new(1),
            confirms,
        })
    }

    /// Hands one envelope to RabbitMQ and returns at once: the returned [`Confirm`] resolves
    /// when RabbitMQ confirmed it, so one caller can keep many publishes in flight without
    /// a task per publish. Runs inside `Compat`.
    pub(super) async fn start(
        &self,
        exchange: &str,
        header: &Header,
        body: Vec<u8>,
    ) -> Result<Confirm, BrokerError> {
        let message_id = header.id.0.to_string();
        let mut headers = FieldTable::new();
        for (key, value) in [
            (super::HEADER_SENDER, header.sender.as_str()),
            (super::HEADER_RECIPIENT, header.recipient.as_str()),
        ] {
            if let Ok(key) = key.try_into() {
                headers.insert(key, FieldValue::from(value));
            }
        }
        let properties = BasicProperties::default()
            .with_delivery_mode(amqprs::DELIVERY_MODE_PERSISTENT)
            .with_content_type(super::CONTENT_TYPE)
            .with_message_id(&message_id)
            .with_message_type(header.kind.as_str())
            .with_timestamp(header.created_at_ms / 1000)
            .with_headers(headers)
            .finish();
        let recipient = header.recipient.as_str();
        self.hand_over(exchange, recipient, message_id, properties, body)
            .await
    }

    /// Publishes `body` with `properties` as they are (mandatory, persistent as given) and
    /// waits for the confirm. Runs inside `Compat`.
    pub(super) async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        message_id: &str,
        properties: BasicProperties,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<(), BrokerError> {
        let message_id = message_id.to_owned();
        self.hand_over(exchange, routing_key, message_id, properties, body)
            .await?
            .wait(timeout)
            .await
    }

    /// `basic.publish` under the next delivery tag, registered for its confirm.
    async fn hand_over(
        &self,
        exchange: &str,
        routing_key: &str,
        message_id: String,
        properties: BasicProperties,
        body: Vec<u8>,
    ) -> Result<Confirm, BrokerError> {
        let args = BasicPublishArguments::new(exchange, routing_key)
            .mandatory(true)
            .finish();
        let mut next_tag = self.next_tag.lock().await;
        let tag = *next_tag;
        let outcome = self
            .confirms
            .register(tag, message_id.clone(), routing_key.to_owned())?;
        if let Err(e) = self
            .channel
            .get_ref()
            .basic_publish(properties, body, args)
            .await
        {
            self.confirms.forget(tag);
            return Err(BrokerError::Closed(format!(
                "could not hand message {message_id} to RabbitMQ: {e}"
            )));
        }
        *next_tag += 1;
        Ok(Confirm {
            tag,
            outcome,
            confirms: self.confirms.clone(),
            message_id,
        })
    }
}

/// A publish RabbitMQ has been handed but may not have confirmed yet.
pub(super) struct Confirm {
    tag: u64,
    outcome: async_channel::Receiver<Outcome>,
    confirms: Arc<Confirms>,
    message_id: String,
}

impl Confirm {
    /// Waits for the confirm, at most `timeout` (then the publish is forgotten: a late
    /// confirm finds no one waiting).
    pub(super) async fn wait(self, timeout: Duration) -> Result<(), BrokerError> {
        let confirmed = async {
            self.outcome.recv().await.unwrap_or_else(|_| {
                Err(BrokerError::Closed(format!(
                    "the RabbitMQ connection closed before message {} was confirmed; \
                     it may or may not be stored, send it again",
                    self.message_id
                )))
            })
        };
        let result = within(timeout, confirmed).await;
        if matches!(result, Err(BrokerError::Timeout)) {
            self.confirms.forget(self.tag);
        }
        result
    }
}

/// Receives confirms and returns of the publishing channel, and notices its closure.
struct PublisherWatch {
    confirms: Arc<Confirms>,
    /// Tells the connection supervisor that the channel is gone and must be rebuilt.
    kick: async_channel::Sender<String>,
    node: String,
}

#[async_trait]
impl ChannelCallback for PublisherWatch {
    async fn close(
        &mut self,
        _channel: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        let reason = format!(
            "RabbitMQ at {} closed the publishing channel: {} {}",
            self.node,
            close.reply_code(),
            close.reply_text()
        );
        self.confirms.fail_all(&reason);
        let _ = self.kick.try_send(reason);
        Ok(())
    }

    async fn cancel(
        &mut self,
        _channel: &Channel,
        _cancel: Cancel,
    ) -> Result<(), amqprs::error::Error> {
        Ok(())
    }

    async fn flow(
        &mut self,
        _channel: &Channel,
        active: bool,
    ) -> Result<bool, amqprs::error::Error> {
        if !active {
            log::warn!("RabbitMQ at {} paused publishing (channel.flow)", self.node);
        }
        Ok(active)
    }

    async fn publish_ack(&mut self, _channel: &Channel, ack: Ack) {
        self.confirms.ack(ack.delivery_tag(), ack.mutiple());
    }

    async fn publish_nack(&mut self, _channel: &Channel, nack: Nack) {
        self.confirms.nack(nack.delivery_tag(), nack.multiple());
    }

    async fn publish_return(
        &mut self,
        _channel: &Channel,
        ret: Return,
        properties: BasicProperties,
        _content: Vec<u8>,
    ) {
        let reason =
            format!(
            "no queue takes messages for recipient {:?}: RabbitMQ returned message {} ({} {}); \
             its queue is not declared (is the agent in the directory?)",
            ret.routing_key(),
            properties.message_id().map(String::as_str).unwrap_or("without id"),
            ret.reply_code(),
            ret.reply_text()
        );
        self.confirms
            .returned(properties.message_id().map(String::as_str), reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(rx: &async_channel::Receiver<Outcome>) -> Option<Outcome> {
        rx.try_recv().ok()
    }

    #[test]
    fn multiple_ack_settles_every_lower_tag_and_return_turns_ack_into_refusal() {
        let c = Confirms::default();
        let r1 = c.register(1, "a".into(), "x".into()).unwrap();
        let r2 = c.register(2, "b".into(), "x".into()).unwrap();
        let r3 = c.register(3, "c".into(), "x".into()).unwrap();
        c.returned(Some("b"), "unroutable".into());
        c.ack(2, true);
        assert!(matches!(wait(&r1), Some(Ok(()))));
        assert!(matches!(wait(&r2), Some(Err(BrokerError::Refused(r))) if r == "unroutable"));
        assert!(wait(&r3).is_none());
        c.nack(3, false);
        assert!(matches!(wait(&r3), Some(Err(BrokerError::Refused(_)))));
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn fail_all_fails_waiters_and_refuses_new_publishes() {
        let c = Confirms::default();
        let r1 = c.register(1, "a".into(), "x".into()).unwrap();
        c.fail_all("gone");
        assert!(matches!(wait(&r1), Some(Err(BrokerError::Closed(_)))));
        assert!(matches!(
            c.register(2, "b".into(), "x".into()),
            Err(BrokerError::Closed(_))
        ));
    }

    #[test]
    fn settled_waits_for_the_last_confirm() {
        let c = Confirms::default();
        smol::block_on(c.settled());
        let _r1 = c.register(1, "a".into(), "x".into()).unwrap();
        let _r2 = c.register(2, "b".into(), "x".into()).unwrap();
        let mut settled = Box::pin(c.settled());
        assert!(
            futures_lite::future::block_on(futures_lite::future::poll_once(&mut settled)).is_none()
        );
        c.ack(1, false);
        assert!(
            futures_lite::future::block_on(futures_lite::future::poll_once(&mut settled)).is_none()
        );
        c.nack(2, false);
        smol::block_on(settled);
    }
}
