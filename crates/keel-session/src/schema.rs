//! Schema migrations, applied forward only and tracked in `PRAGMA user_version`.

use rusqlite::Connection;

use crate::error::StoreError;

/// Each entry migrates from version `index` to `index + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the initial schema (design §2).
    r#"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE sessions (
        id           TEXT PRIMARY KEY,
        token_hash   BLOB NOT NULL,
        state        TEXT NOT NULL,
        created_at   INTEGER NOT NULL,
        updated_at   INTEGER NOT NULL,
        last_seen_at INTEGER,
        recovered_at INTEGER,
        crash_count  INTEGER NOT NULL DEFAULT 0,
        meta         TEXT NOT NULL DEFAULT ''
    );
    -- (no index on state: crash recovery updates every live row at once, and
    -- maintaining an index on the column it rewrites costs more than a scan)

    CREATE TABLE activity (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        at         INTEGER NOT NULL,
        kind       TEXT NOT NULL,
        detail     TEXT NOT NULL
    );
    CREATE INDEX activity_by_session ON activity(session_id, id);

    CREATE TABLE channels (
        name        TEXT PRIMARY KEY,
        next_offset INTEGER NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE messages (
        channel TEXT NOT NULL,
        offset  INTEGER NOT NULL,
        msg_id  TEXT NOT NULL,
        at      INTEGER NOT NULL,
        payload BLOB NOT NULL,
        PRIMARY KEY (channel, offset),
        UNIQUE (channel, msg_id)
    ) WITHOUT ROWID;

    CREATE TABLE subscriptions (
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        channel    TEXT NOT NULL,
        cursor     INTEGER NOT NULL,
        PRIMARY KEY (session_id, channel)
    ) WITHOUT ROWID;

    CREATE TABLE outbox (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id      TEXT REFERENCES sessions(id) ON DELETE SET NULL,
        idem_key        TEXT NOT NULL UNIQUE,
        payload         BLOB NOT NULL,
        state           TEXT NOT NULL,
        claimed_by      TEXT,
        claim_until     INTEGER,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,
        last_error      TEXT,
        created_at      INTEGER NOT NULL,
        sent_at         INTEGER
    );
    CREATE INDEX outbox_due ON outbox(state, next_attempt_at);

    CREATE TABLE transitions (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        at         INTEGER NOT NULL,
        from_state TEXT NOT NULL,
        to_state   TEXT NOT NULL,
        reason     TEXT NOT NULL
    );
    "#,
    // 1 -> 2: counting a session's pending sends (its outbox quota) without
    // a scan.
    r#"
    CREATE INDEX outbox_by_session ON outbox(session_id, state);
    "#,
];

/// The schema version this build writes.
pub(crate) const LATEST: u32 = MIGRATIONS.len() as u32;

/// Reads the schema version of an open database.
pub(crate) fn version(conn: &Connection) -> Result<u32, StoreError> {
    Ok(conn.query_row("PRAGMA user_version", [], |r| r.get::<_, u32>(0))?)
}

/// Applies every migration after `from`, each in its own transaction.
pub(crate) fn migrate(conn: &mut Connection, from: u32) -> Result<(), StoreError> {
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as u32)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "applied schema migration");
    }
    Ok(())
}
