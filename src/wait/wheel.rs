//! Long deadlines without a timer each: waiters park on a shared slot of [`SLOT`], and one
//! ticker task, running only while any slot is pending, wakes each slot once it has passed.
//!
//! Why: arming an async-io timer wakes the reactor (an eventfd write, one more `epoll_wait`
//! and a timerfd reset), which per message cost more than the work around it — the relay
//! arms one for every publish's confirm, the agent for every send and request. A
//! safety-net deadline of seconds does not need that precision: a slot fires at or after
//! its deadline, at most [`SLOT_MS`] (plus scheduling) late, and never early.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use event_listener::Event;

use crate::sync::lock;

/// The wheel's resolution (a slot), in milliseconds.
const SLOT_MS: u64 = 100;

struct Wheel {
    /// Slot `n` covers deadlines in `(epoch + (n-1)·SLOT, epoch + n·SLOT]`.
    epoch: Instant,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    slots: BTreeMap<u64, Arc<Event>>,
    /// Whether the ticker task is running; changed only with `slots` locked.
    ticking: bool,
}

static WHEEL: LazyLock<Wheel> = LazyLock::new(|| Wheel {
    epoch: Instant::now(),
    state: Mutex::default(),
});

/// Resolves at or after `deadline` (at most about [`SLOT_MS`] after it).
pub(super) async fn until(deadline: Instant) {
    let wheel = &*WHEEL;
    let slot = wheel.slot_ending_at_or_after(deadline);
    let listener = {
        let mut state = lock(&wheel.state);
        let event = state.slots.entry(slot).or_default().clone();
        // Listening with the lock held: the ticker removes and notifies a slot under the
        // same lock, so no wake-up falls between the two.
        let listener = event.listen();
        if !state.ticking {
            state.ticking = true;
            crate::runtime::spawn(tick()).detach();
        }
        listener
    };
    listener.await;
}

impl Wheel {
    fn slot_ending_at_or_after(&self, deadline: Instant) -> u64 {
        let since = deadline.saturating_duration_since(self.epoch);
        u64::try_from(since.as_millis().div_ceil(u128::from(SLOT_MS))).unwrap_or(u64::MAX)
    }

    /// The last slot that has fully passed at `now`.
    fn passed_at(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.epoch);
        u64::try_from(since.as_millis() / u128::from(SLOT_MS)).unwrap_or(u64::MAX)
    }
}

/// Wakes every passed slot at each slot boundary; ends when no slot is left.
async fn tick() {
    let wheel = &*WHEEL;
    loop {
        let next = wheel.passed_at(Instant::now()) + 1;
        let boundary = wheel.epoch + Duration::from_millis(next.saturating_mul(SLOT_MS));
        super::timer_at(boundary).await;
        let passed = wheel.passed_at(Instant::now());
        let mut state = lock(&wheel.state);
        let pending = state.slots.split_off(&(passed + 1));
        let due = std::mem::replace(&mut state.slots, pending);
        let done = state.slots.is_empty();
        state.ticking = !done;
        drop(state);
        for event in due.into_values() {
            event.notify(usize::MAX);
        }
        if done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLOT: Duration = Duration::from_millis(SLOT_MS);

    #[test]
    fn deadlines_fire_in_order_never_early_and_about_a_slot_late_at_most() {
        smol::block_on(async {
            let start = Instant::now();
            let waits = [150u64, 20, 420, 0];
            let fired = futures_util::future::join_all(waits.iter().map(|ms| async move {
                let deadline = start + Duration::from_millis(*ms);
                until(deadline).await;
                (deadline, Instant::now())
            }))
            .await;
            for (deadline, at) in fired {
                assert!(at >= deadline, "fired early");
                // Generous for a loaded machine; typically within one slot.
                assert!(at - deadline < SLOT * 10, "fired {:?} late", at - deadline);
            }
            // After a quiet spell (the ticker may have stopped) a new deadline still fires.
            smol::Timer::after(SLOT * 3).await;
            let deadline = Instant::now() + Duration::from_millis(50);
            until(deadline).await;
            assert!(Instant::now() >= deadline);
        });
    }
}
