//! HTTP on the process's executor: the accept loop both binaries serve their endpoints
//! with, small response helpers, and a minimal client for webhooks and CentOps. Sockets
//! come from [`crate::net`].
//!
//! hyper does the protocol work; this module only adapts it to smol and to [`Stream`], so
//! a WebSocket upgrade can take the connection back out of hyper.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_rustls::TlsAcceptor;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use smol_hyper::rt::FuturesIo;

use async_tungstenite::tungstenite::handshake::derive_accept_key;
use async_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use async_tungstenite::WebSocketStream;

use crate::net::{TcpListener, TcpStream};
use crate::transport::{self, Metered, ReadBudget, Stream};
use crate::wait::with_timeout;

/// The connection type hyper serves; what an upgrade hands back.
pub(crate) type Io = FuturesIo<Metered<Stream>>;
/// Every response body here is a complete buffer.
pub type Body = Full<Bytes>;

/// Bounds on what one listener accepts. The default bounds nothing beyond hyper's own limits.
#[derive(Clone, Default)]
pub struct ServeOptions {
    /// Open connections (WebSocket sessions included) beyond which new ones are refused.
    pub max_connections: Option<usize>,
    /// Called for each connection refused over `max_connections`.
    pub on_refused: Option<Arc<dyn Fn(SocketAddr) + Send + Sync>>,
    /// hyper's read buffer, i.e. the largest request head a connection can hold.
    pub max_head_bytes: Option<usize>,
}

/// Open connections of one listener; each accepted connection holds a [`Held`].
#[derive(Default)]
struct Count(AtomicUsize);

/// One place in a [`Count`], given back when dropped.
struct Held(Arc<Count>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Count {
    fn take(self: &Arc<Self>, max: usize) -> Option<Held> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Held(self.clone()))
    }
}

/// Refused connections being told so at once; beyond this many they are just closed.
const MAX_REFUSING: usize = 64;

/// The answer a plain-HTTP connection gets over the connection cap.
const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
connection: close\r\nretry-after: 1\r\ncontent-length: 40\r\n\r\n{\"error\":\"too many connections; retry\"}\n";

/// Serves `handler` on `listener` until `stop` resolves. Each connection runs in its own
/// task; TLS, when configured, is negotiated in that task so a slow client blocks no one.
pub async fn serve<H, F>(
    listener: impl Into<TcpListener>,
    tls: Option<TlsAcceptor>,
    handler: H,
    stop: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    serve_with(listener, tls, ServeOptions::default(), handler, stop).await
}

/// [`serve`] within the bounds of `options`.
pub async fn serve_with<H, F>(
    listener: impl Into<TcpListener>,
    tls: Option<TlsAcceptor>,
    options: ServeOptions,
    handler: H,
    stop: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = listener.into();
    let open = Arc::new(Count::default());
    let refusing = Arc::new(Count::default());
    // A task of its own, polled only when the listener is ready: polled inline, beside
    // `stop`, every wake-up of the caller's task would retry `accept` (async-io assumes a
    // re-poll means readiness), one failing syscall per message. Dropping it stops it.
    let accept = crate::runtime::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    log::warn!("accept failed: {e}");
                    smol::Timer::after(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let held = match options.max_connections {
                None => None,
                Some(max) => match open.take(max) {
                    Some(h) => Some(h),
                    None => {
                        if let Some(f) = &options.on_refused {
                            f(peer);
                        }
                        refuse_connection(tcp, tls.is_some(), &refusing);
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (tls, handler) = (tls.clone(), handler.clone());
            let max_head = options.max_head_bytes;
            crate::runtime::spawn(async move {
                let stream = match tls {
                    None => Stream::Plain(tcp),
                    Some(acceptor) => {
                        match with_timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                            Some(Ok(s)) => Stream::TlsServer(Box::new(s)),
                            Some(Err(e)) => {
                                return log::debug!("TLS handshake with {peer} failed: {e}")
                            }
                            None => return log::debug!("TLS handshake with {peer} timed out"),
                        }
                    }
                };
                let stream = match held {
                    Some(h) => Metered::new(stream).holding(h),
                    None => Metered::new(stream),
                };
                let service = hyper::service::service_fn(move |req| {
                    let fut = handler(req, peer);
                    async move { Ok::<_, std::convert::Infallible>(fut.await) }
                });
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(Timer)
                    .header_read_timeout(Duration::from_secs(10));
                if let Some(max) = max_head {
                    builder.max_buf_size(max.max(8192));
                }
                let conn = builder
                    .serve_connection(FuturesIo::new(stream), service)
                    .with_upgrades();
                if let Err(e) = conn.await {
                    log::debug!("HTTP connection from {peer} ended: {e}");
                }
            })
            .detach();
        }
    });
    futures_lite::future::or(accept, stop).await;
}

/// hyper's timer on [`crate::wait::sleep_until`]. hyper arms its header-read deadline (10 s)
/// for every request on a keep-alive connection; on the shared wheel that costs no reactor
/// round per request.
#[derive(Clone, Copy)]
struct Timer;

impl hyper::rt::Timer for Timer {
    fn sleep(&self, duration: Duration) -> std::pin::Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(std::time::Instant::now() + duration)
    }

    fn sleep_until(
        &self,
        deadline: std::time::Instant,
    ) -> std::pin::Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Sleep(Box::pin(crate::wait::sleep_until(deadline))))
    }
}

