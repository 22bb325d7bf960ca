//! The store conformance suite (feature `testkit`): one set of cases that
//! every [`SessionStore`] backend must pass, so that the SQLite [`Store`] and
//! keel-session-pg's PostgreSQL store behave the same to the relay.
//!
//! A backend provides a [`Harness`] (a fresh, empty store on a
//! [`ManualClock`] reading [`T0`], which it can close and open again) and
//! generates one test per case with [`conformance_suite!`]:
//!
//! ```ignore
//! async fn open() -> Option<MyHarness> { /* a fresh store, or None to skip */ }
//! keel_session::conformance_suite!(open);
//! ```
//!
//! `open` returning `None` skips the case (a backend whose server is not
//! there says so itself, and fails instead when it is required).
//!
//! [`Store`]: crate::Store

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::{
    CrashNotice, ManualClock, NewSend, NewSession, OutboxError, OutboxId, OutboxState, Retention,
    Retry, SHARED_SCOPE, SessionError, SessionId, SessionState, SessionStore, StoreError,
    UnixMillis,
};

/// The time a harness's clock reads when the store opens.
pub const T0: UnixMillis = 1_700_000_000_000;

/// Activity rows a harness's store keeps per session (its `activity_limit`).
pub const ACTIVITY_LIMIT: usize = 10;

/// A store under test, fresh and empty, with a clock the cases move.
pub trait Harness: Send + Sync + 'static {
    /// The backend's store.
    type Store: SessionStore;

    /// The store (a new one after [`Harness::reopen`]).
    fn store(&self) -> &Self::Store;

    /// The clock the store reads; starts at [`T0`].
    fn clock(&self) -> &ManualClock;

    /// Closes the store (cleanly or not: [`SessionStore::close`] or
    /// [`SessionStore::close_unclean`]) and opens the same database again
    /// with the same clock.
    fn reopen(&mut self, clean: bool) -> impl Future<Output = ()> + Send;
}

/// Generates one `#[tokio::test]` per conformance case, each on a harness
/// from `$open` (an `async fn() -> Option<H>` with `H:`[`Harness`]).
#[macro_export]
macro_rules! conformance_suite {
    ($open:path) => {
        $crate::conformance_suite!(#[doc = ""] $open);
    };
    (#[$attr:meta] $open:path) => {
        $crate::conformance_suite!(@cases #[$attr] $open;
            sessions_are_created_once,
            transitions_follow_the_state_machine,
            transitions_stamp_their_times,
            missing_sessions_are_not_found,
            sessions_list_and_count_by_state,
            crash_marking_takes_connected_sessions_only,
            crash_notices_are_appended_once_per_crash,
            idle_sessions_are_purged_with_their_channel,
            activity_is_bounded,
            appends_are_idempotent_per_scope,
            offsets_are_dense_under_concurrent_appends,
            queued_appends_keep_their_order,
            a_flooding_lane_does_not_hold_up_another,
            repeats_in_one_commit_are_duplicates,
            channel_reads_page_by_count_and_bytes,
            channels_are_listed_in_pages,
            retention_never_reuses_offsets,
            retention_by_age_and_in_steps,
            cursors_only_move_forward,
            enqueue_is_idempotent_per_scope,
            enqueue_quota_counts_new_work,
            claims_go_to_exactly_one_worker,
            leases_expire_and_old_claims_are_refused,
            failures_retry_die_and_redrive,
            health_transitions_are_kept_in_order,
            meta_and_clean_shutdown_survive_reopen,
            writes_after_close_are_refused
        );
    };
    (@cases #[$attr:meta] $open:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[$attr]
            async fn $case() {
                if let Some(harness) = $open().await {
                    $crate::testkit::$case(harness).await;
                }
            }
        )*
    };
}

fn new_session(id: &str) -> NewSession {
    NewSession {
        id: Some(SessionId::from(id)),
        token_hash: vec![7; 32],
        meta: format!("meta-{id}"),
        connected: false,
    }
}

fn send(key: &str) -> NewSend {
    NewSend {
        idem_key: key.to_owned(),
        payload: key.as_bytes().to_vec(),
        ..NewSend::default()
    }
}

/// Drives a new session `id` to `state` along allowed transitions.
async fn session_in<S: SessionStore>(store: &S, id: &str, state: SessionState) -> SessionId {
    use SessionState::*;
    let s = store.create_session(new_session(id)).await.expect("create");
    let path: &[SessionState] = match state {
        Created => &[],
        Active => &[Active],
        Detached => &[Active, Detached],
        Paused => &[Active, Paused],
        Crashed => &[Active, Crashed],
        Closed => &[Closed],
    };
    for to in path {
        store.transition(&s.id, *to).await.expect("path transition");
    }
    s.id
}

