//! One client connection: the hello handshake, the reader loop, a writer
//! task that batches frames and keeps each channel's delivery in offset order,
//! and a publish pipeline that outlives the connection until it drains.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures::stream::{FuturesOrdered, SplitSink};
use futures::{FutureExt, SinkExt, StreamExt};
use keel_ratelimit::{Limiter, Quota};
use keel_session::{NewSend, NewSession, SessionError, SessionId, SessionState, Store, StoreError};
use tokio::sync::{Notify, mpsc};

use crate::auth;
use crate::failpoints::Delivery;
use crate::hub::{Outbound, SlowFlag};
use crate::protocol::{self, ClientFrame, ErrorCode, close, error_frame, json_str};
use crate::relay::Shared;

/// Frames written per flush at most.
const WRITE_BATCH: usize = 64;
/// Messages read from the log per query when replaying.
const REPLAY_PAGE: usize = 256;

/// The session a connection is bound to after `hello`.
struct Bound {
    id: SessionId,
    channels: HashSet<String>,
    replaced: Arc<Notify>,
}

struct Conn {
    shared: Arc<Shared>,
    id: u64,
    tx: mpsc::Sender<Outbound>,
    slow: Arc<SlowFlag>,
    session: Option<Bound>,
    errors: u32,
    limiter: Limiter,
    /// The publish pipeline, started on the first publish: idle sessions
    /// (most of them) never pay for its task and channel.
    publish: Option<mpsc::Sender<PublishJob>>,
}

struct PublishJob {
    channel: String,
    id: String,
    payload: Bytes,
    /// The session's child's stdin, for a publish to its own private channel.
    stdin: Option<mpsc::Sender<Vec<u8>>>,
    /// When the frame was read.
    received: std::time::Instant,
}

/// Runs one connection to its end.
pub(crate) async fn serve(shared: Arc<Shared>, socket: WebSocket, ip_guard: IpGuard) {
    let ip = ip_guard.ip;
    let _ip = ip_guard;
    let _live = shared.live.enter();
    let id = shared.next_conn();
    let (sink, mut stream) = socket.split();
    let limits = &shared.config.limits;
    let (tx, rx) = mpsc::channel(limits.outbound_queue);
    let slow = Arc::new(SlowFlag::default());
    let writer = tokio::spawn(write_loop(sink, rx, shared.store.clone(), slow.clone()));
    let limiter = Limiter::new(
        Quota::per_second(NonZeroU32::new(limits.publish_rate.max(1)).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(limits.publish_burst.max(1)).unwrap_or(NonZeroU32::MIN)),
    );
    let mut conn = Conn {
        shared: shared.clone(),
        id,
        tx,
        slow,
        session: None,
        errors: 0,
        limiter,
        publish: None,
    };
    metrics::gauge!("keel_connections").increment(1.0);
    tracing::debug!(conn = id, %ip, "connection opened");
    let end = conn.read_loop(&mut stream).await;
    match &end {
        Some((code, reason)) if *code == close::POLICY => {
            tracing::warn!(conn = id, %ip, code, reason = %reason, "connection closed for policy")
        }
        Some((code, reason)) => {
            tracing::debug!(conn = id, code, reason = %reason, "closing connection")
        }
        None if conn.slow.is_set() => {
            tracing::warn!(conn = id, %ip, "slow consumer closed (1013); it resumes from the log")
        }
        None => tracing::debug!(conn = id, "connection closed by the client"),
    }
    if let Some((code, reason)) = end {
        let _ = conn.tx.send(Outbound::Close { code, reason }).await;
    }
    conn.detach().await;
    drop(conn);
    // The writer ends once every sender is gone and its queue is written.
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    metrics::gauge!("keel_connections").decrement(1.0);
}

/// One admitted connection from `ip`; dropping it frees the slot, whether
/// the connection ran or its upgrade never completed.
pub(crate) struct IpGuard {
    pub(crate) shared: Arc<Shared>,
    pub(crate) ip: IpAddr,
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        self.shared.release_ip(self.ip);
    }
}

