//! The replay guard: which (sender, message id) pairs reached the local service, so a
//! redelivery from RabbitMQ (at-least-once) or a replayed envelope never reaches it twice —
//! also after a crash or a restart, because the record is in the state dir
//! ([`crate::state`]) and is durable before the agent acks.
//!
//! A durable commit costs a disk sync (≈ 2 ms), so records are group-committed: the
//! [`record`] task takes every record waiting on its channel, commits them in one
//! transaction on a blocking thread, then wakes each waiting delivery, which only then
//! sends its `Ack`. Under load a commit carries many records; alone, one.
//!
//! Entries are kept while a copy could still pass the freshness check (`--message-ttl`
//! plus clock skew; older copies are refused as stale anyway): [`expire`] removes older ones
//! every minute, so the store does not grow with traffic.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::bodies::{now_ms, CLOCK_SKEW_MS};
use super::Agent;
use crate::protocol::{AgentId, MessageId};
use crate::state::{ReplayVerdict, State, StateError};
use crate::wait::Backoff;

/// How often delivered records past the window are removed.
const EXPIRE_EVERY: Duration = Duration::from_secs(60);
/// Records committed in one transaction at most (a bound on one commit's time).
const MAX_BATCH: usize = 4096;
/// Shortest time between two commits under steady traffic. Each commit syncs the disk,
/// which one message at a time paid in full (≈ 0.1 ms of CPU, most of a delivery's; at
/// 5 ms a steady stream of one message at a time still spent a quarter of the
/// recipient's CPU on commits); a message that finds the recorder idle is committed at
/// once, so this costs latency only to acks under steady traffic, never to the webhook,
/// which has the message already.
const MIN_COMMIT_GAP: Duration = Duration::from_millis(20);
/// Records that end a commit's gathering before [`MIN_COMMIT_GAP`]: half the server's
/// default prefetch (64), so acks held for a commit never stall the agent's delivery
/// window under load.
const COMMIT_EARLY_AT: usize = 32;

/// One delivery waiting for its record to be durable.
struct Pending {
    sender: AgentId,
    id: MessageId,
    created_at_ms: u64,
    done: async_channel::Sender<Result<(), String>>,
}

/// The deliveries' side of the group commit.
pub(super) struct Recorder {
    state: Arc<State>,
    tx: async_channel::Sender<Pending>,
    rx: async_channel::Receiver<Pending>,
}

impl Recorder {
    pub(super) fn new(state: Arc<State>) -> Self {
        let (tx, rx) = async_channel::unbounded();
        Self { state, tx, rx }
    }

    /// Marks (sender, id) as being delivered by the caller, first waiting out another
    /// copy's attempt; `Ok(false)` when a copy was delivered already (so this one is only
    /// acknowledged).
    pub(super) async fn claim(&self, sender: &AgentId, id: MessageId) -> Result<bool, StateError> {
        // A copy in flight ends within one webhook attempt cycle; checking again with a
        // growing pause keeps this cheap without a wake-up per message.
        let mut busy = Backoff::new(Duration::from_millis(20), Duration::from_secs(1));
        loop {
            match self.state.check_and_mark_in_flight(sender, id)? {
                ReplayVerdict::Fresh => return Ok(true),
                ReplayVerdict::Delivered => return Ok(false),
                ReplayVerdict::Busy => busy.wait().await,
            }
        }
    }

    /// Ends an attempt that did not deliver (the message comes again, or is dead-lettered).
    pub(super) fn release(&self, sender: &AgentId, id: MessageId) {
        self.state.release(sender, id);
    }

    /// Records (sender, id) as delivered; returns once the record is on disk.
    pub(super) async fn delivered(
        &self,
        sender: &AgentId,
        id: MessageId,
        created_at_ms: u64,
    ) -> Result<(), String> {
        let (done, wait) = async_channel::bounded(1);
        let pending = Pending {
            sender: sender.clone(),
            id,
            created_at_ms,
            done,
        };
        if self.tx.send(pending).await.is_err() {
            self.state.release(sender, id);
            return Err("the agent is stopping".into());
        }
        wait.recv()
            .await
            .unwrap_or_else(|_| Err("the agent is stopping".into()))
    }
}

/// The group-commit loop; runs for the agent's lifetime.
pub(super) async fn record(agent: Arc<Agent>) {
    group_commit(&agent.recorder).await
}

async fn group_commit(recorder: &Recorder) {
    let mut last_commit: Option<Instant> = None;
    while let Ok(first) = recorder.rx.recv().await {
        let mut batch = vec![first];
        let not_before = last_commit.map_or_else(Instant::now, |t| t + MIN_COMMIT_GAP);
        gather(&recorder.rx, &mut batch, not_before).await;
        last_commit = Some(Instant::now());
        let items: Vec<_> = batch
            .iter()
            .map(|p| (p.sender.clone(), p.id, p.created_at_ms))
            .collect();
        let state = recorder.state.clone();
        let result = smol::unblock(move || state.record_delivered_all(&items))
            .await
            .map_err(|e| e.to_string());
        if let Err(e) = &result {
            log::error!(
                "cannot record {} delivered messages in the state dir, leaving them unacknowledged \
                 (RabbitMQ will deliver them again, and the local service may see them twice): {e}",
                batch.len()
            );
        }
        for p in batch {
            let _ = p.done.try_send(result.clone());
        }
    }
}

/// Adds to `batch` what is waiting and, until `not_before` (only when commits have been
/// coming faster than [`MIN_COMMIT_GAP`]) or [`COMMIT_EARLY_AT`] records, what arrives
/// meanwhile.
async fn gather(
    rx: &async_channel::Receiver<Pending>,
    batch: &mut Vec<Pending>,
    not_before: Instant,
) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(p) => batch.push(p),
            Err(_) => break,
        }
    }
    let limit = not_before.saturating_duration_since(Instant::now());
    if limit.is_zero() {
        return;
    }
    let more = async {
        while batch.len() < COMMIT_EARLY_AT {
            match rx.recv().await {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
    };
    crate::wait::with_timeout(limit, more).await;
}

/// Removes delivered records older than the freshness window, every minute.
pub(super) async fn expire(agent: Arc<Agent>) {
    let window = agent
        .config
        .message_ttl_ms
        .saturating_add(2 * CLOCK_SKEW_MS);
    loop {
        async_io::Timer::after(EXPIRE_EVERY).await;
        let state = agent.state.clone();
        let older_than = now_ms().saturating_sub(window);
        match smol::unblock(move || state.expire(older_than)).await {
            Ok(0) => {}
            Ok(n) => log::debug!("replay guard: forgot {n} deliveries past the window"),
            Err(e) => log::error!("replay guard: cannot expire old records: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_records_are_committed_and_claims_see_them() {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(State::open(dir.path()).unwrap());
        let recorder = Arc::new(Recorder::new(state.clone()));
        let sender = AgentId::new("s").unwrap();
        let ids: Vec<_> = (0..20).map(|_| MessageId::random()).collect();
        smol::block_on(async {
            let r = recorder.clone();
            let committer = smol::spawn(async move { group_commit(&r).await });
            let tasks: Vec<_> = ids
                .iter()
                .map(|&id| {
                    let (r, s) = (recorder.clone(), sender.clone());
                    smol::spawn(async move {
                        assert!(r.claim(&s, id).await.unwrap());
                        r.delivered(&s, id, now_ms()).await
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            drop(committer);
            for &id in &ids {
                assert!(!recorder.claim(&sender, id).await.unwrap());
            }
        });
        assert_eq!(state.delivered_len().unwrap(), 20);
    }
}
