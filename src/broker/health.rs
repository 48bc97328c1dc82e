//! Whether publishing works, as seen from publish outcomes, for `/readyz`.
//!
//! A connected broker can still be useless: a quorum queue without a majority, an
//! overloaded or slow disk. Then publishes get no confirm in time. After a confirm timeout
//! the server reports itself not ready until a publish is confirmed again, or until
//! [`WINDOW`] passes without another timeout (with no traffic nothing proves it healed,
//! but nothing says it is still broken either, and a server out of its load balancer gets
//! no traffic to prove it). Each change of state is logged once.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::lock;

/// How long one confirm timeout keeps the server not ready, absent a success.
pub(super) const WINDOW: Duration = Duration::from_secs(30);

#[derive(Default)]
struct State {
    /// Confirm timeouts since the last confirmed publish.
    consecutive: u32,
    last_timeout: Option<Instant>,
    /// Whether "not ready" was logged last (so each change is logged once).
    reported_failing: bool,
}

/// Publish outcomes, reduced to "are confirms arriving".
#[derive(Default)]
pub(super) struct PublishHealth {
    state: Mutex<State>,
}

impl PublishHealth {
    /// A publish was confirmed (or refused by RabbitMQ, which is also an answer).
    pub(super) fn answered(&self, now: Instant) {
        let mut state = lock(&self.state);
        state.consecutive = 0;
        state.last_timeout = None;
        report(&mut state, now);
    }

    /// A publish got no confirm in time.
    pub(super) fn timed_out(&self, now: Instant) {
        let mut state = lock(&self.state);
        state.consecutive = state.consecutive.saturating_add(1);
        state.last_timeout = Some(now);
        report(&mut state, now);
    }

    /// Why publishing looks broken at `now`, if it does.
    pub(super) fn problem(&self, now: Instant) -> Option<String> {
        let mut state = lock(&self.state);
        report(&mut state, now);
        problem(&state, now)
    }
}

fn problem(state: &State, now: Instant) -> Option<String> {
    let at = state.last_timeout?;
    let ago = now.saturating_duration_since(at);
    (ago < WINDOW).then(|| {
        format!(
            "{} publish(es) in a row got no confirm from RabbitMQ in time, the last {} s ago \
             (a queue without quorum, or RabbitMQ overloaded)",
            state.consecutive,
            ago.as_secs()
        )
    })
}

/// Logs a change of state, once.
fn report(state: &mut State, now: Instant) {
    match (problem(state, now), state.reported_failing) {
        (Some(why), false) => {
            log::warn!("not ready: {why}");
            state.reported_failing = true;
        }
        (None, true) => {
            log::info!("ready again: RabbitMQ confirms publishes (or none timed out for a while)");
            state.reported_failing = false;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_fails_until_a_success_or_the_window_passes() {
        let h = PublishHealth::default();
        let t0 = Instant::now();
        assert!(h.problem(t0).is_none());
        h.timed_out(t0);
        h.timed_out(t0 + Duration::from_secs(1));
        let why = h.problem(t0 + Duration::from_secs(2)).expect("failing");
        assert!(why.starts_with("2 publish(es)"), "{why}");
        h.answered(t0 + Duration::from_secs(3));
        assert!(h.problem(t0 + Duration::from_secs(3)).is_none());
        h.timed_out(t0 + Duration::from_secs(4));
        assert!(h.problem(t0 + Duration::from_secs(5)).is_some());
        assert!(h.problem(t0 + Duration::from_secs(4) + WINDOW).is_none());
        // A later timeout fails again, counting from the last success.
        h.timed_out(t0 + Duration::from_secs(100));
        let why = h.problem(t0 + Duration::from_secs(100)).expect("failing");
        assert!(why.starts_with("2 publish(es)"), "{why}");
    }
}