impl Conn {
    /// Reads frames until the connection ends; returns the close to send, if any.
    async fn read_loop(
        &mut self,
        stream: &mut futures::stream::SplitStream<WebSocket>,
    ) -> Option<(u16, String)> {
        let limits = self.shared.config.limits.clone();
        let handshake_deadline = tokio::time::Instant::now() + limits.handshake_timeout();
        let mut idle_deadline = tokio::time::Instant::now() + limits.idle_timeout();
        let mut stopping = self.shared.intake.clone();
        let replaced = Arc::new(Notify::new());
        let frames_in = metrics::counter!("keel_frames_in_total");
        loop {
            let deadline = if self.session.is_none() {
                handshake_deadline.min(idle_deadline)
            } else {
                idle_deadline
            };
            let replaced_now = self
                .session
                .as_ref()
                .map(|s| s.replaced.clone())
                .unwrap_or_else(|| replaced.clone());
            tokio::select! {
                msg = stream.next() => {
                    let msg = match msg {
                        Some(Ok(msg)) => msg,
                        Some(Err(e)) => return read_error_close(e, limits.max_frame_bytes),
                        None => return None,
                    };
                    idle_deadline = tokio::time::Instant::now() + limits.idle_timeout();
                    match msg {
                        Message::Text(text) => {
                            frames_in.increment(1);
                            if let Some(end) = self.on_text(&text).await {
                                return Some(end);
                            }
                        }
                        Message::Binary(_) => {
                            if let Some(end) = self.error(ErrorCode::BadJson, "binary frames are not part of keel.v1; send JSON text", None).await {
                                return Some(end);
                            }
                        }
                        Message::Close(_) => return None,
                        Message::Ping(_) | Message::Pong(_) => {}
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Some(if self.session.is_none() {
                        (close::POLICY, "no hello before the handshake timeout".to_owned())
                    } else {
                        (close::IDLE, "idle timeout".to_owned())
                    });
                }
                _ = stopping.stopped() => {
                    return Some((close::GOING_AWAY, "relay shutting down; resume later".to_owned()));
                }
                _ = self.slow.wait() => return None,
                _ = replaced_now.notified() => {
                    return Some((close::REPLACED, "another connection resumed this session".to_owned()));
                }
            }
        }
    }

    async fn send(&self, frame: String) {
        let _ = self.tx.send(Outbound::Frame(Utf8Bytes::from(frame))).await;
    }

    /// Sends an error frame; returns the close to send when the connection
    /// has misbehaved too often.
    async fn error(
        &mut self,
        code: ErrorCode,
        message: &str,
        reference: Option<&str>,
    ) -> Option<(u16, String)> {
        metrics::counter!("keel_errors_total", "code" => code.as_str()).increment(1);
        self.send(error_frame(code, message, reference)).await;
        self.errors += 1;
        (self.errors >= self.shared.config.limits.max_errors).then(|| {
            (
                close::POLICY,
                format!("{} bad frames; closing", self.errors),
            )
        })
    }

    async fn on_text(&mut self, text: &str) -> Option<(u16, String)> {
        let limits = &self.shared.config.limits;
        let frame = match protocol::decode(text, limits.max_frame_bytes) {
            Ok(f) => f,
            Err(e) => return self.error(e.code, &e.message, e.reference.as_deref()).await,
        };
        if self.session.is_none() && !matches!(frame, ClientFrame::Hello { .. } | ClientFrame::Ping)
        {
            return self
                .error(
                    ErrorCode::InvalidState,
                    &format!("send hello before {}", frame.kind()),
                    frame.reference(),
                )
                .await;
        }
        match frame {
            ClientFrame::Ping => {
                self.send(r#"{"type":"pong"}"#.to_owned()).await;
                None
            }
            // Boxed: it runs once and its state is large; unboxed it would
            // sit in every connection's future for its whole life.
            ClientFrame::Hello { token, resume } => Box::pin(self.on_hello(token, resume)).await,
            ClientFrame::Subscribe { channel, from } => self.on_subscribe(channel, from).await,
            ClientFrame::Unsubscribe { channel } => self.on_unsubscribe(channel).await,
            ClientFrame::Publish {
                channel,
                id,
                payload,
            } => self.on_publish(channel, id, payload).await,
            ClientFrame::Send { id, to, body } => self.on_send(id, to, body.get()).await,
            ClientFrame::Ack { channel, offset } => self.on_ack(channel, offset).await,
            ClientFrame::Exec { command } => self.on_exec(command).await,
        }
    }

    async fn on_hello(
        &mut self,
        token: Option<String>,
        resume: Option<BTreeMap<String, u64>>,
    ) -> Option<(u16, String)> {
        if self.session.is_some() {
            return self
                .error(
                    ErrorCode::InvalidState,
                    "this connection already has a session",
                    None,
                )
                .await;
        }
        let store = self.shared.store.clone();
        let (session, previous, new_token) = match token {
            None => {
                let secret = auth::new_secret();
                let created = match store
                    .create_session(NewSession {
                        token_hash: auth::hash_secret(&secret),
                        // Stored ACTIVE at once: one write, not two.
                        connected: true,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(s) => s,
                    Err(e) => return self.session_error(&e, None).await,
                };
                let token = auth::token(created.id.as_str(), &secret);
                (created.id, SessionState::Created, Some(token))
            }
            Some(token) => {
                let Some((id, secret)) = auth::split_token(&token) else {
                    return self
                        .error(ErrorCode::Unauthorized, "malformed token", None)
                        .await;
                };
                let id = SessionId::from(id);
                let found = match store.session(&id).await {
                    Ok(s) => s,
                    Err(SessionError::NotFound(_)) => {
                        return self
                            .error(ErrorCode::Unauthorized, "unknown token", None)
                            .await;
                    }
                    Err(e) => return self.session_error(&e, None).await,
                };
                if !auth::verify(secret, &found.token_hash) {
                    return self
                        .error(ErrorCode::Unauthorized, "unknown token", None)
                        .await;
                }
                if found.state == SessionState::Closed {
                    return self
                        .error(ErrorCode::InvalidState, "session is closed", None)
                        .await;
                }
                (found.id, found.state, None)
            }
        };
        // One connection per session: a newer one replaces the older.
        let replaced = Arc::new(Notify::new());
        if let Some(old) = self
            .shared
            .bind_session(&session, self.id, replaced.clone())
        {
            old.notify_one();
        }
        // Created by this very hello (not merely stored as CREATED).
        let fresh = new_token.is_some();
        if previous != SessionState::Active && !fresh {
            let _ = store.transition(&session, SessionState::Active).await;
        }
        let private = session.private_channel();
        self.session = Some(Bound {
            id: session.clone(),
            channels: HashSet::new(),
            replaced,
        });

        // Channels to deliver: the stored subscriptions, the private channel,
        // and whatever the client says it was reading.
        // A session created by this hello has none, and nothing in its
        // private channel yet: no reads.
        let stored = if fresh {
            Vec::new()
        } else {
            store.subscriptions(&session).await.unwrap_or_default()
        };
        let mut wanted: BTreeMap<String, u64> = stored
            .iter()
            .map(|s| (s.channel.clone(), s.cursor + 1))
            .collect();
        wanted.entry(private.clone()).or_insert(1);
        let limit = self.shared.config.limits.max_subscriptions;
        // Channels of `resume` that cannot be read are answered with an
        // error frame each, after the welcome; the rest of the hello stands.
        let mut refused: Vec<(ErrorCode, String, String)> = Vec::new();
        for (channel, seen) in resume.unwrap_or_default() {
            if let Some((code, message)) = self.channel_refusal(&channel) {
                refused.push((code, format!("resume: {message}"), channel));
                continue;
            }
            if !wanted.contains_key(&channel) {
                // Resuming a channel subscribes to it, within the limit, so
                // that a later hello without offsets still has it.
                if wanted.len() >= limit {
                    refused.push((
                        ErrorCode::LimitExceeded,
                        format!("resume: at most {limit} subscriptions per session"),
                        channel,
                    ));
                    continue;
                }
                if let Err(e) = store.subscribe(&session, &channel, seen).await {
                    let code = match e {
                        SessionError::Store(_) => ErrorCode::Unavailable,
                        _ => ErrorCode::InvalidState,
                    };
                    refused.push((code, format!("resume: {e}"), channel));
                    continue;
                }
            }
            // The decoder refused offsets over MAX_OFFSET: no overflow.
            wanted.insert(channel, seen + 1);
        }
        let mut catch_up = serde_json::Map::new();
        for channel in wanted.keys() {
            if fresh && *channel == private {
                catch_up.insert(channel.clone(), 1.into());
            } else if let Ok(bounds) = store.channel_bounds(channel).await {
                catch_up.insert(channel.clone(), bounds.next.into());
            }
        }
        let mut welcome = serde_json::json!({
            "type": "welcome",
            "session_id": session.as_str(),
            "state": previous.as_str(),
            "catch_up": catch_up,
        });
        if let Some(t) = new_token {
            welcome["token"] = t.into();
        }
        // The welcome goes first: refusals and deliveries follow it.
        self.send(welcome.to_string()).await;
        for (code, message, channel) in refused {
            if let Some(end) = self.error(code, &message, Some(&channel)).await {
                return Some(end);
            }
        }
        for (channel, from) in &wanted {
            self.start_channel(channel, *from, fresh && *channel == private)
                .await;
        }
        metrics::counter!("keel_sessions_opened_total").increment(1);
        tracing::info!(
            conn = self.id,
            session = %session,
            previous = previous.as_str(),
            channels = wanted.len(),
            "session {}",
            if previous == SessionState::Created { "opened" } else { "resumed" }
        );
        None
    }

    /// Why this session may not use `channel`, if it may not: a bad name, or
    /// another session's private channel.
    fn channel_refusal(&self, channel: &str) -> Option<(ErrorCode, &'static str)> {
        if !protocol::valid_channel(channel) {
            Some((ErrorCode::BadRequest, "invalid channel name"))
        } else if !self.may_read(channel) {
            Some((ErrorCode::Forbidden, "another session's private channel"))
        } else {
            None
        }
    }

    fn may_read(&self, channel: &str) -> bool {
        match (channel.strip_prefix("session:"), &self.session) {
            (Some(owner), Some(s)) => owner == s.id.as_str(),
            (Some(_), None) => false,
            (None, _) => true,
        }
    }

    /// Registers `channel` with the hub, then has the writer replay the log
    /// from `from` and continue live: nothing between is missed.
    async fn start_channel(&mut self, channel: &str, from: u64, fresh: bool) {
        let name = self
            .shared
            .hub
            .subscribe(channel, self.id, self.tx.clone(), self.slow.clone());
        if let Some(s) = &mut self.session {
            s.channels.insert(channel.to_owned());
        }
        let _ = self
            .tx
            .send(Outbound::Start {
                channel: name,
                from,
                fresh,
            })
            .await;
    }

    async fn on_subscribe(&mut self, channel: String, from: Option<u64>) -> Option<(u16, String)> {
        if let Some((code, message)) = self.channel_refusal(&channel) {
            return self.error(code, message, Some(&channel)).await;
        }
        let Some(session) = &self.session else {
            return None;
        };
        let (sid, count) = (session.id.clone(), session.channels.len());
        if session.channels.contains(&channel) {
            return self
                .error(
                    ErrorCode::InvalidState,
                    "already subscribed",
                    Some(&channel),
                )
                .await;
        }
        if count >= self.shared.config.limits.max_subscriptions {
            return self
                .error(
                    ErrorCode::LimitExceeded,
                    &format!(
                        "at most {} subscriptions per session",
                        self.shared.config.limits.max_subscriptions
                    ),
                    Some(&channel),
                )
                .await;
        }
        let store = self.shared.store.clone();
        let from = match from {
            Some(f) => f.max(1),
            None => match store.subscriptions(&sid).await {
                Ok(subs) => match subs.iter().find(|s| s.channel == channel) {
                    Some(s) => s.cursor + 1,
                    None => match store.channel_bounds(&channel).await {
                        Ok(b) => b.next,
                        Err(e) => return self.storage_error(&e, Some(&channel)).await,
                    },
                },
                Err(e) => return self.storage_error(&e, Some(&channel)).await,
            },
        };
        if let Err(e) = store
            .subscribe(&sid, &channel, from.saturating_sub(1))
            .await
        {
            return self.session_error(&e, Some(&channel)).await;
        }
        self.start_channel(&channel, from, false).await;
        None
    }

    async fn on_unsubscribe(&mut self, channel: String) -> Option<(u16, String)> {
        let Some(session) = &mut self.session else {
            return None;
        };
        if !session.channels.remove(&channel) {
            return self
                .error(ErrorCode::InvalidState, "not subscribed", Some(&channel))
                .await;
        }
        let sid = session.id.clone();
        self.shared.hub.unsubscribe(&channel, self.id);
        let _ = self
            .tx
            .send(Outbound::Stop {
                channel: Arc::from(channel.as_str()),
            })
            .await;
        if let Err(e) = self.shared.store.unsubscribe(&sid, &channel).await {
            return self.storage_error(&e, Some(&channel)).await;
        }
        None
    }

    async fn on_publish(
        &mut self,
        channel: String,
        id: String,
        payload: Box<serde_json::value::RawValue>,
    ) -> Option<(u16, String)> {
        let limits = &self.shared.config.limits;
        if let Some((code, msg)) = payload_refusal(payload.get(), limits, "payload") {
            return self.error(code, &msg, Some(&id)).await;
        }
        if !protocol::valid_id(&id) {
            return self
                .error(ErrorCode::BadRequest, "invalid message id", Some(&id))
                .await;
        }
        if let Some((code, message)) = self.channel_refusal(&channel) {
            return self.error(code, message, Some(&id)).await;
        }
        if let Err(wait) = self.limiter.check() {
            let msg = format!(
                "publish rate exceeded; retry in {} ms",
                wait.as_millis().max(1)
            );
            return self.error(ErrorCode::RateLimited, &msg, Some(&id)).await;
        }
        let stdin = self
            .session
            .as_ref()
            .filter(|s| channel == s.id.private_channel())
            .and_then(|s| self.shared.execs.stdin(&s.id));
        let publish = self.publish.get_or_insert_with(|| {
            let (publish, publish_rx) = mpsc::channel(self.shared.config.limits.max_in_flight);
            tokio::spawn(publish_loop(
                self.shared.clone(),
                publish_rx,
                self.tx.clone(),
            ));
            publish
        });
        let _ = publish
            .send(PublishJob {
                channel,
                id,
                // The payload text is shared from here on (the store
                // keeps a handle until it commits), never copied.
                payload: Bytes::from(String::from(Box::<str>::from(payload))),
                stdin,
                received: std::time::Instant::now(),
            })
            .await;
        None
    }

    async fn on_send(&mut self, id: String, to: String, body: &str) -> Option<(u16, String)> {
        let limits = &self.shared.config.limits;
        if let Some((code, msg)) = payload_refusal(body, limits, "body") {
            return self.error(code, &msg, Some(&id)).await;
        }
        if !protocol::valid_id(&id) || to.is_empty() || to.len() > 200 {
            return self
                .error(ErrorCode::BadRequest, "invalid id or recipient", Some(&id))
                .await;
        }
        let Some(session) = &self.session else {
            return None;
        };
        let payload = format!(r#"{{"to":{},"body":{body}}}"#, json_str(&to)).into_bytes();
        match self
            .shared
            .store
            .enqueue(NewSend {
                session_id: Some(session.id.clone()),
                idem_key: id.clone(),
                payload,
            })
            .await
        {
            Ok(_) => {
                self.shared.outbox_ready.notify_one();
                metrics::counter!("keel_sends_queued_total").increment(1);
                self.send(format!(r#"{{"type":"sent","id":{}}}"#, json_str(&id)))
                    .await;
                None
            }
            Err(keel_session::OutboxError::Store(e)) => self.storage_error(&e, Some(&id)).await,
            Err(e) => {
                self.error(ErrorCode::BadRequest, &e.to_string(), Some(&id))
                    .await
            }
        }
    }

    async fn on_exec(&mut self, command: String) -> Option<(u16, String)> {
        let Some(session) = &self.session else {
            return None;
        };
        let sid = session.id.clone();
        use crate::exec::ExecRefused;
        let (code, message) = match crate::exec::start(&self.shared, &sid, &command).await {
            Ok(_) => return None,
            Err(ExecRefused::Disabled) => (
                ErrorCode::Forbidden,
                "exec sessions are disabled on this relay".to_owned(),
            ),
            Err(ExecRefused::NotAllowed) => (
                ErrorCode::Forbidden,
                "command not in the allow-list".to_owned(),
            ),
            Err(ExecRefused::AlreadyRunning) => (
                ErrorCode::InvalidState,
                "this session already runs a command".to_owned(),
            ),
            Err(ExecRefused::Failed(e)) => (ErrorCode::Unavailable, format!("cannot start: {e}")),
        };
        self.error(code, &message, Some(&command)).await
    }

    async fn on_ack(&mut self, channel: String, offset: u64) -> Option<(u16, String)> {
        let Some(session) = &self.session else {
            return None;
        };
        let sid = session.id.clone();
        match self.shared.store.ack(&sid, &channel, offset).await {
            Ok(_) => None,
            Err(e) => self.session_error(&e, Some(&channel)).await,
        }
    }

    async fn session_error(
        &mut self,
        e: &SessionError,
        reference: Option<&str>,
    ) -> Option<(u16, String)> {
        match e {
            SessionError::Store(se) => self.storage_error(se, reference).await,
            SessionError::BeyondHead { .. } => {
                self.error(ErrorCode::BadRequest, &e.to_string(), reference)
                    .await
            }
            other => {
                self.error(ErrorCode::InvalidState, &other.to_string(), reference)
                    .await
            }
        }
    }

    async fn storage_error(
        &mut self,
        e: &StoreError,
        reference: Option<&str>,
    ) -> Option<(u16, String)> {
        self.shared.health.observe_store_error(e).await;
        self.error(
            ErrorCode::Unavailable,
            &format!("cannot store right now ({e}); retry"),
            reference,
        )
        .await
    }

    /// The session goes DETACHED (unless a newer connection took it over).
    async fn detach(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        for channel in &session.channels {
            self.shared.hub.unsubscribe(channel, self.id);
        }
        if self.shared.unbind_session(&session.id, self.id) {
            let _ = self
                .shared
                .store
                .transition(&session.id, SessionState::Detached)
                .await;
        }
    }
}

/// Appends publishes in the order they arrived, up to `max_in_flight` at a
/// time, then fans each new message out and acknowledges it. Runs until the
/// connection is gone and every accepted publish is answered, so a committed
/// message always reaches the hub.
///
/// Order: each append enters the store's writer queue before the next one
/// (queueing is awaited, committing is not), so one connection's publishes
/// get offsets in the order they were sent, even when many share a commit;
/// answers go out in that same order, duplicates included.
async fn publish_loop(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<PublishJob>,
    out: mpsc::Sender<Outbound>,
) {
    let limit = shared.config.limits.max_in_flight;
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
                        let queued = shared
                            .store
                            .queue_append(&job.channel, &job.id, job.payload.clone())
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
                                let deliver = protocol::deliver_frame(&job.channel, appended.offset, &job.id, &job.payload);
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
                            format!(
                                r#"{{"type":"published","id":{},"channel":{},"offset":{}}}"#,
                                json_str(&job.id),
                                json_str(&job.channel),
                                appended.offset
                            )
                        }
                        Err(e) => {
                            shared.health.observe_store_error(&e).await;
                            error_frame(ErrorCode::Unavailable, &format!("not stored ({e}); retry"), Some(&job.id))
                        }
                    };
                    replies.push(reply);
                }
                for (channel, mut run) in runs {
                    // Already in offset order (appends were queued in
                    // order); sorting keeps the hub's contract explicit.
                    run.sort_by_key(|(offset, _)| *offset);
                    shared.hub.publish_batch(&channel, Arc::from(run));
                }
                for reply in replies {
                    let _ = out.send(Outbound::Frame(Utf8Bytes::from(reply))).await;
                }
            }
            else => break,
        }
    }
}

