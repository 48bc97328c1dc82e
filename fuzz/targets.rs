//! The fuzz targets: one function per decoder that reads untrusted bytes. Shared, by
//! `#[path]`, between the libFuzzer binaries in `fuzz/fuzz_targets/` (long coverage-guided
//! runs, see docs/SECURITY.md "Fuzzing") and the bounded stable run in `tests/fuzz.rs`.
//!
//! Each target must return normally for every input. It panics only on a real bug:
//! a panic inside the decoder, an error with an empty message, a value that does not survive
//! its own encoding, a secret in an error message, or an envelope that opens when it should
//! not.
#![allow(dead_code)]

use std::fmt::Display;
use std::sync::OnceLock;

use dmr::agent::SendRequest;
use dmr::crypto::{Opener, PublicKey, SecretKey};
use dmr::directory::Directory;
use dmr::protocol::{AgentId, ClientFrame, Envelope, ServerFrame};

/// The frame limit the targets decode with (the real one is max-message-bytes + 4 KiB).
pub const MAX_FRAME: usize = 64 * 1024;

/// Every refusal must say something.
fn check_error(what: &str, e: &impl Display) -> String {
    let message = e.to_string();
    assert!(
        !message.trim().is_empty(),
        "{what} refused its input with an empty error message"
    );
    message
}

pub fn client_frame(data: &[u8]) {
    match ClientFrame::decode(data, MAX_FRAME) {
        Ok(frame) => {
            let again = ClientFrame::decode(&frame.encode(), MAX_FRAME);
            assert_eq!(
                again.as_ref(),
                Ok(&frame),
                "ClientFrame does not round-trip"
            );
        }
        Err(e) => {
            check_error("ClientFrame::decode", &e);
        }
    }
}

pub fn server_frame(data: &[u8]) {
    match ServerFrame::decode(data, MAX_FRAME) {
        Ok(frame) => {
            let again = ServerFrame::decode(&frame.encode(), MAX_FRAME);
            assert_eq!(
                again.as_ref(),
                Ok(&frame),
                "ServerFrame does not round-trip"
            );
            // What an agent does with a directory a server announces.
            if let ServerFrame::Welcome { directory, .. } | ServerFrame::Directory { directory } =
                &frame
            {
                // Documents that parse merge into one directory; none may panic.
                let parsed: Vec<_> = directory
                    .iter()
                    .filter_map(|doc| dmr::directory::parse(&doc.json).ok())
                    .collect();
                let _ = Directory::merge(&parsed);
            }
        }
        Err(e) => {
            check_error("ServerFrame::decode", &e);
        }
    }
}

/// The recipient's opener (with its context cache, as the agent holds one) and a sender
/// key for `envelope`: random envelopes must never open under them.
fn keys() -> &'static (Opener, PublicKey) {
    static KEYS: OnceLock<(Opener, PublicKey)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let recipient = Opener::new(SecretKey::generate().expect("key"));
        let sender = SecretKey::generate().expect("key").public_key();
        (recipient, sender)
    })
}

pub fn envelope(data: &[u8]) {
    match Envelope::from_bytes(data, MAX_FRAME) {
        Ok(env) => {
            let bytes = env.to_bytes();
            assert_eq!(env.encoded_len(), bytes.len(), "encoded_len is wrong");
            let again = Envelope::from_bytes(&bytes, MAX_FRAME);
            assert_eq!(again.as_ref(), Ok(&env), "Envelope does not round-trip");
            // What the recipient agent does next. Nobody here holds the sender's key, so
            // nothing may open: a success would be a forgery.
            let (recipient, sender) = keys();
            match recipient.open(sender, &env) {
                Ok(_) => panic!("a random envelope opened"),
                Err(e) => {
                    check_error("Opener::open", &e);
                }
            }
        }
        Err(e) => {
            check_error("Envelope::from_bytes", &e);
        }
    }
}

pub fn directory(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match Directory::from_json(&text) {
        Ok(d) => {
            assert_eq!(
                dmr::directory::parse(text.as_bytes()).as_ref(),
                Ok(&d),
                "parse and from_json disagree"
            );
            for a in d.iter() {
                assert!(AgentId::new(a.id.as_str()).is_ok());
                let pem = a.public_key.to_pem();
                assert_eq!(PublicKey::from_pem(&pem), Ok(a.public_key));
            }
            assert!(Directory::default().changes_to(&d).added.len() == d.len());
        }
        Err(e) => {
            check_error("Directory::from_json", &e);
        }
    }
}

/// The first byte chooses the form: text as given, or the rest wrapped in a PEM with the
/// right label, so that the DER checks behind the PEM layer are reached as well.
fn pem_text(data: &[u8], label: &str) -> String {
    match data.split_first() {
        Some((mode, rest)) if mode & 1 == 1 => pem::encode(&pem::Pem::new(label, rest.to_vec())),
        Some((_, rest)) => String::from_utf8_lossy(rest).into_owned(),
        None => String::new(),
    }
}

/// An error about a key must not quote the key: it ends up in logs. (Only base64 lines count
/// as key material; other text may legitimately equal part of a message.)
fn check_key_error(what: &str, e: &impl Display, text: &str) {
    let message = check_error(what, e);
    let base64 = |l: &&str| {
        l.len() >= 16
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
    };
    for line in text.lines().map(str::trim).filter(base64) {
        assert!(
            !message.contains(line),
            "{what} quotes its input in the error {message:?}"
        );
    }
}

pub fn secret_key_pem(data: &[u8]) {
    let text = pem_text(data, "PRIVATE KEY");
    match SecretKey::from_pem(&text) {
        Ok(key) => {
            let pem = key.to_pem();
            let again = SecretKey::from_pem(&pem).expect("a written key reads back");
            assert_eq!(again.public_key(), key.public_key());
            // Debug shows the public half only.
            let shown = format!("{key:?}");
            let body = pem.lines().nth(1).expect("PEM body");
            assert!(!shown.contains(body), "SecretKey's Debug shows the key");
        }
        Err(e) => check_key_error("SecretKey::from_pem", &e, &text),
    }
}

pub fn public_key_pem(data: &[u8]) {
    let text = pem_text(data, "PUBLIC KEY");
    match PublicKey::from_pem(&text) {
        Ok(key) => assert_eq!(PublicKey::from_pem(&key.to_pem()), Ok(key)),
        Err(e) => {
            check_error("PublicKey::from_pem", &e);
        }
    }
}

pub fn send_request(data: &[u8]) {
    match SendRequest::parse(data, 1_700_000_000_000) {
        Ok(r) => {
            assert!(AgentId::new(r.recipient.as_str()).is_ok());
            // The agent seals the payload's text as it came; a recipient's JSON parser
            // must read it. The one thing a tree parser refuses and the agent passes on
            // is a number beyond f64 (JSON sets no limit); lone surrogates and deep
            // nesting are refused at the edge.
            let plaintext = serde_json::to_vec(&r.payload).expect("a raw payload serializes");
            match serde_json::from_slice::<serde_json::Value>(&plaintext) {
                Ok(_) => {}
                Err(e) if e.to_string().starts_with("number out of range") => {}
                Err(e) => panic!("the recipient cannot parse the payload: {e}"),
            }
        }
        Err(e) => {
            check_error("SendRequest::parse", &e);
        }
    }
}
