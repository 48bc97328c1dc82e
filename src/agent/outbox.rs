//! The outbox: sends waiting for the server's answer, and the one place that changes them.
//!
//! The API puts a sealed envelope in with [`Outbox::begin`] and waits on the receiver it
//! gets back; the link settles it when the server answers, and after a reconnect sends every
//! waiting envelope again, oldest first. Memory only for now; the narrow API is what a
//! durable outbox will have to keep.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use crate::protocol::{ClientFrame, Envelope, MessageId, RejectCode};
use crate::sync::lock;

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

/// The sends waiting for the server's answer, by message id.
#[derive(Default)]
pub(super) struct Outbox {
    waiting: Mutex<Waiting>,
}

impl Outbox {
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
