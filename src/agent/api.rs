//! The agent's local HTTP API: `POST /v1/messages`, `GET /v1/agents`, health and metrics.
//!
//! Bodies are shaped like the existing Bürokratt DMR agent's. Every refusal is a JSON
//! `{"error": …}` that names the field or condition at fault.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use super::inbox::now_ms;
use super::{Agent, Outcome, Pending};
use crate::crypto;
use crate::http::{self, Body};
use crate::protocol::{AgentId, ClientFrame, Envelope, Header, Kind, MessageId, RejectCode};

/// Largest request body read before the server's own limit is known.
const DEFAULT_MAX_BODY: usize = 1 << 20;
/// Time a client has to send the whole request body once its headers arrived (hyper gives
/// the headers the same 10 s), so a stalled upload cannot hold a connection forever.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn route(agent: Arc<Agent>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if path.starts_with("/v1/") && !authorized(&agent, &req) {
        return http::error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (Authorization: Bearer …)",
        );
    }
    match (req.method(), path.as_str()) {
        (&Method::POST, "/v1/messages") => send(&agent, req).await,
        (&Method::GET, "/v1/agents") => agents(&agent),
        (&Method::GET, "/v1/health") => health(&agent),
        (&Method::GET, "/healthz") => http::text(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => match agent.link().is_some() {
            true => http::text(StatusCode::OK, "text/plain", "ready\n"),
            false => http::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "not connected to a server\n",
            ),
        },
        (&Method::GET, "/metrics") => http::text(
            StatusCode::OK,
            crate::metrics::CONTENT_TYPE,
            agent.metrics.render(),
        ),
        (_, "/v1/messages") => http::error(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        (_, "/v1/agents" | "/v1/health" | "/healthz" | "/readyz" | "/metrics") => {
            http::error(StatusCode::METHOD_NOT_ALLOWED, "use GET")
        }
        _ => http::error(
            StatusCode::NOT_FOUND,
            "no such endpoint; try POST /v1/messages or GET /v1/agents",
        ),
    }
}

fn authorized(agent: &Agent, req: &Request<Incoming>) -> bool {
    let Some(token) = &agent.config.api_token else {
        return true;
    };
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant time, so the token cannot be guessed byte by byte from response times.
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn agents(agent: &Agent) -> Response<Body> {
    let list: Vec<Value> = agent
        .directory()
        .iter()
        .map(|a| serde_json::json!({"id": a.id, "name": a.name}))
        .collect();
    http::json(StatusCode::OK, &Value::Array(list))
}

fn health(agent: &Agent) -> Response<Body> {
    let connected = agent.link().is_some();
    http::json(
        StatusCode::OK,
        &serde_json::json!({
            "status": if connected { "ok" } else { "disconnected" },
            "id": agent.config.id,
            "connected": connected,
            "agents": agent.directory().len(),
            "pending": agent.pending.lock().expect("pending lock").len(),
        }),
    )
}

/// A validated `POST /v1/messages` body.
#[derive(Debug)]
pub struct SendRequest {
    pub id: MessageId,
    pub recipient: AgentId,
    pub kind: Kind,
    pub created_at_ms: u64,
    pub payload: Value,
}

impl SendRequest {
    /// Parses and checks a request body; the error names the field at fault.
    pub fn parse(body: &[u8], now_ms: u64) -> Result<Self, String> {
        let v: Value =
            serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
        let Value::Object(mut o) = v else {
            return Err("body must be a JSON object".into());
        };
        let id = match o.remove("id") {
            None | Some(Value::Null) => MessageId::random(),
            Some(Value::String(s)) => {
                MessageId(Uuid::parse_str(&s).map_err(|e| format!("id: not a UUID: {e}"))?)
            }
            Some(_) => return Err("id: must be a UUID string".into()),
        };
        let recipient = match o.remove("recipientId") {
            Some(Value::String(s)) => AgentId::new(s).map_err(|e| format!("recipientId: {e}"))?,
            Some(_) => return Err("recipientId: must be a string".into()),
            None => return Err("recipientId: required".into()),
        };
        let kind = match o.remove("type") {
            None | Some(Value::Null) => Kind::chat_message(),
            Some(Value::String(s)) => Kind::new(s).map_err(|e| format!("type: {e}"))?,
            Some(_) => return Err("type: must be a string".into()),
        };
        let created_at_ms = match o.remove("timestamp") {
            None | Some(Value::Null) => now_ms,
            Some(Value::String(s)) => parse_timestamp(&s)?,
            Some(_) => return Err("timestamp: must be an ISO-8601 string".into()),
        };
        let payload = o
            .remove("payload")
            .ok_or("payload: required (any JSON value)")?;
        Ok(Self {
            id,
            recipient,
            kind,
            created_at_ms,
            payload,
        })
    }
}

fn parse_timestamp(s: &str) -> Result<u64, String> {
    let t = OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("timestamp: not ISO-8601 (RFC 3339): {e}"))?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| "timestamp: before 1970".into())
}

