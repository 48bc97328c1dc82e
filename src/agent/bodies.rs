//! The agent's JSON bodies: the `POST /v1/messages` request it accepts and the webhook body
//! it delivers, and the clock and RFC 3339 timestamps both of them carry.
//!
//! Kept apart from `api` and `inbox` so that the two edges share the shapes (shaped like the
//! existing Bürokratt DMR agent's) without depending on each other.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::protocol::{AgentId, Header, Kind, MessageId};

/// A validated `POST /v1/messages` body.
#[derive(Debug)]
pub struct SendRequest {
    pub id: MessageId,
    pub recipient: AgentId,
    pub kind: Kind,
    pub created_at_ms: u64,
    /// The payload's JSON text as the local service wrote it: checked to be JSON, sealed as
    /// it is, never built into a tree.
    pub payload: Box<RawValue>,
    /// The message this one answers (`inReplyTo`), sealed with the payload.
    pub in_reply_to: Option<MessageId>,
    /// The conversation it belongs to (`conversationId`, at most 128 characters), sealed.
    pub conversation_id: Option<String>,
}

/// Longest `conversationId`, in characters.
pub const MAX_CONVERSATION_ID_CHARS: usize = 128;

/// Why a `POST /v1/messages` body was refused; the text names the field at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendRequestError {
    /// The body does not parse as JSON.
    NotJson(String),
    /// The body is JSON, but not an object.
    NotObject,
    /// A field is missing or malformed; `problem` says how.
    Field {
        field: &'static str,
        problem: String,
    },
}

impl fmt::Display for SendRequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotJson(e) => write!(f, "body is not JSON: {e}"),
            Self::NotObject => f.write_str("body must be a JSON object"),
            Self::Field { field, problem } => write!(f, "{field}: {problem}"),
        }
    }
}

impl std::error::Error for SendRequestError {}

fn bad(field: &'static str, problem: impl fmt::Display) -> SendRequestError {
    SendRequestError::Field {
        field,
        problem: problem.to_string(),
    }
}

/// The fields of a `POST /v1/messages` body, before their checks. The small ones become
/// values (a JSON `null` counts as absent); the payload stays text. Other fields are ignored.
#[derive(Deserialize)]
struct RequestFields<'a> {
    id: Option<Value>,
    #[serde(rename = "recipientId")]
    recipient: Option<Value>,
    #[serde(rename = "type")]
    kind: Option<Value>,
    timestamp: Option<Value>,
    /// Present whenever the body has it, `null` included (a payload may be any JSON).
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(rename = "inReplyTo")]
    in_reply_to: Option<Value>,
    #[serde(rename = "conversationId")]
    conversation_id: Option<Value>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Deepest nesting of arrays and objects a payload may have: what serde_json allowed when
/// the agents still parsed payloads into trees (its limit of 128, less the body around the
/// payload). Kept because a local service's parser may have less stack than that.
pub const MAX_PAYLOAD_DEPTH: usize = 126;

