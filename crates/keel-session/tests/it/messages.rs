//! Channel logs: idempotent append, ranges, retention, cursors.

use std::time::Duration;

use futures::future::join_all;
use keel_session::{ChannelBounds, NewSession, Retention, SessionError, SessionId};

use crate::support::{self, T0};

#[tokio::test]
async fn idempotent_append() {
    let t = support::open().await;
    let a = t.store.append("room", "m1", b"one").await.unwrap();
    let b = t.store.append("room", "m2", b"two").await.unwrap();
    t.clock.advance(Duration::from_secs(3));
    let again = t
        .store
        .append("room", "m1", b"different payload")
        .await
        .unwrap();
    assert_eq!((a.offset, b.offset), (1, 2));
    assert!(!a.duplicate && !b.duplicate);
    assert_eq!(again.offset, 1);
    assert_eq!(again.at, T0, "the original append time");
    assert!(again.duplicate);

    // The same id in another channel is a different message.
    let other = t.store.append("other", "m1", b"x").await.unwrap();
    assert_eq!(other.offset, 1);
    assert!(!other.duplicate);

    let log = t.store.read_channel("room", 0, 100).await.unwrap();
    assert_eq!(log.len(), 2, "the duplicate wrote nothing");
    assert_eq!(log[0].payload, b"one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicate_appends_get_one_offset() {
    let t = support::open().await;
    let appends = (0..200).map(|i| {
        let store = t.store.clone();
        tokio::spawn(async move { store.append("room", &format!("m{}", i % 50), b"p").await })
    });
    let results: Vec<_> = join_all(appends)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    assert_eq!(results.iter().filter(|a| !a.duplicate).count(), 50);
    let log = t.store.read_channel("room", 1, 1000).await.unwrap();
    let offsets: Vec<u64> = log.iter().map(|m| m.offset).collect();
    assert_eq!(
        offsets,
        (1..=50).collect::<Vec<_>>(),
        "dense, ordered offsets"
    );
    for (i, r) in results.iter().enumerate() {
        let m = log.iter().find(|m| m.offset == r.offset).unwrap();
        assert_eq!(m.msg_id, format!("m{}", i % 50));
    }
}

#[tokio::test]
async fn range_reads() {
    let t = support::open().await;
    for i in 1..=20 {
        t.store
            .append("c", &format!("id{i}"), format!("p{i}").as_bytes())
            .await
            .unwrap();
    }
    let page = t.store.read_channel("c", 5, 3).await.unwrap();
    let got: Vec<_> = page.iter().map(|m| (m.offset, m.msg_id.as_str())).collect();
    assert_eq!(got, [(5, "id5"), (6, "id6"), (7, "id7")]);
    assert!(t.store.read_channel("c", 21, 10).await.unwrap().is_empty());
    assert!(
        t.store
            .read_channel("nothing", 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        t.store.channel_bounds("c").await.unwrap(),
        ChannelBounds {
            first: Some(1),
            next: 21
        }
    );
    assert_eq!(
        t.store.channel_bounds("nothing").await.unwrap(),
        ChannelBounds {
            first: None,
            next: 1
        }
    );
}

#[tokio::test]
async fn retention_by_count_and_age_never_reuses_offsets() {
    let t = support::open().await;
    for i in 1..=10 {
        t.store.append("a", &format!("a{i}"), b"x").await.unwrap();
        t.clock.advance(Duration::from_secs(1));
    }
    for i in 1..=3 {
        t.store.append("b", &format!("b{i}"), b"x").await.unwrap();
    }
    let removed = t
        .store
        .apply_retention(Retention {
            max_count: Some(4),
            max_age: None,
        })
        .await
        .unwrap();
    assert_eq!(removed, 6, "only channel a is over the count");
    assert_eq!(
        t.store.channel_bounds("a").await.unwrap(),
        ChannelBounds {
            first: Some(7),
            next: 11
        }
    );
    assert_eq!(t.store.channel_bounds("b").await.unwrap().first, Some(1));

    // Messages a7..a10 were appended at T0+6s..T0+9s; b1..b3 at T0+10s. Now is T0+10s.
    let removed = t
        .store
        .apply_retention(Retention {
            max_count: None,
            max_age: Some(Duration::from_millis(2_500)),
        })
        .await
        .unwrap();
    assert_eq!(removed, 2, "a7 and a8 are older than 2.5 s");
    let left: Vec<_> = t
        .store
        .read_channel("a", 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.offset)
        .collect();
    assert_eq!(left, [9, 10]);

    t.store
        .apply_retention(Retention {
            max_count: Some(0),
            max_age: None,
        })
        .await
        .unwrap();
    assert_eq!(
        t.store.channel_bounds("a").await.unwrap(),
        ChannelBounds {
            first: None,
            next: 11
        }
    );
    let next = t.store.append("a", "a11", b"x").await.unwrap();
    assert_eq!(next.offset, 11, "offsets are never reused after retention");
}

#[tokio::test]
async fn cursors_only_move_forward() {
    let t = support::open().await;
    let s = t
        .store
        .create_session(NewSession::default())
        .await
        .unwrap()
        .id;
    let sub = t.store.subscribe(&s, "room", 0).await.unwrap();
    assert_eq!(sub.cursor, 0);
    for i in 1..=5 {
        t.store
            .append("room", &format!("r{i}"), b"x")
            .await
            .unwrap();
    }
    assert_eq!(
        t.store.ack(&s, "room", 6).await,
        Err(SessionError::BeyondHead {
            channel: "room".into(),
            offset: 6,
            last: 5
        }),
        "an ack can only confirm what exists"
    );
    assert_eq!(t.store.ack(&s, "room", 5).await.unwrap(), 5);
    assert_eq!(
        t.store.ack(&s, "room", 3).await.unwrap(),
        5,
        "acks never move back"
    );
    assert_eq!(t.store.subscribe(&s, "room", 2).await.unwrap().cursor, 5);
    assert_eq!(
        t.store.ack(&s, "elsewhere", 1).await,
        Err(SessionError::NotSubscribed {
            session: s.clone(),
            channel: "elsewhere".into()
        })
    );
    assert!(t.store.unsubscribe(&s, "room").await.unwrap());
    assert!(!t.store.unsubscribe(&s, "room").await.unwrap());
    assert!(t.store.subscriptions(&s).await.unwrap().is_empty());
    let ghost = SessionId::from("ghost");
    assert_eq!(
        t.store.subscribe(&ghost, "room", 0).await,
        Err(SessionError::NotFound(ghost))
    );
}

/// A read sees one snapshot: bounds read while the first message of a log
/// commits say "empty" or "holds offset 1", never "empty but offset 1 was
/// written" (which a reader takes for retention having cut the log, and
/// skips the message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounds_are_one_snapshot_while_a_log_starts() {
    let t = support::open().await;
    let mut torn = 0;
    for round in 0..200 {
        let channel = format!("new-{round}");
        let pollers: Vec<_> = (0..3)
            .map(|_| {
                let (store, channel) = (t.store.clone(), channel.clone());
                tokio::spawn(async move {
                    let mut torn = 0;
                    loop {
                        let b = store.channel_bounds(&channel).await.unwrap();
                        if b.first.is_none() && b.next > 1 {
                            torn += 1;
                        }
                        if b.next > 1 {
                            return torn;
                        }
                    }
                })
            })
            .collect();
        t.store.append(&channel, "m1", b"p").await.unwrap();
        for p in join_all(pollers).await {
            torn += p.unwrap();
        }
    }
    assert_eq!(torn, 0, "bounds mixed two snapshots {torn} times");
}

/// One read says which of many channels retention would cut, each by its
/// own policy.
#[tokio::test]
async fn retention_due_names_only_the_channels_to_cut() {
    let t = support::open().await;
    for i in 0..5 {
        t.store
            .append("long", &format!("l{i}"), b"p")
            .await
            .unwrap();
    }
    t.store.append("short", "s0", b"p").await.unwrap();
    t.store.append("old", "o0", b"p").await.unwrap();
    t.clock.advance(Duration::from_secs(10));
    let count = |n| Retention {
        max_count: Some(n),
        max_age: None,
    };
    let age = Retention {
        max_count: None,
        max_age: Some(Duration::from_secs(5)),
    };
    let due = t
        .store
        .retention_due(vec![
            ("long".into(), count(3)),
            ("short".into(), count(3)),
            ("old".into(), age),
            ("empty".into(), count(1)),
        ])
        .await
        .unwrap();
    assert_eq!(due, ["long", "old"]);
    // Applied, nothing is due any more.
    for c in &due {
        let policy = if c == "old" { age } else { count(3) };
        t.store.apply_retention_to(c, policy, 100).await.unwrap();
    }
    let again = t
        .store
        .retention_due(vec![("long".into(), count(3)), ("old".into(), age)])
        .await
        .unwrap();
    assert!(again.is_empty(), "{again:?}");
}
