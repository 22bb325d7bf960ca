//! Per-channel append-only message logs, retention, and subscription cursors.

use rusqlite::{OptionalExtension, params};

use crate::clock::{UnixMillis, millis};
use crate::error::Db;
use crate::error::{SessionError, StoreError};
use crate::schema::INLINE_PAYLOAD_BYTES;
use crate::sessions::SessionId;
use crate::store::{Committing, Store};

pub(crate) use keel_store::{
    Appended, ChannelBounds, ChannelStats, Message, Offset, Retention, SHARED_SCOPE, SYSTEM_SCOPE,
    Subscription,
};

fn to_sql(o: Offset) -> i64 {
    i64::try_from(o).unwrap_or(i64::MAX)
}

/// The offset the next append to `channel` gets: one past the newest
/// message, or, when the log is empty, the floor retention left in
/// `channels` (a log it emptied). A log that holds messages holds its
/// newest (retention and purges remove prefixes or whole logs, and the floor
/// is always set one past the newest there was), so its floor is never
/// above the newest plus one: one seek in the common case.
fn next_offset(conn: &rusqlite::Connection, channel: &str) -> Result<i64, StoreError> {
    let newest: Option<i64> = conn
        .prepare_cached("SELECT MAX(offset) FROM messages WHERE channel = ?1")
        .db()?
        .query_row([channel], |r| r.get(0))
        .db()?;
    if let Some(n) = newest {
        return Ok(n + 1);
    }
    let floor: Option<i64> = conn
        .prepare_cached("SELECT next_offset FROM channels WHERE name = ?1")
        .db()?
        .query_row([channel], |r| r.get(0))
        .optional()
        .db()?;
    Ok(floor.unwrap_or(1).max(1))
}

/// Where retention cuts `channel`: `Some((cut, last))` when the messages at
/// or below offset `cut` must go (at most `max_delete` of them), `None` when
/// nothing must. A few seeks of the primary key whatever the log's length:
/// retention asks this of every channel on every pass.
fn retention_cut(
    c: &rusqlite::Connection,
    now: UnixMillis,
    channel: &str,
    policy: Retention,
    max_delete: u64,
) -> Result<Option<(i64, i64)>, StoreError> {
    // Two statements: SQLite answers a lone MIN or MAX with one seek, but
    // MIN and MAX in one statement by reading the whole channel (which made
    // a pass over 10,000 channels take seconds an hour into a soak, and the
    // read's snapshot held the WAL from restarting all that time).
    let first: Option<i64> = c
        .prepare_cached(FIRST_OFFSET)
        .db()?
        .query_row([channel], |r| r.get(0))
        .db()?;
    let Some(first) = first else {
        return Ok(None);
    };
    let last: i64 = c
        .prepare_cached("SELECT MAX(offset) FROM messages WHERE channel = ?1")
        .db()?
        .query_row([channel], |r| r.get(0))
        .db()?;
    // The most this call may remove ends here.
    let bound = (first - 1).saturating_add(to_sql(max_delete));
    let mut cut = first - 1;
    if let Some(max) = policy.max_count {
        cut = cut.max(last - to_sql(max));
    }
    if let Some(age) = policy.max_age {
        let cutoff = now.saturating_sub(millis(age));
        // Appends are in time order within a channel: the first message
        // young enough bounds the old ones. Only the first `max_delete`
        // are looked at: a log that has aged whole is not read whole.
        let young: Option<i64> = c
            .prepare_cached(
                "SELECT offset FROM messages WHERE channel = ?1 AND offset <= ?3 AND at >= ?2
                 ORDER BY offset LIMIT 1",
            )
            .db()?
            .query_row(params![channel, cutoff, bound], |r| r.get(0))
            .optional()
            .db()?;
        cut = cut.max(young.map_or(last.min(bound), |y| y - 1));
    }
    cut = cut.min(bound);
    Ok((cut >= first).then_some((cut, last)))
}

/// The first offset a channel retains: one seek of the primary key.
const FIRST_OFFSET: &str = "SELECT MIN(offset) FROM messages WHERE channel = ?1";

