//! Schema migrations, applied forward only and tracked in `PRAGMA user_version`.

use rusqlite::Connection;

use crate::error::Db;
use crate::error::StoreError;

/// Each entry migrates from version `index` to `index + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the initial schema (docs/protocol.md, "Sessions").
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
    // 2 -> 3: idempotency scoped to who wrote (trust boundaries). Message
    // ids are unique per (channel, id, publisher), outbox keys per (scope,
    // key) with the scope fixed at enqueue (a session, a user, the spool);
    // before, one session's id could answer another's. Messages written
    // before keep publisher '' and, when there are any, `ids_before_scopes`
    // in meta makes every publisher's lookup consult them too; outbox items
    // written before keep scope '' (their upstream key stays the bare key)
    // and are found again by their session: a retry across the upgrade is
    // still a duplicate. The outbox's AUTOINCREMENT high-water mark is
    // carried over: ids are never reused.
    r#"
    CREATE TABLE messages_v3 (
        channel   TEXT NOT NULL,
        offset    INTEGER NOT NULL,
        publisher TEXT NOT NULL,
        msg_id    TEXT NOT NULL,
        at        INTEGER NOT NULL,
        payload   BLOB NOT NULL,
        PRIMARY KEY (channel, offset),
        UNIQUE (channel, msg_id, publisher)
    ) WITHOUT ROWID;
    INSERT INTO messages_v3(channel, offset, publisher, msg_id, at, payload)
        SELECT channel, offset, '', msg_id, at, payload FROM messages;
    DROP TABLE messages;
    ALTER TABLE messages_v3 RENAME TO messages;
    INSERT INTO meta(key, value)
        SELECT 'ids_before_scopes', '1' WHERE EXISTS (SELECT 1 FROM messages);

    CREATE TEMP TABLE outbox_seq AS SELECT seq FROM sqlite_sequence WHERE name = 'outbox';
    CREATE TABLE outbox_v3 (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id      TEXT REFERENCES sessions(id) ON DELETE SET NULL,
        idem_key        TEXT NOT NULL,
        payload         BLOB NOT NULL,
        state           TEXT NOT NULL,
        claimed_by      TEXT,
        claim_until     INTEGER,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,
        last_error      TEXT,
        created_at      INTEGER NOT NULL,
        sent_at         INTEGER,
        scope           TEXT NOT NULL,
        UNIQUE (scope, idem_key)
    );
    INSERT INTO outbox_v3(id, session_id, idem_key, payload, state, claimed_by, claim_until,
                          attempts, next_attempt_at, last_error, created_at, sent_at, scope)
        SELECT id, session_id, idem_key, payload, state, claimed_by, claim_until,
               attempts, next_attempt_at, last_error, created_at, sent_at, '' FROM outbox;
    DROP TABLE outbox;
    ALTER TABLE outbox_v3 RENAME TO outbox;
    DELETE FROM sqlite_sequence WHERE name = 'outbox';
    INSERT INTO sqlite_sequence(name, seq)
        SELECT 'outbox', max(coalesce((SELECT seq FROM temp.outbox_seq), 0),
                             coalesce((SELECT max(id) FROM outbox), 0));
    DROP TABLE temp.outbox_seq;
    CREATE INDEX outbox_due ON outbox(state, next_attempt_at);
    CREATE INDEX outbox_by_session ON outbox(session_id, state);
    "#,
    // 3 -> 4: large payloads out of the message b-tree. `messages` is a
    // WITHOUT ROWID table: its rows are index cells, and SQLite reads a
    // cell that overflows its page whole to compare its key, so every
    // seek past a 1 MiB message read 1 MiB (and a page split copied it
    // into the parent). Payloads over `INLINE_PAYLOAD_BYTES` now live in
    // `message_payloads` (a rowid table, whose seeks never read a row's
    // content), found by `payload_id`; small ones stay inline. A trigger
    // deletes a message's payload row with the message.
    r#"
    CREATE TABLE message_payloads (
        id      INTEGER PRIMARY KEY,
        payload BLOB
    );
    INSERT INTO message_payloads(id, payload)
        SELECT row_number() OVER (ORDER BY channel, offset), payload
        FROM messages WHERE length(payload) > 512;
    CREATE TABLE messages_v4 (
        channel    TEXT NOT NULL,
        offset     INTEGER NOT NULL,
        publisher  TEXT NOT NULL,
        msg_id     TEXT NOT NULL,
        at         INTEGER NOT NULL,
        payload    BLOB,
        payload_id INTEGER,
        PRIMARY KEY (channel, offset),
        UNIQUE (channel, msg_id, publisher)
    ) WITHOUT ROWID;
    INSERT INTO messages_v4(channel, offset, publisher, msg_id, at, payload, payload_id)
        SELECT channel, offset, publisher, msg_id, at,
               CASE WHEN length(payload) > 512 THEN NULL ELSE payload END,
               CASE WHEN length(payload) > 512 THEN row_number() OVER (
                   PARTITION BY length(payload) > 512 ORDER BY channel, offset) END
        FROM messages;
    DROP TABLE messages;
    ALTER TABLE messages_v4 RENAME TO messages;
    CREATE TRIGGER message_payload_gone AFTER DELETE ON messages
        WHEN old.payload_id IS NOT NULL
        BEGIN DELETE FROM message_payloads WHERE id = old.payload_id; END;
    "#,
];

