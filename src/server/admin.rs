//! The server's operator side beside the relay: readiness with its reason, the
//! `--metrics-listen` listener, the DLQ depth gauge, and the policy check at start.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Shared;

/// How often the DLQ depth is read for `dmr_server_dlq_messages`.
const DLQ_INTERVAL: Duration = Duration::from_secs(15);

/// Why the server is not ready, if it is not: the reason `/readyz` gives.
pub(super) fn not_ready_reason(shared: &Shared) -> Option<String> {
    if shared.stopping.load(Ordering::Relaxed) {
        return Some("shutting down".to_owned());
    }
    if !shared.broker.is_connected() {
        return Some("not connected to RabbitMQ".to_owned());
    }
    if let Some(problem) = shared.broker.publish_problem() {
        return Some(problem);
    }
    if !shared.directory_loaded.load(Ordering::Relaxed) {
        return Some("no agent directory loaded yet".to_owned());
    }
    None
}

/// Tasks that live as long as the server runs; dropped at shutdown.
pub(super) struct Background {
    _tasks: Vec<smol::Task<()>>,
}

/// Starts the DLQ gauge, the policy check and (with `--metrics-listen`) the separate
/// metrics listener, which must bind (the server does not start otherwise).
pub(super) async fn start(shared: &Arc<Shared>) -> Result<Background, String> {
    let mut tasks = vec![crate::runtime::spawn(dlq_gauge(shared.clone()))];
    if let Some(url) = shared.config.management_url.clone() {
        let shared = shared.clone();
        tasks.push(crate::runtime::spawn(async move {
            shared.broker.connected().await;
            let config = &shared.config;
            crate::ops::check_policies(url.expose(), &config.amqp_urls(), &config.topology).await;
        }));
    } else {
        log::info!(
            "no --management-url: the queue policies of `dmr-server rabbitmq setup` are not \
             checked"
        );
    }
    if let Some(addr) = shared.config.metrics_listen {
        let listener = crate::metrics::bind_separately(addr).await?;
        log::info!("metrics on http://{addr}/metrics (not on --listen)");
        let render = {
            let shared = shared.clone();
            Arc::new(move || super::metrics(&shared)) as Arc<dyn Fn() -> String + Send + Sync>
        };
        tasks.push(crate::metrics::serve_separately(listener, render));
    }
    Ok(Background { _tasks: tasks })
}

/// Keeps `dmr_server_dlq_messages` current (a passive declare every 15 s).
async fn dlq_gauge(shared: Arc<Shared>) {
    loop {
        shared.broker.connected().await;
        match shared.broker.dlq_depth().await {
            Ok(n) => {
                shared.metrics.dlq_messages.set(n.into());
            }
            Err(e) => log::debug!("cannot read the dead-letter queue's depth: {e}"),
        }
        async_io::Timer::after(DLQ_INTERVAL).await;
    }
}
