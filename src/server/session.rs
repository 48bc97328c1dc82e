//! One agent's WebSocket session: the handshake, then envelopes in and deliveries out.
//!
//! Three tasks share a session: the reader (frames from the agent), the writer (the only
//! one touching the socket's send half, fed by a channel) and the pump (RabbitMQ → agent).
//! Whatever ends first ends the session; the agent's queue consumer is then closed so every
//! unacknowledged delivery returns to the queue for the agent's next session.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_lock::Semaphore;
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::CloseFrame;
use async_tungstenite::tungstenite::Message;
use futures_lite::future;
use futures_util::StreamExt;

use super::admission::PreLogin;
use super::sessions::Event;
use super::Shared;
use crate::audit::{self, Meta};
use crate::broker::{BrokerError, Consumer, Delivery};
use crate::crypto::{Challenge, ChannelBinding, PublicKey};
use crate::protocol::{
    AgentId, ClientFrame, Envelope, Header, RejectCode, ServerFrame, FRAME_OVERHEAD,
    MAX_RECEIPT_BYTES, PROTOCOL_VERSION,
};
use crate::sync::lock;
use crate::transport::{self, Metered, Stream, WebSocket};
use crate::wait::{with_timeout, Backoff};

type Sender = async_tungstenite::WebSocketSender<Metered<Stream>>;
type Receiver = async_tungstenite::WebSocketReceiver<Metered<Stream>>;

/// Publishes one session may have waiting for RabbitMQ confirms at once.
const MAX_PENDING_SENDS: usize = 256;

/// Waits between attempts to consume the agent's queue while they fail.
const CONSUME_RETRY_MIN: Duration = Duration::from_millis(200);
const CONSUME_RETRY_MAX: Duration = Duration::from_secs(5);

/// Why a handshake was refused: a metric label and the close reason the agent sees.
struct Refusal {
    label: &'static str,
    reason: String,
}

fn refuse(label: &'static str, reason: impl Into<String>) -> Refusal {
    Refusal {
        label,
        reason: reason.into(),
    }
}

/// Runs a session to its end. Until the handshake succeeds, `pre_login` holds the
/// connection's place under `--max-handshakes` and caps what it may read.
pub(super) async fn run(shared: Arc<Shared>, ws: WebSocket, peer: SocketAddr, pre_login: PreLogin) {
    // Taken before the split: the proof must cover this very TLS connection (if any).
    let channel = ws.get_ref().get_ref().channel_binding();
    let (mut tx, mut rx) = ws.split();
    let channel = match channel {
        Ok(c) => c,
        Err(e) => {
            let r = refuse(
                "internal",
                format!("no TLS exporter for this connection: {e}"),
            );
            return refused(&shared, tx, peer, r).await;
        }
    };
    let limit = shared.config.handshake_timeout;
    // Boxed here and below: a task's future is allocated whole for the task's life, so a
    // step taken once or per message (but never while idle) is kept out of it.
    let proven = with_timeout(
        limit,
        Box::pin(handshake(&shared, channel, &mut tx, &mut rx)),
    )
    .await;
    let (agent, key) = match proven {
        Some(Ok(proven)) => {
            pre_login.logged_in();
            proven
        }
        Some(Err(r)) => return refused(&shared, tx, peer, r).await,
        None => return refused(&shared, tx, peer, refuse("timeout", "handshake timed out")).await,
    };
    // Counted until the session has ended, close frame written: shutdown waits for that.
    let _busy = shared.outstanding.begin();
    // The proof was checked against the directory in force when `Hello` came; only a
    // directory that still lists this agent with that key may get a session.
    let current = || shared.directory().get(&agent).map(|e| e.public_key) == Some(key);
    let Some((session, events)) = shared.sessions.register(&agent, current) else {
        let why = format!("agent {agent} was removed or re-keyed during the handshake");
        return refused(&shared, tx, peer, refuse("revoked", why)).await;
    };
    shared
        .metrics
        .handshakes
        .get_or_create(&[("result", "ok")])
        .inc();
    shared.metrics.sessions.inc();
    log::info!("agent {agent} connected from {peer}");
    let reason = serve(&shared, &agent, tx, rx, events).await;
    shared.sessions.unregister(&agent, session);
    shared.metrics.sessions.dec();
    log::info!("agent {agent} disconnected: {reason}");
}

