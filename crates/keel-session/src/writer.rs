//! The single writer thread: owns the write connection and group-commits queued writes.
//!
//! Every write is a closure queued on a bounded channel. The writer takes the
//! first waiting write, then everything else already queued (up to
//! `max_batch`, optionally waiting up to `max_batch_delay` for more), and runs
//! them in one `BEGIN IMMEDIATE` transaction; a write that fails rolls back
//! alone (see [`Writer::commit`]). Callers are answered only after
//! `COMMIT` returned. A fatal error (disk full, corruption, I/O) rolls back the
//! whole batch and fails every write that ran in it; the writes that had not
//! run yet go into the next batch.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::clock::{Clock, UnixMillis};
use crate::config::Config;
use crate::error::{OpError, StoreError};

/// What a write closure sees: the connection (inside the batch transaction) and
/// the settings it may need.
pub(crate) struct Ctx<'a> {
    pub(crate) conn: &'a Connection,
    pub(crate) now: UnixMillis,
    pub(crate) activity_limit: usize,
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

pub(crate) enum Msg {
    Job(Box<dyn Job>),
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
}

pub(crate) struct Writer {
    conn: Connection,
    rx: mpsc::Receiver<Msg>,
    config: Config,
    clock: Arc<dyn Clock>,
    wal_path: PathBuf,
    counters: Arc<Counters>,
    backlog: VecDeque<Box<dyn Job>>,
    checkpointer: Option<Checkpointer>,
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
        )?;
        conn.busy_timeout(config.busy_timeout)?;
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let (signal, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("keel-session-checkpoint".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    let started = Instant::now();
                    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                    }) {
                        Ok((frames, copied)) => {
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
        conn: Connection,
        rx: mpsc::Receiver<Msg>,
        config: Config,
        wal_path: PathBuf,
        counters: Arc<Counters>,
        checkpointer: Option<Checkpointer>,
    ) -> Self {
        let clock = config.clock.clone();
        Self {
            conn,
            rx,
            config,
            clock,
            wal_path,
            counters,
            backlog: VecDeque::new(),
            checkpointer,
        }
    }

    /// Runs until every `Store` handle is gone or `close` is requested.
    pub(crate) fn run(mut self) {
        loop {
            let (batch, close) = self.collect();
            if batch.is_empty() && close.is_none() && self.backlog.is_empty() {
                // Every sender is gone: the store was dropped without `close`,
                // which leaves `clean_shutdown` false on purpose.
                return;
            }
            if !batch.is_empty() {
                self.commit(batch);
                self.maybe_checkpoint();
            }
            if let Some((reply, clean)) = close {
                while !self.backlog.is_empty() {
                    let batch: Vec<_> = self.backlog.drain(..).collect();
                    self.commit(batch);
                }
                let result = self.shutdown(clean);
                let _ = reply.send(result);
                return;
            }
        }
    }

    /// Takes the backlog or the next queued write, then whatever else is queued.
    fn collect(&mut self) -> (Vec<Box<dyn Job>>, Option<CloseRequest>) {
        let max = self.config.max_batch.max(1);
        let mut batch: Vec<Box<dyn Job>> = Vec::new();
        while batch.len() < max {
            match self.backlog.pop_front() {
                Some(job) => batch.push(job),
                None => break,
            }
        }
        if batch.is_empty() {
            match self.rx.blocking_recv() {
                Some(Msg::Job(job)) => batch.push(job),
                Some(Msg::Close(reply, clean)) => return (batch, Some((reply, clean))),
                None => return (batch, None),
            }
        }
        // With a delay configured, a batch that runs dry early sleeps once
        // (a thread sleep, precise to tens of microseconds) and takes whatever
        // arrived meanwhile: the writers answered by the previous commit are
        // usually about to send their next write.
        let mut slept = self.config.max_batch_delay.is_zero();
        while batch.len() < max {
            match self.rx.try_recv() {
                Ok(Msg::Job(job)) => batch.push(job),
                Ok(Msg::Close(reply, clean)) => return (batch, Some((reply, clean))),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) if slept => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    std::thread::sleep(self.config.max_batch_delay);
                    slept = true;
                }
            }
        }
        (batch, None)
    }

    /// Runs one batch in one transaction and answers every caller in it.
    ///
    /// Writes are built to check before they change anything, so a write that
    /// fails has usually changed nothing and the batch goes on without a
    /// savepoint (savepoints cost a statement journal per write). If a failed
    /// write did change rows, the batch is rolled back and re-run without it.
    fn commit(&mut self, mut jobs: Vec<Box<dyn Job>>) {
        // Writes that failed on their own; they hold their error and wrote nothing.
        let mut failed: Vec<Box<dyn Job>> = Vec::new();
        let result = loop {
            if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
                break Err(StoreError::from(e));
            }
            match self.run_all(&mut jobs) {
                Step::Ran => break self.conn.execute_batch("COMMIT").map_err(StoreError::from),
                Step::Poisoned(i) => {
                    let _ = self.conn.execute_batch("ROLLBACK");
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
                self.counters.failed_batches.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, writes = jobs.len(), "batch rolled back");
            }
        }
        let commit = result.as_ref().map(|_| ());
        for job in jobs {
            job.finish(commit);
        }
        for job in failed {
            job.finish(Ok(()));
        }
    }

    /// Runs every write of the batch inside the open transaction.
    fn run_all(&self, jobs: &mut [Box<dyn Job>]) -> Step {
        for (i, job) in jobs.iter_mut().enumerate() {
            let ctx = Ctx {
                conn: &self.conn,
                now: self.clock.now_millis(),
                activity_limit: self.config.activity_limit,
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

    /// Keeps the WAL bounded: a `TRUNCATE` checkpoint once it passes the limit.
    fn maybe_checkpoint(&mut self) {
        let size = std::fs::metadata(&self.wal_path)
            .map(|m| m.len())
            .unwrap_or(0);
        if size <= self.config.wal_checkpoint_bytes {
            if size > self.config.wal_passive_bytes
                && let Some(c) = &self.checkpointer
            {
                // Coalesced: a full channel means one is already asked for.
                let _ = c.signal.try_send(());
            }
            return;
        }
        // Past the hard bound (readers kept the passive checkpoints from
        // finishing): a TRUNCATE checkpoint here, which waits for them.
        let started = Instant::now();
        match checkpoint(&self.conn) {
            Ok(busy) => {
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
            self.conn.execute(
                "INSERT INTO meta(key, value) VALUES('clean_shutdown', '1')
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [],
            )?;
        }
        checkpoint(&self.conn)?;
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

/// Runs a `TRUNCATE` checkpoint; returns whether it was blocked by a reader.
fn checkpoint(conn: &Connection) -> Result<bool, StoreError> {
    let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
    Ok(busy != 0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::future::join_all;

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
                        ctx.conn.execute(
                            "INSERT INTO meta(key, value) VALUES(?1, 'x')",
                            [format!("k{i}")],
                        )?;
                        if i % 7 == 3 {
                            return Err(StoreError::Sqlite {
                                code: -1,
                                message: format!("refused {i}"),
                            });
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
}
