//! The relay's audit log (`dmr-server run --audit-log PATH|-`): one JSON line per decision
//! about a message — accepted, refused, delivered, acked, nacked, dead-lettered.
//!
//! Lines carry clear metadata only (`time`, `event`, `id`, `sender`, `recipient`, `type`,
//! `bytes`, `instance`, and `reason` where there is one), never payload bytes or keys.
//! The relay never waits for the log: records go through a bounded channel to a writer
//! thread, and when that channel is full (a stalled disk or pipe) the record is dropped and
//! `dmr_audit_dropped_total` counts it. SIGHUP reopens the file, for log rotation.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::protocol::{Header, MessageId};

/// Records waiting for the writer before new ones are dropped.
const CAPACITY: usize = 8192;

/// Longest `reason` kept (an agent's nack reason is its own words).
const MAX_REASON: usize = 200;

/// What happened to a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// Published and confirmed by RabbitMQ.
    Accepted,
    /// Refused by the relay (policy, directory, size, RabbitMQ).
    Refused,
    /// Pushed to the recipient agent.
    Delivered,
    /// The recipient agent acknowledged it.
    Acked,
    /// The recipient agent refused it (RabbitMQ retries, then dead-letters).
    Nacked,
    /// Moved to the dead-letter queue by the relay. RabbitMQ dead-letters on its own (TTL,
    /// delivery limit) without the relay seeing it, so this is not emitted yet.
    DeadLettered,
}

/// The clear metadata of one message, as the audit log shows it.
#[derive(Clone, Debug)]
pub struct Meta {
    pub id: MessageId,
    pub sender: String,
    pub recipient: String,
    pub kind: String,
    pub bytes: usize,
}

impl Meta {
    /// The header's metadata; `bytes` is the encoded envelope's size.
    pub fn of(h: &Header, bytes: usize) -> Self {
        Self {
            id: h.id,
            sender: h.sender.to_string(),
            recipient: h.recipient.to_string(),
            kind: h.kind.to_string(),
            bytes,
        }
    }
}

/// Where the lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    File(PathBuf),
}

impl Sink {
    /// `-` is stdout; anything else a file path.
    pub fn parse(s: &str) -> Self {
        match s {
            "-" => Self::Stdout,
            path => Self::File(path.into()),
        }
    }

    fn open(&self) -> io::Result<Box<dyn Write + Send>> {
        match self {
            Self::Stdout => Ok(Box::new(io::stdout())),
            Self::File(p) => {
                let f = File::options().create(true).append(true).open(p)?;
                Ok(Box::new(BufWriter::new(f)))
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Stdout => "stdout".into(),
            Self::File(p) => p.display().to_string(),
        }
    }
}

struct Record {
    time: SystemTime,
    event: Event,
    meta: Meta,
    reason: Option<String>,
}

/// One line, in key order of DESIGN §7.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    event: Event,
    id: String,
    sender: &'a str,
    recipient: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    bytes: usize,
    instance: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

enum Msg {
    Record(Record),
    /// Wakes the writer to act on the reopen flag.
    Reopen,
}

struct Writer {
    tx: SyncSender<Msg>,
    reopen: Arc<AtomicBool>,
    dropped: Counter,
}

/// A handle to the audit log; cheap to call when the log is off.
#[derive(Default)]
pub struct Audit {
    writer: Option<Writer>,
}

impl Audit {
    /// Opens `sink` (so a bad path fails at start) and starts the writer thread.
    pub fn open(sink: Sink, instance: String, dropped: Counter) -> io::Result<Self> {
        let out = sink.open().map_err(|e| {
            io::Error::new(e.kind(), format!("--audit-log {}: {e}", sink.describe()))
        })?;
        Self::start(sink, out, instance, dropped)
    }