/// A session is created once under its id; a second create is refused and
/// changes nothing; `connected` stores it ACTIVE.
pub async fn sessions_are_created_once<H: Harness>(h: H) {
    let store = h.store();
    let s = store.create_session(new_session("a")).await.unwrap();
    assert_eq!(s.state, SessionState::Created);
    assert_eq!((s.created_at, s.updated_at, s.crash_count), (T0, T0, 0));
    let again = store.create_session(NewSession {
        meta: "other".into(),
        ..new_session("a")
    });
    assert!(matches!(again.await, Err(SessionError::AlreadyExists(_))));
    let read = store.session(&s.id).await.unwrap();
    assert_eq!(read, s, "the refused create changed the session");

    let random = store.create_session(NewSession::default()).await.unwrap();
    assert_eq!(random.id.as_str().len(), 32, "a random id is 128-bit hex");
    let connected = store
        .create_session(NewSession {
            connected: true,
            ..new_session("c")
        })
        .await
        .unwrap();
    assert_eq!(connected.state, SessionState::Created);
    let stored = store.session(&connected.id).await.unwrap();
    assert_eq!(stored.state, SessionState::Active);
}

/// Every (from, to) pair: allowed ones move the session, the others fail
/// with `InvalidTransition` and write nothing.
pub async fn transitions_follow_the_state_machine<H: Harness>(h: H) {
    let store = h.store();
    for (i, from) in SessionState::ALL.into_iter().enumerate() {
        for (j, to) in SessionState::ALL.into_iter().enumerate() {
            let id = session_in(store, &format!("s{i}{j}"), from).await;
            let before = store.session(&id).await.unwrap();
            let result = store.transition(&id, to).await;
            let after = store.session(&id).await.unwrap();
            if from.can_transition_to(to) {
                let moved = result.unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
                assert_eq!(moved.state, to);
                assert_eq!(moved, after, "{from} -> {to}: returned != stored");
            } else {
                match result {
                    Err(SessionError::InvalidTransition { from: f, to: t }) => {
                        assert_eq!((f, t), (from, to));
                    }
                    other => panic!("{from} -> {to} must be refused, got {other:?}"),
                }
                assert_eq!(before, after, "{from} -> {to}: a refused transition wrote");
            }
        }
    }
}

/// ACTIVE stamps `last_seen_at`, CRASHED stamps `recovered_at` and counts.
pub async fn transitions_stamp_their_times<H: Harness>(h: H) {
    let store = h.store();
    let id = session_in(store, "t", SessionState::Created).await;
    h.clock().advance(Duration::from_millis(5));
    let s = store.transition(&id, SessionState::Active).await.unwrap();
    assert_eq!((s.last_seen_at, s.updated_at), (Some(T0 + 5), T0 + 5));
    h.clock().advance(Duration::from_millis(5));
    let s = store.transition(&id, SessionState::Crashed).await.unwrap();
    assert_eq!((s.recovered_at, s.crash_count), (Some(T0 + 10), 1));
    store.transition(&id, SessionState::Active).await.unwrap();
    let s = store.transition(&id, SessionState::Crashed).await.unwrap();
    assert_eq!(s.crash_count, 2);
    h.clock().advance(Duration::from_millis(5));
    store.touch(&id).await.unwrap();
    store.set_session_meta(&id, "{\"k\":1}").await.unwrap();
    let s = store.session(&id).await.unwrap();
    assert_eq!(
        (s.last_seen_at, s.meta.as_str()),
        (Some(T0 + 15), "{\"k\":1}")
    );
}

/// Operations on a session that does not exist fail with `NotFound`.
pub async fn missing_sessions_are_not_found<H: Harness>(h: H) {
    let store = h.store();
    let ghost = SessionId::from("ghost");
    let nf = |r: Result<(), SessionError>| matches!(r, Err(SessionError::NotFound(_)));
    assert!(matches!(
        store.session(&ghost).await,
        Err(SessionError::NotFound(_))
    ));
    assert!(nf(store
        .transition(&ghost, SessionState::Active)
        .await
        .map(drop)));
    assert!(nf(store.touch(&ghost).await));
    assert!(nf(store.set_session_meta(&ghost, "x").await));
    assert!(nf(store.record_activity(&ghost, "k", "d").await));
    assert!(nf(store.subscribe(&ghost, "c", 0).await.map(drop)));
    assert!(store.sessions(None).await.unwrap().is_empty());
}

/// Listing by state and counting agree with what was written.
pub async fn sessions_list_and_count_by_state<H: Harness>(h: H) {
    let store = h.store();
    for (i, st) in SessionState::ALL.into_iter().enumerate() {
        for k in 0..=i {
            session_in(store, &format!("{st}-{k}"), st).await;
        }
    }
    let all = store.sessions(None).await.unwrap();
    assert_eq!(all.len(), 21);
    let ids: Vec<_> = all.iter().map(|s| s.id.clone()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "sessions are listed by id");
    let counts: HashMap<String, u64> = store.count_by_state().await.unwrap().into_iter().collect();
    for (i, st) in SessionState::ALL.into_iter().enumerate() {
        let listed = store.sessions(Some(st)).await.unwrap();
        assert_eq!(listed.len(), i + 1, "{st}");
        assert!(listed.iter().all(|s| s.state == st));
        assert_eq!(counts.get(st.as_str()), Some(&(i as u64 + 1)));
    }
}

