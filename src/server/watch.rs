//! Keeps the server's directory current from `--agents-file` (polled for changes, and on
//! SIGHUP) and `--centops-url` (polled every `--centops-interval`).
//!
//! Each source's last good document is kept as its exact bytes with its signature
//! (`FILE.sig` beside the agents file, `--centops-signature-url` for CentOps): agents get
//! those documents unchanged and verify them themselves. The server does not verify
//! signatures (it holds no operator key and is the party agents must not depend on); it
//! parses the documents only to know whom to admit and where to route.
//!
//! A document that fails to parse, a CentOps answer over `--centops-max-bytes`, and a
//! directory with no agents (unless `--allow-empty-directory`) are refused with a log line
//! naming the source, and the last good directory stays in force. The file is applied
//! before CentOps is asked, so a slow or hostile CentOps never delays the file's agents.
//! A change is applied in an order that never strands a message: queues of
//! new agents are declared first, then the directory is swapped, then sessions are told
//! (and sessions of removed or re-keyed agents are closed).

use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;

use super::sessions::Event;
use super::Shared;
use crate::directory::{self, Directory};
use crate::protocol::{DirectoryDocument, DirectorySignature, ServerFrame};
use crate::signing::{self, Signature, SigningError};

const FILE_POLL: Duration = Duration::from_secs(1);

/// The longest one CentOps fetch may take, answer included.
const CENTOPS_TIMEOUT: Duration = Duration::from_secs(15);

/// Modification time and length of the agents file and of its `.sig`; `None` for one that
/// cannot be read (or does not exist).
type Stamp = (FileStamp, FileStamp);
type FileStamp = Option<(SystemTime, u64)>;

/// One source's last good document: parsed, and as it is forwarded.
struct Source {
    directory: Directory,
    document: DirectoryDocument,
}

#[derive(Default)]
struct Sources {
    file: Option<Source>,
    centops: Option<Source>,
    /// The stamp of the file and its signature when last read; `None` before the first look.
    file_seen: Option<Stamp>,
}

impl Sources {
    fn all(&self) -> impl Iterator<Item = &Source> {
        self.file.iter().chain(self.centops.iter())
    }

    /// The file's agents, overridden by CentOps' where both list an id (agents merge the
    /// documents the same way), and the documents themselves.
    fn merged(&self) -> Option<(Directory, Vec<DirectoryDocument>)> {
        if self.file.is_none() && self.centops.is_none() {
            return None;
        }
        let directory = Directory::merge(self.all().map(|s| &s.directory));
        let documents = self.all().map(|s| s.document.clone()).collect();
        Some((directory, documents))
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
    if let Some((d, documents)) = sources.merged() {
        apply(shared, d, documents).await;
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

/// Reads the agents file (and its `.sig`) if either changed since the last look (or
/// `force`); true when a new document was loaded. A broken file is reported once per change,
/// not every second.
fn check_file(shared: &Shared, path: &Path, sources: &mut Sources, force: bool) -> bool {
    let stamp_of = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
    };
    let stamp = (stamp_of(path), stamp_of(&signing::signature_path(path)));
    if !force && sources.file_seen == Some(stamp) {
        return false;
    }
    sources.file_seen = Some(stamp);
    let read = read_file(path).and_then(|source| {
        let directory = check_not_empty(shared, source.directory)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Source {
            directory,
            document: source.document,
        })
    });
    match read {
        Ok(source) => {
            let changed = sources.file.as_ref().map(|s| &s.document) != Some(&source.document);
            sources.file = Some(source);
            count_reload(shared, "ok");
            changed || force
        }
        Err(e) => refused(shared, "--agents-file", e),
    }
}

/// The agents file's exact bytes, parsed, with `FILE.sig` when there is one (an absent
/// `.sig` means unsigned; one that is there but unreadable is an error naming it).
fn read_file(path: &Path) -> Result<Source, String> {
    let json = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let directory = directory::parse(&json).map_err(|e| format!("{}: {e}", path.display()))?;
    let signature = match Signature::read(&signing::signature_path(path)) {
        Ok(sig) => Some(DirectorySignature(sig.to_bytes())),
        Err(SigningError::Io { error, .. }) if error.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(format!(
                "{e} (fix it or remove it to serve the file unsigned)"
            ))
        }
    };
    Ok(Source {
        directory,
        document: DirectoryDocument { json, signature },
    })
}

async fn poll_centops(shared: &Shared, url: &str, sources: &mut Sources) -> bool {
    let source = format!("CentOps directory from {url}");
    let json = match fetch(shared, url).await {
        Ok(b) => b,
        Err(e) => return refused(shared, &source, e),
    };
    let signature = match &shared.config.centops_signature_url {
        None => None,
        Some(sig_url) => match fetch(shared, sig_url).await.and_then(|b| {
            Signature::parse(&b).map_err(|e| format!("--centops-signature-url {sig_url}: {e}"))
        }) {
            Ok(sig) => Some(DirectorySignature(sig.to_bytes())),
            Err(e) => return refused(shared, &source, e),
        },
    };
    let parsed = directory::parse(&json).map_err(|e| e.to_string());
    match parsed.and_then(|d| check_not_empty(shared, d)) {
        Ok(directory) => {
            let document = DirectoryDocument { json, signature };
            let changed = sources.centops.as_ref().map(|s| &s.document) != Some(&document);
            sources.centops = Some(Source {
                directory,
                document,
            });
            count_reload(shared, "ok");
            changed
        }
        Err(e) => refused(shared, &source, e),
    }
}

/// GETs `url` (the CentOps directory or its signature) with CentOps' TLS settings, reading
/// at most `--centops-max-bytes`; the body of a 2xx answer, or why not.
async fn fetch(shared: &Shared, url: &str) -> Result<Vec<u8>, String> {
    let req = hyper::Request::get(url)
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("{url}: {e}"))?;
    let (tls, max) = (shared.centops_tls.as_ref(), shared.config.centops_max_bytes);
    let (status, body) = crate::http::request_limited(req, tls, CENTOPS_TIMEOUT, max)
        .await
        .map_err(|e| match e {
            crate::http::ClientError::TooLarge { .. } => format!("{e} (--centops-max-bytes)"),
            e => format!("{url}: {e}"),
        })?;
    if !status.is_success() {
        return Err(format!("{url} answered {status}"));
    }
    Ok(body.to_vec())
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

/// Makes `next` the directory in force, and `documents` what agents are given.
async fn apply(shared: &Shared, next: Directory, documents: Vec<DirectoryDocument>) {
    let old = shared.directory();
    let changes = old.changes_to(&next);
    let first = !shared.directory_loaded.load(Ordering::SeqCst);
    // A new signature over the same agents still goes out: agents may refuse the old one.
    if changes.is_empty() && !first && *shared.documents() == documents {
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
    let welcome = ServerFrame::Welcome {
        directory: documents.clone(),
        limits: shared.config.limits(),
    };
    *crate::sync::write(&shared.welcome) = welcome.encode().into();
    *crate::sync::write(&shared.documents) = Arc::new(documents.clone());
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
        directory: documents,
    };
    shared
        .sessions
        .broadcast(Event::Directory(frame.encode().into()));
}
