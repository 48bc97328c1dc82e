//! The replay guard: remembers which message ids were delivered to the local service, so a
//! redelivery from RabbitMQ (at-least-once) or a replayed envelope never reaches it twice.
//!
//! Memory only: ids are kept for the queue TTL plus clock skew, which is as long as
//! RabbitMQ can hold a copy. A crash between the webhook's 2xx and the `Ack` can still
//! repeat one message after restart; the webhook body's `id` lets the service drop it.

use std::collections::{HashMap, VecDeque};

use crate::protocol::MessageId;

/// What to do with an incoming id.
#[derive(Debug)]
pub(super) enum Verdict {
    /// Never seen: deliver it (the id is now marked busy).
    Fresh,
    /// Already delivered: just acknowledge.
    Delivered,
    /// Another copy is being delivered right now: wait for [`Attempt::finished`], then ask
    /// again.
    Busy(Attempt),
}

/// A delivery attempt in progress, as seen by a copy waiting for it to end.
#[derive(Debug)]
pub(super) struct Attempt(async_channel::Receiver<()>);

impl Attempt {
    /// Resolves once the attempt has finished, delivered or not.
    pub(super) async fn finished(self) {
        // Nothing is ever sent: `recv` returns when `Guard::finish` drops the sender.
        let _ = self.0.recv().await;
    }
}

/// An attempt's two channel ends: the sender is dropped when it finishes, which wakes
/// every waiting copy.
type InFlight = (async_channel::Sender<()>, async_channel::Receiver<()>);

/// Ids delivered within the window, and ids being delivered now.
#[derive(Default)]
pub(super) struct Guard {
    delivered: HashMap<MessageId, u64>,
    order: VecDeque<(u64, MessageId)>,
    busy: HashMap<MessageId, InFlight>,
}

impl Guard {
    /// Classifies `id`; a `Fresh` id is marked busy until [`Guard::finish`].
    pub(super) fn begin(&mut self, id: MessageId, now_ms: u64) -> Verdict {
        self.expire(now_ms);
        if self.delivered.contains_key(&id) {
            return Verdict::Delivered;
        }
        if let Some((_, wait)) = self.busy.get(&id) {
            return Verdict::Busy(Attempt(wait.clone()));
        }
        self.busy.insert(id, async_channel::bounded(1));
        Verdict::Fresh
    }

    /// Ends a delivery attempt; a delivered id is remembered until `keep_until_ms`.
    pub(super) fn finish(&mut self, id: MessageId, delivered: bool, keep_until_ms: u64) {
        self.busy.remove(&id);
        if delivered && self.delivered.insert(id, keep_until_ms).is_none() {
            self.order.push_back((keep_until_ms, id));
        }
    }

    fn expire(&mut self, now_ms: u64) {
        while let Some(&(until, id)) = self.order.front() {
            if until > now_ms {
                break;
            }
            self.order.pop_front();
            self.delivered.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivered_ids_are_remembered_until_their_window_ends() {
        let mut g = Guard::default();
        let id = MessageId::random();
        assert!(matches!(g.begin(id, 0), Verdict::Fresh));
        let Verdict::Busy(attempt) = g.begin(id, 1) else {
            panic!("a second copy must wait for the first")
        };
        let mut waiting = Box::pin(attempt.finished());
        let early = smol::block_on(futures_lite::future::poll_once(&mut waiting));
        assert!(
            early.is_none(),
            "the copy must wait while the first is in flight"
        );
        g.finish(id, true, 100);
        smol::block_on(waiting);
        assert!(matches!(g.begin(id, 99), Verdict::Delivered));
        assert!(matches!(g.begin(id, 100), Verdict::Fresh));
    }

    #[test]
    fn failed_attempts_are_forgotten() {
        let mut g = Guard::default();
        let id = MessageId::random();
        assert!(matches!(g.begin(id, 0), Verdict::Fresh));
        g.finish(id, false, 100);
        assert!(matches!(g.begin(id, 1), Verdict::Fresh));
        assert!(g.delivered.is_empty());
    }
}
