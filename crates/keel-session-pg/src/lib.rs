//! keel-store's store contract ([`keel_store::SessionStore`]) on PostgreSQL,
//! for running several keel-relay nodes on one store of record
//! (docs/cluster.md).
//!
//! - **Group commit.** Appends go through one writer task per node that
//!   commits whatever is queued in one transaction, pipelined on one
//!   connection; each caller's future resolves only after that transaction
//!   committed. Other writes run in their own short transactions on a pool
//!   of connections (deadpool-postgres).
//! - **Offsets** are assigned atomically with the append, from a
//!   `channels(name, next_offset)` row locked in the same transaction: two
//!   nodes appending to one channel take turns, never share an offset, and
//!   never leave a gap. A batch locks its channels' rows in name order, so
//!   two nodes' batches cannot deadlock.
//! - **Idempotency** rests on unique constraints: `(channel, msg_id,
//!   publisher)` for messages, `(scope, idem_key)` for the outbox. A
//!   concurrent writer of the same key makes one transaction fail with a
//!   unique violation; it is run again and finds the other's row.
//! - **Outbox claims** take rows `FOR UPDATE SKIP LOCKED` under a lease, so
//!   workers on many nodes never claim one item twice.
//! - **Node-scoped state**: sessions record the node that holds them, crash
//!   recovery on a node marks only its own sessions, and meta (the clean
//!   shutdown flag, run counts) is kept per node.
//! - **Errors** are keel-store's types, no PostgreSQL type in them: `SQLSTATE`s map onto
//!   [`StoreError`] (disk full, corrupt, unavailable; see the table on
//!   [`StoreError`]'s mapping in the crate README).
//! - **Migrations** are versioned and forward-only, run under an advisory
//!   lock by whichever node opens first; a schema newer than the binary is
//!   refused with [`OpenError::NewerSchema`].
//!
//! ```no_run
//! use keel_store::{SessionStore, NewSession};
//! use keel_session_pg::{PgConfig, PgStore};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = PgStore::open(PgConfig {
//!     url: "postgres://postgres@127.0.0.1:5432/keel".into(),
//!     node_id: "node-a".into(),
//!     ..PgConfig::default()
//! })
//! .await?;
//! let session = store.create_session(NewSession::default()).await?;
//! let appended = store.append("room:1", "msg-1", b"hello").await?;
//! assert_eq!(appended.offset, 1);
//! store.close().await?;
//! # Ok(())
//! # }
//! ```

mod clock;
mod cluster;
mod error;
mod ops;
mod schema;
#[cfg(feature = "testkit")]
pub mod testing;
mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use keel_store::{Clock, OpenError, StartupInfo, StoreError, UnixMillis};
use tokio::sync::mpsc;
use tokio_postgres::NoTls;

pub use crate::clock::ServerClock;
pub use crate::cluster::{DeadNode, Held, LeaderLock, Lease, NodeLease};
use crate::error::{pg, pool};
use crate::writer::{Job, Writer};

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = schema::LATEST;

/// Options for [`PgStore::open`]. Every field but `url` has a working default.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// A libpq-style URL or key=value string, e.g.
    /// `postgres://user@127.0.0.1:5432/keel`. The database must exist.
    pub url: String,
    /// This node's id: names its sessions, its meta and its writer in
    /// outbox claims. Default `"node-1"`.
    pub node_id: String,
    /// Connections in the pool (the writer task takes one of them per
    /// batch). Default 16.
    pub pool_size: usize,
    /// Most appends committed in one transaction. Default 1024.
    pub max_batch: usize,
    /// Payload bytes committed in one transaction at most (a batch always
    /// holds at least one append). Default 1 MiB.
    pub max_batch_bytes: usize,
    /// Appends that may wait for the writer before callers are held back
    /// (as many again may wait in the writer's lanes). Default 65 536.
    pub write_queue: usize,
    /// Activity rows kept per session. Default 10.
    pub activity_limit: usize,
    /// How long opening a connection may take. Default 5 s.
    pub connect_timeout: Duration,
    /// How long an operation may wait for a pooled connection. Default 5 s.
    pub pool_wait: Duration,
    /// The server aborts any statement running longer than this (it is set
    /// as the connections' `statement_timeout`). Default 30 s.
    pub statement_timeout: Duration,
    /// Source of timestamps. Default `None`: the server's clock
    /// ([`ServerClock`]: PostgreSQL's time read through this node's clocks,
    /// so that nodes whose wall clocks disagree, or step, write and judge
    /// one time; any change made up at 1%). `Some` for a clock of the
    /// caller's, e.g. a `ManualClock` in tests. Node leases are judged on
    /// the server's clock either way.
    pub clock: Option<Arc<dyn Clock>>,
}

