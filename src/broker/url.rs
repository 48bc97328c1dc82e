//! AMQP URLs (`amqp://user:password@host:port/vhost?heartbeat=N`, or `amqps://` for AMQP
//! over TLS), parsed without panics and shown with the password masked.
//!
//! amqprs has its own parser, but it panics on a query parameter without `=` and keeps the
//! vhost percent-encoded (`/%2f` would name a vhost called `%2f`), so this module parses.

/// Heartbeat interval asked of RabbitMQ when the URL does not say: a dead peer is noticed
/// after two missed heartbeats, i.e. within about 20 s.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;
/// RabbitMQ's port for plain AMQP.
const AMQP_PORT: u16 = 5672;
/// RabbitMQ's port for AMQP over TLS.
const AMQPS_PORT: u16 = 5671;

/// One RabbitMQ node to connect to.
#[derive(Clone)]
pub(super) struct NodeUrl {
    /// The URL with its password replaced by `***`: safe for logs.
    pub display: String,
    /// `amqps://`: TLS, with the server's certificate checked against `tls_name`.
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub vhost: String,
    pub user: String,
    pub password: String,
    pub heartbeat: u16,
}

impl std::fmt::Debug for NodeUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

impl NodeUrl {
    /// Parses one URL; the error says what is wrong, without repeating the password.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        let (scheme, rest) = raw
            .split_once("://")
            .ok_or_else(|| "expected amqp://user:password@host:port/vhost".to_owned())?;
        let scheme = scheme.to_ascii_lowercase();
        let tls = match scheme.as_str() {
            "amqp" => false,
            "amqps" => true,
            other => {
                return Err(format!(
                    "unsupported scheme {other:?}; expected amqp:// or amqps://"
                ))
            }
        };
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i..]),
            None => (before_query, ""),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password, masked_userinfo) = match userinfo {
            None => ("guest".to_owned(), "guest".to_owned(), String::new()),
            Some(u) => {
                let (name, pass) = match u.split_once(':') {
                    Some((n, p)) => (n, Some(p)),
                    None => (u, None),
                };
                let shown = match pass {
                    Some(_) => format!("{name}:***@"),
                    None => format!("{name}@"),
                };
                let name = decode(name).map_err(|e| format!("user name: {e}"))?;
                let pass = match pass {
                    Some(p) => decode(p).map_err(|_| "password: bad %-escape".to_owned())?,
                    None => "guest".to_owned(),
                };
                (name, pass, shown)
            }
        };
        let default_port = if tls { AMQPS_PORT } else { AMQP_PORT };
        let (host, port) = split_host_port(hostport, default_port)?;
        if tls {
            rustls_pki_types::ServerName::try_from(tls_name(&host)).map_err(|_| {
                format!("{host:?} is neither a DNS name nor an IP address a certificate can name")
            })?;
        }
        let vhost = match path {
            "" | "/" => "/".to_owned(),
            p => {
                let p = &p[1..];
                if p.contains('/') {
                    return Err("the vhost must be one path segment; write '/' as %2f".to_owned());
                }
                decode(p).map_err(|e| format!("vhost: {e}"))?
            }
        };
        if vhost.len() > 255 {
            return Err("the vhost name is longer than 255 bytes".to_owned());
        }
        let mut heartbeat = DEFAULT_HEARTBEAT_SECS;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if key == "heartbeat" {
                heartbeat = value
                    .parse::<u16>()
                    .ok()
                    .filter(|h| (2..=3600).contains(h))
                    .ok_or_else(|| {
                        format!("heartbeat={value:?}: expected whole seconds from 2 to 3600")
                    })?;
            }
            // Other parameters (connection_timeout, channel_max, ...) are accepted and ignored.
        }
        let query_shown = query.map(|q| format!("?{q}")).unwrap_or_default();
        let display = format!("{scheme}://{masked_userinfo}{hostport}{path}{query_shown}");
        Ok(Self {
            display,
            tls,
            host,
            port,
            vhost,
            user,
            password,
            heartbeat,
        })
    }

    /// The name the server's certificate must carry: the URL's host (an IPv6 address
    /// without its brackets).
    pub fn tls_name(&self) -> String {
        tls_name(&self.host)
    }
}

