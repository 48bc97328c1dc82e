//! Fuzz target: SecretKey::from_pem — PKCS#8 PEM (text, or arbitrary DER wrapped in PEM).
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::secret_key_pem(data));
