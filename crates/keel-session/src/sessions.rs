//! Sessions, their state machine, and the bounded per-session activity log.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::clock::UnixMillis;
use crate::error::{SessionError, StoreError};
use crate::messages::append_in;
use crate::store::Store;

/// A session's id: opaque text, random unless the creator chose one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub String);

impl SessionId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The private channel only this session may read: `session:<id>`.
    pub fn private_channel(&self) -> String {
        format!("session:{}", self.0)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for SessionId {
    fn from(s: &str) -> Self {
        SessionId(s.to_owned())
    }
}

/// The lifecycle state of a session (docs/protocol.md, "Sessions").
///
/// ```text
/// CREATED -> ACTIVE <-> DETACHED
/// ACTIVE|DETACHED -> PAUSED -> ACTIVE
/// ACTIVE|DETACHED|PAUSED -> CRASHED
/// CRASHED -> ACTIVE
/// any but CLOSED -> CLOSED
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SessionState {
    /// Created, never connected.
    Created,
    /// A client is connected.
    Active,
    /// The client is gone; the session can be resumed.
    Detached,
    /// Paused by the user or the service.
    Paused,
    /// Found running after a crash, or its process died; resumable.
    Crashed,
    /// Terminal.
    Closed,
}

impl SessionState {
    /// Every state, in declaration order.
    pub const ALL: [SessionState; 6] = [
        SessionState::Created,
        SessionState::Active,
        SessionState::Detached,
        SessionState::Paused,
        SessionState::Crashed,
        SessionState::Closed,
    ];

    /// The stored spelling, e.g. `"ACTIVE"`.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Created => "CREATED",
            SessionState::Active => "ACTIVE",
            SessionState::Detached => "DETACHED",
            SessionState::Paused => "PAUSED",
            SessionState::Crashed => "CRASHED",
            SessionState::Closed => "CLOSED",
        }
    }

    /// Whether the state machine allows moving from `self` to `to`.
    pub fn can_transition_to(self, to: SessionState) -> bool {
        use SessionState::*;
        matches!(
            (self, to),
            (Created, Active)
                | (Active, Detached)
                | (Detached, Active)
                | (Active | Detached, Paused)
                | (Paused, Active)
                | (Active | Detached | Paused, Crashed)
                | (Crashed, Active)
                | (Created | Active | Detached | Paused | Crashed, Closed)
        )
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SessionState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SessionState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| s.to_owned())
    }
}

/// A stored session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Its id.
    pub id: SessionId,
    /// Hash of its bearer token (the store never sees the token itself).
    pub token_hash: Vec<u8>,
    /// Current state.
    pub state: SessionState,
    /// When it was created.
    pub created_at: UnixMillis,
    /// When its row last changed.
    pub updated_at: UnixMillis,
    /// When its client was last seen, if ever.
    pub last_seen_at: Option<UnixMillis>,
    /// When it was last marked CRASHED.
    pub recovered_at: Option<UnixMillis>,
    /// How many times it was marked CRASHED.
    pub crash_count: u32,
    /// Opaque application data.
    pub meta: String,
}

/// What [`Store::create_session`] needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewSession {
    /// The id to use; a random 128-bit hex id when `None`.
    pub id: Option<SessionId>,
    /// Hash of the session's bearer token.
    pub token_hash: Vec<u8>,
    /// Opaque application data.
    pub meta: String,
    /// Its first connection is already open: store it ACTIVE (the
    /// CREATED -> ACTIVE transition in the same write). The returned
    /// session's state is still CREATED: the state it was created in.
    pub connected: bool,
}

/// One entry of a session's activity log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    /// When it happened.
    pub at: UnixMillis,
    /// A short kind, e.g. `"command"`.
    pub kind: String,
    /// Free text.
    pub detail: String,
}

/// What [`Store::mark_crashed`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CrashMarked {
    /// Sessions that were ACTIVE and are now CRASHED.
    pub crashed: Vec<SessionId>,
    /// Sessions whose stored state was not a known state, with that value; they
    /// are now CRASHED too.
    pub unknown: Vec<(SessionId, String)>,
    /// How many crash notices were appended (zero for [`Store::mark_crashed`]).
    pub notified: u64,
}