async fn refused(shared: &Shared, mut tx: Sender, peer: SocketAddr, r: Refusal) {
    shared
        .metrics
        .handshakes
        .get_or_create(&[("result", r.label)])
        .inc();
    shared.admission.log_refused_login(peer, &r.reason);
    let _ = with_timeout(
        Duration::from_secs(2),
        tx.send(close_frame(CloseCode::Policy, &r.reason)),
    )
    .await;
}

fn close_frame(code: CloseCode, reason: &str) -> Message {
    // A close reason may carry at most 123 bytes.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: reason[..end].to_owned().into(),
    }))
}

fn binary(frame: &ServerFrame) -> Message {
    Message::binary(frame.encode())
}

async fn next_frame(rx: &mut Receiver, max: usize) -> Result<ClientFrame, Refusal> {
    loop {
        match rx.next().await {
            Some(Ok(Message::Binary(b))) => {
                return ClientFrame::decode(&b, max).map_err(|e| refuse("malformed", e.to_string()))
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(_)) => return Err(refuse("malformed", "expected a binary frame")),
            Some(Err(e)) => return Err(refuse("malformed", format!("WebSocket error: {e}"))),
            None => return Err(refuse("closed", "connection closed during handshake")),
        }
    }
}

/// `Hello`, `Challenge`, `Proof`: returns the agent and the key its proof was checked
/// against. `channel` is what the proof must be bound to (this connection's TLS exporter
/// when this server terminates TLS; see `crypto::ChannelBinding` for the rule).
async fn handshake(
    shared: &Shared,
    channel: ChannelBinding,
    tx: &mut Sender,
    rx: &mut Receiver,
) -> Result<(AgentId, PublicKey), Refusal> {
    let ClientFrame::Hello { version, agent_id } = next_frame(rx, 1024).await? else {
        return Err(refuse("malformed", "expected Hello as the first frame"));
    };
    if version != PROTOCOL_VERSION {
        return Err(refuse(
            "bad_version",
            format!(
                "protocol version {version} not supported; this server speaks {PROTOCOL_VERSION}"
            ),
        ));
    }
    let Some(entry) = shared.directory().get(&agent_id).cloned() else {
        return Err(refuse(
            "unknown_agent",
            format!("agent {agent_id} is not in the directory"),
        ));
    };
    let challenge = Challenge::new().map_err(|e| refuse("internal", e.to_string()))?;
    let frame = ServerFrame::Challenge {
        ephemeral_pk: challenge.ephemeral_pk(),
        nonce: challenge.nonce(),
        tls_bound: matches!(channel, ChannelBinding::Tls(_)),
    };
    tx.send(binary(&frame))
        .await
        .map_err(|e| refuse("closed", e.to_string()))?;
    let ClientFrame::Proof { mac } = next_frame(rx, 1024).await? else {
        return Err(refuse("malformed", "expected Proof after Challenge"));
    };
    if !challenge.verify(&agent_id, &entry.public_key, channel, &mac) {
        let also = match channel {
            ChannelBinding::Tls(_) => " (or not made for this TLS connection)",
            ChannelBinding::Unbound => "",
        };
        return Err(refuse(
            "bad_proof",
            format!("agent {agent_id}: proof of key possession failed{also}"),
        ));
    }
    Ok((agent_id, entry.public_key))
}

/// Maps the delivery numbers the agent sees to RabbitMQ delivery tags of the current consumer.
#[derive(Default)]
struct Inflight {
    next: AtomicU64,
    /// Delivery number → (consumer generation, the RabbitMQ delivery). The delivery is kept
    /// whole (bounded by the prefetch) so that a `Nack` can dead-letter it with its reason.
    tags: Mutex<HashMap<u64, (u64, Delivery)>>,
    consumer: Mutex<Option<(u64, Arc<Consumer>)>>,
    /// Audit metadata of deliveries awaiting the agent's ack (only with `--audit-log`).
    audit: Mutex<HashMap<u64, (u64, Meta)>>,
}

