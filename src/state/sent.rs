//! What the agent sent: each message's delivery status, and the durable outbox of sealed
//! envelopes waiting for a relay that can take them.
//!
//! Status records are written in batches by the agent (one transaction, one disk sync per
//! batch, never one per message) and expire at a fixed time chosen when the message is
//! first recorded (its creation + twice the TTL + clock skew: a receipt may travel a whole
//! TTL after the message did), through a second table in expiry order — so the store does
//! not grow with traffic. The outbox is written durably on every change: a message the API
//! answered `queued` for survives a crash.

use std::fmt;

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{State, StateError, EXPIRE_BATCH};
use crate::protocol::{AgentId, MessageId};

/// Message id → (recipient, status, reason, updated at, expires at); times in ms.
const STATUS: TableDefinition<u128, (&str, u8, &str, u64, u64)> = TableDefinition::new("status");
/// (expires at, message id): [`STATUS`] in expiry order.
const STATUS_BY_TIME: TableDefinition<(u64, u128), ()> = TableDefinition::new("status_by_time");
/// Submission order → (message id, the sealed envelope's bytes).
const OUTBOX: TableDefinition<u64, (u128, &[u8])> = TableDefinition::new("outbox");

/// Where a sent message is, as the sender can know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// In the agent's outbox: no relay could take it yet.
    Queued,
    /// Durable in RabbitMQ (the relay confirmed it).
    Sent,
    /// The recipient's local service took it (the recipient's signed receipt says so).
    Delivered,
    /// It will not be delivered; the record's reason says why.
    Failed,
}

impl Status {
    /// The name the API and `--status-url` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }

    fn code(self) -> u8 {
        self as u8
    }

    fn from_code(c: u8) -> Option<Self> {
        [Self::Queued, Self::Sent, Self::Delivered, Self::Failed]
            .get(usize::from(c))
            .copied()
    }

