//! Watching a declaring or consuming channel: why RabbitMQ closed it, counted per connection.
//!
//! RabbitMQ answers a refused declaration or consume by closing the channel; the reply code
//! and text are what tell the caller what to fix. amqprs never reuses the id of a channel
//! RabbitMQ closed, so every such close is counted towards recycling the connection.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::Channel;
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};
use async_trait::async_trait;

use crate::sync::lock;

/// The code and text RabbitMQ closed a channel with, once it has.
#[derive(Clone, Default)]
pub(super) struct CloseReason(Arc<Mutex<Option<(u16, String)>>>);

impl CloseReason {
    /// `Some((code, text))` once RabbitMQ closed the channel.
    pub(super) fn get(&self) -> Option<(u16, String)> {
        lock(&self.0).clone()
    }
}

/// The callback of every channel but the publishing one: records why RabbitMQ closed it,
/// counts the close, and for a consumer logs closes and cancellations.
pub(super) struct ChannelWatch {
    reason: CloseReason,
    /// Channels RabbitMQ closed on this connection.
    closed_channels: Arc<AtomicU32>,
    /// The queue, when the channel consumes one.
    consumer_of: Option<String>,
}

impl ChannelWatch {
    /// A watch whose findings appear in the returned [`CloseReason`].
    pub(super) fn new(
        closed_channels: Arc<AtomicU32>,
        consumer_of: Option<String>,
    ) -> (Self, CloseReason) {
        let reason = CloseReason::default();
        let watch = Self {
            reason: reason.clone(),
            closed_channels,
            consumer_of,
        };
        (watch, reason)
    }
}

#[async_trait]
impl ChannelCallback for ChannelWatch {
    async fn close(
        &mut self,
        _channel: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        let (code, text) = (close.reply_code(), close.reply_text().clone());
        if let Some(queue) = &self.consumer_of {
            log::warn!("RabbitMQ closed the consumer channel of {queue}: {code} {text}");
        }
        self.closed_channels.fetch_add(1, Ordering::Relaxed);
        *lock(&self.reason.0) = Some((code, text));
        Ok(())
    }

    async fn cancel(
        &mut self,
        _channel: &Channel,
        _cancel: Cancel,
    ) -> Result<(), amqprs::error::Error> {
        if let Some(queue) = &self.consumer_of {
            log::warn!(
                "RabbitMQ cancelled the consumer of {queue} (queue deleted or moved); it ends now"
            );
        }
        Ok(())
    }

    async fn flow(
        &mut self,
        _channel: &Channel,
        active: bool,
    ) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _channel: &Channel, _ack: Ack) {}

    async fn publish_nack(&mut self, _channel: &Channel, _nack: Nack) {}

    async fn publish_return(
        &mut self,
        _channel: &Channel,
        _ret: Return,
        _properties: BasicProperties,
        _content: Vec<u8>,
    ) {
    }
}