impl Inflight {
    fn lookup(&self, delivery: u64) -> Option<(Delivery, Arc<Consumer>)> {
        let (generation, d) = lock(&self.tags).remove(&delivery)?;
        let consumer = lock(&self.consumer);
        match &*consumer {
            Some((g, c)) if *g == generation => Some((d, c.clone())),
            // That consumer is gone, so RabbitMQ has already put the message back.
            _ => None,
        }
    }
}

async fn serve(
    shared: &Arc<Shared>,
    agent: &AgentId,
    tx: Sender,
    rx: Receiver,
    events: async_channel::Receiver<Event>,
) -> String {
    // Unbounded, so an idle session preallocates nothing; what waits in it is bounded all
    // the same: deliveries by the consumer's prefetch, answers by MAX_PENDING_SENDS.
    let (out, out_rx) = async_channel::unbounded::<Message>();
    let _ = out.try_send(Message::Binary(shared.welcome()));
    let inflight = Arc::new(Inflight::default());
    let (done, writer_done) = async_channel::bounded::<()>(1);
    let writer = crate::runtime::spawn(writer(shared.clone(), tx, out_rx, done));
    let pump = crate::runtime::spawn(pump(
        shared.clone(),
        agent.clone(),
        inflight.clone(),
        out.clone(),
    ));
    let (publishes, confirms) = async_channel::unbounded();
    // One task per session answers every publish of the session, in order, as RabbitMQ
    // confirms them; it ends once the reader is gone and the last confirm is in.
    crate::runtime::spawn(answer_confirms(shared.clone(), confirms, out.clone())).detach();
    let reader = reader(
        shared.clone(),
        agent.clone(),
        rx,
        inflight.clone(),
        publishes,
    );
    let writer_gone = async {
        let _ = writer_done.recv().await;
        "connection lost while writing".to_owned()
    };
    let reason = future::or(
        future::or(reader, event_loop(events, out.clone())),
        writer_gone,
    )
    .await;
    pump.cancel().await;
    // Tell the agent first, so it can fail over while the consumer closes. Behind a full
    // queue the close frame may wait a moment; the reason matters to the agent.
    let close = out.send(close_frame(CloseCode::Normal, &reason));
    let _ = with_timeout(Duration::from_secs(1), close).await;
    out.close();
    let _ = with_timeout(Duration::from_secs(2), writer).await;
    let consumer = lock(&inflight.consumer).take();
    // The pump is cancelled, so this is the last handle; dropping any other still closes.
    if let Some(consumer) = consumer.and_then(|(_, c)| Arc::try_unwrap(c).ok()) {
        // Boxed: amqprs' close future would otherwise sit in the session task all along.
        Box::pin(consumer.close()).await;
    }
    reason
}

/// The session's only writer. Drops `_done` when it ends, which is how `serve` learns
/// that the socket stopped taking frames.
async fn writer(
    shared: Arc<Shared>,
    mut tx: Sender,
    out: async_channel::Receiver<Message>,
    _done: async_channel::Sender<()>,
) {
    let count = |m: Message| {
        if matches!(m, Message::Binary(_)) {
            shared.metrics.frames_out.inc();
        }
        m
    };
    let _ = transport::write_loop(&mut tx, &out, count).await;
    out.close();
}

async fn event_loop(
    events: async_channel::Receiver<Event>,
    out: async_channel::Sender<Message>,
) -> String {
    while let Ok(event) = events.recv().await {
        match event {
            Event::Directory(frame) => {
                let _ = out.send(Message::Binary(frame)).await;
            }
            Event::Close(reason) => return reason,
        }
    }
    "session registry closed".into()
}

