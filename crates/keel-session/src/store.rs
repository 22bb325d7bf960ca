//! The `Store` handle: opening, the write path, the read pool, meta and shutdown.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::clock::UnixMillis;
use crate::config::{Config, Durability};
use crate::error::Db;
use crate::error::{OpError, OpenError, StoreError};
use crate::schema;
use crate::writer::{Checkpointer, Counters, Ctx, Msg, Op, Queued, Writer};

pub(crate) use keel_store::{Committing, StartupInfo};

/// Counters from the writer thread, for observing group commit at work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriterStats {
    /// Transactions committed.
    pub batches: u64,
    /// Writes committed in them.
    pub writes: u64,
    /// Batches rolled back as a whole (disk full, corruption, I/O).
    pub failed_batches: u64,
    /// RESTART checkpoints the writer ran itself because the WAL passed
    /// `wal_checkpoint_bytes` (readers, or commits arriving throughout, kept
    /// the background ones from letting the WAL restart).
    pub checkpoints: u64,
    /// PASSIVE checkpoints run by the background checkpoint thread.
    pub passive_checkpoints: u64,
    /// The largest batch committed so far.
    pub max_batch: u64,
    /// Times the writer held large writes because the WAL was behind its
    /// checkpoints (see [`Config::wal_admit_bytes`](crate::Config::wal_admit_bytes)).
    pub admission_waits: u64,
    /// How far the WAL is behind the database: the bytes of WAL frames the
    /// last checkpoint could not copy yet, plus what was committed since
    /// (payload bytes and an estimate of each write's overhead).
    pub wal_behind_bytes: u64,
    /// Bytes of frames the WAL holds since it last restarted from its
    /// beginning (as SQLite reported after the last commit). The file
    /// itself keeps its length, up to `wal_checkpoint_bytes`, and is
    /// overwritten from its start.
    pub wal_bytes: u64,
}

