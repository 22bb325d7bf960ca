//! Sessions on PostgreSQL: the state machine, node-scoped crash marking
//! and notices, idle purges, the bounded activity log.

use std::time::Duration;

use keel_store::{
    Activity, CrashMarked, CrashNotice, CrashedSession, NewSession, Offset, SYSTEM_SCOPE, Session,
    SessionError, SessionId, SessionState, StoreError, UnixMillis,
};
use tokio_postgres::Row;

use super::{count, ms};
use crate::PgStore;
use crate::error::{pg, retryable};
use crate::writer::{Framing, Item, LOCK_CHANNELS, Statements, append_batch};

const SESSION_COLUMNS: &str = "id, token_hash, state, created_at, updated_at, last_seen_at, \
                               recovered_at, crash_count, meta";

fn session_from_row(r: &Row) -> Result<Session, SessionError> {
    let id = SessionId(r.get(0));
    let raw: String = r.get(2);
    let Ok(state) = raw.parse() else {
        return Err(SessionError::UnknownState { id, state: raw });
    };
    Ok(Session {
        id,
        token_hash: r.get(1),
        state,
        created_at: r.get(3),
        updated_at: r.get(4),
        last_seen_at: r.get(5),
        recovered_at: r.get(6),
        crash_count: r.get::<_, i32>(7) as u32,
        meta: r.get(8),
    })
}

/// Marks `node`'s ACTIVE sessions CRASHED (with `recovered_at = now`,
/// `crash_count + 1`) inside `tx`, appending `notice`'s payload to each
/// one's private channel with id `crash-notice-<crash_count>`. `own`: the
/// node's recovery of itself, which also takes sessions no node holds
/// (from a single-node past) and rows with an unknown state; a survivor
/// recovering a dead node takes that node's sessions only.
pub(crate) async fn crash_sessions(
    tx: &deadpool_postgres::Transaction<'_>,
    now: UnixMillis,
    node: &str,
    own: bool,
    notice: Option<&CrashNotice>,
) -> Result<CrashMarked, StoreError> {
    let known: Vec<&str> = SessionState::ALL.iter().map(|s| s.as_str()).collect();
    let unknown: Vec<(SessionId, String)> = if own {
        tx.query(
            "SELECT id, state FROM sessions WHERE state <> ALL($1) ORDER BY id FOR UPDATE",
            &[&known],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| (SessionId(r.get(0)), r.get(1)))
        .collect()
    } else {
        Vec::new()
    };
    let mut marked: Vec<CrashedSession> = tx
        .query(
            "UPDATE sessions SET state = 'CRASHED', recovered_at = $1, updated_at = $1,
             crash_count = crash_count + 1
             WHERE state = 'ACTIVE' AND (node = $2 OR ($3 AND node IS NULL))
             RETURNING id, crash_count",
            &[&now, &node, &own],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| CrashedSession {
            id: SessionId(r.get(0)),
            previous_state: SessionState::Active.as_str().to_owned(),
            crash_count: r.get::<_, i32>(1) as u32,
            recovered_at: now,
        })
        .collect();
    marked.sort_by(|a, b| a.id.cmp(&b.id));
    let crashed: Vec<SessionId> = marked.iter().map(|c| c.id.clone()).collect();
    for (id, state) in &unknown {
        let row = tx
            .query_one(
                "UPDATE sessions SET state = 'CRASHED', recovered_at = $2, updated_at = $2,
                 crash_count = crash_count + 1 WHERE id = $1 RETURNING crash_count",
                &[&id.as_str(), &now],
            )
            .await
            .map_err(pg)?;
        marked.push(CrashedSession {
            id: id.clone(),
            previous_state: state.clone(),
            crash_count: row.get::<_, i32>(0) as u32,
            recovered_at: now,
        });
    }
    let notified = match notice {
        Some(notice) => append_notices(tx, now, &marked, notice).await?.len() as u64,
        None => 0,
    };
    Ok(CrashMarked {
        crashed,
        unknown,
        notified,
    })
}