/// What serde_json's tree parser refused in a payload and its raw reader lets through:
/// nesting deeper than [`MAX_PAYLOAD_DEPTH`], and a `\u` escape of half a surrogate pair
/// (no Unicode character; many parsers fail on it). `json` is valid JSON otherwise.
/// Numbers are passed as written, also beyond what an `f64` holds: JSON sets no limit.
fn check_payload(json: &str) -> Result<(), String> {
    let bytes = json.as_bytes();
    let (mut depth, mut i) = (0usize, 0);
    while let Some(&b) = bytes.get(i) {
        i += 1;
        match b {
            b'"' => i = string_end(bytes, i)?,
            b'[' | b'{' if depth == MAX_PAYLOAD_DEPTH => {
                return Err(format!(
                    "nested deeper than {MAX_PAYLOAD_DEPTH} levels of JSON arrays and objects"
                ))
            }
            b'[' | b'{' => depth += 1,
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Just past the end of the JSON string whose text starts at `i`, after checking its `\u`
/// escapes. Jumps from quote or backslash to the next (most of a payload is string text).
fn string_end(bytes: &[u8], mut i: usize) -> Result<usize, String> {
    let rest = |i: usize| bytes.get(i..).unwrap_or_default();
    while let Some(at) = memchr::memchr2(b'"', b'\\', rest(i)) {
        i += at + 1;
        if bytes[i - 1] == b'"' {
            return Ok(i);
        }
        if bytes.get(i) != Some(&b'u') {
            i += 1;
            continue;
        }
        let unit = hex4(bytes, i + 1);
        i += 5;
        let low =
            rest(i).starts_with(b"\\u") && matches!(hex4(bytes, i + 2), Some(0xDC00..=0xDFFF));
        match unit {
            Some(0xD800..=0xDBFF) if low => i += 6,
            Some(0xD800..=0xDFFF) => {
                return Err("a \\u escape of half a surrogate pair (no character)".into())
            }
            _ => {}
        }
    }
    Ok(bytes.len())
}

/// The four hex digits at `at` as a UTF-16 code unit.
fn hex4(bytes: &[u8], at: usize) -> Option<u16> {
    let digits = std::str::from_utf8(bytes.get(at..at + 4)?).ok()?;
    u16::from_str_radix(digits, 16).ok()
}

/// Whether `json` is an object: serde reads a struct from an array as well, by position.
fn is_object(json: &[u8]) -> bool {
    json.trim_ascii_start().first() == Some(&b'{')
}

impl SendRequest {
    /// Parses and checks a request body; absent optional fields get their defaults
    /// (a random id, `ChatMessage`, `now_ms`). The error names the field at fault.
    pub fn parse(body: &[u8], now_ms: u64) -> Result<Self, SendRequestError> {
        let not_json = |e: serde_json::Error| SendRequestError::NotJson(e.to_string());
        if !is_object(body) {
            serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(not_json)?;
            return Err(SendRequestError::NotObject);
        }
        let f: RequestFields = serde_json::from_slice(body).map_err(not_json)?;
        let payload = f
            .payload
            .ok_or_else(|| bad("payload", "required (any JSON value)"))?;
        check_payload(payload.get()).map_err(|problem| bad("payload", problem))?;
        Ok(Self {
            id: id(f.id)?,
            recipient: recipient(f.recipient)?,
            kind: kind(f.kind)?,
            created_at_ms: created_at(f.timestamp, now_ms)?,
            payload: payload.to_owned(),
            in_reply_to: in_reply_to(f.in_reply_to)?,
            conversation_id: conversation_id(f.conversation_id)?,
        })
    }
}

fn id(v: Option<Value>) -> Result<MessageId, SendRequestError> {
    match v {
        None | Some(Value::Null) => Ok(MessageId::random()),
        Some(Value::String(s)) => Uuid::parse_str(&s)
            .map(MessageId)
            .map_err(|e| bad("id", format!("not a UUID: {e}"))),
        Some(_) => Err(bad("id", "must be a UUID string")),
    }
}

fn recipient(v: Option<Value>) -> Result<AgentId, SendRequestError> {
    match v {
        Some(Value::String(s)) => AgentId::new(s).map_err(|e| bad("recipientId", e)),
        Some(_) => Err(bad("recipientId", "must be a string")),
        None => Err(bad("recipientId", "required")),
    }
}

fn kind(v: Option<Value>) -> Result<Kind, SendRequestError> {
    match v {
        None | Some(Value::Null) => Ok(Kind::chat_message()),
        Some(Value::String(s)) => match Kind::new(s).map_err(|e| bad("type", e))? {
            k if k.is_reserved() => Err(bad(
                "type",
                format!("{k} is reserved: types starting with \"dmr.\" are DMR's own"),
            )),
            k => Ok(k),
        },
        Some(_) => Err(bad("type", "must be a string")),
    }
}

fn in_reply_to(v: Option<Value>) -> Result<Option<MessageId>, SendRequestError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Uuid::parse_str(&s)
            .map(|u| Some(MessageId(u)))
            .map_err(|e| bad("inReplyTo", format!("not a message id (UUID): {e}"))),
        Some(_) => Err(bad("inReplyTo", "must be a message id (UUID string)")),
    }
}

fn conversation_id(v: Option<Value>) -> Result<Option<String>, SendRequestError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Err(bad("conversationId", "must not be empty")),
        Some(Value::String(s)) if s.chars().count() > MAX_CONVERSATION_ID_CHARS => Err(bad(
            "conversationId",
            format!("longer than {MAX_CONVERSATION_ID_CHARS} characters"),
        )),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(bad("conversationId", "must be a string")),
    }
}

