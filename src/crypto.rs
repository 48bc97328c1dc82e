//! End-to-end cryptography: agent key pairs, their PEM files, HPKE sealing of envelopes
//! and the proof of key possession used in the WebSocket handshake.
//!
//! The proof is bound to the TLS channel when the server terminates TLS: both ends mix a
//! TLS exporter value ([`crate::transport::Stream::channel_binding`]) into the transcript,
//! so a proof made on one TLS connection is worthless on any other (a relay in the middle
//! cannot pass it on). The rule for when that happens is written down at [`ChannelBinding`].
//!
//! This is the only module that knows orion. Keys are X25519; envelopes use RFC 9180 HPKE
//! in Auth mode (DHKEM(X25519, HKDF-SHA256), ChaCha20-Poly1305), amortised over an epoch of
//! messages ([`Sealer`], [`Opener`], see `envelope`), with the encoded header as associated
//! data, so neither the content nor the metadata can be changed unnoticed.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use orion::hazardous::ecc::x25519;
use orion::hazardous::kdf::hkdf;
use orion::hazardous::kem::x25519_hkdf_sha256 as kem;

use zeroize::{Zeroize, Zeroizing};

use crate::protocol::{AgentId, PROTOCOL_VERSION};

mod envelope;
pub use envelope::{open, seal, EpochLimits, Opener, Sealer, OPENER_CACHE};

const PROOF_KDF_INFO: &[u8] = b"dmr/v1 handshake proof key";

/// DER prefixes of the only key forms OpenSSL writes for X25519.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x03, 0x21, 0x00,
];
/// After the outer SEQUENCE header: version (patched), AlgorithmIdentifier, OCTET STRING
/// wrapping the 32-byte OCTET STRING key.
const PKCS8_BODY_PREFIX: [u8; 14] = [
    0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x04, 0x22, 0x04, 0x20,
];

/// What went wrong with a key or a cryptographic operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CryptoError {
    /// The text is not PEM, or not the expected PEM label.
    Pem(String),
    /// The PEM holds something other than an X25519 key.
    NotX25519(&'static str),
    /// The OS random generator failed.
    Random,
    /// An envelope failed to open: wrong keys, changed header or changed ciphertext.
    OpenFailed,
    /// Sealing failed (e.g. the recipient key is a low-order point).
    SealFailed,
}

impl fmt::Display for CryptoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pem(e) => write!(f, "not a usable PEM key: {e}"),
            Self::NotX25519(which) => write!(
                f,
                "{which} is not an X25519 key (make one with `dmr-agent keygen` or `openssl genpkey -algorithm X25519`)"
            ),
            Self::Random => f.write_str("the operating system's random generator failed"),
            Self::OpenFailed => f.write_str(
                "envelope failed authentication: wrong keys, or header or ciphertext was altered",
            ),
            Self::SealFailed => f.write_str("could not encrypt to this recipient key"),
        }
    }
}

impl std::error::Error for CryptoError {}

/// An agent's X25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses an SPKI PEM (`-----BEGIN PUBLIC KEY-----`, as `openssl pkey -pubout` writes).
    pub fn from_pem(text: &str) -> Result<Self, CryptoError> {
        let der = pem_contents(text, "PUBLIC KEY")?;
        match der.strip_prefix(&SPKI_PREFIX[..]) {
            Some(key) if der.len() == 44 => Ok(Self(key.try_into().expect("length checked"))),
            _ => Err(CryptoError::NotX25519("public key")),
        }
    }

    pub fn to_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.0);
        encode_pem("PUBLIC KEY", der)
    }

    fn to_orion(self) -> kem::PublicKey {
        kem::PublicKey::from(self.0)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey(")?;
        self.0[..6].iter().try_for_each(|b| write!(f, "{b:02x}"))?;
        write!(f, "…)")
    }
}

/// An agent's X25519 private key. Never printed: `Debug` shows only the public half.
pub struct SecretKey {
    inner: kem::PrivateKey,
    public: PublicKey,
}

