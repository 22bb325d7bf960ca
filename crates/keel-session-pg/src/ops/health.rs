//! The health transition log on PostgreSQL.

use keel_store::{HealthTransition, StoreError};

use super::count;
use crate::PgStore;

pub(super) async fn record_health_transition(
    store: &PgStore,
    from: &str,
    to: &str,
    reason: &str,
) -> Result<HealthTransition, StoreError> {
    let now = store.now_millis();
    let rows = store
        .write1::<StoreError>(
            "INSERT INTO transitions(at, from_state, to_state, reason)
             VALUES ($1, $2, $3, $4) RETURNING id",
            &[&now, &from, &to, &reason],
        )
        .await?;
    let id = rows.first().map_or(0, |r| r.get(0));
    Ok(HealthTransition {
        id,
        at: now,
        from: from.to_owned(),
        to: to.to_owned(),
        reason: reason.to_owned(),
    })
}

pub(super) async fn health_transitions(
    store: &PgStore,
    limit: usize,
) -> Result<Vec<HealthTransition>, StoreError> {
    let rows = store
        .read::<StoreError>(
            "SELECT id, at, from_state, to_state, reason FROM transitions
             ORDER BY id DESC LIMIT $1",
            &[&count(limit)],
        )
        .await?;
    let mut out: Vec<HealthTransition> = rows
        .iter()
        .map(|r| HealthTransition {
            id: r.get(0),
            at: r.get(1),
            from: r.get(2),
            to: r.get(3),
            reason: r.get(4),
        })
        .collect();
    out.reverse();
    Ok(out)
}
