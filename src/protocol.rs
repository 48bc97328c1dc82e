//! The wire protocol spoken between agents and servers.
//!
//! Everything that crosses the agent ⇄ server WebSocket is a [`ClientFrame`] or a
//! [`ServerFrame`], encoded with postcard in one binary WebSocket message. Identities
//! ([`AgentId`], [`Kind`]) are validated while decoding, so code past this module can
//! trust them. This is the only module that knows postcard.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The protocol version this build speaks. `Hello` carries it first, so a peer of any
/// version can read it and refuse with a clear reason.
///
/// Version 2: `Welcome` and `Directory` carry the directory as the signed documents
/// ([`DirectoryDocument`]) instead of parsed entries, so agents can verify them; `Challenge`
/// carries `tls_bound`, and the handshake proof may cover the TLS channel (see
/// `crypto::ChannelBinding`).
///
/// Version 3: envelopes use amortised HPKE (`crypto::Sealer`): [`Header`] carries `seq`,
/// the message's number in its sender's epoch, and the HPKE `info` names version 3.
pub const PROTOCOL_VERSION: u16 = 3;

/// Room for frame fields around an envelope's ciphertext (ids, keys, lengths).
pub const FRAME_OVERHEAD: usize = 4 * 1024;

/// `Vec<u8>` fields as one byte string. postcard writes exactly the bytes it writes for a
/// sequence of `u8` (a varint length, then the bytes), so the wire is unchanged; but serde
/// reads and writes a sequence one element call at a time, a loop over every byte of every
/// ciphertext, where a byte string is one copy.
mod byte_string {
    use serde::de::{Deserializer, Error, Visitor};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl Visitor<'_> for Bytes {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(Bytes)
    }
}

/// Why a byte string could not become a value of this module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// The frame is longer than the limit the receiver enforces.
    TooLarge { len: usize, max: usize },
    /// The bytes are not a valid frame (truncated, garbage, invalid ids).
    Malformed(String),
    /// A valid frame followed by bytes that belong to nothing.
    TrailingBytes(usize),
    /// An id that does not match `[A-Za-z0-9._-]{1,64}`.
    InvalidId { what: &'static str, value: String },
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { len, max } => write!(f, "frame of {len} bytes exceeds limit of {max}"),
            Self::Malformed(e) => write!(f, "malformed frame: {e}"),
            Self::TrailingBytes(n) => write!(f, "malformed frame: {n} trailing bytes"),
            Self::InvalidId { what, value } if value.len() <= 80 => write!(
                f,
                "invalid {what} {value:?}: expected 1-64 characters of A-Z a-z 0-9 . _ -"
            ),
            // Quote only the start of a long value, so errors (and the logs and HTTP answers
            // they end up in) stay short whatever a peer or a config file sent.
            Self::InvalidId { what, value } => {
                let mut end = 64;
                while !value.is_char_boundary(end) {
                    end -= 1;
                }
                write!(
                    f,
                    "invalid {what} {:?}… ({} bytes): expected 1-64 characters of A-Z a-z 0-9 . _ -",
                    &value[..end],
                    value.len()
                )
            }
        }
    }
}

impl std::error::Error for ProtocolError {}

fn valid_token(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

macro_rules! token_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates `s` and wraps it.
            pub fn new(s: impl Into<String>) -> Result<Self, ProtocolError> {
                let s = s.into();
                if valid_token(&s) {
                    Ok(Self(s))
                } else {
                    Err(ProtocolError::InvalidId { what: $what, value: s })
                }
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ProtocolError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = ProtocolError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    };
}

token_type!(
    /// An agent's identity: `[A-Za-z0-9._-]{1,64}` (CentOps issues UUIDs, which fit).
    AgentId,
    "agent id"
);

token_type!(
    /// What an envelope carries, e.g. `ChatMessage`; same alphabet as an [`AgentId`].
    Kind,
    "message type"
);

impl Kind {
    /// The kind used when a local service does not name one.
    pub fn chat_message() -> Self {
        Self("ChatMessage".to_owned())
    }

    /// The reserved kind of a delivery receipt (see [`RECEIPT_KIND`]).
    pub fn receipt() -> Self {
        Self(RECEIPT_KIND.to_owned())
    }