impl SecretKey {
    /// A fresh key from the OS random generator.
    pub fn generate() -> Result<Self, CryptoError> {
        let inner = kem::PrivateKey::generate().map_err(|_| CryptoError::Random)?;
        Ok(Self::from_orion(inner))
    }

    fn from_orion(inner: kem::PrivateKey) -> Self {
        let public = kem::PublicKey::try_from(&inner).expect("X25519 base-point multiplication");
        let public = PublicKey(public.as_ref().try_into().expect("32-byte public key"));
        Self { inner, public }
    }

    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// Parses a PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`, as `openssl genpkey -algorithm
    /// X25519` writes; the v2 form with an embedded public key is accepted too).
    pub fn from_pem(text: &str) -> Result<Self, CryptoError> {
        // The DER holds the key: wiped when dropped, whatever the outcome.
        let der = Zeroizing::new(pem_contents(text, "PRIVATE KEY")?);
        let key = pkcs8_x25519(&der).ok_or(CryptoError::NotX25519("private key"))?;
        let inner =
            kem::PrivateKey::try_from(key).map_err(|_| CryptoError::NotX25519("private key"))?;
        Ok(Self::from_orion(inner))
    }

    /// PKCS#8 v1 PEM, readable by `openssl pkey`. The text holds the key: wrap it in
    /// [`Zeroizing`] (as [`write_key_pair`] does) so it is wiped after use.
    pub fn to_pem(&self) -> String {
        let mut der = vec![0x30, 0x2e];
        der.extend_from_slice(&PKCS8_BODY_PREFIX);
        der.extend_from_slice(self.inner.unprotected_as_ref());
        encode_pem("PRIVATE KEY", der)
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public: {:?})", self.public)
    }
}

/// PEM with Unix line endings, byte-identical to what openssl writes. `der` is wiped once
/// encoded, as it may be a private key.
pub(crate) fn encode_pem(label: &str, der: Vec<u8>) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    let p = pem::Pem::new(label, der);
    let text = pem::encode_config(&p, config);
    p.into_contents().zeroize();
    text
}

pub(crate) fn pem_contents(text: &str, label: &str) -> Result<Vec<u8>, CryptoError> {
    let p = pem::parse(text.trim()).map_err(|e| {
        CryptoError::Pem(match e {
            // pem quotes the offending line, which may be a line of the (private) key:
            // never let key material reach an error message, and so a log.
            pem::PemError::InvalidHeader(_) => {
                "a line between BEGIN and END is neither base64 nor a \"Name: value\" header".into()
            }
            pem::PemError::MismatchedTags(..) => "the BEGIN and END lines do not match".into(),
            pem::PemError::MalformedFraming => "malformed PEM framing".into(),
            other => other.to_string(),
        })
    })?;
    if p.tag() != label {
        // Quote the label only when it looks like one (a damaged file can put key text there).
        let tag = p.tag();
        let plain = tag.len() <= 40 && tag.bytes().all(|b| b.is_ascii_uppercase() || b == b' ');
        return Err(CryptoError::Pem(match plain {
            true => format!("expected \"-----BEGIN {label}-----\", found \"{tag}\""),
            false => format!("expected \"-----BEGIN {label}-----\", found another label"),
        }));
    }
    Ok(p.into_contents())
}

/// Extracts the 32-byte key from PKCS#8 v1 (`version 0`) or v2 (`version 1`, optional
/// trailing attributes / public key) DER. Anything else is refused. The key is borrowed
/// from `der`, so no copy of it is left behind.
fn pkcs8_x25519(der: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = der.split_first()?;
    let (&len, body) = rest.split_first()?;
    if tag != 0x30 || len >= 0x80 || body.len() != len as usize || body.len() < 46 {
        return None;
    }
    let version = body[2];
    let mut expected = PKCS8_BODY_PREFIX;
    expected[2] = version;
    if version > 1 || body[..14] != expected || (version == 0 && body.len() != 46) {
        return None;
    }
    body.get(14..46)
}

/// The server's half of one handshake: a fresh ephemeral key and nonce.
pub struct Challenge {
    ephemeral: x25519::PrivateKey,
    ephemeral_pk: [u8; 32],
    nonce: [u8; 32],
}

