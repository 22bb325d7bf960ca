//! The writer: batches frames, keeps each channel's deliveries in offset
//! order (replaying the log for starts and gaps, page by page, each page
//! bounded in bytes and counted in the relay's budget), holds every queued
//! item's bytes until it is flushed, and gives up on a write that makes no
//! progress for the write deadline.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::upgrade::{CloseFrame, FRAGMENT_BYTES, Message, Utf8Bytes, WebSocket, WsError};
use futures::SinkExt;
use futures::stream::SplitSink;
use keel_session::SessionStore;

use crate::store::RelayStore;
use tokio::sync::mpsc;

use crate::failpoints::Delivery;
use crate::hub::{Account, EndFlag, Ending, Held, Outbound, Queued};
use crate::limits::hit;
use crate::protocol::{self, close, json_str};

/// Frames written per flush at most.
const WRITE_BATCH: usize = 64;
/// Messages read from the log per query when replaying (also bounded in bytes).
const REPLAY_ROWS: usize = 256;

/// What the writer needs besides its socket and queue.
pub(super) struct WriteCtx {
    pub(super) store: RelayStore,
    /// The hub, whose replay cache holds the newest frames handed out.
    pub(super) hub: Arc<crate::hub::Hub>,
    /// The connection's outbound account (replay pages are charged to it).
    pub(super) account: Arc<Account>,
    pub(super) page_bytes: usize,
    pub(super) deadline: Duration,
}

/// A write failed: the link broke, or it made no progress for the deadline.
struct Failed;

type Sink = SplitSink<WebSocket, Message>;

/// How long a slow consumer's 1013 close may take to go out: what is
/// already in its socket must drain first, and a reader that far behind is
/// dropped without it (it resumes from the log all the same).
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// One text message into the sink, [`bounded`]: whole when it is short,
/// else as fragments of the same shared bytes, so that tungstenite's write
/// buffer holds at most one fragment of it (see `crate::upgrade`).
async fn feed_text(
    sink: &mut Sink,
    deadline: Duration,
    end: &EndFlag,
    text: Utf8Bytes,
) -> Result<(), Failed> {
    if text.len() <= FRAGMENT_BYTES {
        return bounded(deadline, end, sink.feed(Message::Text(text))).await;
    }
    for fragment in crate::upgrade::fragments(text) {
        bounded(deadline, end, sink.feed(fragment)).await?;
    }
    Ok(())
}

/// One write, bounded by the deadline (a write that times out marks the
/// connection stuck) and abandoned as soon as the connection must end for
/// any reason, so that a writer blocked on a reader that does not read lets
/// go of its queue at once.
async fn bounded<F>(deadline: Duration, end: &EndFlag, write: F) -> Result<(), Failed>
where
    F: std::future::Future<Output = Result<(), WsError>>,
{
    tokio::select! {
        biased;
        r = tokio::time::timeout(deadline, write) => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => {
                end.raise(Ending::Gone);
                Err(Failed)
            }
            Err(_) => {
                hit("write_deadline");
                end.raise(Ending::Stuck);
                Err(Failed)
            }
        },
        _ = end.wait() => Err(Failed),
    }
}

/// Writes frames in batches; replays logs and fills gaps so that each
/// channel's offsets go out in order, each once. Ends when every sender is
/// gone and the queue is written, at a close, when the connection must end
/// (slow: it drops its queue, then sends 1013 if the socket takes it within
/// [`CLOSE_GRACE`]; the client closed: it drops its queue and answers the
/// close), or when a write fails or times out.
pub(super) async fn write_loop(
    mut sink: Sink,
    rx: mpsc::Receiver<Queued>,
    ctx: WriteCtx,
    end: Arc<EndFlag>,
) {
    write_queue(&mut sink, rx, &ctx, &end).await;
    if end.get() == Some(Ending::Slow) {
        // The queue and everything it held are gone by now.
        metrics::counter!("keel_slow_consumers_total").increment(1);
        let close = close_message(
            close::SLOW_CONSUMER,
            "slow consumer: resume from your last offset",
        );
        let _ = tokio::time::timeout(CLOSE_GRACE.min(ctx.deadline), sink.send(close)).await;
    }
    if matches!(end.get(), Some(Ending::Closed | Ending::Gone)) {
        // The client closed, or a write failed (after the client's close,
        // tungstenite refuses data): the answer to its close, which
        // tungstenite queued when the reader read it, goes out now. On a
        // broken link this fails at once.
        let _ = tokio::time::timeout(CLOSE_GRACE.min(ctx.deadline), sink.close()).await;
    }
    if end.get() == Some(Ending::Unreadable) {
        metrics::counter!("keel_errors_total", "code" => crate::protocol::ErrorCode::Unavailable.as_str())
            .increment(1);
        let close = close_message(
            close::INTERNAL,
            "the store could not be read; resume from your last offset",
        );
        let _ = tokio::time::timeout(CLOSE_GRACE.min(ctx.deadline), sink.send(close)).await;
    }
}

