//! Channel logs: messages, offsets, retention and subscription cursors.

use std::time::Duration;

use crate::clock::UnixMillis;

/// The scope of message ids that name no publisher ([`SessionStore::append`](crate::SessionStore::append));
/// ids written before ids were scoped (schema 3) are in it too.
pub const SHARED_SCOPE: &str = "";

/// The scope of messages the store writes itself (crash notices).
pub const SYSTEM_SCOPE: &str = "system";

/// A position in a channel's log. The first message of a channel has offset 1;
/// offsets are never reused, even after retention removes messages.
pub type Offset = u64;

/// A message read back from a channel log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The channel.
    pub channel: String,
    /// Its offset in the channel.
    pub offset: Offset,
    /// The publisher's id for it (unique per channel and publisher scope).
    pub msg_id: String,
    /// When it was appended.
    pub at: UnixMillis,
    /// The payload bytes.
    pub payload: Vec<u8>,
}

/// The result of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The message's offset.
    pub offset: Offset,
    /// When it was first appended.
    pub at: UnixMillis,
    /// True when the `msg_id` was already in the channel: nothing new was written
    /// and `offset` is the original one.
    pub duplicate: bool,
}

/// Which offsets a channel holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChannelBounds {
    /// The oldest retained offset, if any message is retained.
    pub first: Option<Offset>,
    /// The offset the next append will get.
    pub next: Offset,
}

/// How much of each channel log to keep. `None` keeps everything on that axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    /// Keep at most this many newest messages per channel.
    pub max_count: Option<u64>,
    /// Drop messages older than this.
    pub max_age: Option<Duration>,
}

/// The size of one channel's log (see [`SessionStore::channel_stats`](crate::SessionStore::channel_stats)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelStats {
    /// The channel.
    pub channel: String,
    /// Messages retained.
    pub messages: u64,
    /// The oldest retained offset.
    pub first: Offset,
    /// The newest offset.
    pub last: Offset,
    /// Payload bytes retained.
    pub payload_bytes: u64,
}

/// A session's subscription to a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The channel.
    pub channel: String,
    /// The last offset delivered and acknowledged (0 for none).
    pub cursor: Offset,
}
