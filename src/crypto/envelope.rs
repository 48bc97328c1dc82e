//! Sealing and opening envelopes with amortised HPKE: the public-key work is paid once per
//! (sender key, recipient key, epoch), each message then costs one secret export and one
//! ChaCha20-Poly1305 pass.
//!
//! Construction (see docs/SECURITY.md, "Amortised HPKE", for the argument):
//! - an *epoch* is one RFC 9180 Auth-mode sender context (DHKEM(X25519, HKDF-SHA256),
//!   HKDF-SHA256, ChaCha20-Poly1305) set up from the sender's static key to the recipient's
//!   public key with a fresh ephemeral key; its `enc` travels in every envelope of the epoch;
//! - message number `seq` (in the header, so in the associated data) is sealed under the key
//!   `Export(MESSAGE_KEY_LABEL || seq as u64 big-endian, 32)` (RFC 9180 §5.3) with
//!   ChaCha20-Poly1305, an all-zero nonce (each key seals one message) and the encoded header
//!   as associated data;
//! - the recipient sets up the matching context from (`enc`, its key, the sender's public
//!   key) once and keeps it in a bounded cache, so messages open in any order, any number of
//!   times, and a restarted recipient simply sets the context up again.
//!
//! [`Sealer`] and [`Opener`] are shared by every task of a multi-threaded agent: their
//! mutexes guard only a map lookup and a counter, never a key agreement or the AEAD.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use orion::hazardous::aead::chacha20poly1305::{self as aead, ChaCha20Poly1305};
use orion::hazardous::hpke::{ModeAuth, DHKEM_X25519_SHA256_CHACHA20};
use orion::hazardous::kem::x25519_hkdf_sha256 as kem;
use zeroize::Zeroizing;

use super::{CryptoError, PublicKey, SecretKey};
use crate::protocol::{Envelope, Header};

type Hpke = ModeAuth<DHKEM_X25519_SHA256_CHACHA20>;

/// HPKE `info`: binds every epoch to this protocol version, so a context set up for another
/// purpose (or by a version 2 peer) with the same keys never opens here.
const HPKE_INFO: &[u8] = b"dmr/v3 envelope epoch";
/// Prefix of the exporter context; the message's `seq` follows it.
const MESSAGE_KEY_LABEL: &[u8] = b"dmr/v3 message key";
const TAG_LEN: usize = 16;
/// Each exported key seals exactly one message, so one fixed nonce is safe.
const NONCE: [u8; 12] = [0; 12];

/// Sender epochs kept at most (one per recipient key); far above any directory's size.
const SENDER_CACHE: usize = 4096;
/// Recipient contexts kept at most (one per sender key and epoch), least recently used
/// evicted first. Evicting costs only a new setup when that epoch's next message arrives.
pub const OPENER_CACHE: usize = 4096;

/// When a sender starts a new epoch to a recipient (it also does when the recipient's key
/// changes, and every process starts with fresh ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochLimits {
    /// Messages sealed in one epoch at most.
    pub max_messages: u64,
    /// Age of an epoch after which no more messages are sealed in it.
    pub max_age: Duration,
}

impl Default for EpochLimits {
    /// 100 000 messages or 10 minutes, whichever comes first: the setup is then well under
    /// a thousandth of the work, and a leaked epoch secret exposes a bounded window.
    fn default() -> Self {
        Self {
            max_messages: 100_000,
            max_age: Duration::from_secs(600),
        }
    }
}

/// One sender context and the next message number in it.
struct SenderEpoch {
    ctx: Hpke,
    enc: [u8; 32],
    started: Instant,
    next_seq: AtomicU64,
}

impl SenderEpoch {
    /// A fresh epoch to `recipient`: a new ephemeral key, so a new `enc`. Costs the
    /// X25519 work (run with no lock held).
    fn new(sender: &SecretKey, recipient: &PublicKey) -> Result<Self, CryptoError> {
        let (ctx, enc) = Hpke::new_sender(&recipient.to_orion(), HPKE_INFO, &sender.inner)
            .map_err(|_| CryptoError::SealFailed)?;
        let enc = enc
            .as_ref()
            .try_into()
            .map_err(|_| CryptoError::SealFailed)?;
        Ok(Self {
            ctx,
            enc,
            started: Instant::now(),
            next_seq: AtomicU64::new(0),
        })
    }

