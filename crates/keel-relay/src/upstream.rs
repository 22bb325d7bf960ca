//! Sending the outbox to the upstream messaging API (docs/protocol.md, "Sending to the upstream"), and routing
//! what the upstream pushes into sessions' private channels.
//!
//! outbox (PENDING) -> claim with a lease -> keel-ratelimit SendQueue (global
//! and per-recipient buckets, Retry-After, backoff) -> UpstreamSink -> keel-reconnect
//! client (buffered with the idempotency key as ack key, re-sent on every new
//! link until answered) -> `ok` -> SENT; `rate_limited` -> retry no sooner
//! than told; no answer on a live link -> backoff; attempts used up -> DEAD.
//! A try while the link is down (or one it drops before the answer) is not
//! an attempt: the frame stays buffered for the next link. A send that
//! [`SUSPECT_AFTER`] links died with is taken back and tried alone: a frame
//! the upstream drops the link over must neither block the others (the
//! client re-sends it first on every link) nor escape its attempts.

use keel_session::SessionStore;
use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_ratelimit::{Backoff, Delivery, Quota, Scope, SendOutcome, SendQueue, Sink};
use keel_reconnect::Message;
use keel_reconnect::{Inbound, Link, Protocol, ReconnectingClient, State};
use keel_session::{OutboxId, Retry, SessionId};
use serde::Deserialize;
use tokio::sync::watch;

use crate::channels::BackgroundCtx;
use crate::protocol::json_str;

/// An upstream answer to one send.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Ok,
    RateLimited { retry_after: Duration, scope: Scope },
    Error { code: String, message: String },
}

#[derive(Deserialize)]
struct UpFrame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    retry_after_ms: Option<u64>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    body: Option<Box<serde_json::value::RawValue>>,
}

/// The upstream protocol for keel-reconnect: an answer (`ok`,
/// `rate_limited`, `error`) acknowledges its send, so the client stops
/// re-sending it; everything is also handed to the router.
struct UpstreamProtocol;

impl Protocol for UpstreamProtocol {
    async fn resume(&self, _link: &mut Link<'_>) -> Result<(), String> {
        Ok(())
    }

    fn inbound(&self, frame: &Message) -> Inbound {
        let acks = match frame {
            Message::Text(t) => serde_json::from_str::<UpFrame>(t.as_str())
                .ok()
                .filter(|f| matches!(f.kind.as_str(), "ok" | "rate_limited" | "error"))
                .and_then(|f| f.id)
                .into_iter()
                .collect(),
            _ => Vec::new(),
        };
        Inbound {
            acks,
            deliver: true,
        }
    }
}

type Pending = Mutex<HashMap<String, watch::Sender<Option<Answer>>>>;

/// What the send queue carries: the outbox item and its wire frame.
#[derive(Debug, Clone)]
struct Envelope {
    idem_key: String,
    frame: String,
}

/// How soon a send is tried again when its try could not reach the
/// upstream (link down): the try after it waits for the link and the answer.
const UNAVAILABLE_RETRY: Duration = Duration::from_millis(100);

/// Links that died with a send's frame the first unanswered one on them
/// (the first the upstream read) before the send is taken back from the
/// client and tried alone.
const SUSPECT_AFTER: u32 = 3;

struct UpstreamSink {
    client: Arc<ReconnectingClient>,
    pending: Arc<Pending>,
    /// Held shared by every try from its write to its answer; a suspect's
    /// try holds it alone, so that a link lost then is that send's doing.
    turns: tokio::sync::RwLock<()>,
    /// Sends to try alone (idempotency keys); bounded by the queue.
    suspects: Arc<Mutex<HashSet<String>>>,
    answer_timeout: Duration,
    /// When the link was last dropped for want of an answer.
    last_redial: Mutex<Option<tokio::time::Instant>>,
    /// Redials made (a try whose link this sink dropped still counts).
    redials: std::sync::atomic::AtomicU64,
}