impl Default for PgConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            node_id: "node-1".into(),
            pool_size: 16,
            max_batch: 1024,
            max_batch_bytes: 1 << 20,
            write_queue: 65_536,
            activity_limit: 10,
            connect_timeout: Duration::from_secs(5),
            pool_wait: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            clock: None,
        }
    }
}

/// A keel session store on PostgreSQL. Cheap to clone: clones share one
/// pool and one writer task.
#[derive(Clone, Debug)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    config: PgConfig,
    /// The clock in use: `config.clock`, or the server's.
    clock: Arc<dyn Clock>,
    /// The server's clock, when that is the one in use (the heartbeat
    /// measures its offset again).
    server_clock: Option<Arc<ServerClock>>,
    startup: StartupInfo,
    closed: AtomicBool,
    writes: mpsc::Sender<Job>,
    writer: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The lease's own connection (cluster mode): a heartbeat never waits
    /// behind the pool's work.
    lease: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("node_id", &self.config.node_id)
            .field("startup", &self.startup)
            .finish_non_exhaustive()
    }
}

/// Bounds every wait of a connection: connecting, each statement and each
/// lock wait (`statement_timeout`, `lock_timeout`), a transaction left idle
/// by a client that stopped (`idle_in_transaction_session_timeout`, so a
/// frozen node cannot hold row locks for long), and a peer that vanished
/// (TCP keepalives after 10 s idle).
fn bound_session(pg: &mut tokio_postgres::Config, config: &PgConfig) {
    let ms = config.statement_timeout.as_millis();
    pg.connect_timeout(config.connect_timeout);
    pg.options(format!(
        "-c statement_timeout={ms} -c lock_timeout={ms} -c idle_in_transaction_session_timeout={ms}"
    ));
    pg.keepalives(true);
    pg.keepalives_idle(Duration::from_secs(10));
}

/// The URL without its password, for error messages.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