/// Crash marking takes ACTIVE sessions only, stamps them, and a second
/// run right away changes nothing.
pub async fn crash_marking_takes_connected_sessions_only<H: Harness>(h: H) {
    let store = h.store();
    let mut active = Vec::new();
    for st in SessionState::ALL {
        let id = session_in(store, &format!("m-{st}"), st).await;
        if st == SessionState::Active {
            active.push(id);
        }
    }
    active.push(session_in(store, "m-active-2", SessionState::Active).await);
    h.clock().advance(Duration::from_secs(1));
    let marked = store.mark_crashed().await.unwrap();
    let mut crashed = marked.crashed.clone();
    crashed.sort();
    active.sort();
    assert_eq!(crashed, active);
    assert_eq!(marked.notified, 0);
    for id in &active {
        let s = store.session(id).await.unwrap();
        assert_eq!(s.state, SessionState::Crashed);
        assert_eq!((s.recovered_at, s.crash_count), (Some(T0 + 1000), 1));
    }
    for st in [
        SessionState::Detached,
        SessionState::Paused,
        SessionState::Created,
    ] {
        let s = store.session(&SessionId(format!("m-{st}"))).await.unwrap();
        assert_eq!(s.state, st, "{st} sessions were not connected");
    }
    assert!(store.mark_crashed().await.unwrap().crashed.is_empty());
}

/// Each crash appends one notice to the session's private channel, even
/// when recovery runs twice; a second crash appends a second notice.
pub async fn crash_notices_are_appended_once_per_crash<H: Harness>(h: H) {
    let store = h.store();
    let id = session_in(store, "n", SessionState::Active).await;
    let notice: CrashNotice =
        Arc::new(|c| format!("{}:{}:{}", c.id, c.previous_state, c.crash_count).into_bytes());
    let first = store.mark_crashed_and_notify(notice.clone()).await.unwrap();
    assert_eq!((first.crashed.len(), first.notified), (1, 1));
    let again = store.mark_crashed_and_notify(notice.clone()).await.unwrap();
    assert_eq!((again.crashed.len(), again.notified), (0, 0));
    store.transition(&id, SessionState::Active).await.unwrap();
    let second = store.mark_crashed_and_notify(notice).await.unwrap();
    assert_eq!(second.notified, 1);
    let log = store
        .read_channel(&id.private_channel(), 1, 10)
        .await
        .unwrap();
    let got: Vec<(u64, &str, &[u8])> = log
        .iter()
        .map(|m| (m.offset, m.msg_id.as_str(), m.payload.as_slice()))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, "crash-notice-1", b"n:ACTIVE:1".as_slice()),
            (2, "crash-notice-2", b"n:ACTIVE:2".as_slice())
        ]
    );
}

