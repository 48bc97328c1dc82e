//! What can go wrong talking to RabbitMQ: [`BrokerError`], whose messages say what to do.

use std::fmt;

/// What went wrong talking to RabbitMQ. Every message says what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerError {
    /// Not connected right now (the broker is reconnecting); nothing was sent.
    NotConnected,
    /// No TCP connection to a RabbitMQ node could be made (refused, unknown host, no route):
    /// nothing answers at that address, so the credentials were never tried.
    Unreachable {
        /// The node's URL with its password masked.
        url_without_password: String,
        /// What the network said (the operating system's error).
        reason: String,
    },
    /// The TLS handshake with an `amqps://` node failed (certificate not trusted or not
    /// issued for the host, not a TLS port): the credentials were never sent. Retrying will
    /// not help until the certificate or the settings change.
    Tls {
        /// The node's URL with its password masked.
        url_without_password: String,
        /// What failed and what to do about it.
        reason: String,
    },
    /// RabbitMQ blocks publishers (memory or disk alarm); nothing was sent.
    Blocked(String),
    /// RabbitMQ refused: `basic.nack` (e.g. queue full), `basic.return` (no queue for the
    /// recipient), or a refused consume. Sending the same thing again will not help.
    Refused(String),
    /// RabbitMQ did not answer in time (10 s for a publish's confirm). For a publish: the
    /// message may or may not be stored.
    Timeout,
    /// The channel or connection closed while the request was in flight; for a publish the
    /// message may or may not be stored, so send it again (recipients drop duplicates).
    Closed(String),
    /// Declaring the topology failed; quotes RabbitMQ and says how to fix it.
    Declare(String),
    /// The named queue does not exist.
    NoQueue(String),
    /// A URL or topology setting RabbitMQ cannot use.
    Config(String),
}

impl BrokerError {
    /// Whether trying the same request again later may succeed (as opposed to a refusal or
    /// a setting that must be fixed first).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::NotConnected
                | Self::Unreachable { .. }
                | Self::Blocked(_)
                | Self::Timeout
                | Self::Closed(_)
        )
    }
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotConnected => f.write_str(
                "not connected to RabbitMQ (reconnecting); nothing was sent, try again shortly",
            ),
            Self::Unreachable {
                url_without_password,
                reason,
            } => write!(
                f,
                "cannot reach RabbitMQ at {url_without_password}: {reason}; check the host and \
                 port in --amqp-url and that RabbitMQ is running there"
            ),
            Self::Tls {
                url_without_password,
                reason,
            } => write!(
                f,
                "TLS with RabbitMQ at {url_without_password} failed: {reason} (nothing was sent)"
            ),
            Self::Blocked(reason) => write!(
                f,
                "RabbitMQ is blocking publishers ({reason}); free memory or disk on the RabbitMQ \
                 node; nothing was sent"
            ),
            Self::Refused(reason) => write!(f, "refused by RabbitMQ: {reason}"),
            Self::Timeout => f.write_str(
                "RabbitMQ did not answer in time; if this was a publish, the message may or may \
                 not be stored: send it again (recipients drop duplicates)",
            ),
            Self::Closed(reason) => write!(f, "RabbitMQ channel or connection closed: {reason}"),
            Self::Declare(reason) => f.write_str(reason),
            Self::NoQueue(queue) => write!(f, "queue {queue} does not exist in RabbitMQ"),
            Self::Config(reason) => write!(f, "invalid RabbitMQ setting: {reason}"),
        }
    }
}

impl std::error::Error for BrokerError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_is_retryable_and_not_called_closed() {
        let e = BrokerError::Unreachable {
            url_without_password: "amqp://guest:***@h:5672/%2f".into(),
            reason: "Connection refused (os error 111)".into(),
        };
        assert!(e.is_retryable());
        let shown = e.to_string();
        assert!(
            shown.contains("cannot reach RabbitMQ at amqp://guest:***@h"),
            "{shown}"
        );
        assert!(!shown.contains("closed"), "{shown}");
    }
}