    fn start(
        sink: Sink,
        out: Box<dyn Write + Send>,
        instance: String,
        dropped: Counter,
    ) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(CAPACITY);
        let reopen = Arc::new(AtomicBool::new(false));
        let thread = WriterThread {
            sink,
            instance,
            out: Some(out),
            reopen: reopen.clone(),
            dropped: dropped.clone(),
            failing: false,
        };
        std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || thread.run(rx))?;
        Ok(Self {
            writer: Some(Writer {
                tx,
                reopen,
                dropped,
            }),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.writer.is_some()
    }

    /// Records `event` for `meta` without waiting; a full buffer drops and counts it.
    pub fn record(&self, event: Event, meta: &Meta, reason: Option<&str>) {
        let Some(w) = &self.writer else { return };
        let record = Record {
            time: SystemTime::now(),
            event,
            meta: meta.clone(),
            reason: reason.map(|r| r.chars().take(MAX_REASON).collect()),
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            w.tx.try_send(Msg::Record(record))
        {
            w.dropped.inc();
        }
    }

    /// Records `event` for the message with header `h` of `bytes` encoded bytes.
    pub fn header(&self, event: Event, h: &Header, bytes: usize, reason: Option<&str>) {
        if self.is_enabled() {
            self.record(event, &Meta::of(h, bytes), reason);
        }
    }

    /// Asks the writer to reopen its file (after log rotation); never blocks.
    pub fn reopen(&self) {
        if let Some(w) = &self.writer {
            w.reopen.store(true, Ordering::SeqCst);
            let _ = w.tx.try_send(Msg::Reopen);
        }
    }
}

struct WriterThread {
    sink: Sink,
    instance: String,
    out: Option<Box<dyn Write + Send>>,
    reopen: Arc<AtomicBool>,
    dropped: Counter,
    /// Set while writes fail, so a broken sink is reported once, not per line.
    failing: bool,
}

impl WriterThread {
    /// Writes what arrives, flushing whenever the channel runs dry; ends with the relay.
    fn run(mut self, rx: Receiver<Msg>) {
        while let Ok(msg) = rx.recv() {
            self.handle(msg);
            loop {
                match rx.try_recv() {
                    Ok(msg) => self.handle(msg),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return self.flush(),
                }
            }
            self.flush();
        }
    }

    fn handle(&mut self, msg: Msg) {
        if self.reopen.swap(false, Ordering::SeqCst) {
            self.flush();
            self.out = match self.sink.open() {
                Ok(out) => Some(out),
                Err(e) => {
                    log::error!("audit log {}: cannot reopen: {e}", self.sink.describe());
                    None
                }
            };
        }
        if let Msg::Record(r) = msg {
            let written = self.write(&r);
            self.outcome(written);
        }
    }

    fn write(&mut self, r: &Record) -> io::Result<()> {
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| io::Error::other("not open"))?;
        let line = Line {
            time: rfc3339(r.time),
            event: r.event,
            id: r.meta.id.to_string(),
            sender: &r.meta.sender,
            recipient: &r.meta.recipient,
            kind: &r.meta.kind,
            bytes: r.meta.bytes,
            instance: &self.instance,
            reason: r.reason.as_deref(),
        };
        serde_json::to_writer(&mut *out, &line).map_err(io::Error::other)?;
        out.write_all(b"\n")
    }

    fn outcome(&mut self, written: io::Result<()>) {
        match written {
            Ok(()) if self.failing => {
                self.failing = false;
                log::info!("audit log {}: writing again", self.sink.describe());
            }
            Ok(()) => {}
            Err(e) => {
                self.dropped.inc();
                if !self.failing {
                    self.failing = true;
                    log::error!(
                        "audit log {}: write failed, dropping records until it works: {e}",
                        self.sink.describe()
                    );
                }
            }
        }
    }

    fn flush(&mut self) {
        if let Some(out) = self.out.as_mut() {
            let _ = out.flush();
        }
    }
}

/// RFC 3339 in UTC, e.g. `2025-01-02T03:04:05.678901234Z`.
pub fn rfc3339(t: SystemTime) -> String {
    OffsetDateTime::from(t)
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// This machine's host name, for the default instance name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{AgentId, Kind};

    fn meta() -> Meta {
        let h = Header {
            id: MessageId::random(),
            sender: AgentId::new("police").unwrap(),
            recipient: AgentId::new("tax").unwrap(),
            created_at_ms: 0,
            kind: Kind::chat_message(),
            seq: 0,
        };
        Meta::of(&h, 321)
    }

    fn lines(path: &std::path::Path, want: usize) -> Vec<serde_json::Value> {
        for _ in 0..200 {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let v: Vec<_> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            if v.len() >= want {
                return v;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("audit lines did not appear");
    }

    #[test]
    fn writes_one_json_line_per_record_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::open(
            Sink::File(path.clone()),
            "host:1".into(),
            Counter::default(),
        )
        .unwrap();
        let m = meta();
        audit.record(Event::Accepted, &m, None);
        audit.record(Event::Refused, &m, Some("forbidden"));
        let v = lines(&path, 2);
        assert_eq!(v[0]["event"], "accepted");
        assert_eq!(v[0]["id"], m.id.to_string());
        assert_eq!(v[0]["sender"], "police");
        assert_eq!(v[0]["recipient"], "tax");
        assert_eq!(v[0]["type"], "ChatMessage");
        assert_eq!(v[0]["bytes"], 321);
        assert_eq!(v[0]["instance"], "host:1");
        assert!(v[0].get("reason").is_none());
        assert_eq!(v[1]["reason"], "forbidden");
        assert!(OffsetDateTime::parse(v[1]["time"].as_str().unwrap(), &Rfc3339).is_ok());
        // Rotation: move the file away, reopen, and the next line lands in a new file.
        let rotated = dir.path().join("audit.jsonl.1");
        std::fs::rename(&path, &rotated).unwrap();
        audit.reopen();
        audit.record(Event::Acked, &m, None);
        assert_eq!(lines(&path, 1)[0]["event"], "acked");
        assert_eq!(lines(&rotated, 2).len(), 2);
    }

    /// A sink that never finishes a write, like a full disk or a pipe nobody reads.
    struct Stalled(std::sync::Mutex<mpsc::Receiver<()>>);

    impl Write for Stalled {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            let _ = self.0.lock().unwrap().recv();
            Err(io::Error::other("stalled"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_sink_drops_and_counts_instead_of_blocking() {
        let (_never, rx) = mpsc::channel::<()>();
        let dropped = Counter::default();
        let out = Box::new(Stalled(std::sync::Mutex::new(rx)));
        let audit = Audit::start(Sink::Stdout, out, "i".into(), dropped.clone()).unwrap();
        let m = meta();
        // The writer takes at most one record into its stalled write; the rest fill the
        // channel, and every record past that is dropped, not waited for.
        for _ in 0..CAPACITY + 10 {
            audit.record(Event::Delivered, &m, None);
        }
        assert!(dropped.get() >= 9, "dropped {}", dropped.get());
    }

    #[test]
    fn a_bad_path_fails_at_open_and_a_disabled_log_is_a_no_op() {
        let e = Audit::open(
            Sink::File("/nonexistent-dir/x/audit".into()),
            "i".into(),
            Counter::default(),
        )
        .err()
        .unwrap();
        assert!(
            e.to_string()
                .contains("--audit-log /nonexistent-dir/x/audit"),
            "{e}"
        );
        let off = Audit::default();
        off.record(Event::Accepted, &meta(), None);
        assert!(!off.is_enabled());
    }
}