    /// The next unused message number, or `None` once the epoch is spent.
    fn take_seq(&self, limits: &EpochLimits) -> Option<u64> {
        if self.started.elapsed() >= limits.max_age {
            return None;
        }
        // Numbers past the limit are burnt, never reused: the epoch is simply replaced.
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        (seq < limits.max_messages).then_some(seq)
    }

    fn seal(
        &self,
        seq: u64,
        mut header: Header,
        plaintext: &[u8],
    ) -> Result<Envelope, CryptoError> {
        header.seq = seq;
        let key = message_key(&self.ctx, seq).ok_or(CryptoError::SealFailed)?;
        let mut ciphertext = vec![0u8; plaintext.len() + TAG_LEN];
        ChaCha20Poly1305::seal(
            &key,
            &nonce(),
            plaintext,
            Some(&header.aad()),
            &mut ciphertext,
        )
        .map_err(|_| CryptoError::SealFailed)?;
        Ok(Envelope::from_parts(header, self.enc, ciphertext))
    }
}

/// Seals envelopes from one agent key, keeping one epoch per recipient key.
///
/// Shareable between threads (`&self` everywhere).
pub struct Sealer {
    key: Arc<SecretKey>,
    limits: EpochLimits,
    epochs: Mutex<HashMap<PublicKey, Arc<SenderEpoch>>>,
}

impl Sealer {
    /// A sealer for `key` with the default [`EpochLimits`].
    pub fn new(key: impl Into<Arc<SecretKey>>) -> Self {
        Self::with_limits(key, EpochLimits::default())
    }

    pub fn with_limits(key: impl Into<Arc<SecretKey>>, limits: EpochLimits) -> Self {
        Self {
            key: key.into(),
            limits,
            epochs: Mutex::new(HashMap::new()),
        }
    }

    /// The sender key (e.g. for the handshake proof).
    pub fn key(&self) -> &SecretKey {
        &self.key
    }

    /// Encrypts `plaintext` to `recipient`, binding `header` as associated data. The
    /// header's `seq` is set here (whatever the caller put there): the message's number in
    /// the current epoch to that recipient.
    pub fn seal(
        &self,
        recipient: &PublicKey,
        header: Header,
        plaintext: &[u8],
    ) -> Result<Envelope, CryptoError> {
        let (epoch, seq) = match self.current(recipient) {
            Some(current) => current,
            None => self.start_epoch(recipient)?,
        };
        epoch.seal(seq, header, plaintext)
    }

    /// The live epoch to `recipient` and a message number in it, if there is one.
    fn current(&self, recipient: &PublicKey) -> Option<(Arc<SenderEpoch>, u64)> {
        let epochs = lock(&self.epochs);
        let epoch = epochs.get(recipient)?;
        let seq = epoch.take_seq(&self.limits)?;
        Some((epoch.clone(), seq))
    }

    /// Sets up a new epoch (no lock held) and makes it the current one to `recipient`.
    fn start_epoch(&self, recipient: &PublicKey) -> Result<(Arc<SenderEpoch>, u64), CryptoError> {
        let epoch = Arc::new(SenderEpoch::new(&self.key, recipient)?);
        let seq = epoch
            .take_seq(&self.limits)
            .ok_or(CryptoError::SealFailed)?;
        let mut epochs = lock(&self.epochs);
        if epochs.len() >= SENDER_CACHE && !epochs.contains_key(recipient) {
            // Recipients that re-keyed or left leave stale epochs behind: drop spent ones
            // first, then any (it is only set up again if that recipient is written to).
            epochs.retain(|_, e| e.started.elapsed() < self.limits.max_age);
            if epochs.len() >= SENDER_CACHE {
                let any = *epochs.keys().next().expect("the map is full");
                epochs.remove(&any);
            }
        }
        // Two threads may race here; each seals under its own epoch, both valid.
        epochs.insert(*recipient, epoch.clone());
        Ok((epoch, seq))
    }
}

/// One recipient context in the [`Opener`]'s cache.
struct CachedContext {
    ctx: Arc<Hpke>,
    last_used: u64,
}

