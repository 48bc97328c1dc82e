//! The agent's embedded, crash-safe store: the keys it pinned on first use and the replay
//! guard's memory of delivered messages, in `--state-dir` (one directory per agent).
//!
//! Backed by redb, an embedded ACID key-value store: every write is one transaction, and
//! a committed transaction survives a crash or a SIGKILL (default durability: fsync on
//! commit). One process owns a state dir at a time: [`State::open`] takes an exclusive lock
//! on `DIR/lock`, so a second agent (or `dmr-agent trust` while the agent runs) is refused
//! with [`StateError::Locked`] instead of corrupting or racing it.
//!
//! The replay guard lives on disk, not in memory: an entry is kept until its envelope's
//! `created_at` is older than the freshness window (TTL + clock skew) — past that, a
//! replayed copy is refused as stale anyway — and [`State::expire`] removes old entries
//! through a second table ordered by time, so the store does not grow with traffic.
//!
//! Calls block (a commit waits for the disk): async callers run them on a blocking thread
//! (`smol::unblock`), sharing the `State` through an `Arc`.
//!
//! It also holds `dmr-agent trust list|confirm`, the operator's commands on pinned keys;
//! while the agent runs, `trust confirm` leaves its request in the [`dropbox`].

pub mod dropbox;

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::config::{TrustArgs, TrustCommand, TrustConfirmArgs, TrustListArgs};
use crate::crypto::PublicKey;
use crate::protocol::{AgentId, MessageId};
use crate::sync::lock;

mod sent;
pub use sent::{Status, StatusRecord};

const DB_FILE: &str = "state.redb";
const LOCK_FILE: &str = "lock";

/// Agent id → (pinned at, ms since the epoch; X25519 public key).
const PINS: TableDefinition<&str, (u64, [u8; 32])> = TableDefinition::new("pins");
/// Agent id → (first offered at; a key that differs from the pin, awaiting confirmation).
const OFFERED: TableDefinition<&str, (u64, [u8; 32])> = TableDefinition::new("offered_keys");
/// (sender, message id) → (envelope created_at, delivered at), both ms since the epoch.
const DELIVERED: TableDefinition<(&str, u128), (u64, u64)> = TableDefinition::new("delivered");
/// (envelope created_at, sender, message id): [`DELIVERED`] in expiry order.
const DELIVERED_BY_TIME: TableDefinition<(u64, &str, u128), ()> =
    TableDefinition::new("delivered_by_time");

/// Entries removed per transaction by [`State::expire`], so one call never holds the write
/// lock (and delays deliveries) for long.
const EXPIRE_BATCH: usize = 4096;

