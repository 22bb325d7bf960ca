//! Versioned, forward-only migrations, run by whichever node opens first.
//!
//! Every text key is `COLLATE "C"`: names sort bytewise, as in SQLite,
//! whatever the database's default collation. Timestamps are Unix
//! milliseconds from the store's clock (as in keel-session), not the
//! server's, so that tests can move time.

use tokio_postgres::Client;

use keel_store::StoreError;

use crate::error::pg;

/// The newest schema version this build writes.
pub(crate) const LATEST: u32 = 2;

/// The key of the advisory lock held while migrating: two nodes starting at
/// once migrate one after the other.
const MIGRATION_LOCK: i64 = 0x6b65_656c_0001;

const V1: &str = r#"
CREATE TABLE keel_meta (
    node  TEXT COLLATE "C" NOT NULL,
    key   TEXT COLLATE "C" NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (node, key)
);
CREATE TABLE sessions (
    id           TEXT COLLATE "C" PRIMARY KEY,
    token_hash   BYTEA NOT NULL,
    state        TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    last_seen_at BIGINT,
    recovered_at BIGINT,
    crash_count  INTEGER NOT NULL DEFAULT 0,
    meta         TEXT NOT NULL DEFAULT '',
    node         TEXT COLLATE "C"
);
CREATE INDEX sessions_state ON sessions (state, node);
CREATE INDEX sessions_idle ON sessions (updated_at) WHERE state <> 'ACTIVE';
CREATE TABLE activity (
    id         BIGSERIAL PRIMARY KEY,
    session_id TEXT COLLATE "C" NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    at         BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    detail     TEXT NOT NULL
);
CREATE INDEX activity_session ON activity (session_id, id);
CREATE TABLE channels (
    name        TEXT COLLATE "C" PRIMARY KEY,
    next_offset BIGINT NOT NULL
);
CREATE TABLE messages (
    channel   TEXT COLLATE "C" NOT NULL,
    seq       BIGINT NOT NULL,
    publisher TEXT COLLATE "C" NOT NULL,
    msg_id    TEXT COLLATE "C" NOT NULL,
    at        BIGINT NOT NULL,
    payload   BYTEA NOT NULL,
    PRIMARY KEY (channel, seq),
    UNIQUE (channel, msg_id, publisher)
);
CREATE TABLE subscriptions (
    session_id TEXT COLLATE "C" NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    channel    TEXT COLLATE "C" NOT NULL,
    cursor     BIGINT NOT NULL,
    PRIMARY KEY (session_id, channel)
);
CREATE TABLE outbox (
    id              BIGSERIAL PRIMARY KEY,
    session_id      TEXT COLLATE "C" REFERENCES sessions (id) ON DELETE SET NULL,
    scope           TEXT COLLATE "C" NOT NULL,
    idem_key        TEXT COLLATE "C" NOT NULL,
    payload         BYTEA NOT NULL,
    state           TEXT NOT NULL,
    claimed_by      TEXT,
    claim_until     BIGINT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error      TEXT,
    created_at      BIGINT NOT NULL,
    sent_at         BIGINT,
    UNIQUE (scope, idem_key)
);
CREATE INDEX outbox_open ON outbox (id) WHERE state IN ('PENDING', 'CLAIMED');
CREATE INDEX outbox_state ON outbox (state, id);
CREATE INDEX outbox_session_open ON outbox (session_id) WHERE state IN ('PENDING', 'CLAIMED');
CREATE TABLE transitions (
    id         BIGSERIAL PRIMARY KEY,
    at         BIGINT NOT NULL,
    from_state TEXT NOT NULL,
    to_state   TEXT NOT NULL,
    reason     TEXT NOT NULL
);
"#;

/// Version 2: node leases (cluster mode). A node renews its row while it
/// lives; a survivor that deletes an expired row recovers that node's
/// sessions in the same transaction.
const V2: &str = r#"
CREATE TABLE keel_nodes (
    id           TEXT COLLATE "C" PRIMARY KEY,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);
CREATE INDEX sessions_node ON sessions (node) WHERE state = 'ACTIVE';
"#;

/// Each version's DDL, in order: migration `i` takes the schema from
/// version `i` to `i + 1`.
pub(crate) const MIGRATIONS: &[&str] = &[V1, V2];

/// What migrating found and did.
pub(crate) struct Migrated {
    /// The version found (0: an empty database).
    pub(crate) from: u32,
}

/// Brings the schema to [`LATEST`] in one transaction under an advisory
/// lock. A version newer than this build is refused before anything runs.
pub(crate) async fn migrate(client: &mut Client) -> Result<Migrated, MigrateError> {
    let tx = client.transaction().await.map_err(pg)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS keel_schema (
             version INTEGER NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(pg)?;
    let found: Option<i32> = tx
        .query_one("SELECT MAX(version) FROM keel_schema", &[])
        .await
        .map_err(pg)?
        .get(0);
    let found = found.unwrap_or(0) as u32;
    if found > LATEST {
        return Err(MigrateError::Newer { found });
    }
    for (i, ddl) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.batch_execute(ddl).await.map_err(pg)?;
        let version = i as i32 + 1;
        tx.execute("INSERT INTO keel_schema(version) VALUES ($1)", &[&version])
            .await
            .map_err(pg)?;
    }
    tx.commit().await.map_err(pg)?;
    Ok(Migrated { from: found })
}

/// Why migrating failed.
pub(crate) enum MigrateError {
    /// The database was migrated by a newer build.
    Newer { found: u32 },
    /// The server failed.
    Store(StoreError),
}

impl From<StoreError> for MigrateError {
    fn from(e: StoreError) -> Self {
        MigrateError::Store(e)
    }
}
