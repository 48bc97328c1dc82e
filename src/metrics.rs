//! Prometheus metrics of the server and the agent, served on `GET /metrics`.
//!
//! Counters are plain atomics from prometheus-client; labels are static strings, so
//! recording a metric never allocates on the hot path beyond the family's first use.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A counter split by one label.
pub(crate) type Labeled = Family<[(&'static str, &'static str); 1], Counter>;

/// `dmr_build_info{version, git} 1`: which build a process runs, for both binaries.
fn build_info() -> Registry {
    let mut registry = Registry::with_prefix("dmr");
    let info = Family::<[(&'static str, &'static str); 2], Gauge>::default();
    let git = crate::ops::GIT_SHA.unwrap_or("unknown");
    info.get_or_create(&[("version", crate::ops::VERSION), ("git", git)])
        .set(1);
    registry.register(
        "build_info",
        "The running build: version and git commit",
        info,
    );
    registry
}

fn latency() -> Histogram {
    // 100 µs … ~13 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Metrics of one `dmr-server` process.
pub(crate) struct ServerMetrics {
    registry: Registry,
    pub(crate) sessions: Gauge,
    pub(crate) handshakes: Labeled,
    pub(crate) frames_in: Counter,
    pub(crate) frames_out: Counter,
    pub(crate) accepted: Counter,
    pub(crate) rejected: Labeled,
    pub(crate) deliveries: Counter,
    pub(crate) acks: Counter,
    pub(crate) nacks: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) confirm_seconds: Histogram,
    pub(crate) rabbitmq_connected: Gauge,
    pub(crate) directory_agents: Gauge,
    pub(crate) directory_reloads: Labeled,
    pub(crate) connections_refused: Labeled,
    pub(crate) handshakes_in_progress: Gauge,
    pub(crate) dlq_messages: Gauge,
    build: Registry,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("dmr_server"),
            sessions: Gauge::default(),
            handshakes: Labeled::default(),
            frames_in: Counter::default(),
            frames_out: Counter::default(),
            accepted: Counter::default(),
            rejected: Labeled::default(),
            deliveries: Counter::default(),
            acks: Counter::default(),
            nacks: Counter::default(),
            dead_lettered: Counter::default(),
            confirm_seconds: latency(),
            rabbitmq_connected: Gauge::default(),
            directory_agents: Gauge::default(),
            directory_reloads: Labeled::default(),
            connections_refused: Labeled::default(),
            handshakes_in_progress: Gauge::default(),
            dlq_messages: Gauge::default(),
            build: build_info(),
        };
        let r = &mut m.registry;
        r.register(
            "sessions",
            "Authenticated agent sessions",
            m.sessions.clone(),
        );
        r.register("handshakes", "Handshakes by result", m.handshakes.clone());
        r.register(
            "frames_in",
            "Frames received from agents",
            m.frames_in.clone(),
        );
        r.register("frames_out", "Frames sent to agents", m.frames_out.clone());
        r.register(
            "accepted",
            "Envelopes confirmed durable by RabbitMQ",
            m.accepted.clone(),
        );
        r.register("rejected", "Envelopes refused, by code", m.rejected.clone());
        r.register(
            "deliveries",
            "Envelopes pushed to agents",
            m.deliveries.clone(),
        );
        r.register("acks", "Deliveries acknowledged by agents", m.acks.clone());
        r.register("nacks", "Deliveries refused by agents", m.nacks.clone());
        r.register(
            "dead_lettered",
            "Messages moved to the DLQ with a reason (refused for good by the agent, or undecodable)",
            m.dead_lettered.clone(),
        );
        r.register(
            "confirm_seconds",
            "Publish to RabbitMQ confirm",
            m.confirm_seconds.clone(),
        );
        r.register(
            "rabbitmq_connected",
            "1 while connected to RabbitMQ",
            m.rabbitmq_connected.clone(),
        );
        r.register(
            "directory_agents",
            "Agents in the directory",
            m.directory_agents.clone(),
        );
        r.register(
            "directory_reloads",
            "Directory loads by result",
            m.directory_reloads.clone(),
        );
        r.register(
            "connections_refused",
            "Connections refused before login, by reason (connections, handshakes)",
            m.connections_refused.clone(),
        );
        r.register(
            "handshakes_in_progress",
            "WebSocket handshakes started and not yet finished",
            m.handshakes_in_progress.clone(),
        );
        r.register(
            "dlq_messages",
            "Messages ready in the dead-letter queue (read every 15 s)",
            m.dlq_messages.clone(),
        );
        m
    }
}

impl ServerMetrics {
    /// The exposition with `extra`'s metrics (unprefixed names) in the same document.
    pub fn render_with(&self, extra: &Registry) -> String {
        render_all(&[&self.registry, &self.build, extra])
    }
}