/// Why the state store cannot be used. Each message names the path and what to do.
#[derive(Debug)]
pub enum StateError {
    /// The state dir could not be created.
    CreateDir {
        dir: PathBuf,
        error: io::Error,
    },
    /// `trust` commands never create a state dir: a missing one is a wrong path.
    Missing {
        dir: PathBuf,
    },
    NotADirectory {
        dir: PathBuf,
    },
    /// Group or others may write the dir, and so could confirm keys.
    Insecure {
        dir: PathBuf,
        mode: u32,
    },
    /// The lock file could not be opened or locked.
    Lock {
        path: PathBuf,
        error: io::Error,
    },
    /// Another process holds the state dir.
    Locked {
        dir: PathBuf,
        holder: Option<u32>,
    },
    /// The database file cannot be opened: unreadable, damaged or of another format.
    Open {
        path: PathBuf,
        problem: String,
    },
    /// A read or write failed after opening.
    Storage {
        path: PathBuf,
        problem: String,
    },
    /// `confirm_offered` for an agent with no changed key waiting.
    NothingOffered {
        id: AgentId,
    },
    /// A key file given to `trust confirm --key`.
    Key {
        path: PathBuf,
        problem: String,
    },
    /// A bad `--id`.
    Id(String),
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CreateDir { dir, error } => write!(
                f,
                "cannot create the state dir {}: {error} (create it for the agent's user, mode 0700, or choose another --state-dir)",
                dir.display()
            ),
            Self::Missing { dir } => write!(
                f,
                "no state dir at {} (give the agent's --state-dir)",
                dir.display()
            ),
            Self::NotADirectory { dir } => write!(
                f,
                "the state dir {} is not a directory (choose another --state-dir)",
                dir.display()
            ),
            Self::Insecure { dir, mode } => write!(
                f,
                "the state dir {} has mode {mode:04o}: others could change pinned keys; run `chmod 700 {}`",
                dir.display(),
                dir.display()
            ),
            Self::Lock { path, error } => {
                write!(f, "cannot lock {}: {error} (the state dir must be writable by the agent's user)", path.display())
            }
            Self::Locked { dir, holder } => {
                write!(f, "the state dir {} is in use by another process", dir.display())?;
                if let Some(pid) = holder {
                    write!(f, " (pid {pid})")?;
                }
                f.write_str(
                    ": each agent needs its own --state-dir; for `dmr-agent trust`, stop the agent first",
                )
            }
            Self::Open { path, problem } => write!(
                f,
                "cannot open the agent state {}: {problem}. If the file is damaged, stop the agent and move it aside; \
                 the agent starts with an empty store (keys are pinned again on first use: check \
                 them with `dmr-agent trust list`; messages delivered within the TTL may be \
                 delivered again)",
                path.display()
            ),
            Self::Storage { path, problem } => {
                write!(f, "agent state {}: {problem} (check the disk and its free space)", path.display())
            }
            Self::NothingOffered { id } => write!(
                f,
                "no changed key is waiting for agent {id}: give the new key with --key PUBFILE"
            ),
            Self::Key { path, problem } => write!(f, "{}: {problem}", path.display()),
            Self::Id(e) => write!(f, "--id: {e}"),
        }
    }
}

impl std::error::Error for StateError {}

/// What pinning a key from the directory found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinVerdict {
    /// First time this agent is seen: its key is now pinned.
    New,
    /// The pinned key.
    Same,
    /// A different key than the pinned one: refuse it until an operator confirms it (the
    /// offered key is remembered for `trust list` and `trust confirm`).
    Changed { pinned: PublicKey },
}

/// One agent's pin, as `trust list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    pub id: AgentId,
    pub key: PublicKey,
    pub pinned_at_ms: u64,
    /// A different key the directory offered, awaiting confirmation.
    pub offered: Option<PublicKey>,
}

/// What the replay guard says about an incoming (sender, id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayVerdict {
    /// Never delivered: deliver it (it is now marked in flight).
    Fresh,
    /// Already delivered: acknowledge it without delivering.
    Delivered,
    /// Another copy is being delivered now: ask again later.
    Busy,
}

/// An open state dir. Send + Sync: share it through an `Arc`.
pub struct State {
    dir: PathBuf,
    db_path: PathBuf,
    db: Database,
    /// Held for the lifetime of `State`: the exclusive lock on `DIR/lock`.
    _lock: File,
    /// Deliveries running now. In memory on purpose: a crash ends them, and a message
    /// still marked in flight after a restart would never be delivered. Bounded by the
    /// number of concurrent deliveries, not by traffic.
    in_flight: Mutex<HashSet<(AgentId, MessageId)>>,
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State").field("dir", &self.dir).finish()
    }
}