/// Payloads up to this many bytes are stored in the message's row; larger
/// ones in `message_payloads` (schema 4). A row of this size never
/// overflows a 4 KiB page of the message b-tree.
pub(crate) const INLINE_PAYLOAD_BYTES: usize = 512;

/// The schema version this build writes.
pub(crate) const LATEST: u32 = MIGRATIONS.len() as u32;

/// Reads the schema version of an open database.
pub(crate) fn version(conn: &Connection) -> Result<u32, StoreError> {
    conn.query_row("PRAGMA user_version", [], |r| r.get::<_, u32>(0))
        .db()
}

/// Applies every migration after `from`, each in its own transaction.
pub(crate) fn migrate(conn: &mut Connection, from: u32) -> Result<(), StoreError> {
    migrate_until(conn, from, LATEST)
}

/// Applies the migrations from `from` up to version `to`.
fn migrate_until(conn: &mut Connection, from: u32, to: u32) -> Result<(), StoreError> {
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .take(to as usize)
        .skip(from as usize)
    {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .db()?;
        tx.execute_batch(sql).db()?;
        tx.pragma_update(None, "user_version", (i + 1) as u32)
            .db()?;
        tx.commit().db()?;
        tracing::info!(version = i + 1, "applied schema migration");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NewSend, Store};

    /// Both id lookups probe the unique index with every column bound:
    /// a lookup that scans the channel (as `publisher IN (?, '')` did,
    /// the planner choosing the primary key) makes every append O(log size).
    #[test]
    fn id_lookups_probe_the_index() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, 0).unwrap();
        for sql in [
            crate::messages::FIND_ID,
            crate::messages::FIND_ID_OR_LEGACY,
            "SELECT offset, at FROM messages WHERE channel = ?1 AND publisher IN (?2, '') AND msg_id = ?3",
        ] {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let plan: Vec<String> = stmt
                .query_map(["c", "p", "m"], |r| r.get::<_, String>(3))
                .unwrap()
                .map(Result::unwrap)
                .filter(|d| d.starts_with("SEARCH") || d.starts_with("SCAN"))
                .collect();
            let probes = plan
                .iter()
                .all(|d| d.contains("(channel=? AND msg_id=? AND publisher=?)"));
            if sql.contains(" IN ") {
                assert!(!probes, "the planted lookup must be caught: {plan:?}");
            } else {
                assert!(probes && !plan.is_empty(), "{sql}: {plan:?}");
            }
        }
    }

    /// A new database has no ids from before scopes: the shared scope is
    /// a scope like any other.
    #[tokio::test]
    async fn new_database_scopes_are_disjoint() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("keel.db"), Default::default())
            .await
            .unwrap();
        let shared = store.append("room", "m1", b"{}").await.unwrap();
        let scoped = store
            .append_scoped("user:a", "room", "m1", b"{}")
            .await
            .unwrap();
        assert!(!shared.duplicate && !scoped.duplicate);
        assert!(store.append("room", "m1", b"{}").await.unwrap().duplicate);
        store.close().await.unwrap();
    }

    /// A database written by the previous version (schema 2: ids unique
    /// per channel, outbox keys unique in all) opens, is upgraded, keeps
    /// every row, and scopes ids from then on.
    #[tokio::test]
    async fn schema_2_database_upgrades_to_scoped_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keel.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            migrate_until(&mut conn, 0, 2).unwrap();
            assert_eq!(version(&conn).unwrap(), 2);
            conn.execute_batch(
                "INSERT INTO sessions(id, token_hash, state, created_at, updated_at)
                     VALUES('s1', x'00', 'DETACHED', 1, 1), ('s2', x'00', 'DETACHED', 1, 1);
                 INSERT INTO channels(name, next_offset) VALUES('room', 3);
                 INSERT INTO messages(channel, offset, msg_id, at, payload)
                     VALUES('room', 1, 'm1', 1, x'7b7d'), ('room', 2, 'm2', 1, x'7b7d');
                 INSERT INTO outbox(session_id, idem_key, payload, state, next_attempt_at, created_at)
                     VALUES('s1', 'k1', x'7b7d', 'SENT', 1, 1), ('s1', 'k2', x'7b7d', 'PENDING', 1, 1);
                 DELETE FROM outbox WHERE idem_key = 'k2';",
            )
            .unwrap();
        }
        let store = Store::open(&path, Default::default()).await.unwrap();
        assert_eq!((store.startup().migrated_from, LATEST), (2, 4));
        let log = store.read_channel("room", 1, 10).await.unwrap();
        assert_eq!(
            log.iter().map(|m| m.msg_id.as_str()).collect::<Vec<_>>(),
            ["m1", "m2"]
        );
        // An id written before the upgrade is a duplicate for any publisher
        // (a retry across the upgrade), a new id is scoped.
        let again = store
            .append_scoped("user:a", "room", "m1", b"{}")
            .await
            .unwrap();
        assert!(again.duplicate && again.offset == 1);
        let a = store
            .append_scoped("user:a", "room", "m3", b"{}")
            .await
            .unwrap();
        let b = store
            .append_scoped("user:b", "room", "m3", b"{}")
            .await
            .unwrap();
        assert!(!a.duplicate && !b.duplicate);
        assert_eq!((a.offset, b.offset), (3, 4));
        let a_again = store
            .append_scoped("user:a", "room", "m3", b"{}")
            .await
            .unwrap();
        assert!(a_again.duplicate && a_again.offset == 3);

        let send = |session: &str, key: &str| NewSend {
            session_id: Some(session.into()),
            idem_key: key.to_owned(),
            payload: b"{}".to_vec(),
            ..Default::default()
        };
        // A key enqueued before scopes is found again by its session, and
        // keeps scope '' (the upstream sees the bare key it saw before).
        let legacy = store.enqueue(send("s1", "k1")).await.unwrap();
        assert!(legacy.duplicate);
        assert_eq!(store.outbox_item(legacy.id).await.unwrap().scope, "");
        let other = store.enqueue(send("s2", "k1")).await.unwrap();
        assert!(!other.duplicate);
        assert_eq!(
            store.outbox_item(other.id).await.unwrap().scope,
            "session:s2"
        );
        let spool = store
            .enqueue(NewSend {
                scope: "spool".into(),
                idem_key: "k1".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(!spool.duplicate, "another scope");
        // The deleted row's id (2) is not reused.
        assert_eq!((other.id.0, spool.id.0), (3, 4));
        store.close().await.unwrap();
    }

    /// Schema 4 keeps large payloads out of the message b-tree: a schema-3
    /// file's payloads come back byte for byte, the large ones (and new
    /// large ones) live in `message_payloads`, and a message's payload row
    /// goes with it (retention leaves no orphan).
    #[tokio::test]
    async fn schema_3_database_moves_large_payloads_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keel.db");
        let big = vec![b'x'; 100_000];
        let edge = vec![b'y'; INLINE_PAYLOAD_BYTES];
        {
            let mut conn = Connection::open(&path).unwrap();
            migrate_until(&mut conn, 0, 3).unwrap();
            let mut insert = conn
                .prepare(
                    "INSERT INTO messages(channel, offset, publisher, msg_id, at, payload)
                     VALUES(?1, ?2, '', ?3, 1, ?4)",
                )
                .unwrap();
            for (channel, offset, id, payload) in [
                ("b", 1, "b1", &big[..]),
                ("a", 1, "a1", b"{}"),
                ("a", 2, "a2", &big[..50_000]),
                ("a", 3, "a3", &edge[..]),
                ("a", 4, "a4", &big[..70_000]),
            ] {
                insert
                    .execute(rusqlite::params![channel, offset, id, payload])
                    .unwrap();
            }
        }
        let store = Store::open(&path, Default::default()).await.unwrap();
        assert_eq!((store.startup().migrated_from, LATEST), (3, 4));
        let a = store.read_channel("a", 1, 10).await.unwrap();
        let payloads: Vec<&[u8]> = a.iter().map(|m| &m.payload[..]).collect();
        assert_eq!(
            payloads,
            [&b"{}"[..], &big[..50_000], &edge[..], &big[..70_000]]
        );
        assert_eq!(
            store.read_channel("b", 1, 10).await.unwrap()[0].payload,
            big
        );
        let out_of_line = |store: &Store| {
            let store = store.clone();
            async move {
                store
                    .read(|conn| -> Result<(i64, i64), StoreError> {
                        conn.query_row(
                            "SELECT (SELECT COUNT(*) FROM message_payloads),
                                    (SELECT COUNT(*) FROM messages WHERE payload_id IS NOT NULL)",
                            [],
                            |r| Ok((r.get(0)?, r.get(1)?)),
                        )
                        .db()
                    })
                    .await
                    .unwrap()
            }
        };
        assert_eq!(out_of_line(&store).await, (3, 3));
        // New messages: large ones out of line, small ones in the row.
        let appended = store.append("a", "a5", &big[..80_000]).await.unwrap();
        assert_eq!(appended.offset, 5);
        store.append("a", "a6", b"[1]").await.unwrap();
        assert_eq!(out_of_line(&store).await, (4, 4));
        let page = store.read_channel_bounded("a", 4, 10, 1).await.unwrap();
        assert_eq!((page.len(), &page[0].payload[..]), (1, &big[..70_000]));
        // Retention takes the payload rows with their messages.
        let policy = crate::Retention {
            max_count: Some(1),
            max_age: None,
        };
        assert_eq!(store.apply_retention(policy).await.unwrap(), 5);
        assert_eq!(out_of_line(&store).await, (1, 1));
        assert_eq!(
            store.read_channel("b", 1, 10).await.unwrap()[0].payload,
            big
        );
        store.close().await.unwrap();
    }
}
