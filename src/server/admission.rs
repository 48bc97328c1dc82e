//! What a connection must get past before its agent has logged in: the cap on open
//! connections (enforced by the listener, see [`crate::http::ServeOptions`]), the cap on
//! WebSocket handshakes in progress, and the pre-login read budget
//! ([`crate::transport::PRE_LOGIN_BYTES`]). Everything refused here is counted in
//! `dmr_server_connections_refused_total{reason}` (`connections`, `handshakes`) and logged
//! at most once per interval (see [`super::quiet`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::quiet::{left_out, Quiet};
use crate::metrics::Labeled;
use crate::transport::ReadBudget;

/// Handshakes in progress, capped at `--max-handshakes`.
pub(crate) struct Admission {
    max_handshakes: usize,
    handshaking: Arc<AtomicUsize>,
    refused: Labeled,
    /// One line per interval for all refused connections together (a flood has many
    /// addresses), and one per peer address for refused logins.
    quiet_connections: Quiet<()>,
    quiet_logins: Quiet<IpAddr>,
}

/// A handshake in progress: holds its place under `--max-handshakes` and the WebSocket's
/// pre-login read cap until [`PreLogin::logged_in`] (or until dropped, on refusal).
pub(crate) struct PreLogin {
    budget: ReadBudget,
    _ticket: Ticket,
}

impl PreLogin {
    /// The agent proved its key: the full message limit applies from now on.
    pub(crate) fn logged_in(self) {
        self.budget.lift();
    }
}

/// A place under `--max-handshakes`, taken before the upgrade is answered.
pub(crate) struct Ticket(Arc<AtomicUsize>);

impl Ticket {
    /// Joins the ticket with the WebSocket's read budget once the upgrade is done.
    pub(crate) fn with_budget(self, budget: ReadBudget) -> PreLogin {
        PreLogin {
            budget,
            _ticket: self,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub(crate) fn new(max_handshakes: usize, refused: Labeled) -> Self {
        Self {
            max_handshakes,
            handshaking: Arc::default(),
            refused,
            quiet_connections: Quiet::default(),
            quiet_logins: Quiet::default(),
        }
    }

    /// A place for one more handshake, or `None` (counted and logged) when all are taken.
    pub(crate) fn handshake(&self, peer: SocketAddr) -> Option<Ticket> {
        let max = self.max_handshakes;
        let taken = self
            .handshaking
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        if taken.is_err() {
            self.refuse_connection(peer, "handshakes", "--max-handshakes");
            return None;
        }
        Some(Ticket(self.handshaking.clone()))
    }

    /// Handshakes in progress now (for the gauge).
    pub(crate) fn handshaking(&self) -> usize {
        self.handshaking.load(Ordering::Relaxed)
    }

    /// Counts and (quietly) logs a connection refused because of `flag`'s cap.
    pub(crate) fn refuse_connection(&self, peer: SocketAddr, reason: &'static str, flag: &str) {
        self.refused.get_or_create(&[("reason", reason)]).inc();
        if let Some(n) = self.quiet_connections.allow(&(), Instant::now()) {
            log::warn!(
                "refused a connection from {peer}: over {flag}{}",
                left_out(n)
            );
        }
    }

    /// Logs a refused login, at most once per interval per peer address.
    pub(crate) fn log_refused_login(&self, peer: SocketAddr, reason: &str) {
        if let Some(n) = self.quiet_logins.allow(&peer.ip(), Instant::now()) {
            log::warn!("refused connection from {peer}: {reason}{}", left_out(n));
        }
    }
}
