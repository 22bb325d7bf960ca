//! The outbox: durable sends with idempotency keys, leased claims, retries and dead letters.
//!
//! ```text
//! enqueue -> PENDING --claim--> CLAIMED --complete--> SENT
//!              ^  ^                |  \--fail(retry)--> PENDING (attempts+1, next_attempt_at)
//!              |  \--lease expires-/   \-fail(no retry)/dead_letter--> DEAD --redrive--> PENDING
//! ```

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::clock::millis;
use crate::error::Db;
use crate::error::{OutboxError, StoreError};
use crate::sessions::SessionId;
use crate::store::Store;

pub(crate) use keel_store::{
    Enqueued, NewSend, OutboxCounts, OutboxId, OutboxItem, OutboxState, Retry,
};

const ITEM_COLUMNS: &str = "id, session_id, idem_key, payload, state, claimed_by, claim_until, \
                            attempts, next_attempt_at, last_error, created_at, sent_at, scope";

fn item_from_row(row: &Row<'_>) -> rusqlite::Result<OutboxItem> {
    let state: String = row.get(4)?;
    Ok(OutboxItem {
        id: OutboxId(row.get(0)?),
        session_id: row.get::<_, Option<String>>(1)?.map(SessionId),
        idem_key: row.get(2)?,
        payload: row.get(3)?,
        state: OutboxState::parse(&state).unwrap_or(OutboxState::Dead),
        claimed_by: row.get(5)?,
        claim_until: row.get(6)?,
        attempts: row.get(7)?,
        next_attempt_at: row.get(8)?,
        last_error: row.get(9)?,
        created_at: row.get(10)?,
        sent_at: row.get(11)?,
        scope: row.get(12)?,
    })
}

fn load(conn: &Connection, id: OutboxId) -> Result<OutboxItem, OutboxError> {
    let sql = format!("SELECT {ITEM_COLUMNS} FROM outbox WHERE id = ?1");
    conn.prepare_cached(&sql)
        .db()?
        .query_row([id.0], item_from_row)
        .optional()
        .db()?
        .ok_or(OutboxError::NotFound(id))
}

/// Loads an item and checks that `worker` holds its claim.
fn load_claimed(conn: &Connection, id: OutboxId, worker: &str) -> Result<OutboxItem, OutboxError> {
    let item = load(conn, id)?;
    if item.state != OutboxState::Claimed || item.claimed_by.as_deref() != Some(worker) {
        return Err(OutboxError::NotClaimed {
            id,
            worker: worker.to_owned(),
        });
    }
    Ok(item)
}

impl Store {
    /// [`SessionStore::enqueue`] on SQLite: the contract is documented there.
    pub async fn enqueue(&self, send: NewSend) -> Result<Enqueued, OutboxError> {
        self.enqueue_within(send, None).await
    }

    /// [`SessionStore::enqueue_within`] on SQLite: the contract is documented there.
    pub async fn enqueue_within(
        &self,
        send: NewSend,
        max_pending: Option<u64>,
    ) -> Result<Enqueued, OutboxError> {
        let scope = match (&send.scope, &send.session_id) {
            (s, _) if !s.is_empty() => s.clone(),
            (_, Some(session)) => format!("session:{}", session.as_str()),
            (_, None) => String::new(),
        };
        self.write(move |ctx| {
            // The key in its scope, or an item of the same session enqueued
            // before keys were scoped (scope ''): a retry across the
            // upgrade is still the same send.
            let existing: Option<i64> = ctx
                .conn
                .prepare_cached(
                    "SELECT id FROM outbox WHERE scope = ?1 AND idem_key = ?2
                     UNION ALL
                     SELECT id FROM outbox WHERE scope = '' AND idem_key = ?2 AND session_id IS ?3
                     LIMIT 1",
                ).db()?
                .query_row(
                    params![
                        scope,
                        send.idem_key,
                        send.session_id.as_ref().map(SessionId::as_str)
                    ],
                    |r| r.get(0),
                )
                .optional().db()?;
            if let Some(id) = existing {
                return Ok(Enqueued {
                    id: OutboxId(id),
                    duplicate: true,
                });
            }
            if let (Some(max), Some(session)) = (max_pending, &send.session_id) {
                let pending: i64 = ctx
                    .conn
                    .prepare_cached(
                        "SELECT COUNT(*) FROM outbox
                         WHERE session_id = ?1 AND state IN ('PENDING', 'CLAIMED')",
                    ).db()?
                    .query_row([session.as_str()], |r| r.get(0)).db()?;
                if pending as u64 >= max {
                    return Err(OutboxError::QuotaExceeded {
                        pending: pending as u64,
                        max,
                    });
                }
            }
            let id: i64 = ctx
                .conn
                .prepare_cached(
                    "INSERT INTO outbox(session_id, idem_key, payload, state, next_attempt_at, created_at, scope)
                     VALUES(?1, ?2, ?3, 'PENDING', ?4, ?4, ?5) RETURNING id",
                ).db()?
                .query_row(
                    params![
                        send.session_id.as_ref().map(SessionId::as_str),
                        send.idem_key,
                        send.payload,
                        ctx.now,
                        scope
                    ],
                    |r| r.get(0),
                ).db()?;
            Ok(Enqueued {
                id: OutboxId(id),
                duplicate: false,
            })
        })
        .await
    }