/// The close for a connection whose WebSocket stream failed: 1007 for a
/// text frame that is not UTF-8, 1009 for a message over the hard cap (four
/// times the frame limit, whole or fragmented); a broken link gets none.
fn read_error_close(e: axum::Error, max_frame: usize) -> Option<(u16, String)> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let inner = e.into_inner();
    match inner.downcast_ref::<WsError>() {
        Some(WsError::Utf8(_)) => Some((
            close::INVALID_DATA,
            "text frame is not valid UTF-8".to_owned(),
        )),
        Some(WsError::Capacity(_)) => Some((
            close::TOO_BIG,
            format!("message over {} bytes", max_frame.saturating_mul(4)),
        )),
        _ => None,
    }
}

/// Why a `publish` payload or `send` body is refused, if it is: over the
/// byte limit, or nested deeper than common JSON parsers can read.
fn payload_refusal(
    raw: &str,
    limits: &crate::config::Limits,
    what: &str,
) -> Option<(ErrorCode, String)> {
    if raw.len() > limits.max_payload_bytes {
        return Some((
            ErrorCode::TooLarge,
            format!(
                "{what} of {} bytes is over the {}-byte limit",
                raw.len(),
                limits.max_payload_bytes
            ),
        ));
    }
    let depth = protocol::nesting_depth(raw, limits.max_payload_depth);
    (depth > limits.max_payload_depth).then(|| {
        (
            ErrorCode::BadRequest,
            format!(
                "{what} nests arrays and objects deeper than {} levels",
                limits.max_payload_depth
            ),
        )
    })
}

