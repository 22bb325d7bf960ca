//! Property: for random arrivals, no quota is ever exceeded and every message
//! not dropped by policy is sent exactly once, FIFO per key.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use keel_ratelimit::{
    Config, DeadReason, Delivery, Overflow, Quota, Scope, SendOutcome, SendQueue,
};
use proptest::prelude::*;
use tokio::time::Instant;

use crate::support::{Recorder, check_quota, nz};

#[derive(Debug, Clone)]
struct Arrival {
    after_ms: u16,
    key: u8,
    answer: u8,
}

fn arrivals() -> impl Strategy<Value = Vec<Arrival>> {
    prop::collection::vec(
        (0..800u16, 0..6u8, 0..20u8).prop_map(|(after_ms, key, answer)| Arrival {
            after_ms,
            key,
            answer,
        }),
        1..120,
    )
}

async fn run(arrivals: Vec<Arrival>, drop_oldest: bool) {
    let per_key = [
        Quota::per_second(nz(2)),
        Quota::per_minute(nz(30)).allow_burst(nz(3)),
    ];
    let global = Quota::per_second(nz(5)).allow_burst(nz(2));
    let sink = Recorder::default();
    let config = Config {
        global: vec![global],
        per_key: per_key.to_vec(),
        max_per_key: 6,
        max_total: 20,
        overflow: if drop_oldest {
            Overflow::DropOldest
        } else {
            Overflow::RejectNewest
        },
        ..Config::default()
    };
    let (queue, _dead) = SendQueue::new(sink.clone(), config);
    let mut accepted = Vec::new();
    for (i, a) in arrivals.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(u64::from(a.after_ms))).await;
        let key = format!("k{}", a.key);
        // Some answers are 429s, for the key or for everybody.
        if a.answer == 0 {
            sink.then(
                Some(&key),
                SendOutcome::RateLimited {
                    retry_after: Duration::from_millis(700),
                    scope: Scope::Key,
                },
            );
        } else if a.answer == 1 {
            sink.then(
                Some(&key),
                SendOutcome::RateLimited {
                    retry_after: Duration::from_millis(300),
                    scope: Scope::Global,
                },
            );
        }
        if let Ok(receipt) = queue.submit(key.clone(), i as u32).await {
            accepted.push((i as u32, key, receipt));
        }
    }
    let mut sent_ids = HashSet::new();
    let mut dropped = HashSet::new();
    for (id, _, receipt) in accepted.iter_mut() {
        match receipt.await {
            Delivery::Sent { .. } => assert!(sent_ids.insert(*id)),
            Delivery::Dead(DeadReason::Overflow) => assert!(drop_oldest && dropped.insert(*id)),
            other => panic!("message {id}: {other:?}"),
        }
    }

    let calls = sink.calls();
    let delivered: Vec<_> = calls.iter().filter(|c| !c.key.ends_with('!')).collect();
    let ids: Vec<u32> = delivered.iter().map(|c| c.msg).collect();
    assert_eq!(ids.len(), sent_ids.len(), "no message sent twice");
    assert_eq!(ids.iter().copied().collect::<HashSet<_>>(), sent_ids);
    let all_accepted: HashSet<u32> = accepted.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(
        &sent_ids | &dropped,
        all_accepted,
        "every accepted message sent or dropped by policy"
    );

    // Every attempt spends tokens, the refused ones too.
    let attempts: Vec<Instant> = calls.iter().map(|c| c.at).collect();
    check_quota(&attempts, global, "global");
    let mut by_key: BTreeMap<String, Vec<&crate::support::Sent>> = BTreeMap::new();
    for c in &calls {
        by_key
            .entry(c.key.trim_end_matches('!').to_owned())
            .or_default()
            .push(c);
    }
    for (key, calls) in by_key {
        let at: Vec<Instant> = calls.iter().map(|c| c.at).collect();
        for q in per_key {
            check_quota(&at, q, &key);
        }
        let order: Vec<u32> = calls
            .iter()
            .filter(|c| !c.key.ends_with('!'))
            .map(|c| c.msg)
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "FIFO within {key}: {order:?}"
        );
    }
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn quotas_hold_and_nothing_is_lost(arrivals in arrivals(), drop_oldest in any::<bool>()) {
        paused_runtime().block_on(run(arrivals, drop_oldest));
    }
}
