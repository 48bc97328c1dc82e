//! The `POST /v1/messages` bodies the load generator sends, by size (`DMR_BENCH_SIZES`).
//!
//! `default` is a realistic forwarded Bürokratt question (≈ 670 bytes of request body:
//! the question, chat metadata, a short history); a number is the whole request body in
//! bytes (`4096`, `4k`, `64k`), reached by padding the same payload with a filler field.

use std::fmt;

/// How large the request bodies of a run are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    Default,
    Bytes(usize),
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => f.write_str("default"),
            Self::Bytes(n) if n % 1024 == 0 => write!(f, "{} KiB", n / 1024),
            Self::Bytes(n) => write!(f, "{n} B"),
        }
    }
}

/// Parses `DMR_BENCH_SIZES` (`default,4k,64k`); unreadable entries are skipped with a note.
pub fn parse_sizes(text: &str) -> Vec<Size> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let size = parse_size(s);
            if size.is_none() {
                eprintln!("DMR_BENCH_SIZES: {s:?} is neither `default` nor a size like 4096 or 64k; skipped");
            }
            size
        })
        .collect()
}

fn parse_size(s: &str) -> Option<Size> {
    if s.eq_ignore_ascii_case("default") {
        return Some(Size::Default);
    }
    let (digits, unit) = match s.strip_suffix(['k', 'K']) {
        Some(d) => (d, 1024),
        None => (s, 1),
    };
    digits.parse::<usize>().ok().map(|n| Size::Bytes(n * unit))
}

/// The payload every size starts from: a question one Bürokratt instance forwards to another.
fn chat_payload() -> serde_json::Value {
    serde_json::json!({
        "question": "Kas maksuvõlg takistab relvaloa saamist? Mul on maksuvõlg ajatatud ja tasun seda graafiku järgi.",
        "chatId": "5f0c1b8e-3c1d-4c59-9a65-1d2b2f1e7d10",
        "lang": "et",
        "channel": "web",
        "authorId": "38001010000",
        "forwardedBy": "Maksu- ja Tolliamet",
        "forwardReason": "Küsimus ei kuulu Maksu- ja Tolliameti pädevusse",
        "history": [
            {"role": "end-user", "text": "Tere! Mul on küsimus relvaloa kohta."},
            {"role": "buerokratt", "text": "Tere! Relvalubadega tegeleb Politsei- ja Piirivalveamet; edastan küsimuse."}
        ],
        "context": {"page": "https://www.emta.ee/eraklient/maksud-ja-tasumine/volad", "intent": "out-of-scope"}
    })
}

/// Builds request bodies of one size: the payload is serialised once, ids differ per message.
pub struct Bodies {
    payload: String,
}

impl Bodies {
    /// Bodies of `size` addressed to recipients with ids of `recipient_len` characters.
    pub fn new(size: Size, recipient_len: usize) -> Self {
        let mut payload = chat_payload();
        let unpadded = Self::with(payload.to_string()).len_for(recipient_len);
        if let Size::Bytes(want) = size {
            // `,"filler":""` adds 12 bytes before the filler itself.
            let filler = want.saturating_sub(unpadded + 12);
            payload["filler"] = "x".repeat(filler).into();
        }
        Self::with(payload.to_string())
    }

    fn with(payload: String) -> Self {
        Self { payload }
    }

    fn len_for(&self, recipient_len: usize) -> usize {
        self.body(&uuid::Uuid::nil().to_string(), &"r".repeat(recipient_len))
            .len()
    }

    /// The request body of message `id` to `recipient`.
    pub fn body(&self, id: &str, recipient: &str) -> String {
        format!(
            r#"{{"id":"{id}","recipientId":"{recipient}","payload":{}}}"#,
            self.payload
        )
    }
}
