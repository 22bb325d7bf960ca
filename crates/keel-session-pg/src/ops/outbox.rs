//! The outbox on PostgreSQL: idempotent enqueue under a per-session quota,
//! `FOR UPDATE SKIP LOCKED` claims under a lease, retries, dead letters.

use std::time::Duration;

use keel_store::{
    Enqueued, NewSend, OutboxCounts, OutboxError, OutboxId, OutboxItem, OutboxState, Retry,
    SessionId, StoreError, UnixMillis,
};
use tokio_postgres::Row;

use super::{count, ms};
use crate::PgStore;
use crate::error::{pg, retryable};

const ITEM_COLUMNS: &str = "id, session_id, idem_key, payload, state, claimed_by, claim_until, \
                            attempts, next_attempt_at, last_error, created_at, sent_at, scope";

fn outbox_state(s: &str) -> OutboxState {
    match s {
        "PENDING" => OutboxState::Pending,
        "CLAIMED" => OutboxState::Claimed,
        "SENT" => OutboxState::Sent,
        _ => OutboxState::Dead,
    }
}

fn item_from_row(r: &Row) -> OutboxItem {
    OutboxItem {
        id: OutboxId(r.get(0)),
        session_id: r.get::<_, Option<String>>(1).map(SessionId),
        idem_key: r.get(2),
        payload: r.get(3),
        state: outbox_state(r.get(4)),
        claimed_by: r.get(5),
        claim_until: r.get(6),
        attempts: r.get::<_, i32>(7) as u32,
        next_attempt_at: r.get(8),
        last_error: r.get(9),
        created_at: r.get(10),
        sent_at: r.get(11),
        scope: r.get(12),
    }
}

impl PgStore {
    /// The item's state, to tell "not found" from "wrong state".
    async fn outbox_miss(&self, id: OutboxId, expected: &'static str) -> OutboxError {
        match self
            .read::<StoreError>("SELECT state FROM outbox WHERE id = $1", &[&id.0])
            .await
        {
            Ok(rows) => match rows.first() {
                None => OutboxError::NotFound(id),
                Some(r) => OutboxError::WrongState {
                    id,
                    state: r.get(0),
                    expected,
                },
            },
            Err(e) => OutboxError::Store(e),
        }
    }

    async fn claimed_miss(&self, id: OutboxId, worker: &str) -> OutboxError {
        match self.outbox_miss(id, "CLAIMED").await {
            OutboxError::WrongState { .. } => OutboxError::NotClaimed {
                id,
                worker: worker.to_owned(),
            },
            other => other,
        }
    }
}

pub(super) async fn enqueue_within(
    store: &PgStore,
    send: NewSend,
    max_pending: Option<u64>,
) -> Result<Enqueued, OutboxError> {
    let scope = match (&send.scope, &send.session_id) {
        (s, _) if !s.is_empty() => s.clone(),
        (_, Some(session)) => format!("session:{}", session.as_str()),
        (_, None) => String::new(),
    };
    let session = send.session_id.as_ref().map(SessionId::as_str);
    txn!(store, OutboxError, |tx, now| {
        let existing = tx
            .query_opt(
                "SELECT id FROM outbox WHERE scope = $1 AND idem_key = $2",
                &[&scope, &send.idem_key],
            )
            .await
            .map_err(pg)?;
        if let Some(r) = existing {
            return Ok(Enqueued {
                id: OutboxId(r.get(0)),
                duplicate: true,
            });
        }
        if let (Some(max), Some(session)) = (max_pending, session) {
            let pending: i64 = tx
                .query_one(
                    "SELECT COUNT(*) FROM outbox
                     WHERE session_id = $1 AND state IN ('PENDING', 'CLAIMED')",
                    &[&session],
                )
                .await
                .map_err(pg)?
                .get(0);
            if pending as u64 >= max {
                return Err(OutboxError::QuotaExceeded {
                    pending: pending as u64,
                    max,
                });
            }
        }
        // A concurrent enqueue of the same key makes this a unique
        // violation: the transaction runs again and finds its row.
        let id: i64 = tx
            .query_one(
                "INSERT INTO outbox(session_id, idem_key, payload, state, next_attempt_at,
                                    created_at, scope)
                 VALUES ($1, $2, $3, 'PENDING', $4, $4, $5) RETURNING id",
                &[&session, &send.idem_key, &send.payload, &now, &scope],
            )
            .await
            .map_err(pg)?
            .get(0);
        Enqueued {
            id: OutboxId(id),
            duplicate: false,
        }
    })
}

pub(super) async fn claim(
    store: &PgStore,
    worker: &str,
    lease: Duration,
    limit: usize,
) -> Result<Vec<OutboxItem>, OutboxError> {
    let now = store.now_millis();
    let until = now.saturating_add(ms(lease));
    let sql = format!(
        "UPDATE outbox SET state = 'CLAIMED', claimed_by = $1, claim_until = $2
         WHERE id IN (
           SELECT id FROM outbox
           WHERE (state = 'PENDING' AND next_attempt_at <= $3)
              OR (state = 'CLAIMED' AND claim_until <= $3)
           ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED)
         RETURNING {ITEM_COLUMNS}"
    );
    let rows = store
        .write1::<OutboxError>(&sql, &[&worker, &until, &now, &count(limit)])
        .await?;
    let mut items: Vec<OutboxItem> = rows.iter().map(item_from_row).collect();
    items.sort_by_key(|i| i.id);
    Ok(items)
}

