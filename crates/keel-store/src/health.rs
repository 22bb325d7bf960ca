//! The health transition log.

use crate::clock::UnixMillis;

/// One recorded health transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthTransition {
    /// Unique and increasing; never reused, even after rows are deleted.
    pub id: i64,
    /// When it was recorded.
    pub at: UnixMillis,
    /// The state before.
    pub from: String,
    /// The state after.
    pub to: String,
    /// Why.
    pub reason: String,
}
