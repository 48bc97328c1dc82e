//! Which key belongs to which agent, decided without trusting the relay that hands the
//! directory over (docs/SECURITY.md, "Key authenticity").
//!
//! The server forwards the directory as the documents its sources published, with their
//! signatures. With `--directory-key`, every document must verify under one of those
//! operator keys; anything else is refused and the last good directory stays in force.
//! A verified directory's keys are recorded in the state dir as confirmed (a signed
//! directory always wins over a pin). Without `--directory-key`, each agent's key is pinned
//! on first use; a changed key is not used until an operator confirms it — sends to that
//! agent are refused (409) and envelopes from it that only the new key could have sealed
//! are dead-lettered with a reason that says so.
//!
//! Confirmations arrive through the state dir's drop-box ([`crate::state::dropbox`]),
//! applied every few seconds and on SIGHUP.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::Agent;
use crate::crypto::PublicKey;
use crate::directory::{self, Agent as Entry, Directory};
use crate::protocol::{AgentId, DirectoryDocument};
use crate::signing::{DirectoryKeys, Signature};
use crate::state::{dropbox, fingerprint, PinVerdict, State, StateError};
use crate::sync::{lock, read, write};

/// How often the drop-box is looked at (SIGHUP looks at once).
const CONFIRM_POLL: Duration = Duration::from_secs(5);

/// A key the directory offers for an agent that differs from its pinned key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct KeyChange {
    pub pinned: PublicKey,
    pub offered: PublicKey,
}

impl KeyChange {
    /// The change and how an operator accepts it, for errors and logs.
    pub(super) fn describe(&self, id: &AgentId, state_dir: &Path) -> String {
        format!(
            "pinned key {}, the directory now offers {}; after checking the new fingerprint \
             with agency {id}, confirm it with `dmr-agent trust confirm --state-dir {} --id {id}`",
            fingerprint(&self.pinned),
            fingerprint(&self.offered),
            state_dir.display()
        )
    }
}

/// The agent's trust decisions.
pub(super) struct Trust {
    /// `--directory-key`; empty: pin on first use.
    keys: DirectoryKeys,
    /// The last directory accepted from a server, as it was offered (before pins).
    offered: Mutex<Option<Directory>>,
    /// Unconfirmed key changes, by agent.
    changes: RwLock<BTreeMap<AgentId, KeyChange>>,
    /// Why the last directory was refused (shown by `/readyz` while there is none).
    refusal: Mutex<Option<String>>,
    /// Serializes directory updates and confirmations (both rewrite the directory in use).
    settling: Mutex<()>,
}

impl Trust {
    pub(super) fn new(keys: DirectoryKeys) -> Self {
        Self {
            keys,
            offered: Mutex::default(),
            changes: RwLock::default(),
            refusal: Mutex::default(),
            settling: Mutex::default(),
        }
    }

