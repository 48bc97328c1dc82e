//! Per-sender token buckets: the policy's `messagesPerSecond` with a `burst`.
//!
//! A bucket holds up to `burst` tokens and refills at `per_second`; a message takes one.
//! Buckets are per server instance (N instances let a sender through up to N times the
//! rate), keyed by the authenticated sender, so there is at most one per directory agent.
//! The rate is read at each take, so a reloaded policy applies to existing buckets at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Rate;
use crate::protocol::AgentId;

/// One sender's tokens as of `last`.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A bucket that starts full, so a sender's first burst always passes.
    pub fn full(rate: &Rate, now: Instant) -> Self {
        Self {
            tokens: rate.burst,
            last: now,
        }
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&mut self, rate: &Rate, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.last = now.max(self.last);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - self.tokens) / rate.per_second;
        Err(Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX))
    }
}

/// The buckets of every sender seen by this instance.
#[derive(Default)]
pub struct Limiter {
    buckets: Mutex<HashMap<AgentId, Bucket>>,
}

impl Limiter {
    /// Takes a token from `sender`'s bucket under `rate`.
    pub fn take(&self, sender: &AgentId, rate: &Rate, now: Instant) -> Result<(), Duration> {
        let mut buckets = crate::sync::lock(&self.buckets);
        match buckets.get_mut(sender) {
            Some(b) => b.take(rate, now),
            None => {
                let mut b = Bucket::full(rate, now);
                let taken = b.take(rate, now);
                buckets.insert(sender.clone(), b);
                taken
            }
        }
    }

    /// Forgets senders `keep` rejects (agents gone from the directory).
    pub fn retain(&self, keep: impl Fn(&AgentId) -> bool) {
        crate::sync::lock(&self.buckets).retain(|id, _| keep(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate {
        per_second: 2.0,
        burst: 3.0,
    };

    #[test]
    fn a_full_bucket_passes_its_burst_then_waits_for_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::full(&RATE, t0);
        for _ in 0..3 {
            assert!(b.take(&RATE, t0).is_ok());
        }
        let wait = b.take(&RATE, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Refused takes cost nothing: after the wait exactly one more passes.
        assert!(b.take(&RATE, t0 + wait).is_ok());
        assert!(b.take(&RATE, t0 + wait).is_err());
    }

    #[test]
    fn refill_is_capped_at_the_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::full(&RATE, t0);
        let later = t0 + Duration::from_secs(3600);
        let passed = (0..10).filter(|_| b.take(&RATE, later).is_ok()).count();
        assert_eq!(passed, 3);
    }

    #[test]
    fn a_clock_going_backwards_refills_nothing() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = Bucket::full(&RATE, t0);
        for _ in 0..3 {
            b.take(&RATE, t0).unwrap();
        }
        assert!(b.take(&RATE, t0 - Duration::from_secs(5)).is_err());
        assert!(b.take(&RATE, t0).is_err());
    }

    #[test]
    fn limiter_keeps_one_bucket_per_sender() {
        let l = Limiter::default();
        let (a, b) = (AgentId::new("a").unwrap(), AgentId::new("b").unwrap());
        let one = Rate {
            per_second: 1.0,
            burst: 1.0,
        };
        let t0 = Instant::now();
        assert!(l.take(&a, &one, t0).is_ok());
        assert!(l.take(&a, &one, t0).is_err());
        assert!(l.take(&b, &one, t0).is_ok(), "b has its own bucket");
        l.retain(|id| id != &a);
        assert!(l.take(&a, &one, t0).is_ok(), "a forgotten, starts full");
    }
}