impl Sink<String, Envelope> for UpstreamSink {
    async fn send(&self, _to: &String, msg: &Envelope) -> SendOutcome {
        let alone = self.is_suspect(&msg.idem_key);
        if !alone {
            let _shared = self.turns.read().await;
            return self.try_send(msg, false).await;
        }
        // Waits for the tries in progress to end; holds back new ones.
        let _alone = self.turns.write().await;
        let mut link = self.client.state();
        let up = matches!(
            tokio::time::timeout(
                self.answer_timeout,
                link.wait_for(|s| *s == State::Connected),
            )
            .await,
            Ok(Ok(_))
        );
        if !up {
            return SendOutcome::Unavailable {
                retry_after: UNAVAILABLE_RETRY,
            };
        }
        self.try_send(msg, true).await
    }
}

impl UpstreamSink {
    /// One try: `alone`, no other try is in progress, and a link lost
    /// before the answer counts as an attempt.
    async fn try_send(&self, msg: &Envelope, alone: bool) -> SendOutcome {
        // An earlier attempt whose answer never came is still buffered in the
        // client and will be re-sent on the next link: wait for it rather than
        // sending a second copy.
        let (mut rx, fresh) = {
            let mut map = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(&msg.idem_key) {
                Some(tx) => (tx.subscribe(), false),
                None => {
                    let (tx, rx) = watch::channel(None);
                    map.insert(msg.idem_key.clone(), tx);
                    (rx, true)
                }
            }
        };
        // Whether the link stays up for the whole attempt: only then does
        // no answer count against the send's attempts. A send written to a
        // dead link (or one that drops before the answer) stays buffered
        // and goes out on the next link; a flapping upstream must not use
        // up its attempts and turn it DEAD.
        let mut link = self.client.state();
        let mut link_lost = *link.borrow_and_update() != State::Connected;
        // A drop and a fast reconnect can both land between two reads of
        // the state: the client's drop counter sees them. A drop this sink
        // asked for (a redial for want of answers) does not excuse a try.
        let drops = self.client.counters().drops;
        let redials = self.redials.load(std::sync::atomic::Ordering::Acquire);
        if fresh
            && let Err(e) = self
                .client
                .send(Message::text(msg.frame.clone()), Some(msg.idem_key.clone()))
                .await
        {
            self.forget(&msg.idem_key);
            return match e {
                // Sends waiting for a link filled the client's buffer.
                keel_reconnect::SendError::Full { .. } => SendOutcome::Unavailable {
                    retry_after: UNAVAILABLE_RETRY,
                },
                keel_reconnect::SendError::TooLarge(_) => SendOutcome::Failed {
                    retryable: false,
                    error: format!("upstream client refused: {e}"),
                },
                _ => SendOutcome::Failed {
                    retryable: true,
                    error: format!("upstream client refused: {e}"),
                },
            };
        }
        let deadline = tokio::time::Instant::now() + self.answer_timeout;
        let answer = loop {
            tokio::select! {
                answer = rx.wait_for(Option::is_some) => break answer.ok().map(|a| a.clone()),
                () = tokio::time::sleep_until(deadline) => break None,
                changed = link.changed(), if !link_lost => {
                    link_lost = changed.is_err() || *link.borrow_and_update() != State::Connected;
                }
            }
        };
        let link_lost = link_lost || self.client.counters().drops != drops;
        let redialled = self.redials.load(std::sync::atomic::Ordering::Acquire) != redials;
        let closed = matches!(*link.borrow(), State::Closed { .. });
        let answer = match answer {
            Some(a) => a,
            // A closed client (the upstream ended it for good) sends
            // nothing more: the try counts, so that the send ends DEAD
            // rather than waiting for a link that will not come.
            None if closed => {
                self.forget(&msg.idem_key);
                return SendOutcome::Failed {
                    retryable: true,
                    error: "the upstream client is closed".to_owned(),
                };
            }
            None if link_lost && !redialled && alone => {
                // Taken back either way: the next try writes it alone again.
                // The link died with this send the only one unanswered on
                // it: an attempt. Otherwise (it died before the frame went
                // out, or a frame buffered earlier went out with it) it
                // says nothing about this send.
                let lost_alone = self
                    .client
                    .lost_links(&msg.idem_key)
                    .is_some_and(|l| l.alone > 0);
                self.client.withdraw(&msg.idem_key);
                self.forget(&msg.idem_key);
                if !lost_alone {
                    return SendOutcome::Unavailable {
                        retry_after: UNAVAILABLE_RETRY,
                    };
                }
                metrics::counter!("keel_upstream_links_lost_alone_total").increment(1);
                return SendOutcome::Failed {
                    retryable: true,
                    error: "the upstream dropped the link with only this send outstanding"
                        .to_owned(),
                };
            }
            None if link_lost && !redialled => {
                // Not an attempt the upstream could answer: the frame stays
                // buffered (written again on the next link) and the next
                // try waits for its answer rather than writing a copy. One
                // that is the first unanswered frame on every link that dies
                // is taken back (the client would write it first on every
                // link) and tried alone.
                if self
                    .client
                    .lost_links(&msg.idem_key)
                    .is_some_and(|l| l.first >= SUSPECT_AFTER)
                {
                    self.client.withdraw(&msg.idem_key);
                    self.forget(&msg.idem_key);
                    self.suspects
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(msg.idem_key.clone());
                    metrics::counter!("keel_upstream_suspect_sends_total").increment(1);
                }
                return SendOutcome::Unavailable {
                    retry_after: UNAVAILABLE_RETRY,
                };
            }
            None => {
                // No answer on a live link. Taken back from the client's
                // buffer, so that the next attempt writes it afresh (and a
                // last attempt's frame is not written by a later link after
                // the send went DEAD); and the link redialled: an upstream
                // that stalls or answers garbage on a live link would
                // otherwise answer nothing on it for good.
                self.client.withdraw(&msg.idem_key);
                self.forget(&msg.idem_key);
                self.redial();
                return SendOutcome::Failed {
                    retryable: true,
                    error: format!("no answer within {:?}", self.answer_timeout),
                };
            }
        };
        self.forget(&msg.idem_key);
        if alone {
            self.suspects
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&msg.idem_key);
        }
        match answer {
            Some(Answer::Ok) => SendOutcome::Sent,
            Some(Answer::RateLimited { retry_after, scope }) => {
                SendOutcome::RateLimited { retry_after, scope }
            }
            Some(Answer::Error { code, message }) => SendOutcome::Failed {
                retryable: false,
                error: format!("upstream error {code}: {message}"),
            },
            None => SendOutcome::Failed {
                retryable: true,
                error: "no answer".to_owned(),
            },
        }
    }

    fn is_suspect(&self, key: &str) -> bool {
        self.suspects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }

    /// Drops the link (when it is up); at most once per answer timeout,
    /// however many sends time out.
    fn redial(&self) {
        // Only a live link: a request made while connecting would drop the
        // next link as soon as it is up.
        if *self.client.state().borrow() != keel_reconnect::State::Connected {
            return;
        }
        let now = tokio::time::Instant::now();
        let mut last = self.last_redial.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| now.duration_since(t) >= self.answer_timeout) {
            *last = Some(now);
            self.redials
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            tracing::warn!(
                timeout = ?self.answer_timeout,
                "no answer from the upstream in time: redialling, unanswered sends are written again"
            );
            self.client.reconnect_now();
        }
    }

    fn forget(&self, key: &str) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN)
}

