//! Delivery receipts, both ways.
//!
//! When the local service has taken a message (2xx), the recipient agent sends its sender a
//! receipt: an ordinary envelope of the reserved kind `dmr.receipt`, sealed with HPKE Auth
//! from the recipient's key to the sender's, whose sealed body `{"receipt":"<id>"}` names
//! the delivered message. Because it is sealed and authenticated like any message, the
//! relay cannot forge a "delivered": only the recipient's key makes one that opens. A
//! receipt leaves through the outbox like a message (queued while no relay takes it), is
//! never posted to the webhook, and is never itself receipted.
//!
//! Receipts are batched: one receipt names the messages of one sender delivered within
//! [`BATCH_WINDOW`] (see [`run`]). Its body keeps the first id in `receipt` and lists
//! them all in `receipts`, `{"receipt":"<id>","receipts":["<id>",…]}`, so an agent that
//! knows only the single form still marks one of them delivered instead of refusing the
//! receipt. A receipt naming one message has the single form.
//!
//! The sender's inbox hands every `dmr.receipt` envelope to [`handle`]: it must be
//! addressed to this agent, fresh, open with the claimed sender's key, and name a message
//! this agent sent *to that sender*; then the status becomes `delivered`. Anything else is
//! refused (dead-lettered with the reason, like an unopenable message); a receipt for a
//! message whose status was forgotten is acknowledged and ignored.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::bodies::{check_fresh, now_ms};
use super::inbox::{self, DeliveryError};
use super::outbox::{dispatch, Dispatched};
use super::Agent;
use crate::protocol::{AgentId, ClientFrame, Envelope, Header, Kind, MessageId};

/// Most message ids one receipt names: with the longest agent ids, a full receipt stays
/// under the relay's `MAX_RECEIPT_BYTES` (a test checks), so it keeps its policy exemption.
const MAX_IDS: usize = 16;

/// How long a receipt waits for more deliveries to share it. Even one message at a time,
/// a steady stream (a message every millisecond or two) then shares receipts: each receipt
/// is a whole envelope through both servers and RabbitMQ, and one per message doubled the
/// relay's work. A sender learns of a delivery this much later, which no one can see.
const BATCH_WINDOW: Duration = Duration::from_millis(10);

/// A delivered message whose sender is owed a receipt.
pub(super) struct Owed {
    sender: AgentId,
    id: MessageId,
}

/// Queues a receipt for the delivered message `h` to its sender (see [`run`]).
pub(super) fn send_for(agent: &Agent, h: &Header) {
    if h.kind.is_reserved() {
        return;
    }
    let owed = Owed {
        sender: h.sender.clone(),
        id: h.id,
    };
    let _ = agent.receipts.0.try_send(owed);
}

/// Sends the receipts [`send_for`] queued: whatever is waiting is grouped by sender into
/// receipts of at most [`MAX_IDS`] ids, each sealed and sent on its own task.
pub(super) async fn run(agent: Arc<Agent>) {
    let owed = agent.receipts.1.clone();
    while let Some(batch) = next_batch(&owed).await {
        for (sender, ids) in batch {
            for chunk in ids.chunks(MAX_IDS) {
                send(&agent, &sender, chunk);
            }
        }
    }
}

/// The next receipts to send, by sender: waits for one, then gathers whatever else comes
/// within [`BATCH_WINDOW`]. `None` once the queue is closed.
async fn next_batch(
    owed: &async_channel::Receiver<Owed>,
) -> Option<HashMap<AgentId, Vec<MessageId>>> {
    let first = owed.recv().await.ok()?;
    let mut batch: HashMap<AgentId, Vec<MessageId>> = HashMap::new();
    let mut add = |o: Owed| batch.entry(o.sender).or_default().push(o.id);
    add(first);
    let gather = async {
        while let Ok(o) = owed.recv().await {
            add(o);
        }
    };
    crate::wait::with_timeout(BATCH_WINDOW, gather).await;
    Some(batch)
}

