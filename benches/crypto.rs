//! Cost of sealing and opening one envelope: one-shot HPKE (a full Auth-mode setup per
//! message, what every envelope paid before protocol version 3) against amortised HPKE
//! (`crypto::Sealer` / `crypto::Opener` with a live epoch: one secret export and one
//! ChaCha20-Poly1305 pass per message).
//!
//! `cargo bench --bench crypto` (release build, no RabbitMQ). Prints microseconds per
//! operation for a few payload sizes; `DMR_BENCH_ROUNDS` (default 2000) sets the rounds.
//! Numbers only: nothing here asserts a time.

use std::hint::black_box;
use std::time::Instant;

use dmr::crypto::{self, Opener, Sealer, SecretKey};
use dmr::protocol::{AgentId, Envelope, Header, Kind, MessageId};

fn header() -> Header {
    Header {
        id: MessageId::random(),
        sender: AgentId::new("police").unwrap(),
        recipient: AgentId::new("tax-board").unwrap(),
        created_at_ms: 1_700_000_000_000,
        kind: Kind::chat_message(),
        seq: 0,
    }
}

/// Microseconds per call of `f`, after a short warm-up.
fn per_op(rounds: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..rounds / 10 + 1 {
        f();
    }
    let start = Instant::now();
    for _ in 0..rounds {
        f();
    }
    start.elapsed().as_secs_f64() * 1e6 / rounds as f64
}

fn main() {
    let rounds = std::env::var("DMR_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let a = SecretKey::generate().unwrap();
    let b = SecretKey::generate().unwrap();
    let (a_pk, b_pk) = (a.public_key(), b.public_key());
    println!("µs per operation, {rounds} rounds (one-shot = new HPKE context per message)");
    println!(
        "{:>8} {:>14} {:>14} {:>14} {:>14}",
        "payload", "one-shot seal", "amortised seal", "one-shot open", "amortised open"
    );
    for size in [64usize, 1024, 16 * 1024] {
        let payload = vec![7u8; size];
        let one_shot_seal = per_op(rounds, || {
            black_box(crypto::seal(&a, &b_pk, header(), &payload).unwrap());
        });
        let sealer = Sealer::new(SecretKey::from_pem(&a.to_pem()).unwrap());
        let amortised_seal = per_op(rounds, || {
            black_box(sealer.seal(&b_pk, header(), &payload).unwrap());
        });
        // Distinct envelopes of one epoch, opened round-robin (the context stays cached).
        let envs: Vec<Envelope> = (0..64)
            .map(|_| sealer.seal(&b_pk, header(), &payload).unwrap())
            .collect();
        let mut i = 0;
        let one_shot_open = per_op(rounds, || {
            i += 1;
            black_box(crypto::open(&b, &a_pk, &envs[i % envs.len()]).unwrap());
        });
        let opener = Opener::new(SecretKey::from_pem(&b.to_pem()).unwrap());
        let amortised_open = per_op(rounds, || {
            i += 1;
            black_box(opener.open(&a_pk, &envs[i % envs.len()]).unwrap());
        });
        println!(
            "{size:>8} {one_shot_seal:>14.1} {amortised_seal:>14.1} {one_shot_open:>14.1} {amortised_open:>14.1}"
        );
    }
}
