//! The single writer thread: owns the write connection and group-commits queued writes.
//!
//! Every write is a closure queued on a bounded channel, in a lane (lane 0
//! unless the caller names one, e.g. a connection's appends). The writer
//! moves what is queued into its lanes (FIFO each), then builds a batch by
//! taking writes from the lanes in fair order (see [`FairQueue`]), up to
//! `max_batch` writes and
//! `max_batch_bytes` payload bytes (optionally waiting up to
//! `max_batch_delay` for more), and runs them in one `BEGIN IMMEDIATE`
//! transaction; a write that fails rolls back alone (see [`Writer::commit`]).
//! Lanes keep a flood of large writes from one caller from delaying another
//! caller's write by more than about one commit. Callers are answered only after
//! `COMMIT` returned. A fatal error (disk full, corruption, I/O) rolls back the
//! whole batch and fails every write that ran in it; the writes that had not
//! run yet go into the next batch.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rusqlite::{Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use crate::clock::{Clock, UnixMillis};
use crate::config::Config;
use crate::error::Db;
use crate::error::{OpError, StoreError};
use crate::fair::FairQueue;

/// What a write closure sees: the connection (inside the batch transaction) and
/// the settings it may need.
pub(crate) struct Ctx<'a> {
    pub(crate) conn: &'a Connection,
    pub(crate) now: UnixMillis,
    pub(crate) activity_limit: usize,
    /// The log holds ids written before ids were scoped (schema 3): every
    /// scope's lookup consults them too.
    pub(crate) legacy_ids: bool,
    /// The next offset of channels appended to lately (see [`NextOffsets`]).
    pub(crate) offsets: &'a NextOffsets,
}

/// The offset the next append to a channel gets, for the channels appended
/// to since the writer last cleared it: an append then skips the seek for
/// its channel's newest message (a seventh of the writer's time under many
/// small publishes). Only appends add to the log, and they keep this up to
/// date; a write that removes a whole log (a session purge) forgets its
/// channel; retention only removes prefixes and leaves the newest message,
/// or a floor one past it, so the next offset stands. Everything is
/// forgotten when a batch rolls back (its appends are undone), and when it
/// holds [`NextOffsets::MAX_CHANNELS`] channels (a bound on its memory). An
/// offset found taken all the same is forgotten and read again (see
/// `messages::append_in`): a stale entry costs a retry, never a refusal.
#[derive(Default)]
pub(crate) struct NextOffsets(RefCell<HashMap<Box<str>, i64>>);

impl NextOffsets {
    /// Channels remembered at most (about 100 bytes each).
    pub(crate) const MAX_CHANNELS: usize = 65_536;

    pub(crate) fn get(&self, channel: &str) -> Option<i64> {
        self.0.borrow().get(channel).copied()
    }

    /// `channel`'s next append gets `next`.
    pub(crate) fn set(&self, channel: &str, next: i64) {
        let mut map = self.0.borrow_mut();
        if let Some(n) = map.get_mut(channel) {
            *n = next;
            return;
        }
        if map.len() >= Self::MAX_CHANNELS {
            map.clear();
        }
        map.insert(channel.into(), next);
    }

    /// `channel`'s log changed other than by an append.
    pub(crate) fn forget(&self, channel: &str) {
        self.0.borrow_mut().remove(channel);
    }

    fn clear(&self) {
        self.0.borrow_mut().clear();
    }
}

pub(crate) enum Outcome {
    Done,
    Failed,
    Fatal(StoreError),
}

