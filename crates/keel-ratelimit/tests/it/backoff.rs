//! Rate-limit answers, backoff and dead letters.

use std::time::Duration;

use keel_ratelimit::{
    Backoff, Config, DeadReason, Delivery, Metrics, Scope, SendOutcome, SendQueue,
};
use tokio::time::Instant;

use crate::support::{Recorder, run_for};

fn failing(n: usize, sink: &Recorder) {
    for _ in 0..n {
        sink.then(
            None,
            SendOutcome::Failed {
                retryable: true,
                error: "503".into(),
            },
        );
    }
}

async fn attempt_gaps(jitter: bool, seed: u64) -> Vec<Duration> {
    let sink = Recorder::default();
    failing(8, &sink);
    let config = Config {
        backoff: Backoff {
            jitter,
            ..Backoff::default()
        },
        seed,
        ..Config::default()
    };
    let (queue, _dead) = SendQueue::new(sink.clone(), config);
    let receipt = queue.submit("a".into(), 1).await.unwrap();
    assert_eq!(receipt.await, Delivery::Sent { attempts: 9 });
    let at: Vec<Instant> = sink.calls().iter().map(|c| c.at).collect();
    at.windows(2).map(|w| w[1] - w[0]).collect()
}

#[tokio::test(start_paused = true)]
async fn exponential_backoff_on_rejection() {
    let gaps = attempt_gaps(false, 0).await;
    assert_eq!(
        gaps,
        [1, 2, 4, 8, 16, 32, 60, 60].map(Duration::from_secs),
        "1 s doubling, capped at 60 s"
    );

    let jittered = attempt_gaps(true, 42).await;
    for (gap, ceiling) in jittered.iter().zip([1, 2, 4, 8, 16, 32, 60, 60]) {
        assert!(
            *gap <= Duration::from_secs(ceiling),
            "{gap:?} > {ceiling} s"
        );
    }
    assert_eq!(
        jittered,
        attempt_gaps(true, 42).await,
        "seeded jitter repeats"
    );
    assert_ne!(jittered, attempt_gaps(true, 43).await);
}

#[tokio::test(start_paused = true)]
async fn backoff_is_visible_and_budget_ends_in_dead_letter() {
    let sink = Recorder::default();
    failing(100, &sink);
    let config = Config {
        backoff: Backoff {
            jitter: false,
            max_attempts: 3,
            ..Backoff::default()
        },
        ..Config::default()
    };
    let (queue, mut dead) = SendQueue::new(sink.clone(), config);
    let receipt = queue.submit("a".into(), 7).await.unwrap();
    run_for(Duration::from_millis(1_500)).await;
    assert_eq!(
        queue.backoff(&"a".to_string()),
        Some(Duration::from_secs(2))
    );
    assert_eq!(queue.metrics().max_backoff, Some(Duration::from_secs(2)));
    let expected = DeadReason::Exhausted {
        attempts: 3,
        last_error: "503".into(),
    };
    assert_eq!(receipt.await, Delivery::Dead(expected.clone()));
    let letter = dead.recv().await.unwrap();
    assert_eq!(
        (letter.key.as_str(), letter.msg, letter.reason),
        ("a", 7, expected)
    );
    let m = queue.metrics();
    assert_eq!((m.failed, m.dead, m.sent), (3, 1, 0));

    queue.reset();
    assert_eq!(
        queue.metrics(),
        Metrics {
            keys: m.keys,
            ..Metrics::default()
        }
    );
}

