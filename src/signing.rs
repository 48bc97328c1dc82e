//! Directory signatures: the operator's Ed25519 key vouches for the agent directory, so
//! agents need not trust the relay that hands it to them.
//!
//! This is the only module that knows ed25519-dalek. Keys and signatures are exactly what
//! OpenSSL makes and checks: private keys are PKCS#8 PEM (`openssl genpkey -algorithm
//! ed25519`), public keys SPKI PEM (`openssl pkey -pubout`), and a signature is the 64 bytes
//! `openssl pkeyutl -sign -rawin` writes, over the directory file's exact bytes. `FILE.sig`
//! holds it in base64 (any whitespace) or raw. It also holds the two operator commands,
//! `dmr-server directory keygen` and `dmr-server directory sign`.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey};
use ed25519_dalek::Signer as _;
use zeroize::Zeroizing;

use crate::config::{DirectoryArgs, DirectoryCommand};
use crate::crypto::{encode_pem, pem_contents, with_suffix, CryptoError};

/// DER prefix of an Ed25519 SubjectPublicKeyInfo, as `openssl pkey -pubout` writes it.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// DER prefix of an Ed25519 PKCS#8 v1 private key, as `openssl genpkey` writes it.
const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// The DER of the X25519 algorithm OID (1.3.101.110): an agent key given where an operator
/// key belongs is the likeliest mix-up, so it gets its own hint.
const X25519_OID: [u8; 5] = [0x06, 0x03, 0x2b, 0x65, 0x6e];
const SIGNATURE_LEN: usize = 64;
/// Larger key or signature files are not what we are looking for; refuse before reading.
const MAX_SMALL_FILE: u64 = 64 * 1024;

const KEYGEN_HINT: &str =
    "make one with `dmr-server directory keygen` or `openssl genpkey -algorithm ed25519`";

/// What went wrong with a directory key, a signature or their files. `origin` names the file
/// (or "the private key" etc. when the text did not come from a file).
#[derive(Debug)]
pub enum SigningError {
    /// A file could not be read or written.
    Io {
        path: PathBuf,
        action: &'static str,
        error: io::Error,
    },
    /// `keygen` would replace an existing file.
    Exists(PathBuf),
    /// Not PEM, or PEM with the wrong label.
    Pem { origin: String, problem: String },
    /// PEM of the right kind, but not an Ed25519 key.
    NotEd25519 {
        origin: String,
        which: &'static str,
        x25519: bool,
    },
    /// Neither base64 of 64 bytes nor 64 raw bytes.
    SignatureFormat { origin: String, problem: String },
    /// No trusted key made this signature over these bytes.
    BadSignature { origin: String, keys: usize },
    /// A directory signature was to be checked, but no key was given.
    NoKeys,
    /// The OS random generator failed.
    Random,
}

impl SigningError {
    /// The same error, naming `path` as where it came from.
    fn at(self, path: &Path) -> Self {
        let origin = path.display().to_string();
        match self {
            Self::Pem { problem, .. } => Self::Pem { origin, problem },
            Self::NotEd25519 { which, x25519, .. } => Self::NotEd25519 {
                origin,
                which,
                x25519,
            },
            Self::SignatureFormat { problem, .. } => Self::SignatureFormat { origin, problem },
            Self::BadSignature { keys, .. } => Self::BadSignature { origin, keys },
            other => other,
        }
    }

    fn io(path: &Path, action: &'static str, error: io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            action,
            error,
        }
    }
}