/// Milliseconds since the epoch as RFC 3339 (UTC).
pub fn format_timestamp(ms: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

async fn send(agent: &Agent, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let max = agent
        .limits()
        .map_or(DEFAULT_MAX_BODY, |l| l.max_message_bytes as usize);
    let read = http::read_body(req.into_body(), max + 64 * 1024);
    let body = match crate::wait::with_timeout(BODY_TIMEOUT, read).await {
        Some(Ok(b)) => b,
        Some(Err(true)) => {
            return http::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body over {max} bytes"),
            )
        }
        Some(Err(false)) => {
            return http::error(StatusCode::BAD_REQUEST, "could not read the request body")
        }
        None => {
            return http::error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request body not received within {} s",
                    BODY_TIMEOUT.as_secs()
                ),
            )
        }
    };
    let request = match SendRequest::parse(&body, now_ms()) {
        Ok(r) => r,
        Err(e) => return http::error(StatusCode::BAD_REQUEST, e),
    };
    let response = match deliver(agent, request).await {
        Ok(id) => http::json(
            StatusCode::ACCEPTED,
            &serde_json::json!({ "id": id.to_string() }),
        ),
        Err(r) => r.into_response(),
    };
    agent
        .metrics
        .send_seconds
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Why a send was refused; becomes a JSON error response at the edge.
struct Refusal {
    status: StatusCode,
    message: String,
    /// Seconds for `Retry-After` (503 says 5 unless told otherwise).
    retry_after: Option<u64>,
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
        retry_after: None,
    }
}

fn unavailable(message: impl Into<String>) -> Refusal {
    refuse(StatusCode::SERVICE_UNAVAILABLE, message)
}

impl Refusal {
    fn into_response(self) -> Response<Body> {
        let unavailable = self.status == StatusCode::SERVICE_UNAVAILABLE;
        let retry = self.retry_after.or(unavailable.then_some(5));
        let mut r = http::error(self.status, self.message);
        if let Some(secs) = retry {
            r.headers_mut().insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from(secs),
            );
        }
        r
    }
}

async fn deliver(agent: &Agent, r: SendRequest) -> Result<MessageId, Refusal> {
    let Some(link) = agent.link() else {
        return Err(unavailable("not connected to a DMR server; retry later"));
    };
    let id = r.id;
    let envelope = seal(agent, r)?;
    let (reply, answer) = async_channel::bounded(1);
    {
        let mut pending = agent.pending.lock().expect("pending lock");
        if pending.contains_key(&id) {
            let e = format!("id: message {id} is already being sent");
            return Err(refuse(StatusCode::CONFLICT, e));
        }
        let envelope = envelope.clone();
        pending.insert(id, Pending { envelope, reply });
    }
    agent.metrics.sent.inc();
    // If this link has just dropped, the envelope stays pending and the next link sends it.
    let _ = link.frames.send(ClientFrame::Send { envelope }).await;
    let outcome = crate::wait::with_timeout(agent.config.send_timeout, answer.recv()).await;
    agent.pending.lock().expect("pending lock").remove(&id);
    let (code, response) = match outcome {
        Some(Ok(Outcome::Accepted)) => {
            agent.metrics.accepted.inc();
            return Ok(id);
        }
        Some(Ok(Outcome::Rejected(code, reason))) => (code.as_str(), rejection(code, reason)),
        _ => (
            "no_answer",
            refuse(
                StatusCode::GATEWAY_TIMEOUT,
                "no confirmation from the server in time; sending again with the same id is safe",
            ),
        ),
    };
    agent
        .metrics
        .rejected
        .get_or_create(&[("code", code)])
        .inc();
    Err(response)
}

