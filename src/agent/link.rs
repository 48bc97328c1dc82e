//! The agent's connection to a server: dial, handshake, then frames both ways until the
//! connection ends; then back off (with jitter) and dial the next server in the list.
//!
//! Sends still waiting for an answer when a connection ends are re-sent, unchanged, on the
//! next one: the recipient drops the copy if the first had reached RabbitMQ after all.
//!
//! The server is not trusted with the agent's resources: frames are read up to the agent's
//! own limit whatever `Welcome` announces, and `Deliver` frames are handled by at most
//! [`MAX_PENDING_DELIVERIES`] tasks at once; past that the read loop waits, so a flood
//! slows the connection down instead of growing the agent.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_tungstenite::tungstenite::Message;
use futures_util::StreamExt;

use super::outbox::Outcome;
use super::{inbox, trust, Agent, Link, AGENT_MAX_MESSAGE};
use crate::config::ConfigError;
use crate::crypto::{self, ChannelBinding};
use crate::protocol::{
    ClientFrame, DirectoryDocument, ServerFrame, FRAME_OVERHEAD, PROTOCOL_VERSION,
};
use crate::sync::{lock, write};
use crate::transport::{self, Stream};
use crate::wait::{with_timeout, Backoff};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// `Deliver` frames being handled (waiting for a delivery slot, opening, posting to the
/// webhook) at once, over all connections. An honest server has at most its `--prefetch`
/// (default 64) unacknowledged deliveries out, so this only ever stops a flood.
pub(super) const MAX_PENDING_DELIVERIES: usize = 256;

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
        let bad = |why: &str| ConfigError::Invalid {
            flag: "--server",
            value: s.to_owned(),
            why: format!("{why} (expected ws://host:port/v1/ws or wss://…)"),
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

/// Why a connection to a server failed or ended; logged before the next attempt.
#[derive(Debug)]
pub(super) enum LinkError {
    /// TCP (or TLS over it) to the server could not be opened.
    Connect(String),
    /// The WebSocket upgrade failed: wrong path, not a DMR server, or a proxy in the way.
    Upgrade(String),
    /// The server did not finish the handshake within [`HANDSHAKE_TIMEOUT`].
    HandshakeTimeout,
    /// Our key could not produce the handshake's proof.
    Proof(String),
    /// The server closed the handshake, saying why (unknown agent, failed proof, …).
    Refused { reason: String },
    /// The server closed the connection, with its reason when it gave one.
    Closed(Option<String>),
    /// Nothing, not even a ping, arrived within [`transport::IDLE_TIMEOUT`].
    Idle,
    /// Reading from the socket failed.
    Read(String),
    /// Writing to the socket failed.
    Write(String),
    /// The server sent a frame that does not decode.
    BadFrame(String),
    /// The server sent a frame out of the protocol's order.
    Unexpected(&'static str),
    /// Our writer stopped because its queue closed.
    Stopped,
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "TCP/TLS connection failed: {e}"),
            Self::Upgrade(e) => write!(
                f,
                "WebSocket upgrade failed (is the URL a DMR server's /v1/ws?): {e}"
            ),
            Self::HandshakeTimeout => write!(f, "handshake timed out after {HANDSHAKE_TIMEOUT:?}"),
            Self::Proof(e) => write!(f, "cannot prove possession of --key: {e}"),
            Self::Refused { reason } => write!(f, "server refused: {reason}"),
            Self::Closed(None) => f.write_str("server closed the connection"),
            Self::Closed(Some(reason)) => write!(f, "server closed the connection: {reason}"),
            Self::Idle => f.write_str("no frame or ping within the idle timeout"),
            Self::Read(e) => write!(f, "WebSocket error: {e}"),
            Self::Write(e) => write!(f, "write failed: {e}"),
            Self::BadFrame(e) => write!(f, "bad frame from server: {e}"),
            Self::Unexpected(what) => write!(f, "protocol error: {what}"),
            Self::Stopped => f.write_str("stopped"),
        }
    }
}

impl std::error::Error for LinkError {}

/// How a connection attempt ended.
enum End {
    /// Never got to `Welcome`.
    Failed(LinkError),
    /// Was authenticated, then lost.
    Lost(LinkError),
}

/// Keeps a connection to some server for as long as the agent runs.
pub(super) async fn run(agent: Arc<Agent>) {
    warn_plain_text(&agent.config.servers);
    let servers = &agent.config.servers;
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    for attempt in 0usize.. {
        let server = &servers[attempt % servers.len()];
        match connect(&agent, server, attempt as u64).await {
            End::Lost(e) => {
                log::warn!("lost {}: {e}; reconnecting", server.url);
                backoff.reset();
            }
            End::Failed(e) => log::warn!("cannot connect to {}: {e}", server.url),
        }
        if attempt > 0 {
            agent.metrics.reconnects.inc();
        }
        backoff.wait().await;
    }
}

