//! Incoming envelopes: verify, de-duplicate, decrypt, deliver to the local webhook, then
//! `Ack` — or, for a message that can never be delivered, `Nack` with the reason, which the
//! relay turns into a dead-lettered copy carrying that reason.
//!
//! Nothing is acknowledged before the local service took it (2xx) and that is recorded on
//! disk (the [`super::replay`] guard), or it is known to be a copy of something it took.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::bodies::{check_fresh, now_ms, webhook_body, Sealed, Stale};
use super::webhook::WebhookError;
use super::Agent;
use crate::protocol::{AgentId, ClientFrame, Envelope};

/// How long a message from a sender not (yet) in our directory waits for a directory update.
const UNKNOWN_SENDER_GRACE: Duration = Duration::from_secs(2);

/// Why an incoming message can never be delivered; the text becomes the `Nack` reason,
/// with which the relay dead-letters it (`x-dmr-reason`).
#[derive(Debug)]
pub(super) enum DeliveryError {
    /// The envelope names another agent as its recipient.
    NotForMe(AgentId),
    /// The sender is not in the directory, so its key is unknown.
    UnknownSender(AgentId),
    /// Created outside the freshness window: a replay, a clock error, or a message that
    /// waited too long.
    Stale(Stale),
    /// The envelope does not open with our key and the sender's (tampered or wrong keys).
    Unopenable(String),
    /// It does not open under the sender's pinned key, and the directory offers another
    /// key for the sender that no operator has confirmed (text: what to do).
    KeyChanged { sender: AgentId, detail: String },
    /// It opened, but the plaintext is not the JSON the sender's agent seals.
    NotJson(String),
    /// The local service refused it with an answer that means "never".
    Refused(WebhookError),
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotForMe(to) => write!(f, "addressed to {to}, not to this agent"),
            Self::UnknownSender(s) => write!(f, "sender {s} is not in the directory"),
            Self::Stale(e) => write!(f, "stale: {e}"),
            Self::Unopenable(e) => write!(f, "unopenable: {e}"),
            Self::KeyChanged { sender, detail } => write!(
                f,
                "unopenable under the pinned key of {sender}, whose key changed and is not \
                 confirmed: {detail}; once confirmed, replay it from the DLQ"
            ),
            Self::NotJson(e) => write!(f, "decrypted payload is not JSON: {e}"),
            Self::Refused(e) => write!(f, "refused by the local service: {e}"),
        }
    }
}

impl std::error::Error for DeliveryError {}

/// Why a delivery gets no answer now: nothing may be acked before its record is durable,
/// and nothing deliverable may be dead-lettered for a local disk problem. The server
/// returns it to the queue when this connection ends.
struct Hold(String);

/// How a delivery attempt ended, short of an `Ack`.
enum Failure {
    /// Never deliverable: `Nack`, so the relay dead-letters it with the reason.
    Never(DeliveryError),
    Hold(Hold),
}

impl From<DeliveryError> for Failure {
    fn from(e: DeliveryError) -> Self {
        Self::Never(e)
    }
}

/// Handles one `Deliver`, answering on the link it came from.
pub(super) async fn handle(
    agent: Arc<Agent>,
    generation: u64,
    frames: async_channel::Sender<ClientFrame>,
    delivery: u64,
    envelope: Envelope,
) {
    let h = envelope.header();
    if h.kind.is_receipt() {
        // Never posted to the webhook: it updates a sent message's status.
        return super::receipt::handle(agent, generation, frames, delivery, envelope).await;
    }
    let Some(url) = agent.config.deliver_url.clone() else {
        // Nowhere to deliver: answer nothing, so the message stays unacknowledged and goes
        // back to the queue when this agent disconnects. A `Nack` would dead-letter it. The
        // server's prefetch bounds how many are held this way.
        log::debug!(
            "holding message {} from {}: no --deliver-url configured",
            h.id,
            h.sender
        );
        return;
    };
    let _permit = agent.deliveries.acquire().await;
    let answer = match process(&agent, &envelope, &url).await {
        Ok(()) => ClientFrame::Ack { delivery },
        Err(Failure::Hold(Hold(why))) => {
            return log::error!(
                "message {} from {}: not acknowledged: {why}",
                h.id,
                h.sender
            )
        }
        Err(Failure::Never(e)) => {
            log::warn!(
                "message {} from {} cannot be delivered, dead-lettering it: {e}",
                h.id,
                h.sender
            );
            agent.metrics.dead_lettered.inc();
            let reason = e.to_string();
            ClientFrame::Nack { delivery, reason }
        }
    };
    // Delivery numbers belong to one connection; after a reconnect the server has already
    // returned the message to the queue and will deliver it again.
    if agent.link().is_some_and(|l| l.generation == generation) {
        let _ = frames.send(answer).await;
    }
}

