//! The health transition log: every change of the service's health state, with a unique id.

use rusqlite::params;

use crate::error::Db;
use crate::error::StoreError;
use crate::store::Store;

pub(crate) use keel_store::HealthTransition;

impl Store {
    /// [`SessionStore::record_health_transition`] on SQLite: the contract is documented there.
    pub async fn record_health_transition(
        &self,
        from: &str,
        to: &str,
        reason: &str,
    ) -> Result<HealthTransition, StoreError> {
        let (from, to, reason) = (from.to_owned(), to.to_owned(), reason.to_owned());
        self.write(move |ctx| {
            let id: i64 = ctx
                .conn
                .prepare_cached(
                    "INSERT INTO transitions(at, from_state, to_state, reason)
                     VALUES(?1, ?2, ?3, ?4) RETURNING id",
                )
                .db()?
                .query_row(params![ctx.now, from, to, reason], |r| r.get(0))
                .db()?;
            Ok(HealthTransition {
                id,
                at: ctx.now,
                from: from.clone(),
                to: to.clone(),
                reason: reason.clone(),
            })
        })
        .await
    }

    /// [`SessionStore::health_transitions`] on SQLite: the contract is documented there.
    pub async fn health_transitions(
        &self,
        limit: usize,
    ) -> Result<Vec<HealthTransition>, StoreError> {
        self.read(move |conn| {
            let mut rows = conn
                .prepare_cached(
                    "SELECT id, at, from_state, to_state, reason FROM transitions
                     ORDER BY id DESC LIMIT ?1",
                )
                .db()?
                .query_map([limit as i64], |r| {
                    Ok(HealthTransition {
                        id: r.get(0)?,
                        at: r.get(1)?,
                        from: r.get(2)?,
                        to: r.get(3)?,
                        reason: r.get(4)?,
                    })
                })
                .db()?
                .collect::<Result<Vec<_>, _>>()
                .db()?;
            rows.reverse();
            Ok(rows)
        })
        .await
    }
}