/// Purging takes idle sessions (never ACTIVE ones) with their private
/// channel and subscriptions; their outbox items stay.
pub async fn idle_sessions_are_purged_with_their_channel<H: Harness>(h: H) {
    let store = h.store();
    let idle = session_in(store, "idle", SessionState::Detached).await;
    let busy = session_in(store, "busy", SessionState::Active).await;
    store
        .append(&idle.private_channel(), "m1", b"x")
        .await
        .unwrap();
    store.subscribe(&idle, "room", 0).await.unwrap();
    let queued = store
        .enqueue(NewSend {
            session_id: Some(idle.clone()),
            ..send("k")
        })
        .await
        .unwrap();
    h.clock().advance(Duration::from_secs(3600));
    let fresh = session_in(store, "fresh", SessionState::Detached).await;
    let purged = store
        .purge_idle_sessions(Duration::from_secs(60), 100)
        .await
        .unwrap();
    assert_eq!(purged, vec![idle.clone()]);
    assert!(matches!(
        store.session(&idle).await,
        Err(SessionError::NotFound(_))
    ));
    assert!(store.session(&busy).await.is_ok() && store.session(&fresh).await.is_ok());
    assert!(
        store
            .read_channel(&idle.private_channel(), 1, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.subscriptions(&idle).await.unwrap().is_empty());
    assert_eq!(store.outbox_item(queued.id).await.unwrap().idem_key, "k");
}

/// The activity log keeps the newest [`ACTIVITY_LIMIT`] entries, oldest first.
pub async fn activity_is_bounded<H: Harness>(h: H) {
    let store = h.store();
    let id = session_in(store, "act", SessionState::Active).await;
    let other = session_in(store, "quiet", SessionState::Active).await;
    for i in 0..25 {
        h.clock().advance(Duration::from_millis(1));
        store
            .record_activity(&id, "command", &format!("cmd {i}"))
            .await
            .unwrap();
    }
    let log = store.activity(&id).await.unwrap();
    let details: Vec<_> = log.iter().map(|a| a.detail.clone()).collect();
    let want: Vec<_> = (15..25).map(|i| format!("cmd {i}")).collect();
    assert_eq!(details, want);
    assert_eq!(log.len(), ACTIVITY_LIMIT);
    assert_eq!(log.last().map(|a| a.at), Some(T0 + 25));
    assert!(store.activity(&other).await.unwrap().is_empty());
}

/// Offsets start at 1; a repeated id in its scope returns the original
/// offset and time and writes nothing; another scope is another message.
pub async fn appends_are_idempotent_per_scope<H: Harness>(h: H) {
    let store = h.store();
    let a = store.append("room", "m1", b"one").await.unwrap();
    assert_eq!((a.offset, a.at, a.duplicate), (1, T0, false));
    h.clock().advance(Duration::from_millis(9));
    let dup = store.append("room", "m1", b"changed").await.unwrap();
    assert_eq!((dup.offset, dup.at, dup.duplicate), (1, T0, true));
    let alice = store
        .append_scoped("alice", "room", "m1", b"a")
        .await
        .unwrap();
    let bob = store
        .append_scoped("bob", "room", "m1", b"b")
        .await
        .unwrap();
    assert_eq!((alice.offset, bob.offset), (2, 3));
    assert!(!alice.duplicate && !bob.duplicate);
    let alice2 = store
        .append_scoped("alice", "room", "m1", b"a")
        .await
        .unwrap();
    assert_eq!((alice2.offset, alice2.duplicate), (2, true));
    // A plain append is an append in the shared scope, queued or not.
    let shared = store
        .append_scoped(SHARED_SCOPE, "room", "m1", b"s")
        .await
        .unwrap();
    assert_eq!((shared.offset, shared.duplicate), (1, true));
    let queued = store
        .queue_append("room", "m1", b"q".to_vec())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!((queued.offset, queued.duplicate), (1, true));
    let other = store.append("other", "m1", b"x").await.unwrap();
    assert_eq!(other.offset, 1, "offsets are per channel");
    let log = store.read_channel("room", 1, 10).await.unwrap();
    let payloads: Vec<&[u8]> = log.iter().map(|m| m.payload.as_slice()).collect();
    assert_eq!(payloads, vec![b"one".as_slice(), b"a", b"b"]);
    let bounds = store.channel_bounds("room").await.unwrap();
    assert_eq!((bounds.first, bounds.next), (Some(1), 4));
    let empty = store.channel_bounds("nothing").await.unwrap();
    assert_eq!((empty.first, empty.next), (None, 1));
}

/// Many concurrent publishers, with duplicates among them: every distinct
/// id gets exactly one offset, and the offsets are 1..=n with no gap.
pub async fn offsets_are_dense_under_concurrent_appends<H: Harness>(h: H) {
    let store = h.store().clone();
    let tasks: Vec<_> = (0..16)
        .map(|p| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..40 {
                    // Publishers p and p+8 send the same ids: half are duplicates.
                    let id = format!("p{}-{i}", p % 8);
                    got.push((
                        id.clone(),
                        store.append("hot", &id, id.as_bytes()).await.unwrap(),
                    ));
                }
                got
            })
        })
        .collect();
    let mut by_id: HashMap<String, u64> = HashMap::new();
    for task in tasks {
        for (id, a) in task.await.unwrap() {
            let first = *by_id.entry(id.clone()).or_insert(a.offset);
            assert_eq!(first, a.offset, "{id} got two offsets");
        }
    }
    let mut offsets: Vec<u64> = by_id.values().copied().collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=320).collect::<Vec<_>>());
    let log = store.read_channel("hot", 1, 1000).await.unwrap();
    assert_eq!(log.len(), 320);
    for m in &log {
        assert_eq!(by_id[&m.msg_id], m.offset);
        assert_eq!(m.payload, m.msg_id.as_bytes());
    }
}

/// Appends queued one after another in a lane get offsets in queue order,
/// though they commit together.
pub async fn queued_appends_keep_their_order<H: Harness>(h: H) {
    let store = h.store();
    let mut pending = Vec::new();
    for i in 0..200u32 {
        let lane = u64::from(i % 2);
        let payload = i.to_be_bytes().to_vec();
        pending.push(
            store
                .queue_append_in(lane, &format!("lane{lane}"), &format!("m{i}"), payload)
                .await
                .unwrap(),
        );
    }
    let mut next = [1u64, 1];
    for (i, committing) in pending.into_iter().enumerate() {
        let a = committing.await.unwrap();
        assert_eq!(a.offset, next[i % 2], "append {i} out of its lane's order");
        next[i % 2] += 1;
    }
}

/// A small append queued in one lane behind a flood of 400 appends of
/// 64 KiB in another (25 MiB, about 25 commits at the default byte bound)
/// commits before most of the flood, not after all of it: lanes are served
/// in fair order. The flood keeps its own order.
pub async fn a_flooding_lane_does_not_hold_up_another<H: Harness>(h: H) {
    let store = h.store();
    let big = vec![b'x'; 64 * 1024];
    let mut flood = Vec::new();
    for i in 0..400 {
        flood.push(
            store
                .queue_append_in(1, "shared", &format!("big{i}"), big.clone())
                .await
                .unwrap(),
        );
    }
    let small = store
        .queue_append_in(2, "shared", "small", b"{}".to_vec())
        .await
        .unwrap();
    let small = small.await.unwrap();
    let mut last = 0;
    for (i, committing) in flood.into_iter().enumerate() {
        let a = committing.await.unwrap();
        assert!(a.offset > last, "the flood's append {i} out of order");
        last = a.offset;
    }
    // In arrival order it would be 401.
    assert!(
        small.offset < 200,
        "the small append waited for the flood: offset {}",
        small.offset
    );
}

