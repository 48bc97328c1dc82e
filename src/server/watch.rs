//! Keeps the server's directory current from `--agents-file` (polled for changes, and on
//! SIGHUP) and `--centops-url` (polled every `--centops-interval`).
//!
//! A document that fails to parse is refused with a log line and the last good directory
//! stays in force. A change is applied in an order that never strands a message: queues of
//! new agents are declared first, then the directory is swapped, then sessions are told
//! (and sessions of removed or re-keyed agents are closed).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;

use super::sessions::Event;
use super::Shared;
use crate::directory::Directory;
use crate::protocol::ServerFrame;

const FILE_POLL: Duration = Duration::from_secs(1);

/// Modification time and length of the agents file; `None` while it cannot be read.
type Stamp = Option<(SystemTime, u64)>;

#[derive(Default)]
struct Sources {
    file: Option<Directory>,
    centops: Option<Directory>,
    /// The file's stamp when it was last read; `None` before the first look.
    file_seen: Option<Stamp>,
}

impl Sources {
    /// The file's agents, overridden by CentOps' where both list an id.
    fn merged(&self) -> Option<Directory> {
        if self.file.is_none() && self.centops.is_none() {
            return None;
        }
        let agents = self
            .file
            .iter()
            .chain(self.centops.iter())
            .flat_map(|d| d.iter().cloned());
        Some(Directory::from_agents(agents))
    }
}

/// Runs until cancelled. `reload` receives a message per SIGHUP, which re-reads the file
/// even if it looks unchanged and polls CentOps at once.
pub(super) async fn run(shared: Arc<Shared>, reload: async_channel::Receiver<()>) {
    let mut sources = Sources::default();
    let mut next_poll = std::time::Instant::now();
    let mut sighup = false;
    loop {
        let mut changed = false;
        if let Some(path) = &shared.config.agents_file {
            changed |= check_file(&shared, path, &mut sources, sighup);
        }
        if let Some(url) = &shared.config.centops_url {
            if sighup || std::time::Instant::now() >= next_poll {
                next_poll = std::time::Instant::now() + shared.config.centops_interval;
                changed |= poll_centops(&shared, url, &mut sources).await;
            }
        }
        if let Some(d) = sources.merged().filter(|_| changed) {
            apply(&shared, d).await;
        }
        sighup = futures_lite::future::or(async { reload.recv().await.is_ok() }, async {
            smol::Timer::after(FILE_POLL).await;
            false
        })
        .await;
        if sighup {
            log::info!("SIGHUP: re-reading the agent directory");
        }
    }
}

/// Reads the agents file if it changed since the last look (or `force`); true when a new
/// directory was loaded. A broken file is reported once per change, not every second.
fn check_file(shared: &Shared, path: &Path, sources: &mut Sources, force: bool) -> bool {
    let stamp = std::fs::metadata(path)
        .ok()
        .and_then(|m| Some((m.modified().ok()?, m.len())));
    if !force && sources.file_seen == Some(stamp) {
        return false;
    }
    sources.file_seen = Some(stamp);
    let result = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
        .and_then(|text| Directory::from_json(&text).map_err(|e| e.to_string()));
    match result {
        Ok(d) => {
            sources.file = Some(d);
            count_reload(shared, "ok");
            true
        }
        Err(e) => refused(shared, "--agents-file", e),
    }
}

async fn poll_centops(shared: &Shared, url: &str, sources: &mut Sources) -> bool {
    let req = match hyper::Request::get(url).body(Full::new(Bytes::new())) {
        Ok(r) => r,
        Err(e) => return refused(shared, "--centops-url", e.to_string()),
    };
    let (status, body) = match crate::http::request(req, None, Duration::from_secs(15)).await {
        Ok(r) => r,
        Err(e) => return refused(shared, "CentOps directory", e.to_string()),
    };
    if !status.is_success() {
        return refused(
            shared,
            "CentOps directory",
            format!("CentOps answered {status}"),
        );
    }
    match Directory::from_json(&String::from_utf8_lossy(&body)) {
        Ok(d) => {
            let changed = sources.centops.as_ref() != Some(&d);
            sources.centops = Some(d);
            count_reload(shared, "ok");
            changed
        }
        Err(e) => refused(shared, "CentOps directory", e.to_string()),
    }
}

fn count_reload(shared: &Shared, result: &'static str) {
    shared
        .metrics
        .directory_reloads
        .get_or_create(&[("result", result)])
        .inc();
}

/// Reports a directory that was not taken; always false (nothing changed).
fn refused(shared: &Shared, source: &str, problem: String) -> bool {
    count_reload(shared, "error");
    log::error!("{source} refused, keeping the last good directory: {problem}");
    false
}

/// Makes `next` the directory in force.
async fn apply(shared: &Shared, next: Directory) {
    let old = shared.directory();
    let changes = old.changes_to(&next);
    let first = !shared.directory_loaded.load(Ordering::SeqCst);
    if changes.is_empty() && !first {
        return;
    }
    let ids: Vec<_> = next.iter().map(|a| a.id.clone()).collect();
    match shared.broker.declare_agents(&ids).await {
        Ok(()) => {}
        // The broker remembers the set and declares it when it (re)connects.
        Err(crate::broker::BrokerError::NotConnected) => {
            log::debug!("agent queues will be declared once RabbitMQ is connected")
        }
        Err(e) => log::error!("declaring agent queues: {e}"),
    }
    let next = Arc::new(next);
    *crate::sync::write(&shared.directory) = next.clone();
    shared.directory_loaded.store(true, Ordering::SeqCst);
    shared.metrics.directory_agents.set(next.len() as i64);
    log::info!(
        "directory: {} agents (added {:?}, removed {:?}, re-keyed {:?})",
        next.len(),
        changes.added,
        changes.removed,
        changes.rekeyed
    );
    for id in changes.removed.iter() {
        shared
            .sessions
            .send(id, Event::Close("agent removed from the directory".into()));
    }
    for id in changes.rekeyed.iter() {
        shared.sessions.send(
            id,
            Event::Close("agent key changed; reconnect with the new key".into()),
        );
    }
    let frame = ServerFrame::Directory {
        directory: next.to_entries(),
    };
    shared
        .sessions
        .broadcast(Event::Directory(frame.encode().into()));
}