async fn reader(
    shared: Arc<Shared>,
    agent: AgentId,
    mut rx: Receiver,
    inflight: Arc<Inflight>,
    publishes: async_channel::Sender<Pending>,
) -> String {
    let max = shared.config.max_message_bytes + FRAME_OVERHEAD;
    let sends = Arc::new(Semaphore::new(MAX_PENDING_SENDS));
    let mut quiet = transport::Quiet::new(shared.config.idle_timeout);
    loop {
        let bytes = match quiet.within(rx.next()).await {
            None => return "no frame or pong within the idle timeout".into(),
            Some(None) => return "connection closed".into(),
            Some(Some(Err(e))) => return format!("WebSocket error: {e}"),
            Some(Some(Ok(Message::Binary(b)))) => b,
            Some(Some(Ok(Message::Close(_)))) => return "agent closed the connection".into(),
            Some(Some(Ok(Message::Text(_)))) => {
                return "text frames are not part of the protocol".into()
            }
            Some(Some(Ok(_))) => continue,
        };
        shared.metrics.frames_in.inc();
        // The hot path: a `Send` is routed on its header alone and stored as it came.
        if let Some(envelope) = ClientFrame::send_envelope(&bytes) {
            let header = match Envelope::header_of(envelope, max) {
                Ok(h) => h,
                Err(e) => return format!("bad frame: {e}"),
            };
            let permit = sends.acquire_arc().await;
            let pending = Box::pin(accept(&shared, &agent, header, envelope)).await;
            if publishes.send(Pending { pending, permit }).await.is_err() {
                return "session ended".into();
            }
            continue;
        }
        let frame = match ClientFrame::decode(&bytes, max) {
            Ok(f) => f,
            Err(e) => return format!("bad frame: {e}"),
        };
        match frame {
            // Handled above; a `Send` never decodes here.
            ClientFrame::Send { .. } => {}
            ClientFrame::Ack { delivery } => {
                Box::pin(settle(&shared, &inflight, delivery, None)).await
            }
            ClientFrame::Nack { delivery, reason } => {
                Box::pin(settle(&shared, &inflight, delivery, Some(reason))).await
            }
            ClientFrame::Hello { .. } | ClientFrame::Proof { .. } => {
                return "handshake frame after the handshake".into()
            }
        }
    }
}

/// A `Send` the reader has dealt with: answered already, or waiting for RabbitMQ's confirm.
struct Pending {
    pending: Accepting,
    /// Its place under [`MAX_PENDING_SENDS`], freed once answered.
    permit: async_lock::SemaphoreGuardArc,
}

/// Where an envelope stands after [`accept`].
enum Accepting {
    /// Refused before publishing.
    Refused(ServerFrame),
    /// Handed to RabbitMQ; the answer waits for the confirm.
    Published(Box<Published>),
}

/// A publish awaiting its confirm, with what its answer and audit line need.
struct Published {
    publish: crate::broker::Publish,
    header: Header,
    bytes: usize,
    started: Instant,
    _confirming: super::outstanding::Busy,
}

/// Answers the session's publishes in the order they were made, each once RabbitMQ
/// confirmed it (confirms come in publish order, so waiting in order costs nothing).
async fn answer_confirms(
    shared: Arc<Shared>,
    confirms: async_channel::Receiver<Pending>,
    out: async_channel::Sender<Message>,
) {
    while let Ok(Pending { pending, permit }) = confirms.recv().await {
        let reply = match pending {
            Accepting::Refused(frame) => frame,
            Accepting::Published(p) => Box::pin(confirmed(&shared, *p)).await,
        };
        let _ = out.send(binary(&reply)).await;
        drop(permit);
    }
}

async fn settle(shared: &Shared, inflight: &Inflight, delivery: u64, nack: Option<String>) {
    let meta = lock(&inflight.audit).remove(&delivery);
    let Some((d, consumer)) = inflight.lookup(delivery) else {
        return log::debug!("ack/nack for unknown or stale delivery {delivery}");
    };
    let meta = meta.map(|(_, m)| m);
    shared.guard.settled(meta.as_ref(), nack.as_deref());
    let result = match &nack {
        None => {
            shared.metrics.acks.inc();
            consumer.ack(d.tag).await
        }
        Some(reason) => {
            shared.metrics.nacks.inc();
            dead_letter(shared, &consumer, &d, reason, meta.as_ref()).await
        }
    };
    if let Err(e) = result {
        // The channel is gone; RabbitMQ redelivers, and the agent drops the duplicate.
        log::warn!("could not settle delivery {delivery} with RabbitMQ: {e}");
    }
}

