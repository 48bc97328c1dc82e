//! The outbox: sends waiting for the server's answer, and the durable queue of sealed
//! envelopes no relay could take yet.
//!
//! [`dispatch`] is how every outgoing envelope (the API's messages, the inbox's receipts)
//! leaves: put in with [`Outbox::begin`], sent on the link, settled when the server answers
//! (after a reconnect every waiting envelope is sent again, oldest first). When there is
//! no server connection, or the relay answers `Unavailable` (RabbitMQ down), the envelope
//! is stored in the state dir instead (a durable commit: that is what `queued` promises)
//! and [`drain`] sends the stored ones in order, one at a time, once a relay takes them.
//! While anything is stored, new envelopes queue behind it, so order is kept. A stored
//! message older than the freshness window is given up as `failed` (expired).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::bodies::{check_fresh, now_ms};
use super::Agent;
use crate::protocol::{AgentId, ClientFrame, Envelope, MessageId, RejectCode};
use crate::state::Status;
use crate::sync::lock;
use crate::wait::{with_timeout, Backoff};

/// How often [`drain`] looks again when nothing woke it (a missed wake costs this much).
const DRAIN_IDLE: Duration = Duration::from_secs(1);

/// What a send ended with, as the server said it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    Accepted,
    Rejected(RejectCode, String),
}

/// A send with this id is already waiting for the server's answer.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct AlreadyPending(pub MessageId);

impl fmt::Display for AlreadyPending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "id: message {} is already being sent", self.0)
    }
}

impl std::error::Error for AlreadyPending {}

/// An outgoing message waiting for the server's answer; re-sent after a reconnect.
struct Pending {
    /// Submission order, so that re-sends keep it.
    seq: u64,
    envelope: Envelope,
    reply: async_channel::Sender<Outcome>,
}

#[derive(Default)]
struct Waiting {
    next_seq: u64,
    by_id: HashMap<MessageId, Pending>,
}

/// The sends waiting for the server's answer, by message id, and the count of stored ones.
pub(super) struct Outbox {
    waiting: Mutex<Waiting>,
    /// Envelopes in the state dir's outbox.
    stored: AtomicU64,
    /// The most that may be stored (`--outbox-max-messages`).
    max_stored: u64,
    /// Wakes [`drain`]: something was stored, or a connection came up.
    wake: (async_channel::Sender<()>, async_channel::Receiver<()>),
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new(0, 10_000)
    }
}

impl Outbox {
    /// `stored` envelopes are in the state dir already; at most `max_stored` may be.
    pub(super) fn new(stored: u64, max_stored: u64) -> Self {
        Self {
            waiting: Mutex::default(),
            stored: AtomicU64::new(stored),
            max_stored,
            wake: async_channel::bounded(1),
        }
    }

    /// Tells [`drain`] to look now (a server connection is up, or something was stored).
    pub(super) fn wake(&self) {
        let _ = self.wake.0.try_send(());
    }

    /// How many envelopes are stored in the state dir.
    pub(super) fn stored(&self) -> u64 {
        self.stored.load(Ordering::SeqCst)
    }

    /// The recipient of `id` if it is waiting for the server's answer.
    pub(super) fn recipient_of(&self, id: MessageId) -> Option<AgentId> {
        let w = lock(&self.waiting);
        w.by_id
            .get(&id)
            .map(|p| p.envelope.header().recipient.clone())
    }

    /// Takes `envelope` in; its outcome arrives on the returned receiver once settled.
    pub(super) fn begin(
        &self,
        envelope: Envelope,
    ) -> Result<async_channel::Receiver<Outcome>, AlreadyPending> {
        let id = envelope.header().id;
        let mut w = lock(&self.waiting);
        if w.by_id.contains_key(&id) {
            return Err(AlreadyPending(id));
        }
        let (reply, answer) = async_channel::bounded(1);
        let seq = w.next_seq;
        w.next_seq += 1;
        w.by_id.insert(
            id,
            Pending {
                seq,
                envelope,
                reply,
            },
        );
        Ok(answer)
    }

    /// Ends the send `id` with the server's `outcome`; an unknown id (already settled or
    /// forgotten) is ignored.
    pub(super) fn settle(&self, id: MessageId, outcome: Outcome) {
        if let Some(p) = lock(&self.waiting).by_id.remove(&id) {
            let _ = p.reply.try_send(outcome);
        }
    }

    /// Queues every waiting envelope on `frames` again, in the order they were submitted;
    /// returns how many there were.
    pub(super) fn resend(&self, frames: &async_channel::Sender<ClientFrame>) -> usize {
        let w = lock(&self.waiting);
        let mut all: Vec<&Pending> = w.by_id.values().collect();
        all.sort_unstable_by_key(|p| p.seq);
        for p in &all {
            let envelope = p.envelope.clone();
            let _ = frames.try_send(ClientFrame::Send { envelope });
        }
        all.len()
    }

