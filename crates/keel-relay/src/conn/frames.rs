//! Each client frame: decoded, checked against the session and the limits,
//! handled.

use keel_session::SessionStore;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use crate::upgrade::Utf8Bytes;
use bytes::Bytes;
use keel_session::{NewSend, NewSession, OutboxError, SessionError, SessionId, SessionState};
use tokio::sync::{Notify, mpsc};

use super::{Bound, Conn, End, PublishJob};
use crate::auth;
use crate::hub::Outbound;
use crate::limits::{hit, ip_key};
use crate::protocol::{self, ClientFrame, ErrorCode, close, json_str};

/// Semaphore permits for `bytes` (at least one; at most what a u32 holds).
fn permits(bytes: usize) -> u32 {
    bytes.clamp(1, u32::MAX as usize) as u32
}

impl Conn {
    /// Handles one text frame; the frame itself is dropped once decoded,
    /// so that a publish waiting for room holds its payload only once.
    pub(super) async fn on_text(&mut self, text: Utf8Bytes) -> End {
        let limits = &self.ctx.config.limits;
        // A large frame is decoded on a bulk thread, so that the runtime's
        // workers stay free for small ones meanwhile.
        let max = limits.max_frame_bytes;
        let decoded = crate::bulk::run(text.len(), move || protocol::decode(&text, max)).await;
        let frame = match decoded {
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
            ClientFrame::Hello {
                token,
                resume,
                auth,
            } => Box::pin(self.on_hello(token, resume, auth)).await,
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
        jwt: Option<String>,
    ) -> End {
        if self.session.is_some() {
            return self
                .error(
                    ErrorCode::InvalidState,
                    "this connection already has a session",
                    None,
                )
                .await;
        }
        let principal = match self.ctx.authority.authenticate(jwt.as_deref()) {
            Ok(p) => p,
            Err(auth::Refusal(why)) => {
                auth::refused("jwt");
                return self.error(ErrorCode::Unauthorized, &why, None).await;
            }
        };
        drop(jwt);
        let store = self.ctx.channels.store.clone();
        let (session, previous, new_token) = match token {
            None => {
                // New sessions are rows on disk: their rate per client
                // address is bounded (a resumed session costs nothing new).
                if let Err(wait) = self.ctx.session_rate.check(&ip_key(self.ip)) {
                    hit("session_rate");
                    let msg = format!(
                        "too many new sessions from this address; retry in {} ms",
                        wait.as_millis().max(1)
                    );
                    return self.error(ErrorCode::RateLimited, &msg, None).await;
                }
                let secret = auth::new_secret();
                let created = match store
                    .create_session(NewSession {
                        token_hash: auth::hash_secret(&secret),
                        meta: principal.owner_meta(),
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
                if !principal.owns(&found.meta) {
                    auth::refused("owner");
                    return self
                        .error(
                            ErrorCode::Forbidden,
                            "this session belongs to another subject",
                            None,
                        )
                        .await;
                }
                if found.state == SessionState::Closed {
                    return self
                        .error(ErrorCode::InvalidState, "session is closed", None)
                        .await;
                }
                let mut previous = found.state;
                // Cluster mode: another node may hold it; it closes its
                // connection first (or is crashed if it cannot answer).
                match crate::cluster::take_over(&self.ctx.channels, &found.id).await {
                    Ok(Some(state)) => previous = state,
                    Ok(None) => {}
                    Err(e) => {
                        // The client resumes again shortly (1011 is retried).
                        self.ctx.channels.health.observe_store_error(&e).await;
                        return Some((
                            crate::protocol::close::INTERNAL,
                            format!("cannot move the session to this node now ({e}); resume"),
                        ));
                    }
                }
                (found.id, previous, None)
            }
        };
        // One connection per session: a newer one replaces the older.
        let replaced = Arc::new(Notify::new());
        if let Some(old) = self.ctx.sessions.bind(&session, self.id, replaced.clone()) {
            old.notify_one();
        }
        self.ctx.execs.attached(&session);
        // Created by this very hello (not merely stored as CREATED).
        let fresh = new_token.is_some();
        // Written even when it was read ACTIVE: an older connection of this
        // session may be closing right now (`SessionMap::reconcile`).
        if !fresh {
            self.ctx.sessions.reconcile(&store, &session).await;
        }
        let private = session.private_channel();
        self.session = Some(Bound {
            id: session.clone(),
            id_scope: principal.id_scope(session.as_str()),
            // A far-future `exp` (or one that overflows) never closes.
            expires: principal
                .valid_for
                .and_then(|d| tokio::time::Instant::now().checked_add(d)),
            principal,
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
        // Channels of `resume` (and stored subscriptions) that cannot be
        // read are answered with an error frame each, after the welcome;
        // the rest of the hello stands. A stored subscription the JWT no
        // longer covers stays stored but is not delivered.
        let mut refused: Vec<(ErrorCode, String, String)> = Vec::new();
        let mut wanted: BTreeMap<String, u64> = BTreeMap::new();
        for s in &stored {
            match self.channel_refusal(&s.channel) {
                Some((code, message)) => {
                    refused.push((code, format!("subscription: {message}"), s.channel.clone()));
                }
                None => {
                    wanted.insert(s.channel.clone(), s.cursor + 1);
                }
            }
        }
        wanted.entry(private.clone()).or_insert(1);
        let limit = self.ctx.config.limits.max_subscriptions;
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
        let reported = if previous == SessionState::Crashed && crate::failpoints::hide_crash() {
            SessionState::Detached
        } else {
            previous
        };
        let mut welcome = serde_json::json!({
            "type": "welcome",
            "session_id": session.as_str(),
            "state": reported.as_str(),
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

    /// A bad name, no session yet, or another session's private channel:
    /// refused for reading and publishing alike. Otherwise the session, and
    /// whether `channel` is its own private channel.
    fn name_refusal(&self, channel: &str) -> Result<(&Bound, bool), (ErrorCode, String)> {
        if !protocol::valid_channel(channel) {
            return Err((ErrorCode::BadRequest, "invalid channel name".to_owned()));
        }
        let Some(session) = self.session.as_ref() else {
            return Err((ErrorCode::InvalidState, "send hello first".to_owned()));
        };
        match channel.strip_prefix("session:") {
            Some(owner) if owner == session.id.as_str() => Ok((session, true)),
            Some(_) => Err((
                ErrorCode::Forbidden,
                "another session's private channel".to_owned(),
            )),
            None => Ok((session, false)),
        }
    }

    /// Why this session may not read `channel`, if it may not: see
    /// [`Conn::name_refusal`], or a channel its JWT does not list.
    fn channel_refusal(&self, channel: &str) -> Option<(ErrorCode, String)> {
        match self.name_refusal(channel) {
            Err(refused) => Some(refused),
            Ok((_, true)) => None,
            Ok((session, false)) => (!session.principal.may_read(channel)).then(|| {
                (
                    ErrorCode::Forbidden,
                    "the JWT's channels.read does not list this channel".to_owned(),
                )
            }),
        }
    }

    /// Why this session may not publish to `channel`, if it may not: see
    /// [`Conn::name_refusal`], the JWT's `channels.publish` or the relay's
    /// publish rules.
    fn publish_refusal(&self, channel: &str) -> Option<(ErrorCode, String)> {
        match self.name_refusal(channel) {
            Err(refused) => Some(refused),
            Ok((_, true)) => None,
            Ok((session, false)) => self
                .ctx
                .authority
                .publish_refusal(&session.principal, channel)
                .map(|why| (ErrorCode::Forbidden, why)),
        }
    }

    /// Registers `channel` with the hub, then has the writer replay the log
    /// from `from` and continue live: nothing between is missed.
    async fn start_channel(&mut self, channel: &str, from: u64, fresh: bool) {
        let name = self
            .ctx
            .channels
            .hub
            .subscribe(channel, self.id, self.out.clone(), from);
        if let Some(s) = &mut self.session {
            s.channels.insert(channel.to_owned());
        }
        self.out
            .send(Outbound::Start {
                channel: name,
                from,
                fresh,
            })
            .await;
    }

    async fn on_subscribe(&mut self, channel: String, from: Option<u64>) -> End {
        if let Some((code, message)) = self.channel_refusal(&channel) {
            return self.error(code, &message, Some(&channel)).await;
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
        if count >= self.ctx.config.limits.max_subscriptions {
            hit("subscriptions");
            return self
                .error(
                    ErrorCode::LimitExceeded,
                    &format!(
                        "at most {} subscriptions per session",
                        self.ctx.config.limits.max_subscriptions
                    ),
                    Some(&channel),
                )
                .await;
        }
        let store = self.ctx.channels.store.clone();
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

    async fn on_unsubscribe(&mut self, channel: String) -> End {
        let Some(session) = &mut self.session else {
            return None;
        };
        if !session.channels.remove(&channel) {
            return self
                .error(ErrorCode::InvalidState, "not subscribed", Some(&channel))
                .await;
        }
        let sid = session.id.clone();
        self.ctx.channels.hub.unsubscribe(&channel, self.id);
        self.out
            .send(Outbound::Stop {
                channel: Arc::from(channel.as_str()),
            })
            .await;
        if let Err(e) = self.ctx.channels.store.unsubscribe(&sid, &channel).await {
            return self.storage_error(&e, Some(&channel)).await;
        }
        None
    }

    async fn on_publish(
        &mut self,
        channel: String,
        id: String,
        payload: Box<serde_json::value::RawValue>,
    ) -> End {
        let limits = &self.ctx.config.limits;
        if let Some((code, msg)) = payload_refusal(payload.get(), limits, "payload") {
            return self.error(code, &msg, Some(&id)).await;
        }
        if !protocol::valid_id(&id) {
            return self
                .error(ErrorCode::BadRequest, "invalid message id", Some(&id))
                .await;
        }
        if let Some((code, message)) = self.publish_refusal(&channel) {
            if code == ErrorCode::Forbidden {
                auth::refused("publish");
            }
            return self.error(code, &message, Some(&id)).await;
        }
        if let Err(wait) = self.limiter.check() {
            hit("publish_rate");
            let msg = format!(
                "publish rate exceeded; retry in {} ms",
                wait.as_millis().max(1)
            );
            return self.error(ErrorCode::RateLimited, &msg, Some(&id)).await;
        }
        let bytes = payload.get().len();
        // The connection's byte rate: past it, the socket is not read until
        // the bucket refills (TCP pushes back on the publisher), so that a
        // flood of large publishes from one connection cannot take the
        // disk's bandwidth from everyone else's. A payload never exceeds
        // the bucket (the configuration is checked at start).
        loop {
            match self
                .bytes_limiter
                .check_n(u32::try_from(bytes).unwrap_or(u32::MAX))
            {
                Ok(()) => break,
                Err(Some(wait)) => {
                    hit("publish_bytes");
                    self.until_ended(tokio::time::sleep(wait)).await?;
                }
                Err(None) => {
                    return self
                        .error(
                            ErrorCode::TooLarge,
                            "payload larger than the publish byte rate's burst",
                            Some(&id),
                        )
                        .await;
                }
            }
        }
        // Room for the payload in this connection's inbound budget and the
        // relay's: while there is none, this waits, and so the socket is not
        // read (TCP pushes back on the client) until answers go out. The
        // wait ends with the connection.
        let local = match self.inbound.clone().try_acquire_many_owned(permits(bytes)) {
            Ok(p) => p,
            Err(_) => {
                hit("inbound_bytes");
                let wait = self.inbound.clone().acquire_many_owned(permits(bytes));
                match self.until_ended(wait).await {
                    Some(Ok(p)) => p,
                    _ => return None,
                }
            }
        };
        // Reading the frame was charged to the relay's inbound budget
        // already: the payload keeps its share of that, and takes what the
        // charge did not cover (the frame's start, read with the previous
        // frame) from the budget.
        let mut room = self.gate.take(bytes);
        let short = bytes.saturating_sub(room.bytes());
        if short > 0 {
            let more = match self.ctx.budget.inbound.try_acquire(short) {
                Some(p) => Some(p),
                None => {
                    hit("global_bytes");
                    let wait = self.ctx.budget.inbound.acquire(short);
                    self.until_ended(wait).await.flatten()
                }
            };
            match more {
                Some(p) => room.add(p),
                None => return None,
            }
        }
        let stdin = self
            .session
            .as_ref()
            .filter(|s| channel == s.id.private_channel())
            .and_then(|s| self.ctx.execs.stdin(&s.id));
        let scope: Arc<str> = self
            .session
            .as_ref()
            .map_or_else(|| Arc::from(""), |s| Arc::from(s.id_scope.as_str()));
        let publish = self.publish.get_or_insert_with(|| {
            let (publish, publish_rx) = mpsc::channel(self.ctx.config.limits.max_in_flight);
            tokio::spawn(super::publish::publish_loop(
                self.ctx.channels.clone(),
                self.id,
                scope,
                self.ctx.config.limits.max_in_flight,
                publish_rx,
                self.out.clone(),
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
                _budget: (local, room, crate::limits::Buffered::inbound(bytes)),
            })
            .await;
        None
    }

    async fn on_send(&mut self, id: String, to: String, body: &str) -> End {
        let limits = &self.ctx.config.limits;
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
        let (sid, scope) = (session.id.clone(), session.id_scope.clone());
        if let Err(wait) = self.ctx.send_rate.check(&sid) {
            hit("send_rate");
            let msg = format!(
                "send rate exceeded; retry in {} ms",
                wait.as_millis().max(1)
            );
            return self.error(ErrorCode::RateLimited, &msg, Some(&id)).await;
        }
        let payload = format!(r#"{{"to":{},"body":{body}}}"#, json_str(&to)).into_bytes();
        let quota = Some(self.ctx.config.limits.max_pending_sends);
        match self
            .ctx
            .channels
            .store
            .enqueue_within(
                NewSend {
                    session_id: Some(sid),
                    // A user's sends share one key space across its
                    // sessions (jwt); a session's are its own (open).
                    scope: scope.clone(),
                    idem_key: id.clone(),
                    payload,
                },
                quota,
            )
            .await
        {
            Ok(_) => {
                self.ctx.outbox_ready.notify_one();
                metrics::counter!("keel_sends_queued_total").increment(1);
                self.send(format!(r#"{{"type":"sent","id":{}}}"#, json_str(&id)))
                    .await;
                None
            }
            Err(OutboxError::Store(e)) => self.storage_error(&e, Some(&id)).await,
            Err(e @ OutboxError::QuotaExceeded { .. }) => {
                hit("send_quota");
                self.error(ErrorCode::LimitExceeded, &e.to_string(), Some(&id))
                    .await
            }
            Err(e) => {
                self.error(ErrorCode::BadRequest, &e.to_string(), Some(&id))
                    .await
            }
        }
    }

    async fn on_exec(&mut self, command: String) -> End {
        let Some(session) = &self.session else {
            return None;
        };
        let sid = session.id.clone();
        use crate::exec::ExecRefused;
        let exec = crate::exec::ExecCtx {
            config: &self.ctx.config.exec,
            execs: &self.ctx.execs,
            supervisor: &self.ctx.supervisor,
            channels: &self.ctx.channels,
        };
        let (code, message) = match crate::exec::start(&exec, &sid, &command).await {
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
            Err(ExecRefused::TooMany(max)) => {
                crate::limits::hit("exec_children");
                (
                    ErrorCode::LimitExceeded,
                    format!("at most {max} exec children run at once on this relay"),
                )
            }
            Err(ExecRefused::Failed(e)) => (ErrorCode::Unavailable, format!("cannot start: {e}")),
        };
        self.error(code, &message, Some(&command)).await
    }

    async fn on_ack(&mut self, channel: String, offset: u64) -> End {
        let Some(session) = &self.session else {
            return None;
        };
        let sid = session.id.clone();
        match self.ctx.channels.store.ack(&sid, &channel, offset).await {
            Ok(_) => None,
            Err(e) => self.session_error(&e, Some(&channel)).await,
        }
    }
}

/// The close for a connection whose WebSocket stream failed: 1007 for a
/// text frame that is not UTF-8, 1009 for a message over the hard cap (four
/// times the frame limit, whole or fragmented); a broken link gets none.
pub(super) fn read_error_close(e: crate::upgrade::WsError, max_frame: usize) -> End {
    use crate::upgrade::WsError;
    match e {
        WsError::Utf8(_) => Some((
            close::INVALID_DATA,
            "text frame is not valid UTF-8".to_owned(),
        )),
        WsError::Capacity(_) => Some((
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
    protocol::nests_deeper_than(raw, limits.max_payload_depth).then(|| {
        (
            ErrorCode::BadRequest,
            format!(
                "{what} nests arrays and objects deeper than {} levels",
                limits.max_payload_depth
            ),
        )
    })
}
