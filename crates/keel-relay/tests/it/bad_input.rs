//! Every error code, with the connection kept; abuse closed with 1008.

use serde_json::json;

use crate::support::*;

async fn expect_error(ws: &mut RawWs, code: &str) -> serde_json::Value {
    let e = ws.next_json().await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["code"], code, "{e}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    e
}

async fn still_up(ws: &mut RawWs) {
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(ws.next_json().await["type"], "pong");
}

#[tokio::test]
async fn bad_input_battery() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            config: Some(
                "[limits]\npublish_rate = 1\npublish_burst = 5\nmax_subscriptions = 3\nmax_errors = 30\n"
                    .into(),
            ),
            ..Default::default()
        },
    )
    .await;
    let mut ws = RawWs::connect(&relay.url()).await;

    // Before hello.
    ws.send(json!({"type": "publish", "channel": "c", "id": "early", "payload": 1}))
        .await;
    expect_error(&mut ws, "invalid_state").await;
    ws.send(json!({"type": "hello", "token": "nosuchsession.0000000000000000000000000000000000000000000000000000000000000000"})).await;
    expect_error(&mut ws, "unauthorized").await;
    ws.send(json!({"type": "hello", "token": "garbage"})).await;
    expect_error(&mut ws, "unauthorized").await;
    still_up(&mut ws).await;

    ws.send(json!({"type": "hello"})).await;
    let welcome = ws.next_json().await;
    assert_eq!(welcome["type"], "welcome");
    let me = welcome["session_id"].as_str().unwrap().to_owned();

    ws.send_text("this is not json".into()).await;
    expect_error(&mut ws, "bad_json").await;
    ws.send_text("[1, 2, 3]".into()).await;
    expect_error(&mut ws, "bad_json").await;
    ws.send(json!({"type": "teleport", "id": "t-1"})).await;
    let e = expect_error(&mut ws, "unknown_type").await;
    assert_eq!(e["ref"], "t-1");
    ws.send(json!({"type": "publish", "channel": "c", "id": "no-payload"}))
        .await;
    expect_error(&mut ws, "bad_request").await;
    ws.send(json!({"type": "publish", "channel": "bad channel!", "id": "x", "payload": 1}))
        .await;
    expect_error(&mut ws, "bad_request").await;
    let big = "y".repeat(1024 * 1024 + 10);
    ws.send(json!({"type": "publish", "channel": "c", "id": "huge", "payload": big}))
        .await;
    expect_error(&mut ws, "too_large").await;
    ws.send(json!({"type": "subscribe", "channel": "session:someone-else"}))
        .await;
    expect_error(&mut ws, "forbidden").await;
    ws.send(json!({"type": "hello"})).await;
    expect_error(&mut ws, "invalid_state").await;
    // The private channel is one subscription; two more reach the limit of 3.
    for c in ["a", "b"] {
        ws.send(json!({"type": "subscribe", "channel": c})).await;
    }
    ws.send(json!({"type": "subscribe", "channel": "d"})).await;
    expect_error(&mut ws, "limit_exceeded").await;
    still_up(&mut ws).await;

    // Over the publish rate: a burst of 5 accepted, the rest refused (one
    // token a second refills: far slower than these eight frames).
    for i in 0..8 {
        ws.send(
            json!({"type": "publish", "channel": "rated", "id": format!("r-{i}"), "payload": i}),
        )
        .await;
    }
    let (mut published, mut limited) = (0, 0);
    for _ in 0..8 {
        let f = ws.next_json().await;
        match (f["type"].as_str(), f["code"].as_str()) {
            (Some("published"), _) => published += 1,
            (Some("error"), Some("rate_limited")) => limited += 1,
            other => panic!("unexpected {other:?}: {f}"),
        }
    }
    assert_eq!((published, limited), (5, 3));
    still_up(&mut ws).await;

    // Nothing from the refused frames was stored.
    let mut reader = client(&relay.url()).await;
    for c in ["c", "bad channel!", &format!("session:{me}")] {
        if keel_relay::protocol::valid_channel(c) {
            reader.subscribe(c, Some(1)).await.ok();
        }
    }
    reader.subscribe("rated", Some(1)).await.unwrap();
    let got = collect(&mut reader, "rated", 8, std::time::Duration::from_secs(3)).await;
    assert_eq!(got.len(), 5, "only the accepted publishes");
    let c = collect(&mut reader, "c", 1, std::time::Duration::from_millis(500)).await;
    assert!(c.is_empty(), "nothing from refused publishes: {c:?}");

    // Repeated abuse: closed with a policy code.
    let mut abuser = RawWs::connect(&relay.url()).await;
    let code = loop {
        abuser.send_text("{".into()).await;
        match abuser.next().await {
            Ok(f) => assert_eq!(f["code"], "bad_json"),
            Err(code) => break code,
        }
    };
    assert_eq!(code, Some(1008));
}

#[tokio::test]
async fn handshake_timeout_and_connections_per_ip() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            config: Some(
                "[limits]\nhandshake_timeout_ms = 300\nmax_connections_per_ip = 2\n".into(),
            ),
            ..Default::default()
        },
    )
    .await;
    // No hello: closed with a policy code once the handshake time is up.
    let mut silent = RawWs::connect(&relay.url()).await;
    let started = std::time::Instant::now();
    assert_eq!(silent.next().await.err(), Some(Some(1008)));
    assert!(started.elapsed() >= std::time::Duration::from_millis(250));

    // Two connections from 127.0.0.1 at most; the third is refused (429).
    let _a = client(&relay.url()).await;
    let _b = client(&relay.url()).await;
    let third = tokio_tungstenite::connect_async(relay.url()).await;
    match third {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 429)
        }
        other => panic!("expected 429, got {:?}", other.map(|_| "connected")),
    }
}