/// Runs until shutdown begins.
pub(crate) async fn run(
    ctx: Arc<BackgroundCtx>,
    url: String,
    tls: Option<Arc<keel_reconnect::rustls::ClientConfig>>,
) {
    let sending = ctx.config.sending.clone();
    let (client, mut frames) = ReconnectingClient::start(
        url,
        UpstreamProtocol,
        keel_reconnect::Config {
            backoff: keel_reconnect::Backoff {
                base: Duration::from_millis(100),
                cap: Duration::from_secs(5),
                ..Default::default()
            },
            tls,
            // Refuse rather than wait when full: a try waiting for room
            // would hold its turn (see `UpstreamSink::turns`) while the
            // frame at the head, the one to take back, waits behind it.
            buffer: keel_reconnect::BufferConfig {
                overflow: keel_reconnect::Overflow::Reject,
                ..Default::default()
            },
            ..Default::default()
        },
    );
    let client = Arc::new(client);
    let pending: Arc<Pending> = Arc::default();

    // Upstream reachability drives health.
    let health_task = {
        let health = ctx.channels.health.clone();
        let mut state = client.state();
        tokio::spawn(async move {
            loop {
                let reachable = match &*state.borrow_and_update() {
                    State::Connected => Some(true),
                    State::Backoff { .. } | State::Disconnected { .. } | State::Closed { .. } => {
                        Some(false)
                    }
                    State::Connecting | State::Resuming => None,
                };
                if let Some(r) = reachable {
                    health.set_upstream_reachable(r).await;
                }
                if state.changed().await.is_err() {
                    return;
                }
            }
        })
    };

    // Answers to their senders; pushed messages to sessions.
    let router = {
        let (ctx, pending) = (ctx.clone(), pending.clone());
        tokio::spawn(async move {
            while let Some(frame) = frames.recv().await {
                let text = match frame {
                    Message::Text(text) => text,
                    Message::Binary(_) => {
                        metrics::counter!("keel_upstream_garbage_total").increment(1);
                        continue;
                    }
                    _ => continue,
                };
                let Ok(f) = serde_json::from_str::<UpFrame>(text.as_str()) else {
                    metrics::counter!("keel_upstream_garbage_total").increment(1);
                    continue;
                };
                let answer = match f.kind.as_str() {
                    "ok" => Answer::Ok,
                    "rate_limited" => Answer::RateLimited {
                        retry_after: Duration::from_millis(f.retry_after_ms.unwrap_or(1000)),
                        scope: if f.scope.as_deref() == Some("global") {
                            Scope::Global
                        } else {
                            Scope::Key
                        },
                    },
                    "error" => Answer::Error {
                        code: f.code.clone().unwrap_or_default(),
                        message: f.message.clone().unwrap_or_default(),
                    },
                    "message" => {
                        route_inbound(&ctx, &f).await;
                        continue;
                    }
                    _ => continue,
                };
                let waiting = f.id.as_ref().and_then(|id| {
                    pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(id)
                        .cloned()
                });
                match waiting {
                    Some(tx) => {
                        tx.send_replace(Some(answer));
                    }
                    // An answer to no send in flight (a wrong id, or one
                    // answered after its timeout): ignored, counted.
                    None => metrics::counter!("keel_upstream_unknown_answers_total").increment(1),
                }
            }
        })
    };

    let suspects: Arc<Mutex<HashSet<String>>> = Arc::default();
    let sink = UpstreamSink {
        client: client.clone(),
        pending: pending.clone(),
        answer_timeout: Duration::from_millis(sending.answer_timeout_ms),
        last_redial: Mutex::new(None),
        redials: std::sync::atomic::AtomicU64::new(0),
        turns: tokio::sync::RwLock::new(()),
        suspects: suspects.clone(),
    };
    let max_queued = 1024;
    let (queue, _dead) = SendQueue::new(
        sink,
        keel_ratelimit::Config {
            global: vec![global_quota(&sending)],
            per_key: vec![
                Quota::per_second(nz(sending.per_recipient_rate))
                    .allow_burst(nz(sending.per_recipient_burst)),
            ],
            max_total: max_queued,
            give_up_after: (sending.give_up_after_ms > 0)
                .then(|| Duration::from_millis(sending.give_up_after_ms)),
            backoff: Backoff {
                base: Duration::from_millis(sending.backoff_base_ms),
                cap: Duration::from_millis(sending.backoff_cap_ms),
                max_attempts: sending.max_attempts,
                ..Default::default()
            },
            seed: u64::from(std::process::id()),
            ..Default::default()
        },
    );
    let queue = Arc::new(queue);
    let worker = format!("relay-{}", std::process::id());
    let lease = Duration::from_millis(sending.lease_ms);
    let in_queue: Arc<Mutex<HashSet<OutboxId>>> = Arc::default();
    let mut stop = ctx.intake.clone();
    let store = ctx.channels.store.clone();
    while !stop.is_stopping() {
        let room = max_queued.saturating_sub(in_queue.lock().map(|s| s.len()).unwrap_or(0));
        let items = if room == 0 {
            Vec::new()
        } else {
            match store.claim(&worker, lease, room.min(128)).await {
                Ok(items) => items,
                Err(e) => {
                    if let keel_session::OutboxError::Store(se) = &e {
                        ctx.channels.health.observe_store_error(se).await;
                    }
                    tracing::warn!(error = %e, "cannot claim outbox items");
                    Vec::new()
                }
            }
        };
        let mut took = 0;
        for item in items {
            if !in_queue
                .lock()
                .map(|mut s| s.insert(item.id))
                .unwrap_or(false)
            {
                continue; // its lease ran out while it waited in the queue
            }
            took += 1;
            let parsed: Option<(String, Box<serde_json::value::RawValue>)> =
                serde_json::from_slice::<serde_json::Value>(&item.payload)
                    .ok()
                    .and_then(|v| {
                        let to = v.get("to")?.as_str()?.to_owned();
                        let body = serde_json::value::to_raw_value(v.get("body")?).ok()?;
                        Some((to, body))
                    });
            let Some((to, body)) = parsed else {
                let _ = store
                    .dead_letter(item.id, "outbox payload is not {to, body}")
                    .await;
                in_queue.lock().map(|mut s| s.remove(&item.id)).ok();
                continue;
            };
            let wire_id = upstream_id(&item);
            let envelope = Envelope {
                idem_key: wire_id.clone(),
                frame: format!(
                    r#"{{"type":"send","id":{},"to":{},"body":{}}}"#,
                    json_str(&wire_id),
                    json_str(&to),
                    body.get()
                ),
            };
            match queue.submit(to, envelope).await {
                Ok(receipt) => {
                    let (ctx, worker, in_queue) = (ctx.clone(), worker.clone(), in_queue.clone());
                    let (client, pending, suspects) =
                        (client.clone(), pending.clone(), suspects.clone());
                    tokio::spawn(async move {
                        let delivery = receipt.await;
                        if matches!(
                            delivery,
                            Delivery::Dead(keel_ratelimit::DeadReason::Shutdown)
                        ) {
                            // The sender stopped (shutdown, or the upstream
                            // lock lost), not the send: it stays claimed and
                            // is claimed again when its lease runs out, here
                            // or by the next holder. Not DEAD.
                            in_queue.lock().map(|mut s| s.remove(&item.id)).ok();
                            suspects
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(&wire_id);
                            return;
                        }
                        if matches!(delivery, Delivery::Dead(_)) {
                            // Given up on: the frame of its last attempt must
                            // not go out on a later link after the session
                            // was told DEAD.
                            client.withdraw(&wire_id);
                            pending
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(&wire_id);
                        }
                        suspects
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&wire_id);
                        finish(&ctx, &worker, &item, delivery).await;
                        in_queue.lock().map(|mut s| s.remove(&item.id)).ok();
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "send queue refused an outbox item; it will be claimed again");
                    in_queue.lock().map(|mut s| s.remove(&item.id)).ok();
                }
            }
        }
        if took == 0 {
            tokio::select! {
                _ = ctx.outbox_ready.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.stopped() => {}
            }
        }
    }
    // Claimed items not finished by now expire and are claimed again after a
    // restart (or released by crash recovery); the upstream's idempotency key
    // makes a second send harmless.
    router.abort();
    health_task.abort();
    if let Ok(client) = Arc::try_unwrap(client) {
        client.close().await;
    }
}

