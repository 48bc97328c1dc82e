//! Failure notices: telling a sender that its message was dead-lettered.
//!
//! The dead-letter exchange is a fanout, so besides the DLQ every dead-lettered message is
//! copied into `{prefix}dmr.failures`. Every server consumes that queue (competing
//! consumers; any one handles a copy) and, for each copy, publishes a small notice to the
//! *sender's* queue (named by the copy's `dmr-sender` header): an AMQP message with the
//! header `x-dmr-notice: failed` and a postcard [`Notice`] body `{id, recipient, reason}`.
//! The reason is DMR's own `x-dmr-reason` when the recipient refused the message, else
//! RabbitMQ's (`x-first-death-reason` / `x-death`: expired, delivery limit, …).
//! The session delivering to the sender turns it into a `Notice` frame.
//!
//! No notice is made for a notice (a dead-lettered notice would loop) or for DMR's own
//! kinds (receipts). Notices come from the relay, so agents cannot authenticate them: a
//! hostile relay can make a sender believe a message failed, never that it was delivered.

use std::time::Duration;

use amqprs::{BasicProperties, FieldTable, FieldValue};
use async_compat::Compat;

use super::consumer::Delivery;
use super::{Broker, BrokerError, CONFIRM_TIMEOUT, HEADER_REASON, HEADER_RECIPIENT};
use crate::protocol::{AgentId, Envelope, MessageId, Notice, ProtocolError};
use crate::wait::Backoff;

/// AMQP header marking a failure notice (value `failed`).
pub const HEADER_NOTICE: &str = "x-dmr-notice";
/// AMQP `content_type` of notices.
const CONTENT_TYPE: &str = "application/x-dmr-notice";
/// Copies taken from the failures queue at once.
const PREFETCH: u16 = 32;

impl Delivery {
    /// The failure notice this delivery carries, if it is one.
    pub fn notice(&self) -> Option<Result<Notice, ProtocolError>> {
        text(&self.properties, HEADER_NOTICE)?;
        Some(Notice::from_bytes(&self.body))
    }
}