/// The sealed body of a receipt naming `ids` (at least one).
fn receipt_body(ids: &[MessageId]) -> String {
    let first = ids.first().map(ToString::to_string).unwrap_or_default();
    if ids.len() == 1 {
        return serde_json::json!({ "receipt": first }).to_string();
    }
    let all: Vec<String> = ids.iter().map(ToString::to_string).collect();
    serde_json::json!({ "receipt": first, "receipts": all }).to_string()
}

/// Seals one receipt naming `ids` to `to` and sends it on a task of its own.
fn send(agent: &Arc<Agent>, to: &AgentId, ids: &[MessageId]) {
    let Some(recipient) = agent.directory().get(to).cloned() else {
        return log::debug!(
            "no receipt for {} messages: {to} left the directory",
            ids.len()
        );
    };
    let header = Header {
        id: MessageId::random(),
        sender: agent.config.id.clone(),
        recipient: to.clone(),
        created_at_ms: now_ms(),
        kind: Kind::receipt(),
        seq: 0,
    };
    let body = receipt_body(ids);
    let envelope = match agent
        .sealer
        .seal(&recipient.public_key, header, body.as_bytes())
    {
        Ok(envelope) => envelope,
        Err(e) => return log::warn!("cannot seal a receipt for {} messages: {e}", ids.len()),
    };
    let agent = agent.clone();
    crate::runtime::spawn(async move {
        let id = envelope.header().id;
        match dispatch(&agent, envelope).await {
            Dispatched::Sent | Dispatched::Queued | Dispatched::AlreadyPending => {
                agent.metrics.receipts_sent.inc();
            }
            other => log::warn!("receipt {id} not sent: {other:?}"),
        }
    })
    .detach();
}

/// Handles one incoming `dmr.receipt` delivery, answering on the link it came from.
pub(super) async fn handle(
    agent: Arc<Agent>,
    generation: u64,
    frames: async_channel::Sender<ClientFrame>,
    delivery: u64,
    envelope: Envelope,
) {
    let answer = match accept(&agent, &envelope).await {
        Ok(()) => ClientFrame::Ack { delivery },
        Err(e) => {
            let h = envelope.header();
            log::warn!("refusing receipt {} from {}: {e}", h.id, h.sender);
            agent.metrics.dead_lettered.inc();
            let reason = format!("receipt: {e}");
            ClientFrame::Nack { delivery, reason }
        }
    };
    if agent.link().is_some_and(|l| l.generation == generation) {
        let _ = frames.send(answer).await;
    }
}

async fn accept(agent: &Agent, envelope: &Envelope) -> Result<(), DeliveryError> {
    let h = envelope.header();
    if h.recipient != agent.config.id {
        return Err(DeliveryError::NotForMe(h.recipient.clone()));
    }
    if let Err(e) = check_fresh(h.created_at_ms, agent.config.message_ttl_ms, now_ms()) {
        return Err(DeliveryError::Stale(e));
    }
    let plaintext = inbox::open(agent, envelope).await?;
    let body = inbox::json(agent, serde_json::from_slice(&plaintext))?;
    let ids = delivered_ids(&body).ok_or_else(|| {
        DeliveryError::NotJson(
            "a receipt's body must be {\"receipt\":\"<message id>\"} or name ids in \
             \"receipts\":[…]"
                .into(),
        )
    })?;
    for id in ids {
        if agent.statuses.delivered(id, &h.sender) {
            // Trace: one line per delivered message (the status change says it too).
            log::trace!("message {id} delivered to {} (receipt {})", h.sender, h.id);
        } else {
            log::debug!(
                "receipt {} from {} names {id}, which this agent does not know as sent to it",
                h.id,
                h.sender
            );
        }
    }
    Ok(())
}

