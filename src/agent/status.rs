//! Delivery status of the messages this agent sent: `queued` → `sent` → `delivered` or
//! `failed` (with a reason), what `GET /v1/messages/{id}` answers, and the `--status-url`
//! notifier that tells the local service of each change.
//!
//! Changes are kept in memory and written to the state dir in batches by [`run_writer`]
//! (one transaction per [`FLUSH_EVERY`], never a disk sync per message on the send path).
//! A crash can lose the changes of the last batch; a message whose `sent` was lost reads
//! as unknown (404) or `queued`, and its receipt, arriving later, is then ignored. Records
//! expire at a time fixed when first written (see `state::sent`).
//!
//! `--status-url` posts are made one at a time, in order, by [`run_notifier`], retried with
//! capped, jittered backoff while the local service is down (like deliveries); a permanent
//! 4xx drops that one notification. They are not durable: a restart forgets unsent ones.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::StatusCode;
use serde_json::Value;

use super::bodies::{format_timestamp, now_ms, CLOCK_SKEW_MS};
use crate::protocol::{AgentId, MessageId};
use crate::state::{State, Status, StatusRecord};
use crate::sync::lock;
use crate::wait::Backoff;

/// How often pending changes are written (at most one batch per period).
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// How often expired records are removed.
const EXPIRE_EVERY: Duration = Duration::from_secs(60);
/// Notifications waiting for `--status-url`; past this the oldest are dropped (logged).
const MAX_NOTIFICATIONS: usize = 100_000;
/// How long one `--status-url` attempt may take.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(10);
/// Records kept in memory after they were written (see [`Recent`]).
const RECENT: usize = 1024;

#[derive(Default)]
struct Cache {
    /// Changed since the last batch began.
    dirty: HashMap<MessageId, StatusRecord>,
    /// Being written now (still answered from memory until committed).
    writing: HashMap<MessageId, StatusRecord>,
    /// Written lately.
    recent: Recent,
}

impl Cache {
    /// The newest record of `id` held in memory.
    fn get(&self, id: &MessageId) -> Option<&StatusRecord> {
        (self.dirty.get(id))
            .or_else(|| self.writing.get(id))
            .or_else(|| self.recent.map.get(id))
    }
}

/// The last [`RECENT`] records written, as written: a message's next change (`sent`, then
/// `delivered`, usually within seconds) then reads memory instead of opening a redb read
/// transaction, which was one of the sender's larger costs per message.
#[derive(Default)]
struct Recent {
    map: HashMap<MessageId, StatusRecord>,
    order: VecDeque<MessageId>,
}

impl Recent {
    fn put(&mut self, id: MessageId, record: StatusRecord) {
        if self.map.insert(id, record).is_some() {
            return;
        }
        self.order.push_back(id);
        if self.order.len() > RECENT {
            if let Some(oldest) = self.order.pop_front() {
                self.map.remove(&oldest);
            }
        }
    }
}

/// The statuses of sent messages, shared by the API, the link and the inbox.
pub(super) struct Statuses {
    state: Arc<State>,
    ttl_ms: u64,
    cache: std::sync::Mutex<Cache>,
    wake: (async_channel::Sender<()>, async_channel::Receiver<()>),
    notify: Option<async_channel::Sender<Bytes>>,
    notifications: async_channel::Receiver<Bytes>,
}

impl Statuses {
    /// `ttl_ms` is the freshness window; `notify` whether `--status-url` is set.
    pub(super) fn new(state: Arc<State>, ttl_ms: u64, notify: bool) -> Self {
        // Unbounded, capped by hand in `notify`: a bounded channel allocates all its slots
        // up front (4 MB here), even for an agent without `--status-url`.
        let (tx, rx) = async_channel::unbounded();
        Self {
            state,
            ttl_ms,
            cache: Default::default(),
            wake: async_channel::bounded(1),
            notify: notify.then_some(tx),
            notifications: rx,
        }
    }

    /// The record of `id`: memory first, then the state dir.
    pub(super) fn get(&self, id: MessageId) -> Option<StatusRecord> {
        if let Some(r) = lock(&self.cache).get(&id) {
            return Some(r.clone());
        }
        self.state.status(id).unwrap_or_else(|e| {
            log::warn!("cannot read the status of message {id}: {e}");
            None
        })
    }