async fn process(agent: &Agent, envelope: &Envelope, url: &hyper::Uri) -> Result<(), Failure> {
    let h = envelope.header();
    if h.recipient != agent.config.id {
        return Err(DeliveryError::NotForMe(h.recipient.clone()).into());
    }
    if let Err(e) = check_fresh(h.created_at_ms, agent.config.message_ttl_ms, now_ms()) {
        agent.metrics.stale.inc();
        return Err(DeliveryError::Stale(e).into());
    }
    let fresh = agent
        .recorder
        .claim(&h.sender, h.id)
        .await
        .map_err(|e| Failure::Hold(Hold(format!("replay guard unreadable: {e}"))))?;
    if !fresh {
        agent.metrics.duplicates.inc();
        log::debug!(
            "message {} from {} already delivered; acknowledging the copy",
            h.id,
            h.sender
        );
        return Ok(());
    }
    if let Err(e) = open_and_post(agent, envelope, url).await {
        agent.recorder.release(&h.sender, h.id);
        return Err(e.into());
    }
    agent
        .recorder
        .delivered(&h.sender, h.id, h.created_at_ms)
        .await
        .map_err(|e| Failure::Hold(Hold(format!("delivered, but not recorded: {e}"))))?;
    #[cfg(feature = "test-support")]
    crash_after_record_for_tests();
    Ok(())
}

/// For the crash tests: with `DMR_TEST_ABORT_AFTER_RECORD` set, the process dies right
/// after a delivery was recorded, before its `Ack` — what a SIGKILL at the worst moment does.
#[cfg(feature = "test-support")]
fn crash_after_record_for_tests() {
    if std::env::var_os("DMR_TEST_ABORT_AFTER_RECORD").is_some() {
        log::warn!("DMR_TEST_ABORT_AFTER_RECORD: aborting before the Ack");
        std::process::abort();
    }
}

async fn open_and_post(
    agent: &Agent,
    envelope: &Envelope,
    url: &hyper::Uri,
) -> Result<(), DeliveryError> {
    let h = envelope.header();
    let plaintext = open(agent, envelope).await?;
    let body = webhook_body(h, &json(agent, Sealed::from_plaintext(&plaintext))?);
    agent
        .webhook
        .deliver(url, body, &agent.metrics)
        .await
        .map_err(DeliveryError::Refused)?;
    super::receipt::send_for(agent, h);
    agent.metrics.delivered.inc();
    let age = now_ms().saturating_sub(h.created_at_ms) as f64 / 1000.0;
    agent.metrics.delivery_seconds.observe(age);
    Ok(())
}

/// Opens `envelope` with our key and its sender's, into its plaintext (JSON, which
/// [`json`] reads).
pub(super) async fn open(agent: &Agent, envelope: &Envelope) -> Result<Vec<u8>, DeliveryError> {
    let h = envelope.header();
    let sender = match agent.directory().get(&h.sender).cloned() {
        Some(s) => s,
        None => {
            // The server may have accepted it under a directory we have not received yet.
            async_io::Timer::after(UNKNOWN_SENDER_GRACE).await;
            let directory = agent.directory();
            let known = directory.get(&h.sender).cloned();
            known.ok_or_else(|| DeliveryError::UnknownSender(h.sender.clone()))?
        }
    };
    // The opener also tries the previous key: during a key rotation, messages sealed to it
    // still arrive for a while.
    agent
        .opener
        .open(&sender.public_key, envelope)
        .map_err(|e| {
            agent.metrics.decrypt_failures.inc();
            match agent.trust.key_change(&h.sender) {
                Some(change) => DeliveryError::KeyChanged {
                    sender: h.sender.clone(),
                    detail: change.describe(&h.sender, agent.state.dir()),
                },
                None => DeliveryError::Unopenable(e.to_string()),
            }
        })
}

/// What an opened plaintext read as: a plaintext that is not the JSON expected counts as
/// a decryption failure (the sender sealed something no agent writes).
pub(super) fn json<T>(
    agent: &Agent,
    read: Result<T, serde_json::Error>,
) -> Result<T, DeliveryError> {
    read.map_err(|e| {
        agent.metrics.decrypt_failures.inc();
        DeliveryError::NotJson(e.to_string())
    })
}

/// Waits until deliveries in progress finish (or `limit` passes), for a clean stop.
///
/// Holding every delivery permit means no delivery is running; the semaphore wakes this
/// as each one ends, so nothing is polled.
pub(super) async fn drain(agent: &Agent, limit: Duration) {
    let all = agent.config.max_concurrent_deliveries;
    let wait = async {
        let mut held = Vec::with_capacity(all);
        for _ in 0..all {
            held.push(agent.deliveries.acquire().await);
        }
    };
    if crate::wait::with_timeout(limit, wait).await.is_none() {
        log::warn!("some deliveries were still running at stop; RabbitMQ will deliver them again");
    }
}
