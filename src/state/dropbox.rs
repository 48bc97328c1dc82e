//! The confirmation drop-box: how `dmr-agent trust confirm` reaches a running agent.
//!
//! The store has one owner at a time, so while the agent runs `trust confirm` cannot open
//! it. It writes a request file into `DIR/confirm/` instead (the dir 0700, the file 0600,
//! written whole and renamed into place), and the running agent applies pending requests
//! on SIGHUP and every few seconds. File-system access to the state dir is the
//! authorization, exactly as for the store itself: there is no network path to it. Files
//! that are not regular, not ours, or writable by others are refused, not applied.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{fingerprint, State, StateError};
use crate::crypto::PublicKey;
use crate::protocol::AgentId;

const DIR: &str = "confirm";
const SUFFIX: &str = ".json";
/// Where a request that could not be applied is moved, so it is reported once, not every
/// few seconds, and the operator can look at it.
const FAILED_SUFFIX: &str = ".failed";
/// A request is a few hundred bytes; anything larger is not one.
const MAX_REQUEST: u64 = 16 * 1024;

/// The drop-box of the state dir `state_dir`.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join(DIR)
}

/// Writes a request to confirm `key` (or, without one, the changed key the directory
/// offered) for `id`; returns the file written. A newer request for the same id replaces
/// an older one.
pub fn write_request(
    state_dir: &Path,
    id: &AgentId,
    key: Option<&PublicKey>,
) -> Result<PathBuf, StateError> {
    let dir = dir(state_dir);
    let fail = |path: &Path, error: io::Error| StateError::Storage {
        path: path.to_owned(),
        problem: format!("cannot write the confirmation request: {error}"),
    };
    // Run as root, the command hands what it creates to the state dir's owner (the agent's
    // user), who must be able to read and remove it.
    let owner = fs::metadata(state_dir).map(|m| (m.uid(), m.gid())).ok();
    let give = |path: &Path| {
        if let Some((uid, gid)) = owner {
            let _ = std::os::unix::fs::lchown(path, Some(uid), Some(gid));
        }
    };
    if fs::symlink_metadata(&dir).is_err() {
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| fail(&dir, e))?;
        give(&dir);
    }
    check_dir(&dir)?;
    let body = serde_json::json!({
        "id": id.as_str(),
        "key": key.map(PublicKey::to_pem),
    })
    .to_string();
    let path = dir.join(format!("{id}{SUFFIX}"));
    let tmp = dir.join(format!(".{id}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| fail(&tmp, e))?;
    file.write_all(body.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| fail(&tmp, e))?;
    give(&tmp);
    fs::rename(&tmp, &path).map_err(|e| fail(&path, e))?;
    Ok(path)
}

/// What applying one request did, for the agent's log.
#[derive(Debug)]
pub enum Applied {
    /// `key` is now `id`'s key; it replaced `old`.
    Confirmed {
        file: PathBuf,
        id: AgentId,
        key: PublicKey,
        old: Option<PublicKey>,
    },
    /// The request could not be applied; it was moved to `file` + `.failed`.
    Failed { file: PathBuf, problem: String },
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Confirmed { file, id, key, old } => {
                write!(f, "{}: agent {id}: key {} confirmed", file.display(), fingerprint(key))?;
                match old {
                    Some(old) if old != key => write!(f, " (replaces {})", fingerprint(old)),
                    _ => Ok(()),
                }
            }
            Self::Failed { file, problem } => write!(
                f,
                "{}: confirmation request not applied: {problem} (moved aside to {}{FAILED_SUFFIX}; \
                 run `dmr-agent trust confirm` again)",
                file.display(),
                file.display()
            ),
        }
    }
}

/// Applies every pending request in `state`'s drop-box, oldest name first.
pub fn apply_pending(state: &State) -> Vec<Applied> {
    let dir = dir(state.dir());
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new(); // No drop-box yet: nothing was ever requested.
    };
    if let Err(e) = check_dir(&dir) {
        return vec![Applied::Failed {
            file: dir,
            problem: e.to_string(),
        }];
    }
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(SUFFIX) && !n.starts_with('.'))
        })
        .collect();
    files.sort();
    let owner = fs::metadata(state.dir())
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    files
        .into_iter()
        .map(|f| apply_one(state, f, owner))
        .collect()
}