impl fmt::Display for SigningError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io {
                path,
                action,
                error,
            } => write!(f, "cannot {action} {}: {error}", path.display()),
            Self::Exists(path) => write!(
                f,
                "{} exists; pass --force to replace it (the old key stops working)",
                path.display()
            ),
            Self::Pem { origin, problem } => {
                write!(
                    f,
                    "{origin}: not a usable PEM key: {problem} ({KEYGEN_HINT})"
                )
            }
            Self::NotEd25519 {
                origin,
                which,
                x25519: true,
            } => write!(
                f,
                "{origin}: this {which} is an agent's X25519 key, not an operator's Ed25519 \
                 directory key ({KEYGEN_HINT})"
            ),
            Self::NotEd25519 { origin, which, .. } => {
                write!(f, "{origin}: this {which} is not Ed25519 ({KEYGEN_HINT})")
            }
            Self::SignatureFormat { origin, problem } => write!(
                f,
                "{origin}: not a directory signature ({problem}); expected base64 of 64 bytes \
                 (as `dmr-server directory sign` writes) or the 64 raw bytes (as `openssl \
                 pkeyutl -sign -rawin` writes)"
            ),
            Self::BadSignature { origin, keys } => write!(
                f,
                "{origin}: the signature does not match the directory under any of the {keys} \
                 trusted directory key(s): the file changed after it was signed, or another \
                 key signed it; sign it again with `dmr-server directory sign`"
            ),
            Self::NoKeys => f.write_str("no directory key given (--directory-key PATH)"),
            Self::Random => f.write_str("the operating system's random generator failed"),
        }
    }
}

impl std::error::Error for SigningError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// An operator's Ed25519 private key. Zeroized when dropped; `Debug` shows only the public
/// half.
pub struct SigningKey(ed25519_dalek::SigningKey);

impl SigningKey {
    /// A fresh key from the OS random generator.
    pub fn generate() -> Result<Self, SigningError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        orion::util::secure_rand_bytes(&mut seed[..]).map_err(|_| SigningError::Random)?;
        Ok(Self(ed25519_dalek::SigningKey::from_bytes(&seed)))
    }

    /// Parses a PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`, v1 or v2).
    pub fn from_pem(text: &str) -> Result<Self, SigningError> {
        let der = Zeroizing::new(pem_der(text, "PRIVATE KEY", "the private key")?);
        ed25519_dalek::SigningKey::from_pkcs8_der(&der)
            .map(Self)
            .map_err(|_| not_ed25519(&der, "the private key", "private key"))
    }

    /// Reads and parses a private key file; errors name the file.
    pub fn read(path: &Path) -> Result<Self, SigningError> {
        let bytes = read_small(path)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| SigningError::Pem {
            origin: path.display().to_string(),
            problem: "the file is not text".into(),
        })?;
        Self::from_pem(text).map_err(|e| e.at(path))
    }

    /// PKCS#8 v1 PEM, byte-identical to what `openssl genpkey -algorithm ed25519` writes.
    pub fn to_pem(&self) -> Zeroizing<String> {
        let mut der = Zeroizing::new(PKCS8_PREFIX.to_vec());
        der.extend_from_slice(self.0.as_bytes());
        Zeroizing::new(encode_pem("PRIVATE KEY", der.to_vec()))
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey(self.0.verifying_key())
    }

    /// Signs `bytes` as they are (PureEdDSA, like `openssl pkeyutl -sign -rawin`).
    pub fn sign(&self, bytes: &[u8]) -> Signature {
        Signature(self.0.sign(bytes).to_bytes())
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(public: {:?})", self.verifying_key())
    }
}

/// An operator's Ed25519 public key: what `--directory-key` names.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct VerifyingKey(ed25519_dalek::VerifyingKey);

impl VerifyingKey {
    /// Parses an SPKI PEM (`-----BEGIN PUBLIC KEY-----`, as `openssl pkey -pubout` writes).
    pub fn from_pem(text: &str) -> Result<Self, SigningError> {
        let der = pem_der(text, "PUBLIC KEY", "the public key")?;
        ed25519_dalek::VerifyingKey::from_public_key_der(&der)
            .map(Self)
            .map_err(|_| not_ed25519(&der, "the public key", "public key"))
    }