/// One of [`Timer`]'s sleeps.
struct Sleep(std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>>);

impl Future for Sleep {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for Sleep {}

/// Tells a plain-HTTP client over the connection cap `503` (without reading its request),
/// or just closes: a TLS client would need a handshake first, which is what the cap spares.
fn refuse_connection(tcp: TcpStream, tls: bool, refusing: &Arc<Count>) {
    let Some(held) = (!tls).then(|| refusing.take(MAX_REFUSING)).flatten() else {
        return;
    };
    crate::runtime::spawn(async move {
        use futures_lite::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tcp;
        let answer = async {
            tcp.write_all(OVER_CAPACITY).await?;
            tcp.close().await?;
            // Reading what the client sent lets the close be orderly (no reset that could
            // destroy the answer before the client read it).
            let mut sink = [0u8; 4096];
            while tcp.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        };
        let _ = with_timeout(Duration::from_secs(1), answer).await;
        drop(held);
    })
    .detach();
}

/// The WebSocket a `101` answer leads to, once hyper hands the connection over, with the
/// handle that lifts its pre-login read cap ([`transport::PRE_LOGIN_BYTES`]).
pub(crate) type Upgrading = std::pin::Pin<
    Box<dyn Future<Output = Result<(transport::WebSocket, ReadBudget), UpgradeError>> + Send>,
>;

/// Why an accepted WebSocket upgrade did not yield a WebSocket.
#[derive(Debug)]
pub(crate) enum UpgradeError {
    /// The client went away (or hyper failed) before the connection was handed over.
    Hyper(hyper::Error),
    /// hyper handed over a connection of another type than [`Io`]: a bug, not input.
    ConnectionType,
    /// The client sent more than the pre-login budget along with its upgrade request.
    TooMuchEarlyData(usize),
}

impl std::fmt::Display for UpgradeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Hyper(e) => e.fmt(f),
            Self::ConnectionType => f.write_str("unexpected connection type"),
            Self::TooMuchEarlyData(n) => write!(
                f,
                "{n} bytes sent with the upgrade request, over the {} allowed before login",
                transport::PRE_LOGIN_BYTES
            ),
        }
    }
}

impl std::error::Error for UpgradeError {}