/// A message id queued twice before either commits (one group commit, as
/// when a client re-sends at once) is written once: the repeat is a
/// duplicate with the first one's offset, in its scope only; an id already
/// committed and repeated in the same commit is a duplicate twice.
pub async fn repeats_in_one_commit_are_duplicates<H: Harness>(h: H) {
    let store = h.store();
    store.append("room", "old", b"0").await.unwrap();
    let mut pending = Vec::new();
    for (scope, id) in [
        ("alice", "m1"),
        ("alice", "m1"),
        ("bob", "m1"),
        ("alice", "m2"),
        ("alice", "old"),
        ("alice", "old"),
        ("bob", "m1"),
    ] {
        pending.push(
            store
                .queue_append_scoped(0, scope, "room", id, format!("{scope} {id}").into_bytes())
                .await
                .unwrap(),
        );
    }
    let mut got = Vec::new();
    for committing in pending {
        let a = committing.await.unwrap();
        got.push((a.offset, a.duplicate));
    }
    // "old" was written in the system scope: alice's "old" is new.
    assert_eq!(
        got,
        vec![
            (2, false),
            (2, true),
            (3, false),
            (4, false),
            (5, false),
            (5, true),
            (3, true)
        ]
    );
    let log = store.read_channel("room", 1, 100).await.unwrap();
    let written: Vec<&[u8]> = log.iter().map(|m| m.payload.as_slice()).collect();
    assert_eq!(
        written,
        vec![
            b"0".as_slice(),
            b"alice m1",
            b"bob m1",
            b"alice m2",
            b"alice old"
        ]
    );
}

/// Reads page by count and stop after the message that reaches the byte bound.
pub async fn channel_reads_page_by_count_and_bytes<H: Harness>(h: H) {
    let store = h.store();
    for i in 1..=10u8 {
        store
            .append("c", &format!("m{i}"), &[i; 100])
            .await
            .unwrap();
    }
    let page = store.read_channel("c", 4, 3).await.unwrap();
    let offsets: Vec<u64> = page.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, vec![4, 5, 6]);
    assert!(page.iter().all(|m| m.channel == "c" && m.at == T0));
    assert_eq!(page[0].payload, vec![4u8; 100]);
    let bounded = store.read_channel_bounded("c", 1, 100, 250).await.unwrap();
    assert_eq!(
        bounded.len(),
        3,
        "stops after the message reaching 250 bytes"
    );
    let one = store.read_channel_bounded("c", 9, 100, 1).await.unwrap();
    assert_eq!(one.len(), 1, "a page holds at least one message");
    assert!(store.read_channel("c", 11, 10).await.unwrap().is_empty());
}

