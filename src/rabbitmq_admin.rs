//! A small client for RabbitMQ's management HTTP API (`--management-url`): the policies
//! `dmr-server rabbitmq setup` applies and the start-up check reads, and the queue facts
//! (effective policy) operators and tests look at.
//!
//! Credentials come from the URL's userinfo (`http://user:password@host:15672`), guest:guest
//! when absent; they are never shown in errors.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use hyper::{Method, Request, StatusCode};

use crate::http::{Body, Client, ClientError};

/// How long one management API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a management API request failed; says what to check.
#[derive(Debug)]
pub enum AdminError {
    /// `--management-url` cannot be used.
    Url(String),
    /// No answer: RabbitMQ down, the plugin not enabled, a wrong port.
    Unreachable {
        url: String,
        source: Box<ClientError>,
    },
    /// 401/403: the credentials are wrong or the user may not do this.
    Denied { url: String, status: u16 },
    /// Any other unexpected status, with RabbitMQ's explanation.
    Status {
        what: String,
        status: u16,
        body: String,
    },
    /// The answer was not the JSON expected.
    BadAnswer { what: String, why: String },
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Url(why) => write!(f, "--management-url: {why}"),
            Self::Unreachable { url, source } => write!(
                f,
                "cannot reach the RabbitMQ management API at {url}: {source}; is the \
                 rabbitmq_management plugin enabled (rabbitmq-plugins enable \
                 rabbitmq_management) and the port right?"
            ),
            Self::Denied { url, status } => write!(
                f,
                "the RabbitMQ management API at {url} answered {status}: the user in \
                 --management-url is unknown, has a wrong password, lacks the tag policymaker \
                 or administrator, or has no access to the vhost"
            ),
            Self::Status { what, status, body } => {
                write!(f, "{what}: RabbitMQ answered {status}: {body}")
            }
            Self::BadAnswer { what, why } => write!(f, "{what}: unexpected answer: {why}"),
        }
    }
}

impl std::error::Error for AdminError {}

/// A policy as the management API takes it (`PUT /api/policies/{vhost}/{name}`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Policy {
    pub pattern: String,
    #[serde(rename = "apply-to")]
    pub apply_to: &'static str,
    pub priority: i64,
    pub definition: serde_json::Map<String, serde_json::Value>,
}

/// A management API endpoint with its credentials.
pub struct Admin {
    /// `scheme://host:port` plus any path prefix, without userinfo or trailing `/`.
    base: String,
    authorization: String,
    client: Client,
}

