//! The outbox: durable sends with idempotency keys, leased claims, retries and dead letters.
//!
//! ```text
//! enqueue -> PENDING --claim--> CLAIMED --complete--> SENT
//!              ^  ^                |  \--fail(retry)--> PENDING (attempts+1, next_attempt_at)
//!              |  \--lease expires-/   \-fail(no retry)/dead_letter--> DEAD --redrive--> PENDING
//! ```

use std::fmt;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::clock::{UnixMillis, millis};
use crate::error::{OutboxError, StoreError};
use crate::sessions::SessionId;
use crate::store::Store;

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

    fn parse(s: &str) -> Option<Self> {
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
    conn.prepare_cached(&sql)?
        .query_row([id.0], item_from_row)
        .optional()?
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
    /// Adds a send to the outbox, or returns the existing item with the same
    /// idempotency key.
    pub async fn enqueue(&self, send: NewSend) -> Result<Enqueued, OutboxError> {
        self.enqueue_within(send, None).await
    }

    /// [`Store::enqueue`], refused with [`OutboxError::QuotaExceeded`] when
    /// the send's session already has `max_pending` sends not yet ended
    /// (PENDING or CLAIMED). A repeated idempotency key still returns the
    /// existing item: the quota counts new work only.
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
                )?
                .query_row(
                    params![
                        scope,
                        send.idem_key,
                        send.session_id.as_ref().map(SessionId::as_str)
                    ],
                    |r| r.get(0),
                )
                .optional()?;
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
                    )?
                    .query_row([session.as_str()], |r| r.get(0))?;
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
                )?
                .query_row(
                    params![
                        send.session_id.as_ref().map(SessionId::as_str),
                        send.idem_key,
                        send.payload,
                        ctx.now,
                        scope
                    ],
                    |r| r.get(0),
                )?;
            Ok(Enqueued {
                id: OutboxId(id),
                duplicate: false,
            })
        })
        .await
    }

    /// Claims up to `limit` due items for `worker` until now + `lease`, oldest
    /// first. Due items are PENDING ones whose `next_attempt_at` has passed and
    /// CLAIMED ones whose lease has expired. Each item goes to exactly one caller.
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
                .prepare_cached(&sql)?
                .query_map(params![worker, until, ctx.now, limit as i64], item_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            items.sort_by_key(|i| i.id);
            Ok(items)
        })
        .await
    }

    /// Marks a claimed item SENT. Fails with [`OutboxError::NotClaimed`] if
    /// `worker` no longer holds the claim.
    pub async fn complete(&self, id: OutboxId, worker: &str) -> Result<OutboxItem, OutboxError> {
        let worker = worker.to_owned();
        self.write(move |ctx| {
            let mut item = load_claimed(ctx.conn, id, &worker)?;
            ctx.conn
                .prepare_cached(
                    "UPDATE outbox SET state = 'SENT', sent_at = ?2, claimed_by = NULL,
                     claim_until = NULL WHERE id = ?1",
                )?
                .execute(params![id.0, ctx.now])?;
            item.state = OutboxState::Sent;
            item.sent_at = Some(ctx.now);
            item.claimed_by = None;
            item.claim_until = None;
            Ok(item)
        })
        .await
    }

    /// Records a failed attempt by `worker`: the attempt count goes up and the
    /// item becomes PENDING again after the retry delay, or DEAD.
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
                )?
                .execute(params![
                    id.0,
                    item.state.as_str(),
                    item.attempts,
                    item.last_error,
                    item.next_attempt_at
                ])?;
            Ok(item)
        })
        .await
    }

    /// Moves a PENDING or CLAIMED item to DEAD with `reason` (an operator or a
    /// validation step decided it can never be sent).
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
                )?
                .execute(params![id.0, reason])?;
            item.state = OutboxState::Dead;
            item.last_error = Some(reason.clone());
            item.claimed_by = None;
            item.claim_until = None;
            Ok(item)
        })
        .await
    }

    /// Re-queues a DEAD item: PENDING, due now, attempts reset to 0.
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
                )?
                .execute(params![id.0, ctx.now])?;
            item.state = OutboxState::Pending;
            item.attempts = 0;
            item.next_attempt_at = ctx.now;
            Ok(item)
        })
        .await
    }

    /// Re-queues every DEAD item; returns how many.
    pub async fn redrive_all(&self) -> Result<u64, StoreError> {
        self.write(|ctx| {
            let n = ctx
                .conn
                .prepare_cached(
                    "UPDATE outbox SET state = 'PENDING', attempts = 0, next_attempt_at = ?1
                     WHERE state = 'DEAD'",
                )?
                .execute([ctx.now])?;
            Ok(n as u64)
        })
        .await
    }

    /// Returns every CLAIMED item whose lease has expired to PENDING; returns how
    /// many. (Claims also take expired items directly; recovery calls this at
    /// startup so that counts and `doctor` show the truth.)
    pub async fn release_expired_claims(&self) -> Result<u64, StoreError> {
        self.write(|ctx| {
            let n = ctx
                .conn
                .prepare_cached(
                    "UPDATE outbox SET state = 'PENDING', claimed_by = NULL, claim_until = NULL
                     WHERE state = 'CLAIMED' AND claim_until <= ?1",
                )?
                .execute([ctx.now])?;
            Ok(n as u64)
        })
        .await
    }

    /// Reads one outbox item.
    pub async fn outbox_item(&self, id: OutboxId) -> Result<OutboxItem, OutboxError> {
        self.read(move |conn| load(conn, id)).await
    }

    /// Lists items in `state`, oldest first, at most `limit`.
    pub async fn outbox_items(
        &self,
        state: OutboxState,
        limit: usize,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        self.read(move |conn| {
            let sql =
                format!("SELECT {ITEM_COLUMNS} FROM outbox WHERE state = ?1 ORDER BY id LIMIT ?2");
            let items = conn
                .prepare_cached(&sql)?
                .query_map(params![state.as_str(), limit as i64], item_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(items)
        })
        .await
    }

    /// How many items are in each state.
    pub async fn outbox_counts(&self) -> Result<OutboxCounts, StoreError> {
        self.read(|conn| {
            let mut counts = OutboxCounts::default();
            let mut stmt =
                conn.prepare_cached("SELECT state, COUNT(*) FROM outbox GROUP BY state")?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })?;
            for row in rows {
                let (state, n) = row?;
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
