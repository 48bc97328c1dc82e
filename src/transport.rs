//! Byte streams between agents and servers: plain TCP or TLS (futures-rustls with ring),
//! and the WebSocket settings both ends use.
//!
//! [`Stream`] is one concrete type for every kind of connection, so the HTTP server can
//! hand a connection back from hyper's upgrade and the agent can dial `ws://` or `wss://`
//! alike. [`Metered`] is how a server holds an accepted connection: its reads can be capped
//! (a WebSocket before login may read only [`PRE_LOGIN_BYTES`]) and it keeps the
//! listener's connection count until it is dropped.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use async_tungstenite::tungstenite::Message;
use async_tungstenite::WebSocketStream;
use futures_lite::{AsyncRead, AsyncWrite};
use futures_rustls::rustls;
use futures_rustls::{TlsAcceptor, TlsConnector};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::crypto::ChannelBinding;
use crate::net::TcpStream;
use crate::wait::Ticker;

/// A connection, with or without TLS.
pub enum Stream {
    Plain(TcpStream),
    TlsServer(Box<futures_rustls::server::TlsStream<TcpStream>>),
    TlsClient(Box<futures_rustls::client::TlsStream<TcpStream>>),
}

crate::net::forward_io!(Stream {
    Plain,
    TlsServer,
    TlsClient
});

/// Bytes a WebSocket may read after the upgrade until its agent has logged in: `Hello`
/// and `Proof` are well under 200 bytes; the rest is room for pings and a close frame.
/// Before login, a connection therefore holds a few KiB at most instead of a whole
/// `--max-message-bytes` frame, whatever its frame header announces.
pub const PRE_LOGIN_BYTES: usize = 8 * 1024;

/// Shared between the [`Metered`] stream (inside the WebSocket) and whoever decides when
/// the cap goes: the total number of bytes the stream may have read.
#[derive(Clone, Debug)]
pub struct ReadBudget(Arc<AtomicUsize>);

impl ReadBudget {
    fn unlimited() -> Self {
        Self(Arc::new(AtomicUsize::new(usize::MAX)))
    }

    /// Removes the cap: from now on the WebSocket's own limits apply (after login).
    pub fn lift(&self) {
        self.0.store(usize::MAX, Ordering::Relaxed);
    }
}

/// Released when the connection holding it is dropped; see [`Metered::holding`].
pub trait Slot: Send + Sync {}
impl<T: Send + Sync> Slot for T {}

/// A connection whose reads may be capped, and which holds a place in its listener's count
/// of open connections for as long as it lives (through a WebSocket upgrade too).
pub struct Metered<S> {
    inner: S,
    /// Bytes read so far.
    read: usize,
    limit: ReadBudget,
    _slot: Option<Box<dyn Slot>>,
}