    /// Reads and parses a public key file; errors name the file.
    pub fn read(path: &Path) -> Result<Self, SigningError> {
        let bytes = read_small(path)?;
        let text = String::from_utf8_lossy(&bytes);
        Self::from_pem(&text).map_err(|e| e.at(path))
    }

    pub fn to_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(self.0.as_bytes());
        encode_pem("PUBLIC KEY", der)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    /// Checks `signature` over `bytes` (strict: no malleable or small-order forms).
    pub fn verify(&self, bytes: &[u8], signature: &Signature) -> Result<(), SigningError> {
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        self.0
            .verify_strict(bytes, &sig)
            .map_err(|_| SigningError::BadSignature {
                origin: "the signature".into(),
                keys: 1,
            })
    }
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyingKey(")?;
        self.as_bytes()[..6]
            .iter()
            .try_for_each(|b| write!(f, "{b:02x}"))?;
        write!(f, "…)")
    }
}

/// A 64-byte Ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature([u8; SIGNATURE_LEN]);

impl Signature {
    pub fn from_bytes(bytes: [u8; SIGNATURE_LEN]) -> Self {
        Self(bytes)
    }

    pub fn to_bytes(&self) -> [u8; SIGNATURE_LEN] {
        self.0
    }

    /// Parses a signature file's content: base64 (whitespace anywhere is ignored) of the
    /// 64 bytes, or the 64 raw bytes themselves.
    pub fn parse(file_bytes: &[u8]) -> Result<Self, SigningError> {
        let compact: Vec<u8> = file_bytes
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        let decoded = base64::engine::general_purpose::STANDARD.decode(&compact);
        if let Ok(Ok(sig)) = decoded.as_deref().map(<[u8; SIGNATURE_LEN]>::try_from) {
            return Ok(Self(sig));
        }
        if let Ok(raw) = <[u8; SIGNATURE_LEN]>::try_from(file_bytes) {
            return Ok(Self(raw));
        }
        let problem = match decoded {
            Ok(d) => format!("base64 of {} bytes", d.len()),
            Err(_) if file_bytes.is_empty() => "the file is empty".into(),
            Err(_) => format!(
                "{} bytes, neither base64 nor a raw signature",
                file_bytes.len()
            ),
        };
        Err(SigningError::SignatureFormat {
            origin: "the signature".into(),
            problem,
        })
    }

    /// Reads and parses a signature file; errors name the file.
    pub fn read(path: &Path) -> Result<Self, SigningError> {
        Self::parse(&read_small(path)?).map_err(|e| e.at(path))
    }

    /// Standard base64 with padding, no line breaks.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", self.to_base64())
    }
}

/// The operator keys an agent trusts for the directory (`--directory-key`, repeatable, so a
/// key can be rotated without a flag day). A directory is accepted when any of them signed it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirectoryKeys(Vec<VerifyingKey>);

impl DirectoryKeys {
    pub fn new(keys: Vec<VerifyingKey>) -> Self {
        Self(keys)
    }