/// A page of a channel's log from an offset on, its payloads inline or in
/// `message_payloads` (schema 4).
const READ_PAGE: &str = "SELECT m.offset, m.msg_id, m.at, coalesce(m.payload, p.payload)
     FROM messages m LEFT JOIN message_payloads p ON p.id = m.payload_id
     WHERE m.channel = ?1 AND m.offset >= ?2 ORDER BY m.offset LIMIT ?3";

/// An id in its scope: one probe of the (channel, id, publisher) index
/// (the id before the publisher: time-ordered ids from many publishers
/// still append at the index's end).
pub(crate) const FIND_ID: &str =
    "SELECT offset, at FROM messages WHERE channel = ?1 AND msg_id = ?3 AND publisher = ?2";

/// An id in its scope or among the ids written before scopes: two probes.
pub(crate) const FIND_ID_OR_LEGACY: &str =
    "SELECT offset, at FROM messages WHERE channel = ?1 AND msg_id = ?3 AND publisher = ?2
     UNION ALL
     SELECT offset, at FROM messages WHERE channel = ?1 AND msg_id = ?3 AND publisher = ''
     LIMIT 1";

/// Appends inside the writer's current transaction (see [`Store::append`]).
pub(crate) fn append_in(
    ctx: &crate::writer::Ctx<'_>,
    channel: &str,
    scope: &str,
    msg_id: &str,
    payload: &[u8],
) -> Result<Appended, StoreError> {
    let (conn, now) = (ctx.conn, ctx.now);
    let find = |sql: &str| -> Result<Option<Appended>, StoreError> {
        conn.prepare_cached(sql)
            .db()?
            .query_row([channel, scope, msg_id], |r| {
                Ok(Appended {
                    offset: r.get::<_, i64>(0)? as Offset,
                    at: r.get(1)?,
                    duplicate: true,
                })
            })
            .optional()
            .db()
    };
    let large = payload.len() > INLINE_PAYLOAD_BYTES;
    // The unique (channel, id, publisher) index holds the scope's own ids.
    // In a log migrated from schema 2 the ids written before ids were
    // scoped (scope '') count too, and a large payload should not be
    // written only to be removed: both look first. (Two statements joined
    // by UNION ALL: an `IN` on the index's middle column makes the planner
    // pick the primary key and scan the channel.)
    if large || (ctx.legacy_ids && !scope.is_empty()) {
        let sql = if ctx.legacy_ids && !scope.is_empty() {
            FIND_ID_OR_LEGACY
        } else {
            FIND_ID
        };
        if let Some(existing) = find(sql)? {
            return Ok(existing);
        }
    }
    // The next offset is one past the newest message, or past the
    // floor that retention leaves in `channels` when it empties a log;
    // the writer remembers it for channels appended to lately (see
    // `NextOffsets`). Reads only: no upsert and no RETURNING, because a
    // statement that may abort half-way needs a statement journal, whose
    // 64 KiB buffer is allocated and freed per statement and dominated the
    // write path.
    let remembered = ctx.offsets.get(channel);
    let mut offset = match remembered {
        Some(next) => next,
        None => next_offset(conn, channel)?,
    };
    // INSERT OR IGNORE never aborts. A small message is inserted without
    // looking for its id first: the unique index refuses a duplicate in
    // the same descent that would have found it, so a new message (the
    // common case) costs one probe of the index, not two. A large payload
    // goes to its own table (see schema 4), so that the message b-tree's
    // seeks never read it.
    let insert = |offset: i64| -> Result<usize, StoreError> {
        if large {
            conn.prepare_cached("INSERT INTO message_payloads(payload) VALUES(?1)")
                .db()?
                .execute(params![payload])
                .db()?;
            let payload_id = conn.last_insert_rowid();
            let inserted = conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO messages(channel, offset, publisher, msg_id, at, payload_id)
                     VALUES(?1, ?2, ?3, ?4, ?5, ?6)",
                ).db()?
                .execute(params![channel, offset, scope, msg_id, now, payload_id]).db()?;
            if inserted == 0 {
                conn.prepare_cached("DELETE FROM message_payloads WHERE id = ?1")
                    .db()?
                    .execute([payload_id])
                    .db()?;
            }
            Ok(inserted)
        } else {
            Ok(conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO messages(channel, offset, publisher, msg_id, at, payload)
                     VALUES(?1, ?2, ?3, ?4, ?5, ?6)",
                ).db()?
                .execute(params![channel, offset, scope, msg_id, now, payload]).db()?)
        }
    };
    let mut inserted = insert(offset)?;
    if inserted == 0 && remembered.is_some() {
        if let Some(existing) = find(FIND_ID)? {
            return Ok(existing);
        }
        // Never expected: the remembered offset is taken. Read it again.
        ctx.offsets.forget(channel);
        offset = next_offset(conn, channel)?;
        inserted = insert(offset)?;
    }
    if inserted == 1 {
        ctx.offsets.set(channel, offset + 1);
        return Ok(Appended {
            offset: offset as Offset,
            at: now,
            duplicate: false,
        });
    }
    // Refused: the id is there (a retry), or, never expected, the offset is
    // taken; then the append fails and nothing is acknowledged unstored.
    match find(FIND_ID)? {
        Some(existing) => Ok(existing),
        None => Err(StoreError::Corrupt {
            detail: format!("offset {offset} of channel {channel} is taken"),
        }),
    }
}

