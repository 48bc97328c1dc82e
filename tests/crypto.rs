//! Crypto properties through the public API, and PEM interoperability with the real
//! `openssl` binary in both directions.

use std::process::Command;

use dmr::crypto::{self, Challenge, ChannelBinding, CryptoError, PublicKey, SecretKey};
use dmr::protocol::{AgentId, Header, Kind, MessageId};

fn header(sender: &str, recipient: &str) -> Header {
    Header {
        id: MessageId::random(),
        sender: AgentId::new(sender).unwrap(),
        recipient: AgentId::new(recipient).unwrap(),
        created_at_ms: 1_700_000_000_000,
        kind: Kind::chat_message(),
    }
}

fn openssl(args: &[&str]) -> std::process::Output {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl must be installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn seal_then_open_round_trips() {
    let (a, b) = (
        SecretKey::generate().unwrap(),
        SecretKey::generate().unwrap(),
    );
    let env = crypto::seal(&a, &b.public_key(), header("a", "b"), b"{\"q\":\"hello\"}").unwrap();
    assert_eq!(env.ciphertext().len(), 13 + 16);
    assert_eq!(
        crypto::open(&b, &a.public_key(), &env).unwrap(),
        b"{\"q\":\"hello\"}"
    );
}

#[test]
fn wrong_recipient_key_fails() {
    let (a, b, c) = (
        SecretKey::generate().unwrap(),
        SecretKey::generate().unwrap(),
        SecretKey::generate().unwrap(),
    );
    let env = crypto::seal(&a, &b.public_key(), header("a", "b"), b"secret").unwrap();
    assert_eq!(
        crypto::open(&c, &a.public_key(), &env),
        Err(CryptoError::OpenFailed)
    );
}

#[test]
fn wrong_claimed_sender_fails() {
    let (a, b, mallory) = (
        SecretKey::generate().unwrap(),
        SecretKey::generate().unwrap(),
        SecretKey::generate().unwrap(),
    );
    // Mallory seals to b but the recipient checks against a's key (the claimed sender).
    let env = crypto::seal(&mallory, &b.public_key(), header("a", "b"), b"forged").unwrap();
    assert_eq!(
        crypto::open(&b, &a.public_key(), &env),
        Err(CryptoError::OpenFailed)
    );
}

#[test]
fn every_header_field_is_authenticated() {
    let (a, b) = (
        SecretKey::generate().unwrap(),
        SecretKey::generate().unwrap(),
    );
    let sealed = crypto::seal(&a, &b.public_key(), header("a", "b"), b"payload").unwrap();
    type Edit = Box<dyn Fn(&mut Header)>;
    let edits: Vec<(&str, Edit)> = vec![
        ("id", Box::new(|h| h.id = MessageId::random())),
        (
            "sender",
            Box::new(|h| h.sender = AgentId::new("c").unwrap()),
        ),
        (
            "recipient",
            Box::new(|h| h.recipient = AgentId::new("c").unwrap()),
        ),
        ("created_at", Box::new(|h| h.created_at_ms += 1)),
        ("kind", Box::new(|h| h.kind = Kind::new("Other").unwrap())),
    ];
    for (field, edit) in edits {
        let mut env = sealed.clone();
        edit(env.tamper().0);
        assert_eq!(
            crypto::open(&b, &a.public_key(), &env),
            Err(CryptoError::OpenFailed),
            "changed {field} still opened"
        );
    }
}

#[test]
fn every_flipped_ciphertext_or_enc_bit_fails() {
    let (a, b) = (
        SecretKey::generate().unwrap(),
        SecretKey::generate().unwrap(),
    );
    let sealed = crypto::seal(&a, &b.public_key(), header("a", "b"), b"0123456789").unwrap();
    for i in 0..sealed.ciphertext().len() * 8 {
        let mut env = sealed.clone();
        env.tamper().2[i / 8] ^= 1 << (i % 8);
        assert!(
            crypto::open(&b, &a.public_key(), &env).is_err(),
            "ciphertext bit {i}"
        );
    }
    for i in 0..256 {
        let mut env = sealed.clone();
        env.tamper().1[i / 8] ^= 1 << (i % 8);
        assert!(
            crypto::open(&b, &a.public_key(), &env).is_err(),
            "enc bit {i}"
        );
    }
    let mut short = sealed.clone();
    short.tamper().2.truncate(3);
    assert!(crypto::open(&b, &a.public_key(), &short).is_err());
}

#[test]
fn handshake_proof_accepts_the_key_holder_only() {
    let agent = SecretKey::generate().unwrap();
    let impostor = SecretKey::generate().unwrap();
    let id = AgentId::new("police").unwrap();
    let ch = Challenge::new().unwrap();
    let unbound = ChannelBinding::Unbound;
    let mac = crypto::prove(&agent, &id, &ch.ephemeral_pk(), &ch.nonce(), unbound).unwrap();
    assert!(ch.verify(&id, &agent.public_key(), unbound, &mac));
    // Wrong key, wrong id, and a proof replayed against a fresh challenge are all refused.
    let bad = crypto::prove(&impostor, &id, &ch.ephemeral_pk(), &ch.nonce(), unbound).unwrap();
    assert!(!ch.verify(&id, &agent.public_key(), unbound, &bad));
    let tax = AgentId::new("tax").unwrap();
    assert!(!ch.verify(&tax, &agent.public_key(), unbound, &mac));
    let fresh = Challenge::new().unwrap();
    assert!(!fresh.verify(&id, &agent.public_key(), unbound, &mac));
}

#[test]
fn a_channel_bound_proof_holds_for_its_channel_only() {
    let agent = SecretKey::generate().unwrap();
    let id = AgentId::new("police").unwrap();
    let ch = Challenge::new().unwrap();
    let (ours, theirs) = (ChannelBinding::Tls([1; 32]), ChannelBinding::Tls([2; 32]));
    let mac = crypto::prove(&agent, &id, &ch.ephemeral_pk(), &ch.nonce(), ours).unwrap();
    assert!(ch.verify(&id, &agent.public_key(), ours, &mac));
    // Relayed onto another TLS connection, or presented where no binding is expected.
    assert!(!ch.verify(&id, &agent.public_key(), theirs, &mac));
    assert!(!ch.verify(&id, &agent.public_key(), ChannelBinding::Unbound, &mac));
    // An unbound proof (the flag stripped on the way) is no good where binding is required.
    let unbound = ChannelBinding::Unbound;
    let stripped = crypto::prove(&agent, &id, &ch.ephemeral_pk(), &ch.nonce(), unbound).unwrap();
    assert!(!ch.verify(&id, &agent.public_key(), ours, &stripped));
}

#[test]
fn openssl_keys_work_here() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("a.key");
    openssl(&[
        "genpkey",
        "-algorithm",
        "X25519",
        "-out",
        key.to_str().unwrap(),
    ]);
    let pubkey = openssl(&["pkey", "-in", key.to_str().unwrap(), "-pubout"]).stdout;
    let sk = SecretKey::from_pem(&std::fs::read_to_string(&key).unwrap()).unwrap();
    let pk = PublicKey::from_pem(std::str::from_utf8(&pubkey).unwrap()).unwrap();
    assert_eq!(
        sk.public_key(),
        pk,
        "our public key derivation must match openssl's"
    );
    // And the pair is usable end to end.
    let other = SecretKey::generate().unwrap();
    let env = crypto::seal(&sk, &other.public_key(), header("a", "b"), b"x").unwrap();
    assert_eq!(crypto::open(&other, &pk, &env).unwrap(), b"x");
}

