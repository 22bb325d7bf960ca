//! Channel logs on PostgreSQL: queued appends (the writer's group commit),
//! paged reads, retention that never reuses offsets, subscription cursors.

use keel_store::{
    Appended, ChannelBounds, ChannelStats, Committing, Message, Offset, Retention, SessionError,
    SessionId, StoreError, Subscription, UnixMillis,
};

use super::{count, ms, to_sql};
use crate::PgStore;
use crate::error::{pg, retryable};
use crate::writer::{Append, Job};

impl PgStore {
    /// Where retention cuts `channel` (see keel-session): `Some(cut)` when
    /// the messages at or below offset `cut` must go, at most `max_delete`.
    async fn retention_cut<C: tokio_postgres::GenericClient + Sync>(
        client: &C,
        now: UnixMillis,
        channel: &str,
        policy: Retention,
        max_delete: u64,
    ) -> Result<Option<i64>, StoreError> {
        let row = client
            .query_one(
                "SELECT MIN(seq), MAX(seq) FROM messages WHERE channel = $1",
                &[&channel],
            )
            .await
            .map_err(pg)?;
        let (Some(first), Some(last)): (Option<i64>, Option<i64>) = (row.get(0), row.get(1)) else {
            return Ok(None);
        };
        // The most this call may remove ends here.
        let bound = (first - 1).saturating_add(to_sql(max_delete));
        let mut cut = first - 1;
        if let Some(max) = policy.max_count {
            cut = cut.max(last.saturating_sub(to_sql(max)));
        }
        if let Some(age) = policy.max_age {
            let cutoff = now.saturating_sub(ms(age));
            // Only the first `max_delete` messages are looked at: a log
            // that has aged whole is not read whole.
            let young = client
                .query_opt(
                    "SELECT seq FROM messages WHERE channel = $1 AND seq <= $3 AND at >= $2
                     ORDER BY seq LIMIT 1",
                    &[&channel, &cutoff, &bound],
                )
                .await
                .map_err(pg)?
                .map(|r| r.get::<_, i64>(0));
            cut = cut.max(young.map_or(last.min(bound), |y| y - 1));
        }
        cut = cut.min(bound);
        Ok((cut >= first).then_some(cut))
    }
}

pub(super) async fn queue_append_scoped<P>(
    store: &PgStore,
    lane: u64,
    scope: &str,
    channel: &str,
    msg_id: &str,
    payload: P,
) -> Result<Committing<Appended>, StoreError>
where
    P: AsRef<[u8]> + Send + 'static,
{
    store.check_open()?;
    let (reply, rx) = tokio::sync::oneshot::channel();
    let job = Job::Append(Append {
        lane,
        scope: scope.to_owned(),
        channel: channel.to_owned(),
        msg_id: msg_id.to_owned(),
        payload: payload.as_ref().to_vec(),
        reply,
    });
    store
        .writes()
        .send(job)
        .await
        .map_err(|_| StoreError::Closed)?;
    Ok(Committing::new(rx))
}

pub(super) async fn read_channel_bounded(
    store: &PgStore,
    channel: &str,
    from: Offset,
    limit: usize,
    max_bytes: usize,
) -> Result<Vec<Message>, StoreError> {
    // A message is in the page when the bytes before it are under the
    // bound: the page ends with the message that reaches it.
    let rows = store
        .read::<StoreError>(
            "SELECT seq, msg_id, at, payload FROM (
               SELECT seq, msg_id, at, payload,
                      SUM(octet_length(payload)) OVER (ORDER BY seq) - octet_length(payload) AS before
               FROM messages WHERE channel = $1 AND seq >= $2 ORDER BY seq LIMIT $3
             ) page WHERE before < GREATEST($4::bigint, 1) ORDER BY seq",
            &[&channel, &to_sql(from), &count(limit), &count(max_bytes)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Message {
            channel: channel.to_owned(),
            offset: r.get::<_, i64>(0) as Offset,
            msg_id: r.get(1),
            at: r.get(2),
            payload: r.get(3),
        })
        .collect())
}

