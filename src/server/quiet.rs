//! Log lines that an attacker can cause at will (refused logins, refused connections),
//! limited to one per key (a peer address) per interval, each carrying the count of lines
//! left out since the previous one. Metrics still count every event.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often one key may log.
pub(crate) const INTERVAL: Duration = Duration::from_secs(10);

/// Keys remembered at once; beyond this, new keys share one line per interval, so a flood
/// from many addresses cannot grow the map (or the log) without bound.
const MAX_KEYS: usize = 4096;

struct Seen {
    logged_at: Instant,
    suppressed: u64,
}

/// Decides which lines to write.
pub(crate) struct Quiet<K> {
    seen: Mutex<HashMap<Option<K>, Seen>>,
}

impl<K> Default for Quiet<K> {
    fn default() -> Self {
        Self {
            seen: Mutex::default(),
        }
    }
}

impl<K: Eq + Hash + Clone> Quiet<K> {
    /// `Some(n)` when a line about `key` should be written now, `n` lines about it having
    /// been left out since the last one; `None` to leave this one out.
    pub(crate) fn allow(&self, key: &K, now: Instant) -> Option<u64> {
        let mut seen = crate::sync::lock(&self.seen);
        if seen.len() >= MAX_KEYS && !seen.contains_key(&Some(key.clone())) {
            seen.retain(|_, s| now.duration_since(s.logged_at) < INTERVAL);
        }
        let slot = match seen.len() < MAX_KEYS || seen.contains_key(&Some(key.clone())) {
            true => Some(key.clone()),
            false => None,
        };
        match seen.get_mut(&slot) {
            Some(s) if now.duration_since(s.logged_at) < INTERVAL => {
                s.suppressed += 1;
                None
            }
            Some(s) => {
                let left_out = std::mem::take(&mut s.suppressed);
                s.logged_at = now;
                Some(left_out)
            }
            None => {
                let first = Seen {
                    logged_at: now,
                    suppressed: 0,
                };
                seen.insert(slot, first);
                Some(0)
            }
        }
    }
}

/// " (N similar lines left out)" when `n` > 0, for the end of a line.
pub(crate) fn left_out(n: u64) -> String {
    match n {
        0 => String::new(),
        n => format!(" ({n} similar lines left out in the last {INTERVAL:?} or more)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_key_per_interval_with_the_count() {
        let q = Quiet::default();
        let t0 = Instant::now();
        assert_eq!(q.allow(&1, t0), Some(0));
        for _ in 0..5 {
            assert_eq!(q.allow(&1, t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(q.allow(&2, t0), Some(0), "keys are independent");
        assert_eq!(q.allow(&1, t0 + INTERVAL), Some(5));
        assert_eq!(q.allow(&1, t0 + INTERVAL), None);
    }

    #[test]
    fn many_keys_share_one_line_instead_of_growing_the_map() {
        let q = Quiet::default();
        let t0 = Instant::now();
        for k in 0..MAX_KEYS {
            assert_eq!(q.allow(&k, t0), Some(0));
        }
        assert_eq!(q.allow(&usize::MAX, t0), Some(0));
        assert_eq!(q.allow(&(usize::MAX - 1), t0), None);
        assert!(crate::sync::lock(&q.seen).len() <= MAX_KEYS + 1);
        // Once the old keys have aged out, they make room again.
        assert_eq!(q.allow(&(usize::MAX - 2), t0 + INTERVAL), Some(0));
        assert!(crate::sync::lock(&q.seen).len() <= 2);
    }
}
