//! Bounded fuzzing on stable Rust (DESIGN §4.6: "Decoders are fuzzed").
//!
//! Every fuzz target of `fuzz/targets.rs` (frames, envelopes, the directory, PEM keys, the
//! agent's request body) is fed a fixed number of inputs from a seeded PRNG: valid seeds
//! (real frames, a real directory, real keys, real request bodies) mutated byte-wise
//! (flips, interesting values, inserts, deletes, splices, dictionary tokens), plus
//! structure-aware random JSON for the two JSON parsers. The targets assert that nothing
//! panics, that every error has a message and that every accepted value survives its own
//! encoding. A failure prints the input and the seed, so it can be replayed here or with
//! `cargo fuzz run TARGET FILE` (see docs/SECURITY.md, "Fuzzing", for the long runs).
//!
//! `DMR_FUZZ_ITERATIONS` scales the run (default: a few seconds in a debug build);
//! `DMR_FUZZ_SEED` changes the PRNG seed.

#[path = "../fuzz/targets.rs"]
mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use dmr::crypto::{self, SecretKey};
use dmr::protocol::{
    AgentId, ClientFrame, DirectoryDocument, DirectorySignature, Envelope, Header, Kind, Limits,
    MessageId, RejectCode, ServerFrame, PROTOCOL_VERSION,
};

type Target = fn(&[u8]);

/// Byte strings that mean something to postcard, JSON, PEM or DER.
const TOKENS: &[&[u8]] = &[
    b"\x00",
    b"\x01",
    b"\x7f",
    b"\x80",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\xff\xff\xff\xff\x0f",
    b"\"",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"null",
    b"true",
    b"-0",
    b"1e999",
    b"18446744073709551616",
    b"\"response\"",
    b"\"id\"",
    b"\"name\"",
    b"\"authentication_certificate\"",
    b"\"recipientId\"",
    b"\"payload\"",
    b"\"type\"",
    b"\"timestamp\"",
    b"\"2025-01-01T00:00:00Z\"",
    b"\"5f0c1b8e-3c1d-4c59-9a65-1d2b2f1e7d10\"",
    b"-----BEGIN PUBLIC KEY-----",
    b"-----END PUBLIC KEY-----",
    b"-----BEGIN PRIVATE KEY-----",
    b"-----END PRIVATE KEY-----",
    b"\n",
    b"\r\n",
    b"=",
    b"\x30\x2a\x30\x05\x06\x03\x2b\x65\x6e\x03\x21\x00",
    b"\x02\x01\x00\x30\x05\x06\x03\x2b\x65\x6e\x04\x22\x04\x20",
    b"\x30\x81\xff",
];

const INTERESTING: &[u8] = &[
    0, 1, 2, 0x1f, 0x20, 0x7f, 0x80, 0x81, 0xfe, 0xff, b'"', b'{', b'[',
];

struct Fuzzer {
    rng: StdRng,
    seeds: Vec<Vec<u8>>,
}

impl Fuzzer {
    fn new(seed: u64, seeds: Vec<Vec<u8>>) -> Self {
        assert!(!seeds.is_empty());
        Self {
            rng: StdRng::seed_from_u64(seed),
            seeds,
        }
    }

    /// A seed (sometimes random bytes), mutated 0 to 8 times.
    fn input(&mut self) -> Vec<u8> {
        let mut v = if self.rng.gen_ratio(1, 10) {
            let len = self.rng.gen_range(0..256);
            (0..len).map(|_| self.rng.gen()).collect()
        } else {
            self.seeds.choose(&mut self.rng).unwrap().clone()
        };
        for _ in 0..self.rng.gen_range(0..=8) {
            self.mutate(&mut v);
        }
        v
    }