/// The agent says this message can never be delivered: put a copy carrying the reason in the
/// dead-letter queue, then ack the original. If the copy is not confirmed, the original is
/// returned to its queue instead (RabbitMQ counts it toward the delivery limit), so it is
/// never lost between the two.
async fn dead_letter(
    shared: &Shared,
    consumer: &Consumer,
    d: &Delivery,
    reason: &str,
    meta: Option<&Meta>,
) -> Result<(), BrokerError> {
    let id = d.message_id.as_deref().unwrap_or("without id");
    let sender = d.sender.as_deref().unwrap_or("?");
    let reason: String = reason.chars().take(300).collect();
    match shared.broker.dead_letter(d, &reason).await {
        Ok(()) => {
            log::warn!("message {id} from {sender} dead-lettered: {reason}");
            shared.metrics.dead_lettered.inc();
            shared.guard.dead_lettered(meta, &reason);
            consumer.ack(d.tag).await
        }
        Err(e) => {
            log::warn!("message {id} from {sender}: could not dead-letter it ({e}); returning it to its queue");
            consumer.nack(d.tag).await
        }
    }
}

fn reject(
    shared: &Shared,
    h: &Header,
    bytes: usize,
    code: RejectCode,
    reason: String,
) -> ServerFrame {
    shared
        .metrics
        .rejected
        .get_or_create(&[("code", code.as_str())])
        .inc();
    let why = format!("{}: {reason}", code.as_str());
    shared
        .guard
        .audit(audit::Event::Refused, h, bytes, Some(&why));
    ServerFrame::Rejected {
        id: h.id,
        code,
        reason,
    }
}

/// Validates one envelope (`body`, with header `h`) and hands it to RabbitMQ; the answer is
/// `Accepted` only once RabbitMQ confirmed it (see [`confirmed`]).
async fn accept(shared: &Shared, agent: &AgentId, h: Header, body: &[u8]) -> Accepting {
    let bytes = body.len();
    let refused = |code, reason| Accepting::Refused(reject(shared, &h, bytes, code, reason));
    if &h.sender != agent {
        let why = format!("sender {} is not the authenticated agent {agent}", h.sender);
        return refused(RejectCode::ForgedSender, why);
    }
    if !shared.directory().contains(&h.recipient) {
        let why = format!("recipient {} is not in the directory", h.recipient);
        return refused(RejectCode::UnknownRecipient, why);
    }
    let max = shared.config.max_message_bytes;
    if bytes > max {
        let why = format!("envelope of {bytes} bytes exceeds {max}");
        return refused(RejectCode::TooLarge, why);
    }
    // Receipts are exempt from the policy's rules and rates: small by construction, never
    // shown to a local service, and a sender must be able to learn of every delivery.
    let receipt = h.kind.is_receipt() && bytes <= MAX_RECEIPT_BYTES;
    if let Err((code, reason)) = match receipt {
        true => Ok(()),
        false => shared.guard.check(&shared.directory(), &h, bytes),
    } {
        return refused(code, reason);
    }
    let confirming = shared.outstanding.begin();
    let started = Instant::now();
    match shared.broker.begin_publish(&h, body.to_vec()).await {
        Ok(publish) => Accepting::Published(Box::new(Published {
            publish,
            header: h,
            bytes,
            started,
            _confirming: confirming,
        })),
        Err(e) => Accepting::Refused(refusal(shared, &h, bytes, e)),
    }
}

/// Waits for the confirm of `p`: `Accepted`, or `Rejected` with why.
async fn confirmed(shared: &Shared, p: Published) -> ServerFrame {
    let Published {
        publish,
        header: h,
        bytes,
        started,
        _confirming,
    } = p;
    match publish.confirmed().await {
        Ok(()) => {
            shared
                .metrics
                .confirm_seconds
                .observe(started.elapsed().as_secs_f64());
            shared.metrics.accepted.inc();
            shared.guard.audit(audit::Event::Accepted, &h, bytes, None);
            ServerFrame::Accepted { id: h.id }
        }
        Err(e) => refusal(shared, &h, bytes, e),
    }
}

