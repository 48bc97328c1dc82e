//! The relay's policy and audit log at run time: the [`Guard`] a session consults before
//! publishing, and the task that keeps `--policy-file` current.
//!
//! The policy in force is swapped whole on reload; a file that fails to parse or check is
//! refused with an error naming the file and the problem, and the last good policy stays.
//! Refusals are counted in `dmr_policy_refusals_total{sender,reason}`, whose label sets stay
//! bounded: `sender` is an agent of the directory (else `other`), `reason` one of
//! `forbidden`, `rate_limited`, `too_large`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::Shared;
use crate::audit::{Audit, Event, Meta, Sink};
use crate::directory::Directory;
use crate::metrics::Labeled;
use crate::policy::bucket::Limiter;
use crate::policy::Policy;
use crate::protocol::{Header, RejectCode};

const FILE_POLL: Duration = Duration::from_secs(1);

type Refusals = Family<[(&'static str, String); 2], Counter>;

/// Policy, rate buckets, audit log and their metrics, shared by all sessions.
pub(crate) struct Guard {
    policy: RwLock<Option<Arc<Policy>>>,
    limiter: Limiter,
    pub(crate) audit: Audit,
    registry: Registry,
    refusals: Refusals,
    reloads: Labeled,
    /// SIGHUP → the policy watcher.
    reload: (async_channel::Sender<()>, async_channel::Receiver<()>),
}

/// Reads and checks a policy file; the error names the file.
pub(crate) fn load(path: &Path) -> Result<Policy, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--policy-file {}: cannot read: {e}", path.display()))?;
    Policy::from_json(&text).map_err(|e| format!("--policy-file {}: {e}", path.display()))
}

impl Guard {
    /// Loads the policy (a bad file stops the start: there is no last good one yet) and
    /// opens the audit log.
    pub(crate) fn new(
        policy_file: Option<&Path>,
        audit_log: Option<&str>,
        instance: &str,
    ) -> Result<Self, String> {
        let policy = policy_file.map(load).transpose()?.map(Arc::new);
        if let (Some(p), Some(path)) = (&policy, policy_file) {
            log::info!("policy from {}: {} rules", path.display(), p.len());
        }
        let dropped = Counter::default();
        let audit = match audit_log {
            Some(s) => Audit::open(Sink::parse(s), instance.to_owned(), dropped.clone())
                .map_err(|e| e.to_string())?,
            None => Audit::default(),
        };
        let mut registry = Registry::default();
        let (refusals, reloads) = (Refusals::default(), Labeled::default());
        registry.register(
            "dmr_policy_refusals",
            "Messages refused by the relay's policy, by sender and reason",
            refusals.clone(),
        );
        registry.register(
            "dmr_policy_reloads",
            "Policy file loads by result",
            reloads.clone(),
        );
        registry.register(
            "dmr_audit_dropped",
            "Audit records dropped because the log could not keep up or failed",
            dropped,
        );
        Ok(Self {
            policy: RwLock::new(policy),
            limiter: Limiter::default(),
            audit,
            registry,
            refusals,
            reloads,
            reload: async_channel::unbounded(),
        })
    }

    /// The metrics of this module, rendered beside the server's.
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// SIGHUP: re-read the policy and reopen the audit log. Never blocks.
    pub(crate) fn sighup(&self) {
        let _ = self.reload.0.try_send(());
        self.audit.reopen();
    }

    fn current(&self) -> Option<Arc<Policy>> {
        crate::sync::read(&self.policy).clone()
    }

    /// The policy's verdict on one envelope of `bytes` encoded bytes: rules, then size, then
    /// rate (last, so a message refused for another reason costs no token).
    pub(crate) fn check(
        &self,
        directory: &Directory,
        h: &Header,
        bytes: usize,
    ) -> Result<(), (RejectCode, String)> {
        let Some(policy) = self.current() else {
            return Ok(());
        };
        let verdict = verdict(&policy, &self.limiter, h, bytes, Instant::now());
        if let Err((code, _)) = &verdict {
            let sender = match directory.contains(&h.sender) {
                true => h.sender.to_string(),
                false => "other".to_owned(),
            };
            let labels = [("sender", sender), ("reason", code.as_str().to_owned())];
            self.refusals.get_or_create(&labels).inc();
        }
        verdict
    }

    /// Audits an event for the message with header `h`, if the audit log is on.
    pub(crate) fn audit(&self, event: Event, h: &Header, bytes: usize, reason: Option<&str>) {
        self.audit.header(event, h, bytes, reason);
    }

    /// Audits a delivery and returns what the later ack or nack will be audited with.
    pub(crate) fn delivered(&self, h: &Header, bytes: usize) -> Option<Meta> {
        let meta = self.audit.is_enabled().then(|| Meta::of(h, bytes))?;
        self.audit.record(Event::Delivered, &meta, None);
        Some(meta)
    }

    /// Audits the agent's ack (`nack` None) or nack of a delivery audited as delivered.
    pub(crate) fn settled(&self, meta: Option<&Meta>, nack: Option<&str>) {
        if let Some(m) = meta {
            let event = if nack.is_some() {
                Event::Nacked
            } else {
                Event::Acked
            };
            self.audit.record(event, m, nack);
        }
    }

    /// Audits a delivery the relay moved to the DLQ with `reason`.
    pub(crate) fn dead_lettered(&self, meta: Option<&Meta>, reason: &str) {
        if let Some(m) = meta {
            self.audit.record(Event::DeadLettered, m, Some(reason));
        }
    }
}

/// The decision itself, a function of the policy, the bucket state and the clock.
fn verdict(
    policy: &Policy,
    limiter: &Limiter,
    h: &Header,
    bytes: usize,
    now: Instant,
) -> Result<(), (RejectCode, String)> {
    policy
        .decide(h)
        .map_err(|d| (RejectCode::Forbidden, d.to_string()))?;
    let limits = policy.limits_for(&h.sender);
    if let Some(max) = limits.max_bytes.filter(|m| bytes as u64 > *m) {
        let e = format!(
            "envelope of {bytes} bytes exceeds the policy's {max} for {}",
            h.sender
        );
        return Err((RejectCode::TooLarge, e));
    }
    let Some(rate) = limits.rate else {
        return Ok(());
    };
    limiter.take(&h.sender, &rate, now).map_err(|wait| {
        let ms = wait.as_millis().clamp(1, u32::MAX as u128) as u32;
        let e = format!(
            "{} is over its policy rate of {} messages/s (burst {}); retry in {ms} ms",
            h.sender, rate.per_second, rate.burst
        );
        (RejectCode::RateLimited { retry_after_ms: ms }, e)
    })
}

/// Modification time and length of the policy file; `None` while it cannot be read.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Keeps the policy current: re-reads `path` when its stamp changes and on SIGHUP.
pub(super) async fn watch(shared: Arc<Shared>, path: PathBuf) {
    let guard = &shared.guard;
    let mut seen = stamp(&path);
    loop {
        let sighup =
            futures_lite::future::or(async { guard.reload.1.recv().await.is_ok() }, async {
                smol::Timer::after(FILE_POLL).await;
                false
            })
            .await;
        let now = stamp(&path);
        if !sighup && now == seen {
            continue;
        }
        seen = now;
        reload(&shared, &path);
    }
}

fn reload(shared: &Shared, path: &Path) {
    let guard = &shared.guard;
    match load(path) {
        Ok(p) => {
            log::info!("policy reloaded from {}: {} rules", path.display(), p.len());
            *crate::sync::write(&guard.policy) = Some(Arc::new(p));
            let directory = shared.directory();
            guard.limiter.retain(|id| directory.contains(id));
            guard.reloads.get_or_create(&[("result", "ok")]).inc();
        }
        Err(e) => {
            log::error!("{e}; keeping the last good policy");
            guard.reloads.get_or_create(&[("result", "error")]).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{AgentId, Kind, MessageId};

    fn header(from: &str, to: &str) -> Header {
        Header {
            id: MessageId::random(),
            sender: AgentId::new(from).unwrap(),
            recipient: AgentId::new(to).unwrap(),
            created_at_ms: 0,
            kind: Kind::chat_message(),
            seq: 0,
        }
    }

    #[test]
    fn verdicts_map_to_reject_codes_in_order() {
        let p = Policy::from_json(
            r#"{"rules": [{"name": "a-to-b", "from": ["a"], "to": ["b"]}],
                "limits": [{"from": ["a"], "messagesPerSecond": 1, "burst": 1, "maxBytes": 100}]}"#,
        )
        .unwrap();
        let l = Limiter::default();
        let t0 = Instant::now();
        let (code, why) = verdict(&p, &l, &header("b", "a"), 10, t0).unwrap_err();
        assert_eq!(code, RejectCode::Forbidden);
        assert!(why.contains("default is deny"), "{why}");
        let (code, _) = verdict(&p, &l, &header("a", "b"), 101, t0).unwrap_err();
        assert_eq!(code, RejectCode::TooLarge);
        assert!(
            verdict(&p, &l, &header("a", "b"), 100, t0).is_ok(),
            "refusals cost no token"
        );
        let (code, _) = verdict(&p, &l, &header("a", "b"), 100, t0).unwrap_err();
        assert_eq!(
            code,
            RejectCode::RateLimited {
                retry_after_ms: 1000
            }
        );
    }
}