/// Opens envelopes addressed to one agent (its current key and, during a rotation, the
/// previous one), keeping the recipient context of each (sender key, `enc`) it opened.
///
/// Shareable between threads (`&self` everywhere).
pub struct Opener {
    keys: Vec<Arc<SecretKey>>,
    capacity: usize,
    cache: Mutex<ContextCache>,
}

#[derive(Default)]
struct ContextCache {
    map: HashMap<(PublicKey, [u8; 32]), CachedContext>,
    tick: u64,
}

impl Opener {
    /// An opener for `key`, caching up to [`OPENER_CACHE`] contexts.
    pub fn new(key: impl Into<Arc<SecretKey>>) -> Self {
        Self::with_capacity(key, OPENER_CACHE)
    }

    pub fn with_capacity(key: impl Into<Arc<SecretKey>>, capacity: usize) -> Self {
        Self {
            keys: vec![key.into()],
            capacity: capacity.max(1),
            cache: Mutex::new(ContextCache::default()),
        }
    }

    /// Also opens envelopes sealed to `previous` (the key before the last rotation), tried
    /// after the current one.
    pub fn with_previous(mut self, previous: impl Into<Arc<SecretKey>>) -> Self {
        self.keys.push(previous.into());
        self
    }

    /// Decrypts `envelope`, proving it came from `sender` and that its header (`seq`
    /// included) is the one the sender sealed.
    pub fn open(&self, sender: &PublicKey, envelope: &Envelope) -> Result<Vec<u8>, CryptoError> {
        let slot = (*sender, *envelope.enc());
        if let Some(ctx) = self.cached(&slot) {
            return open_in(&ctx, envelope);
        }
        // Not cached: set up with each key in turn; only a context that opened is kept, so
        // forged `enc` values cannot fill the cache.
        for key in &self.keys {
            let Some(ctx) = recipient_context(key, sender, envelope.enc()) else {
                continue;
            };
            if let Ok(plaintext) = open_in(&ctx, envelope) {
                self.remember(slot, Arc::new(ctx));
                return Ok(plaintext);
            }
        }
        Err(CryptoError::OpenFailed)
    }

    /// Contexts currently cached (for tests and metrics).
    pub fn cached_contexts(&self) -> usize {
        lock(&self.cache).map.len()
    }

    fn cached(&self, slot: &(PublicKey, [u8; 32])) -> Option<Arc<Hpke>> {
        let mut cache = lock(&self.cache);
        cache.tick += 1;
        let tick = cache.tick;
        let entry = cache.map.get_mut(slot)?;
        entry.last_used = tick;
        Some(entry.ctx.clone())
    }

    fn remember(&self, slot: (PublicKey, [u8; 32]), ctx: Arc<Hpke>) {
        let mut cache = lock(&self.cache);
        if cache.map.len() >= self.capacity && !cache.map.contains_key(&slot) {
            // A scan, but only when a new epoch arrives at a full cache.
            let oldest = cache.map.iter().min_by_key(|(_, c)| c.last_used);
            if let Some(oldest) = oldest.map(|(k, _)| *k) {
                cache.map.remove(&oldest);
            }
        }
        cache.tick += 1;
        let last_used = cache.tick;
        cache.map.insert(slot, CachedContext { ctx, last_used });
    }
}

/// One-shot seal: a new epoch for this single message (the full HPKE setup, as before
/// version 3). For tests and tools playing a peer; the agent uses a [`Sealer`].
pub fn seal(
    sender: &SecretKey,
    recipient: &PublicKey,
    header: Header,
    plaintext: &[u8],
) -> Result<Envelope, CryptoError> {
    SenderEpoch::new(sender, recipient)?.seal(0, header, plaintext)
}

/// One-shot open: sets the recipient context up for this envelope alone. For tests and
/// tools; the agent uses an [`Opener`].
pub fn open(
    recipient: &SecretKey,
    sender: &PublicKey,
    envelope: &Envelope,
) -> Result<Vec<u8>, CryptoError> {
    let ctx =
        recipient_context(recipient, sender, envelope.enc()).ok_or(CryptoError::OpenFailed)?;
    open_in(&ctx, envelope)
}

/// The recipient side of an epoch; `None` for an `enc` no context can come from (e.g. a
/// low-order point).
fn recipient_context(key: &SecretKey, sender: &PublicKey, enc: &[u8; 32]) -> Option<Hpke> {
    let enc = kem::PublicKey::from(*enc);
    Hpke::new_recipient(&enc, &key.inner, HPKE_INFO, &sender.to_orion()).ok()
}