    /// A new record for a message created at `created_at_ms` (durable writes of `queued`
    /// go with the outbox entry, see `outbox`).
    pub(super) fn record(
        &self,
        recipient: &AgentId,
        created_at_ms: u64,
        status: Status,
        reason: Option<String>,
    ) -> StatusRecord {
        let keep = self
            .ttl_ms
            .saturating_mul(2)
            .saturating_add(2 * CLOCK_SKEW_MS);
        StatusRecord {
            recipient: recipient.clone(),
            status,
            reason,
            updated_at_ms: now_ms(),
            expires_at_ms: created_at_ms.max(now_ms()).saturating_add(keep),
        }
    }

    /// Records a message's first status (or a later one, if the transition is allowed).
    pub(super) fn set(
        &self,
        id: MessageId,
        recipient: &AgentId,
        created_at_ms: u64,
        status: Status,
        reason: Option<String>,
    ) {
        let fresh = self.record(recipient, created_at_ms, status, reason);
        self.change(id, |old| match old {
            None => Some(fresh),
            Some(old) => old.status.may_become(status).then_some(StatusRecord {
                expires_at_ms: old.expires_at_ms,
                ..fresh
            }),
        });
    }

    /// A record written durably elsewhere (with an outbox entry): kept in memory for its
    /// next change, and notified.
    pub(super) fn written(&self, id: MessageId, record: &StatusRecord) {
        lock(&self.cache).recent.put(id, record.clone());
        self.notify(id, record);
    }

    /// The recipient's authenticated receipt: `id` was delivered, if `from` is whom it
    /// was sent to. Returns whether it matched a message this agent sent.
    pub(super) fn delivered(&self, id: MessageId, from: &AgentId) -> bool {
        self.update_existing(id, from, Status::Delivered, None)
    }

    /// The relay says `id` to `recipient` failed (not authenticated: never overrides a
    /// delivery).
    pub(super) fn failed_notice(&self, id: MessageId, recipient: &AgentId, reason: String) -> bool {
        self.update_existing(id, recipient, Status::Failed, Some(reason))
    }

    fn update_existing(
        &self,
        id: MessageId,
        recipient: &AgentId,
        status: Status,
        reason: Option<String>,
    ) -> bool {
        let mut matched = false;
        self.change(id, |old| {
            let old = old.filter(|o| &o.recipient == recipient)?;
            matched = true;
            old.status.may_become(status).then(|| StatusRecord {
                status,
                reason,
                updated_at_ms: now_ms(),
                ..old
            })
        });
        matched
    }

    /// Applies `f` to the current record; a `Some` result is the new record.
    fn change(&self, id: MessageId, f: impl FnOnce(Option<StatusRecord>) -> Option<StatusRecord>) {
        let mut cache = lock(&self.cache);
        let current = match cache.get(&id) {
            Some(r) => Some(r.clone()),
            // A short read transaction; done under the lock so two changes to one id
            // cannot interleave.
            None => self.state.status(id).ok().flatten(),
        };
        let Some(next) = f(current) else {
            return;
        };
        cache.dirty.insert(id, next.clone());
        drop(cache);
        let _ = self.wake.0.try_send(());
        self.notify(id, &next);
    }

    fn notify(&self, id: MessageId, r: &StatusRecord) {
        // Trace, not debug: one line per message and change is the busiest log there is.
        log::trace!("message {id} to {}: {}", r.recipient, r.status);
        let Some(tx) = &self.notify else { return };
        let mut body = serde_json::json!({
            "id": id.to_string(),
            "recipientId": r.recipient,
            "status": r.status.as_str(),
            "timestamp": format_timestamp(r.updated_at_ms),
        });
        if let Some(reason) = &r.reason {
            body["reason"] = reason.clone().into();
        }
        let body = Bytes::from(body.to_string());
        if tx.len() >= MAX_NOTIFICATIONS {
            log::warn!("--status-url is not keeping up: dropping the oldest status notification");
            let _ = self.notifications.try_recv();
        }
        let _ = tx.try_send(body);
    }