/// Appends `notice`'s payload for each of `marked` to its private channel
/// (id `crash-notice-<crash_count>`, the system scope) inside `tx`; returns
/// the (channel, offset) of each notice newly written.
pub(crate) async fn append_notices(
    tx: &deadpool_postgres::Transaction<'_>,
    now: UnixMillis,
    marked: &[CrashedSession],
    notice: &CrashNotice,
) -> Result<Vec<(String, Offset)>, StoreError> {
    if marked.is_empty() {
        return Ok(Vec::new());
    }
    // The pooled connection's cached statements: a takeover or a
    // recovery prepares nothing (it prepared five per notice batch).
    let st = Statements::cached(tx).await?;
    let notices: Vec<(String, String, Vec<u8>)> = marked
        .iter()
        .map(|session| {
            (
                session.id.private_channel(),
                format!("crash-notice-{}", session.crash_count),
                notice(session),
            )
        })
        .collect();
    let items: Vec<Item<'_>> = notices
        .iter()
        .map(|(channel, id, payload)| {
            (
                channel.as_str(),
                SYSTEM_SCOPE,
                id.as_str(),
                payload.as_slice(),
            )
        })
        .collect();
    let done = append_batch(tx, &st, now, &items, Framing::Caller).await?;
    Ok(notices
        .into_iter()
        .zip(done)
        .filter(|(_, a)| !a.duplicate)
        .map(|((channel, _, _), a)| (channel, a.offset))
        .collect())
}

impl PgStore {
    async fn mark_crashed_inner(
        &self,
        notice: Option<CrashNotice>,
    ) -> Result<CrashMarked, StoreError> {
        let node = self.node_id().to_owned();
        txn!(self, StoreError, |tx, now| {
            crash_sessions(&tx, now, &node, true, notice.as_ref()).await?
        })
    }
}

pub(super) async fn create_session(
    store: &PgStore,
    new: NewSession,
) -> Result<Session, SessionError> {
    let id = new.id.clone().unwrap_or_else(|| {
        SessionId(
            (0..16)
                .map(|_| format!("{:02x}", rand::random::<u8>()))
                .collect(),
        )
    });
    let (stored, node) = if new.connected {
        (SessionState::Active, Some(store.node_id()))
    } else {
        (SessionState::Created, None)
    };
    let now = store.now_millis();
    let rows = store
        .write1::<SessionError>(
            "INSERT INTO sessions(id, token_hash, state, created_at, updated_at, meta, node)
             VALUES ($1, $2, $3, $4, $4, $5, $6) ON CONFLICT (id) DO NOTHING RETURNING id",
            &[
                &id.as_str(),
                &new.token_hash,
                &stored.as_str(),
                &now,
                &new.meta,
                &node,
            ],
        )
        .await?;
    if rows.is_empty() {
        return Err(SessionError::AlreadyExists(id));
    }
    Ok(Session {
        id,
        token_hash: new.token_hash,
        state: SessionState::Created,
        created_at: now,
        updated_at: now,
        last_seen_at: None,
        recovered_at: None,
        crash_count: 0,
        meta: new.meta,
    })
}

pub(super) async fn session(store: &PgStore, id: &SessionId) -> Result<Session, SessionError> {
    let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1");
    let rows = store.read::<SessionError>(&sql, &[&id.as_str()]).await?;
    match rows.first() {
        Some(r) => session_from_row(r),
        None => Err(SessionError::NotFound(id.clone())),
    }
}

pub(super) async fn sessions(
    store: &PgStore,
    state: Option<SessionState>,
) -> Result<Vec<Session>, StoreError> {
    let rows = match state {
        Some(st) => {
            let sql =
                format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE state = $1 ORDER BY id");
            store.read::<StoreError>(&sql, &[&st.as_str()]).await?
        }
        None => {
            let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions ORDER BY id");
            store.read::<StoreError>(&sql, &[]).await?
        }
    };
    Ok(rows
        .iter()
        .filter_map(|r| session_from_row(r).ok())
        .collect())
}

pub(super) async fn count_by_state(store: &PgStore) -> Result<Vec<(String, u64)>, StoreError> {
    let rows = store
        .read::<StoreError>(
            "SELECT state, COUNT(*) FROM sessions GROUP BY state ORDER BY state COLLATE \"C\"",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
        .collect())
}

pub(super) async fn transition(
    store: &PgStore,
    id: &SessionId,
    to: SessionState,
) -> Result<Session, SessionError> {
    let node = (to == SessionState::Active).then(|| store.node_id().to_owned());
    txn!(store, SessionError, |tx, now| {
        let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1 FOR UPDATE");
        let Some(row) = tx.query_opt(&sql, &[&id.as_str()]).await.map_err(pg)? else {
            return Err(SessionError::NotFound(id.clone()));
        };
        let mut session = session_from_row(&row)?;
        if !session.state.can_transition_to(to) {
            return Err(SessionError::InvalidTransition {
                from: session.state,
                to,
            });
        }
        session.state = to;
        session.updated_at = now;
        match to {
            SessionState::Active => session.last_seen_at = Some(now),
            SessionState::Crashed => {
                session.recovered_at = Some(now);
                session.crash_count += 1;
            }
            _ => {}
        }
        tx.execute(
            "UPDATE sessions SET state = $2, updated_at = $3, last_seen_at = $4,
             recovered_at = $5, crash_count = $6, node = COALESCE($7, node) WHERE id = $1",
            &[
                &id.as_str(),
                &to.as_str(),
                &now,
                &session.last_seen_at,
                &session.recovered_at,
                &(session.crash_count as i32),
                &node,
            ],
        )
        .await
        .map_err(pg)?;
        session
    })
}