/// The ids a receipt names: every one of `receipts` when present (a batch; all must be
/// ids), else the single `receipt`.
fn delivered_ids(body: &Value) -> Option<Vec<MessageId>> {
    let parse = |v: &Value| uuid::Uuid::parse_str(v.as_str()?).ok().map(MessageId);
    match body.get("receipts") {
        Some(list) => list.as_array()?.iter().map(parse).collect(),
        None => Some(vec![parse(body.get("receipt")?)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;
    use crate::protocol::MAX_RECEIPT_BYTES;

    fn ids(n: usize) -> Vec<MessageId> {
        (0..n).map(|_| MessageId::random()).collect()
    }

    #[test]
    fn bodies_name_every_id_and_stay_readable_as_single_receipts() {
        for n in [1, 2, MAX_IDS] {
            let sent = ids(n);
            let body: Value = serde_json::from_str(&receipt_body(&sent)).unwrap();
            assert_eq!(delivered_ids(&body).unwrap(), sent);
            // What an agent that knows only `receipt` reads: the first id.
            assert_eq!(body["receipt"], sent[0].to_string());
        }
        let one = serde_json::json!({"receipt": MessageId::random().to_string()});
        assert_eq!(delivered_ids(&one).unwrap().len(), 1);
        for bad in [
            serde_json::json!({"receipts": ["not an id"]}),
            serde_json::json!({"receipts": "x"}),
            serde_json::json!({"other": 1}),
        ] {
            assert!(delivered_ids(&bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_full_receipt_between_the_longest_ids_fits_the_relay_exemption() {
        let (from, to) = (
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
        );
        let header = Header {
            id: MessageId::random(),
            sender: AgentId::new("s".repeat(64)).unwrap(),
            recipient: AgentId::new("r".repeat(64)).unwrap(),
            created_at_ms: u64::MAX,
            kind: Kind::receipt(),
            seq: 0,
        };
        let body = receipt_body(&ids(MAX_IDS));
        let sealed = crate::crypto::seal(&from, &to.public_key(), header, body.as_bytes()).unwrap();
        // The one-shot seal numbers its message 0; a live epoch's number takes up to 9
        // more bytes on the wire.
        let len = sealed.encoded_len() + 9;
        assert!(len <= MAX_RECEIPT_BYTES, "{len} bytes");
    }

    #[test]
    fn waiting_receipts_are_grouped_by_sender_and_none_is_lost() {
        smol::block_on(async {
            let (tx, rx) = async_channel::unbounded();
            let (a, b) = (AgentId::new("a").unwrap(), AgentId::new("b").unwrap());
            let mut sent = Vec::new();
            for i in 0..40 {
                let sender = if i % 4 == 0 { b.clone() } else { a.clone() };
                let id = MessageId::random();
                sent.push((sender.clone(), id));
                tx.send(Owed { sender, id }).await.unwrap();
            }
            let batch = next_batch(&rx).await.unwrap();
            assert_eq!(batch.len(), 2);
            assert_eq!(batch[&a].len(), 30);
            assert_eq!(batch[&b].len(), 10);
            for (sender, id) in sent {
                assert!(batch[&sender].contains(&id));
            }
            // Alone, a receipt leaves on its own once the window is out.
            let owed = |sender: &AgentId| Owed {
                sender: sender.clone(),
                id: MessageId::random(),
            };
            tx.send(owed(&a)).await.unwrap();
            assert_eq!(next_batch(&rx).await.unwrap()[&a].len(), 1);
            // One message at a time, a delivery within the window shares the receipt.
            tx.send(owed(&a)).await.unwrap();
            let later = {
                let (tx, next) = (tx.clone(), owed(&a));
                async move {
                    // Polled once `next_batch` waits inside its window.
                    futures_lite::future::yield_now().await;
                    tx.send(next).await.unwrap();
                    std::future::pending::<()>().await
                }
            };
            let batch = futures_lite::future::or(async { next_batch(&rx).await }, async {
                later.await;
                None
            })
            .await;
            assert_eq!(batch.unwrap()[&a].len(), 2);
            tx.close();
            assert!(next_batch(&rx).await.is_none());
        });
    }
}
