//! Sessions, their state machine, and the bounded per-session activity log.

use rand::Rng;
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::error::Db;
use crate::error::{SessionError, StoreError};
use crate::messages::append_in;
use crate::store::Store;

pub(crate) use keel_store::{
    Activity, CrashMarked, CrashNotice, CrashedSession, NewSession, Session, SessionId,
    SessionState,
};

const SESSION_COLUMNS: &str = "id, token_hash, state, created_at, updated_at, last_seen_at, \
                               recovered_at, crash_count, meta";

/// Random lowercase hex of `bytes` random bytes.
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

fn session_from_row(row: &Row<'_>) -> rusqlite::Result<Result<Session, SessionError>> {
    let id = SessionId(row.get(0)?);
    let raw: String = row.get(2)?;
    let Ok(state) = raw.parse() else {
        return Ok(Err(SessionError::UnknownState { id, state: raw }));
    };
    Ok(Ok(Session {
        id,
        token_hash: row.get(1)?,
        state,
        created_at: row.get(3)?,
        updated_at: row.get(4)?,
        last_seen_at: row.get(5)?,
        recovered_at: row.get(6)?,
        crash_count: row.get(7)?,
        meta: row.get(8)?,
    }))
}

pub(crate) fn load_session(conn: &Connection, id: &SessionId) -> Result<Session, SessionError> {
    let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1");
    conn.prepare_cached(&sql)
        .db()?
        .query_row([id.as_str()], session_from_row)
        .optional()
        .db()?
        .ok_or_else(|| SessionError::NotFound(id.clone()))?
}

impl Store {
    /// [`SessionStore::create_session`] on SQLite: the contract is documented there.
    pub async fn create_session(&self, new: NewSession) -> Result<Session, SessionError> {
        let id = new.id.clone().unwrap_or_else(|| SessionId(random_hex(16)));
        let stored = if new.connected {
            SessionState::Active
        } else {
            SessionState::Created
        };
        self.write(move |ctx| {
            let inserted = ctx
                .conn
                .prepare_cached(
                    "INSERT INTO sessions(id, token_hash, state, created_at, updated_at, meta)
                     VALUES(?1, ?2, ?5, ?3, ?3, ?4) ON CONFLICT(id) DO NOTHING",
                )
                .db()?
                .execute(params![
                    id.as_str(),
                    new.token_hash,
                    ctx.now,
                    new.meta,
                    stored.as_str()
                ])
                .db()?;
            if inserted == 0 {
                return Err(SessionError::AlreadyExists(id.clone()));
            }
            Ok(Session {
                id: id.clone(),
                token_hash: new.token_hash.clone(),
                state: SessionState::Created,
                created_at: ctx.now,
                updated_at: ctx.now,
                last_seen_at: None,
                recovered_at: None,
                crash_count: 0,
                meta: new.meta.clone(),
            })
        })
        .await
    }

    /// [`SessionStore::session`] on SQLite: the contract is documented there.
    pub async fn session(&self, id: &SessionId) -> Result<Session, SessionError> {
        let id = id.clone();
        self.read(move |conn| load_session(conn, &id)).await
    }

    /// [`SessionStore::sessions`] on SQLite: the contract is documented there.
    pub async fn sessions(&self, state: Option<SessionState>) -> Result<Vec<Session>, StoreError> {
        self.read(move |conn| {
            let (sql, arg) = match state {
                Some(st) => (
                    format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE state = ?1 ORDER BY id"),
                    Some(st.as_str()),
                ),
                None => (
                    format!("SELECT {SESSION_COLUMNS} FROM sessions ORDER BY id"),
                    None,
                ),
            };
            let mut stmt = conn.prepare_cached(&sql).db()?;
            let rows = match arg {
                Some(a) => stmt
                    .query_map([a], session_from_row)
                    .db()?
                    .collect::<Result<Vec<_>, _>>()
                    .db()?,
                None => stmt
                    .query_map([], session_from_row)
                    .db()?
                    .collect::<Result<Vec<_>, _>>()
                    .db()?,
            };
            Ok(rows.into_iter().filter_map(Result::ok).collect())
        })
        .await
    }

