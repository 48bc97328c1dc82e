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
//! The sender's inbox hands every `dmr.receipt` envelope to [`handle`]: it must be
//! addressed to this agent, fresh, open with the claimed sender's key, and name a message
//! this agent sent *to that sender*; then the status becomes `delivered`. Anything else is
//! refused (dead-lettered with the reason, like an unopenable message); a receipt for a
//! message whose status was forgotten is acknowledged and ignored.

use std::sync::Arc;

use serde_json::Value;

use super::bodies::{check_fresh, now_ms};
use super::inbox::{self, DeliveryError};
use super::outbox::{dispatch, Dispatched};
use super::Agent;
use crate::protocol::{ClientFrame, Envelope, Header, Kind, MessageId};

/// Seals a receipt for the delivered message `h` to its sender and hands it to [`run`].
pub(super) fn send_for(agent: &Agent, h: &Header) {
    if h.kind.is_reserved() {
        return;
    }
    let Some(sender) = agent.directory().get(&h.sender).cloned() else {
        return log::debug!("no receipt for {}: {} left the directory", h.id, h.sender);
    };
    let header = Header {
        id: MessageId::random(),
        sender: agent.config.id.clone(),
        recipient: h.sender.clone(),
        created_at_ms: now_ms(),
        kind: Kind::receipt(),
        seq: 0,
    };
    let body = serde_json::json!({ "receipt": h.id.to_string() }).to_string();
    match agent
        .sealer
        .seal(&sender.public_key, header, body.as_bytes())
    {
        Ok(envelope) => {
            let _ = agent.receipts.0.try_send(envelope);
        }
        Err(e) => log::warn!("cannot seal the receipt for {}: {e}", h.id),
    }
}

/// Sends the receipts [`send_for`] sealed, each on its own task (they are independent).
pub(super) async fn run(agent: Arc<Agent>) {
    let receipts = agent.receipts.1.clone();
    while let Ok(envelope) = receipts.recv().await {
        let agent = agent.clone();
        smol::spawn(async move {
            let id = envelope.header().id;
            match dispatch(&agent, envelope).await {
                Dispatched::Sent | Dispatched::Queued | Dispatched::AlreadyPending => {}
                other => log::warn!("receipt {id} not sent: {other:?}"),
            }
        })
        .detach();
    }
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
    let body = inbox::open(agent, envelope).await?;
    let id = delivered_id(&body).ok_or_else(|| {
        DeliveryError::NotJson("a receipt's body must be {\"receipt\":\"<message id>\"}".into())
    })?;
    if agent.statuses.delivered(id, &h.sender) {
        log::debug!("message {id} delivered to {} (receipt {})", h.sender, h.id);
    } else {
        log::debug!(
            "receipt {} from {} names {id}, which this agent does not know as sent to it",
            h.id,
            h.sender
        );
    }
    Ok(())
}

fn delivered_id(body: &Value) -> Option<MessageId> {
    let id = body.get("receipt")?.as_str()?;
    uuid::Uuid::parse_str(id).ok().map(MessageId)
}