impl Store {
    /// [`SessionStore::append`] on SQLite: the contract is documented there.
    pub async fn append(
        &self,
        channel: &str,
        msg_id: &str,
        payload: &[u8],
    ) -> Result<Appended, StoreError> {
        self.append_scoped(SHARED_SCOPE, channel, msg_id, payload)
            .await
    }

    /// [`SessionStore::append_scoped`] on SQLite: the contract is documented there.
    pub async fn append_scoped(
        &self,
        scope: &str,
        channel: &str,
        msg_id: &str,
        payload: &[u8],
    ) -> Result<Appended, StoreError> {
        self.queue_append_scoped(0, scope, channel, msg_id, payload.to_vec())
            .await?
            .await
    }

    /// [`SessionStore::queue_append`] on SQLite: the contract is documented there.
    pub async fn queue_append<P>(
        &self,
        channel: &str,
        msg_id: &str,
        payload: P,
    ) -> Result<Committing<Appended>, StoreError>
    where
        P: AsRef<[u8]> + Send + 'static,
    {
        self.queue_append_in(0, channel, msg_id, payload).await
    }

    /// [`SessionStore::queue_append_in`] on SQLite: the contract is documented there.
    pub async fn queue_append_in<P>(
        &self,
        lane: u64,
        channel: &str,
        msg_id: &str,
        payload: P,
    ) -> Result<Committing<Appended>, StoreError>
    where
        P: AsRef<[u8]> + Send + 'static,
    {
        self.queue_append_scoped(lane, SHARED_SCOPE, channel, msg_id, payload)
            .await
    }

    /// [`SessionStore::queue_append_scoped`] on SQLite: the contract is documented there.
    pub async fn queue_append_scoped<P>(
        &self,
        lane: u64,
        scope: &str,
        channel: &str,
        msg_id: &str,
        payload: P,
    ) -> Result<Committing<Appended>, StoreError>
    where
        P: AsRef<[u8]> + Send + 'static,
    {
        let bytes = payload.as_ref().len();
        let (channel, scope, msg_id) = (channel.to_owned(), scope.to_owned(), msg_id.to_owned());
        self.submit_in(lane, bytes, move |ctx| {
            append_in(ctx, &channel, &scope, &msg_id, payload.as_ref())
        })
        .await
    }

    /// [`SessionStore::read_channel`] on SQLite: the contract is documented there.
    pub async fn read_channel(
        &self,
        channel: &str,
        from: Offset,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let channel = channel.to_owned();
        self.read(move |conn| {
            let rows = conn
                .prepare_cached(READ_PAGE)
                .db()?
                .query_map(params![channel, to_sql(from), limit as i64], |r| {
                    Ok(Message {
                        channel: channel.clone(),
                        offset: r.get::<_, i64>(0)? as Offset,
                        msg_id: r.get(1)?,
                        at: r.get(2)?,
                        payload: r.get(3)?,
                    })
                })
                .db()?
                .collect::<Result<Vec<_>, _>>()
                .db()?;
            Ok(rows)
        })
        .await
    }

