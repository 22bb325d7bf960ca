//! Echo and sink servers, and a proxy in front of them.

use std::net::SocketAddr;
use std::time::Duration;

use keel_faults::{Proxy, ProxyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
    Proxy::start(ProxyConfig {
        name: "test".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream,
        seed,
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
