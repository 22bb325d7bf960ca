//! The publish pipeline: appends in send order, fans out after commit,
//! answers in send order, and releases each publish's bytes from the
//! budgets once it is answered.

use keel_session::SessionStore;
use std::sync::Arc;

use crate::upgrade::Utf8Bytes;
use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::channels::Channels;
use crate::hub::{OutQueue, Outbound};
use crate::protocol::{self, ErrorCode, error_frame};

/// One accepted publish on its way to the log.
pub(crate) struct PublishJob {
    pub(super) channel: String,
    pub(super) id: String,
    pub(super) payload: Bytes,
    /// The session's child's stdin, for a publish to its own private channel.
    pub(super) stdin: Option<mpsc::Sender<Vec<u8>>>,
    /// When the frame was read.
    pub(super) received: std::time::Instant,
    /// Its bytes in the connection's inbound budget and the relay's global
    /// one, given back when it is answered (the job is dropped).
    pub(super) _budget: (
        OwnedSemaphorePermit,
        crate::gate::Room,
        crate::limits::Buffered,
    ),
}

/// Appends publishes in the order they arrived, up to `max_in_flight` at a
/// time, then fans each new message out and acknowledges it. Runs until the
/// connection is gone and every accepted publish is answered, so a committed
/// message always reaches the hub.
///
/// Order: each append enters the store's writer queue before the next one
/// (queueing is awaited, committing is not), so one connection's publishes
/// get offsets in the order they were sent, even when many share a commit;
/// answers go out in that same order, duplicates included. The appends
/// queue in the store writer's lane `lane` (the connection's id), so that a
/// connection flooding the store delays other connections' publishes by
/// about one commit, not by its whole backlog. Ids are unique per
/// (channel, `scope`): the publishing user or session.
pub(super) async fn publish_loop(
    channels: Channels,
    lane: u64,
    scope: Arc<str>,
    limit: usize,
    mut rx: mpsc::Receiver<PublishJob>,
    out: OutQueue,
) {
    let published = metrics::counter!("keel_published_total");
    let commit_time = metrics::histogram!("keel_publish_commit_seconds");
    let mut in_flight = FuturesOrdered::new();
    let mut open = true;
    let mut done = Vec::new();
    loop {
        tokio::select! {
            job = rx.recv(), if open && in_flight.len() < limit => match job {
                Some(job) => {
                    // Take every publish already waiting too, so that their
                    // appends reach the store together and share one commit
                    // (and one fan-out to each subscriber).
                    let mut batch = vec![job];
                    while in_flight.len() + batch.len() < limit {
                        match rx.try_recv() {
                            Ok(more) => batch.push(more),
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            Err(mpsc::error::TryRecvError::Disconnected) => {
                                open = false;
                                break;
                            }
                        }
                    }
                    if batch.len() > 1 && crate::failpoints::reverse_batch() {
                        batch.reverse();
                    }
                    for job in batch {
                        let queued = channels
                            .store
                            .queue_append_scoped(lane, &scope, &job.channel, &job.id, job.payload.clone())
                            .await;
                        in_flight.push_back(async move {
                            let result = match queued {
                                Ok(committing) => committing.await,
                                Err(e) => Err(e),
                            };
                            (job, result)
                        });
                    }
                }
                None => open = false,
            },
            Some(first) = in_flight.next(), if !in_flight.is_empty() => {
                // Everything the same commit finished goes out together: one
                // hub hand-off per channel instead of one per message.
                done.push(first);
                while let Some(Some(more)) = in_flight.next().now_or_never() {
                    done.push(more);
                }
                let mut runs: Vec<(String, Vec<(u64, Utf8Bytes)>)> = Vec::new();
                let mut replies = Vec::with_capacity(done.len());
                for (job, result) in done.drain(..) {
                    let reply = match result {
                        Ok(appended) => {
                            if !appended.duplicate {
                                // Decoded from the client's frame: valid JSON, not parsed again.
                                let deliver = match std::str::from_utf8(&job.payload) {
                                    Ok(json) => protocol::deliver_frame_json(&job.channel, appended.offset, &job.id, json),
                                    Err(_) => protocol::deliver_frame(&job.channel, appended.offset, &job.id, &job.payload),
                                };
                                let frame = (appended.offset, Utf8Bytes::from(deliver));
                                match runs.iter_mut().find(|(c, _)| *c == job.channel) {
                                    Some((_, run)) => run.push(frame),
                                    None => runs.push((job.channel.clone(), vec![frame])),
                                }
                                published.increment(1);
                                commit_time.record(job.received.elapsed().as_secs_f64());
                                if let Some(stdin) = &job.stdin {
                                    let _ = stdin.send(job.payload.to_vec()).await;
                                }
                            }
                            protocol::published_frame(&job.id, &job.channel, appended.offset)
                        }
                        Err(e) => {
                            channels.health.observe_store_error(&e).await;
                            // Counted like every error frame (not against
                            // the client: the relay could not store).
                            metrics::counter!("keel_errors_total", "code" => ErrorCode::Unavailable.as_str()).increment(1);
                            error_frame(ErrorCode::Unavailable, &format!("not stored ({e}); retry"), Some(&job.id))
                        }
                    };
                    replies.push(reply);
                }
                for (channel, mut run) in runs {
                    // Already in offset order (appends were queued in
                    // order); sorting keeps the hub's contract explicit.
                    run.sort_by_key(|(offset, _)| *offset);
                    channels.fan_out(&channel, Arc::from(run)).await;
                }
                for reply in replies {
                    out.send(Outbound::Frame(Utf8Bytes::from(reply))).await;
                }
            }
            else => break,
        }
    }
}