impl Challenge {
    pub fn new() -> Result<Self, CryptoError> {
        let ephemeral = x25519::PrivateKey::generate().map_err(|_| CryptoError::Random)?;
        let pk = x25519::PublicKey::try_from(&ephemeral).map_err(|_| CryptoError::Random)?;
        let mut nonce = [0u8; 32];
        orion::util::secure_rand_bytes(&mut nonce).map_err(|_| CryptoError::Random)?;
        let ephemeral_pk = pk.as_ref().try_into().expect("32-byte public key");
        Ok(Self {
            ephemeral,
            ephemeral_pk,
            nonce,
        })
    }

    pub fn ephemeral_pk(&self) -> [u8; 32] {
        self.ephemeral_pk
    }

    pub fn nonce(&self) -> [u8; 32] {
        self.nonce
    }

    /// True when `mac` proves possession of the private key behind `agent_pk`, made for
    /// this challenge over the same `channel` (see [`ChannelBinding`]).
    pub fn verify(
        &self,
        agent_id: &AgentId,
        agent_pk: &PublicKey,
        channel: ChannelBinding,
        mac: &[u8; 32],
    ) -> bool {
        let peer = x25519::PublicKey::from(agent_pk.0);
        let Ok(shared) = x25519::key_agreement(&self.ephemeral, &peer) else {
            return false;
        };
        let Some(key) = proof_key(shared.unprotected_as_ref()) else {
            return false;
        };
        let transcript = transcript(agent_id, agent_pk, &self.ephemeral_pk, &self.nonce, channel);
        let Ok(tag) = orion::auth::Tag::try_from(&mac[..]) else {
            return false;
        };
        orion::auth::authenticate_verify(&tag, &key, &transcript).is_ok()
    }
}

/// What, besides the challenge, a handshake proof is bound to.
///
/// The rule both ends follow:
/// - the server binds (and says so in `Challenge.tls_bound`) if and only if it terminates
///   TLS itself; it then accepts only a proof bound to its side of that TLS connection;
/// - the agent binds if and only if the challenge says so **and** its own connection is
///   TLS; a challenge asking for binding on a plain `ws://` connection is refused, since
///   no honest server sends one there.
///
/// Behind a TLS ingress the server speaks plain WebSocket, so there is no channel both ends
/// share and the proof is [`ChannelBinding::Unbound`] (see docs/SECURITY.md for what that
/// still allows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelBinding {
    /// No TLS channel shared by both ends.
    Unbound,
    /// The TLS exporter value (RFC 5705 / RFC 8446 §7.5) of the connection the proof is for.
    Tls([u8; 32]),
}

/// The agent's answer to a challenge: a keyed BLAKE2b MAC over the transcript (protocol
/// version, agent id, both public keys, nonce, channel binding) under a key derived from
/// `x25519(agent_sk, server_ephemeral_pk)`.
pub fn prove(
    agent: &SecretKey,
    agent_id: &AgentId,
    ephemeral_pk: &[u8; 32],
    nonce: &[u8; 32],
    channel: ChannelBinding,
) -> Result<[u8; 32], CryptoError> {
    let sk = x25519::PrivateKey::from(&agent.inner);
    let shared = x25519::key_agreement(&sk, &x25519::PublicKey::from(*ephemeral_pk))
        .map_err(|_| CryptoError::SealFailed)?;
    let key = proof_key(shared.unprotected_as_ref()).ok_or(CryptoError::SealFailed)?;
    let transcript = transcript(agent_id, &agent.public, ephemeral_pk, nonce, channel);
    let tag = orion::auth::authenticate(&key, &transcript).map_err(|_| CryptoError::SealFailed)?;
    Ok(tag
        .unprotected_as_ref()
        .try_into()
        .expect("32-byte BLAKE2b tag"))
}

fn proof_key(shared: &[u8]) -> Option<orion::auth::SecretKey> {
    let mut okm = [0u8; 32];
    hkdf::Hkdf::<hkdf::SHA256>::derive_key(&[], shared, Some(PROOF_KDF_INFO), &mut okm).ok()?;
    orion::auth::SecretKey::try_from(&okm[..]).ok()
}

