//! Fuzz target: ServerFrame::decode — every frame a server can send to an agent.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::server_frame(data));