impl State {
    /// Opens the store in `dir`, creating the dir (mode 0700) and the database if missing.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        if fs::symlink_metadata(dir).is_err() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|error| StateError::CreateDir {
                    dir: dir.to_owned(),
                    error,
                })?;
        }
        Self::open_existing(dir)
    }

    /// Opens the store in an existing `dir` (what `trust` commands use: a typo must not
    /// create an empty store).
    pub fn open_existing(dir: &Path) -> Result<Self, StateError> {
        let meta = fs::metadata(dir).map_err(|_| StateError::Missing {
            dir: dir.to_owned(),
        })?;
        check_private_dir(dir, &meta)?;
        let lock = take_lock(dir)?;
        let db_path = dir.join(DB_FILE);
        let db = Database::create(&db_path).map_err(|e| open_error(dir, &db_path, e))?;
        let state = Self {
            dir: dir.to_owned(),
            db_path,
            db,
            _lock: lock,
            in_flight: Mutex::default(),
        };
        state.create_tables()?;
        state.create_sent_tables()?;
        Ok(state)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates every table once, so read transactions can always open them.
    fn create_tables(&self) -> Result<(), StateError> {
        let txn = self.db.begin_write().map_err(|e| self.storage(e))?;
        {
            txn.open_table(PINS).map_err(|e| self.storage(e))?;
            txn.open_table(OFFERED).map_err(|e| self.storage(e))?;
            txn.open_table(DELIVERED).map_err(|e| self.storage(e))?;
            txn.open_table(DELIVERED_BY_TIME)
                .map_err(|e| self.storage(e))?;
        }
        txn.commit().map_err(|e| self.storage(e))
    }

    fn storage(&self, e: impl Into<redb::Error>) -> StateError {
        StateError::Storage {
            path: self.db_path.clone(),
            problem: e.into().to_string(),
        }
    }

    // ---- pinned keys -------------------------------------------------------------------

    /// Checks `key` for `id` against the pin: pins it if `id` is new, and remembers a
    /// changed key as offered (for the operator) without trusting it.
    pub fn pin(&self, id: &AgentId, key: &PublicKey) -> Result<PinVerdict, StateError> {
        // The common case (the pinned key again, nothing offered) needs no write.
        let (pinned, offered) = self.pin_entry(id)?;
        match pinned {
            Some(p) if p == *key && offered.is_none() => return Ok(PinVerdict::Same),
            Some(p) if p != *key && offered == Some(*key) => {
                return Ok(PinVerdict::Changed { pinned: p })
            }
            _ => {}
        }
        let now = now_ms();
        self.write(|txn| {
            let mut pins = txn.open_table(PINS)?;
            let mut offers = txn.open_table(OFFERED)?;
            let current = pins.get(id.as_str())?.map(|g| g.value().1);
            let verdict = match current {
                None => {
                    pins.insert(id.as_str(), (now, *key.as_bytes()))?;
                    PinVerdict::New
                }
                Some(p) if p == *key.as_bytes() => {
                    // Back to the pinned key: whatever was offered is no longer asked for.
                    offers.remove(id.as_str())?;
                    PinVerdict::Same
                }
                Some(p) => {
                    let same_offer = offers
                        .get(id.as_str())?
                        .is_some_and(|g| g.value().1 == *key.as_bytes());
                    if !same_offer {
                        offers.insert(id.as_str(), (now, *key.as_bytes()))?;
                    }
                    PinVerdict::Changed {
                        pinned: PublicKey::from_bytes(p),
                    }
                }
            };
            Ok(verdict)
        })
    }

    /// The operator's decision: `key` is `id`'s key from now on. Also how a signed
    /// directory's keys are recorded (a signed directory always wins over a pin). Returns
    /// the key it replaced, if any.
    pub fn confirm(&self, id: &AgentId, key: &PublicKey) -> Result<Option<PublicKey>, StateError> {
        let now = now_ms();
        self.write(|txn| {
            let mut pins = txn.open_table(PINS)?;
            let mut offers = txn.open_table(OFFERED)?;
            offers.remove(id.as_str())?;
            let old = pins
                .insert(id.as_str(), (now, *key.as_bytes()))?
                .map(|g| PublicKey::from_bytes(g.value().1));
            Ok(old)
        })
    }

    /// Confirms the changed key the directory offered for `id`; returns it.
    pub fn confirm_offered(&self, id: &AgentId) -> Result<PublicKey, StateError> {
        let (_, offered) = self.pin_entry(id)?;
        let key = offered.ok_or_else(|| StateError::NothingOffered { id: id.clone() })?;
        self.confirm(id, &key)?;
        Ok(key)
    }

    /// The key pinned for `id`.
    pub fn pinned(&self, id: &AgentId) -> Result<Option<PublicKey>, StateError> {
        Ok(self.pin_entry(id)?.0)
    }

    /// Every pin, by id.
    pub fn list_pins(&self) -> Result<Vec<Pin>, StateError> {
        self.read(|txn| {
            let pins = txn.open_table(PINS)?;
            let offers = txn.open_table(OFFERED)?;
            let mut out = Vec::new();
            for entry in pins.iter()? {
                let (id, value) = entry?;
                // Ids were valid when written; skip anything else rather than fail the list.
                let Ok(agent) = AgentId::new(id.value()) else {
                    continue;
                };
                let (pinned_at_ms, key) = value.value();
                let offered = offers
                    .get(id.value())?
                    .map(|g| PublicKey::from_bytes(g.value().1));
                out.push(Pin {
                    id: agent,
                    key: PublicKey::from_bytes(key),
                    pinned_at_ms,
                    offered,
                });
            }
            Ok(out)
        })
    }

    fn pin_entry(
        &self,
        id: &AgentId,
    ) -> Result<(Option<PublicKey>, Option<PublicKey>), StateError> {
        self.read(|txn| {
            let key = |g: redb::AccessGuard<(u64, [u8; 32])>| PublicKey::from_bytes(g.value().1);
            let pinned = txn.open_table(PINS)?.get(id.as_str())?.map(key);
            let offered = txn.open_table(OFFERED)?.get(id.as_str())?.map(key);
            Ok((pinned, offered))
        })
    }

    // ---- replay guard ------------------------------------------------------------------

    /// Classifies an incoming (sender, id); a `Fresh` one is marked in flight until
    /// [`State::record_delivered`] or [`State::release`].
    pub fn check_and_mark_in_flight(
        &self,
        sender: &AgentId,
        id: MessageId,
    ) -> Result<ReplayVerdict, StateError> {
        let mut in_flight = lock(&self.in_flight);
        let key = (sender.clone(), id);
        if in_flight.contains(&key) {
            return Ok(ReplayVerdict::Busy);
        }
        if self.was_delivered(sender, id)? {
            return Ok(ReplayVerdict::Delivered);
        }
        in_flight.insert(key);
        Ok(ReplayVerdict::Fresh)
    }

    /// Ends a delivery attempt that did not deliver (the message will come again).
    pub fn release(&self, sender: &AgentId, id: MessageId) {
        lock(&self.in_flight).remove(&(sender.clone(), id));
    }

    /// Records that the local service accepted (sender, id), durably: when this returns
    /// Ok the record survives a crash, so the agent may ack. Ends the in-flight mark even
    /// on error (the caller then leaves the message unacked; a redelivery may repeat it).
    pub fn record_delivered(
        &self,
        sender: &AgentId,
        id: MessageId,
        created_at_ms: u64,
    ) -> Result<(), StateError> {
        self.record_delivered_all(&[(sender.clone(), id, created_at_ms)])
    }

    /// [`State::record_delivered`] for many messages in one transaction: one disk sync for
    /// all of them (the batching a busy agent should use for acks that are ready together).
    pub fn record_delivered_all(
        &self,
        delivered: &[(AgentId, MessageId, u64)],
    ) -> Result<(), StateError> {
        let now = now_ms();
        let result = self.write(|txn| {
            let mut by_key = txn.open_table(DELIVERED)?;
            let mut by_time = txn.open_table(DELIVERED_BY_TIME)?;
            for (sender, id, created_at) in delivered {
                let (s, i) = (sender.as_str(), id.0.as_u128());
                let old = by_key
                    .insert((s, i), (*created_at, now))?
                    .map(|g| g.value().0);
                if let Some(old_created) = old {
                    by_time.remove((old_created, s, i))?;
                }
                by_time.insert((*created_at, s, i), ())?;
            }
            Ok(())
        });
        let mut in_flight = lock(&self.in_flight);
        for (sender, id, _) in delivered {
            in_flight.remove(&(sender.clone(), *id));
        }
        result
    }

    /// True when (sender, id) was delivered and has not expired yet.
    pub fn was_delivered(&self, sender: &AgentId, id: MessageId) -> Result<bool, StateError> {
        self.read(|txn| {
            let table = txn.open_table(DELIVERED)?;
            Ok(table.get((sender.as_str(), id.0.as_u128()))?.is_some())
        })
    }

    /// Forgets deliveries whose envelope was created before `older_than_ms` (callers pass
    /// now − TTL − allowed clock skew: older copies are refused as stale anyway). Works in
    /// batches; returns how many entries were removed.
    pub fn expire(&self, older_than_ms: u64) -> Result<usize, StateError> {
        let mut total = 0;
        loop {
            let removed = self.write(|txn| {
                let mut by_key = txn.open_table(DELIVERED)?;
                let mut by_time = txn.open_table(DELIVERED_BY_TIME)?;
                let doomed = by_time
                    .range(..(older_than_ms, "", 0u128))?
                    .take(EXPIRE_BATCH)
                    .map(|e| {
                        e.map(|(k, _)| {
                            let (t, s, i) = k.value();
                            (t, s.to_owned(), i)
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                for (t, s, i) in &doomed {
                    by_time.remove((*t, s.as_str(), *i))?;
                    by_key.remove((s.as_str(), *i))?;
                }
                Ok(doomed.len())
            })?;
            total += removed;
            if removed < EXPIRE_BATCH {
                return Ok(total);
            }
        }
    }

    /// How many deliveries the guard remembers (for a gauge, and for tests).
    pub fn delivered_len(&self) -> Result<u64, StateError> {
        self.read(|txn| Ok(txn.open_table(DELIVERED)?.len()?))
    }

    // ---- transactions ------------------------------------------------------------------

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.storage(e))?;
        f(&txn).map_err(|e| self.storage(e))
    }

    /// Runs `f` in a write transaction and commits it durably (fsync) before returning.
    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StateError> {
        let txn = self.db.begin_write().map_err(|e| self.storage(e))?;
        let value = f(&txn).map_err(|e| self.storage(e))?;
        txn.commit().map_err(|e| self.storage(e))?;
        Ok(value)
    }
}

/// Creates and exclusively locks `DIR/lock`, writing our pid into it for the next one.
fn take_lock(dir: &Path) -> Result<File, StateError> {
    let path = dir.join(LOCK_FILE);
    let fail = |error| StateError::Lock {
        path: path.clone(),
        error,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(fail)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(StateError::Locked {
                dir: dir.to_owned(),
                holder: text.trim().parse().ok(),
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(fail(e)),
    }
    // The pid is only a hint for the message above; failing to write it is harmless.
    let _ = file
        .set_len(0)
        .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()));
    Ok(file)
}

fn open_error(dir: &Path, path: &Path, e: redb::DatabaseError) -> StateError {
    let problem = match e {
        redb::DatabaseError::DatabaseAlreadyOpen => {
            return StateError::Locked {
                dir: dir.to_owned(),
                holder: None,
            }
        }
        redb::DatabaseError::UpgradeRequired(v) => {
            format!("it was written in storage format {v}, which this dmr-agent cannot read")
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(e))
            if e.kind() == io::ErrorKind::PermissionDenied =>
        {
            "permission denied (the agent's user must own the state dir and its files)".into()
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(e))
            if e.kind() == io::ErrorKind::InvalidData =>
        {
            "the file is damaged or is not a dmr-agent state file".into()
        }
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(c)) => {
            format!("the file is damaged ({c})")
        }
        other => other.to_string(),
    };
    StateError::Open {
        path: path.to_owned(),
        problem,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// SHA-256 of the key's SPKI DER, in hex: what the other agency can compute with
/// `openssl pkey -pubin -in KEY.pub -outform DER | sha256sum`.
pub fn fingerprint(key: &PublicKey) -> String {
    let pem = key.to_pem();
    let der = crate::crypto::pem_contents(&pem, "PUBLIC KEY").unwrap_or_default();
    match orion::hazardous::hash::sha2::sha256::Sha256::digest(&der) {
        Ok(d) => d.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
        Err(_) => String::from("?"),
    }
}

// ---- dmr-agent trust ---------------------------------------------------------------------

/// Runs `dmr-agent trust list|confirm`, printing the result for the operator.
pub fn trust_command(args: &TrustArgs) -> Result<(), StateError> {
    match &args.command {
        TrustCommand::List(a) => trust_list(a),
        TrustCommand::Confirm(a) => trust_confirm(a),
    }
}

fn trust_list(args: &TrustListArgs) -> Result<(), StateError> {
    let pins = State::open_existing(&args.state_dir)?.list_pins()?;
    let mut out = String::new();
    for pin in &pins {
        let line = if args.json {
            let mut v = serde_json::json!({
                "id": pin.id.as_str(),
                "fingerprint": fingerprint(&pin.key),
                "pinnedAt": format_ms(pin.pinned_at_ms),
            });
            if let Some(o) = &pin.offered {
                v["offeredFingerprint"] = fingerprint(o).into();
            }
            v.to_string()
        } else {
            let mut s = format!(
                "{}  {}  pinned {}",
                pin.id,
                fingerprint(&pin.key),
                format_ms(pin.pinned_at_ms)
            );
            if let Some(o) = &pin.offered {
                s.push_str(&format!(
                    "  KEY CHANGED, offered {} (confirm: dmr-agent trust confirm --state-dir {} --id {})",
                    fingerprint(o),
                    args.state_dir.display(),
                    pin.id
                ));
            }
            s
        };
        out.push_str(&line);
        out.push('\n');
    }
    if pins.is_empty() && !args.json {
        out.push_str("no keys pinned yet\n");
    }
    print!("{out}");
    Ok(())
}

fn trust_confirm(args: &TrustConfirmArgs) -> Result<(), StateError> {
    let id = AgentId::new(args.id.as_str()).map_err(|e| StateError::Id(e.to_string()))?;
    let key = match &args.key {
        Some(path) => Some(read_public_key(path)?),
        None => None,
    };
    let state = match State::open_existing(&args.state_dir) {
        Ok(state) => state,
        Err(StateError::Locked { holder, .. }) => {
            return confirm_through_dropbox(args, &id, key.as_ref(), holder)
        }
        Err(e) => return Err(e),
    };
    let (key, old) = match key {
        Some(k) => (k, state.confirm(&id, &k)?),
        None => {
            let old = state.pinned(&id)?;
            (state.confirm_offered(&id)?, old)
        }
    };
    match old {
        Some(old) if old != key => println!(
            "agent {id}: key {} confirmed (replaces {})",
            fingerprint(&key),
            fingerprint(&old)
        ),
        _ => println!("agent {id}: key {} confirmed", fingerprint(&key)),
    }
    Ok(())
}

/// The agent holds the store: leave the request where it looks for it.
fn confirm_through_dropbox(
    args: &TrustConfirmArgs,
    id: &AgentId,
    key: Option<&PublicKey>,
    holder: Option<u32>,
) -> Result<(), StateError> {
    let file = dropbox::write_request(&args.state_dir, id, key)?;
    let what = match key {
        Some(k) => format!("key {}", fingerprint(k)),
        None => "the changed key the directory offered".into(),
    };
    let (agent, hup) = match holder {
        Some(pid) => (
            format!("the running agent (pid {pid})"),
            format!("`kill -HUP {pid}`"),
        ),
        None => ("the running agent".into(), "SIGHUP".into()),
    };
    println!(
        "agent {id}: the state dir is in use by {agent}; wrote the request to confirm {what} to {}. \
         The agent applies it within 5 s (at once on {hup}) and logs the result; \
         GET /v1/agents then no longer shows \"keyChanged\" for {id}.",
        file.display()
    );
    Ok(())
}

fn read_public_key(path: &Path) -> Result<PublicKey, StateError> {
    let text = fs::read_to_string(path).map_err(|e| StateError::Key {
        path: path.to_owned(),
        problem: format!("cannot read it: {e}"),
    })?;
    PublicKey::from_pem(&text).map_err(|e| StateError::Key {
        path: path.to_owned(),
        problem: e.to_string(),
    })
}

fn format_ms(ms: u64) -> String {
    let t = time::OffsetDateTime::UNIX_EPOCH + time::Duration::milliseconds(ms as i64);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| ms.to_string())
}

/// A state directory (or the drop-box in it) must be a real directory that no one but its
/// owner may write: anyone who could would choose the keys this agent trusts.
pub(crate) fn check_private_dir(dir: &Path, meta: &fs::Metadata) -> Result<(), StateError> {
    if !meta.is_dir() {
        return Err(StateError::NotADirectory {
            dir: dir.to_owned(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(StateError::Insecure {
            dir: dir.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;

    fn key() -> PublicKey {
        SecretKey::generate().unwrap().public_key()
    }

    fn id(s: &str) -> AgentId {
        AgentId::new(s).unwrap()
    }

    #[test]
    fn pins_new_same_changed_and_confirm() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("s")).unwrap();
        let (k1, k2) = (key(), key());
        let a = id("police");
        assert_eq!(state.pin(&a, &k1).unwrap(), PinVerdict::New);
        assert_eq!(state.pin(&a, &k1).unwrap(), PinVerdict::Same);
        assert_eq!(
            state.pin(&a, &k2).unwrap(),
            PinVerdict::Changed { pinned: k1 }
        );
        assert_eq!(
            state.pin(&a, &k2).unwrap(),
            PinVerdict::Changed { pinned: k1 }
        );
        assert_eq!(state.pinned(&a).unwrap(), Some(k1));
        let pins = state.list_pins().unwrap();
        assert_eq!(pins.len(), 1);
        assert_eq!(pins[0].offered, Some(k2));
        assert_eq!(state.confirm_offered(&a).unwrap(), k2);
        assert_eq!(state.pin(&a, &k2).unwrap(), PinVerdict::Same);
        assert!(matches!(
            state.confirm_offered(&a),
            Err(StateError::NothingOffered { .. })
        ));
        assert_eq!(state.confirm(&a, &k1).unwrap(), Some(k2));
        assert_eq!(state.pinned(&id("tax")).unwrap(), None);
    }

    #[test]
    fn returning_to_the_pinned_key_withdraws_the_offer() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let (k1, k2) = (key(), key());
        let a = id("a");
        state.pin(&a, &k1).unwrap();
        state.pin(&a, &k2).unwrap();
        assert_eq!(state.pin(&a, &k1).unwrap(), PinVerdict::Same);
        assert_eq!(state.list_pins().unwrap()[0].offered, None);
    }

    #[test]
    fn replay_guard_marks_in_flight_and_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let (s, m) = (id("sender"), MessageId::random());
        assert_eq!(
            state.check_and_mark_in_flight(&s, m).unwrap(),
            ReplayVerdict::Fresh
        );
        assert_eq!(
            state.check_and_mark_in_flight(&s, m).unwrap(),
            ReplayVerdict::Busy
        );
        state.release(&s, m);
        assert_eq!(
            state.check_and_mark_in_flight(&s, m).unwrap(),
            ReplayVerdict::Fresh
        );
        state.record_delivered(&s, m, 1000).unwrap();
        assert_eq!(
            state.check_and_mark_in_flight(&s, m).unwrap(),
            ReplayVerdict::Delivered
        );
        // The same id from another sender is another message.
        assert_eq!(
            state.check_and_mark_in_flight(&id("other"), m).unwrap(),
            ReplayVerdict::Fresh
        );
    }

    #[test]
    fn expiry_removes_only_older_entries_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let s = id("s");
        let batch: Vec<_> = (0..EXPIRE_BATCH as u64 + 10)
            .map(|t| (s.clone(), MessageId::random(), t))
            .collect();
        state.record_delivered_all(&batch).unwrap();
        let keep = MessageId::random();
        state.record_delivered(&s, keep, 1_000_000).unwrap();
        // Re-recording with a new time moves the entry in the expiry order.
        let moved = batch[0].1;
        state.record_delivered(&s, moved, 2_000_000).unwrap();
        assert_eq!(
            state.expire(EXPIRE_BATCH as u64 + 10).unwrap(),
            EXPIRE_BATCH + 9
        );
        assert_eq!(state.delivered_len().unwrap(), 2);
        assert!(state.was_delivered(&s, keep).unwrap());
        assert!(state.was_delivered(&s, moved).unwrap());
        assert_eq!(state.expire(1_500_000).unwrap(), 1);
        assert!(!state.was_delivered(&s, keep).unwrap());
    }

    #[test]
    fn fingerprints_are_sha256_of_the_spki() {
        let f = fingerprint(&key());
        assert_eq!(f.len(), 64);
        assert!(f.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
