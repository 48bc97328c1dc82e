//! The agent's local HTTP API: `POST /v1/messages`, `GET /v1/agents`, health and metrics.
//!
//! Bodies are shaped like the existing Bürokratt DMR agent's. Every refusal is a JSON
//! `{"error": …}` that names the field or condition at fault.
//!
//! A web page open on the agent's machine must not be able to drive the API, so before
//! anything else: a `Host` the API does not answer to gets `421` (DNS rebinding; see
//! [`super::hosts`]), then a missing or wrong token `401`, then a `POST` whose body is not
//! declared `application/json` `415` — a page can send `text/plain` without asking, but
//! `application/json` across origins needs a CORS preflight, which this API never grants.
//! `/healthz`, `/readyz` and `/metrics` skip the `Host` check: probes and scrapers use
//! whatever name reaches them, and these paths change nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::Value;

use super::bodies::{check_fresh, now_ms, Sealed, SendRequest};
use super::hosts::AllowedHosts;
use super::outbox::{dispatch, Dispatched};
use super::Agent;
use crate::http::{self, Body};
use crate::protocol::{Envelope, Header, RejectCode};
/// Time a client has to send the whole request body once its headers arrived (hyper gives
/// the headers the same 10 s), so a stalled upload cannot hold a connection forever.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn route(
    agent: Arc<Agent>,
    hosts: Arc<AllowedHosts>,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let probe = matches!(path.as_str(), "/healthz" | "/readyz" | "/metrics");
    if !probe {
        if let Err(why) = check_host(&hosts, &req) {
            return http::error(StatusCode::MISDIRECTED_REQUEST, why);
        }
    }
    if path.starts_with("/v1/") && !authorized(&agent, &req) {
        return http::error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (Authorization: Bearer …)",
        );
    }
    if req.method() == Method::POST && !probe && !json_body(&req) {
        return http::error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json",
        );
    }
    match (req.method(), path.as_str()) {
        (&Method::POST, "/v1/messages") => send(&agent, req).await,
        (&Method::GET, p) if p.starts_with("/v1/messages/") => {
            super::status::get(&agent, &p["/v1/messages/".len()..])
        }
        (&Method::GET, "/v1/agents") => agents(&agent),
        (&Method::GET, "/v1/health") => health(&agent),
        (&Method::GET, "/healthz") => http::text(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => ready(&agent),
        (&Method::GET, "/metrics") if agent.config.metrics_listen.is_some() => http::error(
            StatusCode::NOT_FOUND,
            "metrics are served on --metrics-listen",
        ),
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

/// Why the request does not name this API (answered `421`): in `Host`, or without one in
/// an absolute URI.
fn check_host(hosts: &AllowedHosts, req: &Request<Incoming>) -> Result<(), &'static str> {
    let host = match req.headers().get(hyper::header::HOST) {
        Some(v) => v.to_str().ok(),
        None => req.uri().authority().map(|a| a.as_str()),
    };
    match host {
        Some(h) if hosts.allows(h) => Ok(()),
        Some(_) => Err(
            "the Host header names neither this API's address nor localhost on \
             its port (the agent's --api-host adds names)",
        ),
        None => Err("no Host header"),
    }
}

/// True when `Content-Type` is `application/json`, parameters (`; charset=utf-8`) allowed.
fn json_body(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

fn authorized(agent: &Agent, req: &Request<Incoming>) -> bool {
    let Some(token) = &agent.config.api_token else {
        return true;
    };
    let token = token.expose();
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
        .map(|a| {
            let mut v = serde_json::json!({"id": a.id, "name": a.name});
            if agent.trust.key_change(&a.id).is_some() {
                v["keyChanged"] = true.into();
            }
            v
        })
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
            "pending": agent.outbox.len(),
        }),
    )
}

