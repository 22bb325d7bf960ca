//! Sessions: concurrency, isolation, the state machine and the activity log.

use std::collections::HashSet;

use futures::future::join_all;
use keel_session::{NewSession, SessionError, SessionId, SessionState, Store};

use crate::support::{self, T0};

async fn create_many(store: &Store, n: usize) -> Vec<SessionId> {
    let futures = (0..n).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .create_session(NewSession {
                    id: None,
                    token_hash: vec![i as u8; 32],
                    meta: format!("owner-{i}"),
                    ..Default::default()
                })
                .await
        })
    });
    join_all(futures)
        .await
        .into_iter()
        .map(|r| r.expect("task").expect("create").id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_100() {
    let t = support::open().await;
    let ids = create_many(&t.store, 100).await;
    let distinct: HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), 100);

    // A command for one session reaches that session only.
    let target = &ids[37];
    t.store
        .transition(target, SessionState::Active)
        .await
        .unwrap();
    t.store
        .record_activity(target, "command", "ls -la")
        .await
        .unwrap();
    for id in &ids {
        let activity = t.store.activity(id).await.unwrap();
        let state = t.store.session(id).await.unwrap().state;
        if id == target {
            assert_eq!(activity.len(), 1);
            assert_eq!(state, SessionState::Active);
        } else {
            assert!(activity.is_empty(), "cross-talk into {id}");
            assert_eq!(state, SessionState::Created);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_10k() {
    let t = support::open().await;
    let ids = create_many(&t.store, 10_000).await;
    let distinct: HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), 10_000, "session ids must be distinct");

    let reads = ids.iter().enumerate().map(|(i, id)| {
        let store = t.store.clone();
        let id = id.clone();
        async move {
            let s = store.session(&id).await.expect("readable");
            assert_eq!(s.meta, format!("owner-{i}"));
            assert_eq!(s.state, SessionState::Created);
        }
    });
    join_all(reads).await;
    let all = t.store.sessions(None).await.unwrap();
    assert_eq!(all.len(), 10_000);
    let stats = t.store.writer_stats();
    assert!(
        stats.max_batch > 1,
        "10k concurrent creates must group-commit: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_isolation() {
    let t = support::open().await;
    let ids = create_many(&t.store, 12).await;
    // Each session gets a different sequence of operations, all in parallel.
    let work = ids.iter().enumerate().map(|(i, id)| {
        let store = t.store.clone();
        let id = id.clone();
        async move {
            store.transition(&id, SessionState::Active).await.unwrap();
            for n in 0..i {
                store
                    .record_activity(&id, "cmd", &format!("{id}:{n}"))
                    .await
                    .unwrap();
            }
            store
                .subscribe(&id, &format!("room:{i}"), i as u64)
                .await
                .unwrap();
            store
                .set_session_meta(&id, &format!("meta-{i}"))
                .await
                .unwrap();
            match i % 3 {
                0 => store
                    .transition(&id, SessionState::Detached)
                    .await
                    .map(drop),
                1 => store.transition(&id, SessionState::Paused).await.map(drop),
                _ => Ok(()),
            }
            .unwrap();
        }
    });
    join_all(work).await;

    for (i, id) in ids.iter().enumerate() {
        let s = t.store.session(id).await.unwrap();
        let expected = match i % 3 {
            0 => SessionState::Detached,
            1 => SessionState::Paused,
            _ => SessionState::Active,
        };
        assert_eq!(s.state, expected, "session {i}");
        assert_eq!(s.meta, format!("meta-{i}"));
        let activity = t.store.activity(id).await.unwrap();
        assert_eq!(activity.len(), i.min(10));
        assert!(
            activity
                .iter()
                .all(|a| a.detail.starts_with(&format!("{id}:")))
        );
        let subs = t.store.subscriptions(id).await.unwrap();
        assert_eq!(subs.len(), 1);
        assert_eq!(subs[0].channel, format!("room:{i}"));
        assert_eq!(subs[0].cursor, i as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_contention() {
    let t = support::open().await;
    let ids = create_many(&t.store, 1_000).await;

    // 1,000 concurrent state updates while readers hammer the same rows.
    let readers = (0..4).map(|r| {
        let store = t.store.clone();
        let ids = ids.clone();
        tokio::spawn(async move {
            for id in ids.iter().skip(r).step_by(4) {
                store.session(id).await.expect("read during contention");
            }
        })
    });
    let updates = ids.iter().map(|id| {
        let store = t.store.clone();
        let id = id.clone();
        tokio::spawn(async move { store.transition(&id, SessionState::Active).await })
    });
    let (updates, readers) = futures::join!(join_all(updates), join_all(readers));
    for r in readers {
        r.expect("reader task");
    }
    let errors: Vec<_> = updates
        .into_iter()
        .map(|r| r.expect("task"))
        .filter_map(Result::err)
        .collect();
    assert!(errors.is_empty(), "no update may fail: {errors:?}");

    let active = t.store.sessions(Some(SessionState::Active)).await.unwrap();
    assert_eq!(active.len(), 1_000, "every update committed");
    assert!(active.iter().all(|s| s.last_seen_at == Some(T0)));
}

#[track_caller]
fn check_transition(from: SessionState, to: SessionState, allowed: bool) {
    assert_eq!(from.can_transition_to(to), allowed, "{from} -> {to}");
}

#[test]
fn transition_table() {
    use SessionState::*;
    let allowed = [
        (Created, Active),
        (Active, Detached),
        (Detached, Active),
        (Active, Paused),
        (Detached, Paused),
        (Paused, Active),
        (Active, Crashed),
        (Detached, Crashed),
        (Paused, Crashed),
        (Crashed, Active),
        (Created, Closed),
        (Active, Closed),
        (Detached, Closed),
        (Paused, Closed),
        (Crashed, Closed),
    ];
    for from in SessionState::ALL {
        for to in SessionState::ALL {
            check_transition(from, to, allowed.contains(&(from, to)));
        }
    }
}

#[tokio::test]
async fn invalid_transition_rejected() {
    let t = support::open().await;
    let s = t.store.create_session(NewSession::default()).await.unwrap();
    t.clock.advance(std::time::Duration::from_secs(5));

    // CREATED -> PAUSED is not in the table: an error, and nothing written.
    let err = t.store.transition(&s.id, SessionState::Paused).await;
    assert_eq!(
        err,
        Err(SessionError::InvalidTransition {
            from: SessionState::Created,
            to: SessionState::Paused
        })
    );
    let after = t.store.session(&s.id).await.unwrap();
    assert_eq!(after, s, "a rejected transition writes nothing");

    t.store
        .transition(&s.id, SessionState::Closed)
        .await
        .unwrap();
    for to in SessionState::ALL {
        let err = t.store.transition(&s.id, to).await;
        assert_eq!(
            err,
            Err(SessionError::InvalidTransition {
                from: SessionState::Closed,
                to
            }),
            "CLOSED is terminal"
        );
    }

    let missing = SessionId::from("nope");
    assert_eq!(
        t.store.transition(&missing, SessionState::Active).await,
        Err(SessionError::NotFound(missing))
    );
}

#[tokio::test]
async fn crashed_transition_counts_and_stamps() {
    let t = support::open().await;
    let s = t.store.create_session(NewSession::default()).await.unwrap();
    t.store
        .transition(&s.id, SessionState::Active)
        .await
        .unwrap();
    t.clock.advance(std::time::Duration::from_millis(250));
    let crashed = t
        .store
        .transition(&s.id, SessionState::Crashed)
        .await
        .unwrap();
    assert_eq!(crashed.crash_count, 1);
    assert_eq!(crashed.recovered_at, Some(T0 + 250));
    let back = t
        .store
        .transition(&s.id, SessionState::Active)
        .await
        .unwrap();
    assert_eq!(back.crash_count, 1);
}

#[tokio::test]
async fn activity_log_bounded() {
    let t = support::open().await;
    let a = t
        .store
        .create_session(NewSession::default())
        .await
        .unwrap()
        .id;
    let b = t
        .store
        .create_session(NewSession::default())
        .await
        .unwrap()
        .id;
    for i in 0..25 {
        t.clock.advance(std::time::Duration::from_millis(1));
        t.store
            .record_activity(&a, "cmd", &format!("a{i}"))
            .await
            .unwrap();
    }
    t.store.record_activity(&b, "cmd", "b0").await.unwrap();

    let log = t.store.activity(&a).await.unwrap();
    let details: Vec<_> = log.iter().map(|e| e.detail.as_str()).collect();
    let expected: Vec<String> = (15..25).map(|i| format!("a{i}")).collect();
    assert_eq!(details, expected, "newest 10, oldest first");
    assert_eq!(t.store.activity(&b).await.unwrap().len(), 1, "per session");

    let missing = SessionId::from("ghost");
    assert_eq!(
        t.store.record_activity(&missing, "cmd", "x").await,
        Err(SessionError::NotFound(missing))
    );
}

#[tokio::test]
async fn activity_limit_is_configurable() {
    let t = support::open_with(keel_session::Config {
        activity_limit: 3,
        ..Default::default()
    })
    .await;
    let a = t
        .store
        .create_session(NewSession::default())
        .await
        .unwrap()
        .id;
    for i in 0..7 {
        t.store
            .record_activity(&a, "cmd", &i.to_string())
            .await
            .unwrap();
    }
    let details: Vec<_> = t
        .store
        .activity(&a)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.detail)
        .collect();
    assert_eq!(details, ["4", "5", "6"]);
}

#[tokio::test]
async fn duplicate_session_id_rejected() {
    let t = support::open().await;
    let new = NewSession {
        id: Some(SessionId::from("fixed")),
        ..Default::default()
    };
    t.store.create_session(new.clone()).await.unwrap();
    assert_eq!(
        t.store.create_session(new).await,
        Err(SessionError::AlreadyExists(SessionId::from("fixed")))
    );
}

#[tokio::test]
async fn mark_crashed_moves_connected_sessions_and_unknown_states() {
    let t = support::open().await;
    let mut ids = Vec::new();
    for (i, path) in [
        vec![],
        vec![SessionState::Active],
        vec![SessionState::Active, SessionState::Detached],
        vec![SessionState::Active, SessionState::Paused],
        vec![SessionState::Closed],
    ]
    .into_iter()
    .enumerate()
    {
        let id = SessionId(format!("s{i}"));
        t.store
            .create_session(NewSession {
                id: Some(id.clone()),
                ..Default::default()
            })
            .await
            .unwrap();
        for st in path {
            t.store.transition(&id, st).await.unwrap();
        }
        ids.push(id);
    }
    // A damaged row, written behind the store's back.
    {
        let conn = rusqlite::Connection::open(t.path()).unwrap();
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .unwrap();
        conn.execute(
            "INSERT INTO sessions(id, token_hash, state, created_at, updated_at) VALUES('bad', x'', 'INVALID', 0, 0)",
            [],
        )
        .unwrap();
    }
    assert!(matches!(
        t.store.session(&SessionId::from("bad")).await,
        Err(SessionError::UnknownState { .. })
    ));

    t.clock.advance(std::time::Duration::from_secs(1));
    let marked = t.store.mark_crashed().await.unwrap();
    assert_eq!(
        marked.crashed,
        vec![ids[1].clone()],
        "only the session that was ACTIVE (connected) crashed"
    );
    assert_eq!(
        marked.unknown,
        vec![(SessionId::from("bad"), "INVALID".to_owned())]
    );

    for (id, state) in [
        (&ids[0], SessionState::Created),
        (&ids[1], SessionState::Crashed),
        (&ids[2], SessionState::Detached),
        (&ids[3], SessionState::Paused),
        (&ids[4], SessionState::Closed),
    ] {
        assert_eq!(t.store.session(id).await.unwrap().state, state, "{id}");
    }
    let bad = t.store.session(&SessionId::from("bad")).await.unwrap();
    assert_eq!(bad.state, SessionState::Crashed);
    assert_eq!(bad.recovered_at, Some(T0 + 1000));
    assert_eq!(bad.crash_count, 1);

    // Idempotent.
    assert_eq!(t.store.mark_crashed().await.unwrap(), Default::default());
}

#[tokio::test]
async fn mark_crashed_and_notify_appends_one_notice_per_crash() {
    let t = support::open().await;
    let live = SessionId::from("live");
    let idle = SessionId::from("idle");
    for id in [&live, &idle] {
        t.store
            .create_session(NewSession {
                id: Some(id.clone()),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    t.store
        .transition(&live, SessionState::Active)
        .await
        .unwrap();
    let notice: keel_session::CrashNotice = std::sync::Arc::new(|c| {
        format!("{}:{}:{}", c.id, c.previous_state, c.crash_count).into_bytes()
    });

    let marked = t
        .store
        .mark_crashed_and_notify(notice.clone())
        .await
        .unwrap();
    assert_eq!(marked.crashed, vec![live.clone()]);
    assert_eq!(marked.notified, 1);
    let log = t
        .store
        .read_channel(&live.private_channel(), 1, 10)
        .await
        .unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].msg_id, "crash-notice-1");
    assert_eq!(log[0].payload, b"live:ACTIVE:1");
    assert!(
        t.store
            .read_channel(&idle.private_channel(), 1, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Nothing left to mark: nothing appended.
    let again = t
        .store
        .mark_crashed_and_notify(notice.clone())
        .await
        .unwrap();
    assert_eq!(again, Default::default());

    // A second crash of the same session gets its own notice.
    t.store
        .transition(&live, SessionState::Active)
        .await
        .unwrap();
    let second = t.store.mark_crashed_and_notify(notice).await.unwrap();
    assert_eq!(second.notified, 1);
    let log = t
        .store
        .read_channel(&live.private_channel(), 1, 10)
        .await
        .unwrap();
    let ids: Vec<_> = log.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(ids, ["crash-notice-1", "crash-notice-2"]);
}

/// A session created with its first connection open is stored ACTIVE in
/// the same write: a crash right after marks it CRASHED like any other
/// connected session.
#[tokio::test]
async fn created_connected_is_stored_active() {
    let t = support::open().await;
    let s = t
        .store
        .create_session(NewSession {
            connected: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        s.state,
        SessionState::Created,
        "the state it was created in"
    );
    assert_eq!(
        t.store.session(&s.id).await.unwrap().state,
        SessionState::Active
    );
    assert_eq!(t.store.mark_crashed().await.unwrap().crashed, vec![s.id]);
}