    /// [`SessionStore::claim`] on SQLite: the contract is documented there.
    pub async fn claim(
        &self,
        worker: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<OutboxItem>, OutboxError> {
        let worker = worker.to_owned();
        self.write(move |ctx| {
            let until = ctx.now.saturating_add(millis(lease));
            let sql = format!(
                "UPDATE outbox SET state = 'CLAIMED', claimed_by = ?1, claim_until = ?2
                 WHERE id IN (
                   SELECT id FROM outbox
                   WHERE (state = 'PENDING' AND next_attempt_at <= ?3)
                      OR (state = 'CLAIMED' AND claim_until <= ?3)
                   ORDER BY id LIMIT ?4)
                 RETURNING {ITEM_COLUMNS}"
            );
            let mut items = ctx
                .conn
                .prepare_cached(&sql)
                .db()?
                .query_map(params![worker, until, ctx.now, limit as i64], item_from_row)
                .db()?
                .collect::<Result<Vec<_>, _>>()
                .db()?;
            items.sort_by_key(|i| i.id);
            Ok(items)
        })
        .await
    }

    /// [`SessionStore::complete`] on SQLite: the contract is documented there.
    pub async fn complete(&self, id: OutboxId, worker: &str) -> Result<OutboxItem, OutboxError> {
        let worker = worker.to_owned();
        self.write(move |ctx| {
            let mut item = load_claimed(ctx.conn, id, &worker)?;
            ctx.conn
                .prepare_cached(
                    "UPDATE outbox SET state = 'SENT', sent_at = ?2, claimed_by = NULL,
                     claim_until = NULL WHERE id = ?1",
                )
                .db()?
                .execute(params![id.0, ctx.now])
                .db()?;
            item.state = OutboxState::Sent;
            item.sent_at = Some(ctx.now);
            item.claimed_by = None;
            item.claim_until = None;
            Ok(item)
        })
        .await
    }

    /// [`SessionStore::fail`] on SQLite: the contract is documented there.
    pub async fn fail(
        &self,
        id: OutboxId,
        worker: &str,
        error: &str,
        retry: Retry,
    ) -> Result<OutboxItem, OutboxError> {
        let (worker, error) = (worker.to_owned(), error.to_owned());
        self.write(move |ctx| {
            let mut item = load_claimed(ctx.conn, id, &worker)?;
            item.attempts += 1;
            item.last_error = Some(error.clone());
            item.claimed_by = None;
            item.claim_until = None;
            match retry {
                Retry::After(delay) => {
                    item.state = OutboxState::Pending;
                    item.next_attempt_at = ctx.now.saturating_add(millis(delay));
                }
                Retry::Never => item.state = OutboxState::Dead,
            }
            ctx.conn
                .prepare_cached(
                    "UPDATE outbox SET state = ?2, attempts = ?3, last_error = ?4,
                     next_attempt_at = ?5, claimed_by = NULL, claim_until = NULL WHERE id = ?1",
                )
                .db()?
                .execute(params![
                    id.0,
                    item.state.as_str(),
                    item.attempts,
                    item.last_error,
                    item.next_attempt_at
                ])
                .db()?;
            Ok(item)
        })
        .await
    }

    /// [`SessionStore::dead_letter`] on SQLite: the contract is documented there.
    pub async fn dead_letter(&self, id: OutboxId, reason: &str) -> Result<OutboxItem, OutboxError> {
        let reason = reason.to_owned();
        self.write(move |ctx| {
            let mut item = load(ctx.conn, id)?;
            if !matches!(item.state, OutboxState::Pending | OutboxState::Claimed) {
                return Err(OutboxError::WrongState {
                    id,
                    state: item.state.to_string(),
                    expected: "PENDING or CLAIMED",
                });
            }
            ctx.conn
                .prepare_cached(
                    "UPDATE outbox SET state = 'DEAD', last_error = ?2, claimed_by = NULL,
                     claim_until = NULL WHERE id = ?1",
                )
                .db()?
                .execute(params![id.0, reason])
                .db()?;
            item.state = OutboxState::Dead;
            item.last_error = Some(reason.clone());
            item.claimed_by = None;
            item.claim_until = None;
            Ok(item)
        })
        .await
    }

    /// [`SessionStore::redrive`] on SQLite: the contract is documented there.
    pub async fn redrive(&self, id: OutboxId) -> Result<OutboxItem, OutboxError> {
        self.write(move |ctx| {
            let mut item = load(ctx.conn, id)?;
            if item.state != OutboxState::Dead {
                return Err(OutboxError::WrongState {
                    id,
                    state: item.state.to_string(),
                    expected: "DEAD",
                });
            }
            ctx.conn
                .prepare_cached(
                    "UPDATE outbox SET state = 'PENDING', attempts = 0, next_attempt_at = ?2
                     WHERE id = ?1",
                )
                .db()?
                .execute(params![id.0, ctx.now])
                .db()?;
            item.state = OutboxState::Pending;
            item.attempts = 0;
            item.next_attempt_at = ctx.now;
            Ok(item)
        })
        .await
    }

    /// [`SessionStore::redrive_all`] on SQLite: the contract is documented there.
    pub async fn redrive_all(&self) -> Result<u64, StoreError> {
        self.write(|ctx| {
            let n = ctx
                .conn
                .prepare_cached(
                    "UPDATE outbox SET state = 'PENDING', attempts = 0, next_attempt_at = ?1
                     WHERE state = 'DEAD'",
                )
                .db()?
                .execute([ctx.now])
                .db()?;
            Ok(n as u64)
        })
        .await
    }

    /// [`SessionStore::release_expired_claims`] on SQLite: the contract is documented there.
    pub async fn release_expired_claims(&self) -> Result<u64, StoreError> {
        self.write(|ctx| {
            let n = ctx
                .conn
                .prepare_cached(
                    "UPDATE outbox SET state = 'PENDING', claimed_by = NULL, claim_until = NULL
                     WHERE state = 'CLAIMED' AND claim_until <= ?1",
                )
                .db()?
                .execute([ctx.now])
                .db()?;
            Ok(n as u64)
        })
        .await
    }

    /// [`SessionStore::outbox_item`] on SQLite: the contract is documented there.
    pub async fn outbox_item(&self, id: OutboxId) -> Result<OutboxItem, OutboxError> {
        self.read(move |conn| load(conn, id)).await
    }

    /// [`SessionStore::outbox_items`] on SQLite: the contract is documented there.
    pub async fn outbox_items(
        &self,
        state: OutboxState,
        limit: usize,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        self.read(move |conn| {
            let sql =
                format!("SELECT {ITEM_COLUMNS} FROM outbox WHERE state = ?1 ORDER BY id LIMIT ?2");
            let items = conn
                .prepare_cached(&sql)
                .db()?
                .query_map(params![state.as_str(), limit as i64], item_from_row)
                .db()?
                .collect::<Result<Vec<_>, _>>()
                .db()?;
            Ok(items)
        })
        .await
    }

    /// [`SessionStore::outbox_counts`] on SQLite: the contract is documented there.
    pub async fn outbox_counts(&self) -> Result<OutboxCounts, StoreError> {
        self.read(|conn| {
            let mut counts = OutboxCounts::default();
            let mut stmt = conn
                .prepare_cached("SELECT state, COUNT(*) FROM outbox GROUP BY state")
                .db()?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
                })
                .db()?;
            for row in rows {
                let (state, n) = row.db()?;
                match OutboxState::parse(&state) {
                    Some(OutboxState::Pending) => counts.pending = n,
                    Some(OutboxState::Claimed) => counts.claimed = n,
                    Some(OutboxState::Sent) => counts.sent = n,
                    Some(OutboxState::Dead) | None => counts.dead += n,
                }
            }
            Ok(counts)
        })
        .await
    }
}