fn warn_plain_text(servers: &[ServerUrl]) {
    for s in servers.iter().filter(|s| !s.tls && !s.is_loopback()) {
        log::warn!(
            "{} is plain ws:// off loopback: use wss:// unless a TLS ingress is in front",
            s.url
        );
    }
}

async fn connect(agent: &Arc<Agent>, server: &ServerUrl, generation: u64) -> End {
    let (mut tx, mut rx, documents) =
        match with_timeout(HANDSHAKE_TIMEOUT, open(agent, server)).await {
            Some(Ok(ws)) => ws,
            Some(Err(e)) => return End::Failed(e),
            None => return End::Failed(LinkError::HandshakeTimeout),
        };
    trust::accept(agent, documents).await;
    let (frames, out) = async_channel::bounded::<ClientFrame>(1024);
    *lock(&agent.link) = Some(Link {
        generation,
        frames: frames.clone(),
    });
    agent.metrics.connected.set(1);
    log::info!("connected to {} as {}", server.url, agent.config.id);
    let resent = agent.outbox.resend(&frames);
    if resent > 0 {
        log::info!("re-sent {resent} messages that were waiting for an answer");
    }
    agent.outbox.wake();
    // A task of its own: raced inline with the reader, each frame written would poll the
    // socket's read side again (a failing `recv` and a re-arm per frame), and vice versa.
    // Dropped (so cancelled) when the reader ends first.
    let writer = crate::runtime::spawn(async move {
        match transport::write_loop(&mut tx, &out, |f| Message::binary(f.encode())).await {
            Ok(()) => LinkError::Stopped,
            Err(e) => LinkError::Write(e.to_string()),
        }
    });
    let reason =
        futures_lite::future::or(writer, read_loop(agent, &mut rx, generation, &frames)).await;
    *lock(&agent.link) = None;
    agent.metrics.connected.set(0);
    End::Lost(reason)
}

/// Dials, upgrades and authenticates; returns the socket halves after `Welcome`, and the
/// directory documents it carried (not yet checked).
async fn open(
    agent: &Agent,
    server: &ServerUrl,
) -> Result<(Sender, Receiver, Vec<DirectoryDocument>), LinkError> {
    let (mut tx, mut rx, channel) = upgrade(agent, server).await?;
    let documents = authenticate(agent, channel, &mut tx, &mut rx).await?;
    Ok((tx, rx, documents))
}

/// The WebSocket's halves and the TLS channel a handshake proof on it would be bound to.
async fn upgrade(
    agent: &Agent,
    server: &ServerUrl,
) -> Result<(Sender, Receiver, ChannelBinding), LinkError> {
    let tls = if server.tls { agent.tls.as_ref() } else { None };
    let stream = transport::dial(&server.host, server.port, tls)
        .await
        .map_err(|e| LinkError::Connect(e.to_string()))?;
    let channel = stream
        .channel_binding()
        .map_err(|e| LinkError::Connect(format!("no TLS exporter: {e}")))?;
    // Our own limit, not the server's: a server cannot make us buffer more than we chose.
    let cfg = transport::ws_config(AGENT_MAX_MESSAGE);
    let (ws, _) =
        async_tungstenite::client_async_with_config(server.url.as_str(), stream, Some(cfg))
            .await
            .map_err(|e| LinkError::Upgrade(e.to_string()))?;
    let (tx, rx) = ws.split();
    Ok((tx, rx, channel))
}

/// `Hello`, `Challenge`, `Proof`, `Welcome`; keeps the limits `Welcome` carries and returns
/// its directory documents.
///
/// The proof is bound to our TLS connection when the challenge asks for it (the server
/// terminates TLS); see `crypto::ChannelBinding` for the rule.
async fn authenticate(
    agent: &Agent,
    channel: ChannelBinding,
    tx: &mut Sender,
    rx: &mut Receiver,
) -> Result<Vec<DirectoryDocument>, LinkError> {
    let id = agent.config.id.clone();
    let hello = ClientFrame::Hello {
        version: PROTOCOL_VERSION,
        agent_id: id.clone(),
    };
    send(tx, hello).await?;
    let ServerFrame::Challenge {
        ephemeral_pk,
        nonce,
        tls_bound,
    } = recv(rx).await?
    else {
        return Err(LinkError::Unexpected("expected Challenge"));
    };
    let binding = match (tls_bound, channel) {
        (true, ChannelBinding::Tls(_)) => channel,
        // No honest server asks for a TLS binding on a connection that has no TLS.
        (true, ChannelBinding::Unbound) => {
            return Err(LinkError::Unexpected(
                "the challenge asks for a TLS-bound proof on a plain ws:// connection",
            ))
        }
        // The server speaks plain WebSocket (behind a TLS ingress, or ws://).
        (false, _) => ChannelBinding::Unbound,
    };
    let mac = crypto::prove(agent.sealer.key(), &id, &ephemeral_pk, &nonce, binding)
        .map_err(|e| LinkError::Proof(e.to_string()))?;
    send(tx, ClientFrame::Proof { mac }).await?;
    let ServerFrame::Welcome { directory, limits } = recv(rx).await? else {
        return Err(LinkError::Unexpected("expected Welcome"));
    };
    *write(&agent.limits) = Some(limits);
    Ok(directory)
}

