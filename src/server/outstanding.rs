//! The work a clean stop waits for: open sessions and publishes awaiting a confirm.
//!
//! Each piece of work holds a [`Busy`] guard; the last guard dropped wakes the stop, so
//! shutdown waits on that event rather than checking a counter on a timer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use event_listener::Event;

/// A count of work in progress, with an event for when it reaches zero.
#[derive(Default)]
pub(crate) struct Outstanding(Arc<Count>);

#[derive(Default)]
struct Count {
    count: AtomicU64,
    /// Notified each time `count` drops to zero.
    idle: Event,
}

/// One piece of work counted in an [`Outstanding`] until dropped. It owns its share of
/// the count, so it can travel with the work (a publish handed from task to task).
pub(crate) struct Busy(Arc<Count>);

impl Outstanding {
    /// Counts one piece of work until the returned guard is dropped.
    pub(crate) fn begin(&self) -> Busy {
        self.0.count.fetch_add(1, Ordering::SeqCst);
        Busy(self.0.clone())
    }

    /// Resolves once no work is in progress (at once if none is).
    pub(crate) async fn finished(&self) {
        loop {
            // Listen before looking, so a drop to zero in between is not missed.
            let listener = self.0.idle.listen();
            if self.0.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            listener.await;
        }
    }

    /// Work in progress right now.
    pub(crate) fn count(&self) -> u64 {
        self.0.count.load(Ordering::SeqCst)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify(usize::MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finishes_when_the_last_guard_drops() {
        let work = Outstanding::default();
        smol::block_on(work.finished());
        let (a, b) = (work.begin(), work.begin());
        smol::block_on(async {
            let mut waiting = Box::pin(work.finished());
            assert!(futures_lite::future::poll_once(&mut waiting)
                .await
                .is_none());
            drop(a);
            assert!(futures_lite::future::poll_once(&mut waiting)
                .await
                .is_none());
            drop(b);
            waiting.await;
        });
        assert_eq!(work.count(), 0);
    }
}