    /// Writes the changes made since the last batch in one transaction.
    async fn flush(&self) {
        let batch: Vec<(MessageId, StatusRecord)> = {
            let mut cache = lock(&self.cache);
            let dirty = std::mem::take(&mut cache.dirty);
            cache.writing.extend(dirty);
            cache.writing.iter().map(|(k, v)| (*k, v.clone())).collect()
        };
        if batch.is_empty() {
            return;
        }
        let state = self.state.clone();
        let result = smol::unblock(move || state.write_statuses(&batch)).await;
        let mut cache = lock(&self.cache);
        match result {
            Ok(()) => {
                let written = std::mem::take(&mut cache.writing);
                for (id, record) in written {
                    cache.recent.put(id, record);
                }
            }
            // Kept in `writing` and written with the next batch.
            Err(e) => log::warn!("cannot write message statuses (will retry): {e}"),
        }
    }
}

/// The JSON `GET /v1/messages/{id}` answers.
pub(super) fn to_json(id: MessageId, r: &StatusRecord) -> Value {
    let mut v = serde_json::json!({
        "id": id.to_string(),
        "recipientId": r.recipient,
        "status": r.status.as_str(),
        "updatedAt": format_timestamp(r.updated_at_ms),
    });
    if let Some(reason) = &r.reason {
        v["reason"] = reason.clone().into();
    }
    v
}

/// What this agent knows of `id` as the JSON `GET /v1/messages/{id}` answers: its record,
/// or `queued` while it waits for the server's first answer.
pub(super) fn lookup(agent: &super::Agent, id: MessageId) -> Option<Value> {
    if let Some(r) = agent.statuses.get(id) {
        return Some(to_json(id, &r));
    }
    let recipient = agent.outbox.recipient_of(id)?;
    Some(serde_json::json!({
        "id": id.to_string(),
        "recipientId": recipient,
        "status": Status::Queued.as_str(),
        "updatedAt": format_timestamp(now_ms()),
    }))
}

/// `GET /v1/messages/{id}`.
pub(super) fn get(agent: &super::Agent, id: &str) -> hyper::Response<crate::http::Body> {
    let Ok(uuid) = uuid::Uuid::parse_str(id) else {
        let e = format!("id: {id:?} is not a message id (UUID)");
        return crate::http::error(StatusCode::BAD_REQUEST, e);
    };
    match lookup(agent, MessageId(uuid)) {
        Some(v) => crate::http::json(StatusCode::OK, &v),
        None => crate::http::error(
            StatusCode::NOT_FOUND,
            format!("this agent has no record of sending message {uuid} (never sent, or its status expired)"),
        ),
    }
}

/// Writes status changes in batches and expires old records, for as long as the agent runs.
pub(super) async fn run_writer(statuses: Arc<Statuses>, stop: async_channel::Receiver<()>) {
    let mut last_expiry = std::time::Instant::now();
    loop {
        let woken =
            futures_lite::future::or(async { statuses.wake.1.recv().await.is_ok() }, async {
                stop.recv().await.is_ok()
            })
            .await;
        crate::wait::sleep(FLUSH_EVERY).await;
        statuses.flush().await;
        if last_expiry.elapsed() >= EXPIRE_EVERY {
            last_expiry = std::time::Instant::now();
            let state = statuses.state.clone();
            match smol::unblock(move || state.expire_statuses(now_ms())).await {
                Ok(n) if n > 0 => log::debug!("forgot {n} expired message statuses"),
                Ok(_) => {}
                Err(e) => log::warn!("cannot expire message statuses: {e}"),
            }
        }
        if !woken || stop.is_closed() {
            statuses.flush().await;
            return;
        }
    }
}

/// Final flush at a clean stop.
pub(super) async fn flush(statuses: &Statuses) {
    statuses.flush().await;
}

