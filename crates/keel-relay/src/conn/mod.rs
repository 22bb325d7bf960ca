//! One client connection, split by concern: this module runs it (the read
//! loop, its timeouts and its end); `frames` handles each client frame;
//! `publish` is the publish pipeline; `write` the writer with replay, byte
//! budgets and the write deadline.

mod frames;
mod publish;
mod write;

use keel_session::SessionStore;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::upgrade::{Message, Utf8Bytes, WebSocket};
use futures::StreamExt;
use keel_ratelimit::{Limiter, Quota};
use keel_recovery::{ShutdownToken, Supervisor};
use keel_session::{SessionError, SessionId, SessionState, StoreError};
use tokio::sync::{Notify, Semaphore, mpsc};

use crate::accept::Admitted;
use crate::channels::Channels;
use crate::config::Config;
use crate::exec::Execs;
use crate::gate::ReadGate;
use crate::hub::{EndFlag, Ending, OutQueue, Outbound};
use crate::limits::{Budgets, Keyed, hit};
use crate::protocol::{ErrorCode, close, error_frame};

pub(crate) use publish::PublishJob;

/// Counts live things (connections, publish pipelines) so shutdown can wait for none.
#[derive(Default)]
pub(crate) struct Tracker {
    count: AtomicUsize,
    zero: Notify,
}

pub(crate) struct TrackerGuard<'a>(&'a Tracker);

impl Tracker {
    pub(crate) fn enter(&self) -> TrackerGuard<'_> {
        self.count.fetch_add(1, Ordering::AcqRel);
        TrackerGuard(self)
    }

    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub(crate) async fn wait_zero(&self) {
        loop {
            let notified = self.zero.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for TrackerGuard<'_> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.zero.notify_waiters();
        }
    }
}

/// A session's connection: its id, its replace signal, and since when.
/// (`None` until this node's hold of it committed: the ownership check
/// judges only sessions whose hold is stored).
type Holder = (u64, Arc<Notify>, Option<std::time::Instant>);

/// Which connection holds each session (one at a time), and the stored
/// state made to follow it.
#[derive(Default)]
pub(crate) struct SessionMap(
    Mutex<HashMap<SessionId, Holder>>,
    /// Striped by session: one reconcile at a time per session.
    [tokio::sync::Mutex<()>; 32],
    /// Sessions whose connection is being closed because this node's claim
    /// on them lapsed (cluster mode): closed 1001 (resume), not 4001.
    Mutex<HashSet<SessionId>>,
);

impl SessionMap {
    /// Stores ACTIVE if a connection holds `session` now, else DETACHED.
    /// Called after every bind and unbind: reconciles of one session run
    /// one at a time and each reads the map inside its turn, so the last
    /// one after the last change of the map stores what the map says —
    /// whatever order a closing connection and a newer one took. (Writing
    /// the state each connection believed in could leave a held session
    /// DETACHED, or an unheld one ACTIVE.) Same-state writes are refused
    /// by the store, harmlessly.
    pub(crate) async fn reconcile(&self, store: &crate::store::RelayStore, session: &SessionId) {
        let stripe = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            session.hash(&mut h);
            h.finish() as usize % self.1.len()
        };
        let _turn = self.1[stripe].lock().await;
        let held = self.held(session);
        // On PostgreSQL the session also records its node: holding takes
        // it from another node, and only its holder detaches it.
        if let Some(pg) = crate::store::RelayStoreExt::postgres(store) {
            if !held {
                let _ = pg.release_session(session).await;
                return;
            }
            if pg.hold_session(session).await.is_ok() {
                let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(h) = map.get_mut(session) {
                    h.2 = Some(std::time::Instant::now());
                }
            }
            return;
        }
        let to = if held {
            SessionState::Active
        } else {
            SessionState::Detached
        };
        let _ = store.transition(session, to).await;
    }

    /// Closes the connection holding `session` as replaced (4001); returns
    /// whether one held it.
    pub(crate) fn kick(&self, session: &SessionId) -> bool {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(session) {
            Some((_, replaced, _)) => {
                replaced.notify_one();
                true
            }
            None => false,
        }
    }

    /// Closes the connection holding `session` because this node no longer
    /// holds it in the store (its lease lapsed and a survivor crashed it):
    /// 1001, so the client resumes (as CRASHED). Returns whether one held it.
    pub(crate) fn kick_lapsed(&self, session: &SessionId) -> bool {
        let mut lapsed = self.2.lock().unwrap_or_else(|p| p.into_inner());
        lapsed.insert(session.clone());
        let kicked = self.kick(session);
        if !kicked {
            lapsed.remove(session);
        }
        kicked
    }

    /// Whether `session`'s connection was kicked by [`SessionMap::kick_lapsed`]
    /// (and forgets it).
    fn lapsed(&self, session: &SessionId) -> bool {
        self.2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(session)
    }

    /// Sessions held for at least `age` (their hold has been written).
    pub(crate) fn settled(&self, age: Duration) -> Vec<String> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter(|(_, (_, _, since))| since.is_some_and(|t| t.elapsed() >= age))
            .map(|(id, _)| id.0.clone())
            .collect()
    }

    /// Binds `session` to connection `conn`; returns the previous
    /// connection's replace signal, if one held it.
    fn bind(&self, session: &SessionId, conn: u64, replaced: Arc<Notify>) -> Option<Arc<Notify>> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(session.clone(), (conn, replaced, None))
            .map(|(_, old, _)| old)
    }

    /// Whether a connection holds `session`.
    fn held(&self, session: &SessionId) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(session)
    }

    /// Unbinds `session` if `conn` still holds it; returns whether it did.
    fn unbind(&self, session: &SessionId, conn: u64) -> bool {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(session).is_some_and(|(c, _, _)| *c == conn) {
            map.remove(session);
            true
        } else {
            false
        }
    }
}