fn apply_one(state: &State, file: PathBuf, owner: u32) -> Applied {
    let result = read_request(&file, owner).and_then(|(id, key)| {
        let old = state.pinned(&id).map_err(|e| e.to_string())?;
        let key = match key {
            Some(k) => state.confirm(&id, &k).map(|_| k),
            None => state.confirm_offered(&id),
        }
        .map_err(|e| e.to_string())?;
        Ok((id, key, old))
    });
    match result {
        Ok((id, key, old)) => {
            if let Err(e) = fs::remove_file(&file) {
                log::warn!("{}: applied, but cannot remove it: {e}", file.display());
            }
            Applied::Confirmed { file, id, key, old }
        }
        Err(problem) => {
            let mut aside = file.clone().into_os_string();
            aside.push(FAILED_SUFFIX);
            let _ = fs::rename(&file, aside);
            Applied::Failed { file, problem }
        }
    }
}

/// Reads and checks one request: a regular file of the state dir's owner (`owner`) that
/// others cannot write.
fn read_request(file: &Path, owner: u32) -> Result<(AgentId, Option<PublicKey>), String> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(file)
        .map_err(|e| format!("cannot open it: {e}"))?;
    let meta = f
        .metadata()
        .map_err(|e| format!("cannot inspect it: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.uid() != owner {
        return Err(format!(
            "owned by uid {}, not by the state dir's owner (uid {owner})",
            meta.uid()
        ));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err("group or others may write it".into());
    }
    let mut text = String::new();
    Read::by_ref(&mut f)
        .take(MAX_REQUEST)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read it: {e}"))?;
    #[derive(serde::Deserialize)]
    struct Request {
        id: String,
        key: Option<String>,
    }
    let r: Request = serde_json::from_str(&text)
        .map_err(|e| format!("not a confirmation request (JSON {{\"id\",\"key\"}}): {e}"))?;
    let id = AgentId::new(r.id).map_err(|e| e.to_string())?;
    let key = match r.key {
        Some(pem) => Some(PublicKey::from_pem(&pem).map_err(|e| format!("key: {e}"))?),
        None => None,
    };
    Ok((id, key))
}

/// The drop-box must be a real directory only its owner may write.
fn check_dir(dir: &Path) -> Result<(), StateError> {
    let meta = fs::symlink_metadata(dir).map_err(|e| StateError::Storage {
        path: dir.to_owned(),
        problem: format!("cannot inspect the confirmation drop-box: {e}"),
    })?;
    super::check_private_dir(dir, &meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;

    #[test]
    fn requests_are_applied_once_and_bad_ones_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let (k1, k2, k3) = (
            SecretKey::generate().unwrap().public_key(),
            SecretKey::generate().unwrap().public_key(),
            SecretKey::generate().unwrap().public_key(),
        );
        let (a, b) = (AgentId::new("a").unwrap(), AgentId::new("b").unwrap());
        state.pin(&a, &k1).unwrap();
        state.pin(&a, &k2).unwrap(); // offered, not trusted
        state.pin(&b, &k1).unwrap();
        let file = write_request(dir.path(), &a, None).unwrap();
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(super::dir(dir.path()))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        write_request(dir.path(), &b, Some(&k3)).unwrap();
        fs::write(super::dir(dir.path()).join("c.json"), "{nope").unwrap();
        let applied = apply_pending(&state);
        assert_eq!(applied.len(), 3, "{applied:?}");
        assert!(matches!(&applied[0], Applied::Confirmed { key, .. } if *key == k2));
        assert!(matches!(&applied[1], Applied::Confirmed { key, .. } if *key == k3));
        let Applied::Failed { problem, .. } = &applied[2] else {
            panic!("{applied:?}")
        };
        assert!(problem.contains("not a confirmation request"), "{problem}");
        assert_eq!(state.pinned(&a).unwrap(), Some(k2));
        assert_eq!(state.pinned(&b).unwrap(), Some(k3));
        assert!(apply_pending(&state).is_empty());
        assert!(super::dir(dir.path()).join("c.json.failed").exists());
    }
}