/// A try the sink could not make (its link down) is retried after its
/// delay and not counted: many of them between failures do not use up
/// `max_attempts`, and the failures still do.
#[tokio::test(start_paused = true)]
async fn unavailable_tries_do_not_use_up_attempts() {
    let sink = Recorder::default();
    let down = || SendOutcome::Unavailable {
        retry_after: Duration::from_millis(100),
    };
    let failed = || SendOutcome::Failed {
        retryable: true,
        error: "503".into(),
    };
    // Two failures, each between runs of tries on a dead link, then sent.
    for outcome in (0..20)
        .map(|_| down())
        .chain([failed()])
        .chain((0..20).map(|_| down()))
        .chain([failed()])
        .chain((0..5).map(|_| down()))
    {
        sink.then(None, outcome);
    }
    let (queue, _dead) = SendQueue::new(sink.clone(), config_with_attempts(3));
    let receipt = queue.submit("a".into(), 7).await.unwrap();
    assert_eq!(receipt.await, Delivery::Sent { attempts: 48 });
    let m = queue.metrics();
    assert_eq!((m.unavailable, m.failed, m.sent, m.dead), (45, 2, 1, 0));
    let at: Vec<Instant> = sink.calls().iter().map(|c| c.at).collect();
    assert_eq!(
        at[1] - at[0],
        Duration::from_millis(100),
        "an unavailable try waits its retry_after"
    );
    assert_eq!(
        at[21] - at[20],
        Duration::from_secs(1),
        "a failure backs off as the first"
    );

    // The same failures without the unavailable tries in between: the
    // third one is the last attempt.
    let sink = Recorder::default();
    for _ in 0..30 {
        sink.then(None, down());
    }
    failing(3, &sink);
    let (queue, _dead) = SendQueue::new(sink.clone(), config_with_attempts(3));
    let receipt = queue.submit("a".into(), 8).await.unwrap();
    assert!(matches!(
        receipt.await,
        Delivery::Dead(DeadReason::Exhausted { attempts: 33, .. })
    ));
}

/// Tries that use no attempt still end: a message whose every try finds
/// no link (or loses it) is a dead letter once `give_up_after` has passed
/// since its first try, and time queued before that try does not count.
/// Without the budget the same script keeps it retrying.
#[tokio::test(start_paused = true)]
async fn give_up_after_bounds_tries_that_use_no_attempt() {
    let down = || SendOutcome::Unavailable {
        retry_after: Duration::from_millis(500),
    };
    let budget = Duration::from_secs(30);
    let with_budget = |budget| Config {
        give_up_after: budget,
        ..config_with_attempts(3)
    };

    let sink = Recorder::default();
    for _ in 0..10_000 {
        sink.then(Some("a"), down());
    }
    let (queue, mut dead) = SendQueue::new(sink.clone(), with_budget(Some(budget)));
    let first = queue.submit("a".into(), 1).await.unwrap();
    let Delivery::Dead(DeadReason::TimedOut {
        attempts,
        elapsed,
        last_error,
    }) = first.await
    else {
        panic!("expected a timed-out dead letter");
    };
    assert!(
        elapsed >= budget && elapsed < budget + Duration::from_secs(1),
        "{elapsed:?}"
    );
    assert_eq!(attempts, 61, "a try every 500 ms for 30 s, the first at 0");
    assert!(last_error.contains("unavailable"), "{last_error}");
    assert_eq!(dead.recv().await.unwrap().msg, 1);
    assert_eq!(queue.metrics().unavailable, 61);

    // Failures that back off count against the same clock, and a message
    // that waited for its turn starts its own: one try per 10 s for the
    // key, so the second message's first try comes after the first's last.
    let sink = Recorder::default();
    for _ in 0..2 {
        sink.then(
            Some("b"),
            SendOutcome::Failed {
                retryable: true,
                error: "503".into(),
            },
        );
    }
    for _ in 0..10_000 {
        sink.then(Some("b"), down());
    }
    let config = Config {
        per_key: vec![keel_ratelimit::Quota::with_period(Duration::from_secs(10)).unwrap()],
        ..with_budget(Some(budget))
    };
    let (queue, _dead) = SendQueue::new(sink.clone(), config);
    let one = queue.submit("b".into(), 1).await.unwrap();
    let two = queue.submit("b".into(), 2).await.unwrap();
    let (one, two) = tokio::join!(one, two);
    let Delivery::Dead(DeadReason::TimedOut { elapsed, .. }) = one else {
        panic!("expected a timed-out dead letter, got {one:?}");
    };
    assert!(
        elapsed >= budget && elapsed < budget + Duration::from_secs(1),
        "{elapsed:?}"
    );
    let Delivery::Dead(DeadReason::TimedOut { elapsed, .. }) = two else {
        panic!("expected a timed-out dead letter, got {two:?}");
    };
    assert!(
        elapsed >= budget && elapsed < budget + Duration::from_secs(11),
        "{elapsed:?}"
    );
    let tries_of = |msg| {
        sink.calls()
            .iter()
            .filter(|c| c.msg == msg)
            .map(|c| c.at)
            .collect::<Vec<_>>()
    };
    let (t1, t2) = (tries_of(1), tries_of(2));
    assert!(t2[0] > *t1.last().unwrap(), "FIFO within the key");
    assert!(
        t2.last().unwrap().duration_since(t2[0]) >= budget - Duration::from_secs(1),
        "the second message's clock starts at its own first try"
    );

    // No budget: still retrying long after.
    let sink = Recorder::default();
    for _ in 0..10_000 {
        sink.then(Some("a"), down());
    }
    let (queue, _dead) = SendQueue::new(sink.clone(), with_budget(None));
    let mut receipt = queue.submit("a".into(), 1).await.unwrap();
    tokio::select! {
        d = &mut receipt => panic!("ended without a budget: {d:?}"),
        () = tokio::time::sleep(budget * 4) => {}
    }
    assert!(queue.metrics().unavailable > 200);
}