/// The idempotency key the upstream sees: unique across scopes (two
/// sessions or users may use the same key) and fixed at enqueue:
/// `<scope>/<key>` with `%` and `/` of the scope percent-encoded
/// (`session:9f2c…/order-42`, `user:alice/order-42`, `spool/job-7`); the
/// bare key for items enqueued before keys were scoped.
pub(crate) fn upstream_id(item: &keel_session::OutboxItem) -> String {
    if item.scope.is_empty() {
        return item.idem_key.clone();
    }
    let scope = item.scope.replace('%', "%25").replace('/', "%2F");
    format!("{scope}/{}", item.idem_key)
}

async fn finish(
    ctx: &BackgroundCtx,
    worker: &str,
    item: &keel_session::OutboxItem,
    delivery: Delivery,
) {
    let store = &ctx.channels.store;
    let status = match &delivery {
        Delivery::Sent { .. } => match store.complete(item.id, worker).await {
            Ok(_) => "SENT",
            Err(e) => {
                tracing::warn!(id = %item.idem_key, error = %e, "sent, but could not mark SENT");
                return;
            }
        },
        Delivery::Dead(reason) => {
            let why = format!("{reason:?}");
            if store
                .fail(item.id, worker, &why, Retry::Never)
                .await
                .is_err()
            {
                let _ = store.dead_letter(item.id, &why).await;
            }
            "DEAD"
        }
    };
    metrics::counter!("keel_upstream_sends_total", "status" => status).increment(1);
    // Tell the session, durably: its private channel holds the result.
    if let Some(session) = &item.session_id {
        let channel = session.private_channel();
        let msg_id = format!("send-result-{}", item.idem_key);
        let payload = format!(
            r#"{{"type":"send_result","id":{},"status":"{status}"}}"#,
            json_str(&item.idem_key)
        );
        ctx.channels
            .publish_internal(&channel, &msg_id, payload.as_bytes())
            .await;
    }
}

