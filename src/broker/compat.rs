//! Running amqprs (tokio-based) on smol: bounded waits and requests on tasks of their own.
//!
//! Every amqprs future is awaited inside [`async_compat::Compat`]. Requests a caller may
//! abandon go through [`detached`], because amqprs does not survive a request dropped halfway.

use std::future::Future;
use std::time::Duration;

use async_compat::Compat;

use super::BrokerError;
use crate::wait::with_timeout;

/// Awaits `fut` for at most `limit`, then gives up with [`BrokerError::Timeout`].
pub(super) async fn within<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, BrokerError>>,
) -> Result<T, BrokerError> {
    with_timeout(limit, fut)
        .await
        .unwrap_or(Err(BrokerError::Timeout))
}

/// Runs `fut` inside `Compat` on a task of its own and waits at most `limit` for its result.
///
/// The caller may drop the returned future at any point without cancelling `fut`: amqprs
/// panics in its own tasks, or drops the whole connection, when a request it is waiting on
/// is abandoned halfway (e.g. an `open_channel` whose answer finds no one listening).
pub(super) async fn detached<T: Send + 'static>(
    limit: Duration,
    fut: impl Future<Output = Result<T, BrokerError>> + Send + 'static,
) -> Result<T, BrokerError> {
    let (tx, rx) = async_channel::bounded(1);
    crate::runtime::spawn(Compat::new(async move {
        // If the caller is gone, the result (say, a Consumer) is dropped here, in context.
        let _ = tx.send(fut.await).await;
    }))
    .detach();
    within(limit, async {
        rx.recv().await.unwrap_or_else(|_| {
            Err(BrokerError::Closed(
                "the RabbitMQ request task ended unexpectedly".to_owned(),
            ))
        })
    })
    .await
}

/// Closes an amqprs channel or connection (`closing`) on a task of its own, waiting at most
/// `limit`. A failure is only logged, naming `what`: the peer is gone or going either way.
pub(super) async fn close_detached(
    what: &str,
    limit: Duration,
    closing: impl Future<Output = Result<(), amqprs::error::Error>> + Send + 'static,
) {
    let closing = async move {
        closing
            .await
            .map_err(|e| BrokerError::Closed(e.to_string()))
    };
    if let Err(e) = detached(limit, closing).await {
        log::debug!("closing {what}: {e}");
    }
}