    /// Drops the send `id` without an answer (its sender stopped waiting).
    pub(super) fn forget(&self, id: MessageId) {
        lock(&self.waiting).by_id.remove(&id);
    }

    /// How many sends are waiting for an answer.
    pub(super) fn len(&self) -> usize {
        lock(&self.waiting).by_id.len()
    }
}

/// What became of an envelope handed to [`dispatch`].
#[derive(Debug)]
pub(super) enum Dispatched {
    /// Durable in RabbitMQ.
    Sent,
    /// Stored in the state dir's outbox; sent when a relay can take it.
    Queued,
    /// The outbox is full (`--outbox-max-messages`).
    Full(u64),
    /// The same id is being sent right now.
    AlreadyPending,
    /// The relay refused it.
    Rejected(RejectCode, String),
    /// No answer from the server in time (it may or may not be stored).
    NoAnswer,
    /// The state dir could not store it.
    Unstorable(String),
}

/// Whether the relay will refuse this again however long one waits.
fn is_permanent(code: RejectCode) -> bool {
    matches!(
        code,
        RejectCode::ForgedSender
            | RejectCode::UnknownRecipient
            | RejectCode::TooLarge
            | RejectCode::Forbidden
    )
}

/// Why a message the relay refused for good failed, for its status.
fn refused_reason(code: RejectCode, reason: &str) -> String {
    format!("refused by the relay ({}): {reason}", code.as_str())
}

/// Sends `envelope` through the relay, or stores it when the relay cannot take it now;
/// records the message's status (receipts have none).
pub(super) async fn dispatch(agent: &Agent, envelope: Envelope) -> Dispatched {
    let h = envelope.header().clone();
    let link = agent.link();
    let answer = match agent.outbox.begin(envelope.clone()) {
        Ok(a) => a,
        Err(AlreadyPending(_)) => return Dispatched::AlreadyPending,
    };
    let link = match link {
        Some(l) if agent.outbox.stored() == 0 => l,
        _ => {
            let stored = store(agent, &envelope).await;
            agent.outbox.forget(h.id);
            return stored;
        }
    };
    let track = !h.kind.is_receipt();
    if track {
        agent.metrics.sent.inc();
    }
    // If this link has just dropped, the envelope stays in the outbox and the next link
    // sends it.
    let _ = link
        .frames
        .send(ClientFrame::Send {
            envelope: envelope.clone(),
        })
        .await;
    let waited = with_timeout(agent.config.send_timeout, answer.recv()).await;
    let outcome = waited.and_then(Result::ok);
    if outcome.is_none() {
        // Settled sends already left the outbox; one nobody waits for stops being re-sent.
        agent.outbox.forget(h.id);
    }
    match outcome {
        Some(Outcome::Accepted) => {
            if track {
                let s = &agent.statuses;
                s.set(h.id, &h.recipient, h.created_at_ms, Status::Sent, None);
            }
            Dispatched::Sent
        }
        Some(Outcome::Rejected(RejectCode::Unavailable, reason)) => {
            log::info!(
                "message {}: the relay cannot take it now ({reason}); storing it",
                h.id
            );
            store(agent, &envelope).await
        }
        Some(Outcome::Rejected(code, reason)) => {
            if track && is_permanent(code) {
                let why = Some(refused_reason(code, &reason));
                let s = &agent.statuses;
                s.set(h.id, &h.recipient, h.created_at_ms, Status::Failed, why);
            }
            Dispatched::Rejected(code, reason)
        }
        None => Dispatched::NoAnswer,
    }
}

/// Stores `envelope` durably (with its `queued` status in the same transaction).
async fn store(agent: &Agent, envelope: &Envelope) -> Dispatched {
    let stored = agent.outbox.stored();
    if stored >= agent.outbox.max_stored {
        return Dispatched::Full(stored);
    }
    let h = envelope.header();
    let record = (!h.kind.is_receipt()).then(|| {
        agent
            .statuses
            .record(&h.recipient, h.created_at_ms, Status::Queued, None)
    });
    let (state, bytes, id, r) = (
        agent.state.clone(),
        envelope.to_bytes(),
        h.id,
        record.clone(),
    );
    match smol::unblock(move || state.outbox_push(id, &bytes, r.as_ref())).await {
        Ok(_) => {
            agent.outbox.stored.fetch_add(1, Ordering::SeqCst);
            agent.outbox.wake();
            if let Some(r) = &record {
                agent.statuses.written(id, r);
            }
            Dispatched::Queued
        }
        Err(e) => {
            log::error!("cannot store message {id} in the outbox: {e}");
            Dispatched::Unstorable(e.to_string())
        }
    }
}

