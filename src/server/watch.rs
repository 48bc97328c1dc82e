//! Keeps the server's directory current from `--agents-file` (polled for changes, and on
//! SIGHUP) and `--centops-url` (polled every `--centops-interval`).
//!
//! A document that fails to parse, a CentOps answer over `--centops-max-bytes`, and a
//! directory with no agents (unless `--allow-empty-directory`) are refused with a log line
//! naming the source, and the last good directory stays in force. The file is applied
//! before CentOps is asked, so a slow or hostile CentOps never delays the file's agents. A change is applied in an order that never strands a message: queues of
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

/// The longest one CentOps fetch may take, answer included.
const CENTOPS_TIMEOUT: Duration = Duration::from_secs(15);

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
        if let Some(path) = &shared.config.agents_file {
            if check_file(&shared, path, &mut sources, sighup) {
                apply_merged(&shared, &sources).await;
            }
        }
        if let Some(url) = &shared.config.centops_url {
            if sighup || std::time::Instant::now() >= next_poll {
                next_poll = std::time::Instant::now() + shared.config.centops_interval;
                if poll_centops(&shared, url, &mut sources).await {
                    apply_merged(&shared, &sources).await;
                }
            }
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

async fn apply_merged(shared: &Shared, sources: &Sources) {
    if let Some(d) = sources.merged() {
        apply(shared, d).await;
    }
}

/// Refuses a directory with no agents unless `--allow-empty-directory`: an empty answer is
/// far more often a broken CentOps or a truncated file than a real wish to cut every agent
/// off.
fn check_not_empty(shared: &Shared, d: Directory) -> Result<Directory, String> {
    if d.is_empty() && !shared.config.allow_empty_directory {
        return Err(
            "the directory lists no agents, which would disconnect every agent \
             (give --allow-empty-directory if that is intended)"
                .into(),
        );
    }
    Ok(d)
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
        .and_then(|text| Directory::from_json(&text).map_err(|e| e.to_string()))
        .and_then(|d| check_not_empty(shared, d))
        .map_err(|e| match e.contains(&path.display().to_string()) {
            true => e,
            false => format!("{}: {e}", path.display()),
        });
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
    let (tls, max) = (shared.centops_tls.as_ref(), shared.config.centops_max_bytes);
    let fetched = crate::http::request_limited(req, tls, CENTOPS_TIMEOUT, max).await;
    let source = format!("CentOps directory from {url}");
    let (status, body) = match fetched {
        Ok(r) => r,
        Err(e @ crate::http::ClientError::TooLarge { .. }) => {
            let e = format!("{e} (--centops-max-bytes)");
            return refused(shared, &source, e);
        }
        Err(e) => return refused(shared, &source, e.to_string()),
    };
    if !status.is_success() {
        return refused(shared, &source, format!("CentOps answered {status}"));
    }
    let parsed = Directory::from_json(&String::from_utf8_lossy(&body)).map_err(|e| e.to_string());
    match parsed.and_then(|d| check_not_empty(shared, d)) {
        Ok(d) => {
            let changed = sources.centops.as_ref() != Some(&d);
            sources.centops = Some(d);
            count_reload(shared, "ok");
            changed
        }
        Err(e) => refused(shared, &source, e),
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
