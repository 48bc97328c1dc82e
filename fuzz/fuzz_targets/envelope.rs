//! Fuzz target: Envelope::from_bytes (as read back from RabbitMQ), then the agent's crypto::Opener on it.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::envelope(data));