    fn mutate(&mut self, v: &mut Vec<u8>) {
        let r = &mut self.rng;
        let at = |r: &mut StdRng, v: &Vec<u8>| r.gen_range(0..=v.len());
        match r.gen_range(0..10) {
            0 if !v.is_empty() => {
                let i = r.gen_range(0..v.len());
                v[i] ^= 1 << r.gen_range(0..8);
            }
            1 if !v.is_empty() => {
                let i = r.gen_range(0..v.len());
                v[i] = *INTERESTING.choose(r).unwrap();
            }
            2 => {
                let i = at(r, v);
                let n = r.gen_range(1..=8);
                let bytes: Vec<u8> = (0..n).map(|_| r.gen()).collect();
                v.splice(i..i, bytes);
            }
            3 if !v.is_empty() => {
                let i = r.gen_range(0..v.len());
                let j = (i + r.gen_range(1..=16)).min(v.len());
                v.drain(i..j);
            }
            4 => {
                let n = at(r, v);
                v.truncate(n);
            }
            5 if !v.is_empty() => {
                // Copy a chunk of itself somewhere else (repeats fields, lengths, nesting).
                let i = r.gen_range(0..v.len());
                let j = (i + r.gen_range(1..=32)).min(v.len());
                let chunk = v[i..j].to_vec();
                let k = at(r, v);
                v.splice(k..k, chunk);
            }
            6 => {
                // Splice in part of another seed.
                let other = self.seeds.choose(r).unwrap();
                if !other.is_empty() {
                    let i = r.gen_range(0..other.len());
                    let j = (i + r.gen_range(1..=64)).min(other.len());
                    let k = at(r, v);
                    v.splice(k..k, other[i..j].iter().copied());
                }
            }
            7 | 8 => {
                let token = TOKENS.choose(r).unwrap();
                let k = at(r, v);
                if r.gen() || v.is_empty() {
                    v.splice(k..k, token.iter().copied());
                } else {
                    let end = (k + token.len()).min(v.len());
                    v.splice(k..end, token.iter().copied());
                }
            }
            _ if !v.is_empty() => {
                // Overwrite a varint-sized run with one random large value.
                let i = r.gen_range(0..v.len());
                let n: u64 = r.gen::<u64>() >> r.gen_range(0..64);
                let mut buf = Vec::new();
                let mut x = n;
                loop {
                    let b = (x & 0x7f) as u8;
                    x >>= 7;
                    if x == 0 {
                        buf.push(b);
                        break;
                    }
                    buf.push(b | 0x80);
                }
                let end = (i + buf.len()).min(v.len());
                v.splice(i..end, buf);
            }
            _ => v.push(r.gen()),
        }
    }
}