/// Seals the request to the recipient's current key, within the server's size limit.
fn seal(agent: &Agent, r: SendRequest) -> Result<Envelope, Refusal> {
    let Some(recipient) = agent.directory().get(&r.recipient).cloned() else {
        let e = format!("recipientId: unknown agent {}", r.recipient);
        return Err(refuse(StatusCode::NOT_FOUND, e));
    };
    let header = Header {
        id: r.id,
        sender: agent.config.id.clone(),
        recipient: r.recipient,
        created_at_ms: r.created_at_ms,
        kind: r.kind,
    };
    let plaintext = serde_json::to_vec(&r.payload).expect("a Value always serializes");
    let envelope = crypto::seal(&agent.key, &recipient.public_key, header, &plaintext)
        .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match agent.limits() {
        Some(l) if envelope.encoded_len() > l.max_message_bytes as usize => Err(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "encrypted message over the server's limit of {} bytes",
                l.max_message_bytes
            ),
        )),
        _ => Ok(envelope),
    }
}

fn rejection(code: RejectCode, reason: String) -> Refusal {
    match code {
        RejectCode::UnknownRecipient => {
            refuse(StatusCode::NOT_FOUND, format!("recipientId: {reason}"))
        }
        RejectCode::TooLarge => refuse(StatusCode::PAYLOAD_TOO_LARGE, reason),
        RejectCode::Unavailable | RejectCode::BrokerRefused => unavailable(reason),
        RejectCode::Timeout => refuse(
            StatusCode::GATEWAY_TIMEOUT,
            format!("{reason}; sending again with the same id is safe"),
        ),
        RejectCode::ForgedSender => refuse(StatusCode::INTERNAL_SERVER_ERROR, reason),
        RejectCode::Forbidden => refuse(StatusCode::FORBIDDEN, reason),
        RejectCode::RateLimited { retry_after_ms } => Refusal {
            // Whole seconds, rounded up, so a client waiting them finds a token there.
            retry_after: Some(u64::from(retry_after_ms).div_ceil(1000).max(1)),
            ..refuse(StatusCode::TOO_MANY_REQUESTS, reason)
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_minimal_and_full_bodies() {
        let r = SendRequest::parse(br#"{"recipientId":"tax","payload":{"q":"hi"}}"#, 42).unwrap();
        assert_eq!(r.recipient.as_str(), "tax");
        assert_eq!(r.kind.as_str(), "ChatMessage");
        assert_eq!(r.created_at_ms, 42);
        let full = br#"{"id":"5f0c1b8e-3c1d-4c59-9a65-1d2b2f1e7d10","recipientId":"tax","type":"Question","timestamp":"2025-01-02T03:04:05.678Z","payload":"x"}"#;
        let r = SendRequest::parse(full, 0).unwrap();
        assert_eq!(r.id.to_string(), "5f0c1b8e-3c1d-4c59-9a65-1d2b2f1e7d10");
        assert_eq!(
            format_timestamp(r.created_at_ms),
            "2025-01-02T03:04:05.678Z"
        );
    }

    #[test]
    fn errors_name_the_field() {
        for (body, field) in [
            (&br#"[1]"#[..], "object"),
            (br#"{"payload":1}"#, "recipientId"),
            (br#"{"recipientId":"a b","payload":1}"#, "recipientId"),
            (br#"{"recipientId":"a"}"#, "payload"),
            (br#"{"recipientId":"a","payload":1,"id":"nope"}"#, "id"),
            (
                br#"{"recipientId":"a","payload":1,"timestamp":"yesterday"}"#,
                "timestamp",
            ),
            (br#"{"recipientId":"a","payload":1,"type":7}"#, "type"),
            (br#"{not json"#, "JSON"),
        ] {
            let e = SendRequest::parse(body, 0).unwrap_err();
            assert!(e.contains(field), "{e} should mention {field}");
        }
    }
}