impl Admin {
    /// Parses `http(s)://[user:password@]host:port[/prefix]`.
    pub fn new(url: &str) -> Result<Self, AdminError> {
        let (scheme, rest) = url
            .split_once("://")
            .filter(|(s, _)| matches!(*s, "http" | "https"))
            .ok_or_else(|| AdminError::Url("not an http(s):// URL".to_owned()))?;
        let (authority, path) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => (rest, ""),
        };
        let (userinfo, host) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        if host.is_empty() {
            return Err(AdminError::Url("no host".to_owned()));
        }
        let (user, password) = match userinfo {
            None => ("guest".to_owned(), "guest".to_owned()),
            Some(u) => {
                let (user, password) = u.split_once(':').unwrap_or((u, ""));
                (percent_decode(user)?, percent_decode(password)?)
            }
        };
        let base = format!("{scheme}://{host}{}", path.trim_end_matches('/'));
        base.parse::<hyper::Uri>()
            .map_err(|e| AdminError::Url(format!("{e}")))?;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let tls = match scheme {
            "https" => Some(
                crate::transport::client_tls(None)
                    .map_err(|e| AdminError::Url(format!("TLS: {e}")))?,
            ),
            _ => None,
        };
        Ok(Self {
            base,
            authorization: format!("Basic {token}"),
            client: Client::new(tls),
        })
    }

    /// The endpoint, without credentials (for messages).
    pub fn display(&self) -> &str {
        &self.base
    }

    /// Creates or replaces a policy.
    pub async fn put_policy(
        &self,
        vhost: &str,
        name: &str,
        policy: &Policy,
    ) -> Result<(), AdminError> {
        let path = format!("/api/policies/{}/{}", encode(vhost), encode(name));
        let body = serde_json::to_vec(policy).unwrap_or_default();
        let what = format!("setting policy {name:?} on vhost {vhost:?}");
        match self.call(Method::PUT, &path, Some(body)).await? {
            (s, _) if s.is_success() => Ok(()),
            (status, body) => Err(self.status(what, status, body)),
        }
    }

    /// A policy's JSON (`pattern`, `definition`, …), `None` if there is none by that name.
    pub async fn policy(
        &self,
        vhost: &str,
        name: &str,
    ) -> Result<Option<serde_json::Value>, AdminError> {
        let path = format!("/api/policies/{}/{}", encode(vhost), encode(name));
        self.get_json(&path, format!("reading policy {name:?} on vhost {vhost:?}"))
            .await
    }

    /// Every policy of a vhost.
    pub async fn policies(&self, vhost: &str) -> Result<Vec<serde_json::Value>, AdminError> {
        let path = format!("/api/policies/{}", encode(vhost));
        let what = format!("listing the policies of vhost {vhost:?}");
        let list = self.get_json(&path, what.clone()).await?;
        match list {
            Some(serde_json::Value::Array(items)) => Ok(items),
            None => Ok(Vec::new()),
            Some(other) => Err(AdminError::BadAnswer {
                what,
                why: format!("not a list: {other}"),
            }),
        }
    }

    /// Deletes a policy; `false` if there was none.
    pub async fn delete_policy(&self, vhost: &str, name: &str) -> Result<bool, AdminError> {
        let path = format!("/api/policies/{}/{}", encode(vhost), encode(name));
        match self.call(Method::DELETE, &path, None).await? {
            (s, _) if s.is_success() => Ok(true),
            (StatusCode::NOT_FOUND, _) => Ok(false),
            (status, body) => Err(self.status(format!("deleting policy {name:?}"), status, body)),
        }
    }

    /// A queue's JSON (`effective_policy_definition`, `messages`, …), `None` if missing.
    pub async fn queue(
        &self,
        vhost: &str,
        name: &str,
    ) -> Result<Option<serde_json::Value>, AdminError> {
        let path = format!("/api/queues/{}/{}", encode(vhost), encode(name));
        self.get_json(&path, format!("reading queue {name:?} on vhost {vhost:?}"))
            .await
    }

    async fn get_json(
        &self,
        path: &str,
        what: String,
    ) -> Result<Option<serde_json::Value>, AdminError> {
        match self.call(Method::GET, path, None).await? {
            (StatusCode::NOT_FOUND, _) => Ok(None),
            (s, body) if s.is_success() => {
                serde_json::from_slice(&body)
                    .map(Some)
                    .map_err(|e| AdminError::BadAnswer {
                        what,
                        why: e.to_string(),
                    })
            }
            (status, body) => Err(self.status(what, status, body)),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, bytes::Bytes), AdminError> {
        let url = format!("{}{path}", self.base);
        let request = Request::builder()
            .method(method)
            .uri(&url)
            .header(hyper::header::AUTHORIZATION, &self.authorization)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.unwrap_or_default()))
            .map_err(|e| AdminError::Url(e.to_string()))?;
        self.client
            .request(request, REQUEST_TIMEOUT)
            .await
            .map_err(|source| AdminError::Unreachable {
                url: self.base.clone(),
                source: Box::new(source),
            })
    }

    fn status(&self, what: String, status: StatusCode, body: bytes::Bytes) -> AdminError {
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return AdminError::Denied {
                url: self.base.clone(),
                status: status.as_u16(),
            };
        }
        // RabbitMQ explains refusals as {"error": …, "reason": …}.
        let text = String::from_utf8_lossy(&body);
        let reason = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["reason"].as_str().map(str::to_owned))
            .unwrap_or_else(|| text.chars().take(300).collect());
        AdminError::Status {
            what,
            status: status.as_u16(),
            body: reason,
        }
    }
}

/// Percent-encodes a path segment (vhost `/` becomes `%2F`).
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes of a URL's userinfo.
fn percent_decode(s: &str) -> Result<String, AdminError> {
    let bad = || AdminError::Url("bad %-escape in the user or password".to_owned());
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_base_and_credentials() {
        let a = Admin::new("http://ad%40min:s%3Acret@rabbit1:15672/").unwrap();
        assert_eq!(a.display(), "http://rabbit1:15672");
        let token = base64::engine::general_purpose::STANDARD.encode("ad@min:s:cret");
        assert_eq!(a.authorization, format!("Basic {token}"));
        let a = Admin::new("http://h:15672/rabbit").unwrap();
        assert_eq!(a.display(), "http://h:15672/rabbit");
        let token = base64::engine::general_purpose::STANDARD.encode("guest:guest");
        assert_eq!(a.authorization, format!("Basic {token}"));
        assert!(Admin::new("amqp://h").is_err());
        assert!(Admin::new("http://u:p@").is_err());
        assert_eq!(encode("/"), "%2F");
        assert_eq!(encode("t-1.dmr-agents"), "t-1.dmr-agents");
    }
}