impl<S> Metered<S> {
    /// An uncapped connection holding nothing.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            read: 0,
            limit: ReadBudget::unlimited(),
            _slot: None,
        }
    }

    /// Keeps `slot` alive as long as the connection.
    pub fn holding(mut self, slot: impl Slot + 'static) -> Self {
        self._slot = Some(Box::new(slot));
        self
    }

    /// Caps further reads at `more` bytes (of which `already` were read elsewhere, e.g.
    /// buffered by hyper past the upgrade request); returns the handle that lifts the cap.
    pub fn cap_reads(&mut self, more: usize, already: usize) -> ReadBudget {
        let limit = self.read.saturating_add(more.saturating_sub(already));
        self.limit.0.store(limit, Ordering::Relaxed);
        self.limit.clone()
    }

    /// The connection underneath (for TLS details such as channel binding).
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let left = this
            .limit
            .0
            .load(Ordering::Relaxed)
            .saturating_sub(this.read);
        if left == 0 && !buf.is_empty() {
            // Failing the read ends the WebSocket; the peer gets a close with this reason.
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than {PRE_LOGIN_BYTES} bytes before login"),
            )));
        }
        let n = buf.len().min(left);
        let result = Pin::new(&mut this.inner).poll_read(cx, &mut buf[..n]);
        if let Poll::Ready(Ok(read)) = &result {
            this.read = this.read.saturating_add(*read);
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

/// A server's WebSocket: over an accepted, [`Metered`] connection.
pub(crate) type WebSocket = WebSocketStream<Metered<Stream>>;

/// The RFC 5705 / RFC 8446 §7.5 exporter label the handshake proof binds to.
pub const HANDSHAKE_EXPORTER_LABEL: &[u8] = b"EXPORTER-DMR-handshake-v2";

impl Stream {
    /// What a handshake proof over this connection is bound to: the TLS exporter value
    /// (32 bytes, label [`HANDSHAKE_EXPORTER_LABEL`], empty context), the same at both ends
    /// of one TLS connection and unrelated on any other; `Unbound` for plain TCP.
    pub fn channel_binding(&self) -> Result<ChannelBinding, rustls::Error> {
        let out = [0u8; 32];
        let context = Some(&b""[..]);
        let exported = match self {
            Stream::Plain(_) => return Ok(ChannelBinding::Unbound),
            Stream::TlsServer(s) => {
                s.get_ref()
                    .1
                    .export_keying_material(out, HANDSHAKE_EXPORTER_LABEL, context)
            }
            Stream::TlsClient(s) => {
                s.get_ref()
                    .1
                    .export_keying_material(out, HANDSHAKE_EXPORTER_LABEL, context)
            }
        };
        exported.map(ChannelBinding::Tls)
    }
}

/// Read and write buffer of one WebSocket. tungstenite's default (128 KiB each) would cost
/// a server a quarter of a megabyte per idle agent; chat-sized frames need far less. The
/// buffers grow on demand for a large frame and never shrink, which is why every writer
/// here cuts a large message into [`FRAGMENT`]-sized frames: no buffer at either end then
/// grows much past these sizes, whatever the message (a directory in `Welcome`, a 1 MiB
/// envelope), and an idle session keeps only small buffers.
const WS_BUFFER: usize = 4 * 1024;

/// Largest WebSocket frame the writers here send; a longer message goes as several
/// frames (RFC 6455 fragmentation), which the receiving WebSocket joins into one message.
pub(crate) const FRAGMENT: usize = 4 * 1024;

/// WebSocket limits: a frame may carry one envelope of `max_message_bytes` plus framing.
pub(crate) fn ws_config(max_message_bytes: usize) -> WebSocketConfig {
    let max = max_message_bytes + crate::protocol::FRAME_OVERHEAD;
    WebSocketConfig::default()
        .read_buffer_size(WS_BUFFER)
        .write_buffer_size(WS_BUFFER)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// Why TLS could not be set up: each variant names the flag and file to fix.
#[derive(Debug)]
pub enum TlsError {
    /// The file a flag names could not be read.
    Read {
        flag: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The file is not well-formed PEM.
    Pem {
        flag: &'static str,
        path: PathBuf,
        source: pem::Error,
    },
    /// The file holds no `CERTIFICATE` section.
    NoCertificate { flag: &'static str, path: PathBuf },
    /// The `--tls-key` file holds no private key section.
    NoPrivateKey { path: PathBuf },
    /// A CA file's certificate cannot serve as a trust anchor.
    BadCaCertificate {
        flag: &'static str,
        path: PathBuf,
        source: rustls::Error,
    },
    /// The certificate chain and the private key do not belong together.
    KeyMismatch(rustls::Error),
    /// The crypto provider offers no safe protocol version (a build problem, not input).
    Provider(rustls::Error),
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Read { flag, path, source } => {
                write!(f, "cannot read {flag} {}: {source}", path.display())
            }
            Self::Pem { flag, path, source } => {
                write!(f, "{flag} {}: {}", path.display(), describe_pem(source))
            }
            Self::NoCertificate { flag, path } => {
                write!(f, "{flag} {}: no CERTIFICATE in the file", path.display())
            }
            Self::NoPrivateKey { path } => {
                write!(
                    f,
                    "--tls-key {}: no private key in the file",
                    path.display()
                )
            }
            Self::BadCaCertificate { flag, path, source } => {
                write!(f, "{flag} {}: {source}", path.display())
            }
            Self::KeyMismatch(e) => {
                write!(f, "TLS certificate and key do not work together: {e}")
            }
            Self::Provider(e) => write!(f, "TLS cannot be set up: {e}"),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Read { source, .. } => Some(source),
            Self::Pem { source, .. } => Some(source),
            Self::BadCaCertificate { source, .. } => Some(source),
            Self::KeyMismatch(e) | Self::Provider(e) => Some(e),
            Self::NoCertificate { .. } | Self::NoPrivateKey { .. } => None,
        }
    }
}

/// pki-types shows the offending PEM line as a byte list; an operator needs the text.
fn describe_pem(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "the {} section has no END line",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => {
            format!("malformed BEGIN line {:?}", String::from_utf8_lossy(line))
        }
        e => e.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The bytes of the file `flag` names.
fn read_pem(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_owned(),
        source,
    })
}

/// Every `CERTIFICATE` in the file `flag` names; at least one.
fn read_certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&read_pem(flag, path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            flag,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            flag,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in the `--tls-key` file.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read_pem("--tls-key", path)?).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_owned(),
        },
        source => TlsError::Pem {
            flag: "--tls-key",
            path: path.to_owned(),
            source,
        },
    })
}

