//! Token buckets: bursts, sustained load, several quotas per decision.

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use governor::RateLimiter;
use keel_ratelimit::{Config, Delivery, Quota, SendOutcome, SendQueue, Sink, TokioClock};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::time::Instant;

use crate::support::{Recorder, check_quota, nz, run_for};

#[tokio::test(start_paused = true)]
async fn burst_handling() {
    let sink = Recorder::default();
    let quota = Quota::per_minute(nz(30)).allow_burst(nz(5));
    let config = Config {
        global: vec![quota],
        ..Config::default()
    };
    let (queue, _dead) = SendQueue::new(sink.clone(), config);
    let t0 = Instant::now();
    let mut receipts = Vec::new();
    for i in 0..10 {
        receipts.push(queue.submit("chat".into(), i).await.unwrap());
    }
    run_for(Duration::from_millis(1)).await;
    assert_eq!(sink.calls().len(), 5, "the burst of 5 goes at once");
    assert_eq!(queue.metrics().queued, 5, "the other 5 wait");

    for r in join_all(receipts).await {
        assert_eq!(r, Delivery::Sent { attempts: 1 });
    }
    let offsets: Vec<Duration> = sink.calls().iter().map(|s| s.at - t0).collect();
    let secs = Duration::from_secs;
    assert_eq!(
        offsets,
        [0, 0, 0, 0, 0, 2, 4, 6, 8, 10].map(secs),
        "then one every 2 s, exactly"
    );
    let msgs: Vec<u32> = sink.calls().iter().map(|s| s.msg).collect();
    assert_eq!(msgs, (0..10).collect::<Vec<_>>(), "FIFO");
}

/// A fake API that enforces the same limit with its own governor bucket and
/// answers 429 when a send comes too early.
#[derive(Clone)]
struct StrictApi {
    limiter: std::sync::Arc<
        RateLimiter<
            governor::state::NotKeyed,
            governor::state::InMemoryState,
            TokioClock,
            governor::middleware::NoOpMiddleware<keel_ratelimit::TokioInstant>,
        >,
    >,
    seen: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
    refused: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl Sink<String, u32> for StrictApi {
    async fn send(&self, _key: &String, msg: &u32) -> SendOutcome {
        if self.limiter.check().is_err() {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return SendOutcome::RateLimited {
                retry_after: Duration::from_secs(2),
                scope: keel_ratelimit::Scope::Global,
            };
        }
        self.seen.lock().unwrap().push(*msg);
        SendOutcome::Sent
    }
}

#[tokio::test(start_paused = true)]
async fn sustained_load() {
    let quota = Quota::per_minute(nz(30)).allow_burst(nz(5));
    let api = StrictApi {
        limiter: std::sync::Arc::new(RateLimiter::direct_with_clock(quota, TokioClock)),
        seen: Default::default(),
        refused: Default::default(),
    };
    let config = Config {
        global: vec![quota],
        ..Config::default()
    };
    let (queue, _dead) = SendQueue::new(api.clone(), config);
    // 100 messages arrive over 2 minutes.
    let mut receipts = Vec::new();
    for i in 0..100 {
        receipts.push(queue.submit("chat".into(), i).await.unwrap());
        tokio::time::sleep(Duration::from_millis(1_200)).await;
    }
    for r in join_all(receipts).await {
        assert_eq!(r, Delivery::Sent { attempts: 1 });
    }
    assert_eq!(
        api.refused.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the API never had to say 429"
    );
    let seen = api.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        (0..100).collect::<Vec<_>>(),
        "all 100 arrived once, in order"
    );
    let m = queue.metrics();
    assert_eq!((m.sent, m.rate_limited, m.dead), (100, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn no_double_spend() {
    let per_key = [Quota::per_second(nz(1)), Quota::per_minute(nz(20))];
    let global = Quota::per_second(nz(30));
    let sink = Recorder::default();
    let config = Config {
        global: vec![global],
        per_key: per_key.to_vec(),
        max_per_key: 10_000,
        ..Config::default()
    };
    let (queue, _dead) = SendQueue::new(sink.clone(), config);
    let queue = std::sync::Arc::new(queue);
    // 16 submitters, 2,000 messages to 40 keys, arriving in seeded bursts.
    let submitters = (0..16u64).map(|s| {
        let queue = queue.clone();
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(s);
            let mut receipts = Vec::new();
            for i in 0..125u32 {
                let key = format!("k{}", rng.random_range(0..40));
                receipts.push(queue.submit(key, s as u32 * 1_000 + i).await.unwrap());
                if rng.random_bool(0.3) {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..3_000))).await;
                }
            }
            join_all(receipts).await
        })
    });
    for r in join_all(submitters).await {
        assert!(
            r.unwrap()
                .iter()
                .all(|d| matches!(d, Delivery::Sent { .. }))
        );
    }
    let calls = sink.calls();
    assert_eq!(calls.len(), 2_000);
    let ids: HashSet<u32> = calls.iter().map(|c| c.msg).collect();
    assert_eq!(ids.len(), 2_000, "each message sent once");

    let all: Vec<Instant> = calls.iter().map(|c| c.at).collect();
    check_quota(&all, global, "global");
    for k in 0..40 {
        let key = format!("k{k}");
        let at: Vec<Instant> = calls
            .iter()
            .filter(|c| c.key == key)
            .map(|c| c.at)
            .collect();
        for q in per_key {
            check_quota(&at, q, &key);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn idle_key_eviction() {
    let sink = Recorder::default();
    let config = Config {
        per_key: vec![Quota::per_minute(nz(1))],
        ..Config::default()
    };
    let (queue, _dead) = SendQueue::new(sink.clone(), config);
    let t0 = Instant::now();
    let mut receipts = Vec::new();
    for k in 0..1_000 {
        receipts.push(queue.submit(format!("k{k}"), k).await.unwrap());
    }
    join_all(receipts).await;
    assert_eq!(
        queue.metrics().keys,
        1_000,
        "state kept while buckets refill"
    );

    // Half-way through the refill, k0 sends again: its state must still be
    // there, or the new message would go early.
    run_for(Duration::from_secs(30)).await;
    let again = queue.submit("k0".into(), 5_000).await.unwrap();
    assert_eq!(again.await, Delivery::Sent { attempts: 1 });
    let last = sink.calls().last().cloned().unwrap();
    assert_eq!((last.msg, last.at - t0), (5_000, Duration::from_secs(60)));

    run_for(Duration::from_secs(61)).await;
    let m = queue.metrics();
    assert_eq!(m.keys, 0, "every idle key with full buckets is forgotten");
    assert_eq!(m.sent, 1_001);
}
