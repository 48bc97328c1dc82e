//! Fuzz target: SendRequest::parse — the agent's POST /v1/messages body.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::send_request(data));