/// A TLS acceptor for `--tls-cert` (PEM chain) and `--tls-key` (PEM private key).
pub fn server_tls(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let certs = read_certs("--tls-cert", cert)?;
    let key = read_key(key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Provider)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::KeyMismatch)?;
    // The handshake proof binds to the TLS exporter; a TLS 1.2 exporter is unique to its
    // connection only with the extended master secret (RFC 7627). TLS 1.3 always is.
    config.require_ems = true;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A TLS connector trusting `ca_file` (`--ca-file`) if given, else the built-in web PKI
/// roots.
pub fn client_tls(ca_file: Option<&Path>) -> Result<TlsConnector, TlsError> {
    client_tls_from("--ca-file", ca_file)
}

/// [`client_tls`] for a CA file given by `flag` (named in errors).
pub fn client_tls_from(
    flag: &'static str,
    ca_file: Option<&Path>,
) -> Result<TlsConnector, TlsError> {
    client_config(flag, ca_file).map(TlsConnector::from)
}

/// The client configuration behind [`client_tls`] (ring, safe defaults), trusting the CA
/// file `flag` names if given, else the built-in web PKI roots. The broker uses it too.
pub(crate) fn client_config(
    flag: &'static str,
    ca_file: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in read_certs(flag, path)? {
                roots
                    .add(cert)
                    .map_err(|source| TlsError::BadCaCertificate {
                        flag,
                        path: path.to_owned(),
                        source,
                    })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Provider)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Opens TCP (and TLS when `tls` is given) to `host:port`.
pub async fn dial(host: &str, port: u16, tls: Option<&TlsConnector>) -> io::Result<Stream> {
    let tcp = TcpStream::connect(host, port).await?;
    tcp.set_nodelay(true)?;
    match tls {
        None => Ok(Stream::Plain(tcp)),
        Some(connector) => {
            let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let s = connector.connect(name, tcp).await?;
            Ok(Stream::TlsClient(Box::new(s)))
        }
    }
}

/// A quiet connection is pinged this often, so both ends can tell a dead peer.
pub(crate) const PING_EVERY: Duration = Duration::from_secs(20);
/// A connection with no frame, ping or pong for this long is dropped (three pings missed).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Most frames written with one flush: enough to amortise the syscall under load, few
/// enough that a busy session still flushes often.
const BATCH: usize = 64;

/// The single writer of a WebSocket: writes what `out` yields (as `frame` turns it into a
/// message), pinging when nothing came for [`PING_EVERY`]. Ends `Ok` when `out` is closed
/// and drained or a close frame was written, `Err` when the socket fails.
pub(crate) async fn write_loop<S, T>(
    tx: &mut async_tungstenite::WebSocketSender<S>,
    out: &async_channel::Receiver<T>,
    mut frame: impl FnMut(T) -> Message,
) -> Result<(), async_tungstenite::tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // One ticker for the connection's life, not a timer per frame: each timer set or
    // cleared is a round through the reactor. A ping goes out on the first tick after a
    // whole interval without a frame, so the peer hears something at least every
    // 2 × PING_EVERY, well within its IDLE_TIMEOUT.
    let mut ticks = Ticker::every(PING_EVERY);
    let mut wrote = false;
    loop {
        let next = futures_lite::future::or(
            async { Some(out.recv().await.ok().map(&mut frame)) },
            async {
                ticks.tick().await;
                None
            },
        )
        .await;
        let first = match next {
            Some(Some(message)) => {
                wrote = true;
                message
            }
            Some(None) => return Ok(()),
            None if std::mem::take(&mut wrote) => continue,
            None => Message::Ping(Default::default()),
        };
        if send_batch(tx, first, || out.try_recv().ok().map(&mut frame)).await? {
            return Ok(());
        }
    }
}

/// Notices a peer that went quiet, with one ticker per connection rather than a timer per
/// frame read (each timer costs a round through the reactor, on the hot path).
///
/// The limit is enforced to within a quarter of itself: a connection is dropped between
/// `limit` and 1¼ × `limit` after the last thing heard.
pub(crate) struct Quiet {
    ticks: Ticker,
    last: Instant,
    limit: Duration,
}

impl Quiet {
    pub(crate) fn new(limit: Duration) -> Self {
        Self {
            ticks: Ticker::every(limit / 4),
            last: Instant::now(),
            limit,
        }
    }

    /// Awaits `heard` (the next read), or gives `None` once nothing was heard for the limit.
    pub(crate) async fn within<T>(&mut self, heard: impl Future<Output = T>) -> Option<T> {
        let (last, limit, ticks) = (self.last, self.limit, &mut self.ticks);
        let expired = async {
            loop {
                ticks.tick().await;
                if last.elapsed() >= limit {
                    return None;
                }
            }
        };
        let result = futures_lite::future::or(async { Some(heard.await) }, expired).await;
        self.last = Instant::now();
        result
    }
}

