//! The relay's own accept loop: connection caps checked at TCP accept (a
//! refused connection gets a one-line HTTP answer and is closed), HTTP/1.1
//! served by hyper with a header-read timeout and a bound on the request
//! head (slowloris), upgrades for the WebSocket endpoint, and every
//! connection's admission time and slot handed to the handlers.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use keel_recovery::ShutdownToken;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::gate::{Gated, ReadGate};
use crate::limits::{Budget, Caps, Refused, Slot, hit};

/// What the handlers learn about their connection.
#[derive(Clone)]
pub(crate) struct Admitted {
    /// Its place under the caps; the connection holds it until it ends.
    pub(crate) slot: Arc<Slot>,
    /// When it was accepted: the handshake timeout counts from here.
    pub(crate) at: tokio::time::Instant,
    /// Its account with the inbound budget (charged once it is a WebSocket).
    pub(crate) gate: Arc<ReadGate>,
}

/// How connections are served.
pub(crate) struct Serving {
    pub(crate) caps: Arc<Caps>,
    pub(crate) header_timeout: Duration,
    pub(crate) max_header_bytes: usize,
    /// The inbound byte budget socket reads are charged to.
    pub(crate) inbound: Budget,
    /// Time a WebSocket frame may take to arrive from its first byte.
    pub(crate) frame_timeout: Duration,
    /// TLS, when the relay terminates it (`--tls-cert`, `--tls-key`).
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    /// `SO_SNDBUF` of each accepted socket; 0 leaves the kernel's autotuning
    /// (see `limits.socket_send_buffer_bytes`).
    pub(crate) send_buffer_bytes: usize,
}

/// Accepts until `stop`, serving each connection with `app`.
pub(crate) async fn run(
    listener: TcpListener,
    app: Router,
    serving: Serving,
    mut stop: ShutdownToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors or a transient error: wait a
                    // little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.stopped() => return,
        };
        let _ = stream.set_nodelay(true);
        if serving.send_buffer_bytes > 0 {
            let _ = set_send_buffer(&stream, serving.send_buffer_bytes);
        }
        let slot = match serving.caps.admit(peer.ip()) {
            Ok(slot) => Arc::new(slot),
            Err(why) => {
                refuse(stream, why);
                continue;
            }
        };
        let gate = ReadGate::new(serving.inbound.clone(), serving.frame_timeout);
        let admitted = Admitted {
            slot,
            at: tokio::time::Instant::now(),
            gate: gate.clone(),
        };
        let app = app.clone();
        let (header_timeout, max_header_bytes) = (serving.header_timeout, serving.max_header_bytes);
        let stop = stop.clone();
        let tls = serving.tls.clone();
        tokio::spawn(async move {
            let service =
                tower::service_fn(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    req.extensions_mut().insert(admitted.clone());
                    app.clone().oneshot(req)
                });
            let io = Gated::new(stream, gate);
            let http = Http {
                header_timeout,
                max_header_bytes,
                stop,
            };
            match tls {
                None => http.serve(io, service).await,
                Some(tls) => {
                    // The TLS handshake counts against the header timeout:
                    // a client that stalls it holds nothing for long.
                    match tokio::time::timeout(header_timeout, tls.accept(io)).await {
                        Ok(Ok(io)) => http.serve(io, service).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// HTTP/1.1 on one connection, plain or TLS.
struct Http {
    header_timeout: Duration,
    max_header_bytes: usize,
    stop: ShutdownToken,
}

impl Http {
    async fn serve<I, S>(mut self, io: I, service: S)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        S: tower::Service<
                axum::http::Request<hyper::body::Incoming>,
                Response = axum::response::Response,
                Error = std::convert::Infallible,
            > + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            .max_buf_size(self.max_header_bytes.max(8192))
            .keep_alive(true);
        let conn = builder
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
            .with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => {}
            _ = self.stop.stopped() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
            }
        }
    }
}

/// Answers a refused connection with one HTTP line and closes it; never
/// waits on the client for more than a second.
fn refuse(mut stream: tokio::net::TcpStream, why: Refused) {
    let (limit, status, text) = match why {
        Refused::Total => (
            "connections_total",
            "503 Service Unavailable",
            "the relay holds all the connections it may; retry later",
        ),
        Refused::PerIp => (
            "connections_per_ip",
            "429 Too Many Requests",
            "too many connections from this address",
        ),
    };
    hit(limit);
    metrics::counter!("keel_connections_refused_total").increment(1);
    tokio::spawn(async move {
        let body = format!("{text}\n");
        let answer = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
        })
        .await;
    });
}

/// Bounds what the kernel keeps unsent for one client (`SO_SNDBUF`): a
/// subscriber that stops reading holds this much kernel memory, not
/// `net.ipv4.tcp_wmem`'s maximum. A failure leaves the kernel's default.
/// Linux silently caps the value at `net.core.wmem_max` (and reports
/// twice what it keeps): a cap is said once, with the sysctl to raise.
/// Returns the size the kernel reports.
fn set_send_buffer(stream: &tokio::net::TcpStream, bytes: usize) -> Option<usize> {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt::SndBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    static CAPPED: AtomicBool = AtomicBool::new(false);
    let bytes = bytes.min(i32::MAX as usize / 2);
    if let Err(e) = setsockopt(stream, SndBuf, &bytes) {
        tracing::debug!(error = %e, "cannot set the socket's send buffer");
        return None;
    }
    let got = getsockopt(stream, SndBuf).ok()?;
    if got < bytes.saturating_mul(2) && !CAPPED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            requested = bytes,
            kept = got / 2,
            "limits.socket_send_buffer_bytes is over the kernel's net.core.wmem_max: each socket gets that cap instead (raise the sysctl, or set a value under it)"
        );
    }
    Some(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bound reaches the socket: Linux reports twice what was set (its
    /// own overhead), far under the 4 MiB its autotuning may grow to.
    #[tokio::test]
    async fn the_send_buffer_is_bounded() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let before: usize =
            nix::sys::socket::getsockopt(&server, nix::sys::socket::sockopt::SndBuf).unwrap();
        let reported = set_send_buffer(&server, 64 * 1024);
        let after: usize =
            nix::sys::socket::getsockopt(&server, nix::sys::socket::sockopt::SndBuf).unwrap();
        assert_eq!(after, 128 * 1024, "set to 64 KiB (was {before})");
        assert_eq!(reported, Some(after));
        // Over net.core.wmem_max the kernel keeps its cap, and says so
        // only through what it reports.
        let max: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(212_992);
        let capped = set_send_buffer(&server, max + 4096);
        assert_eq!(capped, Some(2 * max), "capped at net.core.wmem_max");
    }
}