/// What the sender's agent seals: the payload and the correlation fields, so the relay
/// sees neither. Encoded as `{"payload":…, "inReplyTo"?:…, "conversationId"?:…}`.
///
/// The payload is carried as JSON text from the request to the plaintext and from the
/// plaintext to the webhook body: checked on each side, never built into a tree.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Sealed<'a> {
    pub payload: &'a RawValue,
    #[serde(rename = "inReplyTo", skip_serializing_if = "Option::is_none")]
    pub in_reply_to: Option<MessageId>,
    #[serde(rename = "conversationId", skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
}

/// The correlation wrapper as read back: exactly these fields, `payload` required. The
/// correlation fields are read leniently (a malformed one is dropped, as before sealing it
/// could not have been).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wrapped<'a> {
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(rename = "inReplyTo")]
    in_reply_to: Option<Value>,
    #[serde(rename = "conversationId")]
    conversation_id: Option<Value>,
}

impl<'a> Sealed<'a> {
    pub(super) fn of(r: &'a SendRequest) -> Self {
        Self {
            payload: &r.payload,
            in_reply_to: r.in_reply_to,
            conversation_id: r.conversation_id.clone(),
        }
    }

    /// The plaintext to seal.
    pub(super) fn to_plaintext(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a raw payload and strings always serialize")
    }

    /// Reads an opened plaintext. An object with `payload` and nothing but the correlation
    /// fields is this format; any other JSON is a bare payload (what protocol version 1
    /// agents and simple test peers seal).
    pub(super) fn from_plaintext(plaintext: &'a [u8]) -> Result<Self, serde_json::Error> {
        let sealed = Self::read(plaintext)?;
        check_payload(sealed.payload.get())
            .map_err(|problem| serde::de::Error::custom(format!("the payload has {problem}")))?;
        Ok(sealed)
    }

    fn read(plaintext: &'a [u8]) -> Result<Self, serde_json::Error> {
        if is_object(plaintext) {
            if let Ok(w) = serde_json::from_slice::<Wrapped>(plaintext) {
                return Ok(Self {
                    payload: w.payload,
                    in_reply_to: in_reply_to(w.in_reply_to).ok().flatten(),
                    conversation_id: conversation_id(w.conversation_id).ok().flatten(),
                });
            }
        }
        Ok(Self {
            payload: serde_json::from_slice(plaintext)?,
            in_reply_to: None,
            conversation_id: None,
        })
    }
}

fn created_at(v: Option<Value>, now_ms: u64) -> Result<u64, SendRequestError> {
    match v {
        None | Some(Value::Null) => Ok(now_ms),
        Some(Value::String(s)) => parse_timestamp(&s),
        Some(_) => Err(bad("timestamp", "must be an ISO-8601 string")),
    }
}

