//! Crypto properties through the public API, and PEM interoperability with the real
//! `openssl` binary in both directions.

use std::process::Command;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use dmr::crypto::{
    self, Challenge, ChannelBinding, CryptoError, EpochLimits, Opener, PublicKey, Sealer, SecretKey,
};
use dmr::protocol::{AgentId, Header, Kind, MessageId};

fn header(sender: &str, recipient: &str) -> Header {
    Header {
        id: MessageId::random(),
        sender: AgentId::new(sender).unwrap(),
        recipient: AgentId::new(recipient).unwrap(),
        created_at_ms: 1_700_000_000_000,
        kind: Kind::chat_message(),
        seq: 0,
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

type Edit = Box<dyn Fn(&mut Header)>;

/// One change to every field of a header, each of which must make the envelope fail to open.
fn header_edits() -> Vec<(&'static str, Edit)> {
    vec![
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
        ("seq + 1", Box::new(|h| h.seq += 1)),
    ]
}

#[test]
fn every_header_field_is_authenticated() {
    let (a, b) = (
        SecretKey::generate().unwrap(),
        SecretKey::generate().unwrap(),
    );
    let sealed = crypto::seal(&a, &b.public_key(), header("a", "b"), b"payload").unwrap();
    for (field, edit) in header_edits() {
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

// Amortised HPKE: one epoch per (sender, recipient key), one key per message.

fn pair() -> (SecretKey, SecretKey) {
    (
        SecretKey::generate().unwrap(),
        SecretKey::generate().unwrap(),
    )
}

/// A sealer whose epochs last `max_messages` messages (and an hour).
fn sealer_with_bound(key: SecretKey, max_messages: u64) -> Sealer {
    let limits = EpochLimits {
        max_messages,
        max_age: Duration::from_secs(3600),
    };
    Sealer::with_limits(key, limits)
}

#[test]
fn one_epoch_carries_many_messages_and_one_context_opens_them() {
    let (a, b) = pair();
    let (a_pk, b_pk) = (a.public_key(), b.public_key());
    let (sealer, opener) = (Sealer::new(a), Opener::new(b));
    let envs: Vec<_> = (0..3)
        .map(|i| sealer.seal(&b_pk, header("a", "b"), &[i]).unwrap())
        .collect();
    let seqs: Vec<u64> = envs.iter().map(|e| e.header().seq).collect();
    assert_eq!(seqs, [0, 1, 2], "seq is set by the sealer, in order");
    assert!(envs.iter().all(|e| e.enc() == envs[0].enc()), "one epoch");
    for (i, env) in envs.iter().enumerate() {
        assert_eq!(opener.open(&a_pk, env).unwrap(), [i as u8]);
    }
    assert_eq!(opener.cached_contexts(), 1, "one setup for the whole epoch");
}

#[test]
fn tampering_fails_with_a_cached_context_too() {
    let (a, b) = pair();
    let (a_pk, b_pk) = (a.public_key(), b.public_key());
    let (sealer, opener) = (Sealer::new(a), Opener::new(b));
    let first = sealer.seal(&b_pk, header("a", "b"), b"first").unwrap();
    let sealed = sealer.seal(&b_pk, header("a", "b"), b"second").unwrap();
    // The epoch's context is cached now: tampering must fail on that path as well.
    opener.open(&a_pk, &first).unwrap();
    let mut edits = header_edits();
    edits.push(("seq of another message", Box::new(|h| h.seq = 0)));
    edits.push(("seq far away", Box::new(|h| h.seq = u64::MAX)));
    for (field, edit) in edits {
        let mut env = sealed.clone();
        edit(env.tamper().0);
        assert_eq!(
            opener.open(&a_pk, &env),
            Err(CryptoError::OpenFailed),
            "changed {field} still opened"
        );
    }
    for i in 0..sealed.ciphertext().len() * 8 {
        let mut env = sealed.clone();
        env.tamper().2[i / 8] ^= 1 << (i % 8);
        assert!(opener.open(&a_pk, &env).is_err(), "ciphertext bit {i}");
    }
    for i in 0..256 {
        let mut env = sealed.clone();
        env.tamper().1[i / 8] ^= 1 << (i % 8);
        assert!(opener.open(&a_pk, &env).is_err(), "enc bit {i}");
    }
    // A relay grafting one message's ciphertext onto another's header fails too.
    let mut grafted = sealed.clone();
    *grafted.tamper().2 = first.ciphertext().to_vec();
    assert!(opener.open(&a_pk, &grafted).is_err());
    // Failed opens cached nothing, and the genuine message still opens.
    assert_eq!(opener.cached_contexts(), 1);
    assert_eq!(opener.open(&a_pk, &sealed).unwrap(), b"second");
}

#[test]
fn reordered_and_redelivered_messages_open() {
    let (a, b) = pair();
    let (a_pk, b_pk) = (a.public_key(), b.public_key());
    let (sealer, opener) = (Sealer::new(a), Opener::new(b));
    let envs: Vec<_> = (1..=3u8)
        .map(|i| sealer.seal(&b_pk, header("a", "b"), &[i]).unwrap())
        .collect();
    for i in [3, 1, 2] {
        assert_eq!(opener.open(&a_pk, &envs[i - 1]).unwrap(), [i as u8]);
    }
    // Redelivery: the same envelope opens again (replay is the agent's guard's business).
    assert_eq!(opener.open(&a_pk, &envs[0]).unwrap(), [1]);
    assert_eq!(opener.open(&a_pk, &envs[0]).unwrap(), [1]);
}

#[test]
fn a_restarted_recipient_opens_with_an_empty_cache() {
    let (a, b) = pair();
    let (a_pk, b_pk) = (a.public_key(), b.public_key());
    let b = Arc::new(b);
    let sealer = Sealer::new(a);
    let first = sealer.seal(&b_pk, header("a", "b"), b"1").unwrap();
    let second = sealer.seal(&b_pk, header("a", "b"), b"2").unwrap();
    Opener::new(b.clone()).open(&a_pk, &first).unwrap();
    let restarted = Opener::new(b.clone());
    assert_eq!(restarted.cached_contexts(), 0);
    assert_eq!(restarted.open(&a_pk, &second).unwrap(), b"2");
    // The one-shot form opens it too: same construction, no cache.
    assert_eq!(crypto::open(&b, &a_pk, &second).unwrap(), b"2");
}

#[test]
fn a_rekeyed_recipient_gets_a_new_epoch_the_old_key_cannot_open() {
    let (a, old) = pair();
    let new = SecretKey::generate().unwrap();
    let (a_pk, old_pk, new_pk) = (a.public_key(), old.public_key(), new.public_key());
    let sealer = Sealer::new(a);
    let before = sealer.seal(&old_pk, header("a", "b"), b"before").unwrap();
    let after = sealer.seal(&new_pk, header("a", "b"), b"after").unwrap();
    assert_ne!(before.enc(), after.enc(), "a new key starts a new epoch");
    assert_eq!(after.header().seq, 0);
    let (old, new) = (Arc::new(old), Arc::new(new));
    assert_eq!(
        Opener::new(old.clone()).open(&a_pk, &after),
        Err(CryptoError::OpenFailed)
    );
    assert_eq!(
        Opener::new(new.clone()).open(&a_pk, &after).unwrap(),
        b"after"
    );
    // During the rotation the recipient still opens what was sealed to its previous key.
    let rotating = Opener::new(new).with_previous(old);
    assert_eq!(rotating.open(&a_pk, &before).unwrap(), b"before");
    assert_eq!(rotating.open(&a_pk, &after).unwrap(), b"after");
}

#[test]
fn the_epoch_rotates_after_its_message_bound() {
    let (a, b) = pair();
    let (a_pk, b_pk) = (a.public_key(), b.public_key());
    let (sealer, opener) = (sealer_with_bound(a, 2), Opener::new(b));
    let envs: Vec<_> = (0..5u8)
        .map(|i| sealer.seal(&b_pk, header("a", "b"), &[i]).unwrap())
        .collect();
    let seqs: Vec<u64> = envs.iter().map(|e| e.header().seq).collect();
    assert_eq!(seqs, [0, 1, 0, 1, 0]);
    let encs: HashSet<[u8; 32]> = envs.iter().map(|e| *e.enc()).collect();
    assert_eq!(encs.len(), 3, "three epochs of at most two messages");
    assert_eq!(envs[0].enc(), envs[1].enc());
    assert_ne!(envs[1].enc(), envs[2].enc());
    for (i, env) in envs.iter().enumerate() {
        assert_eq!(opener.open(&a_pk, env).unwrap(), [i as u8]);
    }
    assert_eq!(opener.cached_contexts(), 3);
}

#[test]
fn distinct_seqs_seal_under_distinct_keys() {
    let (a, b) = pair();
    let b_pk = b.public_key();
    let sealer = Sealer::new(a);
    // Same header and plaintext: only seq differs, so equal bodies would mean equal keys.
    let h = header("a", "b");
    let bodies: HashSet<Vec<u8>> = (0..50)
        .map(|_| {
            let env = sealer.seal(&b_pk, h.clone(), &[0u8; 32]).unwrap();
            env.ciphertext()[..32].to_vec()
        })
        .collect();
    assert_eq!(bodies.len(), 50);
}

#[test]
fn threads_sharing_a_sealer_never_reuse_a_seq() {
    let (a, b) = pair();
    let (a_pk, b_pk) = (a.public_key(), b.public_key());
    let sealer = Arc::new(sealer_with_bound(a, 37));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let sealer = sealer.clone();
            std::thread::spawn(move || {
                (0..100)
                    .map(|_| sealer.seal(&b_pk, header("a", "b"), b"x").unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let envs: Vec<_> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let slots: HashSet<([u8; 32], u64)> = envs.iter().map(|e| (*e.enc(), e.header().seq)).collect();
    assert_eq!(slots.len(), envs.len(), "an (enc, seq) was used twice");
    assert!(envs.iter().all(|e| e.header().seq < 37));
    let opener = Opener::new(b);
    assert!(envs.iter().all(|e| opener.open(&a_pk, e).is_ok()));
}