    /// [`SessionStore::read_channel_bounded`] on SQLite: the contract is documented there.
    pub async fn read_channel_bounded(
        &self,
        channel: &str,
        from: Offset,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let channel = channel.to_owned();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(READ_PAGE).db()?;
            let mut rows = stmt
                .query(params![channel, to_sql(from), limit as i64])
                .db()?;
            let (mut page, mut bytes) = (Vec::new(), 0usize);
            while let Some(r) = rows.next().db()? {
                let payload: Vec<u8> = r.get(3).db()?;
                bytes += payload.len();
                page.push(Message {
                    channel: channel.clone(),
                    offset: r.get::<_, i64>(0).db()? as Offset,
                    msg_id: r.get(1).db()?,
                    at: r.get(2).db()?,
                    payload,
                });
                if bytes >= max_bytes {
                    break;
                }
            }
            Ok(page)
        })
        .await
    }

    /// [`SessionStore::channels_after`] on SQLite: the contract is documented there.
    pub async fn channels_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut cursor = after.map(str::to_owned);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT channel FROM messages WHERE channel > ?1 ORDER BY channel LIMIT 1",
                )
                .db()?;
            let mut out = Vec::new();
            while out.len() < limit {
                let next: Option<String> = stmt
                    .query_row([cursor.as_deref().unwrap_or("")], |r| r.get(0))
                    .optional()
                    .db()?;
                let Some(name) = next else { break };
                cursor = Some(name.clone());
                out.push(name);
            }
            Ok(out)
        })
        .await
    }

    /// [`SessionStore::retention_due`] on SQLite: the contract is documented there.
    pub async fn retention_due(
        &self,
        channels: Vec<(String, Retention)>,
    ) -> Result<Vec<String>, StoreError> {
        let now = self.now();
        self.read(move |conn| {
            let mut due = Vec::new();
            for (channel, policy) in channels {
                if retention_cut(conn, now, &channel, policy, 1)?.is_some() {
                    due.push(channel);
                }
            }
            Ok(due)
        })
        .await
    }

    /// [`SessionStore::apply_retention_to`] on SQLite: the contract is documented there.
    pub async fn apply_retention_to(
        &self,
        channel: &str,
        policy: Retention,
        max_delete: u64,
    ) -> Result<u64, StoreError> {
        // Most calls find nothing to remove: decide on a read connection
        // first, and take the writer only when there is work.
        let now = self.now();
        let probe = channel.to_owned();
        let due = self
            .read(move |conn| {
                retention_cut(conn, now, &probe, policy, max_delete).map(|c| c.is_some())
            })
            .await?;
        if !due {
            return Ok(0);
        }
        let channel = channel.to_owned();
        self.write(move |ctx| {
            let Some((cut, last)) = retention_cut(ctx.conn, ctx.now, &channel, policy, max_delete)? else {
                return Ok(0);
            };
            ctx.conn
                .prepare_cached(
                    "INSERT INTO channels(name, next_offset) VALUES(?1, ?2)
                     ON CONFLICT(name) DO UPDATE SET next_offset = MAX(next_offset, excluded.next_offset)",
                ).db()?
                .execute(params![channel, last + 1]).db()?;
            let removed = ctx
                .conn
                .prepare_cached("DELETE FROM messages WHERE channel = ?1 AND offset <= ?2").db()?
                .execute(params![channel, cut]).db()?;
            Ok(removed as u64)
        })
        .await
    }

    /// [`SessionStore::channel_stats`] on SQLite: the contract is documented there.
    pub async fn channel_stats(
        &self,
        limit: usize,
    ) -> Result<(u64, Vec<ChannelStats>), StoreError> {
        self.read(move |conn| {
            let total: i64 = conn
                .prepare_cached("SELECT COUNT(DISTINCT channel) FROM messages")
                .db()?
                .query_row([], |r| r.get(0))
                .db()?;
            let rows = conn
                .prepare_cached(
                    "SELECT m.channel, COUNT(*), MIN(m.offset), MAX(m.offset),
                            SUM(coalesce(length(m.payload), length(p.payload)))
                     FROM messages m LEFT JOIN message_payloads p ON p.id = m.payload_id
                     GROUP BY m.channel ORDER BY COUNT(*) DESC, m.channel LIMIT ?1",
                )
                .db()?
                .query_map([limit as i64], |r| {
                    Ok(ChannelStats {
                        channel: r.get(0)?,
                        messages: r.get::<_, i64>(1)? as u64,
                        first: r.get::<_, i64>(2)? as Offset,
                        last: r.get::<_, i64>(3)? as Offset,
                        payload_bytes: r.get::<_, i64>(4)? as u64,
                    })
                })
                .db()?
                .collect::<Result<Vec<_>, _>>()
                .db()?;
            Ok((total as u64, rows))
        })
        .await
    }

    /// [`SessionStore::channel_bounds`] on SQLite: the contract is documented there.
    pub async fn channel_bounds(&self, channel: &str) -> Result<ChannelBounds, StoreError> {
        let channel = channel.to_owned();
        self.read(move |conn| {
            let first: Option<i64> = conn
                .prepare_cached(FIRST_OFFSET)
                .db()?
                .query_row([&channel], |r| r.get(0))
                .db()?;
            Ok(ChannelBounds {
                first: first.map(|f| f as Offset),
                next: next_offset(conn, &channel)? as Offset,
            })
        })
        .await
    }

    /// [`SessionStore::apply_retention`] on SQLite: the contract is documented there.
    pub async fn apply_retention(&self, policy: Retention) -> Result<u64, StoreError> {
        self.write(move |ctx| {
            // Remember where every log ends, so that offsets are never reused
            // even if this empties a log.
            ctx.conn
                .prepare_cached(
                    "INSERT OR REPLACE INTO channels(name, next_offset)
                     SELECT m.channel, MAX(m.offset) + 1 FROM messages m GROUP BY m.channel",
                )
                .db()?
                .execute([])
                .db()?;
            let mut removed = 0;
            if let Some(max) = policy.max_count {
                removed += ctx
                    .conn
                    .prepare_cached(
                        "DELETE FROM messages WHERE offset <= (
                           SELECT c.next_offset - 1 - ?1 FROM channels c
                           WHERE c.name = messages.channel)",
                    )
                    .db()?
                    .execute([to_sql(max)])
                    .db()? as u64;
            }
            if let Some(age) = policy.max_age {
                let cutoff = ctx.now.saturating_sub(millis(age));
                removed += ctx
                    .conn
                    .prepare_cached(
                        "DELETE FROM messages WHERE offset <= (
                           SELECT MAX(m.offset) FROM messages m
                           WHERE m.channel = messages.channel AND m.at < ?1)",
                    )
                    .db()?
                    .execute([cutoff])
                    .db()? as u64;
            }
            Ok(removed)
        })
        .await
    }

    /// [`SessionStore::subscribe`] on SQLite: the contract is documented there.
    pub async fn subscribe(
        &self,
        session: &SessionId,
        channel: &str,
        cursor: Offset,
    ) -> Result<Subscription, SessionError> {
        let (session, channel) = (session.clone(), channel.to_owned());
        self.write(move |ctx| {
            let exists = ctx
                .conn
                .prepare_cached("SELECT 1 FROM sessions WHERE id = ?1").db()?
                .exists([session.as_str()]).db()?;
            if !exists {
                return Err(SessionError::NotFound(session.clone()));
            }
            let cursor: i64 = ctx
                .conn
                .prepare_cached(
                    "INSERT INTO subscriptions(session_id, channel, cursor) VALUES(?1, ?2, ?3)
                     ON CONFLICT(session_id, channel) DO UPDATE SET cursor = MAX(cursor, excluded.cursor)
                     RETURNING cursor",
                ).db()?
                .query_row(params![session.as_str(), channel, to_sql(cursor)], |r| r.get(0)).db()?;
            Ok(Subscription {
                channel: channel.clone(),
                cursor: cursor as Offset,
            })
        })
        .await
    }

    /// [`SessionStore::ack`] on SQLite: the contract is documented there.
    pub async fn ack(
        &self,
        session: &SessionId,
        channel: &str,
        offset: Offset,
    ) -> Result<Offset, SessionError> {
        let (session, channel) = (session.clone(), channel.to_owned());
        self.write(move |ctx| {
            let subscribed = ctx
                .conn
                .prepare_cached(
                    "SELECT 1 FROM subscriptions WHERE session_id = ?1 AND channel = ?2",
                )
                .db()?
                .exists(params![session.as_str(), channel])
                .db()?;
            if !subscribed {
                return Err(SessionError::NotSubscribed {
                    session: session.clone(),
                    channel: channel.clone(),
                });
            }
            let last = next_offset(ctx.conn, &channel)? - 1;
            if to_sql(offset) > last {
                return Err(SessionError::BeyondHead {
                    channel: channel.clone(),
                    offset,
                    last: last as Offset,
                });
            }
            let cursor: i64 = ctx
                .conn
                .prepare_cached(
                    "UPDATE subscriptions SET cursor = MAX(cursor, ?3)
                     WHERE session_id = ?1 AND channel = ?2 RETURNING cursor",
                )
                .db()?
                .query_row(params![session.as_str(), channel, to_sql(offset)], |r| {
                    r.get(0)
                })
                .db()?;
            Ok(cursor as Offset)
        })
        .await
    }

    /// [`SessionStore::unsubscribe`] on SQLite: the contract is documented there.
    pub async fn unsubscribe(
        &self,
        session: &SessionId,
        channel: &str,
    ) -> Result<bool, StoreError> {
        let (session, channel) = (session.clone(), channel.to_owned());
        self.write(move |ctx| {
            let n = ctx
                .conn
                .prepare_cached("DELETE FROM subscriptions WHERE session_id = ?1 AND channel = ?2")
                .db()?
                .execute(params![session.as_str(), channel])
                .db()?;
            Ok(n > 0)
        })
        .await
    }

    /// [`SessionStore::subscriptions`] on SQLite: the contract is documented there.
    pub async fn subscriptions(
        &self,
        session: &SessionId,
    ) -> Result<Vec<Subscription>, StoreError> {
        let session = session.clone();
        self.read(move |conn| {
            let rows = conn
                .prepare_cached(
                    "SELECT channel, cursor FROM subscriptions WHERE session_id = ?1 ORDER BY channel",
                ).db()?
                .query_map([session.as_str()], |r| {
                    Ok(Subscription {
                        channel: r.get(0)?,
                        cursor: r.get::<_, i64>(1)? as Offset,
                    })
                }).db()?
                .collect::<Result<Vec<_>, _>>().db()?;
            Ok(rows)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    /// A log of `n` messages in `channel`, each a second after the last.
    fn fill(conn: &mut rusqlite::Connection, channel: &str, n: i64) {
        let tx = conn.transaction().unwrap();
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO messages(channel, offset, publisher, msg_id, at, payload)
                     VALUES(?1, ?2, '', ?3, ?4, x'7b7d')",
                )
                .unwrap();
            for o in 1..=n {
                insert
                    .execute(params![channel, o, format!("m{o}"), o * 1000])
                    .unwrap();
            }
        }
        tx.commit().unwrap();
    }

    /// SQLite virtual-machine steps (in hundreds) `f` takes on `conn`:
    /// work counted, not timed.
    fn steps<T>(
        conn: &mut rusqlite::Connection,
        f: impl FnOnce(&rusqlite::Connection) -> T,
    ) -> (T, u64) {
        let n = Arc::new(AtomicU64::new(0));
        let counter = n.clone();
        conn.progress_handler(
            100,
            Some(move || {
                counter.fetch_add(1, Ordering::Relaxed);
                false
            }),
        )
        .unwrap();
        let out = f(conn);
        conn.progress_handler(0, None::<fn() -> bool>).unwrap();
        (out, n.load(Ordering::Relaxed))
    }

    /// Retention asks every channel on every pass whether to cut it: the
    /// answer costs the same on a log of 20,000 messages as on one of 20,
    /// and a log whose every message has aged is not read whole to say
    /// how much of it goes first.
    #[test]
    fn retention_probes_cost_the_same_on_a_long_log() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        crate::schema::migrate(&mut conn, 0).unwrap();
        fill(&mut conn, "short", 20);
        fill(&mut conn, "long", 20_000);
        let keep_all = Retention {
            max_count: Some(1_000_000),
            max_age: Some(Duration::from_secs(86_400)),
        };
        let now = 20_000 * 1000;
        let (short, short_steps) = steps(&mut conn, |c| {
            retention_cut(c, now, "short", keep_all, 1).unwrap()
        });
        let (long, long_steps) = steps(&mut conn, |c| {
            retention_cut(c, now, "long", keep_all, 1).unwrap()
        });
        assert_eq!((short, long), (None, None));
        assert!(
            long_steps <= short_steps + 2,
            "a long log's probe took {long_steps}00 steps, a short one's {short_steps}00"
        );

        // Everything has aged: 100 of the 20,000 go, found without reading
        // the other 19,900.
        let aged = Retention {
            max_count: None,
            max_age: Some(Duration::from_secs(1)),
        };
        let (cut, aged_steps) = steps(&mut conn, |c| {
            retention_cut(c, now * 10, "long", aged, 100).unwrap()
        });
        assert_eq!(cut, Some((100, 20_000)));
        assert!(aged_steps <= short_steps + 20, "{aged_steps}00 steps");

        // The counter catches the statement this replaced: MIN and MAX
        // together read the whole channel.
        let (_, planted) = steps(&mut conn, |c| {
            c.query_row(
                "SELECT MIN(offset), MAX(offset) FROM messages WHERE channel = 'long'",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
            .unwrap()
        });
        assert!(
            planted > long_steps + 100,
            "planted scan: {planted}00 steps"
        );
    }
}

