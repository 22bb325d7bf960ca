//! Bounds and overflow policies.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use keel_ratelimit::{Bound, Config, DeadReason, Delivery, Overflow, SendQueue, SubmitError};
use tokio::sync::Semaphore;

use crate::support::Recorder;

/// Collects log output so a test can read what was logged.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn queue_overflow_drop_oldest() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // The sink is closed until the test opens it, so all 20 stay queued.
    let gate = Arc::new(Semaphore::new(0));
    let sink = Recorder::gated(gate.clone());
    let config = Config {
        max_per_key: 10,
        overflow: Overflow::DropOldest,
        ..Config::default()
    };
    let (queue, mut dead) = SendQueue::new(sink.clone(), config);
    let mut receipts = Vec::new();
    for i in 0..20 {
        receipts.push(queue.submit("chat".into(), i).await.unwrap());
    }
    assert_eq!(queue.metrics().dropped, 10);
    gate.add_permits(100);
    let outcomes = join_all(receipts).await;
    for (i, outcome) in outcomes.iter().enumerate() {
        let want = if i < 10 {
            Delivery::Dead(DeadReason::Overflow)
        } else {
            Delivery::Sent { attempts: 1 }
        };
        assert_eq!(*outcome, want, "message {i}");
    }
    let sent: Vec<u32> = sink.calls().iter().map(|c| c.msg).collect();
    assert_eq!(
        sent,
        (10..20).collect::<Vec<_>>(),
        "the newest 10, in order"
    );
    let mut dropped = Vec::new();
    while let Ok(letter) = dead.try_recv() {
        assert_eq!(letter.reason, DeadReason::Overflow);
        dropped.push(letter.msg);
    }
    assert_eq!(
        dropped,
        (0..10).collect::<Vec<_>>(),
        "the oldest 10, handed to the dead letters"
    );
    let m = queue.metrics();
    assert_eq!((m.dropped, m.dead, m.sent), (10, 10, 10));

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let warnings: Vec<_> = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("dropped the oldest"))
        .collect();
    assert_eq!(warnings.len(), 10, "{text}");
    assert!(
        warnings[9].contains("key=\"chat\"") && warnings[9].contains("dropped=10"),
        "{}",
        warnings[9]
    );
}

#[tokio::test(start_paused = true)]
async fn queue_overflow_reject() {
    let gate = Arc::new(Semaphore::new(0));
    let sink = Recorder::gated(gate.clone());
    let config = Config {
        max_per_key: 10,
        max_total: 15,
        ..Config::default()
    };
    let (queue, _dead) = SendQueue::new(sink.clone(), config);
    let mut accepted = Vec::new();
    for i in 0..20 {
        match queue.submit("a".into(), i).await {
            Ok(r) => accepted.push(r),
            Err(e) => assert_eq!(
                e,
                SubmitError::Full {
                    msg: i,
                    bound: Bound::Key
                },
                "message {i}"
            ),
        }
    }
    assert_eq!(accepted.len(), 10);
    for i in 0..8 {
        match queue.submit("b".into(), 100 + i).await {
            Ok(r) => accepted.push(r),
            Err(e) => assert_eq!(
                e,
                SubmitError::Full {
                    msg: 100 + i,
                    bound: Bound::Total
                },
                "message b{i}"
            ),
        }
    }
    assert_eq!(accepted.len(), 15, "the total bound holds across keys");
    gate.add_permits(100);
    join_all(accepted).await;
    assert_eq!(sink.calls().len(), 15);
    // Room again once they are sent.
    assert!(queue.submit("a".into(), 99).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn wait_policy_times_out_and_admits_in_order() {
    let gate = Arc::new(Semaphore::new(0));
    let sink = Recorder::gated(gate.clone());
    let config = Config {
        max_total: 1,
        overflow: Overflow::Wait {
            timeout: Duration::from_secs(5),
        },
        ..Config::default()
    };
    let (queue, _dead) = SendQueue::new(sink.clone(), config);
    let first = queue.submit("a".into(), 1).await.unwrap();
    let started = tokio::time::Instant::now();
    assert_eq!(
        queue.submit("a".into(), 2).await.unwrap_err(),
        SubmitError::Timeout { msg: 2 }
    );
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    gate.add_permits(10);
    first.await;
    assert!(queue.submit("a".into(), 3).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn close_drains_then_refuses() {
    let sink = Recorder::default();
    let config = Config {
        global: vec![keel_ratelimit::Quota::per_second(crate::support::nz(2))],
        ..Config::default()
    };
    let (queue, _dead) = SendQueue::new(sink.clone(), config);
    for i in 0..10 {
        queue.submit("a".into(), i).await.unwrap();
    }
    queue.close().await;
    assert_eq!(sink.calls().len(), 10, "close waits for the queue to drain");
    assert_eq!(
        queue.submit("a".into(), 11).await.unwrap_err(),
        SubmitError::Closed { msg: 11 }
    );
}