/// The writer's loop; returns when the connection is done writing (its
/// queue, and what it held, dropped with it).
async fn write_queue(
    sink: &mut Sink,
    mut rx: mpsc::Receiver<Queued>,
    ctx: &WriteCtx,
    end: &EndFlag,
) {
    let mut next: HashMap<Arc<str>, u64> = HashMap::new();
    let frames_out = metrics::counter!("keel_frames_out_total");
    // Grows to what bursts need; an idle connection keeps it small.
    let mut batch: Vec<Queued> = Vec::new();
    let mut holding: Vec<Held> = Vec::new();
    loop {
        let first = tokio::select! {
            biased;
            _ = end.wait() => return,
            m = rx.recv() => m,
        };
        let Some(first) = first else {
            let _ = tokio::time::timeout(ctx.deadline, sink.close()).await;
            return;
        };
        batch.push(first);
        while batch.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let mut written = 0u64;
        for Queued { item, held } in batch.drain(..) {
            // Its bytes stay counted until the flush below.
            holding.push(held);
            let done = match item {
                Outbound::Frame(f) => {
                    written += 1;
                    feed_text(sink, ctx.deadline, end, f).await
                }
                Outbound::Live { channel, batch } => {
                    let Some(expected) = next.get(&channel).copied() else {
                        continue; // not started yet: the replay will cover it
                    };
                    match live(sink, ctx, end, &channel, expected, &batch).await {
                        Ok((now, n)) => {
                            written += n;
                            next.insert(channel, now);
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                }
                Outbound::Start {
                    channel,
                    from,
                    fresh: true,
                } => {
                    next.insert(channel, from);
                    Ok(())
                }
                Outbound::Start { channel, from, .. } => {
                    metrics::counter!("keel_start_replays_total").increment(1);
                    // Boxed here and below: a replay's state (a store read,
                    // a page) is large, and inline it would size every
                    // connection's idle writer.
                    match Box::pin(replay(sink, ctx, end, &channel, from, None)).await {
                        Ok((now, n)) => {
                            written += n;
                            next.insert(channel, now);
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                }
                Outbound::Stop { channel } => {
                    next.remove(&channel);
                    Ok(())
                }
                Outbound::Close { code, reason } => {
                    let _ =
                        bounded(ctx.deadline, end, sink.send(close_message(code, &reason))).await;
                    return;
                }
            };
            if done.is_err() {
                return;
            }
        }
        frames_out.increment(written);
        if bounded(ctx.deadline, end, sink.flush()).await.is_err() {
            return;
        }
        holding.clear();
    }
}

/// Writes a live batch from `expected` on, filling any gap before it from
/// the log; returns the next offset to expect and how many were written.
async fn live(
    sink: &mut Sink,
    ctx: &WriteCtx,
    end: &EndFlag,
    channel: &str,
    mut expected: u64,
    batch: &[(u64, Utf8Bytes)],
) -> Result<(u64, u64), Failed> {
    let mut written = 0;
    // A delivery held back by the `reorder_delivery` failpoint.
    let mut held: Option<Utf8Bytes> = None;
    for (offset, frame) in batch {
        let offset = *offset;
        if offset < expected {
            continue; // already delivered
        }
        if offset > expected {
            // Another publisher's earlier offset has not reached the hub
            // yet: it is committed, so read it.
            metrics::counter!("keel_gap_replays_total").increment(1);
            written += Box::pin(replay(sink, ctx, end, channel, expected, Some(offset)))
                .await?
                .1;
        }
        expected = offset + 1;
        written += 1;
        let copies = match crate::failpoints::delivery() {
            Delivery::Write => 1,
            Delivery::Drop => 0,
            Delivery::Duplicate => 2,
            Delivery::Reorder => {
                held = Some(frame.clone());
                continue;
            }
            Delivery::Corrupt => {
                let bad = crate::failpoints::corrupted(frame.as_str());
                feed_text(sink, ctx.deadline, end, bad.into()).await?;
                0
            }
        };
        for _ in 0..copies {
            feed_text(sink, ctx.deadline, end, frame.clone()).await?;
        }
        if let Some(late) = held.take() {
            feed_text(sink, ctx.deadline, end, late).await?;
        }
    }
    if let Some(late) = held.take() {
        feed_text(sink, ctx.deadline, end, late).await?;
    }
    Ok((expected, written))
}

/// Writes `channel` from `from` up to (not including) `until`, or to the end
/// of the log, a page at a time: each page at most `page_bytes` (at least
/// one message), its bytes counted in the relay's budget while held.
/// A page whose first offset the hub's replay cache holds is the cache's
/// frames, shared with every other connection (nothing read, nothing
/// formatted, nothing more held). Offsets retention removed are announced
/// with a `truncated` notice naming the first offset the log still holds,
/// then skipped. Returns the next offset to expect and how many
/// deliveries were written.
async fn replay(
    sink: &mut Sink,
    ctx: &WriteCtx,
    end: &EndFlag,
    channel: &str,
    from: u64,
    until: Option<u64>,
) -> Result<(u64, u64), Failed> {
    let mut next = from;
    let mut written = 0;
    let mut first_page = true;
    loop {
        let want = match until {
            Some(u) if u <= next => break,
            Some(u) => ((u - next) as usize).min(REPLAY_ROWS),
            None => REPLAY_ROWS,
        };
        if end.get().is_some() {
            return Err(Failed);
        }
        // A cached offset is in the log (retention forgets what it cuts):
        // no `truncated` notice can be due before it. The cache is asked
        // again once this connection's turn to read the store comes: a
        // reader ahead of it may have read the page meanwhile.
        let tail = &ctx.hub.tail;
        let mut cached = tail.read(channel, next, until, want, ctx.page_bytes);
        let mut turn = None;
        if cached.is_empty() {
            // A connection that must end meanwhile stops waiting (and lets
            // go of its queue at once).
            turn = tokio::select! {
                t = tail.turn() => t,
                _ = end.wait() => return Err(Failed),
            };
            cached = tail.read(channel, next, until, want, ctx.page_bytes);
        }
        if !cached.is_empty() {
            drop(turn);
            first_page = false;
            metrics::counter!("keel_replay_cache_hits_total").increment(cached.len() as u64);
            write_page(sink, ctx, end, cached, &mut next, &mut written).await?;
            continue;
        }
        if end.get().is_some() {
            return Err(Failed);
        }
        let epoch = tail.epoch();
        let page = ctx
            .store
            .read_channel_bounded(channel, next, want, ctx.page_bytes)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, channel, from = next, "cannot read the log for a replay");
                end.raise(Ending::Unreadable);
                Failed
            })?;
        // The page (at most `page_bytes`, or one message) counts against
        // the connection and the relay's outbound budget, by what it holds,
        // while it is written; overdrawing the budget closes the largest
        // holders, perhaps this one. (Charging `page_bytes` up front made
        // a thousand subscribes of small channels look like a gigabyte.)
        let held: usize = page.iter().map(|m| m.payload.len() + m.msg_id.len()).sum();
        let permit = ctx.account.hold(held, true);
        if end.get().is_some() {
            return Err(Failed);
        }
        // Written after the turn is over: a turn is never held across a
        // write a reader that does not read could keep waiting.
        let mut notice = None;
        if first_page {
            first_page = false;
            // Offsets are contiguous: a page that starts after `from` means
            // retention removed what came before. An empty page means the
            // log holds nothing from `from` on; it was cut only if what it
            // retains now (read after the page, so an append racing the
            // read shows up here at `from` itself) starts past `from`, or
            // it retains nothing while its next offset is past `from`.
            let first = match page.first() {
                Some(m) if m.offset > next => Some(m.offset),
                None if until.is_none() => match ctx.store.channel_bounds(channel).await {
                    Ok(b) => match b.first {
                        Some(f) if f > next => Some(f),
                        Some(_) => None,
                        None if b.next > next => Some(b.next),
                        None => None,
                    },
                    Err(_) => None,
                },
                _ => None,
            };
            if let Some(first) = first {
                notice = Some(format!(
                    r#"{{"type":"truncated","channel":{},"from":{next},"first":{first}}}"#,
                    json_str(channel)
                ));
                next = first;
            }
        }
        let got = page.len();
        let full = page.iter().map(|m| m.payload.len()).sum::<usize>() >= ctx.page_bytes;
        // A page of large messages is formatted on a bulk thread (each
        // stored payload is checked to be JSON again: a millisecond a MiB).
        let name = channel.to_owned();
        let frames = crate::bulk::run(held, move || {
            page.into_iter()
                .take_while(|m| until.is_none_or(|u| m.offset < u))
                .map(|m| {
                    let frame = protocol::deliver_frame(&name, m.offset, &m.msg_id, &m.payload);
                    (m.offset, Utf8Bytes::from(frame))
                })
                .collect::<Vec<_>>()
        })
        .await;
        // Kept for the readers behind this one, then the turn is over.
        tail.keep_read(channel, &frames, epoch);
        drop(turn);
        if let Some(notice) = notice {
            feed_text(sink, ctx.deadline, end, Utf8Bytes::from(notice)).await?;
        }
        write_page(sink, ctx, end, frames, &mut next, &mut written).await?;
        drop(permit);
        // A short page that was not cut by its byte bound is the log's end.
        if got == 0 || (got < want && !full) {
            break;
        }
    }
    // Offsets retention removed (or never written, at the end) are skipped.
    Ok((until.map_or(next, |u| u.max(next)), written))
}

/// Writes a page of frames in offset order, then flushes: the socket's
/// buffer holds the page before the next one is read, so that a reader
/// that does not read meets the write deadline here instead of letting
/// pages pile up. `next` becomes the offset after the last frame written,
/// and `written` counts them.
async fn write_page(
    sink: &mut Sink,
    ctx: &WriteCtx,
    end: &EndFlag,
    frames: Vec<(u64, Utf8Bytes)>,
    next: &mut u64,
    written: &mut u64,
) -> Result<(), Failed> {
    for (offset, frame) in frames {
        feed_text(sink, ctx.deadline, end, frame).await?;
        *next = offset + 1;
        *written += 1;
    }
    bounded(ctx.deadline, end, sink.flush()).await
}

fn close_message(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: code.into(),
        reason: Utf8Bytes::from(reason.to_owned()),
    }))
}