/// The `POST <deliver-url>` body for an opened message.
pub(super) fn webhook_body(h: &Header, sealed: &Sealed) -> Bytes {
    #[derive(Serialize)]
    struct Body<'a> {
        id: MessageId,
        #[serde(rename = "senderId")]
        sender: &'a AgentId,
        #[serde(rename = "recipientId")]
        recipient: &'a AgentId,
        timestamp: String,
        #[serde(rename = "type")]
        kind: &'a Kind,
        #[serde(flatten)]
        sealed: &'a Sealed<'a>,
    }
    let body = Body {
        id: h.id,
        sender: &h.sender,
        recipient: &h.recipient,
        timestamp: format_timestamp(h.created_at_ms),
        kind: &h.kind,
        sealed,
    };
    Bytes::from(serde_json::to_vec(&body).expect("a webhook body always serializes"))
}

/// Accepted clock difference between agents.
pub(super) const CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

/// A creation time outside the freshness window.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Stale {
    pub created_at_ms: u64,
    pub now_ms: u64,
    pub ttl_ms: u64,
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (when, now) = (self.created_at_ms as i128, self.now_ms as i128);
        let relative = match when <= now {
            true => format!("{} s ago", (now - when) / 1000),
            false => format!("{} s in the future", (when - now) / 1000),
        };
        write!(
            f,
            "created {relative}, outside the accepted window of at most {} s old \
             (--message-ttl) and {} s ahead (clock skew)",
            (self.ttl_ms + CLOCK_SKEW_MS) / 1000,
            CLOCK_SKEW_MS / 1000
        )
    }
}

/// Whether a message created at `created_at_ms` is within `ttl_ms` (plus clock skew) before
/// `now`, and not further in the future than the skew. The sender's API and the recipient
/// apply the same window, so a message the API accepts is not stale on arrival.
pub(super) fn check_fresh(created_at_ms: u64, ttl_ms: u64, now: u64) -> Result<(), Stale> {
    let oldest = now.saturating_sub(ttl_ms.saturating_add(CLOCK_SKEW_MS));
    let newest = now.saturating_add(CLOCK_SKEW_MS);
    match (oldest..=newest).contains(&created_at_ms) {
        true => Ok(()),
        false => Err(Stale {
            created_at_ms,
            now_ms: now,
            ttl_ms,
        }),
    }
}

/// Milliseconds since the Unix epoch, by this machine's clock.
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reads an RFC 3339 timestamp as milliseconds since the epoch.
fn parse_timestamp(s: &str) -> Result<u64, SendRequestError> {
    let t = OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| bad("timestamp", format!("not ISO-8601 (RFC 3339): {e}")))?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| bad("timestamp", "before 1970"))
}

