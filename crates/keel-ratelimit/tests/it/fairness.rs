//! Round-robin fairness and cancellation safety.

use std::sync::Arc;
use std::time::Duration;

use keel_ratelimit::{Config, Delivery, Overflow, Quota, SendQueue};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::support::{Recorder, nz, run_for};

#[tokio::test(start_paused = true)]
async fn fairness() {
    let sink = Recorder::default();
    let global = Quota::per_second(nz(10));
    let config = Config {
        global: vec![global],
        max_per_key: 20_000,
        max_total: 20_000,
        ..Config::default()
    };
    let (queue, _dead) = SendQueue::new(sink.clone(), config);
    for i in 0..10_000 {
        queue.submit("hot".into(), i).await.unwrap();
    }
    run_for(Duration::from_millis(5_050)).await;
    let submitted = Instant::now();
    let cold = queue.submit("cold".into(), 1).await.unwrap();
    assert_eq!(cold.await, Delivery::Sent { attempts: 1 });
    let sent = sink
        .calls()
        .into_iter()
        .find(|c| c.key == "cold")
        .unwrap()
        .at;
    assert!(
        sent - submitted <= global.replenish_interval(),
        "the cold key waited {:?}, more than one global token interval",
        sent - submitted
    );
    assert!(
        queue.depth(&"hot".to_string()) > 9_000,
        "the hot key is still backlogged"
    );
}

#[tokio::test(start_paused = true)]
async fn round_robin_across_keys_fifo_within() {
    let sink = Recorder::default();
    let config = Config {
        global: vec![Quota::per_second(nz(1))],
        ..Config::default()
    };
    let (queue, _dead) = SendQueue::new(sink.clone(), config);
    let mut receipts = Vec::new();
    for key in ["a", "b", "c"] {
        for i in 0..3 {
            receipts.push(queue.submit(key.into(), i).await.unwrap());
        }
    }
    futures::future::join_all(receipts).await;
    let order: Vec<(String, u32)> = sink.calls().into_iter().map(|c| (c.key, c.msg)).collect();
    assert_eq!(order.len(), 9);
    // Each key gets a turn before any key gets another (newly active keys first).
    for round in order.chunks(3) {
        let mut keys: Vec<&str> = round.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["a", "b", "c"], "{order:?}");
    }
    for key in ["a", "b", "c"] {
        let msgs: Vec<u32> = order
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, m)| *m)
            .collect();
        assert_eq!(msgs, [0, 1, 2], "FIFO within {key}");
    }
}

#[tokio::test(start_paused = true)]
async fn cancel_safety() {
    let gate = Arc::new(Semaphore::new(0));
    let sink = Recorder::gated(gate.clone());
    let config = Config {
        max_total: 1,
        overflow: Overflow::Wait {
            timeout: Duration::from_secs(60),
        },
        global: vec![Quota::per_second(nz(1))],
        ..Config::default()
    };
    let (queue, _dead) = SendQueue::new(sink.clone(), config);
    let queue = Arc::new(queue);
    let start = Instant::now();
    let first = queue.submit("k".into(), 0).await.unwrap();

    // Three submitters wait in line; the middle one gives up.
    let spawn = |msg: u32| {
        let queue = queue.clone();
        tokio::spawn(async move { queue.submit("k".into(), msg).await })
    };
    let a = spawn(1);
    run_for(Duration::from_millis(10)).await;
    let b = spawn(2);
    run_for(Duration::from_millis(10)).await;
    let c = spawn(3);
    run_for(Duration::from_millis(10)).await;
    b.abort();
    assert!(b.await.unwrap_err().is_cancelled());

    gate.add_permits(100);
    first.await;
    let a = a.await.unwrap().unwrap();
    a.await;
    let c = c.await.unwrap().unwrap();
    c.await;

    let calls = sink.calls();
    let msgs: Vec<u32> = calls.iter().map(|s| s.msg).collect();
    assert_eq!(
        msgs,
        [0, 1, 3],
        "the cancelled message never entered; the others kept their order"
    );
    // No token went to the cancelled submitter: 1 and 3 take the next two
    // token instants after 0's.
    assert_eq!(calls[1].at - start, Duration::from_secs(1));
    assert_eq!(calls[2].at - start, Duration::from_secs(2));
}
