//! The store's clock (keel-store's), and a duration in milliseconds.

use std::time::Duration;

pub(crate) use keel_store::{Clock, SteadyClock, UnixMillis};

/// A duration in whole milliseconds, saturating.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
