//! The outbox: idempotent enqueue, exactly-once claims, leases, retries, dead letters.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::join_all;
use keel_session::{NewSend, OutboxError, OutboxId, OutboxState, Retry};

use crate::support::{self, T0};

fn send(key: &str) -> NewSend {
    NewSend {
        session_id: None,
        idem_key: key.to_owned(),
        payload: key.as_bytes().to_vec(),
        ..Default::default()
    }
}

#[tokio::test]
async fn enqueue_is_idempotent() {
    let t = support::open().await;
    let a = t.store.enqueue(send("k1")).await.unwrap();
    let b = t.store.enqueue(send("k1")).await.unwrap();
    assert_eq!(a.id, b.id);
    assert!(!a.duplicate && b.duplicate);
    assert_eq!(t.store.outbox_counts().await.unwrap().pending, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_claim_exactly_once() {
    let t = support::open().await;
    for i in 0..500 {
        t.store.enqueue(send(&format!("k{i}"))).await.unwrap();
    }
    // 16 workers claim concurrently in small batches until nothing is left.
    let workers = (0..16).map(|w| {
        let store = t.store.clone();
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
                for item in got {
                    assert_eq!(item.state, OutboxState::Claimed);
                    assert_eq!(item.claimed_by.as_deref(), Some(name.as_str()));
                    mine.push(item.id);
                }
            }
        })
    });
    let mut owner: HashMap<OutboxId, usize> = HashMap::new();
    for (w, ids) in join_all(workers).await.into_iter().enumerate() {
        for id in ids.unwrap() {
            assert!(owner.insert(id, w).is_none(), "item {id} claimed twice");
        }
    }
    assert_eq!(owner.len(), 500, "every item claimed once");

    // Nothing is due until a lease expires; then it can be claimed again.
    assert!(
        t.store
            .claim("late", Duration::from_secs(30), 10)
            .await
            .unwrap()
            .is_empty()
    );
    t.clock.advance(Duration::from_secs(30));
    let reclaimed = t
        .store
        .claim("late", Duration::from_secs(30), 1000)
        .await
        .unwrap();
    assert_eq!(reclaimed.len(), 500, "expired claims are claimable again");

    // The original holder has lost its lease.
    let (id, w) = owner.iter().next().unwrap();
    assert_eq!(
        t.store.complete(*id, &format!("w{w}")).await,
        Err(OutboxError::NotClaimed {
            id: *id,
            worker: format!("w{w}")
        })
    );
    assert_eq!(
        t.store.complete(*id, "late").await.unwrap().state,
        OutboxState::Sent
    );
}

#[tokio::test]
async fn fail_retries_then_dead_then_redrive() {
    let t = support::open().await;
    let id = t.store.enqueue(send("k")).await.unwrap().id;
    let item = t
        .store
        .claim("w", Duration::from_secs(10), 1)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(item.id, id);

    let failed = t
        .store
        .fail(
            id,
            "w",
            "upstream 503",
            Retry::After(Duration::from_secs(2)),
        )
        .await
        .unwrap();
    assert_eq!(failed.state, OutboxState::Pending);
    assert_eq!(failed.attempts, 1);
    assert_eq!(failed.next_attempt_at, T0 + 2_000);
    assert_eq!(failed.last_error.as_deref(), Some("upstream 503"));

    assert!(
        t.store
            .claim("w", Duration::from_secs(10), 1)
            .await
            .unwrap()
            .is_empty(),
        "not before its retry time"
    );
    t.clock.advance(Duration::from_secs(2));
    assert_eq!(
        t.store
            .claim("w", Duration::from_secs(10), 1)
            .await
            .unwrap()
            .len(),
        1
    );
    let dead = t
        .store
        .fail(id, "w", "gave up", Retry::Never)
        .await
        .unwrap();
    assert_eq!((dead.state, dead.attempts), (OutboxState::Dead, 2));
    assert_eq!(
        t.store.outbox_items(OutboxState::Dead, 10).await.unwrap(),
        vec![dead.clone()]
    );
    assert_eq!(t.store.outbox_item(id).await.unwrap(), dead);
    assert!(
        t.store
            .claim("w", Duration::from_secs(10), 1)
            .await
            .unwrap()
            .is_empty()
    );

    let again = t.store.redrive(id).await.unwrap();
    assert_eq!((again.state, again.attempts), (OutboxState::Pending, 0));
    assert!(matches!(
        t.store.redrive(id).await,
        Err(OutboxError::WrongState { .. })
    ));
    let claimed = t
        .store
        .claim("w", Duration::from_secs(10), 1)
        .await
        .unwrap();
    let sent = t.store.complete(claimed[0].id, "w").await.unwrap();
    assert_eq!(sent.state, OutboxState::Sent);
    assert_eq!(sent.sent_at, Some(T0 + 2_000));
    assert!(matches!(
        t.store.dead_letter(id, "no").await,
        Err(OutboxError::WrongState { .. })
    ));
    assert_eq!(
        t.store.complete(OutboxId(999), "w").await,
        Err(OutboxError::NotFound(OutboxId(999)))
    );
}

#[tokio::test]
async fn release_expired_claims_and_dead_letter() {
    let t = support::open().await;
    let a = t.store.enqueue(send("a")).await.unwrap().id;
    let b = t.store.enqueue(send("b")).await.unwrap().id;
    t.store.claim("w", Duration::from_secs(5), 2).await.unwrap();
    assert_eq!(t.store.release_expired_claims().await.unwrap(), 0);
    t.clock.advance(Duration::from_secs(5));
    assert_eq!(t.store.release_expired_claims().await.unwrap(), 2);
    let counts = t.store.outbox_counts().await.unwrap();
    assert_eq!((counts.pending, counts.claimed), (2, 0));

    t.store.dead_letter(a, "payload rejected").await.unwrap();
    assert_eq!(t.store.redrive_all().await.unwrap(), 1);
    let ids: Vec<_> = t
        .store
        .outbox_items(OutboxState::Pending, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(ids, [a, b]);
}