/// The `Rejected` answer to a publish RabbitMQ did not take.
fn refusal(shared: &Shared, h: &Header, bytes: usize, e: BrokerError) -> ServerFrame {
    let code = match e {
        BrokerError::NotConnected | BrokerError::Blocked(_) => RejectCode::Unavailable,
        BrokerError::Refused(_) => RejectCode::BrokerRefused,
        _ => RejectCode::Timeout,
    };
    reject(shared, h, bytes, code, e.to_string())
}

/// Feeds the agent from its queue while the session lives, resuming after RabbitMQ
/// reconnects.
async fn pump(
    shared: Arc<Shared>,
    agent: AgentId,
    inflight: Arc<Inflight>,
    out: async_channel::Sender<Message>,
) {
    let max = shared.config.max_message_bytes + FRAME_OVERHEAD;
    let mut retry = Backoff::new(CONSUME_RETRY_MIN, CONSUME_RETRY_MAX);
    for generation in 0u64.. {
        // Resolves at once while connected, else when the broker has reconnected.
        shared.broker.connected().await;
        let consuming = shared.broker.consume(&agent, shared.config.prefetch);
        let consumer = match Box::pin(consuming).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                log::warn!("agent {agent}: cannot consume its queue yet: {e}");
                retry.wait().await;
                continue;
            }
        };
        *lock(&inflight.consumer) = Some((generation, consumer.clone()));
        while let Some(d) = consumer.next().await {
            retry.reset();
            if let Some(notice) = d.notice() {
                let forwarded = forward_notice(&inflight, generation, d, notice, &consumer, &out);
                if !Box::pin(forwarded).await {
                    return;
                }
                continue;
            }
            // Checked (and its header read) without copying the ciphertext; the frame is
            // then the stored bytes behind a short prefix, never decoded and re-encoded.
            let header = match Envelope::header_of(&d.body, max) {
                Ok(h) => h,
                Err(e) => {
                    let reason = format!("undecodable in the queue of {agent}: {e}");
                    let _ = Box::pin(dead_letter(&shared, &consumer, &d, &reason, None)).await;
                    continue;
                }
            };
            let delivery = inflight.next.fetch_add(1, Ordering::Relaxed);
            let frame = ServerFrame::encode_deliver(delivery, &d.body);
            if let Some(meta) = shared.guard.delivered(&header, d.body.len()) {
                crate::sync::lock(&inflight.audit).insert(delivery, (generation, meta));
            }
            lock(&inflight.tags).insert(delivery, (generation, d));
            shared.metrics.deliveries.inc();
            if out.send(Message::binary(frame)).await.is_err() {
                return;
            }
        }
        lock(&inflight.tags).retain(|_, (g, _)| *g != generation);
        lock(&inflight.audit).retain(|_, (g, _)| *g != generation);
        log::info!("agent {agent}: queue consumer ended; resuming when RabbitMQ is back");
        // Once the broker has retired the consumer's connection, `connected()` above is the
        // event to wait for. While the broker still counts that connection as live, either
        // RabbitMQ closed only this channel or the broker has not yet seen the loss: back
        // off before trying again, so a channel closed on every attempt cannot spin.
        let same_connection =
            shared.broker.is_connected() && shared.broker.generation() == consumer.generation();
        if same_connection {
            retry.wait().await;
        }
    }
}

/// Hands a failure notice from the agent's queue to the agent as a `Notice` frame (acked
/// like a delivery); an undecodable one is acked and dropped. `false` once the session's
/// writer is gone.
async fn forward_notice(
    inflight: &Inflight,
    generation: u64,
    d: Delivery,
    notice: Result<crate::protocol::Notice, crate::protocol::ProtocolError>,
    consumer: &Consumer,
    out: &async_channel::Sender<Message>,
) -> bool {
    let notice = match notice {
        Ok(n) => n,
        Err(e) => {
            log::warn!("dropping an undecodable failure notice: {e}");
            let _ = consumer.ack(d.tag).await;
            return true;
        }
    };
    let delivery = inflight.next.fetch_add(1, Ordering::Relaxed);
    lock(&inflight.tags).insert(delivery, (generation, d));
    let frame = ServerFrame::Notice {
        delivery,
        id: notice.id,
        recipient: notice.recipient,
        reason: notice.reason,
    };
    out.send(binary(&frame)).await.is_ok()
}
