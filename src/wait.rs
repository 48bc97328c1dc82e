//! Waiting with limits: a deadline around any future, and a jittered exponential backoff.
//!
//! Every retry loop in DMR (the broker's reconnects, the agent's server link, webhook
//! retries) waits through [`Backoff`], so they all grow, cap and spread the same way; every
//! "give up after" goes through [`with_timeout`].

mod wheel;

use std::future::Future;
use std::time::{Duration, Instant};

/// Limits from which [`with_timeout`] uses the shared wheel (`wait/wheel.rs`) instead of a
/// timer of its own: a second's deadline may fire a tenth of a second late.
const COARSE_FROM: Duration = Duration::from_secs(1);

/// Runs `fut` for at most `limit`; `None` when time ran out (and `fut` is dropped).
///
/// Limits of a second or more may run over by up to about 0.1 s: they share one ticker
/// instead of arming a timer each, which on the relay's hot path cost more than the work.
pub async fn with_timeout<T>(limit: Duration, fut: impl Future<Output = T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    futures_lite::future::or(async { Some(fut.await) }, async {
        sleep_until(deadline).await;
        None
    })
    .await
}

/// Resolves at `deadline`; one a second or more away may resolve up to about 0.1 s late
/// (see [`with_timeout`]).
pub async fn sleep_until(deadline: Instant) {
    if deadline.saturating_duration_since(Instant::now()) >= COARSE_FROM {
        wheel::until(deadline).await;
    } else {
        timer_at(deadline).await;
    }
}

/// Sleeps for `duration` on this thread's reactor, to the millisecond (no wheel): for
/// short, frequent waits such as backoff steps and flush intervals.
pub async fn sleep(duration: Duration) {
    timer_at(Instant::now() + duration).await;
}

/// Resolves at `deadline` on this thread's reactor: tokio's inside a tokio runtime (both
/// binaries), where an async-io timer would be kept by async-io's own thread and wake the
/// runtime's thread from there, a cross-thread hop per timer; async-io's elsewhere.
async fn timer_at(deadline: Instant) {
    if crate::runtime::on_tokio() {
        tokio::time::sleep_until(deadline.into()).await;
    } else {
        async_io::Timer::at(deadline).await;
    }
}

/// A tick every period on this thread's reactor (see [`sleep`]): one timer for a
/// connection's life instead of one per frame, as pings and idle checks use it. The first
/// tick comes one period after the start; a late tick delays the ones after it.
pub struct Ticker(Ticks);

enum Ticks {
    AsyncIo(async_io::Timer),
    Tokio(tokio::time::Interval),
}

impl Ticker {
    pub fn every(period: Duration) -> Self {
        if crate::runtime::on_tokio() {
            let start = tokio::time::Instant::now() + period;
            let mut ticks = tokio::time::interval_at(start, period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            Self(Ticks::Tokio(ticks))
        } else {
            Self(Ticks::AsyncIo(async_io::Timer::interval(period)))
        }
    }

    /// Waits for the next tick. Dropping the wait loses no tick: the next call gets it.
    pub async fn tick(&mut self) {
        use futures_lite::StreamExt;
        match &mut self.0 {
            Ticks::AsyncIo(timer) => {
                timer.next().await;
            }
            Ticks::Tokio(interval) => {
                interval.tick().await;
            }
        }
    }
}

/// Exponential backoff: `min` doubled per consecutive failure up to `max`, each wait shortened
/// by up to a quarter at random so that many peers retrying after the same outage spread out.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// A backoff that starts at `min` and never waits longer than `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// The wait before the next attempt; each call counts one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let capped = self
            .min
            .saturating_mul(1u32 << self.failures.min(16))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        capped.mul_f64(1.0 - fastrand::f64() * 0.25)
    }

    /// Sleeps for [`Backoff::next_delay`].
    pub async fn wait(&mut self) {
        sleep(self.next_delay()).await;
    }

    /// Starts over from `min` after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_bounded_jitter_and_resets() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut b = Backoff::new(min, max);
        let first = b.next_delay();
        assert!(first <= min && first >= min.mul_f64(0.75), "{first:?}");
        for _ in 0..40 {
            let d = b.next_delay();
            assert!(d <= max && d >= min.mul_f64(0.75), "{d:?}");
        }
        let late = b.next_delay();
        assert!(
            late >= max.mul_f64(0.75),
            "capped waits stay near the cap: {late:?}"
        );
        b.reset();
        assert_eq!(b.failures(), 0);
        assert!(b.next_delay() <= min);
    }

    #[test]
    fn with_timeout_gives_up_and_passes_results_through() {
        smol::block_on(async {
            let slow = with_timeout(Duration::from_millis(10), async {
                async_io::Timer::after(Duration::from_secs(5)).await;
            });
            assert_eq!(slow.await, None);
            assert_eq!(
                with_timeout(Duration::from_secs(5), async { 7 }).await,
                Some(7)
            );
            // A limit of a second or more takes the shared wheel: never early.
            let started = Instant::now();
            let never = std::future::pending::<()>();
            assert_eq!(with_timeout(COARSE_FROM, never).await, None);
            assert!(started.elapsed() >= COARSE_FROM);
        });
    }

    /// The ticks, and short sleeps, on both reactors: tokio's inside a tokio runtime (the
    /// binaries), async-io's elsewhere. None comes early; a tick whose wait was dropped is
    /// not lost.
    #[test]
    fn tickers_and_sleeps_keep_time_on_either_reactor() {
        let period = Duration::from_millis(30);
        let check = || async move {
            let started = Instant::now();
            let mut ticker = Ticker::every(period);
            ticker.tick().await;
            assert!(started.elapsed() >= period);
            // A wait given up before the tick came: the tick is still there afterwards.
            assert!(with_timeout(Duration::from_millis(1), ticker.tick())
                .await
                .is_none());
            ticker.tick().await;
            assert!(started.elapsed() >= 2 * period);
            let slept = Instant::now();
            sleep(period).await;
            assert!(slept.elapsed() >= period);
            crate::runtime::on_tokio()
        };
        assert!(!smol::block_on(check()));
        let tokio = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        assert!(tokio.block_on(check()));
    }
}
