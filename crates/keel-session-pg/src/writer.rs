//! Group commit of appends: one task per node commits whatever is queued
//! in one transaction, pipelined on one pooled connection. Appends wait in
//! lanes (a caller's, e.g. a client connection's) taken in weighted fair
//! order ([`keel_store::fair::FairQueue`]), as the SQLite writer's do: a
//! flood of large appends from one lane delays another lane's append by
//! about one commit, not by its whole backlog.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use deadpool_postgres::{GenericClient, Pool};
use keel_store::fair::FairQueue;
use keel_store::{Appended, Clock, Offset, StoreError, UnixMillis};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Statement;
use tokio_postgres::types::ToSql;

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

/// Takes `n` offsets from each channel (rows the batch has locked) and
/// inserts the batch's new messages at them, in one statement: message
/// `idx` of a channel (0-based, batch order) gets the channel's first
/// offset plus `idx`. Returns each channel's first offset. A channel
/// missing from the bump (it cannot be: its row is locked) leaves its
/// messages without an offset, which the NOT NULL constraint refuses:
/// the statement fails whole rather than leave them out.
pub(crate) const TAKE_AND_INSERT: &str = r#"
WITH taken AS (
  UPDATE channels AS c SET next_offset = c.next_offset + v.n
  FROM unnest($1::text[], $2::bigint[]) AS v (name, n)
  WHERE c.name = v.name
  RETURNING c.name, c.next_offset - v.n AS first
), inserted AS (
  INSERT INTO messages (channel, seq, publisher, msg_id, at, payload)
  SELECT m.channel, t.first + m.idx, m.publisher, m.msg_id, m.at, m.payload
  FROM unnest($3::text[], $4::bigint[], $5::text[], $6::text[], $7::bigint[], $8::bytea[])
    AS m (channel, idx, publisher, msg_id, at, payload)
  LEFT JOIN taken t ON t.name = m.channel
)
SELECT name, first FROM taken
"#;

/// The statements of [`append_batch`], prepared on one connection.
pub(crate) struct Statements {
    create: Statement,
    lock: Statement,
    find: Statement,
    take_and_insert: Statement,
}

impl Statements {
    /// From the pooled connection's statement cache.
    pub(crate) async fn cached<C: GenericClient>(client: &C) -> Result<Statements, StoreError> {
        Ok(Statements {
            create: client.prepare_cached(CREATE_CHANNELS).await.map_err(pg)?,
            lock: client.prepare_cached(LOCK_CHANNELS).await.map_err(pg)?,
            find: client.prepare_cached(FIND_DUPLICATES).await.map_err(pg)?,
            take_and_insert: client.prepare_cached(TAKE_AND_INSERT).await.map_err(pg)?,
        })
    }
}

/// One append of a batch: (channel, scope, msg_id, payload).
pub(crate) type Item<'a> = (&'a str, &'a str, &'a str, &'a [u8]);

/// Whose transaction [`append_batch`] runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// The caller's, already open; the caller commits.
    Caller,
    /// Its own: `BEGIN` goes out with the first statements and `COMMIT`
    /// with the last, two round trips in all. On an error the connection
    /// may be left in the transaction: the caller rolls it back.
    Own,
}