/// Ready = connected and authenticated to a server, with a directory this agent trusts. A
/// failing local service does not make the agent unready (it can still send, and holds
/// deliveries), but the body says so.
fn ready(agent: &Agent) -> Response<Body> {
    let linked = agent.link().is_some();
    let no_directory = agent.trust.missing_reason();
    let webhook = match agent.webhook.health.outage() {
        None => serde_json::json!({"up": true}),
        Some((secs, reason)) => {
            serde_json::json!({"up": false, "downForSeconds": secs, "reason": reason})
        }
    };
    let ready = linked && no_directory.is_none();
    let status = match ready {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    let reason = match (linked, no_directory) {
        (false, _) => Some("not connected to a server".to_owned()),
        (true, reason) => reason,
    };
    let body = serde_json::json!({
        "ready": ready,
        "connected": linked,
        "reason": reason,
        "webhook": webhook,
    });
    http::json(status, &body)
}

async fn send(agent: &Agent, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let max = agent.max_message_bytes();
    let read = http::read_body(req.into_body(), max + 64 * 1024);
    let body = match crate::wait::with_timeout(BODY_TIMEOUT, read).await {
        Some(Ok(b)) => b,
        Some(Err(http::BodyError::TooLarge { .. })) => {
            return http::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body over {max} bytes"),
            )
        }
        Some(Err(http::BodyError::Read(_))) => {
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
    let now = now_ms();
    let request = match SendRequest::parse(&body, now) {
        Ok(r) => r,
        Err(e) => return http::error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    // Refused here, where the sender can still be told, rather than dead-lettered on arrival.
    if let Err(e) = check_fresh(request.created_at_ms, agent.config.message_ttl_ms, now) {
        return http::error(StatusCode::BAD_REQUEST, format!("timestamp: {e}"));
    }
    // A repeated id is answered with what became of it, never sent twice.
    if let Some(known) = super::status::lookup(agent, request.id) {
        return http::json(StatusCode::OK, &known);
    }
    let id = request.id;
    let response = match deliver(agent, request).await {
        Ok(status) => http::json(
            StatusCode::ACCEPTED,
            &serde_json::json!({ "id": id.to_string(), "status": status }),
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

/// Seals and sends (or stores) the request; the status for the 202 body.
async fn deliver(agent: &Agent, r: SendRequest) -> Result<&'static str, Refusal> {
    let id = r.id;
    let envelope = seal(agent, r)?;
    let (code, refusal) = match dispatch(agent, envelope).await {
        Dispatched::Sent => {
            agent.metrics.accepted.inc();
            return Ok("sent");
        }
        Dispatched::Queued => return Ok("queued"),
        Dispatched::AlreadyPending => return Ok("queued"),
        Dispatched::Full(n) => (
            "outbox_full",
            Refusal {
                retry_after: Some(30),
                ..unavailable(format!(
                    "the outbox is full ({n} messages wait for a relay, --outbox-max-messages); retry later"
                ))
            },
        ),
        Dispatched::Unstorable(e) => (
            "unstorable",
            unavailable(format!("cannot store the message in the outbox: {e}")),
        ),
        Dispatched::Rejected(code, reason) => (code.as_str(), rejection(code, reason)),
        Dispatched::NoAnswer => (
            "no_answer",
            refuse(
                StatusCode::GATEWAY_TIMEOUT,
                "no confirmation from the server in time; sending again with the same id is safe",
            ),
        ),
    };
    log::debug!("message {id} refused: {}", refusal.message);
    agent
        .metrics
        .rejected
        .get_or_create(&[("code", code)])
        .inc();
    Err(refusal)
}

/// Seals the request to the recipient's current key, within the server's size limit.
fn seal(agent: &Agent, r: SendRequest) -> Result<Envelope, Refusal> {
    let Some(recipient) = agent.directory().get(&r.recipient).cloned() else {
        if let Some(reason) = agent.trust.missing_reason() {
            return Err(unavailable(reason));
        }
        let e = format!("recipientId: unknown agent {}", r.recipient);
        return Err(refuse(StatusCode::NOT_FOUND, e));
    };
    if let Some(change) = agent.trust.key_change(&r.recipient) {
        let e = format!(
            "recipientId: the key of agent {} changed and is not confirmed, so nothing is \
             sealed to it: {}",
            r.recipient,
            change.describe(&r.recipient, agent.state.dir())
        );
        return Err(refuse(StatusCode::CONFLICT, e));
    }
    let plaintext = Sealed::of(&r).to_plaintext();
    let header = Header {
        id: r.id,
        sender: agent.config.id.clone(),
        recipient: r.recipient,
        created_at_ms: r.created_at_ms,
        kind: r.kind,
        seq: 0,
    };
    let envelope = agent
        .sealer
        .seal(&recipient.public_key, header, &plaintext)
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
