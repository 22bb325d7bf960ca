//! The outbox: durable sends with idempotency keys, leased claims, retries and dead letters.
//!
//! ```text
//! enqueue -> PENDING --claim--> CLAIMED --complete--> SENT
//!              ^  ^                |  \--fail(retry)--> PENDING (attempts+1, next_attempt_at)
//!              |  \--lease expires-/   \-fail(no retry)/dead_letter--> DEAD --redrive--> PENDING
//! ```

use std::fmt;
use std::time::Duration;

use crate::clock::UnixMillis;
use crate::sessions::SessionId;

/// An outbox item's id (increasing in enqueue order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OutboxId(pub i64);

impl fmt::Display for OutboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where an outbox item is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OutboxState {
    /// Waiting to be claimed (possibly not before `next_attempt_at`).
    Pending,
    /// Claimed by a worker until `claim_until`.
    Claimed,
    /// Delivered; terminal.
    Sent,
    /// Gave up; waits for a re-drive.
    Dead,
}

impl OutboxState {
    /// The stored spelling, e.g. `"PENDING"`.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxState::Pending => "PENDING",
            OutboxState::Claimed => "CLAIMED",
            OutboxState::Sent => "SENT",
            OutboxState::Dead => "DEAD",
        }
    }

    /// The state its stored spelling names (`"PENDING"` is
    /// [`OutboxState::Pending`]), or `None`.
    pub fn parse(s: &str) -> Option<Self> {
        [
            OutboxState::Pending,
            OutboxState::Claimed,
            OutboxState::Sent,
            OutboxState::Dead,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

impl fmt::Display for OutboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored outbox item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    /// Its id.
    pub id: OutboxId,
    /// The session that asked for the send, if any.
    pub session_id: Option<SessionId>,
    /// Whose key space `idem_key` is in (`session:<id>`, a user, `spool`;
    /// `""` for items enqueued before keys were scoped). Fixed at enqueue:
    /// purging the session does not change it.
    pub scope: String,
    /// The caller's idempotency key, unique within `scope`.
    pub idem_key: String,
    /// What to send.
    pub payload: Vec<u8>,
    /// Current state.
    pub state: OutboxState,
    /// The worker holding the claim (CLAIMED only).
    pub claimed_by: Option<String>,
    /// When the claim lapses (CLAIMED only).
    pub claim_until: Option<UnixMillis>,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Not to be claimed before this time.
    pub next_attempt_at: UnixMillis,
    /// The last failure's message.
    pub last_error: Option<String>,
    /// When it was enqueued.
    pub created_at: UnixMillis,
    /// When it was marked SENT.
    pub sent_at: Option<UnixMillis>,
}

/// What to enqueue.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewSend {
    /// The session asking for it, if any (must exist).
    pub session_id: Option<SessionId>,
    /// Whose key space `idem_key` is in, e.g. a user whose sessions all
    /// share one (`user:<sub>`). Empty: the session's own
    /// (`session:<id>`), or with no session the shared scope `""`.
    pub scope: String,
    /// Idempotency key: enqueueing the same key twice in the same scope
    /// yields the first item; other scopes may use the same key.
    pub idem_key: String,
    /// What to send.
    pub payload: Vec<u8>,
}

/// The result of an enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The item's id.
    pub id: OutboxId,
    /// True when the idempotency key was already present: nothing was written.
    pub duplicate: bool,
}

/// What to do with an item whose send failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Make it claimable again after this delay.
    After(Duration),
    /// Give up: the item goes to DEAD.
    Never,
}

/// How many items are in each state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxCounts {
    /// PENDING items.
    pub pending: u64,
    /// CLAIMED items.
    pub claimed: u64,
    /// SENT items.
    pub sent: u64,
    /// DEAD items.
    pub dead: u64,
}