/// What connections use: the channels, the session map, the budgets and
/// rate limits, exec sessions, and the shutdown signal.
pub(crate) struct ConnCtx {
    pub(crate) config: Config,
    pub(crate) channels: Channels,
    pub(crate) sessions: SessionMap,
    pub(crate) budget: Budgets,
    /// New sessions per client address.
    pub(crate) session_rate: Keyed<IpAddr>,
    /// Sends per session.
    pub(crate) send_rate: Keyed<SessionId>,
    pub(crate) execs: Arc<Execs>,
    pub(crate) supervisor: Supervisor,
    pub(crate) intake: ShutdownToken,
    pub(crate) live: Tracker,
    pub(crate) outbox_ready: Arc<Notify>,
    /// Authentication and authorisation.
    pub(crate) authority: Arc<crate::auth::Authority>,
    next_conn: AtomicU64,
}

impl ConnCtx {
    #[allow(clippy::too_many_arguments)] // built once, in Relay::start
    pub(crate) fn new(
        config: Config,
        channels: Channels,
        budget: Budgets,
        execs: Arc<Execs>,
        supervisor: Supervisor,
        intake: ShutdownToken,
        outbox_ready: Arc<Notify>,
        authority: Arc<crate::auth::Authority>,
    ) -> ConnCtx {
        let l = &config.limits;
        ConnCtx {
            session_rate: Keyed::new(l.session_rate, l.session_burst),
            send_rate: Keyed::new(l.send_rate, l.send_burst),
            config,
            channels,
            sessions: SessionMap::default(),
            budget,
            execs,
            supervisor,
            intake,
            live: Tracker::default(),
            outbox_ready,
            authority,
            next_conn: AtomicU64::new(1),
        }
    }
}

/// The session a connection is bound to after `hello`.
struct Bound {
    id: SessionId,
    /// Who holds it (the JWT's subject and claims in `jwt` mode).
    principal: crate::auth::Principal,
    /// The scope of this connection's publish ids.
    id_scope: String,
    /// When its JWT expires: the connection is closed then (4003).
    expires: Option<tokio::time::Instant>,
    channels: HashSet<String>,
    replaced: Arc<Notify>,
}

/// What the read loop ends with: a close to send, if any.
type End = Option<(u16, String)>;

struct Conn {
    ctx: Arc<ConnCtx>,
    id: u64,
    ip: IpAddr,
    out: OutQueue,
    /// Socket reads charged to the inbound budget until their frame is handled.
    gate: Arc<ReadGate>,
    end: Arc<EndFlag>,
    /// Publish payload bytes this connection may hold unanswered.
    inbound: Arc<Semaphore>,
    session: Option<Bound>,
    errors: u32,
    limiter: Limiter,
    /// The connection's publish byte rate (`limits.publish_bytes_rate`).
    bytes_limiter: Limiter,
    /// The publish pipeline, started on the first publish: idle sessions
    /// (most of them) never pay for its task and channel.
    publish: Option<mpsc::Sender<PublishJob>>,
}

