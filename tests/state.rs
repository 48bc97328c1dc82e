//! The agent's state store on disk: persistence across reopen, the exclusive lock (also
//! against another process), damaged files, permissions, and `dmr-agent trust`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use dmr::crypto::{PublicKey, SecretKey};
use dmr::protocol::{AgentId, MessageId};
use dmr::state::{fingerprint, PinVerdict, ReplayVerdict, State, StateError};

const AGENT_BIN: &str = env!("CARGO_BIN_EXE_dmr-agent");

fn key() -> PublicKey {
    SecretKey::generate().unwrap().public_key()
}

fn id(s: &str) -> AgentId {
    AgentId::new(s).unwrap()
}

/// Reopens a store this process just closed. Another test thread that spawns a child at
/// that moment briefly shares the lock file's open description (fork before exec closes
/// it), so a reopen can see the lock held for a few milliseconds; wait that out.
fn reopen(path: &Path) -> State {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match State::open(path) {
            Err(StateError::Locked { .. }) if std::time::Instant::now() < end => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            other => return other.unwrap(),
        }
    }
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn agent(args: &[&str]) -> Output {
    Command::new(AGENT_BIN)
        .args(args)
        .env_remove("DMR_STATE_DIR")
        .output()
        .unwrap()
}

#[test]
fn pins_and_deliveries_survive_reopen_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent-a");
    let (k1, k2) = (key(), key());
    let (sender, old, new) = (id("tax"), MessageId::random(), MessageId::random());
    {
        let state = State::open(&path).unwrap();
        assert_eq!(state.pin(&id("tax"), &k1).unwrap(), PinVerdict::New);
        assert_eq!(
            state.pin(&id("tax"), &k2).unwrap(),
            PinVerdict::Changed { pinned: k1 }
        );
        assert_eq!(
            state.check_and_mark_in_flight(&sender, old).unwrap(),
            ReplayVerdict::Fresh
        );
        state.record_delivered(&sender, old, 1_000).unwrap();
        state.record_delivered(&sender, new, 5_000).unwrap();
        // A delivery in flight when the process ends is not remembered as delivered.
        let pending = MessageId::random();
        assert_eq!(
            state.check_and_mark_in_flight(&sender, pending).unwrap(),
            ReplayVerdict::Fresh
        );
    }
    let state = reopen(&path);
    assert_eq!(state.pinned(&id("tax")).unwrap(), Some(k1));
    assert_eq!(
        state.pin(&id("tax"), &k2).unwrap(),
        PinVerdict::Changed { pinned: k1 }
    );
    let pins = state.list_pins().unwrap();
    assert_eq!((pins.len(), pins[0].offered), (1, Some(k2)));
    assert_eq!(
        state.check_and_mark_in_flight(&sender, old).unwrap(),
        ReplayVerdict::Delivered
    );
    assert!(state.was_delivered(&sender, new).unwrap());
    assert_eq!(state.delivered_len().unwrap(), 2);

    assert_eq!(state.expire(2_000).unwrap(), 1);
    assert!(!state.was_delivered(&sender, old).unwrap());
    assert!(state.was_delivered(&sender, new).unwrap());
    drop(state);
    let state = reopen(&path);
    assert_eq!(state.delivered_len().unwrap(), 1);
}