async fn route_inbound(ctx: &BackgroundCtx, f: &UpFrame) {
    let (Some(to), Some(id)) = (&f.to, &f.id) else {
        metrics::counter!("keel_upstream_unroutable_total").increment(1);
        return;
    };
    let session = SessionId::from(to.as_str());
    if ctx.channels.store.session(&session).await.is_err() {
        metrics::counter!("keel_upstream_unroutable_total").increment(1);
        tracing::warn!(to = %to, "upstream message for an unknown session dropped");
        return;
    }
    let payload = format!(
        r#"{{"type":"upstream_message","id":{},"from":{},"body":{}}}"#,
        json_str(id),
        json_str(f.from.as_deref().unwrap_or("")),
        f.body.as_ref().map_or("null", |b| b.get())
    );
    ctx.channels
        .publish_internal(
            &session.private_channel(),
            &format!("upstream-{id}"),
            payload.as_bytes(),
        )
        .await;
    metrics::counter!("keel_upstream_inbound_total").increment(1);
}

/// The upstream's global quota: per second, or per minute when configured,
/// with its burst.
fn global_quota(sending: &crate::config::Sending) -> Quota {
    let quota = match sending.global_rate_per_minute {
        Some(n) => Quota::per_minute(nz(n)),
        None => Quota::per_second(nz(sending.global_rate)),
    };
    match sending.global_burst {
        Some(b) => quota.allow_burst(nz(b)),
        None => quota,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_ids_are_unique_across_scopes() {
        let item = |scope: &str, key: &str| keel_session::OutboxItem {
            id: keel_session::OutboxId(1),
            session_id: None,
            scope: scope.to_owned(),
            idem_key: key.to_owned(),
            payload: Vec::new(),
            state: keel_session::OutboxState::Pending,
            claimed_by: None,
            claim_until: None,
            attempts: 0,
            next_attempt_at: 0,
            last_error: None,
            created_at: 0,
            sent_at: None,
        };
        assert_eq!(upstream_id(&item("", "k")), "k", "enqueued before scopes");
        assert_eq!(upstream_id(&item("user:alice", "k")), "user:alice/k");
        // A `/` in a subject cannot make two scopes' ids meet.
        assert_ne!(
            upstream_id(&item("user:a/b", "c")),
            upstream_id(&item("user:a", "b/c"))
        );
    }
}
