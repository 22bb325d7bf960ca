//! What the queue sends through: the user's `Sink`, and what a send can answer.

use std::future::Future;
use std::time::Duration;

/// Whom a rate limit answer concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Only this key (recipient): only its queue pauses.
    Key,
    /// The whole client: every key pauses.
    Global,
}

/// The answer of one send attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// Delivered.
    Sent,
    /// The server refused for rate (HTTP 429 or equivalent). The message is
    /// retried no sooner than `retry_after`, however long that is.
    RateLimited {
        /// How long the server asked us to wait.
        retry_after: Duration,
        /// Whether the limit is this key's or global.
        scope: Scope,
    },
    /// No attempt could be made: the sink's own link to the server is down
    /// (or dropped before an answer could come). Retried no sooner than
    /// `retry_after`, and not counted against `Backoff::max_attempts`: a
    /// flapping link does not use up a message's attempts, only answers
    /// (or their absence on a live link) do.
    Unavailable {
        /// How long to wait before the next try.
        retry_after: Duration,
    },
    /// Any other failure.
    Failed {
        /// Whether a later attempt may succeed (backoff and retry) or not
        /// (dead letter now).
        retryable: bool,
        /// What went wrong, kept for the dead letter.
        error: String,
    },
}

/// The API the queue stands in front of. Implement it for your client.
///
/// `send` is called for one message at a time per key (FIFO within a key) and
/// for several keys concurrently, up to `Config::max_in_flight`.
pub trait Sink<K, M>: Send + Sync + 'static {
    /// Sends one message to `key`.
    fn send(&self, key: &K, msg: &M) -> impl Future<Output = SendOutcome> + Send;
}