    /// Whether this is the receipt kind.
    pub fn is_receipt(&self) -> bool {
        self.0 == RECEIPT_KIND
    }

    /// Kinds starting with `dmr.` are DMR's own; a local service may not send them.
    pub fn is_reserved(&self) -> bool {
        self.0.starts_with(RESERVED_KIND_PREFIX)
    }
}

/// Kinds with this prefix belong to DMR itself (receipts), never to local services.
pub const RESERVED_KIND_PREFIX: &str = "dmr.";

/// The kind of a delivery receipt: an ordinary sealed envelope from the recipient agent
/// back to the sender whose sealed body names the delivered message id. Sealed and
/// authenticated like any message, so the relay cannot forge a "delivered".
pub const RECEIPT_KIND: &str = "dmr.receipt";

/// The largest receipt envelope a relay exempts from its policy's rules and rates (a
/// receipt naming one message is about 250 bytes; a batch stays under this by design).
pub const MAX_RECEIPT_BYTES: usize = 1024;

/// What a server tells a sender about one of its messages the relay dead-lettered
/// (expired, over the delivery limit, refused by the recipient). Sent by the relay, so not
/// authenticated: a hostile relay can claim a failure, never a delivery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// The sender's message that failed.
    pub id: MessageId,
    /// Whom it was addressed to.
    pub recipient: AgentId,
    /// Why, in words (from `x-dmr-reason` or RabbitMQ's `x-death`).
    pub reason: String,
}

impl Notice {
    /// The notice as stored in RabbitMQ (postcard).
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("encoding into a Vec cannot fail")
    }

    /// Parses a notice read back from RabbitMQ.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ProtocolError> {
        decode(bytes, 4096)
    }
}

/// A message's unique id (a UUID), chosen by the sending side.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(pub Uuid);

impl MessageId {
    /// A fresh random (v4) id.
    pub fn random() -> Self {
        Self(Uuid::new_v4())
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The clear metadata of an envelope. The server routes on it; the recipient checks it,
/// because its encoding is the HPKE associated data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub id: MessageId,
    pub sender: AgentId,
    pub recipient: AgentId,
    /// Milliseconds since the Unix epoch, set by the sender.
    pub created_at_ms: u64,
    pub kind: Kind,
    /// The message's number in the sender's HPKE epoch (named by the envelope's `enc`);
    /// its key is derived from it. Set by `crypto::Sealer::seal`, whatever was here.
    pub seq: u64,
}

impl Header {
    /// The exact bytes that bind this header to the ciphertext (HPKE `aad`).
    pub(crate) fn aad(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("encoding into a Vec cannot fail")
    }
}

/// One end-to-end encrypted message: clear header, HPKE encapsulated key, ciphertext.
///
/// Built only by the crypto module's `seal` or by decoding, so it always has a header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    header: Header,
    enc: [u8; 32],
    #[serde(with = "byte_string")]
    ciphertext: Vec<u8>,
}

impl Envelope {
    pub(crate) fn from_parts(header: Header, enc: [u8; 32], ciphertext: Vec<u8>) -> Self {
        Self {
            header,
            enc,
            ciphertext,
        }
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn enc(&self) -> &[u8; 32] {
        &self.enc
    }

    pub fn ciphertext(&self) -> &[u8] {
        &self.ciphertext
    }

    /// The envelope as stored in RabbitMQ.
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("encoding into a Vec cannot fail")
    }

    /// Parses an envelope read back from RabbitMQ, refusing anything over `max` bytes.
    pub fn from_bytes(bytes: &[u8], max: usize) -> Result<Self, ProtocolError> {
        decode(bytes, max)
    }

    /// Encoded size, as counted against `--max-message-bytes`.
    pub fn encoded_len(&self) -> usize {
        postcard::experimental::serialized_size(self).unwrap_or(usize::MAX)
    }

    /// For tests that play a hostile peer: change any part of a sealed envelope.
    #[cfg(feature = "test-support")]
    pub fn tamper(&mut self) -> (&mut Header, &mut [u8; 32], &mut Vec<u8>) {
        (&mut self.header, &mut self.enc, &mut self.ciphertext)
    }
}

