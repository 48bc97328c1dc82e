//! The binaries' command-line contract (DESIGN §7): every flag in `--help` with its
//! environment variable, `keygen` behaviour, and clear errors for bad input.

use std::process::Command;

fn run(bin: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(bin)
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const SERVER: &str = env!("CARGO_BIN_EXE_dmr-server");
const AGENT: &str = env!("CARGO_BIN_EXE_dmr-agent");

#[test]
fn server_help_lists_every_flag_with_env_var_and_default() {
    let (code, out, _) = run(SERVER, &["run", "--help"], &[]);
    assert_eq!(code, 0);
    for flag in [
        "listen",
        "amqp-url",
        "agents-file",
        "centops-url",
        "centops-interval",
        "tls-cert",
        "tls-key",
        "queue-prefix",
        "message-ttl",
        "delivery-limit",
        "max-message-bytes",
    ] {
        assert!(
            out.contains(&format!("--{flag}")),
            "--{flag} missing from help:\n{out}"
        );
        let var = format!("DMR_{}", flag.replace('-', "_").to_uppercase());
        assert!(out.contains(&var), "{var} missing from help:\n{out}");
    }
    for default in [
        "127.0.0.1:8075",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        "86400",
        "1048576",
    ] {
        assert!(out.contains(default), "default {default} missing from help");
    }
}

#[test]
fn agent_help_lists_every_flag_with_env_var() {
    let (code, out, _) = run(AGENT, &["run", "--help"], &[]);
    assert_eq!(code, 0);
    for flag in [
        "id",
        "key",
        "server",
        "listen",
        "deliver-url",
        "api-token",
        "ca-file",
        "api-host",
        "allow-no-token",
    ] {
        assert!(
            out.contains(&format!("--{flag}")),
            "--{flag} missing from help:\n{out}"
        );
        let var = format!("DMR_{}", flag.replace('-', "_").to_uppercase());
        assert!(out.contains(&var), "{var} missing from help:\n{out}");
    }
    assert!(out.contains("127.0.0.1:8077"));
    let (code, out, _) = run(AGENT, &["keygen", "--help"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("--out") && out.contains("--force"));
}

#[test]
fn keygen_writes_keys_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("police");
    let p = prefix.to_str().unwrap();
    let (code, out, err) = run(AGENT, &["keygen", "--out", p], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("police.key") && out.contains("police.pub"));
    let key = std::fs::read_to_string(dir.path().join("police.key")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(
        !out.contains(key.lines().nth(1).unwrap()),
        "the private key must not be printed"
    );
    let (code, _, err) = run(AGENT, &["keygen", "--out", p], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("--force"), "{err}");
    // The env var form of --out and --force.
    let (code, _, err) = run(AGENT, &["keygen"], &[("DMR_OUT", p), ("DMR_FORCE", "1")]);
    assert_eq!(code, 0, "{err}");
    assert_ne!(
        std::fs::read_to_string(dir.path().join("police.key")).unwrap(),
        key
    );
}

#[test]
fn bad_flags_fail_with_a_clear_message() {
    let (code, _, err) = run(SERVER, &["run", "--listen", "not-an-address"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("listen"), "{err}");
    let (code, _, err) = run(SERVER, &["run", "--listen", "127.0.0.1:0"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--agents-file") && err.contains("--centops-url"),
        "{err}"
    );
    let (code, _, err) = run(
        AGENT,
        &[
            "run",
            "--key",
            "/nonexistent",
            "--server",
            "ws://127.0.0.1:1/v1/ws",
        ],
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains("--id"), "{err}");
    let (code, _, err) = run(
        AGENT,
        &[
            "run",
            "--id",
            "a",
            "--key",
            "/nonexistent",
            "--server",
            "http://x",
        ],
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains("ws or wss"), "{err}");
    let (code, _, err) = run(
        AGENT,
        &[
            "run",
            "--id",
            "a",
            "--key",
            "/nonexistent/key",
            "--server",
            "ws://127.0.0.1:1/v1/ws",
        ],
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/key"), "{err}");
    let (code, _, err) = run(AGENT, &["run"], &[("DMR_ID", "bad id")]);
    assert_eq!(code, 1);
    assert!(err.contains("invalid agent id"), "{err}");
}
