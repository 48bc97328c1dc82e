//! Operations files: the systemd units pass `systemd-analyze verify` and the hardening
//! score check of `scripts/verify-systemd.sh`.

use std::process::Command;

#[test]
fn systemd_units_verify() {
    let out = Command::new("scripts/verify-systemd.sh")
        .output()
        .expect("run scripts/verify-systemd.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(
        out.status.code(),
        Some(77),
        "systemd-analyze is missing: install Debian's systemd (.ci/run does)\n{text}"
    );
    assert!(
        out.status.success(),
        "systemd units failed verification:\n{text}"
    );
}

#[test]
fn help_survives_a_closed_stdout() {
    // As in `dmr-server run --help | head`: writing help to a closed stdout must not panic.
    for bin in [
        env!("CARGO_BIN_EXE_dmr-server"),
        env!("CARGO_BIN_EXE_dmr-agent"),
    ] {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("{{ sleep 0.3; {bin} run --help; }} | true"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{bin}: {err}");
        assert!(out.status.success(), "{bin}: {err}");
    }
}