/// Channel names come in name order, in pages after a cursor.
pub async fn channels_are_listed_in_pages<H: Harness>(h: H) {
    let store = h.store();
    for name in ["b", "a", "d", "c", "e"] {
        store.append(name, "m", b"x").await.unwrap();
        store.append(name, "n", b"y").await.unwrap();
    }
    assert_eq!(store.channels_after(None, 2).await.unwrap(), vec!["a", "b"]);
    assert_eq!(
        store.channels_after(Some("b"), 10).await.unwrap(),
        vec!["c", "d", "e"]
    );
    assert!(
        store
            .channels_after(Some("e"), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let (total, top) = store.channel_stats(2).await.unwrap();
    assert_eq!(total, 5);
    assert_eq!(top.len(), 2);
    assert_eq!(
        (
            top[0].channel.as_str(),
            top[0].messages,
            top[0].first,
            top[0].last
        ),
        ("a", 2, 1, 2)
    );
    assert_eq!(top[0].payload_bytes, 2);
}

/// Retention by count keeps the newest; even an emptied log never hands
/// out an offset again.
pub async fn retention_never_reuses_offsets<H: Harness>(h: H) {
    let store = h.store();
    for i in 1..=10 {
        store.append("r", &format!("m{i}"), b"x").await.unwrap();
    }
    store.append("keep", "m", b"x").await.unwrap();
    let policy = Retention {
        max_count: Some(3),
        max_age: None,
    };
    assert_eq!(store.apply_retention(policy).await.unwrap(), 7);
    let left: Vec<u64> = store
        .read_channel("r", 1, 100)
        .await
        .unwrap()
        .iter()
        .map(|m| m.offset)
        .collect();
    assert_eq!(left, vec![8, 9, 10]);
    let zero = Retention {
        max_count: Some(0),
        max_age: None,
    };
    assert_eq!(store.apply_retention_to("r", zero, 100).await.unwrap(), 3);
    let bounds = store.channel_bounds("r").await.unwrap();
    assert_eq!((bounds.first, bounds.next), (None, 11));
    let next = store.append("r", "m11", b"x").await.unwrap();
    assert_eq!(next.offset, 11);
    // A removed id may come back: it is a new message with a new offset.
    let back = store.append("r", "m1", b"x").await.unwrap();
    assert_eq!((back.offset, back.duplicate), (12, false));
    assert_eq!(store.read_channel("keep", 1, 10).await.unwrap().len(), 1);
}

/// Retention by age cuts what is older than the cutoff; `retention_due`
/// names only channels with something to cut; `max_delete` bounds a step.
pub async fn retention_by_age_and_in_steps<H: Harness>(h: H) {
    let store = h.store();
    for i in 1..=6 {
        store.append("old", &format!("m{i}"), b"x").await.unwrap();
    }
    h.clock().advance(Duration::from_secs(100));
    store.append("old", "m7", b"x").await.unwrap();
    store.append("young", "m1", b"x").await.unwrap();
    let age = Retention {
        max_count: None,
        max_age: Some(Duration::from_secs(50)),
    };
    let due = store
        .retention_due(vec![("old".into(), age), ("young".into(), age)])
        .await
        .unwrap();
    assert_eq!(due, vec!["old".to_string()]);
    assert_eq!(store.apply_retention_to("old", age, 4).await.unwrap(), 4);
    assert_eq!(store.apply_retention_to("old", age, 4).await.unwrap(), 2);
    assert_eq!(store.apply_retention_to("old", age, 4).await.unwrap(), 0);
    assert_eq!(store.apply_retention_to("young", age, 4).await.unwrap(), 0);
    let bounds = store.channel_bounds("old").await.unwrap();
    assert_eq!((bounds.first, bounds.next), (Some(7), 8));
    h.clock().advance(Duration::from_secs(100));
    assert_eq!(store.apply_retention(age).await.unwrap(), 2);
    assert_eq!(store.channel_bounds("young").await.unwrap().next, 2);
}

/// Subscribing keeps the larger cursor; acks move it forward only, never
/// past the head, and only for a subscribed session.
pub async fn cursors_only_move_forward<H: Harness>(h: H) {
    let store = h.store();
    let id = session_in(store, "sub", SessionState::Active).await;
    for i in 1..=5 {
        store.append("c", &format!("m{i}"), b"x").await.unwrap();
    }
    assert_eq!(store.subscribe(&id, "c", 2).await.unwrap().cursor, 2);
    assert_eq!(store.subscribe(&id, "c", 1).await.unwrap().cursor, 2);
    assert_eq!(store.ack(&id, "c", 4).await.unwrap(), 4);
    assert_eq!(store.ack(&id, "c", 3).await.unwrap(), 4);
    match store.ack(&id, "c", 6).await {
        Err(SessionError::BeyondHead { offset, last, .. }) => assert_eq!((offset, last), (6, 5)),
        other => panic!("an ack beyond the head must be refused, got {other:?}"),
    }
    assert!(matches!(
        store.ack(&id, "never", 1).await,
        Err(SessionError::NotSubscribed { .. })
    ));
    store.subscribe(&id, "a", 0).await.unwrap();
    let subs: Vec<(String, u64)> = store
        .subscriptions(&id)
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.channel, s.cursor))
        .collect();
    assert_eq!(subs, vec![("a".into(), 0), ("c".into(), 4)]);
    assert!(store.unsubscribe(&id, "a").await.unwrap());
    assert!(!store.unsubscribe(&id, "a").await.unwrap());
    assert_eq!(store.subscriptions(&id).await.unwrap().len(), 1);
}

/// One key, one item, within a scope; the same key in another scope (a
/// session's own, a named one) is another item.
pub async fn enqueue_is_idempotent_per_scope<H: Harness>(h: H) {
    let store = h.store();
    let s1 = session_in(store, "s1", SessionState::Active).await;
    let s2 = session_in(store, "s2", SessionState::Active).await;
    let a = store.enqueue(send("k")).await.unwrap();
    let b = store.enqueue(send("k")).await.unwrap();
    assert_eq!((a.id, a.duplicate, b.duplicate), (b.id, false, true));
    let mine = |s: &SessionId| NewSend {
        session_id: Some(s.clone()),
        ..send("k")
    };
    let x = store.enqueue(mine(&s1)).await.unwrap();
    let y = store.enqueue(mine(&s2)).await.unwrap();
    let x2 = store.enqueue(mine(&s1)).await.unwrap();
    assert!(x.id != a.id && x.id != y.id && x2.id == x.id && x2.duplicate);
    let item = store.outbox_item(x.id).await.unwrap();
    assert_eq!(item.scope, "session:s1");
    assert_eq!(
        (item.state, item.attempts, item.created_at),
        (OutboxState::Pending, 0, T0)
    );
    let user = |s: &SessionId| NewSend {
        scope: "user:u".into(),
        ..mine(s)
    };
    let u1 = store.enqueue(user(&s1)).await.unwrap();
    let u2 = store.enqueue(user(&s2)).await.unwrap();
    assert!(!u1.duplicate && u2.duplicate && u1.id == u2.id);
    assert!(a.id < x.id && x.id < y.id, "ids increase in enqueue order");
    assert_eq!(store.outbox_counts().await.unwrap().pending, 4);
}