fn transcript(
    id: &AgentId,
    agent_pk: &PublicKey,
    eph_pk: &[u8; 32],
    nonce: &[u8; 32],
    channel: ChannelBinding,
) -> Vec<u8> {
    let mut t = Vec::with_capacity(2 + 1 + id.as_str().len() + 96 + 33);
    t.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    t.push(id.as_str().len() as u8);
    t.extend_from_slice(id.as_str().as_bytes());
    t.extend_from_slice(&agent_pk.0);
    t.extend_from_slice(eph_pk);
    t.extend_from_slice(nonce);
    // The flag is in the transcript too, so a bound and an unbound proof never coincide.
    match channel {
        ChannelBinding::Unbound => t.push(0),
        ChannelBinding::Tls(exporter) => {
            t.push(1);
            t.extend_from_slice(&exporter);
        }
    }
    t
}

/// The largest private key file read: a PEM key is a few hundred bytes.
const MAX_KEY_FILE: u64 = 64 * 1024;

/// Why a private key file could not be read or written. Every message names the file and
/// none quotes its content.
#[derive(Debug)]
pub enum KeyFileError {
    /// Opening, reading, writing or moving the file failed.
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    /// Group or others have access to the file (`mode` is its permission bits).
    Exposed { path: PathBuf, mode: u32 },
    /// Far bigger than any key file.
    TooLarge { path: PathBuf, bytes: u64 },
    /// The file is not an X25519 private key in PEM.
    Key { path: PathBuf, source: CryptoError },
    /// `keygen` without `--force` found a file (or a link) in the way.
    Exists { path: PathBuf },
    /// `keygen --force` found something other than a file or a link to replace.
    NotAFile { path: PathBuf },
    /// The OS random generator failed.
    Random,
}

impl fmt::Display for KeyFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io {
                path,
                action,
                source,
            } => write!(f, "cannot {action} {}: {source}", path.display()),
            Self::Exposed { path, mode } => write!(
                f,
                "{p} is open to group or others (mode {mode:04o}); a private key must be \
                 readable by its owner only: run `chmod 600 {p}`",
                p = path.display()
            ),
            Self::TooLarge { path, bytes } => write!(
                f,
                "{} is {bytes} bytes, too large for a key file",
                path.display()
            ),
            Self::Key { path, source } => write!(f, "{}: {source}", path.display()),
            Self::Exists { path } => write!(
                f,
                "{} exists; pass --force to replace it (a previous private key is kept as .key.old)",
                path.display()
            ),
            Self::NotAFile { path } => {
                write!(f, "{} is neither a file nor a symlink", path.display())
            }
            Self::Random => CryptoError::Random.fmt(f),
        }
    }
}

impl std::error::Error for KeyFileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            Self::Key { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_error<'a>(
    path: &'a Path,
    action: &'static str,
) -> impl FnOnce(io::Error) -> KeyFileError + 'a {
    move |source| KeyFileError::Io {
        path: path.to_owned(),
        action,
        source,
    }
}

/// Reads an agent's private key file (`--key`). Refuses a file group or others can access
/// (as ssh does), so a key left world-readable is noticed before it is used; the PEM text
/// and its DER are wiped from memory once parsed. Follows symlinks, as systemd credentials
/// and Kubernetes secrets are links.
pub fn read_key_file(path: &Path) -> Result<SecretKey, KeyFileError> {
    let file = File::open(path).map_err(io_error(path, "read"))?;
    // The open file's own metadata: the file checked is the file read.
    let meta = file.metadata().map_err(io_error(path, "read"))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.len() > MAX_KEY_FILE {
        return Err(KeyFileError::TooLarge {
            path: path.to_owned(),
            bytes: meta.len(),
        });
    }
    // Capacity for the whole file up front, so no reallocation leaves a copy behind.
    let mut text = Zeroizing::new(String::with_capacity(meta.len() as usize + 1));
    file.take(MAX_KEY_FILE)
        .read_to_string(&mut text)
        .map_err(io_error(path, "read"))?;
    SecretKey::from_pem(&text).map_err(|source| KeyFileError::Key {
        path: path.to_owned(),
        source,
    })
}

