//! The background task that keeps one connection alive: connect to the first node that
//! answers, watch the connection until it ends, retire it, back off, connect again.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::future;

use super::compat::close_detached;
use super::connect::{connect, ConnectionWatch, Kicked, Live};
use super::{BrokerError, Shared};
use crate::wait::Backoff;

/// How long a graceful close may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A connection that lived this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// How often the supervisor checks that amqprs' connection tasks are still alive.
const LIVENESS_INTERVAL: Duration = Duration::from_secs(1);

/// Connects, watches and reconnects until `Broker::close`. Runs inside `Compat`; dropping
/// `_done` when it returns tells `Broker::close` that it has finished.
pub(super) async fn supervise(shared: Arc<Shared>, _done: async_channel::Sender<()>) {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let mut first = 0;
    while !shared.stopping.load(Ordering::SeqCst) {
        let Some((index, live, kicked)) = connect_any(&shared, first).await else {
            if shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            let delay = backoff.next_delay();
            let nodes: Vec<_> = shared.nodes.iter().map(|n| n.display.as_str()).collect();
            let (nodes, ms) = (nodes.join(", "), delay.as_millis());
            log::warn!("no RabbitMQ node reachable ({nodes}); retrying in {ms} ms");
            pause(&shared, delay).await;
            continue;
        };
        first = index;
        let since = Instant::now();
        let end = watch(&shared, &live, &kicked).await;
        if retire(&shared, live, end).await {
            break;
        }
        if since.elapsed() >= STABLE_AFTER {
            backoff.reset();
            log::info!("reconnecting to RabbitMQ");
        } else {
            let delay = backoff.next_delay();
            log::info!("reconnecting to RabbitMQ in {} ms", delay.as_millis());
            pause(&shared, delay).await;
        }
    }
    let mut state = shared.state();
    state.live = None;
    state.gate = None;
}

/// Tries every node once, starting with the one that worked last; `None` when none
/// answered (or the broker is stopping).
async fn connect_any(shared: &Shared, first: usize) -> Option<(usize, Arc<Live>, Kicked)> {
    let generation = shared.generation.load(Ordering::SeqCst) + 1;
    for i in 0..shared.nodes.len() {
        let index = (first + i) % shared.nodes.len();
        let node = &shared.nodes[index];
        let stop = async {
            let _ = shared.stopped.recv().await;
            Err(BrokerError::Closed("shutting down".to_owned()))
        };
        match future::or(stop, connect(shared, node, generation)).await {
            Ok((live, kicked)) => return Some((index, live, kicked)),
            Err(_) if shared.stopping.load(Ordering::SeqCst) => return None,
            // Names the node itself, password masked.
            Err(e @ (BrokerError::Unreachable { .. } | BrokerError::Tls { .. })) => {
                log::warn!("{e}")
            }
            Err(e) => log::warn!("could not connect to RabbitMQ at {}: {e}", node.display),
        }
    }
    None
}

/// Why a live connection ended.
enum End {
    /// The connection died.
    Lost(String),
    /// The publishing channel died; the connection must be rebuilt.
    Kicked(String),
    /// `Broker::close` was called.
    Stop,
}

/// Waits until the live connection ends, for whatever reason. Runs inside `Compat`.
async fn watch(shared: &Shared, live: &Live, kicked: &Kicked) -> End {
    let connection = live.connection.get_ref();
    let failed = async {
        connection.listen_network_io_failure().await;
        End::Lost(live.signals.loss_reason())
    };
    // listen_network_io_failure() misses a failure that happened before it subscribed, and
    // an amqprs task that panicked never reports one: check both every second.
    let probe = async {
        loop {
            async_io::Timer::after(LIVENESS_INTERVAL).await;
            let watch = ConnectionWatch::new(&live.signals, &live.node);
            if !connection.is_open() || connection.register_callback(watch).await.is_err() {
                return End::Lost(live.signals.loss_reason());
            }
            let closed = live.closed_channels.load(Ordering::Relaxed);
            if closed >= live.recycle_after {
                return End::Kicked(format!(
                    "RabbitMQ closed {closed} channels on the connection to {}, whose ids amqprs \
                     never reuses",
                    live.node
                ));
            }
        }
    };
    let kick = async {
        match kicked.recv().await {
            Ok(reason) => End::Kicked(reason),
            Err(_) => future::pending().await,
        }
    };
    let stop = async {
        let _ = shared.stopped.recv().await;
        End::Stop
    };
    future::or(future::or(stop, kick), future::or(failed, probe)).await
}

/// Takes a connection out of service after `end`: publishes waiting for its confirms
/// fail, waiters for the next connection are re-armed. Returns whether to stop for good.
async fn retire(shared: &Shared, live: Arc<Live>, end: End) -> bool {
    let stopping = matches!(end, End::Stop);
    {
        let mut state = shared.state();
        state.live = None;
        state.gate = (!stopping).then(|| async_channel::bounded(1));
    }
    let reason = match &end {
        End::Lost(reason) | End::Kicked(reason) => reason.clone(),
        End::Stop => "this server is shutting down".to_owned(),
    };
    live.publisher
        .confirms
        .fail_all(&format!("connection to {} lost: {reason}", live.node));
    match end {
        End::Lost(reason) => {
            log::warn!("lost the connection to RabbitMQ at {}: {reason}", live.node)
        }
        End::Kicked(reason) => {
            log::warn!("{reason}; reconnecting");
            close_connection(&live).await;
        }
        End::Stop => {
            log::info!("closing the connection to RabbitMQ at {}", live.node);
            close_connection(&live).await;
        }
    }
    stopping
}

/// Sleeps for `delay`, or less if the broker is being closed.
async fn pause(shared: &Shared, delay: Duration) {
    let stop = async {
        let _ = shared.stopped.recv().await;
    };
    let sleep = async {
        async_io::Timer::after(delay).await;
    };
    future::or(stop, sleep).await;
}

async fn close_connection(live: &Live) {
    let connection = live.connection.get_ref().clone();
    let what = format!("the connection to {}", live.node);
    close_detached(&what, CLOSE_TIMEOUT, connection.close()).await;
}