/// Answers a WebSocket upgrade request: the `101` response to return now, and the
/// WebSocket to come. A request that is not a version 13 WebSocket upgrade is refused with
/// the reason, for a `400`.
pub(crate) fn upgrade_websocket(
    req: &mut Request<Incoming>,
    config: WebSocketConfig,
) -> Result<(Response<Body>, Upgrading), &'static str> {
    let h = req.headers();
    let is_ws = h
        .get(hyper::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let version_ok = h
        .get(hyper::header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    let Some(key) = h
        .get(hyper::header::SEC_WEBSOCKET_KEY)
        .filter(|_| is_ws && version_ok)
    else {
        return Err("expected a WebSocket (version 13) upgrade");
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(req);
    let websocket = Box::pin(async move {
        let upgraded = on_upgrade.await.map_err(UpgradeError::Hyper)?;
        let parts = upgraded
            .downcast::<Io>()
            .map_err(|_| UpgradeError::ConnectionType)?;
        // Bytes hyper read past the request already belong to the WebSocket, and count
        // toward what it may read before login.
        let mut stream = parts.io.into_inner();
        let read = parts.read_buf.to_vec();
        if read.len() > transport::PRE_LOGIN_BYTES {
            return Err(UpgradeError::TooMuchEarlyData(read.len()));
        }
        let budget = stream.cap_reads(transport::PRE_LOGIN_BYTES, read.len());
        let ws = WebSocketStream::from_partially_read(stream, read, Role::Server, Some(config));
        Ok((ws.await, budget))
    });
    let mut resp = Response::new(Body::default());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = resp.headers_mut();
    headers.insert(hyper::header::UPGRADE, "websocket".parse().expect("static"));
    headers.insert(
        hyper::header::CONNECTION,
        "Upgrade".parse().expect("static"),
    );
    headers.insert(
        hyper::header::SEC_WEBSOCKET_ACCEPT,
        accept.parse().expect("base64"),
    );
    Ok((resp, websocket))
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "application/json".parse().expect("static header"),
    );
    r
}

/// A JSON error body `{"error": message}`.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message.into() }))
}

/// A plain-text response (health checks, Prometheus metrics).
pub fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        content_type.parse().expect("static header"),
    );
    r
}

/// Why a request body could not be read.
#[derive(Debug)]
pub enum BodyError {
    /// The body is longer than `limit` bytes (known from `Content-Length` or while reading).
    TooLarge { limit: usize },
    /// The connection failed or the client stopped sending halfway.
    Read(Box<dyn std::error::Error + Send + Sync>),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLarge { limit } => write!(f, "request body over {limit} bytes"),
            Self::Read(e) => write!(f, "could not read the request body: {e}"),
        }
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::TooLarge { .. } => None,
            Self::Read(e) => Some(e.as_ref()),
        }
    }
}

/// Reads a request body of at most `max` bytes. A body whose `Content-Length` is already
/// over `max` is refused before any of it is read.
pub async fn read_body(body: Incoming, max: usize) -> Result<Bytes, BodyError> {
    let too_large = BodyError::TooLarge { limit: max };
    if hyper::body::Body::size_hint(&body).lower() > max as u64 {
        return Err(too_large);
    }
    match Limited::new(body, max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large),
        Err(e) => Err(BodyError::Read(e)),
    }
}

/// Why an outgoing HTTP request failed before a status came back.
#[derive(Debug)]
pub enum ClientError {
    /// The URL names no host to connect to.
    NoHost { url: hyper::Uri },
    /// The URL's host cannot go into a `Host` header.
    BadHost { url: hyper::Uri },
    /// TLS for `https://` could not be set up.
    Tls(transport::TlsError),
    /// No TCP (or TLS) connection to the host.
    Connect {
        host: String,
        port: u16,
        source: std::io::Error,
    },
    /// The host accepted the connection but the HTTP/1.1 handshake failed.
    Handshake {
        host: String,
        port: u16,
        source: hyper::Error,
    },
    /// Sending the request failed.
    Request(hyper::Error),
    /// The answer's body could not be read.
    Answer(String),
    /// The answer's body is over the size the client reads.
    TooLarge { limit: usize },
    /// The connection closed before the request could be sent.
    Closed,
    /// No complete answer within the limit.
    Timeout(Duration),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoHost { url } => write!(f, "URL {url} has no host"),
            Self::BadHost { url } => write!(f, "bad host in {url}"),
            Self::Tls(e) => e.fmt(f),
            Self::Connect { host, port, source } => {
                write!(f, "cannot connect to {host}:{port}: {source}")
            }
            Self::Handshake { host, port, source } => {
                write!(f, "HTTP handshake with {host}:{port}: {source}")
            }
            Self::Request(e) => write!(f, "request failed: {e}"),
            Self::Answer(e) => write!(f, "reading the answer: {e}"),
            Self::TooLarge { limit } => write!(f, "the answer's body is over {limit} bytes"),
            Self::Closed => f.write_str("the connection closed before the request was sent"),
            Self::Timeout(limit) => write!(f, "no answer within {limit:?}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Tls(e) => Some(e),
            Self::Connect { source, .. } => Some(source),
            Self::Handshake { source, .. } => Some(source),
            Self::Request(e) => Some(e),
            Self::NoHost { .. }
            | Self::BadHost { .. }
            | Self::Answer(_)
            | Self::TooLarge { .. }
            | Self::Closed
            | Self::Timeout(_) => None,
        }
    }
}

