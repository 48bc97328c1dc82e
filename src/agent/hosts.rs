//! Which `Host` headers the agent API answers: its own address and names, never a name a
//! web page chose.
//!
//! A page in a browser on the agent's machine can make the browser send requests to the
//! local API. Through DNS rebinding (a name of the attacker's that resolves to 127.0.0.1)
//! it can even read the answers, but the browser then sends the attacker's name as `Host`.
//! So the API answers only the `--listen` address, `localhost`, `127.0.0.1` and `[::1]`
//! on the listening port, and the names given with `--api-host`: `NAME` for any port
//! (behind a port mapping or proxy the port differs), `NAME:PORT` for that port only.
//! Anything else gets `421 Misdirected Request`.

use std::net::{IpAddr, SocketAddr};

use crate::config::ConfigError;

/// One accepted host: a lower-case name or IP literal (IPv6 in brackets), and the one
/// port it is accepted with, or any port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiHost {
    name: String,
    port: Option<u16>,
}

impl ApiHost {
    /// Parses an `--api-host` value: `NAME`, `NAME:PORT`, `[IPv6]` or `[IPv6]:PORT`.
    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        let invalid = |why: &str| ConfigError::Invalid {
            flag: "--api-host",
            value: value.to_owned(),
            why: why.to_owned(),
        };
        let (name, port) = split_host(value)
            .ok_or_else(|| invalid("not a host name, an IP address or one of these with :PORT"))?;
        if !valid_name(&name) {
            return Err(invalid(
                "not a host name, an IP address or one of these with :PORT",
            ));
        }
        Ok(Self { name, port })
    }
}

/// The hosts the API answers, for one bound address.
#[derive(Clone, Debug)]
pub struct AllowedHosts {
    hosts: Vec<ApiHost>,
}

impl AllowedHosts {
    /// The listen address as bound (its real port, even for `--listen …:0`), the loopback
    /// names on that port, and `extra` (`--api-host`).
    pub fn new(bound: SocketAddr, extra: &[ApiHost]) -> Self {
        let port = Some(bound.port());
        let own = [
            literal(bound.ip()),
            "localhost".into(),
            "127.0.0.1".into(),
            "[::1]".into(),
        ];
        let hosts = own
            .into_iter()
            .map(|name| ApiHost { name, port })
            .chain(extra.iter().cloned())
            .collect();
        Self { hosts }
    }

    /// True when a `Host` value names this API. A value without a port means port 80, as
    /// HTTP clients leave the default port out.
    pub fn allows(&self, host: &str) -> bool {
        let Some((name, port)) = split_host(host) else {
            return false;
        };
        let port = port.unwrap_or(80);
        self.hosts
            .iter()
            .any(|h| h.name == name && h.port.is_none_or(|p| p == port))
    }
}

/// An IP as it appears in a `Host` header: IPv6 in brackets.
fn literal(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Splits `host[:port]` (`[v6][:port]`) into a lower-case host and its port. `None` when
/// the port is not a number or the brackets do not close.
fn split_host(value: &str) -> Option<(String, Option<u16>)> {
    let value = value.trim();
    let (name, port) = match value.strip_prefix('[') {
        Some(rest) => {
            let (inside, after) = rest.split_once(']')?;
            // Normalised, so "[::1]" and "[0:0::1]" compare equal.
            let ip: std::net::Ipv6Addr = inside.parse().ok()?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':')?),
            };
            (format!("[{ip}]"), port)
        }
        None => match value.rsplit_once(':') {
            Some((name, port)) => (name.to_owned(), Some(port)),
            None => (value.to_owned(), None),
        },
    };
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => Some(p.parse().ok()?),
        Some(_) => return None,
    };
    let name = name.to_ascii_lowercase();
    (!name.is_empty()).then_some((name, port))
}

/// A DNS name or an IPv4 literal (letters, digits, `-`, `_`, `.`), or an IPv6 literal in
/// brackets (already checked by [`split_host`]).
fn valid_name(name: &str) -> bool {
    name.starts_with('[')
        || (name.len() <= 253
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(listen: &str, extra: &[&str]) -> AllowedHosts {
        let extra: Vec<ApiHost> = extra.iter().map(|e| ApiHost::parse(e).unwrap()).collect();
        AllowedHosts::new(listen.parse().unwrap(), &extra)
    }

    #[test]
    fn own_address_and_loopback_names_on_the_same_port() {
        let h = hosts("127.0.0.1:8077", &[]);
        for ok in [
            "127.0.0.1:8077",
            "localhost:8077",
            "LOCALHOST:8077",
            "[::1]:8077",
            "[0:0::1]:8077",
        ] {
            assert!(h.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example:8077",
            "localhost:8078",
            "localhost",
            "127.0.0.1",
            "localhost:",
            "localhost:80x",
            "[::1",
            "",
            "127.0.0.1.evil.example:8077",
        ] {
            assert!(!h.allows(bad), "{bad}");
        }
        let v6 = hosts("[::]:9000", &[]);
        assert!(v6.allows("[::]:9000") && v6.allows("localhost:9000"));
        assert!(hosts("127.0.0.1:80", &[]).allows("localhost"));
    }

    #[test]
    fn api_host_names_with_and_without_a_port() {
        let h = hosts(
            "0.0.0.0:8077",
            &["agent.internal", "proxy.example:443", "[fd00::1]"],
        );
        assert!(h.allows("agent.internal:8077"));
        assert!(h.allows("Agent.Internal:18077"));
        assert!(h.allows("agent.internal"));
        assert!(h.allows("proxy.example:443"));
        assert!(!h.allows("proxy.example:8077"));
        assert!(h.allows("[fd00::1]:1"));
        assert!(h.allows("0.0.0.0:8077"));
        assert!(!h.allows("10.0.0.5:8077"));
    }

    #[test]
    fn bad_api_host_values_are_refused() {
        for bad in ["a b", "x:y", "[::1", "[nope]", "host:99999", ":80", "a/b"] {
            assert!(ApiHost::parse(bad).is_err(), "{bad}");
        }
    }
}