/// Posts status changes to `--status-url`, in order, riding out outages of the service.
pub(super) async fn run_notifier(
    statuses: Arc<Statuses>,
    client: crate::http::Client,
    url: hyper::Uri,
    retry_max: Duration,
) {
    let rx = statuses.notifications.clone();
    drop(statuses);
    let mut down = false;
    while let Ok(body) = rx.recv().await {
        let mut backoff = Backoff::new(Duration::from_millis(250), retry_max);
        loop {
            match post(&client, &url, body.clone()).await {
                Ok(()) => break,
                Err(Some(status)) if is_permanent(status) => {
                    log::warn!("--status-url {url} refused a status notification with {status}; dropping it");
                    break;
                }
                Err(why) => {
                    if !down {
                        let why = why.map_or("no answer".to_owned(), |s| s.to_string());
                        log::warn!("--status-url {url} is failing ({why}); retrying");
                        down = true;
                    }
                    backoff.wait().await;
                }
            }
        }
        if std::mem::take(&mut down) {
            log::info!("--status-url {url} answers again");
        }
    }
}

fn is_permanent(s: StatusCode) -> bool {
    matches!(
        s,
        StatusCode::BAD_REQUEST
            | StatusCode::NOT_FOUND
            | StatusCode::GONE
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::UNPROCESSABLE_ENTITY
    )
}

/// One attempt: `Err(Some(status))` for a non-2xx answer, `Err(None)` for none.
async fn post(
    client: &crate::http::Client,
    url: &hyper::Uri,
    body: Bytes,
) -> Result<(), Option<StatusCode>> {
    let req = hyper::Request::post(url.clone())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|_| None)?;
    match client.request(req, NOTIFY_TIMEOUT).await {
        Ok((s, _)) if s.is_success() => Ok(()),
        Ok((s, _)) => Err(Some(s)),
        Err(_) => Err(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_follow_the_lifecycle_and_reach_the_disk_in_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(State::open(dir.path()).unwrap());
        let s = Statuses::new(state.clone(), 60_000, true);
        let (id, tax, other) = (
            MessageId::random(),
            AgentId::new("tax").unwrap(),
            AgentId::new("other").unwrap(),
        );
        s.set(id, &tax, now_ms(), Status::Sent, None);
        assert!(
            !s.delivered(id, &other),
            "only the recipient's receipt counts"
        );
        assert!(s.failed_notice(id, &tax, "expired".into()));
        assert_eq!(s.get(id).unwrap().status, Status::Failed);
        assert!(s.delivered(id, &tax));
        assert!(s.failed_notice(id, &tax, "late".into()));
        let r = s.get(id).unwrap();
        assert_eq!((r.status, r.reason), (Status::Delivered, None));
        assert!(!s.delivered(MessageId::random(), &tax));
        assert_eq!(state.status(id).unwrap(), None, "not written yet");
        smol::block_on(s.flush());
        assert_eq!(state.status(id).unwrap().unwrap().status, Status::Delivered);
        let sent: Vec<String> = std::iter::from_fn(|| s.notifications.try_recv().ok())
            .map(|b| serde_json::from_slice::<Value>(&b).unwrap()["status"].to_string())
            .collect();
        assert_eq!(sent, ["\"sent\"", "\"failed\"", "\"delivered\""]);
    }

    #[test]
    fn written_records_stay_in_memory_for_the_next_change_within_a_bound() {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(State::open(dir.path()).unwrap());
        let s = Statuses::new(state.clone(), 60_000, false);
        let tax = AgentId::new("tax").unwrap();
        let ids: Vec<_> = (0..=RECENT).map(|_| MessageId::random()).collect();
        for id in &ids {
            s.set(*id, &tax, now_ms(), Status::Sent, None);
        }
        smol::block_on(s.flush());
        let cache = lock(&s.cache);
        assert!(cache.dirty.is_empty() && cache.writing.is_empty());
        assert_eq!(cache.recent.map.len(), RECENT, "bounded");
        let kept = ids.iter().filter(|id| cache.recent.map.contains_key(id));
        assert_eq!(
            kept.count(),
            RECENT,
            "one evicted; order within a batch is the map's"
        );
        drop(cache);
        // Answered from memory and from the disk alike after the write.
        for id in &ids {
            assert_eq!(s.get(*id).unwrap().status, Status::Sent);
            assert_eq!(state.status(*id).unwrap().unwrap().status, Status::Sent);
        }
        let first = ids[0];
        assert!(s.delivered(first, &tax));
        assert_eq!(s.get(first).unwrap().status, Status::Delivered);
    }
}