/// One HTTP/1.1 request on a fresh connection, bounded by `timeout` as a whole.
/// `https://` uses `tls` (or the web PKI roots when it is `None`).
pub async fn request(
    req: Request<Body>,
    tls: Option<&futures_rustls::TlsConnector>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), ClientError> {
    Client::new(tls.cloned()).request(req, timeout).await
}

/// [`request`] reading at most `max_bytes` of the answer's body: an answer announcing more
/// is refused before its body is read, one that turns out longer is cut off at the limit.
pub async fn request_limited(
    req: Request<Body>,
    tls: Option<&futures_rustls::TlsConnector>,
    timeout: Duration,
    max_bytes: usize,
) -> Result<(StatusCode, Bytes), ClientError> {
    let client = Client {
        max_response_bytes: max_bytes,
        ..Client::new(tls.cloned())
    };
    client.request(req, timeout).await
}

type Conn = hyper::client::conn::http1::SendRequest<Body>;
/// A kept connection and the task driving it (dropping the task closes the connection).
type Kept = (Conn, smol::Task<()>);

/// Idle keep-alive connections kept per host: a webhook sees one host, and reusing its
/// connections saves a TCP (and TLS) handshake per delivery.
const IDLE_PER_HOST: usize = 32;

/// An HTTP/1.1 client that reuses keep-alive connections.
pub struct Client {
    tls: Option<futures_rustls::TlsConnector>,
    max_response_bytes: usize,
    idle: std::sync::Mutex<std::collections::HashMap<String, Vec<Kept>>>,
}

impl Client {
    /// `tls` is used for `https://` (the web PKI roots when `None`).
    pub fn new(tls: Option<futures_rustls::TlsConnector>) -> Self {
        Self {
            tls,
            max_response_bytes: MAX_RESPONSE_BYTES,
            idle: Default::default(),
        }
    }

    /// Sends `req` (absolute URL), bounded by `timeout` as a whole.
    pub async fn request(
        &self,
        req: Request<Body>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        with_timeout(timeout, self.send(req))
            .await
            .unwrap_or_else(|| Err(ClientError::Timeout(timeout)))
    }