fn iterations(default: usize) -> usize {
    std::env::var("DMR_FUZZ_ITERATIONS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .map_or(default, |scale| default * scale / 1000)
        .max(1)
}

fn base_seed() -> u64 {
    std::env::var("DMR_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_D3A7)
}

/// Runs `target` on one input; a panic becomes a failure that shows the input.
fn check(name: &str, target: Target, input: &[u8], context: &str) {
    if catch_unwind(AssertUnwindSafe(|| target(input))).is_err() {
        let shown: String = input
            .escape_ascii()
            .to_string()
            .chars()
            .take(4000)
            .collect();
        panic!(
            "fuzz target {name} panicked ({context}) on {} bytes: b\"{shown}\"\n\
             (save the bytes to a file and replay with `cargo fuzz run {name} FILE` in fuzz/)",
            input.len()
        );
    }
}

/// Feeds `n` mutated seeds to `target`; returns how long it took.
fn run(name: &str, target: Target, seeds: Vec<Vec<u8>>, n: usize) -> Duration {
    let started = Instant::now();
    let seed = base_seed() ^ name.bytes().fold(0u64, |h, b| h.rotate_left(5) ^ b as u64);
    for s in &seeds {
        check(name, target, s, "a seed");
    }
    let mut f = Fuzzer::new(seed, seeds);
    for i in 0..n {
        let input = f.input();
        check(
            name,
            target,
            &input,
            &format!("input #{i} of PRNG seed {seed:#x}"),
        );
    }
    started.elapsed()
}

// Seeds ------------------------------------------------------------------------------------

struct Keys {
    a: SecretKey,
    b: SecretKey,
}

fn keys() -> Keys {
    Keys {
        a: SecretKey::generate().unwrap(),
        b: SecretKey::generate().unwrap(),
    }
}

fn id(s: &str) -> AgentId {
    AgentId::new(s).unwrap()
}

fn sealed(k: &Keys, payload: &[u8]) -> Envelope {
    let header = Header {
        id: MessageId::random(),
        sender: id("police"),
        recipient: id("tax-board.ee_1"),
        created_at_ms: 1_700_000_000_000,
        kind: Kind::chat_message(),
        seq: 0,
    };
    crypto::seal(&k.a, &k.b.public_key(), header, payload).unwrap()
}

fn client_frame_seeds(k: &Keys) -> Vec<Vec<u8>> {
    [
        ClientFrame::Hello {
            version: PROTOCOL_VERSION,
            agent_id: id("5f0c1b8e-3c1d-4c59-9a65-1d2b2f1e7d10"),
        },
        ClientFrame::Proof { mac: [7; 32] },
        ClientFrame::Send {
            envelope: sealed(k, br#"{"q":"kas?"}"#),
        },
        ClientFrame::Ack { delivery: 42 },
        ClientFrame::Nack {
            delivery: u64::MAX,
            reason: "webhook answered 500".into(),
        },
    ]
    .iter()
    .map(ClientFrame::encode)
    .collect()
}

/// A directory as servers forward it: the agents file (signed) and CentOps (unsigned).
fn entries(k: &Keys) -> Vec<DirectoryDocument> {
    let entry = |id: &str, name: &str, key: &SecretKey| {
        serde_json::json!({"id": id, "name": name,
            "authentication_certificate": key.public_key().to_pem()})
    };
    let file = serde_json::json!({"response": [entry("police", "Politsei", &k.a)]});
    let centops = serde_json::json!([entry("tax-board.ee_1", "Maksu- ja Tolliamet", &k.b)]);
    vec![
        DirectoryDocument {
            json: file.to_string().into_bytes(),
            signature: Some(DirectorySignature([5; 64])),
        },
        DirectoryDocument {
            json: centops.to_string().into_bytes(),
            signature: None,
        },
    ]
}

fn server_frame_seeds(k: &Keys) -> Vec<Vec<u8>> {
    let mut frames = vec![
        ServerFrame::Challenge {
            ephemeral_pk: [1; 32],
            nonce: [2; 32],
            tls_bound: true,
        },
        ServerFrame::Welcome {
            directory: entries(k),
            limits: Limits {
                max_message_bytes: 1 << 20,
                message_ttl_ms: 86_400_000,
            },
        },
        ServerFrame::Directory {
            directory: entries(k),
        },
        ServerFrame::Accepted {
            id: MessageId::random(),
        },
        ServerFrame::Deliver {
            delivery: 7,
            envelope: sealed(k, b"{}"),
        },
    ];
    for code in [
        RejectCode::ForgedSender,
        RejectCode::UnknownRecipient,
        RejectCode::TooLarge,
        RejectCode::Unavailable,
        RejectCode::BrokerRefused,
        RejectCode::Timeout,
    ] {
        frames.push(ServerFrame::Rejected {
            id: MessageId::random(),
            code,
            reason: code.as_str().into(),
        });
    }
    frames.iter().map(ServerFrame::encode).collect()
}

fn envelope_seeds(k: &Keys) -> Vec<Vec<u8>> {
    vec![
        sealed(k, b"").to_bytes(),
        sealed(k, br#"{"q":"Kas maksuvolg takistab relvaloa saamist?"}"#).to_bytes(),
        sealed(k, &[0xab; 300]).to_bytes(),
    ]
}

fn directory_entry(id: &str, pem: &str) -> Value {
    json!({"id": id, "name": format!("Agency {id}"), "authentication_certificate": pem,
        "created_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-01T00:00:00Z"})
}

fn directory_seeds(k: &Keys) -> Vec<Vec<u8>> {
    let (pa, pb) = (k.a.public_key().to_pem(), k.b.public_key().to_pem());
    let list = vec![directory_entry("police", &pa), directory_entry("tax", &pb)];
    vec![
        json!({ "response": list }).to_string().into_bytes(),
        Value::Array(list.clone()).to_string().into_bytes(),
        json!([{"id": "a", "authentication_certificate": pa}])
            .to_string()
            .into_bytes(),
        br#"{"response":[]}"#.to_vec(),
        serde_json::to_vec_pretty(&json!({ "response": list })).unwrap(),
    ]
}

/// PKCS#8 v2 (RFC 5958) with the public key attached, as some tools write it.
fn pkcs8_v2(k: &SecretKey) -> Vec<u8> {
    let v1 = pem::parse(k.to_pem()).unwrap().into_contents();
    let mut der = vec![0x30, 0x51, 0x02, 0x01, 0x01];
    der.extend_from_slice(&v1[5..48]);
    der.extend_from_slice(&[0x81, 0x21, 0x00]);
    der.extend_from_slice(k.public_key().as_bytes());
    der
}

/// PEM seeds: mode byte 0 then PEM text, or mode byte 1 then DER (wrapped by the target).
fn pem_seeds(k: &Keys, private: bool) -> Vec<Vec<u8>> {
    let text = |s: String| [&[0u8][..], s.as_bytes()].concat();
    let der = |d: Vec<u8>| [&[1u8][..], &d].concat();
    if private {
        let pem = k.a.to_pem();
        vec![
            text(pem.clone()),
            text(pem.replace('\n', "\r\n")),
            text(format!("  \n{pem}\n\n")),
            text(pem.replace("PRIVATE KEY", "EC PRIVATE KEY")),
            text(pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8_v2(&k.b)))),
            der(pem::parse(&pem).unwrap().into_contents()),
            der(pkcs8_v2(&k.a)),
        ]
    } else {
        let pem = k.a.public_key().to_pem();
        vec![
            text(pem.clone()),
            text(pem.replace('\n', "\r\n")),
            text(pem.replace("PUBLIC KEY", "CERTIFICATE")),
            der(pem::parse(&pem).unwrap().into_contents()),
        ]
    }
}

fn send_request_seeds() -> Vec<Vec<u8>> {
    [
        json!({"recipientId": "tax", "payload": {"q": "hi"}}),
        json!({"id": "5f0c1b8e-3c1d-4c59-9a65-1d2b2f1e7d10", "recipientId": "tax-board.ee_1",
            "type": "Question", "timestamp": "2025-01-02T03:04:05.678+02:00",
            "payload": [1, -2.5, null, true, "ž", {"deep": [[]]}]}),
        json!({"recipientId": "a", "payload": null, "type": null, "id": null, "timestamp": null}),
    ]
    .iter()
    .map(|v| v.to_string().into_bytes())
    .collect()
}

// Structure-aware JSON ---------------------------------------------------------------------

const STRINGS: &[&str] = &[
    "",
    "police",
    "tax-board.ee_1",
    "has space",
    "ümlaut",
    "5f0c1b8e-3c1d-4c59-9a65-1d2b2f1e7d10",
    "5f0c1b8e-3c1d-4c59-9a65-1d2b2f1e7d1",
    "2025-01-01T00:00:00Z",
    "1969-12-31T23:59:59.999Z",
    "9999-12-31T23:59:59.999999999-23:59",
    "2025-02-30T00:00:00Z",
    "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----",
    "\u{0}",
    "\u{feff}",
    "ChatMessage",
];

fn random_json(r: &mut StdRng, depth: u32) -> Value {
    match r.gen_range(0..if depth == 0 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => Value::Bool(r.gen()),
        2 => match r.gen_range(0..4) {
            0 => json!(r.gen::<i64>()),
            1 => json!(r.gen::<u64>()),
            2 => json!(r.gen::<f64>() * 1e300),
            _ => json!(r.gen_range(-3..3)),
        },
        3 => json!(STRINGS.choose(r).unwrap()),
        4 => {
            let n = r.gen_range(0..100);
            Value::String(
                (0..n)
                    .map(|_| char::from(r.gen_range(0x20u8..0x7f)))
                    .collect(),
            )
        }
        5 => Value::Array(
            (0..r.gen_range(0..4))
                .map(|_| random_json(r, depth - 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..r.gen_range(0..4))
                .map(|_| {
                    let key = ["id", "recipientId", "payload", "x", "response"]
                        .choose(r)
                        .unwrap();
                    (key.to_string(), random_json(r, depth - 1))
                })
                .collect(),
        ),
    }
}

/// A request body with each known field present or not, right-looking or random.
fn random_send_request(r: &mut StdRng) -> Vec<u8> {
    let good = |r: &mut StdRng, field: &str| -> Value {
        match field {
            "id" => json!(uuid::Uuid::from_u128(r.gen()).to_string()),
            "recipientId" => json!(["tax", "police", "a.b-c_d"].choose(r).unwrap()),
            "type" => json!("ChatMessage"),
            "timestamp" => json!("2025-06-01T12:00:00.5Z"),
            _ => random_json(r, 3),
        }
    };
    let mut o = serde_json::Map::new();
    for field in ["id", "recipientId", "type", "timestamp", "payload", "extra"] {
        if r.gen_ratio(7, 10) {
            let v = if r.gen_ratio(6, 10) {
                good(r, field)
            } else {
                random_json(r, 3)
            };
            o.insert(field.into(), v);
        }
    }
    Value::Object(o).to_string().into_bytes()
}

/// A directory with entries that are right, wrong in one field, duplicated or not objects.
fn random_directory(r: &mut StdRng, k: &Keys) -> Vec<u8> {
    let pems = [k.a.public_key().to_pem(), k.b.public_key().to_pem()];
    let list: Vec<Value> = (0..r.gen_range(0..5))
        .map(|_| {
            if r.gen_ratio(1, 8) {
                return random_json(r, 2);
            }
            let mut o = serde_json::Map::new();
            for field in ["id", "name", "authentication_certificate", "created_at"] {
                if r.gen_ratio(9, 10) {
                    let v = match (field, r.gen_ratio(7, 10)) {
                        ("id", true) => json!(["a", "b", "police"].choose(r).unwrap()),
                        ("authentication_certificate", true) => json!(pems.choose(r).unwrap()),
                        (_, true) => json!("Agency"),
                        _ => random_json(r, 2),
                    };
                    o.insert(field.into(), v);
                }
            }
            Value::Object(o)
        })
        .collect();
    let doc = if r.gen() {
        json!({ "response": list })
    } else {
        Value::Array(list)
    };
    doc.to_string().into_bytes()
}

// Tests --------------------------------------------------------------------------------------

/// Inputs every target must survive whatever the PRNG does: empty, every single byte,
/// extreme varints and lengths, deep nesting, a very long line.
#[test]
fn edge_inputs_never_panic() {
    let mut inputs: Vec<Vec<u8>> = vec![Vec::new()];
    inputs.extend((0..=255u8).map(|b| vec![b]));
    for prefix in 0..=6u8 {
        inputs.push([&[prefix][..], &[0xff; 10], &[0x01]].concat());
        inputs.push([&[prefix][..], &[0xff; 4], &[0x0f]].concat());
        inputs.push([&[prefix][..], &[0x80; 64]].concat());
    }
    inputs.push("[".repeat(100_000).into_bytes());
    inputs.push("{\"payload\":".repeat(50_000).into_bytes());
    inputs.push(format!("[{}]", "1,".repeat(100_000)).into_bytes());
    inputs.push(vec![b'A'; 1 << 20]);
    inputs.push(
        [
            &[0u8][..],
            b"-----BEGIN PRIVATE KEY-----\n",
            &vec![b'A'; 100_000],
            b"\n-----END PRIVATE KEY-----\n",
        ]
        .concat(),
    );
    inputs.push(vec![0u8; targets::MAX_FRAME + 1]);
    for (name, target) in all_targets() {
        for input in &inputs {
            check(name, target, input, "an edge input");
        }
    }
}

fn all_targets() -> [(&'static str, Target); 7] {
    [
        ("client_frame", targets::client_frame),
        ("server_frame", targets::server_frame),
        ("envelope", targets::envelope),
        ("directory", targets::directory),
        ("secret_key_pem", targets::secret_key_pem),
        ("public_key_pem", targets::public_key_pem),
        ("send_request", targets::send_request),
    ]
}

/// The seeds are what they claim: valid, so mutations start deep inside each decoder.
#[test]
fn seeds_are_valid_inputs() {
    let k = keys();
    for s in client_frame_seeds(&k) {
        ClientFrame::decode(&s, targets::MAX_FRAME).unwrap();
    }
    for s in server_frame_seeds(&k) {
        ServerFrame::decode(&s, targets::MAX_FRAME).unwrap();
    }
    for s in envelope_seeds(&k) {
        Envelope::from_bytes(&s, targets::MAX_FRAME).unwrap();
    }
    for s in directory_seeds(&k) {
        dmr::directory::Directory::from_json(std::str::from_utf8(&s).unwrap()).unwrap();
    }
    let pem_of = |s: &[u8]| match s[0] {
        0 => String::from_utf8(s[1..].to_vec()).unwrap(),
        _ => String::new(),
    };
    let private = pem_seeds(&k, true);
    assert!(SecretKey::from_pem(&pem_of(&private[0])).is_ok());
    assert!(SecretKey::from_pem(&pem_of(&private[1])).is_ok());
    assert!(
        SecretKey::from_pem(&pem_of(&private[4])).is_ok(),
        "PKCS#8 v2"
    );
    let public = pem_seeds(&k, false);
    assert!(crypto::PublicKey::from_pem(&pem_of(&public[0])).is_ok());
    for s in send_request_seeds() {
        dmr::agent::SendRequest::parse(&s, 0).unwrap();
    }
}

/// Mutated seeds through every target, a fixed number of times each.
#[test]
fn mutated_seeds_never_panic() {
    let k = keys();
    let report = [
        (
            "client_frame",
            run(
                "client_frame",
                targets::client_frame,
                client_frame_seeds(&k),
                iterations(20_000),
            ),
        ),
        (
            "server_frame",
            run(
                "server_frame",
                targets::server_frame,
                server_frame_seeds(&k),
                iterations(20_000),
            ),
        ),
        (
            "envelope",
            run(
                "envelope",
                targets::envelope,
                envelope_seeds(&k),
                iterations(3_000),
            ),
        ),
        (
            "directory",
            run(
                "directory",
                targets::directory,
                directory_seeds(&k),
                iterations(10_000),
            ),
        ),
        (
            "secret_key_pem",
            run(
                "secret_key_pem",
                targets::secret_key_pem,
                pem_seeds(&k, true),
                iterations(10_000),
            ),
        ),
        (
            "public_key_pem",
            run(
                "public_key_pem",
                targets::public_key_pem,
                pem_seeds(&k, false),
                iterations(10_000),
            ),
        ),
        (
            "send_request",
            run(
                "send_request",
                targets::send_request,
                send_request_seeds(),
                iterations(20_000),
            ),
        ),
    ];
    for (name, took) in report {
        eprintln!("fuzz {name}: {took:?}");
    }
}

/// Structure-aware JSON for the two JSON parsers: right shapes with wrong parts, then the
/// same documents mutated byte-wise.
#[test]
fn structured_json_never_panics() {
    let k = keys();
    let mut r = StdRng::seed_from_u64(base_seed() ^ 0x15_0A);
    let mut requests = Vec::new();
    let mut directories = Vec::new();
    for i in 0..iterations(4_000) {
        let body = random_send_request(&mut r);
        check(
            "send_request",
            targets::send_request,
            &body,
            &format!("structured #{i}"),
        );
        requests.push(body);
        let doc = random_directory(&mut r, &k);
        check(
            "directory",
            targets::directory,
            &doc,
            &format!("structured #{i}"),
        );
        directories.push(doc);
    }
    requests.truncate(200);
    directories.truncate(200);
    run(
        "send_request",
        targets::send_request,
        requests,
        iterations(5_000),
    );
    run(
        "directory",
        targets::directory,
        directories,
        iterations(5_000),
    );
}

/// Found by `mutated_seeds_never_panic`: a private key file with a blank line before END, or
/// a damaged BEGIN/END line, made the error quote a line of the file, i.e. the private key,
/// into `dmr-agent`'s startup error and so into its log.
#[test]
fn damaged_key_files_do_not_leak_the_key_into_errors() {
    let sk = SecretKey::generate().unwrap();
    let pem = sk.to_pem();
    let body = pem.lines().nth(1).unwrap().to_owned();
    // The base64 of the 32 secret bytes starts after the fixed 16-byte DER prefix.
    let secret_part = &body[22..];
    for damaged in [
        // A blank line before END, as an editor or a template may leave: pem's error used
        // to quote the whole body line, i.e. the entire private key.
        pem.replacen(&format!("{body}\n"), &format!("{body}\n\n"), 1),
        pem.replacen(&format!("{body}\n"), &format!("{body}\n\n{body}\n"), 1),
        pem.replacen(
            "-----BEGIN PRIVATE KEY-----",
            &format!("-----BEGIN {body}-----"),
            1,
        ),
        pem.replacen(
            "-----END PRIVATE KEY-----",
            &format!("-----END {body}-----"),
            1,
        ),
        pem.replacen(&body, &format!("{}\u{3}{}", &body[..10], &body[10..]), 1),
        pem.replacen(&body, &format!("{}: {}", &body[..5], &body[5..]), 1),
    ] {
        let err = SecretKey::from_pem(&damaged).unwrap_err().to_string();
        assert!(!err.is_empty());
        for window in secret_part.as_bytes().windows(8) {
            let w = std::str::from_utf8(window).unwrap();
            assert!(!err.contains(w), "the error quotes key material: {err}");
        }
        targets::secret_key_pem(&[&[0u8][..], damaged.as_bytes()].concat());
    }
}

/// Writes the seeds to `fuzz/seeds/TARGET/` for the libFuzzer runs (see docs/SECURITY.md).
/// Run by hand: `cargo test --test fuzz -- --ignored write_seed_corpus`.
#[test]
#[ignore]
fn write_seed_corpus() {
    let k = keys();
    let mut r = StdRng::seed_from_u64(7);
    let sets: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("client_frame", client_frame_seeds(&k)),
        ("server_frame", server_frame_seeds(&k)),
        ("envelope", envelope_seeds(&k)),
        ("directory", {
            let mut v = directory_seeds(&k);
            v.extend((0..20).map(|_| random_directory(&mut r, &k)));
            v
        }),
        ("secret_key_pem", pem_seeds(&k, true)),
        ("public_key_pem", pem_seeds(&k, false)),
        ("send_request", {
            let mut v = send_request_seeds();
            v.extend((0..20).map(|_| random_send_request(&mut r)));
            v
        }),
    ];
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    for (name, seeds) in sets {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), s).unwrap();
        }
    }
}
