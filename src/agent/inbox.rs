//! Incoming envelopes: verify, de-duplicate, decrypt, deliver to the local webhook, then
//! `Ack` — or `Nack`, which leaves the message to RabbitMQ's retry and dead-letter path.
//!
//! Nothing is acknowledged before the local service took it (2xx) or it is known to be a
//! copy of something it already took.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::StatusCode;

use super::bodies::{now_ms, webhook_body};
use super::replay::Verdict;
use super::Agent;
use crate::crypto;
use crate::protocol::{AgentId, ClientFrame, Envelope, Header, MessageId};
use crate::sync::lock;
use crate::wait::Backoff;

/// Accepted clock difference between agents.
const CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// The freshness window until the server's `Welcome` tells the queue TTL.
const DEFAULT_TTL_MS: u64 = 24 * 3600 * 1000;
/// Webhook attempts per delivery, and the pauses between them (doubling, then capped).
const WEBHOOK_ATTEMPTS: u32 = 4;
const WEBHOOK_FIRST_RETRY: Duration = Duration::from_millis(250);
const WEBHOOK_LAST_RETRY: Duration = Duration::from_secs(1);
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an incoming message was not delivered; the text becomes the `Nack` reason, which
/// ends up beside the message in the dead-letter queue.
#[derive(Debug)]
pub(super) enum DeliveryError {
    /// The envelope names another agent as its recipient.
    NotForMe(AgentId),
    /// This agent has no `--deliver-url`.
    NoWebhook,
    /// The sender is not in the directory, so its key is unknown.
    UnknownSender(AgentId),
    /// The envelope does not open with our key and the sender's (tampered or wrong keys).
    Unopenable(String),
    /// It opened, but the plaintext is not the JSON the sender's agent seals.
    NotJson(String),
    /// Every webhook attempt failed; `last` says how the last one did.
    Webhook { attempts: u32, last: WebhookError },
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotForMe(to) => write!(f, "addressed to {to}, not to this agent"),
            Self::NoWebhook => f.write_str("no --deliver-url configured"),
            Self::UnknownSender(s) => write!(f, "sender {s} is not in the directory"),
            Self::Unopenable(e) => f.write_str(e),
            Self::NotJson(e) => write!(f, "decrypted payload is not JSON: {e}"),
            Self::Webhook { attempts, last } => {
                write!(f, "webhook failed {attempts} times, last: {last}")
            }
        }
    }
}

impl std::error::Error for DeliveryError {}

/// How one webhook attempt failed.
#[derive(Debug)]
pub(super) enum WebhookError {
    /// The local service answered, but not with a 2xx.
    Status(StatusCode),
    /// No answer: refused, reset, timed out.
    NoAnswer(String),
}

impl fmt::Display for WebhookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(status) => write!(f, "webhook answered {status}"),
            Self::NoAnswer(e) => write!(f, "no answer from the webhook: {e}"),
        }
    }
}

impl std::error::Error for WebhookError {}

