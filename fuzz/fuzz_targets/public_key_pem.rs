//! Fuzz target: PublicKey::from_pem — SPKI PEM (text, or arbitrary DER wrapped in PEM).
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::public_key_pem(data));
