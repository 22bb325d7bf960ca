//! Fault injection a user can aim at any service.
//!
//! - In-process: [`LatencySimulator`] and [`FailureInjector`] (seeded), and a
//!   [`ResourceMonitor`] that samples RSS, peak RSS, open fds and CPU time
//!   from /proc.
//! - A Toxiproxy-style chaos [`Proxy`] between any TCP client and server,
//!   byte-exact until told otherwise: toxics (latency, bandwidth, timeout,
//!   reset_peer, slow_close, slicer, limit_data) per direction with a
//!   toxicity probability, `cut` and `partition`, controlled from Rust or over
//!   an HTTP JSON API ([`api`], binary `keel-chaos-proxy`).
//! - In [`Protocol::WebSocket`] mode the proxy reads the HTTP upgrade and the
//!   WebSocket frames, and frame toxics (`ws_drop`, `ws_duplicate`,
//!   `ws_reorder`, `ws_corrupt`, `ws_delay`, see [`ToxicKind`]) tamper with
//!   single JSON text messages chosen by a [`FrameFilter`], and
//!   `ws_early_close` answers a client's close at once and passes it on to
//!   the server late, as a WebSocket-terminating intermediary does; every
//!   tampering is recorded as a [`Tampering`] ([`Proxy::tamperings`]), the
//!   ground truth a test's checker is held to.
//! - A [`MockUpstream`]: a WebSocket messaging API that enforces a rate limit
//!   with 429 answers, can go down, answer garbage, stall or slow down, and
//!   records every accepted message, duplicates and early sends.
//! - Process faults ([`process`]), disk faults ([`disk`]), file corruption
//!   ([`corrupt`]).
//!
//! Every random decision comes from a seeded RNG, so a run can be replayed.
//!
//! # Example
//!
//! ```
//! use keel_faults::{Proxy, ProxyConfig, Stream, Toxic, ToxicKind};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // An echo server, and a proxy in front of it.
//! let server = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let upstream = server.local_addr()?;
//! tokio::spawn(async move {
//!     let (mut s, _) = server.accept().await.unwrap();
//!     let mut buf = [0u8; 5];
//!     s.read_exact(&mut buf).await.unwrap();
//!     s.write_all(&buf).await.unwrap();
//! });
//! let proxy = Proxy::start(ProxyConfig {
//!     name: "echo".into(),
//!     listen: "127.0.0.1:0".parse()?,
//!     upstream,
//!     seed: 7,
//!     protocol: keel_faults::Protocol::Tcp,
//! })
//! .await?;
//! proxy.add_toxic(Toxic::new("slow", Stream::Downstream, ToxicKind::Latency { latency: 20, jitter: 0 }))?;
//!
//! let started = std::time::Instant::now();
//! let mut client = tokio::net::TcpStream::connect(proxy.listen_addr()).await?;
//! client.write_all(b"hello").await?;
//! let mut echo = [0u8; 5];
//! client.read_exact(&mut echo).await?;
//! assert_eq!(&echo, b"hello");
//! assert!(started.elapsed() >= std::time::Duration::from_millis(20));
//! # Ok(())
//! # }
//! ```

#[cfg(feature = "proxy-api")]
pub mod api;
pub mod clock;
pub mod corrupt;
pub mod disk;
mod inject;
mod monitor;
pub mod process;
mod proxy;
#[cfg(feature = "tls")]
pub mod tls;
mod upstream;

pub use crate::inject::{FailureInjector, LatencySimulator};
pub use crate::monitor::{MonitorError, Report, ResourceMonitor, Sample, sample};
pub use crate::proxy::{
    FrameFilter, Partition, PartitionMode, Protocol, Proxy, ProxyConfig, ProxyError, ProxyStats,
    Stream, TamperAction, Tampering, Toxic, ToxicKind,
};
pub use crate::upstream::{Accepted, EarlySend, MockUpstream, UpstreamConfig, UpstreamMode};

/// The README's examples, compiled and run as doctests so that they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