/// Appends `items` on `client`, in the caller's transaction or its own
/// (`framing`), set-based: a constant number of statements
/// whatever the batch's size. The channels' rows are created, then locked
/// in name order, so that offsets are taken without waits or races; a
/// message id already in its channel for the same scope (committed
/// before, or earlier in this batch) is a duplicate with its original
/// offset and time. A concurrent writer of the same id on another node
/// ends in a unique violation, and the retry finds its row.
pub(crate) async fn append_batch<C: GenericClient>(
    client: &C,
    st: &Statements,
    now: UnixMillis,
    items: &[Item<'_>],
    framing: Framing,
) -> Result<Vec<Appended>, StoreError> {
    let own = framing == Framing::Own;
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
    // (Begin,) create, lock, find: sent back to back (the driver
    // pipelines them; the server runs them in order), one round trip.
    let by_name: [&(dyn ToSql + Sync); 1] = [&names];
    let by_key: [&(dyn ToSql + Sync); 3] = [&channels, &ids, &scopes];
    let begin = async {
        if own {
            client.batch_execute("BEGIN").await
        } else {
            Ok(())
        }
    };
    let (_, _, locked, found) = futures::try_join!(
        begin,
        client.execute(&st.create, &by_name),
        client.execute(&st.lock, &by_name),
        client.query(&st.find, &by_key),
    )
    .map_err(pg)?;
    if locked != names.len() as u64 {
        // A session purge removed a channel's row between the two
        // statements: a conflict, run again (the row is created afresh).
        return Err(crate::error::backend(
            "40001",
            "a channel's row was removed while the batch locked it (session purge)",
        ));
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

    // The new ones take their channel's next offsets in batch order:
    // bumped and inserted in one statement (then, in its own transaction,
    // the commit, sent with it: if the statement fails, the commit rolls
    // back).
    let fresh: Vec<usize> = (0..items.len())
        .filter(|&k| {
            done[k].is_none() && first.get(&(items[k].0, items[k].2, items[k].1)) == Some(&k)
        })
        .collect();
    let commit = async {
        if own {
            client.batch_execute("COMMIT").await
        } else {
            Ok(())
        }
    };
    if fresh.is_empty() {
        commit.await.map_err(pg)?;
    } else {
        let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
        let mut idx = Vec::with_capacity(fresh.len());
        for &k in &fresh {
            let n = counts.entry(items[k].0).or_default();
            idx.push(*n);
            *n += 1;
        }
        let (names, ns): (Vec<&str>, Vec<i64>) = counts.into_iter().unzip();
        let channels: Vec<&str> = fresh.iter().map(|&k| items[k].0).collect();
        let scopes: Vec<&str> = fresh.iter().map(|&k| items[k].1).collect();
        let ids: Vec<&str> = fresh.iter().map(|&k| items[k].2).collect();
        let ats = vec![now; fresh.len()];
        let payloads: Vec<&[u8]> = fresh.iter().map(|&k| items[k].3).collect();
        let params: [&(dyn ToSql + Sync); 8] =
            [&names, &ns, &channels, &idx, &scopes, &ids, &ats, &payloads];
        let (taken, ()) =
            futures::try_join!(client.query(&st.take_and_insert, &params), commit).map_err(pg)?;
        let first_of: HashMap<&str, i64> = taken.iter().map(|r| (r.get(0), r.get(1))).collect();
        for (&k, i) in fresh.iter().zip(&idx) {
            // Unreachable: a channel missing from the bump failed the
            // statement (its messages' NULL offsets), and the statement ran
            // before this check and (in its own transaction) the commit.
            let first = first_of
                .get(items[k].0)
                .ok_or_else(|| StoreError::Corrupt {
                    detail: format!("channel {} has no row after it was locked", items[k].0),
                })?;
            done[k] = Some(Appended {
                offset: (first + i) as Offset,
                at: now,
                duplicate: false,
            });
        }
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
    /// The store's clock.
    clock: Arc<dyn Clock>,
    lanes: FairQueue<Append>,
    /// A close request: answered once everything queued before it committed.
    closing: Option<oneshot::Sender<()>>,
    /// Every sender is gone.
    gone: bool,
}

impl Writer {
    pub(crate) fn new(
        pool: Pool,
        rx: mpsc::Receiver<Job>,
        config: PgConfig,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Writer {
            pool,
            rx,
            config,
            clock,
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
        let now = self.clock.now_millis();
        let mut conn = InTransaction(Some(self.pool.get().await.map_err(pool)?));
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
        let result = {
            let client = conn.0.as_ref().ok_or(StoreError::Closed)?;
            match Statements::cached(client).await {
                Ok(st) => append_batch(client, &st, now, &items, Framing::Own).await,
                Err(e) => Err(e),
            }
        };
        let rolled_back = match (&result, conn.0.as_ref()) {
            (Err(_), Some(client)) => client.batch_execute("ROLLBACK").await.is_ok(),
            _ => true,
        };
        if rolled_back {
            // Ended (committed or rolled back): back to the pool.
            conn.0.take();
        }
        result
    }
}

/// A pooled connection a batch may have left inside its own transaction:
/// unless the batch ends it (committed or rolled back), dropping this
/// (an error, a dropped future, a panic) takes the connection out of the
/// pool, and closing it rolls the transaction back. A connection is never
/// returned to the pool inside a transaction holding channel locks.
struct InTransaction(Option<deadpool_postgres::Object>);

impl Drop for InTransaction {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(deadpool_postgres::Object::take(conn));
        }
    }
}

/// Failures that no retry of a single append can mend; a lock or
/// statement timeout (`55P03`, `57014`) among them: retrying each append
/// alone would wait the timeout once per append.
fn whole_batch(e: &StoreError) -> bool {
    match e {
        StoreError::Backend { .. } => {
            matches!(crate::error::sqlstate(e), Some("55P03" | "57014"))
        }
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