pub(super) async fn complete(
    store: &PgStore,
    id: OutboxId,
    worker: &str,
) -> Result<OutboxItem, OutboxError> {
    let now = store.now_millis();
    let sql = format!(
        "UPDATE outbox SET state = 'SENT', sent_at = $3, claimed_by = NULL, claim_until = NULL
         WHERE id = $1 AND state = 'CLAIMED' AND claimed_by = $2 RETURNING {ITEM_COLUMNS}"
    );
    let rows = store
        .write1::<OutboxError>(&sql, &[&id.0, &worker, &now])
        .await?;
    match rows.first() {
        Some(r) => Ok(item_from_row(r)),
        None => Err(store.claimed_miss(id, worker).await),
    }
}

pub(super) async fn fail(
    store: &PgStore,
    id: OutboxId,
    worker: &str,
    error: &str,
    retry: Retry,
) -> Result<OutboxItem, OutboxError> {
    let now = store.now_millis();
    let (state, next) = match retry {
        Retry::After(delay) => (OutboxState::Pending, Some(now.saturating_add(ms(delay)))),
        Retry::Never => (OutboxState::Dead, None),
    };
    let sql = format!(
        "UPDATE outbox SET state = $3, attempts = attempts + 1, last_error = $4,
         next_attempt_at = COALESCE($5, next_attempt_at), claimed_by = NULL, claim_until = NULL
         WHERE id = $1 AND state = 'CLAIMED' AND claimed_by = $2 RETURNING {ITEM_COLUMNS}"
    );
    let rows = store
        .write1::<OutboxError>(&sql, &[&id.0, &worker, &state.as_str(), &error, &next])
        .await?;
    match rows.first() {
        Some(r) => Ok(item_from_row(r)),
        None => Err(store.claimed_miss(id, worker).await),
    }
}

pub(super) async fn dead_letter(
    store: &PgStore,
    id: OutboxId,
    reason: &str,
) -> Result<OutboxItem, OutboxError> {
    let sql = format!(
        "UPDATE outbox SET state = 'DEAD', last_error = $2, claimed_by = NULL, claim_until = NULL
         WHERE id = $1 AND state IN ('PENDING', 'CLAIMED') RETURNING {ITEM_COLUMNS}"
    );
    let rows = store.write1::<OutboxError>(&sql, &[&id.0, &reason]).await?;
    match rows.first() {
        Some(r) => Ok(item_from_row(r)),
        None => Err(store.outbox_miss(id, "PENDING or CLAIMED").await),
    }
}

pub(super) async fn redrive(store: &PgStore, id: OutboxId) -> Result<OutboxItem, OutboxError> {
    let now = store.now_millis();
    let sql = format!(
        "UPDATE outbox SET state = 'PENDING', attempts = 0, next_attempt_at = $2
         WHERE id = $1 AND state = 'DEAD' RETURNING {ITEM_COLUMNS}"
    );
    let rows = store.write1::<OutboxError>(&sql, &[&id.0, &now]).await?;
    match rows.first() {
        Some(r) => Ok(item_from_row(r)),
        None => Err(store.outbox_miss(id, "DEAD").await),
    }
}

pub(super) async fn redrive_all(store: &PgStore) -> Result<u64, StoreError> {
    let now = store.now_millis();
    let rows = store
        .write1::<StoreError>(
            "UPDATE outbox SET state = 'PENDING', attempts = 0, next_attempt_at = $1
             WHERE state = 'DEAD' RETURNING 1",
            &[&now],
        )
        .await?;
    Ok(rows.len() as u64)
}

pub(super) async fn release_expired_claims(store: &PgStore) -> Result<u64, StoreError> {
    let now = store.now_millis();
    let rows = store
        .write1::<StoreError>(
            "UPDATE outbox SET state = 'PENDING', claimed_by = NULL, claim_until = NULL
             WHERE state = 'CLAIMED' AND claim_until <= $1 RETURNING 1",
            &[&now],
        )
        .await?;
    Ok(rows.len() as u64)
}

pub(super) async fn outbox_item(store: &PgStore, id: OutboxId) -> Result<OutboxItem, OutboxError> {
    let sql = format!("SELECT {ITEM_COLUMNS} FROM outbox WHERE id = $1");
    let rows = store.read::<OutboxError>(&sql, &[&id.0]).await?;
    rows.first()
        .map(item_from_row)
        .ok_or(OutboxError::NotFound(id))
}

pub(super) async fn outbox_items(
    store: &PgStore,
    state: OutboxState,
    limit: usize,
) -> Result<Vec<OutboxItem>, StoreError> {
    let sql = format!("SELECT {ITEM_COLUMNS} FROM outbox WHERE state = $1 ORDER BY id LIMIT $2");
    let rows = store
        .read::<StoreError>(&sql, &[&state.as_str(), &count(limit)])
        .await?;
    Ok(rows.iter().map(item_from_row).collect())
}

pub(super) async fn outbox_counts(store: &PgStore) -> Result<OutboxCounts, StoreError> {
    let rows = store
        .read::<StoreError>("SELECT state, COUNT(*) FROM outbox GROUP BY state", &[])
        .await?;
    let mut counts = OutboxCounts::default();
    for r in &rows {
        let n = r.get::<_, i64>(1) as u64;
        match outbox_state(r.get(0)) {
            OutboxState::Pending => counts.pending = n,
            OutboxState::Claimed => counts.claimed = n,
            OutboxState::Sent => counts.sent = n,
            OutboxState::Dead => counts.dead += n,
        }
    }
    Ok(counts)
}