/// Writes frames in batches; replays logs and fills gaps so that each
/// channel's offsets go out in order, each once.
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Outbound>,
    store: Store,
    slow: Arc<SlowFlag>,
) {
    let mut next: HashMap<Arc<str>, u64> = HashMap::new();
    let frames_out = metrics::counter!("keel_frames_out_total");
    let gaps = metrics::counter!("keel_gap_replays_total");
    // Grows to what bursts need; an idle connection keeps it small.
    let mut batch = Vec::new();
    loop {
        let first = tokio::select! {
            biased;
            _ = slow.wait() => {
                metrics::counter!("keel_slow_consumers_total").increment(1);
                let _ = sink.send(close_message(close::SLOW_CONSUMER, "slow consumer: resume from your last offset")).await;
                return;
            }
            m = rx.recv() => m,
        };
        let Some(first) = first else {
            let _ = sink.close().await;
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
        for item in batch.drain(..) {
            let ok = match item {
                Outbound::Frame(f) => {
                    written += 1;
                    sink.feed(Message::Text(f)).await.is_ok()
                }
                Outbound::Live { channel, batch } => {
                    let Some(mut expected) = next.get(&channel).copied() else {
                        continue; // not started yet: the replay will cover it
                    };
                    let mut ok = true;
                    // A delivery held back by the `reorder_delivery` failpoint.
                    let mut held: Option<Utf8Bytes> = None;
                    for (offset, frame) in batch.iter() {
                        let offset = *offset;
                        if offset < expected {
                            continue; // already delivered
                        }
                        if offset > expected {
                            // Another publisher's earlier offset has not
                            // reached the hub yet: it is committed, so read it.
                            gaps.increment(1);
                            match replay(&mut sink, &store, &channel, expected, Some(offset)).await
                            {
                                Ok((_, n)) => written += n,
                                Err(()) => {
                                    ok = false;
                                    break;
                                }
                            }
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
                        };
                        for _ in 0..copies {
                            if sink.feed(Message::Text(frame.clone())).await.is_err() {
                                ok = false;
                            }
                        }
                        if let Some(late) = held.take() {
                            ok &= sink.feed(Message::Text(late)).await.is_ok();
                        }
                        if !ok {
                            break;
                        }
                    }
                    if let Some(late) = held.take() {
                        ok &= sink.feed(Message::Text(late)).await.is_ok();
                    }
                    next.insert(channel, expected);
                    ok
                }
                Outbound::Start {
                    channel,
                    from,
                    fresh: true,
                } => {
                    next.insert(channel, from);
                    true
                }
                Outbound::Start { channel, from, .. } => {
                    metrics::counter!("keel_start_replays_total").increment(1);
                    match replay(&mut sink, &store, &channel, from, None).await {
                        Ok((end, n)) => {
                            written += n;
                            next.insert(channel, end);
                            true
                        }
                        Err(()) => false,
                    }
                }
                Outbound::Stop { channel } => {
                    next.remove(&channel);
                    true
                }
                Outbound::Close { code, reason } => {
                    let _ = sink.send(close_message(code, &reason)).await;
                    return;
                }
            };
            if !ok {
                return;
            }
        }
        frames_out.increment(written);
        if sink.flush().await.is_err() {
            return;
        }
    }
}

/// Writes `channel` from `from` up to (not including) `until`, or to the end
/// of the log; returns the next offset to expect and how many were written.
async fn replay(
    sink: &mut SplitSink<WebSocket, Message>,
    store: &Store,
    channel: &str,
    from: u64,
    until: Option<u64>,
) -> Result<(u64, u64), ()> {
    let mut next = from;
    let mut written = 0;
    loop {
        let want = match until {
            Some(u) if u <= next => break,
            Some(u) => ((u - next) as usize).min(REPLAY_PAGE),
            None => REPLAY_PAGE,
        };
        let page = store
            .read_channel(channel, next, want)
            .await
            .map_err(|_| ())?;
        let got = page.len();
        for m in page {
            if until.is_some_and(|u| m.offset >= u) {
                break;
            }
            let frame = protocol::deliver_frame(channel, m.offset, &m.msg_id, &m.payload);
            sink.feed(Message::Text(Utf8Bytes::from(frame)))
                .await
                .map_err(|_| ())?;
            next = m.offset + 1;
            written += 1;
        }
        if got < want {
            break;
        }
    }
    // Offsets retention removed (or never written, at the end) are skipped.
    Ok((until.map_or(next, |u| u.max(next)), written))
}

fn close_message(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason.to_owned()),
    }))
}