    /// [`SessionStore::count_by_state`] on SQLite: the contract is documented there.
    pub async fn count_by_state(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT state, COUNT(*) FROM sessions GROUP BY state ORDER BY state",
                )
                .db()?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
                })
                .db()?
                .collect::<Result<Vec<_>, _>>()
                .db()?;
            Ok(rows)
        })
        .await
    }

    /// [`SessionStore::transition`] on SQLite: the contract is documented there.
    pub async fn transition(
        &self,
        id: &SessionId,
        to: SessionState,
    ) -> Result<Session, SessionError> {
        let id = id.clone();
        self.write(move |ctx| {
            let mut session = load_session(ctx.conn, &id)?;
            if !session.state.can_transition_to(to) {
                return Err(SessionError::InvalidTransition {
                    from: session.state,
                    to,
                });
            }
            session.state = to;
            session.updated_at = ctx.now;
            match to {
                SessionState::Active => session.last_seen_at = Some(ctx.now),
                SessionState::Crashed => {
                    session.recovered_at = Some(ctx.now);
                    session.crash_count += 1;
                }
                _ => {}
            }
            ctx.conn
                .prepare_cached(
                    "UPDATE sessions SET state = ?2, updated_at = ?3, last_seen_at = ?4,
                     recovered_at = ?5, crash_count = ?6 WHERE id = ?1",
                )
                .db()?
                .execute(params![
                    id.as_str(),
                    to.as_str(),
                    ctx.now,
                    session.last_seen_at,
                    session.recovered_at,
                    session.crash_count
                ])
                .db()?;
            Ok(session)
        })
        .await
    }

    /// [`SessionStore::touch`] on SQLite: the contract is documented there.
    pub async fn touch(&self, id: &SessionId) -> Result<(), SessionError> {
        let id = id.clone();
        self.write(move |ctx| {
            let n = ctx
                .conn
                .prepare_cached("UPDATE sessions SET last_seen_at = ?2 WHERE id = ?1")
                .db()?
                .execute(params![id.as_str(), ctx.now])
                .db()?;
            if n == 0 {
                return Err(SessionError::NotFound(id.clone()));
            }
            Ok(())
        })
        .await
    }

    /// [`SessionStore::set_session_meta`] on SQLite: the contract is documented there.
    pub async fn set_session_meta(&self, id: &SessionId, meta: &str) -> Result<(), SessionError> {
        let (id, meta) = (id.clone(), meta.to_owned());
        self.write(move |ctx| {
            let n = ctx
                .conn
                .prepare_cached("UPDATE sessions SET meta = ?2, updated_at = ?3 WHERE id = ?1")
                .db()?
                .execute(params![id.as_str(), meta, ctx.now])
                .db()?;
            if n == 0 {
                return Err(SessionError::NotFound(id.clone()));
            }
            Ok(())
        })
        .await
    }

    /// [`SessionStore::mark_crashed`] on SQLite: the contract is documented there.
    pub async fn mark_crashed(&self) -> Result<CrashMarked, StoreError> {
        self.mark_crashed_inner(None).await
    }

    /// [`SessionStore::mark_crashed_and_notify`] on SQLite: the contract is documented there.
    pub async fn mark_crashed_and_notify(
        &self,
        notice: CrashNotice,
    ) -> Result<CrashMarked, StoreError> {
        self.mark_crashed_inner(Some(notice)).await
    }

    async fn mark_crashed_inner(
        &self,
        notice: Option<CrashNotice>,
    ) -> Result<CrashMarked, StoreError> {
        self.write(move |ctx| {
            let known: Vec<String> = SessionState::ALL
                .iter()
                .map(|s| format!("'{}'", s.as_str()))
                .collect();
            let unknown_sql = format!(
                "SELECT id, state FROM sessions WHERE state NOT IN ({})",
                known.join(",")
            );
            let unknown = ctx
                .conn
                .prepare_cached(&unknown_sql)
                .db()?
                .query_map([], |r| Ok((SessionId(r.get(0)?), r.get::<_, String>(1)?)))
                .db()?
                .collect::<Result<Vec<_>, _>>()
                .db()?;
            let mut marked: Vec<CrashedSession> = Vec::new();
            {
                let previous = SessionState::Active.as_str();
                let mut stmt = ctx
                    .conn
                    .prepare_cached(
                        "UPDATE sessions SET state = 'CRASHED', recovered_at = ?1, updated_at = ?1,
                     crash_count = crash_count + 1
                     WHERE state = ?2 RETURNING id, crash_count",
                    )
                    .db()?;
                let mut rows = stmt.query(params![ctx.now, previous]).db()?;
                while let Some(row) = rows.next().db()? {
                    marked.push(CrashedSession {
                        id: SessionId(row.get(0).db()?),
                        previous_state: previous.to_owned(),
                        crash_count: row.get(1).db()?,
                        recovered_at: ctx.now,
                    });
                }
            }
            let crashed = marked.iter().map(|c| c.id.clone()).collect();
            for (id, state) in &unknown {
                let crash_count: u32 = ctx
                    .conn
                    .prepare_cached(
                        "UPDATE sessions SET state = 'CRASHED', recovered_at = ?2, updated_at = ?2,
                         crash_count = crash_count + 1 WHERE id = ?1 RETURNING crash_count",
                    )
                    .db()?
                    .query_row(params![id.as_str(), ctx.now], |r| r.get(0))
                    .db()?;
                marked.push(CrashedSession {
                    id: id.clone(),
                    previous_state: state.clone(),
                    crash_count,
                    recovered_at: ctx.now,
                });
            }
            let mut notified = 0;
            if let Some(notice) = &notice {
                for session in &marked {
                    let payload = notice(session);
                    let msg_id = format!("crash-notice-{}", session.crash_count);
                    let appended = append_in(
                        ctx,
                        &session.id.private_channel(),
                        crate::messages::SYSTEM_SCOPE,
                        &msg_id,
                        &payload,
                    )?;
                    if !appended.duplicate {
                        notified += 1;
                    }
                }
            }
            Ok(CrashMarked {
                crashed,
                unknown: unknown.clone(),
                notified,
            })
        })
        .await
    }

    /// [`SessionStore::purge_idle_sessions`] on SQLite: the contract is documented there.
    pub async fn purge_idle_sessions(
        &self,
        idle_for: std::time::Duration,
        limit: usize,
    ) -> Result<Vec<SessionId>, StoreError> {
        self.write(move |ctx| {
            let cutoff = ctx.now.saturating_sub(crate::clock::millis(idle_for));
            let ids: Vec<SessionId> = ctx
                .conn
                .prepare_cached(
                    "SELECT id FROM sessions WHERE state <> 'ACTIVE' AND updated_at < ?1
                     ORDER BY updated_at LIMIT ?2",
                )
                .db()?
                .query_map(params![cutoff, limit as i64], |r| Ok(SessionId(r.get(0)?)))
                .db()?
                .collect::<Result<_, _>>()
                .db()?;
            for id in &ids {
                let channel = id.private_channel();
                ctx.conn
                    .prepare_cached("DELETE FROM messages WHERE channel = ?1")
                    .db()?
                    .execute([&channel])
                    .db()?;
                ctx.conn
                    .prepare_cached("DELETE FROM channels WHERE name = ?1")
                    .db()?
                    .execute([&channel])
                    .db()?;
                ctx.offsets.forget(&channel);
                ctx.conn
                    .prepare_cached("DELETE FROM sessions WHERE id = ?1")
                    .db()?
                    .execute([id.as_str()])
                    .db()?;
            }
            Ok(ids)
        })
        .await
    }

    /// [`SessionStore::record_activity`] on SQLite: the contract is documented there.
    pub async fn record_activity(
        &self,
        id: &SessionId,
        kind: &str,
        detail: &str,
    ) -> Result<(), SessionError> {
        let (id, kind, detail) = (id.clone(), kind.to_owned(), detail.to_owned());
        self.write(move |ctx| {
            let exists = ctx
                .conn
                .prepare_cached("SELECT 1 FROM sessions WHERE id = ?1")
                .db()?
                .exists([id.as_str()])
                .db()?;
            if !exists {
                return Err(SessionError::NotFound(id.clone()));
            }
            ctx.conn
                .prepare_cached(
                    "INSERT INTO activity(session_id, at, kind, detail) VALUES(?1, ?2, ?3, ?4)",
                )
                .db()?
                .execute(params![id.as_str(), ctx.now, kind, detail])
                .db()?;
            ctx.conn
                .prepare_cached(
                    "DELETE FROM activity WHERE session_id = ?1 AND id <= (
                       SELECT id FROM activity WHERE session_id = ?1
                       ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                )
                .db()?
                .execute(params![id.as_str(), ctx.activity_limit as i64])
                .db()?;
            Ok(())
        })
        .await
    }

    /// [`SessionStore::activity`] on SQLite: the contract is documented there.
    pub async fn activity(&self, id: &SessionId) -> Result<Vec<Activity>, SessionError> {
        let id = id.clone();
        self.read(move |conn| {
            let rows = conn
                .prepare_cached(
                    "SELECT at, kind, detail FROM activity WHERE session_id = ?1 ORDER BY id",
                )
                .db()?
                .query_map([id.as_str()], |r| {
                    Ok(Activity {
                        at: r.get(0)?,
                        kind: r.get(1)?,
                        detail: r.get(2)?,
                    })
                })
                .db()?
                .collect::<Result<Vec<_>, _>>()
                .db()?;
            Ok(rows)
        })
        .await
    }
}
