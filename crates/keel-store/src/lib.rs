#![doc = include_str!("../README.md")]

mod api;
mod clock;
mod commit;
mod either;
mod error;
pub mod fair;
mod health;
mod messages;
mod outbox;
mod sessions;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use crate::api::SessionStore;
pub use crate::clock::{Clock, ManualClock, SteadyClock, SystemClock, UnixMillis};
pub use crate::commit::{Committing, StartupInfo};
pub use crate::either::Either;
pub use crate::error::{OpenError, OutboxError, SessionError, StoreError};
pub use crate::health::HealthTransition;
pub use crate::messages::{
    Appended, ChannelBounds, ChannelStats, Message, Offset, Retention, SHARED_SCOPE, SYSTEM_SCOPE,
    Subscription,
};
pub use crate::outbox::{
    Enqueued, NewSend, OutboxCounts, OutboxId, OutboxItem, OutboxState, Retry,
};
pub use crate::sessions::{
    Activity, CrashMarked, CrashNotice, CrashedSession, NewSession, Session, SessionId,
    SessionState,
};