/// One session that crash recovery marked CRASHED, as a notice builder sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashedSession {
    /// The session.
    pub id: SessionId,
    /// Its stored state before: `ACTIVE`, or the unknown value found.
    pub previous_state: String,
    /// Its crash count after this crash (1 for the first).
    pub crash_count: u32,
    /// The `recovered_at` time written.
    pub recovered_at: UnixMillis,
}

/// Builds the payload of the notice appended to a crashed session's private
/// channel (see [`Store::mark_crashed_and_notify`]).
pub type CrashNotice = std::sync::Arc<dyn Fn(&CrashedSession) -> Vec<u8> + Send + Sync>;

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
    conn.prepare_cached(&sql)?
        .query_row([id.as_str()], session_from_row)
        .optional()?
        .ok_or_else(|| SessionError::NotFound(id.clone()))?
}

impl Store {
    /// Creates a session in state CREATED (ACTIVE with [`NewSession::connected`]).
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
                )?
                .execute(params![
                    id.as_str(),
                    new.token_hash,
                    ctx.now,
                    new.meta,
                    stored.as_str()
                ])?;
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

    /// Reads one session.
    pub async fn session(&self, id: &SessionId) -> Result<Session, SessionError> {
        let id = id.clone();
        self.read(move |conn| load_session(conn, &id)).await
    }

    /// Lists sessions, optionally only those in `state`, ordered by id.
    ///
    /// Rows with an unknown stored state are skipped here; [`Store::mark_crashed`]
    /// and [`Store::count_by_state`] report them.
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
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = match arg {
                Some(a) => stmt
                    .query_map([a], session_from_row)?
                    .collect::<Result<Vec<_>, _>>()?,
                None => stmt
                    .query_map([], session_from_row)?
                    .collect::<Result<Vec<_>, _>>()?,
            };
            Ok(rows.into_iter().filter_map(Result::ok).collect())
        })
        .await
    }

    /// Counts sessions per stored state, unknown states included verbatim.
    pub async fn count_by_state(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT state, COUNT(*) FROM sessions GROUP BY state ORDER BY state",
            )?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    /// Moves a session to `to` if the state machine allows it; otherwise returns
    /// [`SessionError::InvalidTransition`] and writes nothing.
    ///
    /// Moving to ACTIVE also records `last_seen_at`; moving to CRASHED sets
    /// `recovered_at` and increments `crash_count`.
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
                )?
                .execute(params![
                    id.as_str(),
                    to.as_str(),
                    ctx.now,
                    session.last_seen_at,
                    session.recovered_at,
                    session.crash_count
                ])?;
            Ok(session)
        })
        .await
    }

    /// Records that the session's client was seen now.
    pub async fn touch(&self, id: &SessionId) -> Result<(), SessionError> {
        let id = id.clone();
        self.write(move |ctx| {
            let n = ctx
                .conn
                .prepare_cached("UPDATE sessions SET last_seen_at = ?2 WHERE id = ?1")?
                .execute(params![id.as_str(), ctx.now])?;
            if n == 0 {
                return Err(SessionError::NotFound(id.clone()));
            }
            Ok(())
        })
        .await
    }

    /// Replaces a session's opaque meta text.
    pub async fn set_session_meta(&self, id: &SessionId, meta: &str) -> Result<(), SessionError> {
        let (id, meta) = (id.clone(), meta.to_owned());
        self.write(move |ctx| {
            let n = ctx
                .conn
                .prepare_cached("UPDATE sessions SET meta = ?2, updated_at = ?3 WHERE id = ?1")?
                .execute(params![id.as_str(), meta, ctx.now])?;
            if n == 0 {
                return Err(SessionError::NotFound(id.clone()));
            }
            Ok(())
        })
        .await
    }

    /// Crash recovery's scan: every ACTIVE session (connected when the
    /// process died) and every session whose stored state is unknown becomes
    /// CRASHED with `recovered_at = now` and `crash_count + 1`, in one
    /// transaction. DETACHED, PAUSED, CREATED and CLOSED sessions were not
    /// connected and are left as they are (no false-positive recovery).
    /// `crashed` lists the former ACTIVE sessions.
    ///
    /// Running it again right away changes nothing.
    pub async fn mark_crashed(&self) -> Result<CrashMarked, StoreError> {
        self.mark_crashed_inner(None).await
    }

    /// [`Store::mark_crashed`], and in the same transaction appends the
    /// payload `notice` builds to each crashed session's private channel
    /// (`session:<id>`), with message id `crash-notice-<crash_count>`.
    ///
    /// Because marking and notices commit together, a crash during recovery
    /// leaves either both or neither; and because the message id names the
    /// crash count, a notice is never appended twice for the same crash.
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
                .prepare_cached(&unknown_sql)?
                .query_map([], |r| Ok((SessionId(r.get(0)?), r.get::<_, String>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            let mut marked: Vec<CrashedSession> = Vec::new();
            {
                let previous = SessionState::Active.as_str();
                let mut stmt = ctx.conn.prepare_cached(
                    "UPDATE sessions SET state = 'CRASHED', recovered_at = ?1, updated_at = ?1,
                     crash_count = crash_count + 1
                     WHERE state = ?2 RETURNING id, crash_count",
                )?;
                let mut rows = stmt.query(params![ctx.now, previous])?;
                while let Some(row) = rows.next()? {
                    marked.push(CrashedSession {
                        id: SessionId(row.get(0)?),
                        previous_state: previous.to_owned(),
                        crash_count: row.get(1)?,
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
                    )?
                    .query_row(params![id.as_str(), ctx.now], |r| r.get(0))?;
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

    /// Deletes up to `limit` sessions that have had no connection for
    /// `idle_for` (any state but ACTIVE, last changed before then), with
    /// their subscriptions, activity and private channel; returns their
    /// ids. Their outbox items stay (their session becomes none). A session
    /// deleted this way is gone: its token no longer opens anything.
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
                )?
                .query_map(params![cutoff, limit as i64], |r| Ok(SessionId(r.get(0)?)))?
                .collect::<Result<_, _>>()?;
            for id in &ids {
                let channel = id.private_channel();
                ctx.conn
                    .prepare_cached("DELETE FROM messages WHERE channel = ?1")?
                    .execute([&channel])?;
                ctx.conn
                    .prepare_cached("DELETE FROM channels WHERE name = ?1")?
                    .execute([&channel])?;
                ctx.offsets.forget(&channel);
                ctx.conn
                    .prepare_cached("DELETE FROM sessions WHERE id = ?1")?
                    .execute([id.as_str()])?;
            }
            Ok(ids)
        })
        .await
    }

    /// Appends to a session's activity log, keeping only the newest
    /// [`Config::activity_limit`](crate::Config::activity_limit) entries.
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
                .prepare_cached("SELECT 1 FROM sessions WHERE id = ?1")?
                .exists([id.as_str()])?;
            if !exists {
                return Err(SessionError::NotFound(id.clone()));
            }
            ctx.conn
                .prepare_cached(
                    "INSERT INTO activity(session_id, at, kind, detail) VALUES(?1, ?2, ?3, ?4)",
                )?
                .execute(params![id.as_str(), ctx.now, kind, detail])?;
            ctx.conn
                .prepare_cached(
                    "DELETE FROM activity WHERE session_id = ?1 AND id <= (
                       SELECT id FROM activity WHERE session_id = ?1
                       ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                )?
                .execute(params![id.as_str(), ctx.activity_limit as i64])?;
            Ok(())
        })
        .await
    }

    /// A session's activity log, oldest first.
    pub async fn activity(&self, id: &SessionId) -> Result<Vec<Activity>, SessionError> {
        let id = id.clone();
        self.read(move |conn| {
            let rows = conn
                .prepare_cached(
                    "SELECT at, kind, detail FROM activity WHERE session_id = ?1 ORDER BY id",
                )?
                .query_map([id.as_str()], |r| {
                    Ok(Activity {
                        at: r.get(0)?,
                        kind: r.get(1)?,
                        detail: r.get(2)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }
}
