//! A fair, exact rate-limited send queue with 429 backoff.
//!
//! keel-ratelimit stands between many senders and an API that rate-limits
//! them. Messages are queued per key (a recipient, a channel) with bounds and
//! an overflow policy; keys with work are served round-robin and FIFO within a
//! key; a message goes out at the exact instant every quota of its decision
//! (per key and global, several each, on [`governor`]) has a token — the
//! dispatcher sleeps until then, it never polls. A rate-limit answer freezes
//! the key (or, if global, everything) for at least its Retry-After; other
//! retryable failures back off exponentially with full jitter from a seeded
//! RNG; a message that cannot be sent ends in the dead letters, never
//! silently. Everything runs on tokio time, so tests with paused time are exact.
//!
//! # Example
//!
//! ```
//! use std::num::NonZeroU32;
//! use keel_ratelimit::{Config, Delivery, Quota, SendOutcome, SendQueue, Sink};
//!
//! struct Api;
//!
//! impl Sink<String, String> for Api {
//!     async fn send(&self, to: &String, text: &String) -> SendOutcome {
//!         println!("to {to}: {text}");
//!         SendOutcome::Sent
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let per_second = |n| Quota::per_second(NonZeroU32::new(n).unwrap());
//! let config = Config {
//!     global: vec![per_second(30)],
//!     per_key: vec![per_second(1)],
//!     ..Config::default()
//! };
//! let (queue, _dead_letters) = SendQueue::new(Api, config);
//! let receipt = queue.submit("alice".to_string(), "hello".to_string()).await.unwrap();
//! assert_eq!(receipt.await, Delivery::Sent { attempts: 1 });
//! # }
//! ```

mod backoff;
mod bucket;
mod clock;
mod config;
mod limiter;
mod queue;
mod sink;

pub use crate::clock::{TokioClock, TokioInstant};
pub use crate::config::{Backoff, Config, Overflow};
pub use crate::limiter::Limiter;
pub use crate::queue::{
    Bound, DeadLetter, DeadLetters, DeadReason, Delivery, Metrics, Receipt, SendQueue, SubmitError,
};
pub use crate::sink::{Scope, SendOutcome, Sink};
pub use governor::Quota;

/// The README's examples, compiled and run as doctests so that they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
