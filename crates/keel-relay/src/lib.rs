//! keel-relay: the keel daemon, composed of the keel crates, and its client SDK.
//!
//! The daemon keeps durable pub/sub sessions for WebSocket clients (protocol
//! `keel.v1`, `docs/protocol.md`): publishes are acknowledged only once
//! committed (keel-session), delivered in offset order with gaps replayed from
//! the log, and resumed after a reconnect or a `kill -9` without loss or
//! duplicates. Sends to an upstream messaging API go through a durable outbox,
//! keel-ratelimit and a keel-reconnect link; startup recovery, health and
//! shutdown come from keel-recovery.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = keel_relay::Config::default();
//! config.listen = "127.0.0.1:0".parse()?;
//! config.data = "relay-data".into();
//! let relay = keel_relay::Relay::start(config).await?;
//! println!("listening on {}", relay.addr());
//! relay.shutdown("example done").await?;
//! # Ok(())
//! # }
//! ```

mod accept;
mod auth;
mod bulk;
mod bus;
pub mod catalogue;
mod channels;
pub mod cli;
/// The client SDK, [keel-client](keel_client): re-exported, so that
/// `keel_relay::client` names the same types.
pub use keel_client as client;
mod cluster;
pub mod config;
mod conn;
pub mod doctor;
mod exec;
mod failpoints;
mod gate;
mod hub;
mod limits;
mod procmetrics;
pub mod protocol;
mod relay;
mod retention;
pub mod spool;
pub mod store;
mod tail;
mod tls;
mod upgrade;
mod upstream;

pub use crate::config::Config;
pub use crate::relay::{Relay, RelayError};

/// The README's examples, compiled and run as doctests so that they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
