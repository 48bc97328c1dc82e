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

#[derive(Default)]
struct Sources {
    file: Option<Directory>,
    centops: Option<Directory>,
    file_stamp: Option<(SystemTime, u64)>,
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

/// Runs until cancelled. `reload` receives a message per SIGHUP.
pub(super) async fn run(shared: Arc<Shared>, reload: async_channel::Receiver<()>) {
    let mut sources = Sources::default();
    let mut next_poll = std::time::Instant::now();
    loop {
        let mut changed = false;
        if let Some(path) = shared.config.agents_file.clone() {
            changed |= check_file(&shared, &path, &mut sources, false);
        }
        if let Some(url) = shared.config.centops_url.clone() {
            if std::time::Instant::now() >= next_poll {
                next_poll = std::time::Instant::now() + shared.config.centops_interval;
                changed |= poll_centops(&shared, &url, &mut sources).await;
            }
        }
        if changed {
            if let Some(d) = sources.merged() {
                apply(&shared, d).await;
            }
        }
        let sighup = futures_lite::future::or(async { reload.recv().await.is_ok() }, async {
            smol::Timer::after(FILE_POLL).await;
            false
        })
        .await;
        if sighup {
            log::info!("SIGHUP: re-reading the agent directory");
            if let Some(path) = shared.config.agents_file.clone() {
                if check_file(&shared, &path, &mut sources, true) {
                    if let Some(d) = sources.merged() {
                        apply(&shared, d).await;
                    }
                }
            }
            next_poll = std::time::Instant::now();
        }
    }
}

fn check_file(shared: &Shared, path: &Path, sources: &mut Sources, force: bool) -> bool {
    let stamp = std::fs::metadata(path)
        .ok()
        .and_then(|m| Some((m.modified().ok()?, m.len())));
    if !force && stamp.is_some() && stamp == sources.file_stamp {
        return false;
    }
    if stamp.is_none() && !force && sources.file_stamp.is_none() && sources.file.is_some() {
        return false;
    }
    let result = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
        .and_then(|text| Directory::from_json(&text).map_err(|e| e.to_string()));
    // Remember the stamp even on failure, so a broken file is reported once, not every second.
    let first_failure = sources.file_stamp != stamp || force;
    sources.file_stamp = stamp;
    match result {
        Ok(d) => {
            sources.file = Some(d);
            shared
                .metrics
                .directory_reloads
                .get_or_create(&[("result", "ok")])
                .inc();
            true
        }
        Err(e) => {
            if first_failure {
                shared
                    .metrics
                    .directory_reloads
                    .get_or_create(&[("result", "error")])
                    .inc();
                log::error!("--agents-file refused, keeping the last good directory: {e}");
            }
            false
        }
    }
}

async fn poll_centops(shared: &Shared, url: &str, sources: &mut Sources) -> bool {
    let req = match hyper::Request::get(url).body(Full::new(Bytes::new())) {
        Ok(r) => r,
        Err(e) => return log_centops(shared, format!("bad --centops-url: {e}")),
    };
    let (status, body) = match crate::http::request(req, None, Duration::from_secs(15)).await {
        Ok(r) => r,
        Err(e) => return log_centops(shared, e.to_string()),
    };
    if !status.is_success() {
        return log_centops(shared, format!("CentOps answered {status}"));
    }
    let text = String::from_utf8_lossy(&body);
    match Directory::from_json(&text) {
        Ok(d) => {
            let changed = sources.centops.as_ref() != Some(&d);
            sources.centops = Some(d);
            shared
                .metrics
                .directory_reloads
                .get_or_create(&[("result", "ok")])
                .inc();
            changed
        }
        Err(e) => log_centops(shared, e.to_string()),
    }
}

fn log_centops(shared: &Shared, problem: String) -> bool {
    shared
        .metrics
        .directory_reloads
        .get_or_create(&[("result", "error")])
        .inc();
    log::error!("CentOps directory refused, keeping the last good directory: {problem}");
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
    *shared.directory.write().expect("directory lock") = next.clone();
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