fn config_with_attempts(max_attempts: u32) -> Config {
    Config {
        backoff: Backoff {
            jitter: false,
            max_attempts,
            ..Backoff::default()
        },
        ..Config::default()
    }
}

#[tokio::test(start_paused = true)]
async fn non_retryable_failure_is_dead_at_once() {
    let sink = Recorder::default();
    sink.then(
        None,
        SendOutcome::Failed {
            retryable: false,
            error: "bad recipient".into(),
        },
    );
    let (queue, mut dead) = SendQueue::new(sink.clone(), Config::default());
    let receipt = queue.submit("a".into(), 1).await.unwrap();
    let reason = DeadReason::Rejected {
        error: "bad recipient".into(),
    };
    assert_eq!(receipt.await, Delivery::Dead(reason.clone()));
    assert_eq!(dead.recv().await.unwrap().reason, reason);
}

#[tokio::test(start_paused = true)]
async fn retry_after_honoured() {
    let sink = Recorder::default();
    // Longer than the backoff cap: still honoured in full.
    sink.then(
        Some("a"),
        SendOutcome::RateLimited {
            retry_after: Duration::from_secs(90),
            scope: Scope::Key,
        },
    );
    let (queue, _dead) = SendQueue::new(sink.clone(), Config::default());
    let t0 = Instant::now();
    let a = queue.submit("a".into(), 1).await.unwrap();
    run_for(Duration::from_secs(1)).await;
    let b = queue.submit("b".into(), 2).await.unwrap();
    assert_eq!(b.await, Delivery::Sent { attempts: 1 });
    assert_eq!(a.await, Delivery::Sent { attempts: 2 });
    let calls = sink.calls();
    let when = |key: &str| calls.iter().find(|c| c.key == key).map(|c| c.at - t0);
    assert_eq!(when("a!"), Some(Duration::ZERO), "first try, answered 429");
    assert_eq!(
        when("b"),
        Some(Duration::from_secs(1)),
        "another key is not frozen"
    );
    assert_eq!(
        when("a"),
        Some(Duration::from_secs(90)),
        "retried exactly at Retry-After"
    );
    assert_eq!(queue.metrics().rate_limited, 1);
}

#[tokio::test(start_paused = true)]
async fn global_retry_after_freezes_every_key() {
    let sink = Recorder::default();
    sink.then(
        Some("a"),
        SendOutcome::RateLimited {
            retry_after: Duration::from_secs(5),
            scope: Scope::Global,
        },
    );
    let (queue, _dead) = SendQueue::new(sink.clone(), Config::default());
    let t0 = Instant::now();
    let a = queue.submit("a".into(), 1).await.unwrap();
    run_for(Duration::from_millis(10)).await;
    let b = queue.submit("b".into(), 2).await.unwrap();
    b.await;
    a.await;
    for call in sink.calls().iter().filter(|c| !c.key.ends_with('!')) {
        assert!(
            call.at - t0 >= Duration::from_secs(5),
            "{call:?} sent during a global freeze"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn rate_limit_budget_ends_in_dead_letter() {
    let sink = Recorder::default();
    for _ in 0..10 {
        sink.then(
            None,
            SendOutcome::RateLimited {
                retry_after: Duration::from_secs(1),
                scope: Scope::Key,
            },
        );
    }
    let config = Config {
        max_rate_limited: Some(2),
        ..Config::default()
    };
    let (queue, _dead) = SendQueue::new(sink.clone(), config);
    let r = queue.submit("a".into(), 1).await.unwrap();
    assert_eq!(
        r.await,
        Delivery::Dead(DeadReason::RateLimited { times: 3 })
    );
}
