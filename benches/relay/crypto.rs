//! The agents' own cryptographic cost per message, on one core: HPKE Auth seal at the
//! sender plus open at the recipient, for the default payload.

use std::time::Instant;

use crate::support::{self, World};

pub fn run(world: &World, n: usize) {
    let (a, b) = (world.agent("a"), world.agent("b"));
    let plain = crate::payload();
    let t = Instant::now();
    let sealed: Vec<_> = (0..n).map(|_| support::envelope(a, b, &plain)).collect();
    let seal = t.elapsed();
    let t = Instant::now();
    for e in &sealed {
        dmr::crypto::open(&b.key, &a.key.public_key(), e).unwrap();
    }
    let open = t.elapsed();
    println!(
        "\ncrypto per {} B message, one core: seal {:.0} µs, open {:.0} µs (HPKE Auth, X25519 + ChaCha20-Poly1305)",
        plain.len(),
        seal.as_secs_f64() * 1e6 / n as f64,
        open.as_secs_f64() * 1e6 / n as f64
    );
}