pub(super) async fn channels_after(
    store: &PgStore,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<String>, StoreError> {
    let rows = store
        .read::<StoreError>(
            "SELECT name FROM channels c WHERE name > $1
             AND EXISTS (SELECT 1 FROM messages m WHERE m.channel = c.name)
             ORDER BY name LIMIT $2",
            &[&after.unwrap_or(""), &count(limit)],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

pub(super) async fn retention_due(
    store: &PgStore,
    channels: Vec<(String, Retention)>,
) -> Result<Vec<String>, StoreError> {
    let now = store.now_millis();
    let conn = store.conn().await?;
    let client: &tokio_postgres::Client = &conn;
    let mut due = Vec::new();
    for (channel, policy) in channels {
        if PgStore::retention_cut(client, now, &channel, policy, 1)
            .await?
            .is_some()
        {
            due.push(channel);
        }
    }
    Ok(due)
}

pub(super) async fn apply_retention_to(
    store: &PgStore,
    channel: &str,
    policy: Retention,
    max_delete: u64,
) -> Result<u64, StoreError> {
    txn!(store, StoreError, |tx, now| {
        let client: &tokio_postgres::Transaction<'_> = &tx;
        match PgStore::retention_cut(client, now, channel, policy, max_delete).await? {
            None => 0,
            Some(cut) => tx
                .execute(
                    "DELETE FROM messages WHERE channel = $1 AND seq <= $2",
                    &[&channel, &cut],
                )
                .await
                .map_err(pg)?,
        }
    })
}

pub(super) async fn apply_retention(store: &PgStore, policy: Retention) -> Result<u64, StoreError> {
    txn!(store, StoreError, |tx, now| {
        let mut removed = 0;
        if let Some(max) = policy.max_count {
            removed += tx
                .execute(
                    "DELETE FROM messages m USING channels c
                     WHERE c.name = m.channel AND m.seq <= c.next_offset - 1 - $1",
                    &[&to_sql(max)],
                )
                .await
                .map_err(pg)?;
        }
        if let Some(age) = policy.max_age {
            let cutoff = now.saturating_sub(ms(age));
            removed += tx
                .execute(
                    "WITH cut AS (
                       SELECT channel, MAX(seq) AS upto FROM messages WHERE at < $1 GROUP BY channel)
                     DELETE FROM messages m USING cut
                     WHERE m.channel = cut.channel AND m.seq <= cut.upto",
                    &[&cutoff],
                )
                .await
                .map_err(pg)?;
        }
        removed
    })
}

pub(super) async fn channel_stats(
    store: &PgStore,
    limit: usize,
) -> Result<(u64, Vec<ChannelStats>), StoreError> {
    let total = store
        .read::<StoreError>("SELECT COUNT(DISTINCT channel) FROM messages", &[])
        .await?;
    let rows = store
        .read::<StoreError>(
            "SELECT channel, COUNT(*), MIN(seq), MAX(seq), SUM(octet_length(payload))::BIGINT
             FROM messages GROUP BY channel ORDER BY COUNT(*) DESC, channel LIMIT $1",
            &[&count(limit)],
        )
        .await?;
    let total = total.first().map_or(0, |r| r.get::<_, i64>(0) as u64);
    Ok((
        total,
        rows.iter()
            .map(|r| ChannelStats {
                channel: r.get(0),
                messages: r.get::<_, i64>(1) as u64,
                first: r.get::<_, i64>(2) as Offset,
                last: r.get::<_, i64>(3) as Offset,
                payload_bytes: r.get::<_, i64>(4) as u64,
            })
            .collect(),
    ))
}

pub(super) async fn channel_bounds(
    store: &PgStore,
    channel: &str,
) -> Result<ChannelBounds, StoreError> {
    let rows = store
        .read::<StoreError>(
            "SELECT (SELECT MIN(seq) FROM messages WHERE channel = $1),
                    (SELECT next_offset FROM channels WHERE name = $1)",
            &[&channel],
        )
        .await?;
    let (first, next): (Option<i64>, Option<i64>) =
        rows.first().map_or((None, None), |r| (r.get(0), r.get(1)));
    Ok(ChannelBounds {
        first: first.map(|f| f as Offset),
        next: next.unwrap_or(1) as Offset,
    })
}

pub(super) async fn subscribe(
    store: &PgStore,
    session: &SessionId,
    channel: &str,
    cursor: Offset,
) -> Result<Subscription, SessionError> {
    let rows = store
        .write1::<SessionError>(
            "INSERT INTO subscriptions(session_id, channel, cursor)
             SELECT id, $2, $3 FROM sessions WHERE id = $1
             ON CONFLICT (session_id, channel)
             DO UPDATE SET cursor = GREATEST(subscriptions.cursor, excluded.cursor)
             RETURNING cursor",
            &[&session.as_str(), &channel, &to_sql(cursor)],
        )
        .await?;
    match rows.first() {
        Some(r) => Ok(Subscription {
            channel: channel.to_owned(),
            cursor: r.get::<_, i64>(0) as Offset,
        }),
        None => Err(SessionError::NotFound(session.clone())),
    }
}

pub(super) async fn ack(
    store: &PgStore,
    session: &SessionId,
    channel: &str,
    offset: Offset,
) -> Result<Offset, SessionError> {
    // One statement: whether the subscription exists, the channel's
    // last offset, and the moved cursor when the ack is within it.
    let rows = store
        .write1::<SessionError>(
            "WITH head AS (
               SELECT COALESCE((SELECT next_offset FROM channels WHERE name = $2), 1) - 1 AS last
             ), moved AS (
               UPDATE subscriptions SET cursor = GREATEST(cursor, $3)
               WHERE session_id = $1 AND channel = $2 AND $3 <= (SELECT last FROM head)
               RETURNING cursor
             )
             SELECT EXISTS (SELECT 1 FROM subscriptions WHERE session_id = $1 AND channel = $2),
                    (SELECT last FROM head), (SELECT cursor FROM moved)",
            &[&session.as_str(), &channel, &to_sql(offset)],
        )
        .await?;
    let row = rows
        .first()
        .ok_or(SessionError::Store(StoreError::Closed))?;
    let (subscribed, last, cursor): (bool, i64, Option<i64>) = (row.get(0), row.get(1), row.get(2));
    match cursor {
        Some(c) => Ok(c as Offset),
        None if !subscribed => Err(SessionError::NotSubscribed {
            session: session.clone(),
            channel: channel.to_owned(),
        }),
        None => Err(SessionError::BeyondHead {
            channel: channel.to_owned(),
            offset,
            last: last as Offset,
        }),
    }
}

pub(super) async fn unsubscribe(
    store: &PgStore,
    session: &SessionId,
    channel: &str,
) -> Result<bool, StoreError> {
    let rows = store
        .write1::<StoreError>(
            "DELETE FROM subscriptions WHERE session_id = $1 AND channel = $2 RETURNING 1",
            &[&session.as_str(), &channel],
        )
        .await?;
    Ok(!rows.is_empty())
}

pub(super) async fn subscriptions(
    store: &PgStore,
    session: &SessionId,
) -> Result<Vec<Subscription>, StoreError> {
    let rows = store
        .read::<StoreError>(
            "SELECT channel, cursor FROM subscriptions WHERE session_id = $1 ORDER BY channel",
            &[&session.as_str()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Subscription {
            channel: r.get(0),
            cursor: r.get::<_, i64>(1) as Offset,
        })
        .collect())
}