/// Metrics of one `dmr-agent` process.
pub(crate) struct AgentMetrics {
    registry: Registry,
    pub(crate) connected: Gauge,
    pub(crate) reconnects: Counter,
    pub(crate) sent: Counter,
    pub(crate) accepted: Counter,
    pub(crate) rejected: Labeled,
    pub(crate) delivered: Counter,
    pub(crate) duplicates: Counter,
    pub(crate) receipts_sent: Counter,
    pub(crate) stale: Counter,
    pub(crate) webhook_failures: Counter,
    pub(crate) webhook_up: Gauge,
    pub(crate) dead_lettered: Counter,
    pub(crate) decrypt_failures: Counter,
    pub(crate) send_seconds: Histogram,
    pub(crate) delivery_seconds: Histogram,
    build: Registry,
    pub(crate) directory_refused: Counter,
    pub(crate) key_changes: Gauge,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("dmr_agent"),
            connected: Gauge::default(),
            reconnects: Counter::default(),
            sent: Counter::default(),
            accepted: Counter::default(),
            rejected: Labeled::default(),
            delivered: Counter::default(),
            duplicates: Counter::default(),
            receipts_sent: Counter::default(),
            stale: Counter::default(),
            webhook_failures: Counter::default(),
            webhook_up: Gauge::default(),
            dead_lettered: Counter::default(),
            decrypt_failures: Counter::default(),
            send_seconds: latency(),
            delivery_seconds: latency(),
            build: build_info(),
            directory_refused: Counter::default(),
            key_changes: Gauge::default(),
        };
        m.webhook_up.set(1);
        let r = &mut m.registry;
        r.register(
            "connected",
            "1 while authenticated to a server",
            m.connected.clone(),
        );
        r.register(
            "reconnects",
            "Connections to a server after the first",
            m.reconnects.clone(),
        );
        r.register("sent", "Messages sent to a server", m.sent.clone());
        r.register(
            "accepted",
            "Messages the server confirmed durable",
            m.accepted.clone(),
        );
        r.register(
            "rejected",
            "Messages refused, by reason",
            m.rejected.clone(),
        );
        r.register(
            "delivered",
            "Messages delivered to the local service",
            m.delivered.clone(),
        );
        r.register(
            "webhook_up",
            "0 while the local service is failing and deliveries are held for it",
            m.webhook_up.clone(),
        );
        r.register(
            "dead_lettered",
            "Incoming messages that can never be delivered, sent to the DLQ with a reason",
            m.dead_lettered.clone(),
        );
        r.register(
            "duplicates",
            "Redelivered messages dropped as already delivered",
            m.duplicates.clone(),
        );
        r.register(
            "receipts_sent",
            "Receipt envelopes sent back to senders (under load one names up to 16 messages)",
            m.receipts_sent.clone(),
        );
        r.register(
            "stale",
            "Messages dead-lettered as too old or from the future",
            m.stale.clone(),
        );
        r.register(
            "webhook_failures",
            "Failed webhook attempts",
            m.webhook_failures.clone(),
        );
        r.register(
            "decrypt_failures",
            "Envelopes that failed to open",
            m.decrypt_failures.clone(),
        );
        r.register(
            "send_seconds",
            "API request to server acceptance",
            m.send_seconds.clone(),
        );
        r.register(
            "delivery_seconds",
            "Sender's timestamp to webhook success",
            m.delivery_seconds.clone(),
        );
        r.register(
            "directory_refused",
            "Directories from the server refused (bad or missing signature, unparsable)",
            m.directory_refused.clone(),
        );
        r.register(
            "key_changes",
            "Agents whose key changed in the directory and is not confirmed (not used)",
            m.key_changes.clone(),
        );
        m
    }
}

impl AgentMetrics {
    /// The Prometheus text exposition.
    pub(crate) fn render(&self) -> String {
        render_all(&[&self.registry, &self.build])
    }
}

/// One exposition document of several registries.
fn render_all(registries: &[&Registry]) -> String {
    use prometheus_client::encoding::text::{encode_eof, encode_registry};
    let mut out = String::new();
    let mut written = Ok(());
    for registry in registries {
        written = written.and_then(|()| encode_registry(&mut out, registry));
    }
    written
        .and_then(|()| encode_eof(&mut out))
        .expect("writing to a String cannot fail");
    out
}

/// The content type Prometheus expects for [`ServerMetrics::render_with`].
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Both binaries' metrics as Prometheus text, with every labelled family given one sample
/// so that every series name shows: the names dashboards and alert rules may refer to.
#[cfg(feature = "test-support")]
pub fn exposition_of_every_metric() -> String {
    let server = ServerMetrics::default();
    for family in [
        &server.handshakes,
        &server.rejected,
        &server.directory_reloads,
    ] {
        family.get_or_create(&[("test", "test")]).inc();
    }
    let agent = AgentMetrics::default();
    agent.rejected.get_or_create(&[("test", "test")]).inc();
    server.render_with(&Registry::default()) + &agent.render()
}

/// Serves `GET /metrics` (and nothing else) from `render` on its own listener
/// (`--metrics-listen`), until the returned task is dropped.
pub(crate) fn serve_separately(
    listener: crate::net::TcpListener,
    render: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
) -> smol::Task<()> {
    use hyper::{Method, StatusCode};
    let handler = move |req: hyper::Request<hyper::body::Incoming>, _peer| {
        let render = render.clone();
        async move {
            match (req.method(), req.uri().path()) {
                (&Method::GET, "/metrics") => {
                    crate::http::text(StatusCode::OK, CONTENT_TYPE, render())
                }
                (_, "/metrics") => crate::http::error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
                _ => crate::http::error(StatusCode::NOT_FOUND, "only /metrics here"),
            }
        }
    };
    crate::runtime::spawn(crate::http::serve(
        listener,
        None,
        handler,
        futures_lite::future::pending(),
    ))
}

/// Binds `--metrics-listen`, naming the flag when it cannot.
pub(crate) async fn bind_separately(
    addr: std::net::SocketAddr,
) -> Result<crate::net::TcpListener, String> {
    crate::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on --metrics-listen {addr}: {e}"))
}