/// Writes `first` and whatever `more` has ready right now, then flushes once.
///
/// Under load this turns one write syscall per frame into one per batch; when idle it is
/// a plain send. Returns whether a close frame was among the written frames.
async fn send_batch<S>(
    tx: &mut async_tungstenite::WebSocketSender<S>,
    first: Message,
    mut more: impl FnMut() -> Option<Message>,
) -> Result<bool, async_tungstenite::tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use futures_util::SinkExt;

    let mut closing = matches!(first, Message::Close(_));
    feed(tx, first).await?;
    for _ in 1..BATCH {
        if closing {
            break;
        }
        let Some(msg) = more() else { break };
        closing = matches!(msg, Message::Close(_));
        feed(tx, msg).await?;
    }
    tx.flush().await?;
    Ok(closing)
}

/// Queues `msg` for writing, a binary message longer than [`FRAGMENT`] as several frames
/// (see [`fragments`]), so tungstenite's write buffer never has to hold all of it.
async fn feed<S>(
    tx: &mut async_tungstenite::WebSocketSender<S>,
    msg: Message,
) -> Result<(), async_tungstenite::tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use futures_util::SinkExt;

    match msg {
        Message::Binary(data) if data.len() > FRAGMENT => {
            for frame in fragments(data) {
                tx.feed(Message::Frame(frame)).await?;
            }
            Ok(())
        }
        other => tx.feed(other).await,
    }
}

/// A binary message as frames of at most [`FRAGMENT`] bytes: the first a binary frame, the
/// rest continuations, the last marked final. The payload is shared, not copied.
fn fragments(
    mut data: bytes::Bytes,
) -> impl Iterator<Item = async_tungstenite::tungstenite::protocol::frame::Frame> {
    use async_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use async_tungstenite::tungstenite::protocol::frame::Frame;

    let mut opcode = OpCode::Data(Data::Binary);
    std::iter::from_fn(move || {
        if data.is_empty() {
            return None;
        }
        let chunk = data.split_to(FRAGMENT.min(data.len()));
        let frame = Frame::message(chunk, opcode, data.is_empty());
        opcode = OpCode::Data(Data::Continue);
        Some(frame)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_tungstenite::tungstenite::protocol::Role;
    use futures_util::StreamExt;

    #[test]
    fn quiet_passes_reads_through_and_gives_up_after_the_limit() {
        smol::block_on(async {
            let limit = Duration::from_millis(200);
            let mut quiet = Quiet::new(limit);
            // Reads that keep coming are never cut off, however long the connection lives.
            for _ in 0..6 {
                let read = async {
                    smol::Timer::after(Duration::from_millis(60)).await;
                    7
                };
                assert_eq!(quiet.within(read).await, Some(7));
            }
            let started = Instant::now();
            let never = std::future::pending::<()>();
            assert_eq!(quiet.within(never).await, None);
            let waited = started.elapsed();
            assert!(waited >= limit, "gave up early: {waited:?}");
            assert!(waited < limit * 5, "gave up far too late: {waited:?}");
        });
    }

    #[test]
    fn fragments_cover_the_message_in_order() {
        let data: bytes::Bytes = (0..10_000u32).map(|i| i as u8).collect::<Vec<_>>().into();
        let frames: Vec<_> = fragments(data.clone()).collect();
        assert_eq!(frames.len(), 3);
        let mut joined = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            assert!(f.payload().len() <= FRAGMENT);
            assert_eq!(f.header().is_final, i == 2);
            joined.extend_from_slice(f.payload());
        }
        assert_eq!(joined, data);
    }

    /// A large message crosses as frames no longer than `FRAGMENT` (the reader refuses any
    /// longer frame) and arrives whole, between small messages, in order.
    #[test]
    fn large_messages_arrive_whole_in_small_frames() {
        smol::block_on(async {
            let listener = smol::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let client = smol::net::TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let strict = ws_config(1 << 20).max_frame_size(Some(FRAGMENT));
            let writer =
                WebSocketStream::from_raw_socket(client, Role::Client, Some(ws_config(1 << 20)));
            let reader = WebSocketStream::from_raw_socket(server, Role::Server, Some(strict));
            let (mut tx, _rx) = writer.await.split();
            let mut reader = reader.await;
            let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            let (out, out_rx) = async_channel::unbounded();
            for m in [vec![1u8], big.clone(), vec![2u8]] {
                out.send(m).await.unwrap();
            }
            out.close();
            write_loop(&mut tx, &out_rx, Message::binary).await.unwrap();
            for want in [vec![1u8], big, vec![2u8]] {
                match reader.next().await {
                    Some(Ok(Message::Binary(got))) => assert!(got == want),
                    other => panic!("expected a binary message, got {other:?}"),
                }
            }
        });
    }
}