#[cfg(test)]
mod next_offsets {
    use crate::error::Db;
    use crate::{Config, Store, StoreError};

    async fn open() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("o.db"), Config::default())
            .await
            .expect("open");
        (store, dir)
    }

    /// An append undone with its batch is forgotten with it: the next
    /// append takes the same offset, no hole.
    #[tokio::test]
    async fn an_append_rolled_back_leaves_no_hole() {
        let (store, _dir) = open().await;
        let first = store.append("c", "m1", b"{}").await.expect("m1");
        assert_eq!(first.offset, 1);
        let failed = store
            .write(|ctx| {
                super::append_in(ctx, "c", "", "undone", b"{}")?;
                ctx.conn
                    .execute("INSERT INTO meta(key, value) VALUES('x', 'y')", [])
                    .db()?;
                Err::<(), _>(crate::error::backend(-1, "refused after changing rows"))
            })
            .await;
        assert!(failed.is_err());
        let next = store.append("c", "m2", b"{}").await.expect("m2");
        assert_eq!(next.offset, 2, "the undone append's offset is taken again");
        let ids: Vec<String> = store
            .read_channel("c", 1, 10)
            .await
            .expect("read")
            .into_iter()
            .map(|m| m.msg_id)
            .collect();
        assert_eq!(ids, ["m1", "m2"]);
    }

    /// A remembered offset found taken (written by something other than an
    /// append) is read again, not refused as corruption.
    #[tokio::test]
    async fn a_taken_offset_is_read_again() {
        let (store, _dir) = open().await;
        store.append("c", "m1", b"{}").await.expect("m1");
        store
            .write(|ctx| {
                ctx.conn
                    .execute(
                        "INSERT INTO messages(channel, offset, publisher, msg_id, at, payload)
                     VALUES('c', 2, '', 'beside', 0, x'7b7d')",
                        [],
                    )
                    .db()?;
                Ok::<(), StoreError>(())
            })
            .await
            .expect("raw insert");
        let next = store.append("c", "m3", b"{}").await.expect("m3");
        assert_eq!(next.offset, 3);
        let again = store.append("c", "m3", b"{}").await.expect("m3 again");
        assert!(again.duplicate && again.offset == 3, "{again:?}");
    }
}