/// One directory document exactly as its source published it (the agents file or the
/// CentOps response), with the operator's Ed25519 signature over those exact bytes when the
/// source has one. The server forwards it unchanged; agents verify and parse it themselves,
/// so a relay cannot swap keys without the agents noticing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryDocument {
    #[serde(with = "byte_string")]
    pub json: Vec<u8>,
    pub signature: Option<DirectorySignature>,
}

/// A 64-byte Ed25519 signature over a [`DirectoryDocument`]'s bytes (on the wire: a byte
/// string that must be exactly 64 long).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectorySignature(pub [u8; 64]);

impl Serialize for DirectorySignature {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for DirectorySignature {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = DirectorySignature;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a 64-byte signature")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                <[u8; 64]>::try_from(v)
                    .map(DirectorySignature)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = [0u8; 64];
                for (i, b) in out.iter_mut().enumerate() {
                    *b = seq
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                if seq.next_element::<u8>()?.is_some() {
                    return Err(serde::de::Error::invalid_length(65, &self));
                }
                Ok(DirectorySignature(out))
            }
        }
        d.deserialize_bytes(Visitor)
    }
}

/// The server's limits, told to the agent in `Welcome`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub max_message_bytes: u32,
    pub message_ttl_ms: u64,
}

/// Why the server refused an envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectCode {
    /// The envelope's sender is not the authenticated agent.
    ForgedSender,
    /// The recipient is not in the directory.
    UnknownRecipient,
    /// The envelope is over `--max-message-bytes`.
    TooLarge,
    /// RabbitMQ is not connected; try again later.
    Unavailable,
    /// RabbitMQ refused the publish (nack, return, full queue).
    BrokerRefused,
    /// RabbitMQ did not confirm in time; the message may or may not be stored.
    Timeout,
    // New codes go last: postcard encodes the variant index, so appending keeps every
    // earlier code's bytes (and older peers decoding them) unchanged.
    /// The relay's policy (`--policy-file`) does not allow this sender, recipient and type.
    Forbidden,
    /// The sender is over its policy rate; it may try again after `retry_after_ms`.
    RateLimited { retry_after_ms: u32 },
}

impl RejectCode {
    /// A stable label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ForgedSender => "forged_sender",
            Self::UnknownRecipient => "unknown_recipient",
            Self::TooLarge => "too_large",
            Self::Unavailable => "unavailable",
            Self::BrokerRefused => "broker_refused",
            Self::Timeout => "timeout",
            Self::Forbidden => "forbidden",
            Self::RateLimited { .. } => "rate_limited",
        }
    }
}

/// Frames sent by an agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// First frame. Keep it variant 0 with `version` first: every version must read it.
    Hello {
        version: u16,
        agent_id: AgentId,
    },
    /// The handshake MAC over the transcript (see the crypto module).
    Proof {
        mac: [u8; 32],
    },
    Send {
        envelope: Envelope,
    },
    /// The local service took the delivery (or it is a copy of one it took): forget it.
    Ack {
        delivery: u64,
    },
    /// The delivery can never be delivered (unopenable, stale, refused for good by the local
    /// service): the relay dead-letters it with `reason`. Transient trouble is never a
    /// `Nack`; the agent holds the delivery and retries instead.
    Nack {
        delivery: u64,
        reason: String,
    },
}

/// Frames sent by a server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame {
    Challenge {
        ephemeral_pk: [u8; 32],
        nonce: [u8; 32],
        /// The server terminates TLS and accepts only a proof bound to this TLS connection.
        tls_bound: bool,
    },
    /// `directory`: one document per source (agents file, CentOps), as published.
    Welcome {
        directory: Vec<DirectoryDocument>,
        limits: Limits,
    },
    /// The whole directory, sent again whenever it changes.
    Directory {
        directory: Vec<DirectoryDocument>,
    },
    /// The envelope is durable in RabbitMQ.
    Accepted {
        id: MessageId,
    },
    Rejected {
        id: MessageId,
        code: RejectCode,
        reason: String,
    },
    Deliver {
        delivery: u64,
        envelope: Envelope,
    },
    // New frames go last (postcard encodes the variant index).
    /// The relay dead-lettered the agent's message `id` to `recipient`, for `reason`. The
    /// agent acks it like a delivery. Not authenticated (see [`Notice`]).
    Notice {
        delivery: u64,
        id: MessageId,
        recipient: AgentId,
        reason: String,
    },
}

