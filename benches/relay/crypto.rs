//! The agents' own cryptographic cost per message, on one core, for the default payload:
//! one-shot HPKE Auth (a fresh epoch per message: the X25519 work every message paid up to
//! protocol version 2) beside the amortised seal and open every message pays now (one
//! secret export and one ChaCha20-Poly1305 pass inside a live epoch).

use std::time::{Duration, Instant};

use dmr::crypto::{Opener, Sealer};

use crate::support::{self, World};

pub fn run(world: &World, n: usize) {
    let (a, b) = (world.agent("a"), world.agent("b"));
    let plain = crate::payload();
    let t = Instant::now();
    let sealed: Vec<_> = (0..n).map(|_| support::envelope(a, b, &plain)).collect();
    let one_shot_seal = t.elapsed();
    let t = Instant::now();
    for e in &sealed {
        dmr::crypto::open(&b.key, &a.key.public_key(), e).unwrap();
    }
    let one_shot_open = t.elapsed();

    let key = |path| dmr::crypto::read_key_file(path).unwrap();
    let (sealer, opener) = (Sealer::new(key(&a.key_path)), Opener::new(key(&b.key_path)));
    let header = sealed[0].header().clone();
    let t = Instant::now();
    let sealed: Vec<_> = (0..n)
        .map(|_| {
            sealer
                .seal(&b.key.public_key(), header.clone(), &plain)
                .unwrap()
        })
        .collect();
    let seal = t.elapsed();
    let t = Instant::now();
    for e in &sealed {
        opener.open(&a.key.public_key(), e).unwrap();
    }
    let open = t.elapsed();
    let us = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    println!(
        "\ncrypto per {} B message, one core: one-shot HPKE Auth seal {:.0} µs, open {:.0} µs; \
         amortised (epoch context + exporter + ChaCha20-Poly1305) seal {:.1} µs, open {:.1} µs",
        plain.len(),
        us(one_shot_seal),
        us(one_shot_open),
        us(seal),
        us(open),
    );
}