/// Runs one connection to its end. `admitted` holds its place under the
/// connection caps (taken at TCP accept, freed when this returns), when
/// that was (the handshake timeout counts from there) and its socket's
/// account with the inbound budget, charged from now on.
pub(crate) async fn serve(ctx: Arc<ConnCtx>, socket: WebSocket, ip: IpAddr, admitted: Admitted) {
    let Admitted {
        slot: _slot,
        at: accepted,
        gate,
    } = admitted;
    gate.activate();
    let _live = ctx.live.enter();
    let id = ctx.next_conn.fetch_add(1, Ordering::Relaxed);
    let (sink, mut stream) = socket.split();
    // Borrowed, not cloned: every byte held across an await is held by
    // every idle connection.
    let limits = &ctx.config.limits;
    let end = Arc::new(EndFlag::default());
    let (out, rx) = OutQueue::new(
        limits.outbound_queue,
        limits.max_outbound_bytes,
        &ctx.budget.outbound,
        end.clone(),
    );
    let mut writer = tokio::spawn(write::write_loop(
        sink,
        rx,
        write::WriteCtx {
            store: ctx.channels.store.clone(),
            hub: ctx.channels.hub.clone(),
            account: out.account(),
            page_bytes: limits.replay_page_bytes,
            deadline: limits.write_deadline(),
        },
        end.clone(),
    ));
    let nz = |n: u32| NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN);
    let limiter = Limiter::new(
        Quota::per_second(nz(limits.publish_rate)).allow_burst(nz(limits.publish_burst)),
    );
    let bytes_limiter = Limiter::new(
        Quota::per_second(nz(limits.publish_bytes_rate)).allow_burst(nz(limits.bytes_burst())),
    );
    let mut conn = Conn {
        ctx: ctx.clone(),
        id,
        ip,
        gate,
        out,
        end: end.clone(),
        inbound: Arc::new(Semaphore::new(limits.max_inbound_bytes.max(1))),
        session: None,
        errors: 0,
        limiter,
        bytes_limiter,
        publish: None,
    };
    metrics::gauge!("keel_connections").increment(1.0);
    tracing::debug!(conn = id, %ip, "connection opened");
    let ending = conn
        .read_loop(&mut stream, accepted + limits.handshake_timeout())
        .await;
    // Nothing more is read: what reading held goes back now, not when the
    // socket is dropped after the writer's last write.
    conn.gate.close();
    match (&ending, end.get()) {
        (Some((code, reason)), _) if *code == close::POLICY => {
            tracing::warn!(conn = id, %ip, code, reason = %reason, "connection closed for policy")
        }
        (Some((code, reason)), _) => {
            tracing::debug!(conn = id, code, reason = %reason, "closing connection")
        }
        (None, Some(Ending::Slow)) => {
            tracing::warn!(conn = id, %ip, "slow consumer closed (1013); it resumes from the log")
        }
        (None, Some(Ending::Stuck)) => {
            tracing::warn!(conn = id, %ip, "a write made no progress for the write deadline; connection dropped")
        }
        (None, Some(Ending::Unreadable)) => {
            tracing::warn!(conn = id, %ip, "the store could not be read for a replay; closed 1011, the client resumes")
        }
        (None, _) => tracing::debug!(conn = id, "connection closed by the client"),
    }
    let client_closed = ending.is_none();
    if let Some((code, reason)) = ending {
        let _ = tokio::time::timeout(
            limits.write_deadline(),
            conn.out.send(Outbound::Close { code, reason }),
        )
        .await;
    }
    Box::pin(conn.detach()).await;
    // The client closed: the writer stops and answers its close now, once
    // the session is detached (a resume that follows finds it DETACHED),
    // instead of writing deliveries tungstenite would refuse after the
    // client's close, and leaving the close unanswered.
    if client_closed {
        end.raise(Ending::Closed);
    }
    drop(conn);
    // The writer ends once every sender is gone (the publish pipeline
    // drains first) and its queue is written, or at its write deadline;
    // past that it is aborted, and everything it held goes with it.
    let grace = limits.write_deadline() + Duration::from_secs(1);
    if tokio::time::timeout(grace, &mut writer).await.is_err() {
        writer.abort();
    }
    metrics::gauge!("keel_connections").decrement(1.0);
}

impl Conn {
    /// Runs `f` unless the connection must end or the relay shuts down
    /// first (then `None`): a wait for a budget never outlives its
    /// connection.
    async fn until_ended<F: std::future::Future>(&self, f: F) -> Option<F::Output> {
        let mut stopping = self.ctx.intake.clone();
        tokio::select! {
            out = f => Some(out),
            _ = self.end.wait() => None,
            _ = stopping.stopped() => None,
        }
    }