/// The variant index of `ClientFrame::Send` (postcard writes it as the frame's first byte).
const SEND_TAG: u8 = 2;
/// The variant index of `ServerFrame::Deliver`.
const DELIVER_TAG: u32 = 5;

/// An envelope's clear metadata read from its encoded bytes, which were checked to be a
/// whole, valid envelope (enc and ciphertext are borrowed and skipped, never copied).
#[derive(Deserialize)]
struct EnvelopeView<'a> {
    header: Header,
    _enc: [u8; 32],
    #[serde(borrow)]
    _ciphertext: &'a [u8],
}

impl Envelope {
    /// The header of the encoded envelope `bytes` (at most `max` long), after checking that
    /// the bytes are exactly one valid envelope: what a relay needs to route and check it
    /// without decoding (and copying) the ciphertext.
    pub fn header_of(bytes: &[u8], max: usize) -> Result<Header, ProtocolError> {
        decode::<EnvelopeView>(bytes, max).map(|v| v.header)
    }
}

impl ClientFrame {
    /// The encoded envelope inside `frame` if it is a `Send` (not yet checked: see
    /// [`Envelope::header_of`]). A `Send` frame is its tag followed by the envelope's bytes,
    /// exactly as [`Envelope::to_bytes`] writes them, so a relay can store those bytes as
    /// they came.
    pub fn send_envelope(frame: &[u8]) -> Option<&[u8]> {
        match frame.split_first() {
            Some((&SEND_TAG, envelope)) => Some(envelope),
            _ => None,
        }
    }
}

impl ServerFrame {
    /// Encodes `Deliver { delivery, envelope }` from the envelope's stored bytes, without
    /// decoding them: the frame is postcard's prefix (variant, delivery) followed by the
    /// envelope's own encoding, byte for byte what [`ServerFrame::encode`] writes.
    pub fn encode_deliver(delivery: u64, envelope: &[u8]) -> Vec<u8> {
        // A varint u32 tag and a varint u64 take at most 5 + 10 bytes.
        let mut out = Vec::with_capacity(15 + envelope.len());
        out = postcard::to_extend(&(DELIVER_TAG, delivery), out)
            .expect("encoding into a Vec cannot fail");
        out.extend_from_slice(envelope);
        out
    }
}

macro_rules! frame_codec {
    ($ty:ty) => {
        impl $ty {
            /// Encodes the frame for one binary WebSocket message.
            pub fn encode(&self) -> Vec<u8> {
                postcard::to_allocvec(self).expect("encoding into a Vec cannot fail")
            }

            /// Decodes one frame of at most `max` bytes.
            pub fn decode(bytes: &[u8], max: usize) -> Result<Self, ProtocolError> {
                decode(bytes, max)
            }
        }
    };
}

