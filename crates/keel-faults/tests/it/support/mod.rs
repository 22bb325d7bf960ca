//! Echo and sink servers, a proxy in front of them, and WebSocket pairs
//! through a proxy with a copy of every byte each side read and wrote.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use keel_faults::{Protocol, Proxy, ProxyConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;

/// An echo server: every byte read is written back.
pub(crate) async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A server that records the size of every read it makes, per connection.
pub(crate) async fn read_sizes_server()
-> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut sizes = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    sizes.push(n);
                }
                let _ = tx.send(sizes);
            });
        }
    });
    (addr, rx)
}

pub(crate) async fn proxy_to(upstream: SocketAddr, seed: u64) -> Proxy {
    proxy_with(upstream, seed, Protocol::Tcp).await
}

pub(crate) async fn proxy_with(upstream: SocketAddr, seed: u64, protocol: Protocol) -> Proxy {
    Proxy::start(ProxyConfig {
        name: "test".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream,
        seed,
        protocol,
    })
    .await
    .unwrap()
}

/// Sends `msg` and reads the same number of bytes back, with a deadline.
pub(crate) async fn round_trip(
    s: &mut TcpStream,
    msg: &[u8],
    within: Duration,
) -> std::io::Result<Vec<u8>> {
    s.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(within, s.read_exact(&mut back))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo in time"))??;
    Ok(back)
}

/// The bytes one side of a connection read and wrote.
#[derive(Clone, Default)]
pub(crate) struct Taps {
    read: Arc<Mutex<Vec<u8>>>,
    written: Arc<Mutex<Vec<u8>>>,
}

impl Taps {
    pub(crate) fn read(&self) -> Vec<u8> {
        self.read.lock().unwrap().clone()
    }

    pub(crate) fn written(&self) -> Vec<u8> {
        self.written.lock().unwrap().clone()
    }
}

/// A TCP stream that keeps a copy of every byte through it.
pub(crate) struct Tap {
    inner: TcpStream,
    taps: Taps,
}

impl AsyncRead for Tap {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        self.taps.read.lock().unwrap().extend_from_slice(new);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, data))?;
        self.taps
            .written
            .lock()
            .unwrap()
            .extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

pub(crate) type Ws = WebSocketStream<Tap>;

/// A WebSocket-mode proxy in front of a listener the test accepts on.
pub(crate) async fn ws_proxy(seed: u64) -> (Proxy, TcpListener) {
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = proxy_with(server.local_addr().unwrap(), seed, Protocol::WebSocket).await;
    (proxy, server)
}

/// A tokio-tungstenite client connected through `proxy` to a
/// tokio-tungstenite server accepted on `server`.
pub(crate) async fn ws_pair(proxy: &Proxy, server: &TcpListener) -> ((Ws, Taps), (Ws, Taps)) {
    let client = async {
        let tcp = TcpStream::connect(proxy.listen_addr()).await.unwrap();
        let taps = Taps::default();
        let tap = Tap {
            inner: tcp,
            taps: taps.clone(),
        };
        let url = format!("ws://{}/ws", proxy.listen_addr());
        let (ws, _) = tokio_tungstenite::client_async(url, tap).await.unwrap();
        (ws, taps)
    };
    let accepted = async {
        let (tcp, _) = server.accept().await.unwrap();
        let taps = Taps::default();
        let tap = Tap {
            inner: tcp,
            taps: taps.clone(),
        };
        (tokio_tungstenite::accept_async(tap).await.unwrap(), taps)
    };
    tokio::time::timeout(Duration::from_secs(5), async {
        tokio::join!(client, accepted)
    })
    .await
    .expect("a WebSocket handshake through the proxy")
}