    async fn send(&self, mut req: Request<Body>) -> Result<(StatusCode, Bytes), ClientError> {
        let uri = req.uri().clone();
        let authority = uri
            .authority()
            .ok_or_else(|| ClientError::NoHost { url: uri.clone() })?
            .as_str()
            .to_owned();
        let key = format!("{}://{authority}", uri.scheme_str().unwrap_or("http"));
        req.headers_mut().insert(
            hyper::header::HOST,
            authority
                .parse()
                .map_err(|_| ClientError::BadHost { url: uri.clone() })?,
        );
        // HTTP/1.1 sends the origin form (path and query); the host went into `Host`.
        *req.uri_mut() = uri
            .path_and_query()
            .cloned()
            .map_or_else(|| hyper::Uri::from_static("/"), hyper::Uri::from);
        if let Some((mut conn, task)) = self.take_idle(&key) {
            // A kept connection the peer closed meanwhile can fail before the request left;
            // only then is it safe to send it again on a fresh one. A request that may have
            // reached the peer is never repeated here: the caller decides (see `Unsent`).
            if conn.ready().await.is_ok() {
                match exchange(&mut conn, req, self.max_response_bytes).await {
                    Ok(r) => return Ok(self.keep(key, conn, task, r)),
                    Err(Failed::Unsent(back)) => req = back,
                    Err(Failed::Sent(e)) => return Err(e),
                }
            }
        }
        let (mut conn, task) = self.connect(&uri).await?;
        match exchange(&mut conn, req, self.max_response_bytes).await {
            Ok(r) => Ok(self.keep(key, conn, task, r)),
            Err(Failed::Unsent(_)) => Err(ClientError::Closed),
            Err(Failed::Sent(e)) => Err(e),
        }
    }

    fn take_idle(&self, key: &str) -> Option<Kept> {
        let mut idle = crate::sync::lock(&self.idle);
        let conns = idle.get_mut(key)?;
        while let Some((conn, task)) = conns.pop() {
            if !conn.is_closed() {
                return Some((conn, task));
            }
        }
        None
    }

    fn keep<T>(&self, key: String, conn: Conn, task: smol::Task<()>, result: T) -> T {
        if !conn.is_closed() {
            let mut idle = crate::sync::lock(&self.idle);
            let conns = idle.entry(key).or_default();
            if conns.len() < IDLE_PER_HOST {
                conns.push((conn, task));
            }
        }
        result
    }

    async fn connect(&self, uri: &hyper::Uri) -> Result<Kept, ClientError> {
        let host = uri
            .host()
            .ok_or_else(|| ClientError::NoHost { url: uri.clone() })?;
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let default_tls;
        let tls = match (https, &self.tls) {
            (false, _) => None,
            (true, Some(t)) => Some(t),
            (true, None) => {
                default_tls = transport::client_tls(None).map_err(ClientError::Tls)?;
                Some(&default_tls)
            }
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let stream =
            transport::dial(host, port, tls)
                .await
                .map_err(|source| ClientError::Connect {
                    host: host.to_owned(),
                    port,
                    source,
                })?;
        let (conn, driver) = hyper::client::conn::http1::handshake(FuturesIo::new(stream))
            .await
            .map_err(|source| ClientError::Handshake {
                host: host.to_owned(),
                port,
                source,
            })?;
        let task = crate::runtime::spawn(async move {
            let _ = driver.await;
        });
        Ok((conn, task))
    }
}

/// Largest response body the client reads; a local service's answer is a status, not data.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// How an exchange failed: before the request left (it comes back, safe to send again),
/// or after it may have reached the peer.
enum Failed {
    Unsent(Request<Body>),
    Sent(ClientError),
}

async fn exchange(
    conn: &mut Conn,
    req: Request<Body>,
    max: usize,
) -> Result<(StatusCode, Bytes), Failed> {
    let resp = match conn.try_send_request(req).await {
        Ok(resp) => resp,
        Err(mut e) => match e.take_message() {
            Some(req) => return Err(Failed::Unsent(req)),
            None => return Err(Failed::Sent(ClientError::Request(e.into_error()))),
        },
    };
    let status = resp.status();
    let over = || Failed::Sent(ClientError::TooLarge { limit: max });
    if hyper::body::Body::size_hint(resp.body()).lower() > max as u64 {
        return Err(over());
    }
    let body = match Limited::new(resp.into_body(), max).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(over()),
        Err(e) => return Err(Failed::Sent(ClientError::Answer(e.to_string()))),
    };
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_over_capacity_answer_is_well_formed() {
        let text = std::str::from_utf8(OVER_CAPACITY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        let length = format!("content-length: {}", body.len());
        assert!(
            head.lines().any(|l| l == length),
            "{head:?} vs {}",
            body.len()
        );
        serde_json::from_str::<serde_json::Value>(body).unwrap();
    }
}
