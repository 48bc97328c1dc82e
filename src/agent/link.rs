//! The agent's connection to a server: dial, handshake, then frames both ways until the
//! connection ends; then back off (with jitter) and dial the next server in the list.
//!
//! Sends still waiting for an answer when a connection ends are re-sent, unchanged, on the
//! next one: the recipient drops the copy if the first had reached RabbitMQ after all.

use std::sync::Arc;
use std::time::Duration;

use async_tungstenite::tungstenite::Message;
use futures_util::StreamExt;

use super::{inbox, Agent, Link, Outcome};
use crate::config::ConfigError;
use crate::crypto;
use crate::directory::Directory;
use crate::wait::with_timeout;
use crate::protocol::{ClientFrame, ServerFrame, FRAME_OVERHEAD, PROTOCOL_VERSION};
use crate::transport::{self, Stream};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Frames accepted before `Welcome` tells the real limit.
const DEFAULT_MAX_FRAME: usize = 1 << 20;

type Sender = async_tungstenite::WebSocketSender<Stream>;
type Receiver = async_tungstenite::WebSocketReceiver<Stream>;

/// A `ws://` or `wss://` server address.
#[derive(Clone, Debug)]
pub struct ServerUrl {
    pub url: String,
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl ServerUrl {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| {
            ConfigError(format!(
                "--server {s:?}: {why} (expected ws://host:port/v1/ws or wss://…)"
            ))
        };
        let uri: hyper::Uri = s.parse().map_err(|_| bad("not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(bad("scheme must be ws or wss")),
        };
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Self {
            url: s.to_owned(),
            host,
            port,
            tls,
        })
    }

