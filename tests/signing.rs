//! Directory signatures against the real `openssl` binary, both ways, and the
//! `dmr-server directory keygen|sign` commands.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dmr::signing::{
    self, read_signed, DirectoryKeys, Signature, SigningError, SigningKey, VerifyingKey,
};

const SERVER_BIN: &str = env!("CARGO_BIN_EXE_dmr-server");

fn openssl(args: &[&str]) -> Output {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("the openssl binary runs");
    out
}

fn openssl_ok(args: &[&str]) -> Vec<u8> {
    let out = openssl(args);
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A directory file with content like the real one.
fn directory_file(dir: &Path) -> PathBuf {
    let file = dir.join("agents.json");
    fs::write(
        &file,
        "{\"response\":[{\"id\":\"police\",\"authentication_certificate\":\"x\"}]}\n",
    )
    .unwrap();
    file
}

/// An openssl-made key pair: (private, public) paths.
fn openssl_key_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    openssl_ok(&["genpkey", "-algorithm", "ed25519", "-out", p(&key)]);
    openssl_ok(&["pkey", "-in", p(&key), "-pubout", "-out", p(&public)]);
    (key, public)
}

#[test]
fn openssl_signatures_verify_raw_and_base64() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = openssl_key_pair(dir.path(), "op");
    let file = directory_file(dir.path());
    let raw = dir.path().join("raw.sig");
    openssl_ok(&[
        "pkeyutl",
        "-sign",
        "-rawin",
        "-inkey",
        p(&key),
        "-in",
        p(&file),
        "-out",
        p(&raw),
    ]);
    let vk = VerifyingKey::read(&public).unwrap();
    let bytes = fs::read(&file).unwrap();

    // Raw 64 bytes, as pkeyutl writes them.
    let sig = Signature::read(&raw).unwrap();
    vk.verify(&bytes, &sig).unwrap();

    // Base64 as `openssl base64` writes it (wrapped at 64 columns), in FILE.sig.
    let b64 = openssl_ok(&["base64", "-in", p(&raw)]);
    assert!(b64.iter().filter(|&&b| b == b'\n').count() >= 2, "wrapped");
    fs::write(signing::signature_path(&file), &b64).unwrap();
    let (signed, sig2) = read_signed(&file).unwrap();
    assert_eq!(signed, bytes);
    assert_eq!(sig2, sig);

    // Our reading of openssl's private key is the same key.
    let sk = SigningKey::read(&key).unwrap();
    assert_eq!(sk.verifying_key(), vk);
    assert_eq!(
        sk.verifying_key().to_pem(),
        fs::read_to_string(&public).unwrap()
    );
    // Ed25519 is deterministic: our signature over the same bytes is openssl's.
    assert_eq!(sk.sign(&bytes), sig);
}

#[test]
fn openssl_verifies_our_keys_and_signatures() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("operator");
    let (key, public) = signing::keygen(&prefix, false).unwrap();
    assert_eq!(key, dir.path().join("operator.key"));
    assert_eq!(public, dir.path().join("operator.pub"));

    // openssl reads our private key and derives the same public key file, byte for byte.
    let derived = openssl_ok(&["pkey", "-in", p(&key), "-pubout"]);
    assert_eq!(derived, fs::read(&public).unwrap());

    let file = directory_file(dir.path());
    let sig_path = signing::sign_file(&key, &file).unwrap();
    assert_eq!(sig_path, dir.path().join("agents.json.sig"));
    let text = fs::read_to_string(&sig_path).unwrap();
    assert!(text.ends_with('\n') && text.trim().len() == 88, "{text:?}");

    let raw = dir.path().join("raw.sig");
    fs::write(&raw, Signature::read(&sig_path).unwrap().to_bytes()).unwrap();
    let verify = |f: &Path| {
        openssl(&[
            "pkeyutl",
            "-verify",
            "-rawin",
            "-pubin",
            "-inkey",
            p(&public),
            "-in",
            p(f),
            "-sigfile",
            p(&raw),
        ])
    };
    let ok = verify(&file);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("Signature Verified Successfully"));

    let tampered = dir.path().join("tampered.json");
    let mut bytes = fs::read(&file).unwrap();
    bytes[3] ^= 1;
    fs::write(&tampered, bytes).unwrap();
    assert!(!verify(&tampered).status.success());
}

