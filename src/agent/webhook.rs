//! Posting to the local service: what its answers mean, and riding out its outages.
//!
//! A local service that is down (refused, reset, timed out, 5xx, 429, or any other answer
//! that may change by itself) is waited for: the delivery stays unacknowledged at the relay
//! and is retried with capped, jittered backoff, so an outage never spends RabbitMQ's
//! delivery limit. Only an answer that means "never" (400, 404, 410, 413, 422) ends a
//! delivery, which the relay then dead-letters with the reason.
//!
//! All deliveries share one [`Health`]: the first success after an outage wakes every
//! waiting delivery at once, so recovery is not held back by the longest backoff, and the
//! outage is logged once when it starts and once when it ends, not per attempt.

use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::StatusCode;

use crate::http::Client;
use crate::metrics::AgentMetrics;
use crate::sync::lock;
use crate::wait::Backoff;

/// How long one attempt may take before it counts as no answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The first pause after a failed attempt; doubled per failure up to the configured cap.
const FIRST_RETRY: Duration = Duration::from_millis(250);

/// How one attempt failed.
#[derive(Debug)]
pub(super) enum WebhookError {
    /// The local service answered, but not with a 2xx.
    Status(StatusCode),
    /// No answer: refused, reset, timed out.
    NoAnswer(String),
}

impl WebhookError {
    /// Whether this answer means the message will never be taken, so retrying is pointless.
    fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::Status(
                StatusCode::BAD_REQUEST
                    | StatusCode::NOT_FOUND
                    | StatusCode::GONE
                    | StatusCode::PAYLOAD_TOO_LARGE
                    | StatusCode::UNPROCESSABLE_ENTITY
            )
        )
    }
}

impl fmt::Display for WebhookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(status) => write!(f, "the local service answered {status}"),
            Self::NoAnswer(e) => write!(f, "no answer from the local service: {e}"),
        }
    }
}

impl std::error::Error for WebhookError {}

/// Whether the local service is taking deliveries, shared by every delivery in progress.
#[derive(Default)]
pub(super) struct Health {
    state: std::sync::Mutex<HealthState>,
}

#[derive(Default)]
struct HealthState {
    /// Since when, and why, the service has been failing; `None` while it is up.
    down: Option<(Instant, String)>,
    /// Closed (dropped) when the service is seen up again: wakes every waiting delivery.
    recovered: Option<async_channel::Sender<()>>,
    waiters: Option<async_channel::Receiver<()>>,
}

impl Health {
    /// `Some((seconds down, last reason))` during an outage.
    pub(super) fn outage(&self) -> Option<(u64, String)> {
        let state = lock(&self.state);
        let (since, reason) = state.down.as_ref()?;
        Some((since.elapsed().as_secs(), reason.clone()))
    }

    /// Records a failed attempt; returns what a waiting delivery listens on for recovery.
    fn failed(&self, url: &hyper::Uri, error: &WebhookError, metrics: &AgentMetrics) -> Recovery {
        let mut state = lock(&self.state);
        if state.down.is_none() {
            log::warn!("local service at {url} is failing ({error}); holding deliveries and retrying until it answers");
            metrics.webhook_up.set(0);
            let (tx, rx) = async_channel::bounded(1);
            state.recovered = Some(tx);
            state.waiters = Some(rx);
        }
        state.down = Some((
            state.down.as_ref().map_or_else(Instant::now, |d| d.0),
            error.to_string(),
        ));
        Recovery(state.waiters.clone())
    }

    /// Records a success; ends an outage (waking every waiting delivery) if there was one.
    fn succeeded(&self, url: &hyper::Uri, metrics: &AgentMetrics) {
        let mut state = lock(&self.state);
        if let Some((since, _)) = state.down.take() {
            log::info!(
                "local service at {url} answers again after {:.1} s; delivering held messages",
                since.elapsed().as_secs_f64()
            );
            metrics.webhook_up.set(1);
            state.recovered = None;
            state.waiters = None;
        }
    }
}

/// Resolves when the outage it was taken in ends.
struct Recovery(Option<async_channel::Receiver<()>>);

impl Recovery {
    async fn wait(self) {
        if let Some(rx) = self.0 {
            let _ = rx.recv().await;
        }
    }
}

/// The local service's webhook and the discipline for posting to it.
pub(super) struct Webhook {
    client: Client,
    retry_max: Duration,
    pub(super) health: Health,
}

impl Webhook {
    /// `retry_max` caps the pause between attempts during an outage (`--webhook-retry-max`).
    pub(super) fn new(client: Client, retry_max: Duration) -> Self {
        Webhook {
            client,
            retry_max,
            health: Health::default(),
        }
    }

    /// Posts `body` until the local service takes it (`Ok`) or refuses it for good (`Err`).
    /// Waits through any outage; dropping the future abandons the delivery (the message
    /// stays unacknowledged and RabbitMQ delivers it again).
    pub(super) async fn deliver(
        &self,
        url: &hyper::Uri,
        body: Bytes,
        metrics: &AgentMetrics,
    ) -> Result<(), WebhookError> {
        let mut backoff = Backoff::new(FIRST_RETRY, self.retry_max);
        loop {
            let error = match self.post(url, body.clone()).await {
                Ok(()) => {
                    self.health.succeeded(url, metrics);
                    return Ok(());
                }
                Err(e) if e.is_permanent() => {
                    // The service is up; it just will never take this one.
                    self.health.succeeded(url, metrics);
                    return Err(e);
                }
                Err(e) => e,
            };
            metrics.webhook_failures.inc();
            let recovery = self.health.failed(url, &error, metrics);
            log::debug!("delivery attempt failed ({error}); retrying");
            futures_lite::future::or(backoff.wait(), recovery.wait()).await;
        }
    }

    async fn post(&self, url: &hyper::Uri, body: Bytes) -> Result<(), WebhookError> {
        let no_answer = |e: &dyn fmt::Display| WebhookError::NoAnswer(e.to_string());
        let req = hyper::Request::post(url.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| no_answer(&e))?;
        let (status, _) = self
            .client
            .request(req, ATTEMPT_TIMEOUT)
            .await
            .map_err(|e| no_answer(&e))?;
        match status.is_success() {
            true => Ok(()),
            false => Err(WebhookError::Status(status)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_never_answers_are_permanent() {
        for code in [400, 404, 410, 413, 422] {
            let e = WebhookError::Status(StatusCode::from_u16(code).unwrap());
            assert!(e.is_permanent(), "{code}");
        }
        for code in [401, 403, 408, 409, 429, 500, 502, 503, 504] {
            let e = WebhookError::Status(StatusCode::from_u16(code).unwrap());
            assert!(!e.is_permanent(), "{code}");
        }
        assert!(!WebhookError::NoAnswer("refused".into()).is_permanent());
    }

    #[test]
    fn an_outage_is_one_state_and_its_end_wakes_every_waiter() {
        let (health, metrics) = (Health::default(), AgentMetrics::default());
        let url: hyper::Uri = "http://127.0.0.1:9/in".parse().unwrap();
        let err = WebhookError::Status(StatusCode::SERVICE_UNAVAILABLE);
        let first = health.failed(&url, &err, &metrics);
        let second = health.failed(&url, &err, &metrics);
        assert!(health.outage().is_some());
        health.succeeded(&url, &metrics);
        assert!(health.outage().is_none());
        smol::block_on(async {
            let both = futures_lite::future::zip(first.wait(), second.wait());
            assert!(crate::wait::with_timeout(Duration::from_secs(1), both)
                .await
                .is_some());
        });
    }
}
