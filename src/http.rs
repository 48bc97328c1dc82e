//! HTTP on smol: the accept loop both binaries serve their endpoints with, small response
//! helpers, and a minimal client for webhooks and CentOps.
//!
//! hyper does the protocol work; this module only adapts it to smol and to [`Stream`], so
//! a WebSocket upgrade can take the connection back out of hyper.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_rustls::TlsAcceptor;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use smol::net::TcpListener;
use smol_hyper::rt::{FuturesIo, SmolTimer};

use async_tungstenite::tungstenite::handshake::derive_accept_key;
use async_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use async_tungstenite::WebSocketStream;

use crate::wait::with_timeout;
use crate::transport::{self, Stream};

/// The connection type hyper serves; what an upgrade hands back.
pub type Io = FuturesIo<Stream>;
/// Every response body here is a complete buffer.
pub type Body = Full<Bytes>;

/// Serves `handler` on `listener` until `stop` resolves. Each connection runs in its own
/// task; TLS, when configured, is negotiated in that task so a slow client blocks no one.
pub async fn serve<H, F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: H,
    stop: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let accept = async {
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
            let _ = tcp.set_nodelay(true);
            let (tls, handler) = (tls.clone(), handler.clone());
            smol::spawn(async move {
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
                let service = hyper::service::service_fn(move |req| {
                    let fut = handler(req, peer);
                    async move { Ok::<_, std::convert::Infallible>(fut.await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(SmolTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(FuturesIo::new(stream), service)
                    .with_upgrades();
                if let Err(e) = conn.await {
                    log::debug!("HTTP connection from {peer} ended: {e}");
                }
            })
            .detach();
        }
    };
    futures_lite::future::or(accept, stop).await;
}

/// The WebSocket a `101` answer leads to, once hyper hands the connection over.
pub type Upgrading =
    std::pin::Pin<Box<dyn Future<Output = Result<transport::WebSocket, String>> + Send>>;

/// Answers a WebSocket upgrade request: the `101` response to return now, and the
/// WebSocket to come. A request that is not a version 13 WebSocket upgrade is refused with
/// the reason, for a `400`.
pub fn upgrade_websocket(
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
        let upgraded = on_upgrade.await.map_err(|e| e.to_string())?;
        let parts = upgraded
            .downcast::<Io>()
            .map_err(|_| "unexpected connection type")?;
        // Bytes hyper read past the request already belong to the WebSocket.
        let stream = parts.io.into_inner();
        let read = parts.read_buf.to_vec();
        Ok(WebSocketStream::from_partially_read(stream, read, Role::Server, Some(config)).await)
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

/// Reads a request body of at most `max` bytes; `Err(true)` when it was too large. A body
/// whose `Content-Length` is already over `max` is refused before any of it is read.
pub async fn read_body(body: Incoming, max: usize) -> Result<Bytes, bool> {
    if hyper::body::Body::size_hint(&body).lower() > max as u64 {
        return Err(true);
    }
    match Limited::new(body, max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => Err(e
            .downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()),
    }
}

/// Why an outgoing HTTP request failed before a status came back.
#[derive(Debug)]
pub struct ClientError(pub String);

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ClientError {}

/// One HTTP/1.1 request on a fresh connection, bounded by `timeout` as a whole.
/// `https://` uses `tls` (or the web PKI roots when it is `None`).
pub async fn request(
    req: Request<Body>,
    tls: Option<&futures_rustls::TlsConnector>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), ClientError> {
    Client::new(tls.cloned()).request(req, timeout).await
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
    idle: std::sync::Mutex<std::collections::HashMap<String, Vec<Kept>>>,
}

impl Client {
    /// `tls` is used for `https://` (the web PKI roots when `None`).
    pub fn new(tls: Option<futures_rustls::TlsConnector>) -> Self {
        Self {
            tls,
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
            .unwrap_or_else(|| Err(ClientError(format!("no answer within {timeout:?}"))))
    }

    async fn send(&self, mut req: Request<Body>) -> Result<(StatusCode, Bytes), ClientError> {
        let uri = req.uri().clone();
        let authority = uri
            .authority()
            .ok_or_else(|| ClientError(format!("URL {uri} has no host")))?
            .as_str()
            .to_owned();
        let key = format!("{}://{authority}", uri.scheme_str().unwrap_or("http"));
        req.headers_mut().insert(
            hyper::header::HOST,
            authority
                .parse()
                .map_err(|_| ClientError(format!("bad host in {uri}")))?,
        );
        *req.uri_mut() = uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .expect("path");
        if let Some((mut conn, task)) = self.take_idle(&key) {
            // A kept connection the peer closed meanwhile fails at once; only then retry fresh.
            if conn.ready().await.is_ok() {
                let retry = clone_request(&req);
                match exchange(&mut conn, req).await {
                    Ok(r) => return Ok(self.keep(key, conn, task, r)),
                    Err(_) => req = retry,
                }
            }
        }
        let (mut conn, task) = self.connect(&uri).await?;
        let r = exchange(&mut conn, req).await?;
        Ok(self.keep(key, conn, task, r))
    }

    fn take_idle(&self, key: &str) -> Option<Kept> {
        let mut idle = self.idle.lock().expect("pool lock");
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
            let mut idle = self.idle.lock().expect("pool lock");
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
            .ok_or_else(|| ClientError(format!("URL {uri} has no host")))?;
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let default_tls;
        let tls = match (https, &self.tls) {
            (false, _) => None,
            (true, Some(t)) => Some(t),
            (true, None) => {
                default_tls = transport::client_tls(None).map_err(|e| ClientError(e.0))?;
                Some(&default_tls)
            }
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let stream = transport::dial(host, port, tls)
            .await
            .map_err(|e| ClientError(format!("cannot connect to {host}:{port}: {e}")))?;
        let (conn, driver) = hyper::client::conn::http1::handshake(FuturesIo::new(stream))
            .await
            .map_err(|e| ClientError(format!("HTTP handshake with {host}:{port}: {e}")))?;
        let task = smol::spawn(async move {
            let _ = driver.await;
        });
        Ok((conn, task))
    }
}

fn clone_request(req: &Request<Body>) -> Request<Body> {
    let mut r = Request::new(req.body().clone());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.headers_mut() = req.headers().clone();
    r
}

async fn exchange(conn: &mut Conn, req: Request<Body>) -> Result<(StatusCode, Bytes), ClientError> {
    let resp = conn
        .send_request(req)
        .await
        .map_err(|e| ClientError(format!("request failed: {e}")))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError(format!("reading the answer: {e}")))?
        .to_bytes();
    Ok((status, body))
}