/// The quota counts a session's PENDING and CLAIMED items; a repeated key
/// is still answered; ended items free the quota.
pub async fn enqueue_quota_counts_new_work<H: Harness>(h: H) {
    let store = h.store();
    let s = session_in(store, "q", SessionState::Active).await;
    let item = |k: &str| NewSend {
        session_id: Some(s.clone()),
        ..send(k)
    };
    for k in ["a", "b"] {
        store.enqueue_within(item(k), Some(2)).await.unwrap();
    }
    match store.enqueue_within(item("c"), Some(2)).await {
        Err(OutboxError::QuotaExceeded { pending, max }) => assert_eq!((pending, max), (2, 2)),
        other => panic!("the third send must be refused, got {other:?}"),
    }
    assert!(
        store
            .enqueue_within(item("a"), Some(2))
            .await
            .unwrap()
            .duplicate
    );
    let claimed = store.claim("w", Duration::from_secs(10), 1).await.unwrap();
    store.complete(claimed[0].id, "w").await.unwrap();
    store.enqueue_within(item("c"), Some(2)).await.unwrap();
    assert_eq!(store.outbox_counts().await.unwrap().pending, 2);
}

/// Sixteen workers claiming at once: every item goes to exactly one, in
/// batches returned oldest first.
pub async fn claims_go_to_exactly_one_worker<H: Harness>(h: H) {
    let store = h.store().clone();
    for i in 0..300 {
        store.enqueue(send(&format!("k{i}"))).await.unwrap();
    }
    let workers: Vec<_> = (0..16)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let name = format!("w{w}");
                let mut mine = Vec::new();
                loop {
                    let got = store
                        .claim(&name, Duration::from_secs(30), 7)
                        .await
                        .unwrap();
                    if got.is_empty() {
                        return mine;
                    }
                    assert!(got.windows(2).all(|p| p[0].id < p[1].id));
                    for item in got {
                        assert_eq!(item.state, OutboxState::Claimed);
                        assert_eq!(item.claimed_by.as_deref(), Some(name.as_str()));
                        assert_eq!(item.claim_until, Some(T0 + 30_000));
                        mine.push(item.id);
                    }
                }
            })
        })
        .collect();
    let mut seen: HashSet<OutboxId> = HashSet::new();
    for task in workers {
        for id in task.await.unwrap() {
            assert!(seen.insert(id), "{id} claimed twice");
        }
    }
    assert_eq!(seen.len(), 300);
    assert_eq!(store.outbox_counts().await.unwrap().claimed, 300);
}

/// A lapsed lease makes the item claimable again; the old worker can then
/// neither complete nor fail it.
pub async fn leases_expire_and_old_claims_are_refused<H: Harness>(h: H) {
    let store = h.store();
    let a = store.enqueue(send("a")).await.unwrap().id;
    let got = store
        .claim("old", Duration::from_secs(5), 10)
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert!(
        store
            .claim("new", Duration::from_secs(5), 10)
            .await
            .unwrap()
            .is_empty()
    );
    h.clock().advance(Duration::from_secs(5));
    let taken = store
        .claim("new", Duration::from_secs(5), 10)
        .await
        .unwrap();
    assert_eq!(taken.iter().map(|i| i.id).collect::<Vec<_>>(), vec![a]);
    assert!(matches!(
        store.complete(a, "old").await,
        Err(OutboxError::NotClaimed { .. })
    ));
    assert!(matches!(
        store.fail(a, "old", "x", Retry::Never).await,
        Err(OutboxError::NotClaimed { .. })
    ));
    let done = store.complete(a, "new").await.unwrap();
    assert_eq!(
        (done.state, done.sent_at),
        (OutboxState::Sent, Some(T0 + 5000))
    );
    assert_eq!(done.claimed_by, None);
    // release_expired_claims returns lapsed claims for the counts' sake.
    store.enqueue(send("b")).await.unwrap();
    store.claim("w", Duration::from_secs(1), 10).await.unwrap();
    assert_eq!(store.release_expired_claims().await.unwrap(), 0);
    h.clock().advance(Duration::from_secs(1));
    assert_eq!(store.release_expired_claims().await.unwrap(), 1);
    let counts = store.outbox_counts().await.unwrap();
    assert_eq!((counts.pending, counts.claimed, counts.sent), (1, 0, 1));
    assert!(matches!(
        store.outbox_item(OutboxId(9_999_999)).await,
        Err(OutboxError::NotFound(_))
    ));
}