/// A durable session store over one SQLite database in WAL mode.
///
/// Cheap to clone: every clone shares one writer thread and one read pool.
/// Writes resolve only after the transaction holding them has committed.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::Sender<Msg>,
    readers: Arc<ReadPool>,
    config: Config,
    path: PathBuf,
    startup: StartupInfo,
    closed: AtomicBool,
    counters: Arc<Counters>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("startup", &self.startup)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path`, migrates it forward and
    /// starts the writer thread.
    ///
    /// Must be called inside a tokio runtime. Marks the database as "not cleanly
    /// shut down" until [`Store::close`] runs, so that a crash is detectable on
    /// the next open through [`StartupInfo::previous_clean_shutdown`].
    pub async fn open(path: &Path, config: Config) -> Result<Store, OpenError> {
        let owned = path.to_path_buf();
        let cfg = config.clone();
        tokio::task::spawn_blocking(move || Store::open_blocking(&owned, cfg))
            .await
            .map_err(|e| {
                OpenError::from_store(
                    path,
                    crate::error::backend(-1, format!("open task failed: {e}")),
                )
            })?
    }

    fn open_blocking(path: &Path, config: Config) -> Result<Store, OpenError> {
        let fail = |e: StoreError| OpenError::from_store(path, e);
        let existed = std::fs::metadata(path)
            .map(|m| m.len() > 0)
            .unwrap_or(false);
        owner_only(path).map_err(|e| {
            fail(StoreError::Io {
                detail: format!("cannot make the database owner-only: {e}"),
            })
        })?;
        let mut conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| fail(crate::error::sqlite(e)))?;
        configure_writer(&conn, &config).map_err(fail)?;

        let found = schema::version(&conn).map_err(fail)?;
        if found > schema::LATEST {
            return Err(OpenError::NewerSchema {
                found,
                supported: schema::LATEST,
            });
        }
        schema::migrate(&mut conn, found).map_err(fail)?;

        let (previous_clean_shutdown, instance_id, run) = mark_running(&conn).map_err(fail)?;
        let startup = StartupInfo {
            created: !existed,
            previous_clean_shutdown,
            migrated_from: found,
            schema_version: schema::LATEST,
            instance_id,
            run,
        };

        let readers = ReadPool::open(path, &config).map_err(fail)?;
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::channel(config.write_queue.max(1));
        let checkpointer = Checkpointer::start(path, &config, counters.clone()).map_err(fail)?;
        let writer = Writer::new(
            conn,
            rx,
            config.clone(),
            counters.clone(),
            Some(checkpointer),
        )
        .map_err(fail)?;
        let handle = std::thread::Builder::new()
            .name("keel-session-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| {
                fail(StoreError::Io {
                    detail: format!("cannot start writer thread: {e}"),
                })
            })?;

        Ok(Store {
            inner: Arc::new(Inner {
                tx,
                readers: Arc::new(readers),
                config,
                path: path.to_path_buf(),
                startup,
                closed: AtomicBool::new(false),
                counters,
                writer: Mutex::new(Some(handle)),
            }),
        })
    }

    /// The database file this store writes.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// [`SessionStore::startup`] on SQLite: the contract is documented there.
    pub fn startup(&self) -> &StartupInfo {
        &self.inner.startup
    }

    /// The configuration the store was opened with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Group-commit counters so far.
    pub fn writer_stats(&self) -> WriterStats {
        let c = &self.inner.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        WriterStats {
            batches: get(&c.batches),
            writes: get(&c.writes),
            failed_batches: get(&c.failed_batches),
            checkpoints: get(&c.checkpoints),
            passive_checkpoints: get(&c.passive_checkpoints),
            max_batch: get(&c.max_batch),
            admission_waits: get(&c.admission_waits),
            wal_behind_bytes: get(&c.wal_debt),
            wal_bytes: get(&c.wal_bytes),
        }
    }

    /// [`SessionStore::now`] on SQLite: the contract is documented there.
    pub fn now(&self) -> UnixMillis {
        self.inner.config.clock.now_millis()
    }

    /// [`SessionStore::close`] on SQLite: the contract is documented there.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.close_inner(true).await
    }

    /// [`SessionStore::close_unclean`] on SQLite: the contract is documented there.
    pub async fn close_unclean(&self) -> Result<(), StoreError> {
        self.close_inner(false).await
    }

    async fn close_inner(&self, clean: bool) -> Result<(), StoreError> {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        let (tx, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Msg::Close(tx, clean))
            .await
            .map_err(|_| StoreError::Closed)?;
        let result = rx.await.map_err(|_| StoreError::Closed)?;
        let handle = self.inner.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        result
    }

    /// Queues `f` for the writer and waits until its transaction commits.
    ///
    /// `f` must check before it changes anything where it can fail, and may run
    /// more than once (see the writer's batch rollback).
    pub(crate) async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: OpError,
        F: Fn(&Ctx<'_>) -> Result<T, E> + Send + 'static,
    {
        self.submit(f).await?.await
    }

    /// Queues `f` for the writer and returns as soon as it is queued, with a
    /// future that resolves once its transaction commits. Writes queued one
    /// after another run in that order (see [`Store::queue_append`]).
    pub(crate) async fn submit<T, E, F>(&self, f: F) -> Result<Committing<T, E>, E>
    where
        T: Send + 'static,
        E: OpError,
        F: Fn(&Ctx<'_>) -> Result<T, E> + Send + 'static,
    {
        self.submit_in(0, 0, f).await
    }

    /// [`Store::submit`] in a lane, counted at `bytes` against the
    /// per-commit byte bound. Writes in one lane run in the order queued;
    /// lanes are served in fair order (see [`Store::queue_append_in`]).
    pub(crate) async fn submit_in<T, E, F>(
        &self,
        lane: u64,
        bytes: usize,
        f: F,
    ) -> Result<Committing<T, E>, E>
    where
        T: Send + 'static,
        E: OpError,
        F: Fn(&Ctx<'_>) -> Result<T, E> + Send + 'static,
    {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(StoreError::Closed.into());
        }
        let (tx, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Msg::Job(Queued {
                job: Box::new(Op::new(f, tx)),
                lane,
                bytes,
            }))
            .await
            .map_err(|_| E::from(StoreError::Closed))?;
        Ok(Committing::new(rx))
    }

    /// Runs `f` on a pooled read-only connection.
    pub(crate) async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    {
        self.inner.readers.run(f).await
    }

    /// [`SessionStore::meta`] on SQLite: the contract is documented there.
    pub async fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let key = key.to_owned();
        self.read(move |conn| {
            let v = conn
                .prepare_cached("SELECT value FROM meta WHERE key = ?1")
                .db()?
                .query_row([&key], |r| r.get(0))
                .optional()
                .db()?;
            Ok(v)
        })
        .await
    }

    /// [`SessionStore::set_meta`] on SQLite: the contract is documented there.
    pub async fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let (key, value) = (key.to_owned(), value.to_owned());
        self.write(move |ctx| {
            set_meta(ctx.conn, &key, &value)?;
            Ok(())
        })
        .await
    }

    /// [`SessionStore::clean_shutdown`] on SQLite: the contract is documented there.
    pub async fn clean_shutdown(&self) -> Result<bool, StoreError> {
        Ok(self.meta("clean_shutdown").await?.as_deref() == Some("1"))
    }

    /// [`SessionStore::set_clean_shutdown`] on SQLite: the contract is documented there.
    pub async fn set_clean_shutdown(&self, clean: bool) -> Result<(), StoreError> {
        self.set_meta("clean_shutdown", if clean { "1" } else { "0" })
            .await
    }

    /// Runs `PRAGMA quick_check`; an empty list means the database is intact.
    pub async fn quick_check(&self) -> Result<Vec<String>, StoreError> {
        self.read(|conn| check(conn, "PRAGMA quick_check")).await
    }

    /// Runs `PRAGMA integrity_check`; an empty list means the database is intact.
    pub async fn integrity_check(&self) -> Result<Vec<String>, StoreError> {
        self.read(|conn| check(conn, "PRAGMA integrity_check"))
            .await
    }
}

fn check(conn: &Connection, sql: &str) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare(sql).db()?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .db()?
        .collect::<Result<_, _>>()
        .db()?;
    Ok(rows.into_iter().filter(|r| r != "ok").collect())
}

/// Turns on SQLite's query planner stability guarantee.
///
/// Without it, a statement whose plan could depend on a bound value (the
/// bundled SQLite is built with STAT4) is silently re-prepared on the next
/// step whenever that value changes: a cached statement gets re-parsed and
/// re-planned on nearly every use. Crash recovery spent most of its time
/// there. keel's queries have one right plan each.
pub(crate) fn stable_plans(conn: &Connection) -> Result<(), StoreError> {
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )
    .db()?;
    Ok(())
}

fn configure_writer(conn: &Connection, config: &Config) -> Result<(), StoreError> {
    conn.busy_timeout(config.busy_timeout).db()?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .db()?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(crate::error::backend(
            -1,
            format!("cannot enable WAL mode (journal_mode is {mode})"),
        ));
    }
    let sync = match config.durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync).db()?;
    conn.pragma_update(None, "foreign_keys", "ON").db()?;
    // When the WAL restarts (at the first commit after a checkpoint copied
    // everything), SQLite cuts the file back to this size, or to that
    // commit's end if larger: only past the checkpoint bound. Below it the
    // file's pages stay
    // allocated and cached, so a WAL that restarts from its beginning
    // overwrites them. A file cut shorter at every restart made each commit
    // past the cut allocate new pages, which the kernel zeroes before the
    // unaligned WAL frames partly cover them (13% of the relay's CPU under
    // a 100 MiB/s publish flood, in the writer thread).
    conn.pragma_update(
        None,
        "journal_size_limit",
        i64::try_from(config.wal_checkpoint_bytes).unwrap_or(i64::MAX),
    )
    .db()?;
    // Checkpoints run on the checkpoint thread, never inside a commit.
    // This replaces any WAL hook: the writer registers its own after it
    // (`Writer::new`), and nothing may set it again on this connection.
    conn.pragma_update(None, "wal_autocheckpoint", 0).db()?;
    conn.set_prepared_statement_cache_capacity(64);
    stable_plans(conn)?;
    // A negative cache_size is in KiB.
    let cache_kib = (config.writer_cache_bytes / 1024).max(64);
    conn.pragma_update(None, "cache_size", format!("-{cache_kib}"))
        .db()?;
    if let Some(bytes) = config.max_db_bytes {
        let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).db()?;
        let pages = (bytes / page.max(512) as u64).max(1);
        let _: i64 = conn
            .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
                r.get(0)
            })
            .db()?;
    }
    Ok(())
}

/// Reads the previous `clean_shutdown` flag, then clears it and counts this run.
fn mark_running(conn: &Connection) -> Result<(bool, String, u64), StoreError> {
    let get = |key: &str| -> Result<Option<String>, StoreError> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .db()
    };
    let clean = get("clean_shutdown")?.is_none_or(|v| v == "1");
    let instance_id = match get("instance_id")? {
        Some(id) => id,
        None => {
            let id = crate::sessions::random_hex(16);
            set_meta(conn, "instance_id", &id)?;
            id
        }
    };
    let run = get("runs")?
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + 1;
    set_meta(conn, "runs", &run.to_string())?;
    set_meta(conn, "clean_shutdown", "0")?;
    Ok((clean, instance_id, run))
}

fn set_meta(conn: &Connection, key: &str, value: &str) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO meta(key, value) VALUES(?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )
    .db()?
    .execute([key, value])
    .db()?;
    Ok(())
}

/// Creates the database file readable and writable by its owner only
/// (0600, whatever the umask), or narrows an existing one and its WAL and
/// shared-memory files to that. SQLite gives the files it creates beside the
/// database the database's mode, so they follow.
fn owner_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let mut files = vec![path.to_path_buf()];
    for suffix in ["-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        files.push(name.into());
    }
    for f in files {
        match std::fs::metadata(&f) {
            Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600))?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// A fixed set of read-only connections handed out to blocking tasks; each
/// read runs in one read transaction, so it sees one snapshot.
pub(crate) struct ReadPool {
    conns: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl ReadPool {
    fn open(path: &Path, config: &Config) -> Result<ReadPool, StoreError> {
        let n = config.readers.max(1);
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let conn = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .db()?;
            conn.busy_timeout(config.busy_timeout).db()?;
            conn.set_prepared_statement_cache_capacity(64);
            stable_plans(&conn)?;
            conns.push(conn);
        }
        Ok(ReadPool {
            conns: Mutex::new(conns),
            permits: Arc::new(Semaphore::new(n)),
        })
    }

    async fn run<T, E, F>(self: &Arc<Self>, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| E::from(StoreError::Closed))?;
        let pool = self.clone();
        // The connection goes back to the pool inside the blocking task, so a
        // caller that stops waiting cannot leak it.
        let task = tokio::task::spawn_blocking(move || {
            let conn = pool.conns.lock().ok().and_then(|mut c| c.pop());
            let Some(conn) = conn else {
                return Err(E::from(StoreError::Closed));
            };
            let guard = Returned {
                pool: &pool,
                conn: Some(conn),
            };
            let conn = guard.conn.as_ref().expect("connection present");
            // One read transaction: every statement of `f` sees the same
            // snapshot (two statements in autocommit mode may straddle a
            // commit). Dropped at the end, it rolls back: nothing to undo.
            let tx = conn.unchecked_transaction().db()?;
            let out = f(&tx);
            drop(tx);
            drop(guard);
            drop(permit);
            out
        });
        task.await
            .map_err(|e| E::from(crate::error::backend(-1, format!("read task failed: {e}"))))?
    }
}

/// Puts a connection back even if the read closure panics.
struct Returned<'a> {
    pool: &'a ReadPool,
    conn: Option<Connection>,
}

impl Drop for Returned<'_> {
    fn drop(&mut self) {
        if let (Some(conn), Ok(mut conns)) = (self.conn.take(), self.pool.conns.lock()) {
            conns.push(conn);
        }
    }
}
