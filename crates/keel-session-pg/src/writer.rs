//! Group commit of appends: one task per node commits whatever is queued
//! in one transaction, pipelined on one pooled connection.

use deadpool_postgres::Pool;
use keel_session::{Appended, StoreError};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;

use crate::PgConfig;
use crate::error::{pg, pool, retryable};

/// One append: the dedup probe, the offset bump and the insert in one
/// statement. The channel's row is locked by the batch beforehand, so the
/// bump neither waits nor races; a concurrent writer of the same id on
/// another node ends in a unique violation, and the retry finds its row.
pub(crate) const APPEND: &str = r#"
WITH dup AS (
    SELECT seq, at FROM messages WHERE channel = $1::text AND msg_id = $3::text AND publisher = $2::text
), bump AS (
    UPDATE channels SET next_offset = next_offset + 1
    WHERE name = $1 AND NOT EXISTS (SELECT 1 FROM dup)
    RETURNING next_offset - 1 AS seq
), ins AS (
    INSERT INTO messages (channel, seq, publisher, msg_id, at, payload)
    SELECT $1::text, seq, $2::text, $3::text, $5::bigint, $4::bytea FROM bump
    RETURNING seq, at
)
SELECT seq, at, true FROM dup
UNION ALL
SELECT seq, at, false FROM ins
"#;

/// Creates the batch's missing channel rows (in name order, bytewise)...
pub(crate) const CREATE_CHANNELS: &str = r#"
INSERT INTO channels (name, next_offset)
SELECT n, 1 FROM unnest($1::text[]) AS n ORDER BY n COLLATE "C"
ON CONFLICT DO NOTHING
"#;

/// ...then, in a statement of its own (which sees the rows the first one
/// or a concurrent batch created), locks them all in name order: batches
/// on different nodes take their locks in one order. (Two batches creating
/// the same new channels at once can still meet in the insert; PostgreSQL
/// breaks that deadlock and the batch is run again.)
pub(crate) const LOCK_CHANNELS: &str = r#"
SELECT 1 FROM channels WHERE name = ANY($1) ORDER BY name FOR UPDATE
"#;

/// A queued append.
pub(crate) struct Append {
    pub(crate) scope: String,
    pub(crate) channel: String,
    pub(crate) msg_id: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) reply: oneshot::Sender<Result<Appended, StoreError>>,
}

/// What the writer task is sent.
pub(crate) enum Job {
    Append(Append),
    /// Finish everything queued before, answer, and stop.
    Close(oneshot::Sender<()>),
}

pub(crate) struct Writer {
    pool: Pool,
    rx: mpsc::Receiver<Job>,
    config: PgConfig,
}

impl Writer {
    pub(crate) fn new(pool: Pool, rx: mpsc::Receiver<Job>, config: PgConfig) -> Self {
        Writer { pool, rx, config }
    }

    pub(crate) async fn run(mut self) {
        while let Some(job) = self.rx.recv().await {
            let mut batch = Vec::new();
            let mut close = None;
            match job {
                Job::Append(a) => batch.push(a),
                Job::Close(tx) => close = Some(tx),
            }
            let mut bytes = batch.first().map_or(0, |a| a.payload.len());
            while close.is_none()
                && batch.len() < self.config.max_batch
                && bytes < self.config.max_batch_bytes
            {
                match self.rx.try_recv() {
                    Ok(Job::Append(a)) => {
                        bytes += a.payload.len();
                        batch.push(a);
                    }
                    Ok(Job::Close(tx)) => close = Some(tx),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.commit(batch).await;
            }
            if let Some(tx) = close {
                let _ = tx.send(());
                return;
            }
        }
    }

    /// Commits `batch` in one transaction. If that fails for a reason
    /// local to one append (a unique violation from a concurrent writer,
    /// a deadlock), each append is committed on its own, so that one bad
    /// append fails alone; if the server is gone or full, all fail.
    async fn commit(&self, batch: Vec<Append>) {
        let result = self.attempt(&batch).await;
        match result {
            Ok(done) => {
                for (job, appended) in batch.into_iter().zip(done) {
                    let _ = job.reply.send(Ok(appended));
                }
            }
            Err(e) if batch.len() > 1 && !whole_batch(&e) => {
                for job in batch {
                    let r = self.single(&job).await;
                    let _ = job.reply.send(r);
                }
            }
            Err(e) if batch.len() == 1 && retryable(&e) => {
                for job in batch {
                    let r = self.single(&job).await;
                    let _ = job.reply.send(r);
                }
            }
            Err(e) => {
                for job in batch {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// One append in its own transaction, run again while it fails with
    /// a transient conflict (at most four times).
    async fn single(&self, job: &Append) -> Result<Appended, StoreError> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.attempt(std::slice::from_ref(job)).await {
                Ok(mut done) => return done.pop().ok_or(StoreError::Closed),
                Err(e) if tries < 4 && retryable(&e) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    async fn attempt(&self, jobs: &[Append]) -> Result<Vec<Appended>, StoreError> {
        let now = self.config.clock.now_millis();
        let mut conn = self.pool.get().await.map_err(pool)?;
        let tx = conn.transaction().await.map_err(pg)?;
        let mut names: Vec<&str> = jobs.iter().map(|j| j.channel.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let create = tx.prepare_cached(CREATE_CHANNELS).await.map_err(pg)?;
        tx.execute(&create, &[&names]).await.map_err(pg)?;
        let lock = tx.prepare_cached(LOCK_CHANNELS).await.map_err(pg)?;
        tx.execute(&lock, &[&names]).await.map_err(pg)?;
        let append = tx.prepare_cached(APPEND).await.map_err(pg)?;
        let params: Vec<[&(dyn ToSql + Sync); 5]> = jobs
            .iter()
            .map(|j| -> [&(dyn ToSql + Sync); 5] {
                [&j.channel, &j.scope, &j.msg_id, &j.payload, &now]
            })
            .collect();
        // Sent back to back without waiting for answers (the driver
        // pipelines concurrent queries); the server runs them in order.
        let queries = params.iter().map(|p| tx.query_one(&append, p));
        let rows = futures::future::try_join_all(queries).await.map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| Appended {
                offset: r.get::<_, i64>(0) as u64,
                at: r.get(1),
                duplicate: r.get(2),
            })
            .collect())
    }
}

/// Failures that no retry of a single append can mend; a lock or
/// statement timeout (`55P03`, `57014`) among them: retrying each append
/// alone would wait the timeout once per append.
fn whole_batch(e: &StoreError) -> bool {
    match e {
        StoreError::Postgres { sqlstate, .. } => matches!(sqlstate.as_str(), "55P03" | "57014"),
        _ => matches!(
            e,
            StoreError::Unavailable { .. }
                | StoreError::DiskFull { .. }
                | StoreError::Corrupt { .. }
                | StoreError::Io { .. }
                | StoreError::Closed
        ),
    }
}