    /// Reads frames until the connection ends; returns the close to send, if any.
    async fn read_loop(
        &mut self,
        stream: &mut futures::stream::SplitStream<WebSocket>,
        handshake_deadline: tokio::time::Instant,
    ) -> End {
        let ctx = self.ctx.clone();
        let limits = &ctx.config.limits;
        let mut idle_deadline = tokio::time::Instant::now() + limits.idle_timeout();
        let mut stopping = self.ctx.intake.clone();
        let replaced = Arc::new(Notify::new());
        let frames_in = metrics::counter!("keel_frames_in_total");
        let end = self.end.clone();
        loop {
            let expires = self.session.as_ref().and_then(|s| s.expires);
            let deadline = match (&self.session, expires) {
                (None, _) => handshake_deadline.min(idle_deadline),
                (Some(_), Some(at)) => idle_deadline.min(at),
                (Some(_), None) => idle_deadline,
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
                        Some(Err(e)) => return frames::read_error_close(e, limits.max_frame_bytes),
                        None => return None,
                    };
                    idle_deadline = tokio::time::Instant::now() + limits.idle_timeout();
                    let ending = match msg {
                        Message::Text(text) => {
                            frames_in.increment(1);
                            // Boxed: a frame's handling (hello, resume,
                            // subscribe, publish) is a large state machine;
                            // inline, every idle connection's task carried
                            // it (about 5 KiB of 19 per session).
                            Box::pin(self.on_text(text)).await
                        }
                        Message::Binary(_) => {
                            self.error(ErrorCode::BadJson, "binary frames are not part of keel.v1; send JSON text", None).await
                        }
                        Message::Close(_) => return None,
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => None,
                    };
                    // The frame is handled: what reading it was charged
                    // goes back (a publish took its payload's share).
                    self.gate.release();
                    if ending.is_some() {
                        return ending;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Some(if self.session.is_none() {
                        (close::POLICY, "no hello before the handshake timeout".to_owned())
                    } else if expires.is_some_and(|at| at <= tokio::time::Instant::now()) {
                        (close::EXPIRED, "the connection JWT expired; reconnect with a fresh one".to_owned())
                    } else {
                        (close::IDLE, "idle timeout".to_owned())
                    });
                }
                _ = stopping.stopped() => {
                    return Some((close::GOING_AWAY, "relay shutting down; resume later".to_owned()));
                }
                // The writer closes a slow consumer itself; a stuck or gone
                // writer can send nothing more.
                _ = end.wait() => return None,
                _ = replaced_now.notified() => {
                    let lapsed = self
                        .session
                        .as_ref()
                        .is_some_and(|s| self.ctx.sessions.lapsed(&s.id));
                    if lapsed {
                        return Some((close::GOING_AWAY, "this relay node's claim on the session lapsed; resume it".to_owned()));
                    }
                    return Some((close::REPLACED, "another connection resumed this session".to_owned()));
                }
            }
        }
    }

    async fn send(&self, frame: String) {
        self.out.send(Outbound::Frame(Utf8Bytes::from(frame))).await;
    }

    /// Sends an error frame; returns the close to send when the connection
    /// has misbehaved too often.
    async fn error(&mut self, code: ErrorCode, message: &str, reference: Option<&str>) -> End {
        metrics::counter!("keel_errors_total", "code" => code.as_str()).increment(1);
        self.send(error_frame(code, message, reference)).await;
        self.errors += 1;
        (self.errors >= self.ctx.config.limits.max_errors).then(|| {
            hit("errors");
            (
                close::POLICY,
                format!("{} bad frames; closing", self.errors),
            )
        })
    }

    async fn session_error(&mut self, e: &SessionError, reference: Option<&str>) -> End {
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

    async fn storage_error(&mut self, e: &StoreError, reference: Option<&str>) -> End {
        self.ctx.channels.health.observe_store_error(e).await;
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
            self.ctx.channels.hub.unsubscribe(channel, self.id);
        }
        if self.ctx.sessions.unbind(&session.id, self.id) {
            let grace = Duration::from_millis(self.ctx.config.exec.detach_grace_ms);
            self.ctx.execs.detached(&session.id, grace);
            if let Some(delay) = crate::failpoints::detach_delay() {
                tokio::time::sleep(delay).await;
            }
            self.ctx
                .sessions
                .reconcile(&self.ctx.channels.store, &session.id)
                .await;
        }
    }
}