    fn is_loopback(&self) -> bool {
        self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// How a connection attempt ended.
enum End {
    /// Never got to `Welcome`.
    Failed(String),
    /// Was authenticated, then lost.
    Lost(String),
}

/// Keeps a connection to some server for as long as the agent runs.
pub(super) async fn run(agent: Arc<Agent>) {
    for s in agent
        .config
        .servers
        .iter()
        .filter(|s| !s.tls && !s.is_loopback())
    {
        log::warn!(
            "{} is plain ws:// off loopback: use wss:// unless a TLS ingress is in front",
            s.url
        );
    }
    let mut backoff = BACKOFF_MIN;
    let mut connected_before = false;
    for attempt in 0usize.. {
        let server = &agent.config.servers[attempt % agent.config.servers.len()];
        match connect(&agent, server, attempt as u64).await {
            End::Lost(reason) => {
                log::warn!("lost {}: {reason}; reconnecting", server.url);
                backoff = BACKOFF_MIN;
            }
            End::Failed(reason) => {
                log::warn!("cannot connect to {}: {reason}", server.url);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        if connected_before {
            agent.metrics.reconnects.inc();
        }
        connected_before = true;
        let jitter = fastrand::u64(0..=backoff.as_millis() as u64 / 2);
        smol::Timer::after(backoff + Duration::from_millis(jitter)).await;
    }
}

async fn connect(agent: &Arc<Agent>, server: &ServerUrl, generation: u64) -> End {
    let (mut tx, mut rx) = match with_timeout(HANDSHAKE_TIMEOUT, open(agent, server)).await {
        Some(Ok(ws)) => ws,
        Some(Err(e)) => return End::Failed(e),
        None => return End::Failed("handshake timed out".into()),
    };
    let (frames, out) = async_channel::bounded::<ClientFrame>(1024);
    *agent.link.lock().expect("link lock") = Some(Link {
        generation,
        frames: frames.clone(),
    });
    agent.metrics.connected.set(1);
    log::info!("connected to {} as {}", server.url, agent.config.id);
    resend_pending(agent, &frames);
    let writer = async {
        match transport::write_loop(&mut tx, &out, |f| Message::binary(f.encode())).await {
            Ok(()) => "stopped".to_owned(),
            Err(e) => format!("write failed: {e}"),
        }
    };
    let reason =
        futures_lite::future::or(writer, read_loop(agent, &mut rx, generation, &frames)).await;
    *agent.link.lock().expect("link lock") = None;
    agent.metrics.connected.set(0);
    End::Lost(reason)
}

/// Dials, upgrades and authenticates; returns the socket halves after `Welcome`.
async fn open(agent: &Agent, server: &ServerUrl) -> Result<(Sender, Receiver), String> {
    let tls = if server.tls { agent.tls.as_ref() } else { None };
    let stream = transport::dial(&server.host, server.port, tls)
        .await
        .map_err(|e| e.to_string())?;
    let max = agent
        .limits()
        .map_or(DEFAULT_MAX_FRAME, |l| l.max_message_bytes as usize);
    let cfg = transport::ws_config(max);
    let (ws, _) =
        async_tungstenite::client_async_with_config(server.url.as_str(), stream, Some(cfg))
            .await
            .map_err(|e| format!("WebSocket upgrade: {e}"))?;
    let (mut tx, mut rx) = ws.split();
    let id = agent.config.id.clone();
    send(
        &mut tx,
        ClientFrame::Hello {
            version: PROTOCOL_VERSION,
            agent_id: id.clone(),
        },
    )
    .await?;
    let ServerFrame::Challenge {
        ephemeral_pk,
        nonce,
    } = recv(&mut rx).await?
    else {
        return Err("expected Challenge".into());
    };
    let mac = crypto::prove(&agent.key, &id, &ephemeral_pk, &nonce).map_err(|e| e.to_string())?;
    send(&mut tx, ClientFrame::Proof { mac }).await?;
    let ServerFrame::Welcome { directory, limits } = recv(&mut rx).await? else {
        return Err("expected Welcome".into());
    };
    *agent.directory.write().expect("directory lock") =
        Arc::new(Directory::from_entries(&directory));
    *agent.limits.write().expect("limits lock") = Some(limits);
    Ok((tx, rx))
}

async fn send(tx: &mut Sender, frame: ClientFrame) -> Result<(), String> {
    tx.send(Message::binary(frame.encode()))
        .await
        .map_err(|e| format!("write failed: {e}"))
}

/// Reads one handshake frame; a close frame's reason becomes the error.
async fn recv(rx: &mut Receiver) -> Result<ServerFrame, String> {
    loop {
        match rx.next().await {
            Some(Ok(Message::Binary(b))) => {
                return ServerFrame::decode(&b, DEFAULT_MAX_FRAME + FRAME_OVERHEAD)
                    .map_err(|e| e.to_string())
            }
            Some(Ok(Message::Close(Some(c)))) => {
                return Err(format!("server refused: {}", c.reason))
            }
            Some(Ok(Message::Close(None))) | None => {
                return Err("server closed the connection".into())
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("WebSocket error: {e}")),
        }
    }
}

fn resend_pending(agent: &Agent, frames: &async_channel::Sender<ClientFrame>) {
    let pending = agent.pending.lock().expect("pending lock");
    if !pending.is_empty() {
        log::info!(
            "re-sending {} messages that were waiting for an answer",
            pending.len()
        );
    }
    for p in pending.values() {
        let _ = frames.try_send(ClientFrame::Send {
            envelope: p.envelope.clone(),
        });
    }
}

async fn read_loop(
    agent: &Arc<Agent>,
    rx: &mut Receiver,
    generation: u64,
    frames: &async_channel::Sender<ClientFrame>,
) -> String {
    loop {
        let max = agent
            .limits()
            .map_or(DEFAULT_MAX_FRAME, |l| l.max_message_bytes as usize)
            + FRAME_OVERHEAD;
        let bytes = match with_timeout(transport::IDLE_TIMEOUT, rx.next()).await {
            None => return "no frame or ping within the idle timeout".into(),
            Some(None) => return "connection closed".into(),
            Some(Some(Err(e))) => return format!("WebSocket error: {e}"),
            Some(Some(Ok(Message::Binary(b)))) => b,
            Some(Some(Ok(Message::Close(c)))) => {
                return format!(
                    "server closed: {}",
                    c.map(|c| c.reason.to_string()).unwrap_or_default()
                )
            }
            Some(Some(Ok(_))) => continue,
        };
        let frame = match ServerFrame::decode(&bytes, max) {
            Ok(f) => f,
            Err(e) => return format!("bad frame from server: {e}"),
        };
        match frame {
            ServerFrame::Accepted { id } => settle(agent, id, Outcome::Accepted),
            ServerFrame::Rejected { id, code, reason } => {
                settle(agent, id, Outcome::Rejected(code, reason))
            }
            ServerFrame::Deliver { delivery, envelope } => {
                let (agent, frames) = (agent.clone(), frames.clone());
                smol::spawn(async move {
                    inbox::handle(agent, generation, frames, delivery, envelope).await
                })
                .detach();
            }
            ServerFrame::Directory { directory } => {
                let d = Directory::from_entries(&directory);
                log::info!("directory update: {} agents", d.len());
                *agent.directory.write().expect("directory lock") = Arc::new(d);
            }
            ServerFrame::Challenge { .. } | ServerFrame::Welcome { .. } => {
                return "handshake frame after the handshake".into()
            }
        }
    }
}

fn settle(agent: &Agent, id: crate::protocol::MessageId, outcome: Outcome) {
    if let Some(p) = agent.pending.lock().expect("pending lock").remove(&id) {
        let _ = p.reply.try_send(outcome);
    }
}
