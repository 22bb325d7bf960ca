//! The mock upstream: rate limit with 429s, duplicates, early sends, modes, pushes.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use keel_faults::{MockUpstream, UpstreamConfig, UpstreamMode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(up: &MockUpstream) -> Ws {
    tokio_tungstenite::connect_async(up.url()).await.unwrap().0
}

async fn send(ws: &mut Ws, id: &str, to: &str) -> Value {
    let frame = json!({"type": "send", "id": id, "to": to, "body": "hi"});
    ws.send(Message::text(frame.to_string())).await.unwrap();
    next_json(ws, Duration::from_secs(2))
        .await
        .expect("an answer")
}

async fn next_json(ws: &mut Ws, within: Duration) -> Option<Value> {
    loop {
        let frame = tokio::time::timeout(within, ws.next()).await.ok()??.ok()?;
        if let Message::Text(t) = frame {
            return Some(serde_json::from_str(t.as_str()).unwrap_or(Value::String(t.to_string())));
        }
    }
}

async fn start(config: UpstreamConfig) -> MockUpstream {
    MockUpstream::start(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_429_exactly_when_the_limit_is_exceeded() {
    let up = start(UpstreamConfig {
        global_rate: 2.0,
        global_burst: 5.0,
        ..Default::default()
    })
    .await;
    let mut ws = connect(&up).await;
    for i in 0..5 {
        assert_eq!(
            send(&mut ws, &format!("m{i}"), "alice").await["type"],
            "ok",
            "within the burst"
        );
    }
    let refused = send(&mut ws, "m5", "alice").await;
    assert_eq!(refused["type"], "rate_limited");
    assert_eq!(refused["scope"], "global");
    let wait = refused["retry_after_ms"].as_u64().unwrap();
    assert!(
        (400..=500).contains(&wait),
        "one token at 2/s is <= 500 ms away: {wait}"
    );
    assert_eq!(up.rate_limited(), 1);

    // Honouring the Retry-After: accepted and not early.
    tokio::time::sleep(Duration::from_millis(wait)).await;
    assert_eq!(send(&mut ws, "m5", "alice").await["type"], "ok");
    assert!(up.early_sends().is_empty());
    assert_eq!(up.accepted().len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_duplicates_and_early_sends() {
    let up = start(UpstreamConfig {
        global_rate: 100.0,
        global_burst: 100.0,
        recipient_rate: Some(1.0),
        recipient_burst: 1.0,
        ..Default::default()
    })
    .await;
    let mut ws = connect(&up).await;
    assert_eq!(send(&mut ws, "a1", "bob").await["type"], "ok");
    assert_eq!(
        send(&mut ws, "a1", "bob").await["type"],
        "ok",
        "an idempotency key answers ok again"
    );
    assert_eq!(up.duplicates(), ["a1"]);
    assert_eq!(up.accepted().len(), 1);

    let limited = send(&mut ws, "a2", "bob").await;
    assert_eq!(
        (limited["type"].as_str(), limited["scope"].as_str()),
        (Some("rate_limited"), Some("recipient"))
    );
    // Sending again at once ignores the Retry-After: recorded as early.
    let again = send(&mut ws, "a2", "bob").await;
    assert_eq!(again["type"], "rate_limited");
    let early = up.early_sends();
    assert_eq!(early.len(), 1);
    assert_eq!(early[0].id, "a2");
    assert!(early[0].early_by > Duration::from_millis(500));
    // Another recipient is not limited by bob's bucket.
    assert_eq!(send(&mut ws, "c1", "carol").await["type"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_switch_at_run_time() {
    let up = start(UpstreamConfig::default()).await;
    let mut ws = connect(&up).await;

    up.set_mode(UpstreamMode::Stall);
    ws.send(Message::text(
        json!({"type":"send","id":"s","to":"x"}).to_string(),
    ))
    .await
    .unwrap();
    assert!(
        next_json(&mut ws, Duration::from_millis(300))
            .await
            .is_none(),
        "a stalled upstream never answers"
    );

    up.set_mode(UpstreamMode::Garbage);
    ws.send(Message::text(
        json!({"type":"send","id":"g","to":"x"}).to_string(),
    ))
    .await
    .unwrap();
    let junk = next_json(&mut ws, Duration::from_secs(1)).await.unwrap();
    assert_eq!(
        junk,
        Value::String("{not json".into()),
        "garbage is not JSON"
    );

    up.set_mode(UpstreamMode::Slow(Duration::from_millis(300)));
    let started = std::time::Instant::now();
    assert_eq!(send(&mut ws, "slow", "x").await["type"], "ok");
    assert!(started.elapsed() >= Duration::from_millis(290));

    up.set_mode(UpstreamMode::Down);
    let closed = tokio::time::timeout(Duration::from_secs(1), ws.next())
        .await
        .unwrap();
    assert!(
        !matches!(closed, Some(Ok(Message::Text(_)))),
        "the open connection is dropped: {closed:?}"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        tokio_tungstenite::connect_async(up.url()).await.is_err(),
        "down refuses connections"
    );

    up.set_mode(UpstreamMode::Normal);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut ws = connect(&up).await;
    assert_eq!(send(&mut ws, "back", "x").await["type"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_inbound_messages() {
    let up = start(UpstreamConfig::default()).await;
    let mut a = connect(&up).await;
    let mut b = connect(&up).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(up.push("dave", "alice", json!({"text": "hello"})), 2);
    for ws in [&mut a, &mut b] {
        let m = next_json(ws, Duration::from_secs(1)).await.unwrap();
        assert_eq!(
            m,
            json!({"type": "message", "id": "m-1", "from": "dave", "to": "alice", "body": {"text": "hello"}})
        );
    }
    assert_eq!(up.connections(), 2);
}
