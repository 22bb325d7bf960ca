//! Group commit of appends: one task per node commits whatever is queued
//! in one transaction, pipelined on one pooled connection. Appends wait in
//! lanes (a caller's, e.g. a client connection's) taken in weighted fair
//! order ([`keel_session::fair::FairQueue`]), as the SQLite writer's do: a
//! flood of large appends from one lane delays another lane's append by
//! about one commit, not by its whole backlog.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};

use deadpool_postgres::Pool;
use keel_session::fair::FairQueue;
use keel_session::{Appended, Offset, StoreError, UnixMillis};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Statement, Transaction};

use crate::PgConfig;
use crate::error::{pg, pool, retryable};

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

/// The batch's appends committed before (a publish sent again): their
/// offsets and times, by (channel, msg_id, publisher).
pub(crate) const FIND_DUPLICATES: &str = r#"
SELECT m.channel, m.msg_id, m.publisher, m.seq, m.at
FROM messages m
JOIN unnest($1::text[], $2::text[], $3::text[]) AS k (channel, msg_id, publisher)
  ON m.channel = k.channel AND m.msg_id = k.msg_id AND m.publisher = k.publisher
"#;

/// Takes `n` offsets from each channel (rows the batch has locked);
/// returns the first of each.
pub(crate) const TAKE_OFFSETS: &str = r#"
UPDATE channels AS c SET next_offset = c.next_offset + v.n
FROM unnest($1::text[], $2::bigint[]) AS v (name, n)
WHERE c.name = v.name
RETURNING c.name, c.next_offset - v.n
"#;

/// The batch's new messages, in one statement.
pub(crate) const INSERT_MESSAGES: &str = r#"
INSERT INTO messages (channel, seq, publisher, msg_id, at, payload)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::bytea[])
"#;

/// The statements of [`append_batch`], prepared on one connection.
pub(crate) struct Statements {
    create: Statement,
    lock: Statement,
    find: Statement,
    take: Statement,
    insert: Statement,
}

impl Statements {
    /// From the pooled connection's statement cache.
    pub(crate) async fn cached(
        tx: &deadpool_postgres::Transaction<'_>,
    ) -> Result<Statements, StoreError> {
        Ok(Statements {
            create: tx.prepare_cached(CREATE_CHANNELS).await.map_err(pg)?,
            lock: tx.prepare_cached(LOCK_CHANNELS).await.map_err(pg)?,
            find: tx.prepare_cached(FIND_DUPLICATES).await.map_err(pg)?,
            take: tx.prepare_cached(TAKE_OFFSETS).await.map_err(pg)?,
            insert: tx.prepare_cached(INSERT_MESSAGES).await.map_err(pg)?,
        })
    }
}

/// One append of a batch: (channel, scope, msg_id, payload).
pub(crate) type Item<'a> = (&'a str, &'a str, &'a str, &'a [u8]);