impl PgStore {
    /// Connects, migrates the schema forward (under an advisory lock) and
    /// starts the writer task. Must run inside a tokio runtime.
    ///
    /// Marks this node "not cleanly shut down" until [`PgStore::close`], so
    /// that the next open of the same node sees a crash in
    /// [`StartupInfo::previous_clean_shutdown`].
    pub async fn open(config: PgConfig) -> Result<PgStore, OpenError> {
        let where_ = redacted(&config.url);
        let fail = |source: StoreError| match source {
            StoreError::DiskFull { detail } => OpenError::DiskFull {
                path: where_.clone(),
                detail,
            },
            StoreError::Corrupt { detail } => OpenError::Corrupt {
                path: where_.clone(),
                detail,
            },
            source => OpenError::Store {
                path: where_.clone(),
                source,
            },
        };
        let mut pg_config: tokio_postgres::Config =
            config.url.parse().map_err(|e: tokio_postgres::Error| {
                fail(StoreError::Unavailable {
                    detail: format!("not a PostgreSQL URL: {e}"),
                })
            })?;
        pg_config.connect_timeout(config.connect_timeout);
        pg_config.application_name(format!("keel-{}", config.node_id));
        bound_session(&mut pg_config, &config);

        // Migrate on a connection of its own, before the pool exists.
        let (mut client, connection) = pg_config.connect(NoTls).await.map_err(|e| fail(pg(e)))?;
        let driver = tokio::spawn(connection);
        let migrated = schema::migrate(&mut client).await.map_err(|e| match e {
            schema::MigrateError::Newer { found } => OpenError::NewerSchema {
                found,
                supported: schema::LATEST,
            },
            schema::MigrateError::Store(e) => fail(e),
        })?;
        let (clock, server_clock): (Arc<dyn Clock>, _) = match &config.clock {
            Some(c) => (c.clone(), None),
            None => {
                let offset = clock::measure(&client).await.map_err(|e| fail(pg(e)))?;
                let server = Arc::new(ServerClock::at_offset(offset));
                (server.clone(), Some(server))
            }
        };
        let startup = mark_running(&client, &config.node_id, migrated.from)
            .await
            .map_err(fail)?;
        drop(client);
        let _ = driver.await;

        let manager = Manager::from_config(
            pg_config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(2))
            .wait_timeout(Some(config.pool_wait))
            .create_timeout(Some(config.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| {
                fail(StoreError::Unavailable {
                    detail: format!("cannot build the connection pool: {e}"),
                })
            })?;
        let (writes, rx) = mpsc::channel(config.write_queue.max(1));
        let writer = Writer::new(pool.clone(), rx, config.clone(), clock.clone());
        let handle = tokio::spawn(writer.run());
        Ok(PgStore {
            inner: Arc::new(Inner {
                pool,
                config,
                clock,
                server_clock,
                startup,
                closed: AtomicBool::new(false),
                writes,
                writer: tokio::sync::Mutex::new(Some(handle)),
                lease: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// The configuration the store was opened with.
    pub fn config(&self) -> &PgConfig {
        &self.inner.config
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.inner.config.node_id
    }

    /// Whether the server answers now (one round trip on a pooled
    /// connection): for health checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let conn = self.conn().await?;
        conn.simple_query("SELECT 1").await.map_err(pg)?;
        Ok(())
    }

    pub(crate) fn now_millis(&self) -> UnixMillis {
        self.inner.clock.now_millis()
    }

    /// The server's clock, when the store keeps time by it (the default).
    pub fn server_clock(&self) -> Option<&ServerClock> {
        self.inner.server_clock.as_deref()
    }

    pub(crate) fn check_open(&self) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    /// A pooled connection, within [`PgConfig::pool_wait`].
    pub(crate) async fn conn(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.inner.pool.get().await.map_err(pool)
    }

    /// A connection of its own (not from the pool), named `purpose`.
    pub(crate) async fn own_connection(
        &self,
        purpose: &str,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), StoreError> {
        let mut config: tokio_postgres::Config =
            self.config()
                .url
                .parse()
                .map_err(|e: tokio_postgres::Error| StoreError::Unavailable {
                    detail: e.to_string(),
                })?;
        bound_session(&mut config, self.config());
        config.application_name(format!("keel-{}-{purpose}", self.node_id()));
        let (client, connection) = config.connect(NoTls).await.map_err(pg)?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok((client, driver))
    }

    pub(crate) fn lease_slot(&self) -> &tokio::sync::Mutex<Option<tokio_postgres::Client>> {
        &self.inner.lease
    }

    /// Forgets the lease's connection (a renewal on it timed out): the next
    /// heartbeat opens a fresh one.
    pub async fn drop_lease_connection(&self) {
        if let Ok(mut slot) = self.inner.lease.try_lock() {
            *slot = None;
        }
    }

    pub(crate) fn writes(&self) -> &mpsc::Sender<Job> {
        &self.inner.writes
    }

    pub(crate) fn startup_info(&self) -> &StartupInfo {
        &self.inner.startup
    }

    /// Stops taking writes, lets the writer finish what is queued, and
    /// records the node's shutdown as clean or not.
    pub(crate) async fn close_inner(&self, clean: bool) -> Result<(), StoreError> {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        // The writer answers after every job queued before this one.
        let _ = self.inner.writes.send(Job::Close(tx)).await;
        let _ = rx.await;
        if let Some(handle) = self.inner.writer.lock().await.take() {
            let _ = handle.await;
        }
        let conn = self.conn().await?;
        set_meta_on(
            &conn,
            &self.inner.config.node_id,
            "clean_shutdown",
            if clean { "1" } else { "0" },
        )
        .await
    }
}

pub(crate) async fn set_meta_on(
    client: &tokio_postgres::Client,
    node: &str,
    key: &str,
    value: &str,
) -> Result<(), StoreError> {
    client
        .execute(
            "INSERT INTO keel_meta(node, key, value) VALUES ($1, $2, $3)
             ON CONFLICT (node, key) DO UPDATE SET value = excluded.value",
            &[&node, &key, &value],
        )
        .await
        .map_err(pg)?;
    Ok(())
}

/// Reads the node's previous clean-shutdown flag, then clears it and
/// counts this run (as keel-session's SQLite store does).
async fn mark_running(
    client: &tokio_postgres::Client,
    node: &str,
    migrated_from: u32,
) -> Result<StartupInfo, StoreError> {
    let get = async |node: &str, key: &str| -> Result<Option<String>, StoreError> {
        Ok(client
            .query_opt(
                "SELECT value FROM keel_meta WHERE node = $1 AND key = $2",
                &[&node, &key],
            )
            .await
            .map_err(pg)?
            .map(|r| r.get(0)))
    };
    let clean = get(node, "clean_shutdown").await?.is_none_or(|v| v == "1");
    // The instance id names the database, shared by every node.
    let fresh: String = (0..16)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    client
        .execute(
            "INSERT INTO keel_meta(node, key, value) VALUES ('', 'instance_id', $1)
             ON CONFLICT DO NOTHING",
            &[&fresh],
        )
        .await
        .map_err(pg)?;
    let instance_id = get("", "instance_id").await?.unwrap_or(fresh);
    let run = get(node, "runs")
        .await?
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + 1;
    set_meta_on(client, node, "runs", &run.to_string()).await?;
    set_meta_on(client, node, "clean_shutdown", "0").await?;
    Ok(StartupInfo {
        created: migrated_from == 0,
        previous_clean_shutdown: clean,
        migrated_from,
        schema_version: schema::LATEST,
        instance_id,
        run,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            super::redacted("postgres://keel:s3cret@db:5432/keel"),
            "postgres://keel:***@db:5432/keel"
        );
        assert_eq!(
            super::redacted("postgres://keel@db/keel"),
            "postgres://keel@db/keel"
        );
        assert_eq!(super::redacted("host=db user=x"), "host=db user=x");
    }
}

/// The README's examples, compiled and run as doctests so that they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