fn open_in(ctx: &Hpke, envelope: &Envelope) -> Result<Vec<u8>, CryptoError> {
    let ct = envelope.ciphertext();
    if ct.len() < TAG_LEN {
        return Err(CryptoError::OpenFailed);
    }
    let header = envelope.header();
    let key = message_key(ctx, header.seq).ok_or(CryptoError::OpenFailed)?;
    let mut plaintext = vec![0u8; ct.len() - TAG_LEN];
    ChaCha20Poly1305::open(&key, &nonce(), ct, Some(&header.aad()), &mut plaintext)
        .map_err(|_| CryptoError::OpenFailed)?;
    Ok(plaintext)
}

/// The key of message `seq` in the epoch of `ctx` (same on both sides).
fn message_key(ctx: &Hpke, seq: u64) -> Option<aead::SecretKey> {
    let mut label = [0u8; MESSAGE_KEY_LABEL.len() + 8];
    label[..MESSAGE_KEY_LABEL.len()].copy_from_slice(MESSAGE_KEY_LABEL);
    label[MESSAGE_KEY_LABEL.len()..].copy_from_slice(&seq.to_be_bytes());
    let mut okm = Zeroizing::new([0u8; 32]);
    ctx.export_secret(&label, &mut okm[..]).ok()?;
    aead::SecretKey::try_from(&*okm).ok()
}

fn nonce() -> aead::Nonce {
    aead::Nonce::try_from(&NONCE).expect("a 12-byte nonce")
}

/// A poisoned lock only means another thread panicked mid-lookup; the map is still sound.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_seqs_give_distinct_keys() {
        let (a, b) = (
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
        );
        let epoch = SenderEpoch::new(&a, &b.public_key()).unwrap();
        let keys: std::collections::HashSet<Vec<u8>> = (0..64)
            .map(|seq| {
                let k = message_key(&epoch.ctx, seq).unwrap();
                k.unprotected_as_ref().to_vec()
            })
            .collect();
        assert_eq!(keys.len(), 64);
        // The recipient derives the very same keys.
        let ctx = recipient_context(&b, &a.public_key(), &epoch.enc).unwrap();
        for seq in [0, 1, 63, u64::MAX] {
            assert_eq!(
                message_key(&ctx, seq).unwrap().unprotected_as_ref(),
                message_key(&epoch.ctx, seq).unwrap().unprotected_as_ref()
            );
        }
    }

    #[test]
    fn seqs_never_repeat_within_an_epoch() {
        let (a, b) = (
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
        );
        let limits = EpochLimits {
            max_messages: 3,
            max_age: Duration::from_secs(3600),
        };
        let epoch = SenderEpoch::new(&a, &b.public_key()).unwrap();
        let taken: Vec<_> = (0..5).map(|_| epoch.take_seq(&limits)).collect();
        assert_eq!(taken, [Some(0), Some(1), Some(2), None, None]);
    }

    #[test]
    fn an_old_epoch_is_not_used() {
        let (a, b) = (
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
        );
        let limits = EpochLimits {
            max_messages: 100,
            max_age: Duration::ZERO,
        };
        let epoch = SenderEpoch::new(&a, &b.public_key()).unwrap();
        assert_eq!(epoch.take_seq(&limits), None);
    }

    #[test]
    fn the_opener_cache_stays_bounded() {
        let b = SecretKey::generate().unwrap();
        let to = b.public_key();
        let opener = Opener::with_capacity(b, 2);
        let senders: Vec<_> = (0..4).map(|_| SecretKey::generate().unwrap()).collect();
        for s in &senders {
            let env = seal(s, &to, header(), b"x").unwrap();
            opener.open(&s.public_key(), &env).unwrap();
        }
        assert_eq!(opener.cached_contexts(), 2);
    }

    fn header() -> Header {
        use crate::protocol::{AgentId, Kind, MessageId};
        Header {
            id: MessageId::random(),
            sender: AgentId::new("a").unwrap(),
            recipient: AgentId::new("b").unwrap(),
            created_at_ms: 1,
            kind: Kind::chat_message(),
            seq: 0,
        }
    }
}
