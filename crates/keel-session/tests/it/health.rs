//! The health transition log.

use std::collections::HashSet;

use futures::future::join_all;

use crate::support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transition_ids_unique_under_concurrency() {
    let mut t = support::open().await;
    let writes = (0..200).map(|i| {
        let store = t.store.clone();
        tokio::spawn(async move {
            let (from, to) = if i % 2 == 0 {
                ("OPERATIONAL", "DEGRADED")
            } else {
                ("DEGRADED", "OPERATIONAL")
            };
            store
                .record_health_transition(from, to, &format!("toggle {i}"))
                .await
                .unwrap()
        })
    });
    let records: Vec<_> = join_all(writes)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let ids: HashSet<_> = records.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), 200);

    t.reopen().await;
    let log = t.store.health_transitions(1_000).await.unwrap();
    assert_eq!(log.len(), 200);
    assert!(log.windows(2).all(|w| w[0].id < w[1].id), "ordered by id");
    let newest = t.store.health_transitions(1).await.unwrap();
    assert_eq!(newest[0].id, log[199].id);
}