#[test]
fn tampered_files_and_wrong_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = signing::keygen(&dir.path().join("a"), false).unwrap();
    let (_, other) = signing::keygen(&dir.path().join("b"), false).unwrap();
    let file = directory_file(dir.path());
    signing::sign_file(&key, &file).unwrap();

    let keys = DirectoryKeys::read(&[other.clone(), public.clone()]).unwrap();
    let (bytes, sig) = read_signed(&file).unwrap();
    assert_eq!(
        keys.verify(&bytes, &sig).unwrap(),
        &VerifyingKey::read(&public).unwrap()
    );

    // One byte more (a trailing newline an editor adds) is another document.
    let mut longer = bytes.clone();
    longer.push(b'\n');
    let err = keys.verify(&longer, &sig).unwrap_err();
    assert!(
        matches!(err, SigningError::BadSignature { keys: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("sign it again"), "{err}");

    let wrong = DirectoryKeys::read(std::slice::from_ref(&other)).unwrap();
    assert!(matches!(
        wrong.verify(&bytes, &sig),
        Err(SigningError::BadSignature { keys: 1, .. })
    ));

    // The file changed after signing.
    fs::write(&file, b"[]").unwrap();
    let (bytes, sig) = read_signed(&file).unwrap();
    assert!(keys.verify(&bytes, &sig).is_err());

    // A missing signature file is named.
    fs::remove_file(signing::signature_path(&file)).unwrap();
    let err = read_signed(&file).unwrap_err().to_string();
    assert!(err.contains("agents.json.sig"), "{err}");
}

#[test]
fn bad_key_and_signature_files_get_clear_errors_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    fs::write(
        &garbage,
        "-----BEGIN PUBLIC KEY-----\nnot base64!\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let err = VerifyingKey::read(&garbage).unwrap_err().to_string();
    assert!(
        err.contains("garbage.pem") && err.contains("not a usable PEM key"),
        "{err}"
    );
    assert!(
        !err.contains("not base64!"),
        "key text must not reach messages: {err}"
    );

    let text = dir.path().join("text.pem");
    fs::write(&text, "hello").unwrap();
    let err = SigningKey::read(&text).unwrap_err().to_string();
    assert!(
        err.contains("text.pem") && err.contains("genpkey -algorithm ed25519"),
        "{err}"
    );

    // An agent's X25519 key where the operator's key belongs.
    let x = dir.path().join("x25519.key");
    openssl_ok(&["genpkey", "-algorithm", "X25519", "-out", p(&x)]);
    let err = SigningKey::read(&x).unwrap_err().to_string();
    assert!(
        err.contains("x25519.key") && err.contains("X25519"),
        "{err}"
    );

    let err = VerifyingKey::read(&dir.path().join("missing.pub"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot read") && err.contains("missing.pub"),
        "{err}"
    );

    let sig = dir.path().join("bad.sig");
    fs::write(&sig, "AAAA\n").unwrap();
    let err = Signature::read(&sig).unwrap_err().to_string();
    assert!(
        err.contains("bad.sig") && err.contains("base64 of 3 bytes"),
        "{err}"
    );
}

#[test]
fn keygen_writes_private_keys_0600_and_never_overwrites_or_follows_links() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("op");
    let (key, public) = signing::keygen(&prefix, false).unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key), 0o600);
    assert_eq!(
        mode(&public) & 0o022,
        0,
        "nobody else may change the public key"
    );

    let before = fs::read(&key).unwrap();
    let err = signing::keygen(&prefix, false).unwrap_err();
    assert!(
        matches!(err, SigningError::Exists(ref p) if *p == key),
        "{err}"
    );
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(fs::read(&key).unwrap(), before);
    signing::keygen(&prefix, true).unwrap();
    assert_ne!(fs::read(&key).unwrap(), before);
    assert_eq!(mode(&key), 0o600);

    // A planted symlink is refused, and with --force replaced, never written through.
    let victim = dir.path().join("victim");
    fs::write(&victim, "precious").unwrap();
    let planted = dir.path().join("planted");
    symlink(&victim, planted.with_extension("key")).unwrap();
    assert!(matches!(
        signing::keygen(&planted, false),
        Err(SigningError::Exists(_))
    ));
    let (key, _) = signing::keygen(&planted, true).unwrap();
    assert!(!fs::symlink_metadata(&key).unwrap().file_type().is_symlink());
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");

    // A dangling link at PREFIX.pub is refused too, and nothing is left half-written.
    let dangling = dir.path().join("dangling");
    symlink(dir.path().join("nowhere"), dangling.with_extension("pub")).unwrap();
    assert!(signing::keygen(&dangling, false).is_err());
    assert!(!dangling.with_extension("key").exists());
    assert!(!dir.path().join("nowhere").exists());
}

#[test]
fn server_cli_keygen_and_sign() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("op");
    let run = |args: &[&str]| Command::new(SERVER_BIN).args(args).output().unwrap();

    let out = run(&["directory", "keygen", "--out", p(&prefix)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("op.pub"));

    let file = directory_file(dir.path());
    let key = prefix.with_extension("key");
    let out = run(&["directory", "sign", "--key", p(&key), p(&file)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys = DirectoryKeys::read(&[prefix.with_extension("pub")]).unwrap();
    let (bytes, sig) = read_signed(&file).unwrap();
    keys.verify(&bytes, &sig).unwrap();

    // The key from the environment, as every flag can be.
    fs::write(&file, "[]").unwrap();
    let out = Command::new(SERVER_BIN)
        .args(["directory", "sign", p(&file)])
        .env("DMR_KEY", &key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (bytes, sig) = read_signed(&file).unwrap();
    keys.verify(&bytes, &sig).unwrap();

    let out = run(&["directory", "keygen", "--out", p(&prefix)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));

    let out = run(&[
        "directory",
        "sign",
        "--key",
        p(&dir.path().join("nope.key")),
        p(&file),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope.key"), "{err}");
}