fn tls_name(host: &str) -> String {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .to_owned()
}

/// `raw` with any password replaced by `***`, for error messages about URLs that did not parse.
pub(super) fn mask(raw: &str) -> String {
    let start = raw.find("://").map_or(0, |i| i + 3);
    let end = raw[start..]
        .find(['/', '?'])
        .map_or(raw.len(), |i| start + i);
    match raw[start..end].rfind('@') {
        Some(at) => {
            let userinfo = &raw[start..start + at];
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{}{user}:***{}", &raw[..start], &raw[start + at..])
        }
        None => raw.to_owned(),
    }
}

fn split_host_port(hostport: &str, default_port: u16) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (ip6, after) = rest
            .split_once(']')
            .ok_or_else(|| "unclosed '[' in the host".to_owned())?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| "junk after ']'".to_owned())?,
            ),
        };
        (format!("[{ip6}]"), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (hostport.to_owned(), None),
        }
    };
    let host = if host.is_empty() {
        "localhost".to_owned()
    } else {
        host
    };
    let port = match port {
        None | Some("") => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {p:?} is not a number from 1 to 65535"))?,
    };
    Ok((host, port))
}

/// Percent-decoding of one URL component.
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "bad %-escape".to_owned())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "%-escapes do not form UTF-8".to_owned())
}

#[cfg(test)]
mod tests {
    use super::NodeUrl;

    #[test]
    fn default_url_of_the_design() {
        let u = NodeUrl::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.vhost.as_str()),
            ("127.0.0.1", 5672, "/")
        );
        assert_eq!((u.user.as_str(), u.password.as_str()), ("guest", "guest"));
        assert_eq!(u.display, "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(u.heartbeat, 10);
        assert!(!u.tls);
    }

    #[test]
    fn amqps_defaults_to_5671_and_names_the_host() {
        let u = NodeUrl::parse("AMQPS://u:pw@rabbit-1.example.org/prod").unwrap();
        assert!(u.tls);
        assert_eq!((u.host.as_str(), u.port), ("rabbit-1.example.org", 5671));
        assert_eq!(u.tls_name(), "rabbit-1.example.org");
        assert_eq!(u.display, "amqps://u:***@rabbit-1.example.org/prod");
        let u = NodeUrl::parse("amqps://[::1]:56710").unwrap();
        assert_eq!((u.tls_name().as_str(), u.port), ("::1", 56710));
        assert_eq!(NodeUrl::parse("amqp://h").unwrap().port, 5672);
    }

    #[test]
    fn defaults_ipv6_escapes_and_query() {
        let u = NodeUrl::parse("amqp://[::1]").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.vhost.as_str()),
            ("[::1]", 5672, "/")
        );
        let u = NodeUrl::parse("amqp://a%40b:p%3Ass@h:1/v%2Fx?heartbeat=5&foo").unwrap();
        assert_eq!((u.user.as_str(), u.password.as_str()), ("a@b", "p:ss"));
        assert_eq!((u.host.as_str(), u.port, u.vhost.as_str()), ("h", 1, "v/x"));
        assert_eq!(u.heartbeat, 5);
        assert!(!u.display.contains("p%3Ass"));
    }

    #[test]
    fn refusals_are_explained_and_never_leak_the_password() {
        for bad in [
            "http://h",
            "amqps://u:secret@bad%20name",
            "amqp://h:0",
            "amqp://h:x",
            "amqp://h/a/b",
            "amqp://h?heartbeat=0",
            "amqp://u:secret%zz@h",
            "h:5672",
        ] {
            let e = NodeUrl::parse(bad).unwrap_err();
            assert!(!e.contains("secret"), "{bad}: {e}");
        }
        assert_eq!(super::mask("amqp://u:secret@h:1/v"), "amqp://u:***@h:1/v");
        assert_eq!(super::mask("amqp://h/v@x"), "amqp://h/v@x");
    }
}