pub(super) async fn touch(store: &PgStore, id: &SessionId) -> Result<(), SessionError> {
    let now = store.now_millis();
    let rows = store
        .write1::<SessionError>(
            "UPDATE sessions SET last_seen_at = $2 WHERE id = $1 RETURNING id",
            &[&id.as_str(), &now],
        )
        .await?;
    if rows.is_empty() {
        return Err(SessionError::NotFound(id.clone()));
    }
    Ok(())
}

pub(super) async fn set_session_meta(
    store: &PgStore,
    id: &SessionId,
    meta: &str,
) -> Result<(), SessionError> {
    let now = store.now_millis();
    let rows = store
        .write1::<SessionError>(
            "UPDATE sessions SET meta = $2, updated_at = $3 WHERE id = $1 RETURNING id",
            &[&id.as_str(), &meta, &now],
        )
        .await?;
    if rows.is_empty() {
        return Err(SessionError::NotFound(id.clone()));
    }
    Ok(())
}

pub(super) async fn mark_crashed(store: &PgStore) -> Result<CrashMarked, StoreError> {
    store.mark_crashed_inner(None).await
}

pub(super) async fn mark_crashed_and_notify(
    store: &PgStore,
    notice: CrashNotice,
) -> Result<CrashMarked, StoreError> {
    store.mark_crashed_inner(Some(notice)).await
}

pub(super) async fn purge_idle_sessions(
    store: &PgStore,
    idle_for: Duration,
    limit: usize,
) -> Result<Vec<SessionId>, StoreError> {
    txn!(store, StoreError, |tx, now| {
        let cutoff = now.saturating_sub(ms(idle_for));
        let ids: Vec<String> = tx
            .query(
                "SELECT id FROM sessions WHERE state <> 'ACTIVE' AND updated_at < $1
                 ORDER BY updated_at, id LIMIT $2 FOR UPDATE SKIP LOCKED",
                &[&cutoff, &count(limit)],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let channels: Vec<String> = ids
            .iter()
            .map(|id| SessionId(id.clone()).private_channel())
            .collect();
        // The channel rows first: locking them (in name order, as
        // appends do) waits for appends in flight and keeps later ones
        // out until this commits, so no message outlives its channel's
        // counter.
        tx.execute(LOCK_CHANNELS, &[&channels]).await.map_err(pg)?;
        tx.execute("DELETE FROM channels WHERE name = ANY($1)", &[&channels])
            .await
            .map_err(pg)?;
        tx.execute("DELETE FROM messages WHERE channel = ANY($1)", &[&channels])
            .await
            .map_err(pg)?;
        tx.execute("DELETE FROM sessions WHERE id = ANY($1)", &[&ids])
            .await
            .map_err(pg)?;
        ids.into_iter().map(SessionId).collect()
    })
}

pub(super) async fn record_activity(
    store: &PgStore,
    id: &SessionId,
    kind: &str,
    detail: &str,
) -> Result<(), SessionError> {
    let limit = count(store.config().activity_limit);
    txn!(store, SessionError, |tx, now| {
        let inserted = tx
            .execute(
                "INSERT INTO activity(session_id, at, kind, detail)
                 SELECT id, $2, $3, $4 FROM sessions WHERE id = $1",
                &[&id.as_str(), &now, &kind, &detail],
            )
            .await
            .map_err(pg)?;
        if inserted == 0 {
            return Err(SessionError::NotFound(id.clone()));
        }
        tx.execute(
            "DELETE FROM activity WHERE session_id = $1 AND id <= (
               SELECT id FROM activity WHERE session_id = $1
               ORDER BY id DESC LIMIT 1 OFFSET $2)",
            &[&id.as_str(), &limit],
        )
        .await
        .map_err(pg)?;
    })
}

pub(super) async fn activity(
    store: &PgStore,
    id: &SessionId,
) -> Result<Vec<Activity>, SessionError> {
    let rows = store
        .read::<SessionError>(
            "SELECT at, kind, detail FROM activity WHERE session_id = $1 ORDER BY id",
            &[&id.as_str()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Activity {
            at: r.get(0),
            kind: r.get(1),
            detail: r.get(2),
        })
        .collect())
}
