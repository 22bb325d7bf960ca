//! Sessions and their state machine.

use std::fmt;
use std::str::FromStr;

use crate::clock::UnixMillis;

/// A session's id: opaque text, random unless the creator chose one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub String);

impl SessionId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The private channel only this session may read: `session:<id>`.
    pub fn private_channel(&self) -> String {
        format!("session:{}", self.0)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for SessionId {
    fn from(s: &str) -> Self {
        SessionId(s.to_owned())
    }
}

/// The lifecycle state of a session (docs/protocol.md, "Sessions").
///
/// ```text
/// CREATED -> ACTIVE <-> DETACHED
/// ACTIVE|DETACHED -> PAUSED -> ACTIVE
/// ACTIVE|DETACHED|PAUSED -> CRASHED
/// CRASHED -> ACTIVE
/// any but CLOSED -> CLOSED
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SessionState {
    /// Created, never connected.
    Created,
    /// A client is connected.
    Active,
    /// The client is gone; the session can be resumed.
    Detached,
    /// Paused by the user or the service.
    Paused,
    /// Found running after a crash, or its process died; resumable.
    Crashed,
    /// Terminal.
    Closed,
}

impl SessionState {
    /// Every state, in declaration order.
    pub const ALL: [SessionState; 6] = [
        SessionState::Created,
        SessionState::Active,
        SessionState::Detached,
        SessionState::Paused,
        SessionState::Crashed,
        SessionState::Closed,
    ];

    /// The stored spelling, e.g. `"ACTIVE"`.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Created => "CREATED",
            SessionState::Active => "ACTIVE",
            SessionState::Detached => "DETACHED",
            SessionState::Paused => "PAUSED",
            SessionState::Crashed => "CRASHED",
            SessionState::Closed => "CLOSED",
        }
    }

    /// Whether the state machine allows moving from `self` to `to`.
    pub fn can_transition_to(self, to: SessionState) -> bool {
        use SessionState::*;
        matches!(
            (self, to),
            (Created, Active)
                | (Active, Detached)
                | (Detached, Active)
                | (Active | Detached, Paused)
                | (Paused, Active)
                | (Active | Detached | Paused, Crashed)
                | (Crashed, Active)
                | (Created | Active | Detached | Paused | Crashed, Closed)
        )
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SessionState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SessionState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| s.to_owned())
    }
}

/// A stored session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Its id.
    pub id: SessionId,
    /// Hash of its bearer token (the store never sees the token itself).
    pub token_hash: Vec<u8>,
    /// Current state.
    pub state: SessionState,
    /// When it was created.
    pub created_at: UnixMillis,
    /// When its row last changed.
    pub updated_at: UnixMillis,
    /// When its client was last seen, if ever.
    pub last_seen_at: Option<UnixMillis>,
    /// When it was last marked CRASHED.
    pub recovered_at: Option<UnixMillis>,
    /// How many times it was marked CRASHED.
    pub crash_count: u32,
    /// Opaque application data.
    pub meta: String,
}

/// What [`SessionStore::create_session`](crate::SessionStore::create_session) needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewSession {
    /// The id to use; a random 128-bit hex id when `None`.
    pub id: Option<SessionId>,
    /// Hash of the session's bearer token.
    pub token_hash: Vec<u8>,
    /// Opaque application data.
    pub meta: String,
    /// Its first connection is already open: store it ACTIVE (the
    /// CREATED -> ACTIVE transition in the same write). The returned
    /// session's state is still CREATED: the state it was created in.
    pub connected: bool,
}

/// One entry of a session's activity log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    /// When it happened.
    pub at: UnixMillis,
    /// A short kind, e.g. `"command"`.
    pub kind: String,
    /// Free text.
    pub detail: String,
}

/// What [`SessionStore::mark_crashed`](crate::SessionStore::mark_crashed) changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CrashMarked {
    /// Sessions that were ACTIVE and are now CRASHED.
    pub crashed: Vec<SessionId>,
    /// Sessions whose stored state was not a known state, with that value; they
    /// are now CRASHED too.
    pub unknown: Vec<(SessionId, String)>,
    /// How many crash notices were appended (zero for [`SessionStore::mark_crashed`](crate::SessionStore::mark_crashed)).
    pub notified: u64,
}

/// One session that crash recovery marked CRASHED, as a notice builder sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashedSession {
    /// The session.
    pub id: SessionId,
    /// Its stored state before: `ACTIVE`, or the unknown value found.
    pub previous_state: String,
    /// Its crash count after this crash (1 for the first).
    pub crash_count: u32,
    /// The `recovered_at` time written.
    pub recovered_at: UnixMillis,
}

/// Builds the payload of the notice appended to a crashed session's private
/// channel (see [`SessionStore::mark_crashed_and_notify`](crate::SessionStore::mark_crashed_and_notify)).
pub type CrashNotice = std::sync::Arc<dyn Fn(&CrashedSession) -> Vec<u8> + Send + Sync>;