/// Handles one `Deliver`, answering on the link it came from.
pub(super) async fn handle(
    agent: Arc<Agent>,
    generation: u64,
    frames: async_channel::Sender<ClientFrame>,
    delivery: u64,
    envelope: Envelope,
) {
    let h = envelope.header();
    if agent.config.deliver_url.is_none() {
        // Nowhere to deliver: answer nothing, so the message stays unacknowledged and goes
        // back to the queue when this agent disconnects. A `Nack` would be redelivered at
        // once and burn through the delivery limit into the DLQ within milliseconds. The
        // server's prefetch bounds how many are held this way.
        log::debug!(
            "holding message {} from {}: no --deliver-url configured",
            h.id,
            h.sender
        );
        return;
    }
    let _permit = agent.deliveries.acquire().await;
    let answer = match process(&agent, &envelope).await {
        Ok(()) => ClientFrame::Ack { delivery },
        Err(e) => {
            log::warn!("message {} from {}: {e}", h.id, h.sender);
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

async fn process(agent: &Agent, envelope: &Envelope) -> Result<(), DeliveryError> {
    let h = envelope.header();
    if h.recipient != agent.config.id {
        return Err(DeliveryError::NotForMe(h.recipient.clone()));
    }
    let Some(url) = agent.config.deliver_url.clone() else {
        return Err(DeliveryError::NoWebhook);
    };
    let ttl = agent.limits().map_or(DEFAULT_TTL_MS, |l| l.message_ttl_ms);
    if !within_window(h, ttl) {
        agent.metrics.stale.inc();
        log::warn!("dropping message {} from {}: timestamp outside the accepted window (replay or clock error)", h.id, h.sender);
        return Ok(());
    }
    if !claim(agent, h.id).await {
        return Ok(());
    }
    let result = open_and_post(agent, envelope, &url).await;
    let keep_until = h.created_at_ms.saturating_add(ttl + 2 * CLOCK_SKEW_MS);
    lock(&agent.replay).finish(h.id, result.is_ok(), keep_until);
    result
}

/// Whether `h` was created within the queue TTL (plus clock skew) before now, and not
/// further in the future than the skew.
fn within_window(h: &Header, ttl_ms: u64) -> bool {
    let now = now_ms();
    h.created_at_ms.saturating_add(ttl_ms + CLOCK_SKEW_MS) >= now
        && h.created_at_ms <= now + CLOCK_SKEW_MS
}

/// Marks `id` as being delivered by this task, first waiting out another copy's attempt;
/// `false` when a copy was delivered already (so this one is only acknowledged).
async fn claim(agent: &Agent, id: MessageId) -> bool {
    loop {
        // Bound first, so that the lock is released before waiting.
        let verdict = lock(&agent.replay).begin(id, now_ms());
        match verdict {
            Verdict::Fresh => return true,
            Verdict::Delivered => {
                agent.metrics.duplicates.inc();
                log::debug!("message {id} already delivered; acknowledging the copy");
                return false;
            }
            Verdict::Busy(attempt) => attempt.finished().await,
        }
    }
}

async fn open_and_post(
    agent: &Agent,
    envelope: &Envelope,
    url: &hyper::Uri,
) -> Result<(), DeliveryError> {
    let h = envelope.header();
    let body = webhook_body(h, open(agent, envelope)?);
    post_with_retries(agent, url, body).await?;
    agent.metrics.delivered.inc();
    let age = now_ms().saturating_sub(h.created_at_ms) as f64 / 1000.0;
    agent.metrics.delivery_seconds.observe(age);
    Ok(())
}

/// Opens `envelope` with our key and its sender's, into the JSON payload it carries.
fn open(agent: &Agent, envelope: &Envelope) -> Result<serde_json::Value, DeliveryError> {
    let h = envelope.header();
    let Some(sender) = agent.directory().get(&h.sender).cloned() else {
        return Err(DeliveryError::UnknownSender(h.sender.clone()));
    };
    let payload = crypto::open(&agent.key, &sender.public_key, envelope)
        .map_err(|e| DeliveryError::Unopenable(e.to_string()))
        .and_then(|plaintext| {
            serde_json::from_slice(&plaintext).map_err(|e| DeliveryError::NotJson(e.to_string()))
        });
    if payload.is_err() {
        agent.metrics.decrypt_failures.inc();
    }
    payload
}

/// Posts `body` up to [`WEBHOOK_ATTEMPTS`] times, pausing with backoff between attempts.
async fn post_with_retries(
    agent: &Agent,
    url: &hyper::Uri,
    body: Bytes,
) -> Result<(), DeliveryError> {
    let mut pauses = Backoff::new(WEBHOOK_FIRST_RETRY, WEBHOOK_LAST_RETRY);
    loop {
        let Err(last) = post(agent, url, body.clone()).await else {
            return Ok(());
        };
        agent.metrics.webhook_failures.inc();
        let attempts = pauses.failures() + 1;
        if attempts >= WEBHOOK_ATTEMPTS {
            return Err(DeliveryError::Webhook { attempts, last });
        }
        pauses.wait().await;
    }
}

async fn post(agent: &Agent, url: &hyper::Uri, body: Bytes) -> Result<(), WebhookError> {
    let no_answer = |e: &dyn fmt::Display| WebhookError::NoAnswer(e.to_string());
    let req = hyper::Request::post(url.clone())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| no_answer(&e))?;
    let (status, _) = agent
        .webhook
        .request(req, WEBHOOK_TIMEOUT)
        .await
        .map_err(|e| no_answer(&e))?;
    match status.is_success() {
        true => Ok(()),
        false => Err(WebhookError::Status(status)),
    }
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