    /// Reads every key file; the first bad one is the error.
    pub fn read(paths: &[PathBuf]) -> Result<Self, SigningError> {
        paths
            .iter()
            .map(|p| VerifyingKey::read(p))
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &VerifyingKey> {
        self.0.iter()
    }

    /// The key that signed `bytes`, or why none did.
    pub fn verify(
        &self,
        bytes: &[u8],
        signature: &Signature,
    ) -> Result<&VerifyingKey, SigningError> {
        if self.0.is_empty() {
            return Err(SigningError::NoKeys);
        }
        self.0
            .iter()
            .find(|k| k.verify(bytes, signature).is_ok())
            .ok_or(SigningError::BadSignature {
                origin: "the directory".into(),
                keys: self.0.len(),
            })
    }
}

/// Where the signature of `file` lives: `FILE.sig`.
pub fn signature_path(file: &Path) -> PathBuf {
    with_suffix(file, "sig")
}

/// Reads a directory file and its `FILE.sig`, as the server forwards them: the exact bytes
/// and the signature (checked by agents, not by the server, which is not trusted for it).
pub fn read_signed(file: &Path) -> Result<(Vec<u8>, Signature), SigningError> {
    let bytes = fs::read(file).map_err(|e| SigningError::io(file, "read", e))?;
    let signature = Signature::read(&signature_path(file))?;
    Ok((bytes, signature))
}

/// `dmr-server directory keygen`: writes `PREFIX.key` (mode 0600) and `PREFIX.pub`.
///
/// Files are created new and never through a symlink (O_EXCL | O_NOFOLLOW), so a planted
/// link cannot redirect the private key; `force` removes existing files (a link itself, not
/// its target) first. Returns the two paths.
pub fn keygen(prefix: &Path, force: bool) -> Result<(PathBuf, PathBuf), SigningError> {
    let key_path = with_suffix(prefix, "key");
    let pub_path = with_suffix(prefix, "pub");
    for path in [&key_path, &pub_path] {
        if fs::symlink_metadata(path).is_ok() {
            if !force {
                return Err(SigningError::Exists(path.clone()));
            }
            fs::remove_file(path).map_err(|e| SigningError::io(path, "remove", e))?;
        }
    }
    let key = SigningKey::generate()?;
    write_new(&key_path, 0o600, key.to_pem().as_bytes())?;
    if let Err(e) = write_new(&pub_path, 0o644, key.verifying_key().to_pem().as_bytes()) {
        let _ = fs::remove_file(&key_path);
        return Err(e);
    }
    Ok((key_path, pub_path))
}

/// `dmr-server directory sign`: signs `file`'s exact bytes with the private key at
/// `key_path` and writes the base64 signature and a newline to `FILE.sig`, replacing it
/// atomically (a watcher never sees half a signature). Returns the signature's path.
pub fn sign_file(key_path: &Path, file: &Path) -> Result<PathBuf, SigningError> {
    let key = SigningKey::read(key_path)?;
    let bytes = fs::read(file).map_err(|e| SigningError::io(file, "read", e))?;
    let sig_path = signature_path(file);
    let tmp = with_suffix(&sig_path, &format!("tmp{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let text = format!("{}\n", key.sign(&bytes).to_base64());
    write_new(&tmp, 0o644, text.as_bytes())?;
    fs::rename(&tmp, &sig_path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        SigningError::io(&sig_path, "replace", e)
    })?;
    Ok(sig_path)
}

/// Runs `dmr-server directory keygen|sign`, telling the operator what was written.
pub fn directory_command(args: &DirectoryArgs) -> Result<(), SigningError> {
    match &args.command {
        DirectoryCommand::Keygen(a) => {
            let (key, public) = keygen(&a.out, a.force)?;
            println!(
                "wrote {} (keep it offline) and {} (give it to agents as --directory-key)",
                key.display(),
                public.display()
            );
        }
        DirectoryCommand::Sign(a) => {
            let sig = sign_file(&a.key, &a.file)?;
            println!("wrote {}", sig.display());
        }
    }
    Ok(())
}

/// Creates `path` (never existing, never through a symlink) with `mode`, writes `bytes` and
/// syncs them to disk.
fn write_new(path: &Path, mode: u32, bytes: &[u8]) -> Result<(), SigningError> {
    crate::crypto::write_new_file(path, mode, bytes).map_err(|(action, e)| match e.kind() {
        io::ErrorKind::AlreadyExists if action == "create" => SigningError::Exists(path.to_owned()),
        _ => SigningError::io(path, action, e),
    })
}

/// Reads a key or signature file into a buffer that is wiped when dropped.
fn read_small(path: &Path) -> Result<Zeroizing<Vec<u8>>, SigningError> {
    let fail = |e| SigningError::io(path, "read", e);
    let f = File::open(path).map_err(fail)?;
    let len = f.metadata().map_err(fail)?.len();
    if len > MAX_SMALL_FILE {
        return Err(SigningError::io(
            path,
            "read",
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{len} bytes is too large for a key or signature"),
            ),
        ));
    }
    // Sized up front so the buffer never reallocates, leaving unwiped copies behind.
    let mut buf = Zeroizing::new(Vec::with_capacity(len as usize + 1));
    f.take(MAX_SMALL_FILE).read_to_end(&mut buf).map_err(fail)?;
    Ok(buf)
}

fn pem_der(text: &str, label: &str, origin: &str) -> Result<Vec<u8>, SigningError> {
    pem_contents(text, label).map_err(|e| SigningError::Pem {
        origin: origin.into(),
        problem: match e {
            CryptoError::Pem(p) => p,
            other => other.to_string(),
        },
    })
}

fn not_ed25519(der: &[u8], origin: &str, which: &'static str) -> SigningError {
    SigningError::NotEd25519 {
        origin: origin.into(),
        which,
        x25519: der.windows(X25519_OID.len()).any(|w| w == X25519_OID),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_pem() {
        let sk = SigningKey::generate().unwrap();
        let again = SigningKey::from_pem(&sk.to_pem()).unwrap();
        assert_eq!(again.verifying_key(), sk.verifying_key());
        let pk = VerifyingKey::from_pem(&sk.verifying_key().to_pem()).unwrap();
        assert_eq!(pk, sk.verifying_key());
        assert!(format!("{sk:?}").starts_with("SigningKey(public: VerifyingKey("));
    }

    #[test]
    fn signatures_verify_only_over_the_signed_bytes_and_key() {
        let (a, b) = (
            SigningKey::generate().unwrap(),
            SigningKey::generate().unwrap(),
        );
        let sig = a.sign(b"directory");
        assert!(a.verifying_key().verify(b"directory", &sig).is_ok());
        assert!(a.verifying_key().verify(b"directorY", &sig).is_err());
        assert!(b.verifying_key().verify(b"directory", &sig).is_err());
        let keys = DirectoryKeys::new(vec![b.verifying_key(), a.verifying_key()]);
        assert_eq!(keys.verify(b"directory", &sig).unwrap(), &a.verifying_key());
        let err = DirectoryKeys::new(vec![b.verifying_key()])
            .verify(b"directory", &sig)
            .unwrap_err();
        assert!(
            matches!(err, SigningError::BadSignature { keys: 1, .. }),
            "{err}"
        );
        assert!(matches!(
            DirectoryKeys::default().verify(b"directory", &sig),
            Err(SigningError::NoKeys)
        ));
    }

    #[test]
    fn signature_files_may_be_base64_with_whitespace_or_raw() {
        let sig = SigningKey::generate().unwrap().sign(b"x");
        let b64 = sig.to_base64();
        let wrapped = format!(" {}\r\n{} \n\n", &b64[..40], &b64[40..]);
        assert_eq!(Signature::parse(wrapped.as_bytes()).unwrap(), sig);
        assert_eq!(Signature::parse(&sig.to_bytes()).unwrap(), sig);
        for bad in [&b""[..], b"AAAA", &[0u8; 63], &[0u8; 65]] {
            let err = Signature::parse(bad).unwrap_err().to_string();
            assert!(err.contains("not a directory signature"), "{err}");
        }
    }

    #[test]
    fn agent_keys_are_told_apart_from_directory_keys() {
        let agent = crate::crypto::SecretKey::generate().unwrap();
        let err = VerifyingKey::from_pem(&agent.public_key().to_pem()).unwrap_err();
        assert!(err.to_string().contains("X25519"), "{err}");
        let err = SigningKey::from_pem(&agent.to_pem()).unwrap_err();
        assert!(err.to_string().contains("X25519"), "{err}");
        let sk = SigningKey::generate().unwrap();
        let err = VerifyingKey::from_pem(&sk.to_pem())
            .unwrap_err()
            .to_string();
        assert!(err.contains("BEGIN PUBLIC KEY"), "{err}");
    }
}