#[test]
fn the_state_dir_is_created_0700_and_loose_or_wrong_dirs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/state");
    drop(State::open(&path).unwrap());
    assert_eq!(mode(&path), 0o700);
    assert!(path.join("state.redb").is_file());

    let loose = dir.path().join("loose");
    fs::create_dir(&loose).unwrap();
    fs::set_permissions(&loose, fs::Permissions::from_mode(0o777)).unwrap();
    let err = State::open(&loose).unwrap_err();
    assert!(
        matches!(err, StateError::Insecure { mode: 0o777, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("chmod 700"), "{err}");

    let file = dir.path().join("file");
    fs::write(&file, "").unwrap();
    let err = State::open(&file).unwrap_err().to_string();
    assert!(
        err.contains("not a directory") && err.contains("file"),
        "{err}"
    );

    let err = State::open_existing(&dir.path().join("typo")).unwrap_err();
    assert!(matches!(err, StateError::Missing { .. }), "{err}");
    assert!(!dir.path().join("typo").exists());
}

#[test]
fn a_second_open_is_refused_while_the_first_holds_the_dir() {
    let dir = tempfile::tempdir().unwrap();
    let first = State::open(dir.path()).unwrap();
    let err = State::open(dir.path()).unwrap_err();
    match &err {
        StateError::Locked { dir: d, holder } => {
            assert_eq!(d, dir.path());
            assert_eq!(*holder, Some(std::process::id()));
        }
        other => panic!("expected Locked, got {other}"),
    }
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );

    // Another process (the operator's `trust list` while the agent runs) is refused too.
    let out = agent(&["trust", "list", "--state-dir", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in use") && stderr.contains(&format!("pid {}", std::process::id())),
        "{stderr}"
    );

    drop(first);
    State::open(dir.path()).unwrap();
}

#[test]
fn a_damaged_database_gives_an_error_naming_the_file_and_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    drop(State::open(dir.path()).unwrap());
    let db = dir.path().join("state.redb");
    let garbage: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(&db, garbage).unwrap();
    let err = State::open(dir.path()).unwrap_err();
    assert!(matches!(err, StateError::Open { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("state.redb") && text.contains("move it aside"),
        "{text}"
    );
    assert!(
        text.contains("damaged or is not") || text.contains("the file is damaged ("),
        "{text}"
    );

    // Unreadable (not as root, who reads anything).
    fs::remove_file(&db).unwrap();
    drop(State::open(dir.path()).unwrap());
    fs::set_permissions(&db, fs::Permissions::from_mode(0o000)).unwrap();
    if fs::read(&db).is_err() {
        let text = State::open(dir.path()).unwrap_err().to_string();
        assert!(text.contains("permission denied"), "{text}");
    }
}

#[test]
fn trust_confirm_and_list_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let sd = dir.path().to_str().unwrap();
    let (k1, k2, k3) = (key(), key(), key());
    {
        let state = State::open(dir.path()).unwrap();
        state.pin(&id("police"), &k1).unwrap();
        state.pin(&id("police"), &k2).unwrap();
        state.pin(&id("tax"), &k1).unwrap();
    }

    let out = agent(&["trust", "list", "--state-dir", sd]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let police = text.lines().find(|l| l.starts_with("police")).unwrap();
    assert!(
        police.contains("KEY CHANGED") && police.contains(&fingerprint(&k2)),
        "{text}"
    );
    let tax = text.lines().find(|l| l.starts_with("tax")).unwrap();
    assert!(
        !tax.contains("CHANGED") && tax.contains(&fingerprint(&k1)),
        "{text}"
    );

    // Without --key: the offered key.
    let out = agent(&["trust", "confirm", "--state-dir", sd, "--id", "police"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&fingerprint(&k2)));

    // With --key: the key the other agency handed over.
    let pub_file = dir.path().join("tax.pub");
    fs::write(&pub_file, k3.to_pem()).unwrap();
    let out = agent(&[
        "trust",
        "confirm",
        "--state-dir",
        sd,
        "--id",
        "tax",
        "--key",
        pub_file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Nothing offered for police any more.
    let out = agent(&["trust", "confirm", "--state-dir", sd, "--id", "police"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--key PUBFILE"));

    let out = agent(&["trust", "list", "--state-dir", sd, "--json"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["id"], "police");
    assert_eq!(lines[0]["fingerprint"], fingerprint(&k2));
    assert!(lines[0].get("offeredFingerprint").is_none());
    assert_eq!(lines[1]["fingerprint"], fingerprint(&k3));

    let state = State::open(dir.path()).unwrap();
    assert_eq!(state.pin(&id("police"), &k2).unwrap(), PinVerdict::Same);
    assert_eq!(state.pin(&id("tax"), &k3).unwrap(), PinVerdict::Same);
    drop(state);

    // A typo in the dir creates nothing.
    let typo = dir.path().join("typo");
    let out = agent(&["trust", "list", "--state-dir", typo.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!typo.exists());
}

#[test]
fn the_fingerprint_is_what_openssl_and_sha256sum_compute() {
    let dir = tempfile::tempdir().unwrap();
    let k = key();
    let pub_file = dir.path().join("k.pub");
    fs::write(&pub_file, k.to_pem()).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl pkey -pubin -in '{}' -outform DER | sha256sum",
            pub_file.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.split_whitespace().next().unwrap(), fingerprint(&k));
}

/// Run in a child process by the test below: records one delivery, then dies without
/// running any destructor (as under SIGKILL).
#[test]
fn child_records_then_dies() {
    let Ok(dir) = std::env::var("DMR_TEST_STATE_CHILD") else {
        return;
    };
    let state = State::open(Path::new(&dir)).unwrap();
    let id = MessageId(uuid::Uuid::parse_str(&std::env::var("DMR_TEST_MESSAGE").unwrap()).unwrap());
    state
        .record_delivered(&AgentId::new("tax").unwrap(), id, 1)
        .unwrap();
    std::process::abort();
}

#[test]
fn a_delivery_recorded_before_the_process_dies_is_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let message = MessageId::random();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_records_then_dies", "--test-threads=1"])
        .env("DMR_TEST_STATE_CHILD", dir.path())
        .env("DMR_TEST_MESSAGE", message.to_string())
        .output()
        .unwrap();
    assert!(!out.status.success(), "the child must have died");
    // The dead process's lock went with it; the store opens (redb repairs if needed).
    let state = State::open(dir.path()).unwrap();
    assert!(state.was_delivered(&id("tax"), message).unwrap());
    assert_eq!(
        state.check_and_mark_in_flight(&id("tax"), message).unwrap(),
        ReplayVerdict::Delivered
    );
}