frame_codec!(ClientFrame);
frame_codec!(ServerFrame);

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], max: usize) -> Result<T, ProtocolError> {
    if bytes.len() > max {
        return Err(ProtocolError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| match e {
        postcard::Error::SerdeDeCustom => ProtocolError::Malformed("invalid id or value".into()),
        other => ProtocolError::Malformed(other.to_string()),
    })?;
    if !rest.is_empty() {
        return Err(ProtocolError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            id: MessageId::random(),
            sender: AgentId::new("police").unwrap(),
            recipient: AgentId::new("tax-board.ee_1").unwrap(),
            created_at_ms: 1_700_000_000_000,
            kind: Kind::chat_message(),
            seq: 0,
        }
    }

    #[test]
    fn agent_ids_are_validated() {
        assert!(AgentId::new("5f0c1b8e-3c1d-4c59-9a65-1d2b2f1e7d10").is_ok());
        assert!(AgentId::new("a").is_ok());
        assert!(AgentId::new("x".repeat(64)).is_ok());
        for bad in ["", "has space", "slash/", "ümlaut", "a\n", &"x".repeat(65)] {
            let err = AgentId::new(bad).unwrap_err();
            assert!(err.to_string().contains("invalid agent id"), "{err}");
        }
        // A huge value is quoted only in part (at a character boundary).
        let huge = format!("a{}{}", "ü".repeat(40), "y".repeat(100_000));
        let err = AgentId::new(huge).unwrap_err().to_string();
        assert!(err.len() < 200, "{err}");
        assert!(
            err.contains("100081 bytes") && err.contains("invalid agent id"),
            "{err}"
        );
    }

    #[test]
    fn byte_strings_keep_the_wire_of_a_byte_sequence() {
        // What the fields encoded as before they were byte strings: a plain `Vec<u8>`.
        let ciphertext: Vec<u8> = (0..=255).chain(0..300).map(|b| b as u8).collect();
        let env = Envelope::from_parts(header(), [7; 32], ciphertext.clone());
        let as_sequence = postcard::to_allocvec(&(env.header(), [7u8; 32], &ciphertext)).unwrap();
        assert_eq!(env.to_bytes(), as_sequence);
        assert_eq!(Envelope::from_bytes(&as_sequence, 1 << 20).unwrap(), env);
        let doc = DirectoryDocument {
            json: b"{\"agents\":[]}".to_vec(),
            signature: None,
        };
        let as_sequence = postcard::to_allocvec(&(&doc.json, None::<()>)).unwrap();
        assert_eq!(postcard::to_allocvec(&doc).unwrap(), as_sequence);
    }

    #[test]
    fn frames_round_trip() {
        let env = Envelope::from_parts(header(), [7; 32], vec![1, 2, 3]);
        let frames = vec![
            ClientFrame::Hello {
                version: PROTOCOL_VERSION,
                agent_id: AgentId::new("a").unwrap(),
            },
            ClientFrame::Proof { mac: [9; 32] },
            ClientFrame::Send {
                envelope: env.clone(),
            },
            ClientFrame::Ack { delivery: 42 },
            ClientFrame::Nack {
                delivery: 43,
                reason: "refused by the local service: 400".into(),
            },
        ];
        for f in frames {
            assert_eq!(ClientFrame::decode(&f.encode(), 1 << 20).unwrap(), f);
        }
        let s = ServerFrame::Deliver {
            delivery: u64::MAX,
            envelope: env,
        };
        assert_eq!(ServerFrame::decode(&s.encode(), 1 << 20).unwrap(), s);
        let d = ServerFrame::Directory {
            directory: vec![
                DirectoryDocument {
                    json: b"[]".to_vec(),
                    signature: Some(DirectorySignature([7; 64])),
                },
                DirectoryDocument {
                    json: b"{}".to_vec(),
                    signature: None,
                },
            ],
        };
        assert_eq!(ServerFrame::decode(&d.encode(), 1 << 20).unwrap(), d);
    }

    #[test]
    fn fast_deliver_encoding_is_byte_identical_to_postcard() {
        for (delivery, len) in [(0, 0), (5, 3), (300, 200), (u64::MAX, 70_000)] {
            let envelope = Envelope::from_parts(header(), [7; 32], vec![0xa5; len]);
            let stored = envelope.to_bytes();
            let fast = ServerFrame::encode_deliver(delivery, &stored);
            let full = ServerFrame::Deliver { delivery, envelope };
            assert_eq!(fast, full.encode());
            // And the agent reads it back as the same frame.
            assert_eq!(ServerFrame::decode(&fast, 1 << 20).unwrap(), full);
        }
    }

    #[test]
    fn send_frames_carry_the_envelope_bytes_as_stored() {
        let envelope = Envelope::from_parts(header(), [3; 32], vec![9; 500]);
        let frame = ClientFrame::Send {
            envelope: envelope.clone(),
        }
        .encode();
        let inner = ClientFrame::send_envelope(&frame).unwrap();
        assert_eq!(inner, envelope.to_bytes());
        assert_eq!(
            Envelope::header_of(inner, 1 << 20).unwrap(),
            *envelope.header()
        );
        assert_eq!(
            ClientFrame::send_envelope(&ClientFrame::Ack { delivery: 2 }.encode()),
            None
        );
    }

    #[test]
    fn header_of_checks_the_whole_envelope() {
        let bytes = Envelope::from_parts(header(), [3; 32], vec![9; 50]).to_bytes();
        // Truncated anywhere (in the header, the enc or the ciphertext): refused.
        for cut in [1, 20, bytes.len() - 40, bytes.len() - 1] {
            assert!(matches!(
                Envelope::header_of(&bytes[..cut], 1024),
                Err(ProtocolError::Malformed(_))
            ));
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            Envelope::header_of(&longer, 1024),
            Err(ProtocolError::TrailingBytes(1))
        );
        assert!(matches!(
            Envelope::header_of(&bytes, 10),
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    #[test]
    fn directory_signatures_must_be_64_bytes() {
        // Directory, one document, json "[]", Some(signature of 63 bytes).
        let mut bytes = vec![2u8, 1, 2, b'[', b']', 1, 63];
        bytes.extend_from_slice(&[0; 63]);
        assert!(matches!(
            ServerFrame::decode(&bytes, 1024),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn decoding_refuses_invalid_ids_inside_frames() {
        // Hand-encode a Hello whose id contains a space.
        let mut bytes = vec![0u8, 1, 5];
        bytes.extend_from_slice(b"a b c");
        assert!(matches!(
            ClientFrame::decode(&bytes, 1024),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn decoding_enforces_size_and_trailing_bytes() {
        let f = ClientFrame::Ack { delivery: 1 }.encode();
        assert_eq!(
            ClientFrame::decode(&f, 1),
            Err(ProtocolError::TooLarge {
                len: f.len(),
                max: 1
            })
        );
        let mut g = f.clone();
        g.push(0);
        assert_eq!(
            ClientFrame::decode(&g, 64),
            Err(ProtocolError::TrailingBytes(1))
        );
    }

    #[test]
    fn reject_codes_keep_their_encoding() {
        // Variant indexes are the wire format: appending codes must not renumber old ones.
        let id = MessageId(Uuid::nil());
        let encoded = |code| {
            let f = ServerFrame::Rejected {
                id,
                code,
                reason: String::new(),
            };
            let bytes = f.encode();
            assert_eq!(ServerFrame::decode(&bytes, 1024).unwrap(), f);
            // Variant 4 (Rejected), the id (length 16 and its bytes), the code, an empty reason.
            bytes[18..bytes.len() - 1].to_vec()
        };
        assert_eq!(encoded(RejectCode::ForgedSender), [0]);
        assert_eq!(encoded(RejectCode::Timeout), [5]);
        assert_eq!(encoded(RejectCode::Forbidden), [6]);
        let limited = RejectCode::RateLimited {
            retry_after_ms: 1500,
        };
        assert_eq!(encoded(limited), [7, 0xdc, 0x0b]);
        assert_eq!(limited.as_str(), "rate_limited");
    }

    #[test]
    fn hello_layout_is_stable_across_versions() {
        // A future server must read `Hello` of this version: variant 0, varint version, id.
        let f = ClientFrame::Hello {
            version: 1,
            agent_id: AgentId::new("ab").unwrap(),
        };
        assert_eq!(f.encode(), vec![0, 1, 2, b'a', b'b']);
    }

    #[test]
    fn random_bytes_never_panic() {
        // Deterministic xorshift so a failure is reproducible.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let valid = ServerFrame::Deliver {
            delivery: 5,
            envelope: Envelope::from_parts(header(), [1; 32], vec![0; 40]),
        }
        .encode();
        for round in 0..20_000 {
            let len = (next() % 300) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 {
                // Mutate a valid frame too, so decoding gets deep, not just past byte one.
                buf = valid.clone();
                let i = (next() as usize) % buf.len();
                buf[i] ^= next() as u8 | 1;
                buf.truncate((next() as usize) % (buf.len() + 1));
            }
            let _ = ClientFrame::decode(&buf, 1 << 16);
            let _ = ServerFrame::decode(&buf, 1 << 16);
            let _ = Envelope::from_bytes(&buf, 1 << 16);
            let _ = Envelope::header_of(&buf, 1 << 16);
        }
    }
}