/// A retried failure waits its delay; `Never` and dead letters go DEAD;
/// re-drives bring DEAD items back with attempts reset.
pub async fn failures_retry_die_and_redrive<H: Harness>(h: H) {
    let store = h.store();
    let id = store.enqueue(send("x")).await.unwrap().id;
    store.claim("w", Duration::from_secs(10), 1).await.unwrap();
    let failed = store
        .fail(id, "w", "503", Retry::After(Duration::from_secs(2)))
        .await
        .unwrap();
    assert_eq!((failed.state, failed.attempts), (OutboxState::Pending, 1));
    assert_eq!(
        (failed.next_attempt_at, failed.last_error.as_deref()),
        (T0 + 2000, Some("503"))
    );
    assert!(
        store
            .claim("w", Duration::from_secs(10), 1)
            .await
            .unwrap()
            .is_empty()
    );
    h.clock().advance(Duration::from_secs(2));
    assert_eq!(
        store
            .claim("w", Duration::from_secs(10), 1)
            .await
            .unwrap()
            .len(),
        1
    );
    let dead = store.fail(id, "w", "400", Retry::Never).await.unwrap();
    assert_eq!((dead.state, dead.attempts), (OutboxState::Dead, 2));
    assert!(matches!(
        store.dead_letter(id, "again").await,
        Err(OutboxError::WrongState { .. })
    ));
    let back = store.redrive(id).await.unwrap();
    assert_eq!((back.state, back.attempts), (OutboxState::Pending, 0));
    assert!(matches!(
        store.redrive(id).await,
        Err(OutboxError::WrongState { .. })
    ));
    let other = store.enqueue(send("y")).await.unwrap().id;
    for i in [id, other] {
        let d = store.dead_letter(i, "operator").await.unwrap();
        assert_eq!(
            (d.state, d.last_error.as_deref()),
            (OutboxState::Dead, Some("operator"))
        );
    }
    let listed: Vec<OutboxId> = store
        .outbox_items(OutboxState::Dead, 10)
        .await
        .unwrap()
        .iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(listed, vec![id, other]);
    assert_eq!(store.outbox_counts().await.unwrap().dead, 2);
    assert_eq!(store.redrive_all().await.unwrap(), 2);
    assert_eq!(store.outbox_counts().await.unwrap().pending, 2);
}

/// Health transitions get increasing ids, also when written concurrently;
/// the newest `limit` are returned oldest first.
pub async fn health_transitions_are_kept_in_order<H: Harness>(h: H) {
    let store = h.store().clone();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .record_health_transition("A", "B", &format!("r{i}"))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for t in tasks {
        let tr = t.await.unwrap();
        assert_eq!((tr.at, tr.from.as_str(), tr.to.as_str()), (T0, "A", "B"));
        assert!(ids.insert(tr.id));
    }
    let last = store
        .record_health_transition("B", "C", "last")
        .await
        .unwrap();
    assert!(ids.iter().all(|&i| i < last.id));
    let newest = store.health_transitions(3).await.unwrap();
    assert_eq!(newest.len(), 3);
    assert!(newest.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(newest[2], last);
}

/// Meta values and the clean-shutdown flag survive a reopen; an unclean
/// close is seen by the next open; the run count goes up; the instance id
/// stays.
pub async fn meta_and_clean_shutdown_survive_reopen<H: Harness>(mut h: H) {
    let first = h.store().startup().clone();
    assert!(first.created && first.previous_clean_shutdown);
    assert_eq!(first.run, 1);
    assert!(!h.store().clean_shutdown().await.unwrap());
    h.store().set_meta("k", "v1").await.unwrap();
    h.store().set_meta("k", "v2").await.unwrap();
    assert_eq!(h.store().meta("k").await.unwrap().as_deref(), Some("v2"));
    assert_eq!(h.store().meta("none").await.unwrap(), None);
    let id = session_in(h.store(), "kept", SessionState::Active).await;
    h.store().append("c", "m", b"kept").await.unwrap();

    h.reopen(true).await;
    let second = h.store().startup().clone();
    assert!(!second.created && second.previous_clean_shutdown);
    assert_eq!((second.run, &second.instance_id), (2, &first.instance_id));
    assert_eq!(h.store().meta("k").await.unwrap().as_deref(), Some("v2"));

    h.reopen(false).await;
    let third = h.store().startup().clone();
    assert!(
        !third.previous_clean_shutdown,
        "an unclean close must be seen"
    );
    assert_eq!(third.run, 3);
    assert_eq!(
        h.store().session(&id).await.unwrap().state,
        SessionState::Active
    );
    assert_eq!(
        h.store().read_channel("c", 1, 1).await.unwrap()[0].payload,
        b"kept"
    );
    assert_eq!(h.store().append("c", "m2", b"x").await.unwrap().offset, 2);
}

/// After `close`, writes fail with `Closed` and a second close is refused.
pub async fn writes_after_close_are_refused<H: Harness>(h: H) {
    let store = h.store();
    store.append("c", "m", b"x").await.unwrap();
    store.close().await.unwrap();
    assert!(matches!(
        store.append("c", "n", b"x").await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(
        store.create_session(new_session("late")).await,
        Err(SessionError::Store(StoreError::Closed))
    ));
    assert!(matches!(store.close().await, Err(StoreError::Closed)));
}