/// Milliseconds since the epoch as RFC 3339 (UTC).
pub(super) fn format_timestamp(ms: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A `ChatMessage` header from `police` to `tax`, for the agent's unit tests.
    pub(in crate::agent) fn header(created_at_ms: u64) -> Header {
        Header {
            id: MessageId::random(),
            sender: AgentId::new("police").unwrap(),
            recipient: AgentId::new("tax").unwrap(),
            created_at_ms,
            kind: Kind::chat_message(),
            seq: 0,
        }
    }

    #[test]
    fn parses_minimal_and_full_bodies() {
        let r = SendRequest::parse(br#"{"recipientId":"tax","payload":{"q":"hi"}}"#, 42).unwrap();
        assert_eq!(r.recipient.as_str(), "tax");
        assert_eq!(r.kind.as_str(), "ChatMessage");
        assert_eq!(r.created_at_ms, 42);
        // The payload is kept as the service wrote it; a null payload is a payload.
        assert_eq!(r.payload.get(), r#"{"q":"hi"}"#);
        let r = SendRequest::parse(br#" {"payload" : null, "recipientId":"tax"}"#, 0).unwrap();
        assert_eq!(r.payload.get(), "null");
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
            (
                br#"{"recipientId":"a","payload":1,"timestamp":"1969-12-31T23:59:59Z"}"#,
                "timestamp",
            ),
            (br#"{"recipientId":"a","payload":1,"type":7}"#, "type"),
            (br#"{not json"#, "JSON"),
            (br#"[1"#, "JSON"),
            (br#"{"recipientId":"a","payload":1} trailing"#, "JSON"),
        ] {
            let e = SendRequest::parse(body, 0).unwrap_err().to_string();
            assert!(e.contains(field), "{e} should mention {field}");
        }
    }

    #[test]
    fn payloads_nest_no_deeper_and_escape_no_worse_than_before() {
        let body = |payload: String| format!(r#"{{"recipientId":"a","payload":{payload}}}"#);
        assert!(SendRequest::parse(body(nested(MAX_PAYLOAD_DEPTH)).as_bytes(), 0).is_ok());
        let e = SendRequest::parse(body(nested(MAX_PAYLOAD_DEPTH + 1)).as_bytes(), 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("payload: nested deeper") && e.contains("JSON"),
            "{e}"
        );
        // Brackets inside strings, escaped quotes included, are text, not nesting.
        let strings = format!(r#"[{{"a":"{}\"{}"}}]"#, "[".repeat(200), "{".repeat(200));
        assert!(check_payload(&strings).is_ok());
        // Escaped and quoted brackets do not count: this is as deep as allowed, one more
        // level is not.
        let deep = nested(MAX_PAYLOAD_DEPTH - 1);
        let at_limit = format!(r#"["\\u005b\"[", "{}", {deep}]"#, "[".repeat(300));
        assert!(check_payload(&at_limit).is_ok());
        assert!(check_payload(&format!("[{at_limit}]")).is_err());
        // Half a surrogate pair is refused; a whole pair, and the same text escaped, pass.
        for (json, ok) in [
            (r#""\ud83d\ude00""#, true),
            (r#""\\ud800""#, true),
            (r#""\ud800""#, false),
            (r#""\ud800\u0041""#, false),
            (r#""\udc00""#, false),
            (r#"{"q":"h\ud800I"}"#, false),
            (r#""\ud83d""#, false),
        ] {
            assert_eq!(check_payload(json).is_ok(), ok, "{json}");
            let body = format!(r#"{{"recipientId":"a","payload":{json}}}"#);
            let parsed = SendRequest::parse(body.as_bytes(), 0);
            assert_eq!(parsed.is_ok(), ok, "{json}: {parsed:?}");
        }
    }

    #[test]
    fn the_freshness_window_is_ttl_plus_skew_back_and_skew_ahead_without_overflow() {
        let (ttl, now) = (60_000, 10_000_000);
        assert!(check_fresh(now, ttl, now).is_ok());
        assert!(check_fresh(now - ttl - CLOCK_SKEW_MS, ttl, now).is_ok());
        assert!(check_fresh(now - ttl - CLOCK_SKEW_MS - 1, ttl, now).is_err());
        assert!(check_fresh(now + CLOCK_SKEW_MS, ttl, now).is_ok());
        let ahead = check_fresh(now + CLOCK_SKEW_MS + 1, ttl, now).unwrap_err();
        assert!(ahead.to_string().contains("in the future"), "{ahead}");
        assert!(check_fresh(0, u64::MAX, u64::MAX).is_ok());
        assert!(check_fresh(u64::MAX, 0, 0).is_err());
    }

    fn bare(payload: &RawValue) -> Sealed<'_> {
        Sealed {
            payload,
            in_reply_to: None,
            conversation_id: None,
        }
    }

    /// The number 1 inside `n` nested arrays.
    fn nested(n: usize) -> String {
        format!("{}1{}", "[".repeat(n), "]".repeat(n))
    }

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).unwrap()
    }

    /// What a plaintext opens as, with the payload as its JSON text.
    fn read_back(plaintext: &[u8]) -> (String, Option<MessageId>, Option<String>) {
        let s = Sealed::from_plaintext(plaintext).unwrap();
        (s.payload.get().to_owned(), s.in_reply_to, s.conversation_id)
    }

    #[test]
    fn correlation_fields_are_checked_sealed_and_shown() {
        let r = SendRequest::parse(
            br#"{"recipientId":"tax","payload":{"payload":1},"inReplyTo":"5f0c1b8e-3c1d-4c59-9a65-1d2b2f1e7d10","conversationId":"case-7"}"#,
            0,
        )
        .unwrap();
        let sealed = Sealed::of(&r);
        let plaintext = sealed.to_plaintext();
        let opened = Sealed::from_plaintext(&plaintext).unwrap();
        assert_eq!(opened.payload.get(), r#"{"payload":1}"#);
        assert_eq!(opened.in_reply_to, r.in_reply_to);
        assert_eq!(opened.conversation_id.as_deref(), Some("case-7"));
        let body: Value = serde_json::from_slice(&webhook_body(&header(0), &opened)).unwrap();
        assert_eq!(body["inReplyTo"], "5f0c1b8e-3c1d-4c59-9a65-1d2b2f1e7d10");
        assert_eq!(body["conversationId"], "case-7");
        assert_eq!(body["payload"], serde_json::json!({"payload": 1}));
        // A bare payload (a version 1 peer) still opens.
        assert_eq!(
            read_back(br#"{"q":1}"#),
            (r#"{"q":1}"#.to_owned(), None, None)
        );
        assert_eq!(read_back(b" [1, 2] "), ("[1, 2]".to_owned(), None, None));
        // A wrapper with anything else in it is a bare payload too; a malformed correlation
        // field is dropped, the payload kept.
        let extra = br#"{"payload":1,"other":2}"#;
        assert_eq!(
            read_back(extra),
            (r#"{"payload":1,"other":2}"#.to_owned(), None, None)
        );
        let bad_reply = br#"{"payload":{"a":[1]},"inReplyTo":"nope"}"#;
        assert_eq!(
            read_back(bad_reply),
            (r#"{"a":[1]}"#.to_owned(), None, None)
        );
        assert!(Sealed::from_plaintext(b"{\"payload\":").is_err());
        assert!(Sealed::from_plaintext(b"not json").is_err());
        // As deep as a request may nest it opens; deeper is refused, bare or wrapped.
        let deepest = format!(r#"{{"payload":{}}}"#, nested(MAX_PAYLOAD_DEPTH));
        assert!(Sealed::from_plaintext(deepest.as_bytes()).is_ok());
        for deeper in [
            format!(r#"{{"payload":{}}}"#, nested(MAX_PAYLOAD_DEPTH + 1)),
            nested(MAX_PAYLOAD_DEPTH + 1),
        ] {
            let e = Sealed::from_plaintext(deeper.as_bytes()).unwrap_err();
            assert!(e.to_string().contains("nested deeper"), "{e}");
        }
        let long = "x".repeat(129);
        for (extra, field) in [
            (r#""inReplyTo":"nope""#.to_owned(), "inReplyTo"),
            (r#""inReplyTo":7"#.to_owned(), "inReplyTo"),
            (format!(r#""conversationId":"{long}""#), "conversationId"),
            (r#""conversationId":"""#.to_owned(), "conversationId"),
            (r#""conversationId":{}"#.to_owned(), "conversationId"),
            (r#""type":"dmr.receipt""#.to_owned(), "type"),
        ] {
            let body = format!(r#"{{"recipientId":"a","payload":1,{extra}}}"#);
            let e = SendRequest::parse(body.as_bytes(), 0)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(field), "{e} should name {field}");
        }
    }

    #[test]
    fn webhook_body_carries_the_header_and_payload() {
        let h = header(1_735_787_045_678);
        let body: Value =
            serde_json::from_slice(&webhook_body(&h, &bare(&raw(r#"{"q":1}"#)))).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "id": h.id.to_string(),
                "senderId": "police",
                "recipientId": "tax",
                "timestamp": "2025-01-02T03:04:05.678Z",
                "type": "ChatMessage",
                "payload": {"q": 1},
            })
        );
    }
}