/// What to do with one dead-lettered copy.
enum Verdict {
    /// Tell its sender.
    Notify { sender: AgentId, notice: Notice },
    /// Nobody to tell (a notice, a receipt, no sender): just ack it.
    Skip(&'static str),
}

impl Broker {
    /// Turns dead-lettered copies into notices to their senders until the broker is closed
    /// (or the task is dropped), resuming after every reconnection.
    pub async fn relay_failures(self) {
        let mut retry = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            self.connected().await;
            let queue = self.shared.topology.failures();
            let consumer = match self.consume_queue(queue, PREFETCH).await {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("cannot consume the failures queue yet: {e}");
                    retry.wait().await;
                    continue;
                }
            };
            while let Some(d) = consumer.next().await {
                retry.reset();
                let acked = match self.notify_sender(&d).await {
                    Ok(()) => consumer.ack(d.tag).await,
                    Err(e) => {
                        log::warn!("could not send a failure notice ({e}); retrying");
                        retry.wait().await;
                        consumer.nack(d.tag).await
                    }
                };
                if let Err(e) = acked {
                    log::debug!("failures queue: {e}");
                }
            }
            consumer.close().await;
            retry.wait().await;
        }
    }

    /// Publishes the notice for one dead-lettered copy (or decides there is none).
    async fn notify_sender(&self, d: &Delivery) -> Result<(), BrokerError> {
        let (sender, notice) = match verdict(d) {
            Verdict::Notify { sender, notice } => (sender, notice),
            Verdict::Skip(why) => {
                log::debug!("no failure notice for a dead-lettered message: {why}");
                return Ok(());
            }
        };
        let live = self.shared.live().ok_or(BrokerError::NotConnected)?;
        let mut headers = FieldTable::new();
        for (key, value) in [
            (HEADER_NOTICE, "failed"),
            (HEADER_RECIPIENT, sender.as_str()),
        ] {
            if let Ok(key) = key.try_into() {
                headers.insert(key, FieldValue::from(value));
            }
        }
        let message_id = notice.id.to_string();
        let properties = BasicProperties::default()
            .with_delivery_mode(amqprs::DELIVERY_MODE_PERSISTENT)
            .with_content_type(CONTENT_TYPE)
            .with_message_id(&message_id)
            .with_headers(headers)
            .finish();
        let sent = Compat::new(live.publisher.send(
            &self.shared.exchange,
            sender.as_str(),
            &message_id,
            properties,
            notice.to_bytes(),
            CONFIRM_TIMEOUT,
        ))
        .await;
        match sent {
            Ok(()) => {
                log::info!(
                    "told {sender} that its message {} to {} failed: {}",
                    notice.id,
                    notice.recipient,
                    notice.reason
                );
                Ok(())
            }
            // No queue for the sender (it left the directory): nobody to tell.
            Err(BrokerError::Refused(e)) => {
                log::warn!("cannot tell {sender} that {} failed: {e}", notice.id);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

fn verdict(d: &Delivery) -> Verdict {
    if text(&d.properties, HEADER_NOTICE).is_some() {
        return Verdict::Skip("it is a notice itself");
    }
    let kind = Envelope::from_bytes(&d.body, usize::MAX).map(|e| e.header().kind.clone());
    if kind.is_ok_and(|k| k.is_reserved()) {
        return Verdict::Skip("DMR's own message (a receipt)");
    }
    let Some(sender) = d.sender.as_deref().and_then(|s| AgentId::new(s).ok()) else {
        return Verdict::Skip("no valid dmr-sender header");
    };
    let id = d
        .message_id
        .as_deref()
        .and_then(|i| uuid::Uuid::parse_str(i).ok());
    let Some(id) = id.map(MessageId) else {
        return Verdict::Skip("no message id");
    };
    let recipient = d.recipient.as_deref().unwrap_or(&d.routing_key);
    let Ok(recipient) = AgentId::new(recipient) else {
        return Verdict::Skip("no valid recipient");
    };
    let notice = Notice {
        id,
        recipient,
        reason: reason(d),
    };
    Verdict::Notify { sender, notice }
}

/// Why the copy was dead-lettered, in words.
fn reason(d: &Delivery) -> String {
    if let Some(r) = text(&d.properties, HEADER_REASON) {
        return format!("dead-lettered: {r}");
    }
    let (why, queue) = death(&d.properties);
    let queue = queue.map_or_else(String::new, |q| format!(" (queue {q})"));
    match why.as_deref() {
        Some("expired") => format!("expired: not delivered within the message TTL{queue}"),
        Some("delivery_limit") => format!("dead-lettered after the delivery limit{queue}"),
        Some("maxlen") => format!("dropped: the queue is full{queue}"),
        Some("rejected") => format!("dead-lettered: rejected{queue}"),
        Some(other) => format!("dead-lettered ({other}){queue}"),
        None => format!("dead-lettered{queue}"),
    }
}

/// RabbitMQ's reason and queue of the first death (`x-first-death-*`, else `x-death`).
fn death(p: &BasicProperties) -> (Option<String>, Option<String>) {
    let first = (
        text(p, "x-first-death-reason"),
        text(p, "x-first-death-queue"),
    );
    if first.0.is_some() {
        return first;
    }
    let Some(FieldValue::A(deaths)) = header(p, "x-death") else {
        return (None, None);
    };
    let deaths: Vec<FieldValue> = deaths.clone().into();
    let Some(FieldValue::F(t)) = deaths.first() else {
        return (None, None);
    };
    let get = |k: &str| match k.try_into().ok().and_then(|k| t.get(&k)) {
        Some(FieldValue::S(s)) => Some(String::from(s.clone())),
        _ => None,
    };
    (get("reason"), get("queue"))
}

fn header<'a>(p: &'a BasicProperties, name: &str) -> Option<&'a FieldValue> {
    p.headers()?.get(&name.try_into().ok()?)
}

fn text(p: &BasicProperties, name: &str) -> Option<String> {
    match header(p, name)? {
        FieldValue::S(s) => Some(String::from(s.clone())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::HEADER_SENDER;

    fn delivery(headers: &[(&str, &str)], body: Vec<u8>) -> Delivery {
        let mut t = FieldTable::new();
        for (k, v) in headers {
            t.insert((*k).try_into().unwrap(), FieldValue::from(*v));
        }
        let properties = BasicProperties::default().with_headers(t).finish();
        Delivery {
            tag: 1,
            body,
            redelivered: false,
            delivery_count: None,
            message_id: Some(MessageId::random().to_string()),
            sender: headers
                .iter()
                .find(|(k, _)| *k == HEADER_SENDER)
                .map(|(_, v)| v.to_string()),
            recipient: Some("tax".into()),
            reason: None,
            properties,
            routing_key: "tax".into(),
        }
    }

    #[test]
    fn copies_become_notices_with_a_reason_and_notices_never_do() {
        let d = delivery(
            &[
                (HEADER_SENDER, "police"),
                (HEADER_REASON, "refused by the local service: 400"),
            ],
            vec![],
        );
        let Verdict::Notify { sender, notice } = verdict(&d) else {
            panic!("a refused message is notified")
        };
        assert_eq!(sender.as_str(), "police");
        assert!(notice.reason.contains("400"), "{}", notice.reason);
        let d = delivery(
            &[
                (HEADER_SENDER, "police"),
                ("x-first-death-reason", "expired"),
            ],
            vec![],
        );
        let Verdict::Notify { notice, .. } = verdict(&d) else {
            panic!("an expired message is notified")
        };
        assert!(notice.reason.starts_with("expired"), "{}", notice.reason);
        let n = delivery(
            &[(HEADER_SENDER, "police"), (HEADER_NOTICE, "failed")],
            vec![],
        );
        assert!(matches!(verdict(&n), Verdict::Skip(_)));
        assert!(matches!(verdict(&delivery(&[], vec![])), Verdict::Skip(_)));
    }
}