/// A queued write. `run` may be called more than once: when another write in
/// the same batch fails after it had already changed rows, the batch is rolled
/// back and every other write runs again in a fresh transaction.
pub(crate) trait Job: Send {
    fn run(&mut self, ctx: &Ctx<'_>) -> Outcome;
    fn finish(self: Box<Self>, commit: Result<(), &StoreError>);
}

pub(crate) struct Op<T, E, F> {
    f: F,
    out: Option<Result<T, E>>,
    tx: Option<oneshot::Sender<Result<T, E>>>,
}

impl<T, E, F> Op<T, E, F> {
    pub(crate) fn new(f: F, tx: oneshot::Sender<Result<T, E>>) -> Self {
        Self {
            f,
            out: None,
            tx: Some(tx),
        }
    }
}

impl<T, E, F> Job for Op<T, E, F>
where
    T: Send + 'static,
    E: OpError,
    F: Fn(&Ctx<'_>) -> Result<T, E> + Send + 'static,
{
    fn run(&mut self, ctx: &Ctx<'_>) -> Outcome {
        let out = (self.f)(ctx);
        let outcome = match &out {
            Ok(_) => Outcome::Done,
            Err(e) => match e.fatal() {
                Some(fatal) => Outcome::Fatal(fatal.clone()),
                None => Outcome::Failed,
            },
        };
        self.out = Some(out);
        outcome
    }

    fn finish(mut self: Box<Self>, commit: Result<(), &StoreError>) {
        let result = match (commit, self.out.take()) {
            (Ok(()), Some(out)) => out,
            (Err(e), _) => Err(E::from(e.clone())),
            (Ok(()), None) => Err(E::from(StoreError::Closed)),
        };
        if let Some(tx) = self.tx.take() {
            // The caller may have stopped waiting; the write stands regardless.
            let _ = tx.send(result);
        }
    }
}

type CloseReply = oneshot::Sender<Result<(), StoreError>>;

/// A close request: where to answer, and whether to record a clean shutdown.
type CloseRequest = (CloseReply, bool);

/// A write and where it queues: its lane, and the payload bytes it writes
/// (what the per-commit byte bound counts).
pub(crate) struct Queued {
    pub(crate) job: Box<dyn Job>,
    pub(crate) lane: u64,
    pub(crate) bytes: usize,
}

pub(crate) enum Msg {
    Job(Queued),
    /// Finish queued writes and stop; `true` also records a clean shutdown.
    Close(CloseReply, bool),
}

/// Counters the writer keeps; read through [`Store::writer_stats`](crate::Store::writer_stats).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) batches: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) failed_batches: AtomicU64,
    pub(crate) checkpoints: AtomicU64,
    pub(crate) passive_checkpoints: AtomicU64,
    pub(crate) max_batch: AtomicU64,
    pub(crate) admission_waits: AtomicU64,
    /// How far the WAL is behind: each PASSIVE checkpoint sets it to the
    /// bytes of frames it could not copy plus what was committed while it
    /// ran; the writer adds each commit (payload plus [`WRITE_OVERHEAD`] per
    /// write); a RESTART checkpoint zeroes it.
    pub(crate) wal_debt: AtomicU64,
    /// Bytes of frames the WAL holds since it last restarted from its
    /// beginning, as SQLite's WAL hook reports after each commit (frames
    /// of a page plus a 24-byte header). Unlike the file's size, this
    /// falls when the WAL restarts: the file keeps its length (up to
    /// `journal_size_limit`) and is overwritten.
    pub(crate) wal_bytes: AtomicU64,
}

/// What a write adds to the WAL besides its payload (its row, index
/// entries, page headers), for the debt estimate.
const WRITE_OVERHEAD: u64 = 512;

pub(crate) struct Writer {
    /// See [`Ctx::legacy_ids`].
    legacy_ids: bool,
    conn: Connection,
    rx: mpsc::Receiver<Msg>,
    config: Config,
    clock: Arc<dyn Clock>,
    counters: Arc<Counters>,
    /// Writes of a failed batch that never ran: first in the next batch.
    backlog: VecDeque<Queued>,
    lanes: FairQueue<Queued>,
    closing: Option<CloseRequest>,
    /// Every sender is gone.
    gone: bool,
    checkpointer: Option<Checkpointer>,
    /// Since when large writes have been held for the WAL to catch up (see
    /// [`Writer::admit`]); `None` while none is held.
    held_since: Option<Instant>,
    offsets: NextOffsets,
}

/// A thread with its own connection that runs PASSIVE checkpoints when the
/// writer asks, so that copying the WAL into the database never stalls a
/// commit. (SQLite's own auto-checkpoint runs inside the committing
/// connection; it is turned off.)
pub(crate) struct Checkpointer {
    signal: std::sync::mpsc::SyncSender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    pub(crate) fn start(
        path: &std::path::Path,
        config: &Config,
        counters: Arc<Counters>,
    ) -> Result<Checkpointer, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .db()?;
        conn.busy_timeout(config.busy_timeout).db()?;
        conn.pragma_update(None, "wal_autocheckpoint", 0).db()?;
        let (signal, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("keel-session-checkpoint".into())
            .spawn(move || {
                let page = conn
                    .query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0))
                    .unwrap_or(4096)
                    .max(512) as u64;
                while rx.recv().is_ok() {
                    let started = Instant::now();
                    let owed = counters.wal_debt.load(Ordering::Acquire);
                    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                    }) {
                        Ok((frames, copied)) => {
                            // The debt is what the WAL holds that is not in
                            // the database yet (both figures count the whole
                            // log, not this run), plus what was committed
                            // while this checkpoint ran.
                            let uncopied = (frames - copied).max(0) as u64 * (page + 24);
                            let _ = counters.wal_debt.fetch_update(
                                Ordering::AcqRel,
                                Ordering::Acquire,
                                |d| Some(uncopied + d.saturating_sub(owed)),
                            );
                            counters.passive_checkpoints.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(
                                frames,
                                copied,
                                took_ms = started.elapsed().as_millis() as u64,
                                "passive wal checkpoint"
                            );
                        }
                        Err(e) => tracing::warn!(error = %e, "passive wal checkpoint failed"),
                    }
                }
            })
            .map_err(|e| StoreError::Io {
                detail: format!("cannot start the checkpoint thread: {e}"),
            })?;
        Ok(Checkpointer { signal, thread })
    }

    fn stop(self) {
        drop(self.signal);
        let _ = self.thread.join();
    }
}

