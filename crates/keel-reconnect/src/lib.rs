//! A reconnecting WebSocket client that loses nothing and detects dead links.
//!
//! [`ReconnectingClient`] keeps one logical connection to a WebSocket server
//! alive over tokio-tungstenite (4 KiB buffers by default):
//!
//! - its [`State`] is a `watch` value (Connecting, Resuming, Connected,
//!   Disconnected, Backoff, Closed) and every change is checked against a
//!   table;
//! - reconnects back off exponentially (backon) with full jitter from a seeded
//!   RNG, and the attempt count resets only after a link stayed up for a while;
//!   close codes are classified fatal, retry, or retry-after;
//! - liveness: pings on an interval, any inbound frame counts, a link silent
//!   too long or a write stalled too long is declared dead and replaced;
//!   closing a dead socket is bounded in time;
//! - outbound messages go into a buffer bounded by count and bytes (policy
//!   backpressure, drop oldest or reject); each send returns a handle telling
//!   "written" from "acknowledged" (acks come from your [`Protocol`] hook);
//!   unacknowledged messages are re-sent in order after a reconnect, only after
//!   the resume hook completed; control frames bypass the buffer.
//!
//! # Example
//!
//! ```no_run
//! use keel_reconnect::{Config, Plain, ReconnectingClient};
//! use tokio_tungstenite::tungstenite::Message;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let (client, mut inbound) =
//!     ReconnectingClient::start("ws://127.0.0.1:9000/".to_string(), Plain, Config::default());
//! let mut handle = client.send(Message::text("hello"), None).await?;
//! handle.written().await?;
//! if let Some(frame) = inbound.recv().await {
//!     println!("got {frame:?}");
//! }
//! client.close().await;
//! # Ok(())
//! # }
//! ```

mod backoff;
mod buffer;
mod client;
mod frames;
mod state;

pub use crate::backoff::Backoff;
pub use crate::buffer::{BufferConfig, LostLinks, Overflow, SendError, SendHandle};
#[cfg(feature = "tls")]
pub use crate::client::tls_config;
pub use crate::client::{
    CloseAction, Config, Counters, Inbound, Link, Plain, Protocol, ReconnectingClient, Target,
    classify_close,
};
pub use crate::frames::Frames;
pub use crate::state::{InvalidTransition, State, StateCell};
/// The TLS library `wss://` uses (for [`Config::tls`]).
#[cfg(feature = "tls")]
pub use rustls;
pub use tokio_tungstenite::tungstenite::Message;

/// The README's examples, compiled and run as doctests so that they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
