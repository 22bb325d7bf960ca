//! The store contract as a trait: a service is written once against
//! [`SessionStore`] and runs on any backend that implements it —
//! keel-session's embedded SQLite `Store`, keel-session-pg's PostgreSQL
//! `PgStore` — and one conformance suite ([`testkit`](crate::testkit),
//! feature `testkit`) holds every backend to the same behaviour.
//!
//! The documentation of each method below is the contract; a backend adds
//! only how it does it (its own docs). The futures are `Send`, so a generic
//! service can spawn them; the trait is used through generics, not `dyn`
//! (it has generic methods and returns `impl Future`). Two backends behind
//! one type: [`Either`](crate::Either).

use std::future::Future;
use std::time::Duration;

use crate::clock::UnixMillis;
use crate::commit::{Committing, StartupInfo};
use crate::error::{OutboxError, SessionError, StoreError};
use crate::health::HealthTransition;
use crate::messages::{
    Appended, ChannelBounds, ChannelStats, Message, Offset, Retention, SHARED_SCOPE, Subscription,
};
use crate::outbox::{Enqueued, NewSend, OutboxCounts, OutboxId, OutboxItem, OutboxState, Retry};
use crate::sessions::{
    Activity, CrashMarked, CrashNotice, NewSession, Session, SessionId, SessionState,
};

