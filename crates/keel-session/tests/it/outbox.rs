//! The outbox: idempotent enqueue, exactly-once claims, leases, retries, dead letters.

use std::time::Duration;

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

// Idempotent enqueue and exactly-once claims under 16 concurrent workers
// are conformance cases (keel_session::testkit), run on this store in
// tests/it/conformance.rs.

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
