//! Incoming envelopes: verify, de-duplicate, decrypt, deliver to the local webhook, then
//! `Ack` — or `Nack`, which leaves the message to RabbitMQ's retry and dead-letter path.
//!
//! Nothing is acknowledged before the local service took it (2xx) or it is known to be a
//! copy of something it already took.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;

use super::replay::Verdict;
use super::Agent;
use crate::crypto;
use crate::protocol::{ClientFrame, Envelope};

/// Accepted clock difference between agents.
const CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// Webhook attempts per delivery, and the pause before the first retry (doubling).
const WEBHOOK_ATTEMPTS: u32 = 4;
const WEBHOOK_FIRST_RETRY: Duration = Duration::from_millis(250);
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Handles one `Deliver`, answering on the link it came from.
pub(super) async fn handle(
    agent: Arc<Agent>,
    generation: u64,
    frames: async_channel::Sender<ClientFrame>,
    delivery: u64,
    envelope: Envelope,
) {
    if agent.config.deliver_url.is_none() {
        // Nowhere to deliver: answer nothing, so the message stays unacknowledged and goes
        // back to the queue when this agent disconnects. A `Nack` would be redelivered at
        // once and burn through the delivery limit into the DLQ within milliseconds. The
        // server's prefetch bounds how many are held this way.
        log::debug!(
            "holding message {} from {}: no --deliver-url configured",
            envelope.header().id,
            envelope.header().sender
        );
        return;
    }
    let _permit = agent.deliveries.acquire().await;
    let answer = match process(&agent, &envelope).await {
        Ok(()) => ClientFrame::Ack { delivery },
        Err(reason) => {
            log::warn!(
                "message {} from {}: {reason}",
                envelope.header().id,
                envelope.header().sender
            );
            ClientFrame::Nack { delivery, reason }
        }
    };
    // Delivery numbers belong to one connection; after a reconnect the server has already
    // returned the message to the queue and will deliver it again.
    if agent.link().is_some_and(|l| l.generation == generation) {
        let _ = frames.send(answer).await;
    }
}

async fn process(agent: &Agent, envelope: &Envelope) -> Result<(), String> {
    let h = envelope.header();
    if h.recipient != agent.config.id {
        return Err(format!("addressed to {}, not to this agent", h.recipient));
    }
    let Some(url) = agent.config.deliver_url.clone() else {
        return Err("no --deliver-url configured".into());
    };
    let ttl = agent
        .limits()
        .map_or(24 * 3600 * 1000, |l| l.message_ttl_ms);
    let now = now_ms();
    if h.created_at_ms.saturating_add(ttl + CLOCK_SKEW_MS) < now
        || h.created_at_ms > now + CLOCK_SKEW_MS
    {
        agent.metrics.stale.inc();
        log::warn!("dropping message {} from {}: timestamp outside the accepted window (replay or clock error)", h.id, h.sender);
        return Ok(());
    }
    loop {
        let verdict = agent
            .replay
            .lock()
            .expect("replay lock")
            .begin(h.id, now_ms());
        match verdict {
            Verdict::Fresh => break,
            Verdict::Delivered => {
                agent.metrics.duplicates.inc();
                log::debug!("message {} already delivered; acknowledging the copy", h.id);
                return Ok(());
            }
            Verdict::Busy => smol::Timer::after(Duration::from_millis(50)).await,
        };
    }
    let result = open_and_post(agent, envelope, &url).await;
    let keep_until = h.created_at_ms.saturating_add(ttl + 2 * CLOCK_SKEW_MS);
    agent
        .replay
        .lock()
        .expect("replay lock")
        .finish(h.id, result.is_ok(), keep_until);
    result
}

async fn open_and_post(agent: &Agent, envelope: &Envelope, url: &hyper::Uri) -> Result<(), String> {
    let h = envelope.header();
    let Some(sender) = agent.directory().get(&h.sender).cloned() else {
        return Err(format!("sender {} is not in the directory", h.sender));
    };
    let plaintext = crypto::open(&agent.key, &sender.public_key, envelope).map_err(|e| {
        agent.metrics.decrypt_failures.inc();
        e.to_string()
    })?;
    let payload: serde_json::Value = serde_json::from_slice(&plaintext).map_err(|e| {
        agent.metrics.decrypt_failures.inc();
        format!("decrypted payload is not JSON: {e}")
    })?;
    let body = serde_json::json!({
        "id": h.id.to_string(),
        "senderId": h.sender,
        "recipientId": h.recipient,
        "timestamp": super::api::format_timestamp(h.created_at_ms),
        "type": h.kind,
        "payload": payload,
    });
    let body = Bytes::from(body.to_string());
    let mut pause = WEBHOOK_FIRST_RETRY;
    let mut last = String::new();
    for attempt in 1..=WEBHOOK_ATTEMPTS {
        match post(agent, url, body.clone()).await {
            Ok(()) => {
                agent.metrics.delivered.inc();
                let age = now_ms().saturating_sub(h.created_at_ms) as f64 / 1000.0;
                agent.metrics.delivery_seconds.observe(age);
                return Ok(());
            }
            Err(e) => {
                agent.metrics.webhook_failures.inc();
                last = e;
                if attempt < WEBHOOK_ATTEMPTS {
                    smol::Timer::after(pause).await;
                    pause *= 2;
                }
            }
        }
    }
    Err(format!(
        "webhook failed {WEBHOOK_ATTEMPTS} times, last: {last}"
    ))
}

async fn post(agent: &Agent, url: &hyper::Uri, body: Bytes) -> Result<(), String> {
    let req = hyper::Request::post(url.clone())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let (status, _) = agent
        .webhook
        .request(req, WEBHOOK_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("webhook answered {status}"))
    }
}

/// Waits until deliveries in progress finish (or `limit` passes), for a clean stop.
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
