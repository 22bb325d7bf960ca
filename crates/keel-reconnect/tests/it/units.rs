//! The state table, backoff delays, and buffer bounds (no sockets needed).

use std::time::Duration;

use keel_reconnect::{
    Backoff, BufferConfig, Config, InvalidTransition, Message, Overflow, Plain, ReconnectingClient,
    SendError, State, StateCell,
};
use rand::SeedableRng;
use rand::rngs::SmallRng;

#[test]
fn backoff_cap_60s() {
    let b = Backoff {
        jitter: false,
        ..Backoff::default()
    };
    let mut rng = SmallRng::seed_from_u64(0);
    let delays: Vec<u64> = (1..=10).map(|n| b.delay(n, &mut rng).as_secs()).collect();
    assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
    let jittered = Backoff::default();
    let draw = |seed| {
        let mut rng = SmallRng::seed_from_u64(seed);
        (1..=10)
            .map(|n| jittered.delay(n, &mut rng))
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(1), draw(1));
    for (n, d) in draw(1).into_iter().enumerate() {
        assert!(d <= Duration::from_secs((1u64 << n).min(60)));
    }
}

#[test]
fn invalid_transition_rejected() {
    let cell = StateCell::new();
    assert_eq!(
        cell.set(State::Connected),
        Err(InvalidTransition {
            from: State::Connecting,
            to: State::Connected
        }),
        "Connected needs Resuming first"
    );
    assert_eq!(
        cell.get(),
        State::Connecting,
        "a rejected transition changes nothing"
    );
    cell.set(State::Resuming).unwrap();
    cell.set(State::Connected).unwrap();
    assert!(
        cell.set(State::Backoff {
            attempt: 1,
            delay: Duration::ZERO,
            until: tokio::time::Instant::now()
        })
        .is_err()
    );
    cell.set(State::Closed {
        reason: "done".into(),
    })
    .unwrap();
    for to in [
        State::Connecting,
        State::Resuming,
        State::Connected,
        State::Disconnected {
            reason: String::new(),
        },
    ] {
        assert!(cell.set(to).is_err(), "Closed is terminal");
    }
}

/// A client that never connects: its buffer only fills.
fn offline(buffer: BufferConfig) -> ReconnectingClient {
    let config = Config {
        buffer,
        backoff: Backoff {
            base: Duration::from_secs(3600),
            ..Backoff::default()
        },
        ..Config::default()
    };
    ReconnectingClient::start("ws://127.0.0.1:1/".to_string(), Plain, config).0
}

fn bytes(n: usize) -> Message {
    Message::binary(vec![0u8; n])
}

#[tokio::test]
async fn buffer_overflow_policy() {
    // By count, reject.
    let c = offline(BufferConfig {
        max_messages: 5,
        max_bytes: 1 << 20,
        overflow: Overflow::Reject,
    });
    for _ in 0..5 {
        c.send(bytes(10), None).await.unwrap();
    }
    assert_eq!(
        c.send(bytes(10), None).await.unwrap_err(),
        SendError::Full {
            messages: 5,
            bytes: 50
        }
    );

    // By bytes, reject.
    let c = offline(BufferConfig {
        max_messages: 100,
        max_bytes: 100,
        overflow: Overflow::Reject,
    });
    for _ in 0..3 {
        c.send(bytes(30), None).await.unwrap();
    }
    assert_eq!(
        c.send(bytes(30), None).await.unwrap_err(),
        SendError::Full {
            messages: 3,
            bytes: 90
        }
    );
    assert_eq!(
        c.send(bytes(101), None).await.unwrap_err(),
        SendError::TooLarge(101)
    );
    assert_eq!(c.buffered(), (3, 90));

    // Drop oldest: the first two handles learn they were dropped.
    let c = offline(BufferConfig {
        max_messages: 5,
        max_bytes: 1 << 20,
        overflow: Overflow::DropOldest,
    });
    let mut handles = Vec::new();
    for _ in 0..7 {
        handles.push(c.send(bytes(10), None).await.unwrap());
    }
    let mut outcomes = Vec::new();
    for h in handles.drain(..2) {
        outcomes.push(h.acked().await);
    }
    assert_eq!(outcomes, [Err(SendError::Dropped), Err(SendError::Dropped)]);
    assert_eq!(c.buffered(), (5, 50));

    // Backpressure: the sixth send waits.
    let c = offline(BufferConfig {
        max_messages: 5,
        max_bytes: 1 << 20,
        overflow: Overflow::Backpressure,
    });
    for _ in 0..5 {
        c.send(bytes(10), None).await.unwrap();
    }
    let waited = tokio::time::timeout(Duration::from_millis(100), c.send(bytes(10), None)).await;
    assert!(waited.is_err(), "a full buffer holds the sender back");

    // Closing fails what is buffered.
    let c = offline(BufferConfig::default());
    let h = c.send(bytes(10), None).await.unwrap();
    c.close().await;
    assert!(matches!(h.acked().await, Err(SendError::Closed(_))));
}
