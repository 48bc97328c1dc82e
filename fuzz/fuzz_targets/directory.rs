//! Fuzz target: Directory::from_json — the CentOps directory / --agents-file.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::directory(data));