/// Sends the stored envelopes, oldest first, whenever a relay can take them; runs for as
/// long as the agent does.
pub(super) async fn drain(agent: Arc<Agent>) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let state = agent.state.clone();
        let first = match smol::unblock(move || state.outbox_first()).await {
            Ok(f) => f,
            Err(e) => {
                log::error!("cannot read the outbox: {e}");
                backoff.wait().await;
                continue;
            }
        };
        let Some((seq, id, bytes)) = first else {
            agent.outbox.stored.store(0, Ordering::SeqCst);
            idle(&agent).await;
            continue;
        };
        let Some(link) = agent.link() else {
            idle(&agent).await;
            continue;
        };
        match send_stored(&agent, &link, id, &bytes).await {
            Some(reason) => {
                log::debug!("stored message {id} not sent yet: {reason}");
                futures_lite::future::or(backoff.wait(), idle(&agent)).await;
            }
            None => {
                backoff.reset();
                remove(&agent, seq).await;
            }
        }
    }
}

async fn idle(agent: &Agent) {
    let _ = with_timeout(DRAIN_IDLE, agent.outbox.wake.1.recv()).await;
}

async fn remove(agent: &Agent, seq: u64) {
    let state = agent.state.clone();
    match smol::unblock(move || state.outbox_remove(seq)).await {
        Ok(()) => {
            let _ = agent
                .outbox
                .stored
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        }
        Err(e) => log::error!("cannot remove a sent message from the outbox: {e}"),
    }
}

/// Sends one stored envelope; `None` when it is done with (sent, or given up for good),
/// else why it must wait.
async fn send_stored(
    agent: &Agent,
    link: &super::Link,
    id: MessageId,
    bytes: &[u8],
) -> Option<String> {
    let envelope = match Envelope::from_bytes(bytes, usize::MAX) {
        Ok(e) => e,
        Err(e) => {
            log::error!("stored message {id} is damaged ({e}); dropping it");
            return None;
        }
    };
    let h = envelope.header().clone();
    let track = !h.kind.is_receipt();
    let fail = |reason: String| {
        if track {
            let s = &agent.statuses;
            s.set(
                h.id,
                &h.recipient,
                h.created_at_ms,
                Status::Failed,
                Some(reason),
            );
        }
    };
    if let Err(e) = check_fresh(h.created_at_ms, agent.config.message_ttl_ms, now_ms()) {
        log::warn!("message {id} expired in the outbox before a relay could take it");
        fail(format!("expired in the agent's outbox: {e}"));
        return None;
    }
    let Ok(answer) = agent.outbox.begin(envelope.clone()) else {
        return Some("the same id is being sent".into());
    };
    if track {
        agent.metrics.sent.inc();
    }
    let _ = link.frames.send(ClientFrame::Send { envelope }).await;
    let waited = with_timeout(agent.config.send_timeout, answer.recv()).await;
    match waited.and_then(Result::ok) {
        Some(Outcome::Accepted) => {
            if track {
                agent.metrics.accepted.inc();
                let s = &agent.statuses;
                s.set(h.id, &h.recipient, h.created_at_ms, Status::Sent, None);
            }
            None
        }
        Some(Outcome::Rejected(code, reason)) if is_permanent(code) => {
            log::warn!("stored message {id} refused by the relay: {reason}");
            fail(refused_reason(code, &reason));
            None
        }
        Some(Outcome::Rejected(code, reason)) => Some(format!("{}: {reason}", code.as_str())),
        None => {
            agent.outbox.forget(id);
            Some("no answer from the server in time".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::bodies::tests::header;
    use crate::crypto::SecretKey;

    fn envelope() -> Envelope {
        let key = SecretKey::generate().unwrap();
        crate::crypto::seal(&key, &key.public_key(), header(0), b"{}").unwrap()
    }

    #[test]
    fn one_send_per_id_until_settled() {
        let outbox = Outbox::default();
        let e = envelope();
        let id = e.header().id;
        let answer = outbox.begin(e.clone()).unwrap();
        assert_eq!(outbox.begin(e.clone()).unwrap_err(), AlreadyPending(id));
        assert_eq!(outbox.len(), 1);
        outbox.settle(id, Outcome::Accepted);
        assert_eq!(answer.try_recv(), Ok(Outcome::Accepted));
        assert_eq!(outbox.len(), 0);
        let _again = outbox.begin(e).unwrap();
        outbox.forget(id);
        assert_eq!(outbox.len(), 0);
    }

    #[test]
    fn resends_in_submission_order() {
        let outbox = Outbox::default();
        let sent: Vec<Envelope> = (0..20).map(|_| envelope()).collect();
        let _answers: Vec<_> = sent.iter().map(|e| outbox.begin(e.clone())).collect();
        outbox.settle(sent[3].header().id, Outcome::Accepted);
        let (frames, out) = async_channel::unbounded();
        assert_eq!(outbox.resend(&frames), 19);
        let again: Vec<MessageId> = std::iter::from_fn(|| out.try_recv().ok())
            .map(|f| match f {
                ClientFrame::Send { envelope } => envelope.header().id,
                other => panic!("unexpected frame {other:?}"),
            })
            .collect();
        let expected: Vec<MessageId> = sent
            .iter()
            .map(|e| e.header().id)
            .filter(|id| *id != sent[3].header().id)
            .collect();
        assert_eq!(again, expected);
    }
}