impl Writer {
    pub(crate) fn new(
        mut conn: Connection,
        rx: mpsc::Receiver<Msg>,
        config: Config,
        counters: Arc<Counters>,
        checkpointer: Option<Checkpointer>,
    ) -> Result<Self, StoreError> {
        // After `wal_autocheckpoint` (which replaces the hook): how much
        // the WAL holds after each commit, which bounds it.
        let frame = conn
            .query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0))
            .db()?
            .max(512) as u64
            + 24;
        let held = counters.clone();
        conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, frames: i32| {
            held.wal_bytes
                .store(frames.max(0) as u64 * frame, Ordering::Release);
            Ok(())
        }))
        .db()?;
        let clock = config.clock.clone();
        // Unreadable: assume there are (a second index probe, never a
        // missed duplicate).
        let legacy_ids = conn
            .query_row(
                "SELECT 1 FROM meta WHERE key = 'ids_before_scopes'",
                [],
                |_| Ok(()),
            )
            .optional()
            .map_or(true, |found| found.is_some());
        Ok(Self {
            legacy_ids,
            conn,
            rx,
            config,
            clock,
            counters,
            backlog: VecDeque::new(),
            lanes: FairQueue::default(),
            closing: None,
            gone: false,
            checkpointer,
            held_since: None,
            offsets: NextOffsets::default(),
        })
    }

    /// Runs until every `Store` handle is gone or `close` is requested
    /// (then everything queued before the request commits first).
    pub(crate) fn run(mut self) {
        loop {
            let batch = self.collect();
            if batch.is_empty() {
                if let Some((reply, clean)) = self.closing.take() {
                    let result = self.shutdown(clean);
                    let _ = reply.send(result);
                    return;
                }
                if self.gone {
                    // Every sender is gone: the store was dropped without
                    // `close`, which leaves `clean_shutdown` false on purpose.
                    return;
                }
                continue;
            }
            self.commit(batch);
            self.maybe_checkpoint();
        }
    }

    /// Moves what is queued into the lanes (waiting for the first write
    /// when nothing waits), then takes the next batch: the backlog first,
    /// then the lanes in fair order.
    fn collect(&mut self) -> Vec<Queued> {
        let max = self.config.max_batch.max(1);
        if self.closing.is_none() && !self.gone {
            if self.backlog.is_empty() && self.lanes.is_empty() {
                match self.rx.blocking_recv() {
                    Some(m) => self.take(m),
                    None => self.gone = true,
                }
            }
            self.drain();
            // With a delay configured, a batch that runs dry early sleeps
            // once (a thread sleep, precise to tens of microseconds) and
            // takes whatever arrived meanwhile: the writers answered by the
            // previous commit are usually about to send their next write.
            if !self.config.max_batch_delay.is_zero()
                && self.backlog.len() + self.lanes.len() < max
                && self.closing.is_none()
                && !self.gone
            {
                std::thread::sleep(self.config.max_batch_delay);
                self.drain();
            }
        }
        let max_bytes = self.config.max_batch_bytes.max(1);
        let (mut batch, mut bytes) = (Vec::new(), 0usize);
        while batch.len() < max && (batch.is_empty() || bytes < max_bytes) {
            if !self.behind() {
                self.held_since = None;
            }
            let next = match self.backlog.pop_front() {
                Some(q) => Some(q),
                None if self.behind() => {
                    match self.lanes.pop_at_most(self.config.small_write_bytes) {
                        Some(q) => Some(q),
                        // Only large writes wait: a batch of them waits for the
                        // checkpoint (small writes that arrive meanwhile go on).
                        None if batch.is_empty() && !self.lanes.is_empty() => self.admit(),
                        None => None,
                    }
                }
                None => self.lanes.pop(),
            };
            let Some(q) = next else {
                break;
            };
            bytes += q.bytes;
            batch.push(q);
        }
        batch
    }

    /// Whether the WAL is behind its checkpoints by more than
    /// [`Config::wal_admit_bytes`], or holds more than that since its last
    /// restart while the checkpoint has not caught up (never while closing:
    /// everything queued commits first). Once the checkpoint has copied
    /// everything (no debt), the WAL restarts at the next commit, which a
    /// hold would only keep from happening: it goes on.
    fn behind(&self) -> bool {
        let admit = self.config.wal_admit_bytes;
        let debt = self.counters.wal_debt.load(Ordering::Acquire);
        self.closing.is_none()
            && !self.gone
            && (debt > admit
                || (debt > 0 && self.counters.wal_bytes.load(Ordering::Acquire) > admit))
    }

    /// Holds the large writes while the checkpoint catches up: returns the
    /// first small write that arrives meanwhile, or, once the WAL is no
    /// longer behind or the oldest hold has lasted [`Config::admit_wait`],
    /// the next write in fair order. The hold's start is kept across
    /// batches, so a stream of small writes cannot hold the large ones
    /// longer than that.
    fn admit(&mut self) -> Option<Queued> {
        let since = match self.held_since {
            Some(since) => since,
            None => {
                self.counters
                    .admission_waits
                    .fetch_add(1, Ordering::Relaxed);
                *self.held_since.insert(Instant::now())
            }
        };
        let until = since + self.config.admit_wait;
        let mut nudged: Option<Instant> = None;
        while self.behind() && Instant::now() < until {
            // Ask for a checkpoint now and then (a request is coalesced
            // while one runs).
            if nudged.is_none_or(|at| at.elapsed() >= std::time::Duration::from_millis(10)) {
                if let Some(c) = &self.checkpointer {
                    let _ = c.signal.try_send(());
                }
                nudged = Some(Instant::now());
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            self.drain();
            if let Some(q) = self.lanes.pop_at_most(self.config.small_write_bytes) {
                return Some(q);
            }
        }
        self.held_since = None;
        self.lanes.pop()
    }

    fn take(&mut self, m: Msg) {
        match m {
            Msg::Job(q) => self.lanes.push(q.lane, q.bytes, q),
            Msg::Close(reply, clean) => self.closing = Some((reply, clean)),
        }
    }

    /// Moves queued writes into the lanes, up to `write_queue` of them
    /// waiting there, and stops at a close request.
    fn drain(&mut self) {
        let cap = self.config.write_queue.max(1);
        while self.closing.is_none() && self.lanes.len() < cap {
            match self.rx.try_recv() {
                Ok(m) => self.take(m),
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.gone = true;
                    break;
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
            }
        }
    }

    /// Runs one batch in one transaction and answers every caller in it.
    ///
    /// Writes are built to check before they change anything, so a write that
    /// fails has usually changed nothing and the batch goes on without a
    /// savepoint (savepoints cost a statement journal per write). If a failed
    /// write did change rows, the batch is rolled back and re-run without it.
    fn commit(&mut self, mut jobs: Vec<Queued>) {
        // Writes that failed on their own; they hold their error and wrote nothing.
        let mut failed: Vec<Queued> = Vec::new();
        let result = loop {
            if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
                break Err(crate::error::sqlite(e));
            }
            match self.run_all(&mut jobs) {
                Step::Ran => break self.conn.execute_batch("COMMIT").db(),
                Step::Poisoned(i) => {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    self.offsets.clear();
                    failed.push(jobs.remove(i));
                }
                Step::Fatal(i, e) => {
                    // Writes that never ran in a failed batch get their own chance next time.
                    self.backlog.extend(jobs.split_off(i + 1));
                    break Err(e);
                }
            }
        };
        match &result {
            Ok(()) => {
                let written: u64 = jobs.iter().map(|q| q.bytes as u64 + WRITE_OVERHEAD).sum();
                self.counters.wal_debt.fetch_add(written, Ordering::AcqRel);
                self.counters.batches.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .writes
                    .fetch_add(jobs.len() as u64, Ordering::Relaxed);
                self.counters
                    .max_batch
                    .fetch_max(jobs.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                // SQLite may already have rolled back on its own (SQLITE_FULL can);
                // then ROLLBACK reports "no transaction is active", which is fine.
                let _ = self.conn.execute_batch("ROLLBACK");
                self.offsets.clear();
                self.counters.failed_batches.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, writes = jobs.len(), "batch rolled back");
            }
        }
        let commit = result.as_ref().map(|_| ());
        for q in jobs {
            q.job.finish(commit);
        }
        for q in failed {
            q.job.finish(Ok(()));
        }
    }

    /// Runs every write of the batch inside the open transaction.
    fn run_all(&self, jobs: &mut [Queued]) -> Step {
        for (i, Queued { job, .. }) in jobs.iter_mut().enumerate() {
            let ctx = Ctx {
                conn: &self.conn,
                now: self.clock.now_millis(),
                activity_limit: self.config.activity_limit,
                legacy_ids: self.legacy_ids,
                offsets: &self.offsets,
            };
            let before = self.conn.total_changes();
            match job.run(&ctx) {
                Outcome::Done => {}
                Outcome::Failed if self.conn.total_changes() == before => {}
                Outcome::Failed => return Step::Poisoned(i),
                Outcome::Fatal(e) => return Step::Fatal(i, e),
            }
        }
        Step::Ran
    }

    /// Keeps the WAL bounded: a `RESTART` checkpoint once it passes the limit.
    fn maybe_checkpoint(&mut self) {
        let size = self.counters.wal_bytes.load(Ordering::Acquire);
        if size <= self.config.wal_checkpoint_bytes {
            let owed = self.counters.wal_debt.load(Ordering::Acquire);
            if (size > self.config.wal_passive_bytes || owed > self.config.wal_passive_bytes)
                && let Some(c) = &self.checkpointer
            {
                // Coalesced: a full channel means one is already asked for.
                let _ = c.signal.try_send(());
            }
            return;
        }
        // Past the hard bound (readers, or commits arriving throughout,
        // kept the passive checkpoints from letting the WAL restart): a
        // RESTART checkpoint here, which waits for them. Not TRUNCATE: the
        // file keeps its pages for the next round.
        let started = Instant::now();
        match checkpoint(&self.conn, "RESTART") {
            Ok(busy) => {
                if !busy {
                    // Everything is in the database and the next commit
                    // writes from the WAL's beginning: nothing is owed.
                    self.counters.wal_debt.store(0, Ordering::Release);
                    self.counters.wal_bytes.store(0, Ordering::Release);
                }
                self.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    wal_bytes = size,
                    busy,
                    took_ms = started.elapsed().as_millis() as u64,
                    "wal checkpoint"
                );
            }
            Err(e) => tracing::warn!(error = %e, wal_bytes = size, "wal checkpoint failed"),
        }
    }

    /// Marks a clean shutdown and leaves the database without a WAL to replay.
    fn shutdown(&mut self, clean: bool) -> Result<(), StoreError> {
        if let Some(c) = self.checkpointer.take() {
            c.stop();
        }
        if clean {
            self.conn
                .execute(
                    "INSERT INTO meta(key, value) VALUES('clean_shutdown', '1')
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    [],
                )
                .db()?;
        }
        checkpoint(&self.conn, "TRUNCATE")?;
        Ok(())
    }
}

