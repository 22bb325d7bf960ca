//! The single writer thread: owns the write connection and group-commits queued writes.
//!
//! Every write is a closure queued on a bounded channel. The writer takes the
//! first waiting write, then everything else already queued (up to
//! `max_batch`, optionally waiting up to `max_batch_delay` for more), and runs
//! them in one `BEGIN IMMEDIATE` transaction, each inside its own savepoint so
//! that one failing write rolls back alone. Callers are answered only after
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

pub(crate) trait Job: Send {
    fn run(&mut self, ctx: &Ctx<'_>) -> Outcome;
    fn finish(self: Box<Self>, commit: Result<(), &StoreError>);
}

pub(crate) struct Op<T, E, F> {
    f: Option<F>,
    out: Option<Result<T, E>>,
    tx: Option<oneshot::Sender<Result<T, E>>>,
}

impl<T, E, F> Op<T, E, F> {
    pub(crate) fn new(f: F, tx: oneshot::Sender<Result<T, E>>) -> Self {
        Self {
            f: Some(f),
            out: None,
            tx: Some(tx),
        }
    }
}

impl<T, E, F> Job for Op<T, E, F>
where
    T: Send + 'static,
    E: OpError,
    F: FnOnce(&Ctx<'_>) -> Result<T, E> + Send + 'static,
{
    fn run(&mut self, ctx: &Ctx<'_>) -> Outcome {
        let Some(f) = self.f.take() else {
            return Outcome::Failed;
        };
        let out = f(ctx);
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

pub(crate) enum Msg {
    Job(Box<dyn Job>),
    Close(CloseReply),
}

/// Counters the writer keeps; read through [`Store::writer_stats`](crate::Store::writer_stats).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) batches: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) failed_batches: AtomicU64,
    pub(crate) checkpoints: AtomicU64,
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
}

impl Writer {
    pub(crate) fn new(
        conn: Connection,
        rx: mpsc::Receiver<Msg>,
        config: Config,
        wal_path: PathBuf,
        counters: Arc<Counters>,
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
        }
    }

    /// Runs until every `Store` handle is gone or `close` is requested.
    pub(crate) fn run(mut self) {
        let timer = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .ok();
        loop {
            let (batch, close) = self.collect(timer.as_ref());
            if batch.is_empty() && close.is_none() && self.backlog.is_empty() {
                // Every sender is gone: the store was dropped without `close`,
                // which leaves `clean_shutdown` false on purpose.
                return;
            }
            if !batch.is_empty() {
                self.commit(batch);
                self.maybe_checkpoint();
            }
            if let Some(reply) = close {
                while !self.backlog.is_empty() {
                    let batch: Vec<_> = self.backlog.drain(..).collect();
                    self.commit(batch);
                }
                let result = self.shutdown();
                let _ = reply.send(result);
                return;
            }
        }
    }

    /// Takes the backlog or the next queued write, then whatever else is queued.
    fn collect(
        &mut self,
        timer: Option<&tokio::runtime::Runtime>,
    ) -> (Vec<Box<dyn Job>>, Option<CloseReply>) {
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
                Some(Msg::Close(reply)) => return (batch, Some(reply)),
                None => return (batch, None),
            }
        }
        let deadline = tokio::time::Instant::now() + self.config.max_batch_delay;
        while batch.len() < max {
            match self.rx.try_recv() {
                Ok(Msg::Job(job)) => batch.push(job),
                Ok(Msg::Close(reply)) => return (batch, Some(reply)),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    let Some(rt) = timer.filter(|_| !self.config.max_batch_delay.is_zero()) else {
                        break;
                    };
                    let next = rt.block_on(tokio::time::timeout_at(deadline, self.rx.recv()));
                    match next {
                        Ok(Some(Msg::Job(job))) => batch.push(job),
                        Ok(Some(Msg::Close(reply))) => return (batch, Some(reply)),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
        (batch, None)
    }

    /// Runs one batch in one transaction and answers every caller in it.
    fn commit(&mut self, batch: Vec<Box<dyn Job>>) {
        let count = batch.len();
        if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
            let e = StoreError::from(e);
            self.counters.failed_batches.fetch_add(1, Ordering::Relaxed);
            for job in batch {
                job.finish(Err(&e));
            }
            return;
        }
        let mut ran: Vec<Box<dyn Job>> = Vec::with_capacity(count);
        let mut jobs = batch.into_iter();
        let mut fatal = None;
        for mut job in jobs.by_ref() {
            let ctx = Ctx {
                conn: &self.conn,
                now: self.clock.now_millis(),
                activity_limit: self.config.activity_limit,
            };
            if let Err(e) = savepoint(&self.conn, "SAVEPOINT op") {
                fatal = Some(e);
                ran.push(job);
                break;
            }
            let outcome = job.run(&ctx);
            ran.push(job);
            let step = match outcome {
                Outcome::Done => savepoint(&self.conn, "RELEASE op"),
                Outcome::Failed => savepoint(&self.conn, "ROLLBACK TO op")
                    .and_then(|()| savepoint(&self.conn, "RELEASE op")),
                Outcome::Fatal(e) => Err(e),
            };
            if let Err(e) = step {
                fatal = Some(e);
                break;
            }
        }
        // Writes that never ran in a failed batch get their own chance next time.
        self.backlog.extend(jobs);

        let result = match fatal {
            Some(e) => Err(e),
            None => self.conn.execute_batch("COMMIT").map_err(StoreError::from),
        };
        match &result {
            Ok(()) => {
                self.counters.batches.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .writes
                    .fetch_add(ran.len() as u64, Ordering::Relaxed);
                self.counters
                    .max_batch
                    .fetch_max(ran.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                // SQLite may already have rolled back on its own (SQLITE_FULL can);
                // then ROLLBACK reports "no transaction is active", which is fine.
                let _ = self.conn.execute_batch("ROLLBACK");
                self.counters.failed_batches.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, writes = ran.len(), "batch rolled back");
            }
        }
        let commit = result.as_ref().map(|_| ());
        for job in ran {
            job.finish(commit);
        }
    }

    /// Keeps the WAL bounded: a `TRUNCATE` checkpoint once it passes the limit.
    fn maybe_checkpoint(&mut self) {
        let size = std::fs::metadata(&self.wal_path)
            .map(|m| m.len())
            .unwrap_or(0);
        if size <= self.config.wal_checkpoint_bytes {
            return;
        }
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
    fn shutdown(&mut self) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO meta(key, value) VALUES('clean_shutdown', '1')
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [],
        )?;
        checkpoint(&self.conn)?;
        Ok(())
    }
}

fn savepoint(conn: &Connection, sql: &str) -> Result<(), StoreError> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Runs a `TRUNCATE` checkpoint; returns whether it was blocked by a reader.
fn checkpoint(conn: &Connection) -> Result<bool, StoreError> {
    let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
    Ok(busy != 0)
}