async fn send(tx: &mut Sender, frame: ClientFrame) -> Result<(), LinkError> {
    tx.send(Message::binary(frame.encode()))
        .await
        .map_err(|e| LinkError::Write(e.to_string()))
}

/// Reads one handshake frame; a close frame's reason is the server's refusal.
async fn recv(rx: &mut Receiver) -> Result<ServerFrame, LinkError> {
    let mut quiet = transport::Quiet::new(transport::IDLE_TIMEOUT);
    match next_frame(rx, &mut quiet, AGENT_MAX_MESSAGE + FRAME_OVERHEAD).await {
        Err(LinkError::Closed(Some(reason))) => Err(LinkError::Refused { reason }),
        other => other,
    }
}

/// Waits for the next frame of at most `max` bytes, skipping pings and pongs.
async fn next_frame(
    rx: &mut Receiver,
    quiet: &mut transport::Quiet,
    max: usize,
) -> Result<ServerFrame, LinkError> {
    loop {
        let bytes = match quiet.within(rx.next()).await {
            None => return Err(LinkError::Idle),
            Some(None) => return Err(LinkError::Closed(None)),
            Some(Some(Err(e))) => return Err(LinkError::Read(e.to_string())),
            Some(Some(Ok(Message::Binary(b)))) => b,
            Some(Some(Ok(Message::Close(c)))) => {
                return Err(LinkError::Closed(c.map(|c| c.reason.to_string())))
            }
            Some(Some(Ok(_))) => continue,
        };
        return ServerFrame::decode(&bytes, max).map_err(|e| LinkError::BadFrame(e.to_string()));
    }
}

/// Handles the server's frames until the connection fails; returns why it did.
async fn read_loop(
    agent: &Arc<Agent>,
    rx: &mut Receiver,
    generation: u64,
    frames: &async_channel::Sender<ClientFrame>,
) -> LinkError {
    let mut quiet = transport::Quiet::new(transport::IDLE_TIMEOUT);
    loop {
        let max = agent.max_message_bytes() + FRAME_OVERHEAD;
        let handled = match next_frame(rx, &mut quiet, max).await {
            // Checked and applied in order, before the next frame.
            Ok(ServerFrame::Directory { directory }) => {
                trust::accept(agent, directory).await;
                Ok(())
            }
            Ok(frame) => dispatch(agent, frame, generation, frames).await,
            Err(e) => Err(e),
        };
        if let Err(e) = handled {
            return e;
        }
    }
}

async fn dispatch(
    agent: &Arc<Agent>,
    frame: ServerFrame,
    generation: u64,
    frames: &async_channel::Sender<ClientFrame>,
) -> Result<(), LinkError> {
    match frame {
        ServerFrame::Accepted { id } => agent.outbox.settle(id, Outcome::Accepted),
        ServerFrame::Rejected { id, code, reason } => {
            agent.outbox.settle(id, Outcome::Rejected(code, reason))
        }
        ServerFrame::Deliver { delivery, envelope } => {
            // Taken before spawning: with every slot busy the read loop stops reading, and
            // TCP pushes back on the server.
            let slot = agent.pending_deliveries.acquire_arc().await;
            let (agent, frames) = (agent.clone(), frames.clone());
            crate::runtime::spawn(async move {
                inbox::handle(agent, generation, frames, delivery, envelope).await;
                drop(slot);
            })
            .detach();
        }
        // `read_loop` applies directories itself (they must be awaited, in order).
        ServerFrame::Directory { .. } => {}
        ServerFrame::Notice {
            delivery,
            id,
            recipient,
            reason,
        } => {
            // From the relay, not authenticated: it can only ever turn a status to failed.
            if !agent.statuses.failed_notice(id, &recipient, reason) {
                log::debug!("failure notice for {id}, which this agent does not know as sent");
            }
            let _ = frames.try_send(ClientFrame::Ack { delivery });
        }
        ServerFrame::Challenge { .. } | ServerFrame::Welcome { .. } => {
            return Err(LinkError::Unexpected("handshake frame after the handshake"))
        }
    }
    Ok(())
}