enum Step {
    /// Every write ran; commit.
    Ran,
    /// Write `i` failed after changing rows: roll back and run the rest again.
    Poisoned(usize),
    /// Write `i` hit a fatal error: the batch cannot commit.
    Fatal(usize, StoreError),
}

/// Runs a blocking checkpoint (`RESTART` or `TRUNCATE`); returns whether
/// it was blocked by a reader.
fn checkpoint(conn: &Connection, mode: &str) -> Result<bool, StoreError> {
    let sql = format!("PRAGMA wal_checkpoint({mode})");
    let busy: i64 = conn.query_row(&sql, [], |r| r.get(0)).db()?;
    Ok(busy != 0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::future::join_all;

    use crate::error::Db;
    use crate::{Config, StoreError};

    async fn open(config: Config) -> (crate::Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::Store::open(&dir.path().join("w.db"), config)
            .await
            .expect("open");
        (store, dir)
    }

    /// A write that changed rows and then failed is rolled back alone; the
    /// writes batched with it commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_write_after_changes_rolls_back_alone() {
        let (store, _dir) = open(Config::default()).await;
        let writes = (0..200).map(|i| {
            let store = store.clone();
            async move {
                store
                    .write(move |ctx| {
                        ctx.conn
                            .execute(
                                "INSERT INTO meta(key, value) VALUES(?1, 'x')",
                                [format!("k{i}")],
                            )
                            .db()?;
                        if i % 7 == 3 {
                            return Err(crate::error::backend(-1, format!("refused {i}")));
                        }
                        Ok(i)
                    })
                    .await
            }
        });
        let results = join_all(writes).await;
        for (i, r) in results.iter().enumerate() {
            let stored = store.meta(&format!("k{i}")).await.expect("read");
            if i % 7 == 3 {
                assert!(r.is_err(), "write {i} must fail");
                assert_eq!(stored, None, "write {i} must leave nothing behind");
            } else {
                assert_eq!(r.as_ref().ok(), Some(&i));
                assert_eq!(stored.as_deref(), Some("x"), "write {i} must commit");
            }
        }
        assert!(
            store.writer_stats().max_batch > 1,
            "the writes were batched"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batch_delay_collects_and_commits() {
        let (store, _dir) = open(Config {
            max_batch_delay: Duration::from_micros(300),
            ..Config::default()
        })
        .await;
        let writes = (0..300).map(|i| {
            let store = store.clone();
            async move { store.set_meta(&format!("d{i}"), "v").await }
        });
        for r in join_all(writes).await {
            r.expect("write");
        }
        let stats = store.writer_stats();
        assert_eq!(stats.writes, 300);
        assert!(stats.batches < 300, "{stats:?}");
        store.close().await.expect("close");
    }

    /// A small append queued behind a flood of large ones from another
    /// lane commits in the next batch, not after the flood; each lane keeps
    /// its own order; commits stay under the byte bound.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lanes_are_served_in_turn_within_the_byte_bound() {
        let (store, _dir) = open(Config {
            max_batch_bytes: 256 * 1024,
            ..Config::default()
        })
        .await;
        // Hold the writer inside a batch while everything else queues.
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, release_rx) = (
            std::sync::Mutex::new(started_tx),
            std::sync::Mutex::new(release_rx),
        );
        let blocker = store
            .submit(move |_ctx| {
                let _ = started_tx.lock().unwrap().send(());
                let _ = release_rx.lock().unwrap().recv();
                Ok::<(), StoreError>(())
            })
            .await
            .expect("queued");
        tokio::task::spawn_blocking(move || started_rx.recv())
            .await
            .unwrap()
            .unwrap();
        let big = vec![b'x'; 64 * 1024];
        let mut flood = Vec::new();
        for i in 0..400 {
            flood.push(
                store
                    .queue_append_in(1, "c", &format!("big{i}"), big.clone())
                    .await
                    .expect("queued"),
            );
        }
        let small = store
            .queue_append_in(2, "c", "small", b"{}".to_vec())
            .await
            .expect("queued");
        let before = store.writer_stats().batches;
        release_tx.send(()).unwrap();
        blocker.await.expect("blocker");
        let small = small.await.expect("small");
        let mut last = 0;
        for (i, f) in flood.into_iter().enumerate() {
            let a = f.await.expect("big");
            assert!(a.offset > last, "lane 1 keeps its order at {i}");
            last = a.offset;
        }
        // Fair order: the small append finishes first in virtual time.
        assert_eq!(small.offset, 1, "the small append waited for the flood");
        let stats = store.writer_stats();
        let batches = stats.batches - before;
        // 400 x 64 KiB at 256 KiB per commit: about 100 commits, not one.
        assert!(batches >= 90, "{batches} commits for 25 MiB");
        assert!(stats.max_batch <= 5, "{stats:?}");
    }
}