/// Writes a new key pair to `PREFIX.key` (mode 0600) and `PREFIX.pub`, returning the two
/// paths. Files are created new and never through a symlink (O_EXCL | O_NOFOLLOW), so a
/// planted link cannot redirect the private key. Existing files are refused unless
/// `force`; then a previous private key file is kept as `PREFIX.key.old` (mode 0600) for
/// a rotation, and a link in its place is removed (its target is left alone).
pub fn write_key_pair(prefix: &Path, force: bool) -> Result<(PathBuf, PathBuf), KeyFileError> {
    let key_path = with_suffix(prefix, "key");
    let pub_path = with_suffix(prefix, "pub");
    if !force {
        // Both checked before writing either; create_new below is what closes the race.
        if let Some(p) = [&key_path, &pub_path]
            .into_iter()
            .find(|p| fs::symlink_metadata(p).is_ok())
        {
            return Err(KeyFileError::Exists { path: p.clone() });
        }
    }
    let sk = SecretKey::generate().map_err(|_| KeyFileError::Random)?;
    if force {
        keep_old_key(&key_path)?;
        remove_entry(&pub_path)?;
    }
    let pem = Zeroizing::new(sk.to_pem());
    write_new(&key_path, 0o600, pem.as_bytes())?;
    if let Err(e) = write_new(&pub_path, 0o644, sk.public_key().to_pem().as_bytes()) {
        let _ = fs::remove_file(&key_path);
        return Err(e);
    }
    Ok((key_path, pub_path))
}

/// The name a replaced private key is kept under: `PREFIX.key.old`.
pub fn old_key_path(key_path: &Path) -> PathBuf {
    with_suffix(key_path, "old")
}

/// Moves the private key file at `key_path` aside to `.key.old`, made 0600 first (through
/// a descriptor opened without following links). A link is removed instead; nothing
/// there is fine.
fn keep_old_key(key_path: &Path) -> Result<(), KeyFileError> {
    let kind = match fs::symlink_metadata(key_path) {
        Ok(m) => m.file_type(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(key_path, "inspect")(e)),
    };
    if kind.is_symlink() {
        return remove_entry(key_path);
    }
    if !kind.is_file() {
        return Err(KeyFileError::NotAFile {
            path: key_path.to_owned(),
        });
    }
    let old = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(key_path)
        .map_err(io_error(key_path, "open"))?;
    old.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io_error(key_path, "chmod"))?;
    // rename replaces an earlier .key.old, a link included, without following it.
    let kept = old_key_path(key_path);
    fs::rename(key_path, &kept).map_err(io_error(&kept, "move the old key to"))
}

/// Removes the file or link at `path` (never a link's target); nothing there is fine.
fn remove_entry(path: &Path) -> Result<(), KeyFileError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Ok(m) if m.is_dir() => Err(KeyFileError::NotAFile {
            path: path.to_owned(),
        }),
        _ => match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error(path, "remove")(e)),
            _ => Ok(()),
        },
    }
}

/// Creates `path` with `mode`; fails if anything, a dangling link included, is there.
fn write_new(path: &Path, mode: u32, bytes: &[u8]) -> Result<(), KeyFileError> {
    write_new_file(path, mode, bytes).map_err(|(action, e)| match e.kind() {
        io::ErrorKind::AlreadyExists if action == "create" => KeyFileError::Exists {
            path: path.to_owned(),
        },
        _ => io_error(path, action)(e),
    })
}

/// Creates `path` with `mode` (never an existing file, never through a symlink: `O_EXCL` and
/// `O_NOFOLLOW`), writes `bytes` and syncs them; on failure, which step failed ("create" or
/// "write"). Key files of both kinds (agent and directory signing) are written this way.
pub(crate) fn write_new_file(
    path: &Path,
    mode: u32,
    bytes: &[u8],
) -> Result<(), (&'static str, io::Error)> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| ("create", e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| ("write", e))
}

/// `PREFIX` + `.ext`, keeping any dots already in the prefix (`a.b` → `a.b.key`).
pub(crate) fn with_suffix(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    s.into()
}