/// Appends `items` inside `tx`, set-based: a constant number of statements
/// whatever the batch's size. The channels' rows are created, then locked
/// in name order, so that offsets are taken without waits or races; a
/// message id already in its channel for the same scope (committed
/// before, or earlier in this batch) is a duplicate with its original
/// offset and time. A concurrent writer of the same id on another node
/// ends in a unique violation, and the retry finds its row.
pub(crate) async fn append_batch(
    tx: &Transaction<'_>,
    st: &Statements,
    now: UnixMillis,
    items: &[Item<'_>],
) -> Result<Vec<Appended>, StoreError> {
    let mut names: Vec<&str> = items.iter().map(|i| i.0).collect();
    names.sort_unstable();
    names.dedup();

    // The first item of each (channel, msg_id, scope); later ones repeat it.
    let mut first: HashMap<(&str, &str, &str), usize> = HashMap::new();
    let mut repeats = Vec::new();
    for (k, (channel, scope, id, _)) in items.iter().enumerate() {
        match first.entry((channel, id, scope)) {
            Entry::Occupied(e) => repeats.push((k, *e.get())),
            Entry::Vacant(e) => {
                e.insert(k);
            }
        }
    }
    let mut channels = Vec::with_capacity(first.len());
    let mut ids = Vec::with_capacity(first.len());
    let mut scopes = Vec::with_capacity(first.len());
    for (channel, id, scope) in first.keys() {
        channels.push(*channel);
        ids.push(*id);
        scopes.push(*scope);
    }
    // Create, lock, find: sent back to back (the driver pipelines them;
    // the server runs them in order), one round trip for the three.
    let by_name: [&(dyn ToSql + Sync); 1] = [&names];
    let by_key: [&(dyn ToSql + Sync); 3] = [&channels, &ids, &scopes];
    let (_, locked, found) = futures::try_join!(
        tx.execute(&st.create, &by_name),
        tx.execute(&st.lock, &by_name),
        tx.query(&st.find, &by_key),
    )
    .map_err(pg)?;
    if locked != names.len() as u64 {
        // A session purge removed a channel's row between the two
        // statements: a conflict, run again (the row is created afresh).
        return Err(StoreError::Postgres {
            sqlstate: "40001".into(),
            message: "a channel's row was removed while the batch locked it (session purge)".into(),
        });
    }
    let mut done: Vec<Option<Appended>> = vec![None; items.len()];
    for row in found {
        let key: (&str, &str, &str) = (row.get(0), row.get(1), row.get(2));
        if let Some(&k) = first.get(&key) {
            done[k] = Some(Appended {
                offset: row.get::<_, i64>(3) as Offset,
                at: row.get(4),
                duplicate: true,
            });
        }
    }

    // The new ones take their channel's next offsets in batch order.
    let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
    for &k in first.values() {
        if done[k].is_none() {
            *counts.entry(items[k].0).or_default() += 1;
        }
    }
    if !counts.is_empty() {
        let (names, ns): (Vec<&str>, Vec<i64>) = counts.into_iter().unzip();
        let taken = tx.query(&st.take, &[&names, &ns]).await.map_err(pg)?;
        let mut next: HashMap<&str, i64> = taken.iter().map(|r| (r.get(0), r.get(1))).collect();
        let fresh: Vec<usize> = (0..items.len())
            .filter(|&k| {
                done[k].is_none() && first.get(&(items[k].0, items[k].2, items[k].1)) == Some(&k)
            })
            .collect();
        let mut seqs = Vec::with_capacity(fresh.len());
        for &k in &fresh {
            let seq = next
                .get_mut(items[k].0)
                .ok_or_else(|| StoreError::Corrupt {
                    detail: format!("channel {} has no row after it was locked", items[k].0),
                })?;
            seqs.push(*seq);
            done[k] = Some(Appended {
                offset: *seq as Offset,
                at: now,
                duplicate: false,
            });
            *seq += 1;
        }
        let channels: Vec<&str> = fresh.iter().map(|&k| items[k].0).collect();
        let scopes: Vec<&str> = fresh.iter().map(|&k| items[k].1).collect();
        let ids: Vec<&str> = fresh.iter().map(|&k| items[k].2).collect();
        let ats = vec![now; fresh.len()];
        let payloads: Vec<&[u8]> = fresh.iter().map(|&k| items[k].3).collect();
        tx.execute(
            &st.insert,
            &[&channels, &seqs, &scopes, &ids, &ats, &payloads],
        )
        .await
        .map_err(pg)?;
    }
    for (k, of) in repeats {
        done[k] = done[of].map(|a| Appended {
            duplicate: true,
            ..a
        });
    }
    done.into_iter()
        .map(|a| a.ok_or(StoreError::Closed))
        .collect()
}

/// A queued append.
pub(crate) struct Append {
    pub(crate) lane: u64,
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
    lanes: FairQueue<Append>,
    /// A close request: answered once everything queued before it committed.
    closing: Option<oneshot::Sender<()>>,
    /// Every sender is gone.
    gone: bool,
}

impl Writer {
    pub(crate) fn new(pool: Pool, rx: mpsc::Receiver<Job>, config: PgConfig) -> Self {
        Writer {
            pool,
            rx,
            config,
            lanes: FairQueue::default(),
            closing: None,
            gone: false,
        }
    }

    pub(crate) async fn run(mut self) {
        loop {
            if self.lanes.is_empty() {
                if let Some(tx) = self.closing.take() {
                    let _ = tx.send(());
                    return;
                }
                if self.gone {
                    return;
                }
                match self.rx.recv().await {
                    Some(job) => self.take(job),
                    None => self.gone = true,
                }
            }
            self.drain();
            let batch = self.next_batch();
            if !batch.is_empty() {
                self.commit(batch).await;
            }
        }
    }

    fn take(&mut self, job: Job) {
        match job {
            Job::Append(a) => self.lanes.push(a.lane, a.payload.len(), a),
            Job::Close(tx) => self.closing = Some(tx),
        }
    }

    /// Moves queued appends into the lanes, up to `write_queue` of them
    /// waiting there, and stops at a close request.
    fn drain(&mut self) {
        let cap = self.config.write_queue.max(1);
        while self.closing.is_none() && self.lanes.len() < cap {
            match self.rx.try_recv() {
                Ok(job) => self.take(job),
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.gone = true;
                    break;
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
            }
        }
    }

    /// The lanes' next appends in fair order, up to `max_batch` of them
    /// and `max_batch_bytes` of payload (at least one).
    fn next_batch(&mut self) -> Vec<Append> {
        let max = self.config.max_batch.max(1);
        let max_bytes = self.config.max_batch_bytes.max(1);
        let (mut batch, mut bytes) = (Vec::new(), 0usize);
        while batch.len() < max {
            match self.lanes.peek_bytes() {
                Some(next) if batch.is_empty() || bytes + next <= max_bytes => {}
                _ => break,
            }
            let Some(a) = self.lanes.pop() else { break };
            bytes += a.payload.len();
            batch.push(a);
        }
        batch
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
        let st = Statements::cached(&tx).await?;
        let items: Vec<Item<'_>> = jobs
            .iter()
            .map(|j| {
                (
                    j.channel.as_str(),
                    j.scope.as_str(),
                    j.msg_id.as_str(),
                    j.payload.as_slice(),
                )
            })
            .collect();
        let done = append_batch(&tx, &st, now, &items).await?;
        tx.commit().await.map_err(pg)?;
        Ok(done)
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