#[test]
fn our_keys_work_in_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("agent");
    let (key, public) = crypto::write_key_pair(&prefix, false).unwrap();
    let derived = openssl(&["pkey", "-in", key.to_str().unwrap(), "-pubout"]).stdout;
    assert_eq!(
        String::from_utf8(derived).unwrap().trim(),
        std::fs::read_to_string(&public).unwrap().trim()
    );
    openssl(&["pkey", "-pubin", "-in", public.to_str().unwrap(), "-noout"]);
    // Agree on a shared secret with openssl and with our key, both ways round.
    let peer = dir.path().join("peer.key");
    let peer_pub = dir.path().join("peer.pub");
    openssl(&[
        "genpkey",
        "-algorithm",
        "X25519",
        "-out",
        peer.to_str().unwrap(),
    ]);
    openssl(&[
        "pkey",
        "-in",
        peer.to_str().unwrap(),
        "-pubout",
        "-out",
        peer_pub.to_str().unwrap(),
    ]);
    let s1 = openssl(&[
        "pkeyutl",
        "-derive",
        "-inkey",
        key.to_str().unwrap(),
        "-peerkey",
        peer_pub.to_str().unwrap(),
    ])
    .stdout;
    let s2 = openssl(&[
        "pkeyutl",
        "-derive",
        "-inkey",
        peer.to_str().unwrap(),
        "-peerkey",
        public.to_str().unwrap(),
    ])
    .stdout;
    assert_eq!(s1.len(), 32);
    assert_eq!(s1, s2);
}

#[test]
fn key_files_are_private_and_not_overwritten() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("x.agent");
    let (key, public) = crypto::write_key_pair(&prefix, false).unwrap();
    assert!(key.ends_with("x.agent.key") && public.ends_with("x.agent.pub"));
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let before = std::fs::read(&key).unwrap();
    let err = crypto::write_key_pair(&prefix, false).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(std::fs::read(&key).unwrap(), before);
    crypto::write_key_pair(&prefix, true).unwrap();
    assert_ne!(std::fs::read(&key).unwrap(), before);
}

#[test]
fn bad_pem_gives_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ed = dir.path().join("ed.key");
    openssl(&[
        "genpkey",
        "-algorithm",
        "ED25519",
        "-out",
        ed.to_str().unwrap(),
    ]);
    let err = SecretKey::from_pem(&std::fs::read_to_string(&ed).unwrap()).unwrap_err();
    assert!(err.to_string().contains("not an X25519 key"), "{err}");
    let sk = SecretKey::generate().unwrap();
    assert!(PublicKey::from_pem(&sk.to_pem())
        .unwrap_err()
        .to_string()
        .contains("PUBLIC KEY"));
    assert!(SecretKey::from_pem("hello").is_err());
    assert!(
        PublicKey::from_pem("-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----").is_err()
    );
    // Debug never shows private material.
    let shown = format!("{sk:?}");
    assert!(shown.starts_with("SecretKey(public:"), "{shown}");
}

#[test]
fn random_pem_bodies_never_panic() {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..5_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let len = (state % 80) as usize;
        let bytes: Vec<u8> = (0..len).map(|i| (state >> (i % 56)) as u8).collect();
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &bytes);
        let _ = SecretKey::from_pem(&format!(
            "-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n"
        ));
        let _ = PublicKey::from_pem(&format!(
            "-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n"
        ));
    }
}