/// The operations a session-oriented service needs from its durable store.
///
/// Each method's documentation is its contract; methods with a body are
/// defined by the others for every backend (a backend may do the same
/// faster). Writes resolve once they are durable in the backend's sense
/// (committed), never before.
pub trait SessionStore: Clone + Send + Sync + 'static {
    // ---- lifecycle and meta ----

    /// What the store found when it opened the database.
    fn startup(&self) -> &StartupInfo;

    /// The current time according to the store's clock.
    fn now(&self) -> UnixMillis;

    /// Finishes every queued write, records a clean shutdown and stops the
    /// writer (the SQLite store also checkpoints its WAL). Later writes on any clone fail with
    /// [`StoreError::Closed`]; reads keep working.
    fn close(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Like [`SessionStore::close`] (finishes queued writes, stops the
    /// writer) but leaves `clean_shutdown` false, so the next open runs crash
    /// recovery: for a shutdown that could not finish its work.
    fn close_unclean(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reads a `meta` value.
    fn meta(&self, key: &str) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Writes a `meta` value.
    fn set_meta(
        &self,
        key: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Whether the database is currently marked as cleanly shut down. While a
    /// store is open this is false unless something set it explicitly.
    fn clean_shutdown(&self) -> impl Future<Output = Result<bool, StoreError>> + Send {
        async move { Ok(self.meta("clean_shutdown").await?.as_deref() == Some("1")) }
    }

    /// Sets the `clean_shutdown` flag without closing (for shutdown helpers that
    /// flush in stages). [`SessionStore::close`] sets it as its last write.
    fn set_clean_shutdown(
        &self,
        clean: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.set_meta("clean_shutdown", if clean { "1" } else { "0" })
    }

    // ---- sessions ----

    /// Creates a session in state CREATED (ACTIVE with [`NewSession::connected`]).
    fn create_session(
        &self,
        new: NewSession,
    ) -> impl Future<Output = Result<Session, SessionError>> + Send;

    /// Reads one session.
    fn session(&self, id: &SessionId)
    -> impl Future<Output = Result<Session, SessionError>> + Send;

    /// Lists sessions, optionally only those in `state`, ordered by id.
    ///
    /// Rows with an unknown stored state are skipped here; [`SessionStore::mark_crashed`]
    /// and [`SessionStore::count_by_state`] report them.
    fn sessions(
        &self,
        state: Option<SessionState>,
    ) -> impl Future<Output = Result<Vec<Session>, StoreError>> + Send;

    /// Counts sessions per stored state, unknown states included verbatim.
    fn count_by_state(&self)
    -> impl Future<Output = Result<Vec<(String, u64)>, StoreError>> + Send;

    /// Moves a session to `to` if the state machine allows it; otherwise returns
    /// [`SessionError::InvalidTransition`] and writes nothing.
    ///
    /// Moving to ACTIVE also records `last_seen_at`; moving to CRASHED sets
    /// `recovered_at` and increments `crash_count`.
    fn transition(
        &self,
        id: &SessionId,
        to: SessionState,
    ) -> impl Future<Output = Result<Session, SessionError>> + Send;

    /// Records that the session's client was seen now.
    fn touch(&self, id: &SessionId) -> impl Future<Output = Result<(), SessionError>> + Send;

    /// Replaces a session's opaque meta text.
    fn set_session_meta(
        &self,
        id: &SessionId,
        meta: &str,
    ) -> impl Future<Output = Result<(), SessionError>> + Send;

    /// Crash recovery's scan: every ACTIVE session (connected when the
    /// process died) and every session whose stored state is unknown becomes
    /// CRASHED with `recovered_at = now` and `crash_count + 1`, in one
    /// transaction. DETACHED, PAUSED, CREATED and CLOSED sessions were not
    /// connected and are left as they are (no false-positive recovery).
    /// `crashed` lists the former ACTIVE sessions.
    ///
    /// Running it again right away changes nothing.
    fn mark_crashed(&self) -> impl Future<Output = Result<CrashMarked, StoreError>> + Send;

    /// [`SessionStore::mark_crashed`], and in the same transaction appends the
    /// payload `notice` builds to each crashed session's private channel
    /// (`session:<id>`), with message id `crash-notice-<crash_count>`.
    ///
    /// Because marking and notices commit together, a crash during recovery
    /// leaves either both or neither; and because the message id names the
    /// crash count, a notice is never appended twice for the same crash.
    fn mark_crashed_and_notify(
        &self,
        notice: CrashNotice,
    ) -> impl Future<Output = Result<CrashMarked, StoreError>> + Send;

    /// Deletes up to `limit` sessions that have had no connection for
    /// `idle_for` (any state but ACTIVE, last changed before then), with
    /// their subscriptions, activity and private channel; returns their
    /// ids. Their outbox items stay (their session becomes none). A session
    /// deleted this way is gone: its token no longer opens anything.
    fn purge_idle_sessions(
        &self,
        idle_for: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<SessionId>, StoreError>> + Send;

    /// Appends to a session's activity log, keeping only the newest
    /// [`Config::activity_limit`](crate::Config::activity_limit) entries.
    fn record_activity(
        &self,
        id: &SessionId,
        kind: &str,
        detail: &str,
    ) -> impl Future<Output = Result<(), SessionError>> + Send;

    /// A session's activity log, oldest first.
    fn activity(
        &self,
        id: &SessionId,
    ) -> impl Future<Output = Result<Vec<Activity>, SessionError>> + Send;

    // ---- channel logs and subscriptions ----

    /// [`SessionStore::queue_append_in`] with ids scoped to `scope` (see
    /// [`SessionStore::append_scoped`]).
    fn queue_append_scoped<P>(
        &self,
        lane: u64,
        scope: &str,
        channel: &str,
        msg_id: &str,
        payload: P,
    ) -> impl Future<Output = Result<Committing<Appended>, StoreError>> + Send
    where
        P: AsRef<[u8]> + Send + 'static;

    /// [`SessionStore::queue_append`] in `lane` (e.g. one per client connection).
    /// The writer serves lanes in fair order by bytes written (a lane that
    /// writes little goes before lanes that write much), with at most
    /// `max_batch_bytes` of payload per commit: a lane that queues many
    /// large appends delays another lane's append by about one commit, not
    /// by its whole backlog. Order is kept within a lane, not across lanes.
    fn queue_append_in<P>(
        &self,
        lane: u64,
        channel: &str,
        msg_id: &str,
        payload: P,
    ) -> impl Future<Output = Result<Committing<Appended>, StoreError>> + Send
    where
        P: AsRef<[u8]> + Send + 'static,
    {
        self.queue_append_scoped(lane, SHARED_SCOPE, channel, msg_id, payload)
    }

    /// Queues an append and returns once it is in the writer's queue, with a
    /// future that resolves when it has committed. Appends queued one after
    /// another (each `queue_append` awaited before the next starts) run in
    /// that order, so they get offsets in that order even when they share a
    /// commit: this is how a pipelining publisher keeps its send order.
    /// `payload` is shared, not copied. Queued in lane 0, with every write
    /// that names no lane (see [`SessionStore::queue_append_in`]).
    fn queue_append<P>(
        &self,
        channel: &str,
        msg_id: &str,
        payload: P,
    ) -> impl Future<Output = Result<Committing<Appended>, StoreError>> + Send
    where
        P: AsRef<[u8]> + Send + 'static,
    {
        self.queue_append_scoped(0, SHARED_SCOPE, channel, msg_id, payload)
    }

    /// Appends a message to `channel` with `msg_id` unique per (channel,
    /// `scope`): the scope is who publishes (a user, a session), so that
    /// one publisher's id can never answer another's. An id is a duplicate
    /// when it is in the channel under `scope`, or was written before ids
    /// were scoped (a database from before schema 3: those count for every
    /// scope).
    fn append_scoped(
        &self,
        scope: &str,
        channel: &str,
        msg_id: &str,
        payload: &[u8],
    ) -> impl Future<Output = Result<Appended, StoreError>> + Send {
        let queued = self.queue_append_scoped(0, scope, channel, msg_id, payload.to_vec());
        async move { queued.await?.await }
    }

    /// Appends a message to `channel` in the shared scope (see
    /// [`SessionStore::append_scoped`]). If `msg_id` is already in the channel's
    /// shared scope (and still retained) this writes nothing and returns
    /// the original offset with `duplicate: true`.
    fn append(
        &self,
        channel: &str,
        msg_id: &str,
        payload: &[u8],
    ) -> impl Future<Output = Result<Appended, StoreError>> + Send {
        self.append_scoped(SHARED_SCOPE, channel, msg_id, payload)
    }

    /// [`SessionStore::read_channel`] bounded in bytes too: stops after the message
    /// that brings the page's payload bytes to `max_bytes` (a page always
    /// holds at least one message, whatever its size). A reader that holds
    /// a page while it writes it out holds at most about `max_bytes`.
    fn read_channel_bounded(
        &self,
        channel: &str,
        from: Offset,
        limit: usize,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<Message>, StoreError>> + Send;

    /// Reads up to `limit` messages of `channel` with offset ≥ `from`, in order.
    fn read_channel(
        &self,
        channel: &str,
        from: Offset,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Message>, StoreError>> + Send {
        self.read_channel_bounded(channel, from, limit, usize::MAX)
    }

    /// Up to `limit` channel names that hold messages, in name order, after
    /// `after` (from the first with `None`): one index seek each, so a
    /// caller can walk every channel in pages without scanning the log.
    fn channels_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Of `channels`, each with its policy, those retention would cut now:
    /// one read for the lot (a pass over thousands of channels, most with
    /// nothing to remove, costs a read per page instead of one per channel).
    fn retention_due(
        &self,
        channels: Vec<(String, Retention)>,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Applies `policy` to one channel; returns how many messages were
    /// removed. Deletes a prefix of the log by offset range (an index range,
    /// not a scan of the table), and first records where the log ends so
    /// that offsets are never reused even if this empties it. At most
    /// `max_delete` messages go per call, so that one call never holds the
    /// writer long; call again while it returns `max_delete`.
    fn apply_retention_to(
        &self,
        channel: &str,
        policy: Retention,
        max_delete: u64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Applies `policy` to every channel; returns how many messages were removed.
    ///
    /// Retention always removes a prefix of a log: by count, everything but the
    /// newest `max_count`; by age, everything up to the newest message older than
    /// the cutoff. Offsets are never reused afterwards.
    fn apply_retention(
        &self,
        policy: Retention,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// The `limit` channels holding the most messages, with their sizes
    /// (for `doctor`: reads the whole log).
    fn channel_stats(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<(u64, Vec<ChannelStats>), StoreError>> + Send;

    /// The retained range of `channel` and its next offset.
    fn channel_bounds(
        &self,
        channel: &str,
    ) -> impl Future<Output = Result<ChannelBounds, StoreError>> + Send;

    /// Subscribes a session to a channel with its cursor at `cursor` (the last
    /// offset it has seen; 0 for none). Re-subscribing keeps the larger cursor.
    fn subscribe(
        &self,
        session: &SessionId,
        channel: &str,
        cursor: Offset,
    ) -> impl Future<Output = Result<Subscription, SessionError>> + Send;

    /// Moves a subscription's cursor forward to `offset` (never backward);
    /// returns the cursor now stored. An offset beyond the channel's last
    /// offset is refused ([`SessionError::BeyondHead`]): an acknowledgement
    /// can only confirm what exists, and one beyond the head would make a
    /// later resume skip messages published after it.
    fn ack(
        &self,
        session: &SessionId,
        channel: &str,
        offset: Offset,
    ) -> impl Future<Output = Result<Offset, SessionError>> + Send;

    /// Removes a subscription; returns whether there was one.
    fn unsubscribe(
        &self,
        session: &SessionId,
        channel: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// A session's subscriptions, ordered by channel.
    fn subscriptions(
        &self,
        session: &SessionId,
    ) -> impl Future<Output = Result<Vec<Subscription>, StoreError>> + Send;

    // ---- outbox ----

    /// [`SessionStore::enqueue`], refused with [`OutboxError::QuotaExceeded`] when
    /// the send's session already has `max_pending` sends not yet ended
    /// (PENDING or CLAIMED). A repeated idempotency key still returns the
    /// existing item: the quota counts new work only.
    fn enqueue_within(
        &self,
        send: NewSend,
        max_pending: Option<u64>,
    ) -> impl Future<Output = Result<Enqueued, OutboxError>> + Send;

    /// Adds a send to the outbox, or returns the existing item with the same
    /// idempotency key.
    fn enqueue(&self, send: NewSend) -> impl Future<Output = Result<Enqueued, OutboxError>> + Send {
        self.enqueue_within(send, None)
    }

    /// Claims up to `limit` due items for `worker` until now + `lease`, oldest
    /// first. Due items are PENDING ones whose `next_attempt_at` has passed and
    /// CLAIMED ones whose lease has expired. Each item goes to exactly one caller.
    fn claim(
        &self,
        worker: &str,
        lease: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<OutboxItem>, OutboxError>> + Send;

    /// Marks a claimed item SENT. Fails with [`OutboxError::NotClaimed`] if
    /// `worker` no longer holds the claim.
    fn complete(
        &self,
        id: OutboxId,
        worker: &str,
    ) -> impl Future<Output = Result<OutboxItem, OutboxError>> + Send;

    /// Records a failed attempt by `worker`: the attempt count goes up and the
    /// item becomes PENDING again after the retry delay, or DEAD.
    fn fail(
        &self,
        id: OutboxId,
        worker: &str,
        error: &str,
        retry: Retry,
    ) -> impl Future<Output = Result<OutboxItem, OutboxError>> + Send;

    /// Moves a PENDING or CLAIMED item to DEAD with `reason` (an operator or a
    /// validation step decided it can never be sent).
    fn dead_letter(
        &self,
        id: OutboxId,
        reason: &str,
    ) -> impl Future<Output = Result<OutboxItem, OutboxError>> + Send;

    /// Re-queues a DEAD item: PENDING, due now, attempts reset to 0.
    fn redrive(&self, id: OutboxId)
    -> impl Future<Output = Result<OutboxItem, OutboxError>> + Send;

    /// Re-queues every DEAD item; returns how many.
    fn redrive_all(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Returns every CLAIMED item whose lease has expired to PENDING; returns how
    /// many. (Claims also take expired items directly; recovery calls this at
    /// startup so that counts and `doctor` show the truth.)
    fn release_expired_claims(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Reads one outbox item.
    fn outbox_item(
        &self,
        id: OutboxId,
    ) -> impl Future<Output = Result<OutboxItem, OutboxError>> + Send;

    /// Lists items in `state`, oldest first, at most `limit`.
    fn outbox_items(
        &self,
        state: OutboxState,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<OutboxItem>, StoreError>> + Send;

    /// How many items are in each state.
    fn outbox_counts(&self) -> impl Future<Output = Result<OutboxCounts, StoreError>> + Send;

    // ---- health log ----

    /// Appends a health transition. The states are opaque text here; their
    /// machine lives in keel-recovery.
    fn record_health_transition(
        &self,
        from: &str,
        to: &str,
        reason: &str,
    ) -> impl Future<Output = Result<HealthTransition, StoreError>> + Send;

    /// The newest `limit` health transitions, oldest first.
    fn health_transitions(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<HealthTransition>, StoreError>> + Send;
}
