//! Store configuration.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SteadyClock};

/// How hard a commit tries to survive failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=FULL`: the WAL is fsynced on every commit, so an acknowledged
    /// write survives power loss.
    Full,
    /// `synchronous=NORMAL`: an acknowledged write survives a process crash
    /// (`kill -9`) but the last commits may be lost on power loss. The default.
    #[default]
    Normal,
}

/// Options for [`Store::open`](crate::Store::open). Every field has a default.
#[derive(Debug, Clone)]
pub struct Config {
    /// Commit durability. Default [`Durability::Normal`].
    pub durability: Durability,
    /// Most writes committed in one transaction. Default 1024.
    pub max_batch: usize,
    /// Payload bytes committed in one transaction at most (a batch always
    /// holds at least one write). With writes served lane by lane, this is
    /// about how much a small write can wait behind a flood of large ones
    /// from other lanes: one commit of this size. Default 1 MiB.
    pub max_batch_bytes: usize,
    /// How long the writer waits for more writes after the first one of a batch
    /// when the queue runs dry before `max_batch`. Zero commits as soon as the
    /// queue is empty; writes that arrive during a commit form the next batch
    /// either way. Default 0.
    pub max_batch_delay: Duration,
    /// Writes that may wait for the writer before callers are held back
    /// (as many again may wait in the writer's lanes). Default 65 536.
    pub write_queue: usize,
    /// Read-only connections in the read pool. Default 4.
    pub readers: usize,
    /// Activity rows kept per session (newest first). Default 10.
    pub activity_limit: usize,
    /// When the WAL holds more than this after a commit (since it last
    /// restarted from its beginning), the writer runs a `RESTART`
    /// checkpoint, which waits for readers of old snapshots and makes the
    /// next commit write from the WAL's beginning. The WAL file keeps its
    /// length up to this size when it restarts (SQLite's
    /// `journal_size_limit`) and is overwritten rather than regrown. Default
    /// 16 MiB, which keeps the WAL well under 64 MiB.
    pub wal_checkpoint_bytes: u64,
    /// When the WAL passes this size after a commit, a background thread runs a
    /// PASSIVE checkpoint (which never blocks the writer or readers); the WAL
    /// then restarts from its beginning on a later commit. Default 4 MiB.
    pub wal_passive_bytes: u64,
    /// Admission by disk bandwidth: while the WAL holds more than this many
    /// bytes not yet copied into the database (as of the last checkpoint,
    /// plus what was committed since), or more than this many since it last
    /// restarted while the checkpoint has not caught up (commits arriving
    /// throughout keep a restart from happening), the writer serves only
    /// writes of at most
    /// [`Config::small_write_bytes`] (in their fair order) and holds the
    /// larger ones, for up to [`Config::admit_wait`] at a time, so that a
    /// flood of large writes waits for the disk instead of making every
    /// small commit wait behind it and behind the checkpoints it forces.
    /// Default 8 MiB.
    pub wal_admit_bytes: u64,
    /// The largest write that goes on while the WAL is behind. Default 64 KiB.
    pub small_write_bytes: usize,
    /// How long large writes are held at most, from when the hold began
    /// (small commits meanwhile do not restart it), before one goes anyway
    /// (progress never depends on the checkpoint alone: a reader may keep
    /// it from finishing). Default 250 ms.
    pub admit_wait: Duration,
    /// The writer connection's page cache. A transaction whose dirty pages
    /// outgrow it spills them into the WAL before it commits, which is what
    /// made crash recovery of 30,000 sessions slow with SQLite's 2 MiB
    /// default. Memory is taken only as pages are used. Default 64 MiB.
    pub writer_cache_bytes: u64,
    /// How long a connection waits on SQLite's internal locks (only checkpoints
    /// and the open sequence ever wait). Default 5 s.
    pub busy_timeout: Duration,
    /// Caps the database file size (SQLite's `max_page_count`); writes past it
    /// fail with [`StoreError::DiskFull`](crate::StoreError::DiskFull) exactly as on
    /// a full disk. Default `None` (no cap).
    pub max_db_bytes: Option<u64>,
    /// Source of timestamps. Default [`SteadyClock`]: the wall clock with
    /// its steps made up at 1%, so that a step of the system's clock does not
    /// purge sessions or drop messages early (`SystemClock` reads it as is).
    pub clock: Arc<dyn Clock>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            durability: Durability::default(),
            max_batch: 1024,
            max_batch_bytes: 1 << 20,
            max_batch_delay: Duration::ZERO,
            write_queue: 65_536,
            readers: 4,
            activity_limit: 10,
            wal_checkpoint_bytes: 16 * 1024 * 1024,
            wal_passive_bytes: 4 * 1024 * 1024,
            wal_admit_bytes: 8 * 1024 * 1024,
            small_write_bytes: 64 * 1024,
            admit_wait: Duration::from_millis(250),
            writer_cache_bytes: 64 * 1024 * 1024,
            busy_timeout: Duration::from_secs(5),
            max_db_bytes: None,
            clock: Arc::new(SteadyClock::new()),
        }
    }
}
