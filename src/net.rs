//! TCP on the reactor of the thread that uses it: tokio's inside a tokio runtime (both
//! binaries; the server's AMQP client is tokio's), async-io's everywhere else (tests, and
//! operator commands under `smol::block_on`).
//!
//! Why two: a socket wakes the task that waits on it from its reactor's thread. The server
//! relays each message between a WebSocket and an AMQP connection; with the WebSocket on
//! async-io and amqprs on tokio every message crossed between two threads, each hop an
//! eventfd write and an `epoll_wait` round (issue 15 measured them at over a third of the
//! server's CPU). Both binaries run their executor inside a tokio runtime
//! ([`crate::runtime::block_on`]), so the server's sockets and amqprs's share one reactor;
//! the agent's gain from tokio's edge-triggered epoll (see `runtime`).
//!
//! Both kinds are futures-io streams (`AsyncRead`, `AsyncWrite`); the choice is made once,
//! when a socket is opened, and nothing above this module sees it.

use std::io;
use std::net::SocketAddr;

use async_compat::Compat;

use crate::runtime::on_tokio;

/// A listening socket.
pub enum TcpListener {
    AsyncIo(smol::net::TcpListener),
    Tokio(tokio::net::TcpListener),
}

impl TcpListener {
    /// Listens on `addr`, on this thread's reactor.
    pub async fn bind(addr: SocketAddr) -> io::Result<Self> {
        if on_tokio() {
            Ok(Self::Tokio(tokio::net::TcpListener::bind(addr).await?))
        } else {
            Ok(Self::AsyncIo(smol::net::TcpListener::bind(addr).await?))
        }
    }

    /// The address it listens on (the port, when bound to port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Self::AsyncIo(l) => l.local_addr(),
            Self::Tokio(l) => l.local_addr(),
        }
    }

    /// The next connection and its peer's address.
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        match self {
            Self::AsyncIo(l) => {
                let (s, peer) = l.accept().await?;
                Ok((TcpStream::AsyncIo(s), peer))
            }
            Self::Tokio(l) => {
                // tokio registers the new socket with the runtime current while `accept`
                // is polled; `Compat` makes sure there is one.
                let (s, peer) = Compat::new(l.accept()).await?;
                Ok((TcpStream::Tokio(Compat::new(s)), peer))
            }
        }
    }
}

impl From<smol::net::TcpListener> for TcpListener {
    fn from(listener: smol::net::TcpListener) -> Self {
        Self::AsyncIo(listener)
    }
}

/// A connected socket.
pub enum TcpStream {
    AsyncIo(smol::net::TcpStream),
    Tokio(Compat<tokio::net::TcpStream>),
}

impl TcpStream {
    /// Connects to `host:port`, on this thread's reactor.
    pub async fn connect(host: &str, port: u16) -> io::Result<Self> {
        if on_tokio() {
            let s = tokio::net::TcpStream::connect((host, port)).await?;
            Ok(Self::Tokio(Compat::new(s)))
        } else {
            Ok(Self::AsyncIo(
                smol::net::TcpStream::connect((host, port)).await?,
            ))
        }
    }

    /// Sends small writes at once: every frame here is a whole message or an answer.
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match self {
            Self::AsyncIo(s) => s.set_nodelay(on),
            Self::Tokio(s) => s.get_ref().set_nodelay(on),
        }
    }
}

/// Implements futures-io [`AsyncRead`] and [`AsyncWrite`] for an enum whose every variant
/// holds one stream, by forwarding each call to that stream (`close` shuts down the
/// sending half, as both socket kinds do). Used here and for `transport::Stream`.
macro_rules! forward_io {
    ($ty:ident { $($variant:ident),+ }) => {
        impl futures_lite::AsyncRead for $ty {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut [u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $($ty::$variant(s) => std::pin::Pin::new(s).poll_read(cx, buf),)+
                }
            }
        }

        impl futures_lite::AsyncWrite for $ty {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $($ty::$variant(s) => std::pin::Pin::new(s).poll_write(cx, buf),)+
                }
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($ty::$variant(s) => std::pin::Pin::new(s).poll_flush(cx),)+
                }
            }

            fn poll_close(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($ty::$variant(s) => std::pin::Pin::new(s).poll_close(cx),)+
                }
            }
        }
    };
}
pub(crate) use forward_io;

forward_io!(TcpStream { AsyncIo, Tokio });

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::{AsyncReadExt, AsyncWriteExt};

    /// Echoes one line through a listener and a connection of whatever kind this thread
    /// opens, and says which kind that was.
    async fn round_trip() -> (bool, bool) {
        let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut client = TcpStream::connect("127.0.0.1", port).await.unwrap();
        client.set_nodelay(true).unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        // Closing shuts down the sending half only: the peer reads the end, then can answer.
        client.close().await.unwrap();
        assert_eq!(server.read(&mut got).await.unwrap(), 0);
        server.write_all(b"pong").await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        let tokio_listener = matches!(listener, TcpListener::Tokio(_));
        (tokio_listener, matches!(client, TcpStream::Tokio(_)))
    }

    #[test]
    fn inside_a_tokio_runtime_sockets_are_tokios() {
        let tokio = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        // The executor's tasks see the runtime too, as they do in `dmr-server`.
        let kinds = tokio.block_on(smol::LocalExecutor::new().run(round_trip()));
        assert_eq!(kinds, (true, true));
    }

    #[test]
    fn elsewhere_sockets_are_async_ios() {
        assert_eq!(smol::block_on(round_trip()), (false, false));
    }
}