    /// True when only a directory signed by `--directory-key` is accepted.
    pub(super) fn signed(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The unconfirmed key change of `id`, if there is one.
    pub(super) fn key_change(&self, id: &AgentId) -> Option<KeyChange> {
        read(&self.changes).get(id).copied()
    }

    /// True once a directory was accepted.
    pub(super) fn has_directory(&self) -> bool {
        lock(&self.offered).is_some()
    }

    /// Why no directory is in force, when none is.
    pub(super) fn missing_reason(&self) -> Option<String> {
        if self.has_directory() {
            return None;
        }
        Some(match lock(&self.refusal).clone() {
            Some(problem) => {
                format!("no trusted agent directory: the server's was refused: {problem}")
            }
            None => "no agent directory received yet".into(),
        })
    }
}

/// Checks the documents of a `Welcome` or `Directory` frame and, if they pass, makes them
/// the directory in use; otherwise keeps the last good one and says why.
pub(super) async fn accept(agent: &Arc<Agent>, documents: Vec<DirectoryDocument>) {
    let agent = agent.clone();
    smol::unblock(move || {
        let _one = lock(&agent.trust.settling);
        match verify(&agent.trust.keys, &documents) {
            Ok(offered) => {
                *lock(&agent.trust.refusal) = None;
                let previous = lock(&agent.trust.offered).replace(offered);
                if let Err(problem) = settle(&agent) {
                    // Nothing checked against the state dir is used: back to what was.
                    *lock(&agent.trust.offered) = previous;
                    *lock(&agent.trust.refusal) = Some(problem);
                }
            }
            Err(problem) => {
                agent.metrics.directory_refused.inc();
                let keeping = match agent.trust.has_directory() {
                    true => "keeping the last good directory",
                    false => "no directory is in force: sends and deliveries wait for a good one",
                };
                log::error!("directory from the server refused ({keeping}): {problem}");
                *lock(&agent.trust.refusal) = Some(problem);
            }
        }
    })
    .await
}

/// Verifies (with `--directory-key`) and parses every document; their merged directory, or
/// why it is refused.
fn verify(keys: &DirectoryKeys, documents: &[DirectoryDocument]) -> Result<Directory, String> {
    if documents.is_empty() {
        return Err("the server sent no directory document".into());
    }
    let mut parsed = Vec::with_capacity(documents.len());
    for (i, doc) in documents.iter().enumerate() {
        let which = format!("document #{i} of {}", documents.len());
        if !keys.is_empty() {
            let Some(sig) = doc.signature else {
                return Err(format!(
                    "{which} is not signed, and --directory-key accepts only a signed directory \
                     (sign it with `dmr-server directory sign` so FILE.sig lies beside the \
                     server's --agents-file, or serve --centops-signature-url)"
                ));
            };
            keys.verify(&doc.json, &Signature::from_bytes(sig.0))
                .map_err(|e| format!("{which}: {e}"))?;
        }
        parsed.push(directory::parse(&doc.json).map_err(|e| format!("{which}: {e}"))?);
    }
    Ok(Directory::merge(&parsed))
}

/// Derives the directory in use from the one offered and the state dir; called with
/// `settling` held. On a state dir failure the directory in use stays as it was.
fn settle(agent: &Agent) -> Result<(), String> {
    let Some(offered) = lock(&agent.trust.offered).clone() else {
        return Ok(());
    };
    let state = &agent.state;
    let result = match agent.trust.signed() {
        true => record_signed(state, &offered).map(|()| (offered, BTreeMap::new())),
        false => pin_all(state, &offered),
    };
    let (in_use, changes) = result.map_err(|e| {
        let problem = format!("cannot check the directory's keys against the state dir: {e}");
        log::error!("{problem}; keeping the last good directory");
        problem
    })?;
    let before = read(&agent.trust.changes).clone();
    for (id, change) in &changes {
        if before.get(id) != Some(change) {
            log::error!(
                "agent {id}: KEY CHANGED in the directory and NOT used until confirmed \
                 (sends to {id} are refused, messages only the new key opens are dead-lettered): {}",
                change.describe(id, state.dir())
            );
        }
    }
    for id in before.keys().filter(|id| !changes.contains_key(*id)) {
        log::info!("agent {id}: no unconfirmed key change any more");
    }
    agent.metrics.key_changes.set(changes.len() as i64);
    *write(&agent.trust.changes) = changes;
    log::info!("directory: {} agents", in_use.len());
    *write(&agent.directory) = Arc::new(in_use);
    Ok(())
}

/// Signed mode: the verified keys are the confirmed ones.
fn record_signed(state: &State, offered: &Directory) -> Result<(), StateError> {
    for a in offered.iter() {
        if state.pinned(&a.id)? != Some(a.public_key) {
            state.confirm(&a.id, &a.public_key)?;
        }
    }
    Ok(())
}

/// Pinning mode: each agent with its pinned key, and the changed keys not used.
fn pin_all(
    state: &State,
    offered: &Directory,
) -> Result<(Directory, BTreeMap<AgentId, KeyChange>), StateError> {
    let mut changes = BTreeMap::new();
    let mut in_use = Vec::with_capacity(offered.len());
    for a in offered.iter() {
        let mut entry: Entry = a.clone();
        match state.pin(&a.id, &a.public_key)? {
            PinVerdict::New => log::info!(
                "agent {}: key {} pinned on first use",
                a.id,
                fingerprint(&a.public_key)
            ),
            PinVerdict::Same => {}
            PinVerdict::Changed { pinned } => {
                changes.insert(
                    a.id.clone(),
                    KeyChange {
                        pinned,
                        offered: a.public_key,
                    },
                );
                entry.public_key = pinned;
            }
        }
        in_use.push(entry);
    }
    Ok((Directory::from_agents(in_use), changes))
}

/// Applies pending confirmations from the drop-box, then uses the confirmed keys.
pub(super) async fn apply_confirmations(agent: &Arc<Agent>) {
    let agent = agent.clone();
    smol::unblock(move || {
        let _one = lock(&agent.trust.settling);
        let applied = dropbox::apply_pending(&agent.state);
        let mut confirmed = false;
        for a in &applied {
            match a {
                dropbox::Applied::Confirmed { .. } => {
                    confirmed = true;
                    log::warn!("operator confirmation applied: {a}");
                }
                dropbox::Applied::Failed { .. } => log::error!("{a}"),
            }
        }
        if confirmed {
            // A failure is logged; the next directory or confirmation tries again.
            let _ = settle(&agent);
        }
    })
    .await
}

/// Looks at the drop-box every few seconds for the agent's lifetime.
pub(super) async fn watch_confirmations(agent: Arc<Agent>) {
    loop {
        apply_confirmations(&agent).await;
        async_io::Timer::after(CONFIRM_POLL).await;
    }
}