    /// Whether a record in this status may move to `next`. `delivered` is final: it is
    /// authenticated by the recipient, while a failure may come from the relay. A receipt
    /// after `failed` (a message replayed from the dead-letter queue) still wins.
    pub fn may_become(self, next: Status) -> bool {
        match (self, next) {
            (Self::Delivered, _) => false,
            (a, b) if a == b => false,
            (Self::Queued, _) => true,
            (Self::Sent, Self::Delivered | Self::Failed) => true,
            (Self::Failed, Self::Delivered) => true,
            _ => false,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One sent message's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusRecord {
    pub recipient: AgentId,
    pub status: Status,
    pub reason: Option<String>,
    pub updated_at_ms: u64,
    /// When the record may be forgotten.
    pub expires_at_ms: u64,
}

impl State {
    /// Creates this module's tables (called by `open`).
    pub(super) fn create_sent_tables(&self) -> Result<(), StateError> {
        self.write(|txn| {
            txn.open_table(STATUS)?;
            txn.open_table(STATUS_BY_TIME)?;
            txn.open_table(OUTBOX)?;
            Ok(())
        })
    }

    /// Writes many status records in one transaction (one disk sync for the batch).
    pub fn write_statuses(&self, records: &[(MessageId, StatusRecord)]) -> Result<(), StateError> {
        if records.is_empty() {
            return Ok(());
        }
        self.write(|txn| {
            let mut status = txn.open_table(STATUS)?;
            let mut by_time = txn.open_table(STATUS_BY_TIME)?;
            for (id, r) in records {
                put_status(&mut status, &mut by_time, *id, r)?;
            }
            Ok(())
        })
    }

    /// The status recorded for `id`, if any.
    pub fn status(&self, id: MessageId) -> Result<Option<StatusRecord>, StateError> {
        self.read(|txn| {
            let table = txn.open_table(STATUS)?;
            let Some(g) = table.get(id.0.as_u128())? else {
                return Ok(None);
            };
            let (recipient, code, reason, updated_at_ms, expires_at_ms) = g.value();
            // Written by this module from valid values; anything else reads as absent.
            let (Ok(recipient), Some(status)) = (AgentId::new(recipient), Status::from_code(code))
            else {
                return Ok(None);
            };
            Ok(Some(StatusRecord {
                recipient,
                status,
                reason: (!reason.is_empty()).then(|| reason.to_owned()),
                updated_at_ms,
                expires_at_ms,
            }))
        })
    }

    /// Forgets status records that expired before `now_ms`, in batches; returns how many.
    pub fn expire_statuses(&self, now_ms: u64) -> Result<usize, StateError> {
        let mut total = 0;
        loop {
            let removed = self.write(|txn| {
                let mut status = txn.open_table(STATUS)?;
                let mut by_time = txn.open_table(STATUS_BY_TIME)?;
                let doomed = by_time
                    .range(..(now_ms, 0u128))?
                    .take(EXPIRE_BATCH)
                    .map(|e| e.map(|(k, _)| k.value()))
                    .collect::<Result<Vec<_>, _>>()?;
                for (t, id) in &doomed {
                    by_time.remove((*t, *id))?;
                    status.remove(*id)?;
                }
                Ok(doomed.len())
            })?;
            total += removed;
            if removed < EXPIRE_BATCH {
                return Ok(total);
            }
        }
    }

    /// Appends a sealed envelope to the outbox, with its status record when it has one, in
    /// one durable transaction; returns its place in the order.
    pub fn outbox_push(
        &self,
        id: MessageId,
        envelope: &[u8],
        record: Option<&StatusRecord>,
    ) -> Result<u64, StateError> {
        self.write(|txn| {
            let mut outbox = txn.open_table(OUTBOX)?;
            let seq = outbox.last()?.map_or(0, |(k, _)| k.value() + 1);
            outbox.insert(seq, (id.0.as_u128(), envelope))?;
            if let Some(r) = record {
                let mut status = txn.open_table(STATUS)?;
                let mut by_time = txn.open_table(STATUS_BY_TIME)?;
                put_status(&mut status, &mut by_time, id, r)?;
            }
            Ok(seq)
        })
    }

    /// The oldest envelope in the outbox: (place, message id, envelope bytes).
    pub fn outbox_first(&self) -> Result<Option<(u64, MessageId, Vec<u8>)>, StateError> {
        self.read(|txn| {
            let outbox = txn.open_table(OUTBOX)?;
            let first = outbox.first()?.map(|(k, v)| {
                let (id, bytes) = v.value();
                (
                    k.value(),
                    MessageId(uuid::Uuid::from_u128(id)),
                    bytes.to_vec(),
                )
            });
            Ok(first)
        })
    }

    /// Removes the envelope at `seq` (sent, or given up), durably.
    pub fn outbox_remove(&self, seq: u64) -> Result<(), StateError> {
        self.write(|txn| {
            txn.open_table(OUTBOX)?.remove(seq)?;
            Ok(())
        })
    }

    /// How many envelopes wait in the outbox.
    pub fn outbox_len(&self) -> Result<u64, StateError> {
        self.read(|txn| Ok(txn.open_table(OUTBOX)?.len()?))
    }
}

fn put_status(
    status: &mut redb::Table<u128, (&str, u8, &str, u64, u64)>,
    by_time: &mut redb::Table<(u64, u128), ()>,
    id: MessageId,
    r: &StatusRecord,
) -> Result<(), redb::Error> {
    let key = id.0.as_u128();
    let reason = r.reason.as_deref().unwrap_or("");
    let value = (
        r.recipient.as_str(),
        r.status.code(),
        reason,
        r.updated_at_ms,
        r.expires_at_ms,
    );
    let old = status.insert(key, value)?.map(|g| g.value().4);
    if let Some(old_expiry) = old.filter(|e| *e != r.expires_at_ms) {
        by_time.remove((old_expiry, key))?;
    }
    by_time.insert((r.expires_at_ms, key), ())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(status: Status, expires_at_ms: u64) -> StatusRecord {
        StatusRecord {
            recipient: AgentId::new("tax").unwrap(),
            status,
            reason: (status == Status::Failed).then(|| "expired".to_owned()),
            updated_at_ms: 1,
            expires_at_ms,
        }
    }

    #[test]
    fn statuses_are_written_read_and_expired() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let (a, b) = (MessageId::random(), MessageId::random());
        state
            .write_statuses(&[
                (a, record(Status::Sent, 100)),
                (b, record(Status::Failed, 300)),
            ])
            .unwrap();
        assert_eq!(state.status(a).unwrap(), Some(record(Status::Sent, 100)));
        state
            .write_statuses(&[(a, record(Status::Delivered, 100))])
            .unwrap();
        assert_eq!(state.status(a).unwrap().unwrap().status, Status::Delivered);
        assert_eq!(state.expire_statuses(200).unwrap(), 1);
        assert_eq!(state.status(a).unwrap(), None);
        assert_eq!(
            state.status(b).unwrap().unwrap().reason.as_deref(),
            Some("expired")
        );
        assert_eq!(state.status(MessageId::random()).unwrap(), None);
    }

    #[test]
    fn the_outbox_keeps_order_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<MessageId> = (0..3).map(|_| MessageId::random()).collect();
        {
            let state = State::open(dir.path()).unwrap();
            for (i, id) in ids.iter().enumerate() {
                let r = record(Status::Queued, 1000);
                state.outbox_push(*id, &[i as u8], Some(&r)).unwrap();
            }
            let (seq, _, _) = state.outbox_first().unwrap().unwrap();
            state.outbox_remove(seq).unwrap();
        }
        let state = State::open(dir.path()).unwrap();
        assert_eq!(state.outbox_len().unwrap(), 2);
        let (_, id, bytes) = state.outbox_first().unwrap().unwrap();
        assert_eq!((id, bytes), (ids[1], vec![1]));
        assert_eq!(
            state.status(ids[0]).unwrap().unwrap().status,
            Status::Queued
        );
    }

    #[test]
    fn delivered_is_final_and_a_receipt_beats_a_failure() {
        use Status::*;
        assert!(Queued.may_become(Sent) && Sent.may_become(Delivered));
        assert!(Sent.may_become(Failed) && Failed.may_become(Delivered));
        assert!(!Delivered.may_become(Failed) && !Failed.may_become(Sent));
        assert!(!Sent.may_become(Queued) && !Sent.may_become(Sent));
    }
}
