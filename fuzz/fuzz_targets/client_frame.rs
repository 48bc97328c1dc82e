//! Fuzz target: ClientFrame::decode — every frame an agent can send to a server.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::client_frame(data));
