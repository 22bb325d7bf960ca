//! Publishing, delivery, resume, isolation.

use std::collections::HashSet;
use std::time::Duration;

use keel_relay::client::new_message_id;
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn publish_deliver_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("data"), Opts::default()).await;
    let mut sub = client(&relay.url()).await;
    sub.subscribe("room:1", Some(1)).await.unwrap();
    let publisher = client(&relay.url()).await;

    // 200 publishes, 20 in flight at a time: offsets follow commit order.
    let mut acked = Vec::new();
    for chunk in 0..10 {
        let calls = (0..20).map(|i| {
            let id = format!("m-{chunk:02}-{i:02}");
            let p = &publisher;
            async move {
                (
                    p.publish("room:1", &id, &json!({"n": i})).await.unwrap(),
                    id,
                )
            }
        });
        acked.extend(futures::future::join_all(calls).await);
    }
    let got = collect(&mut sub, "room:1", 200, Duration::from_secs(30)).await;
    assert_complete_in_order(&got, 200);
    let mut acked_sorted = acked.clone();
    acked_sorted.sort();
    assert_eq!(
        got, acked_sorted,
        "each delivery carries the acknowledged offset and id"
    );
    assert_eq!(sub.duplicates_dropped(), 0);

    // Re-publishing an id returns the original offset and delivers nothing new.
    let (offset, id) = acked[0].clone();
    assert_eq!(
        publisher
            .publish("room:1", &id, &json!({"n": 0}))
            .await
            .unwrap(),
        offset
    );
    let fresh = new_message_id();
    let next = publisher
        .publish("room:1", &fresh, &json!("last"))
        .await
        .unwrap();
    assert_eq!(next, 201);
    let more = collect(&mut sub, "room:1", 1, Duration::from_secs(10)).await;
    assert_eq!(more, vec![(201, fresh)]);
}

#[tokio::test]
async fn private_channel_isolation() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("data"), Opts::default()).await;
    let a = client(&relay.url()).await;
    let mut b = client(&relay.url()).await;
    let b_private = format!("session:{}", b.session_id().unwrap());

    // A may neither read nor write B's private channel.
    let err = a
        .publish(&b_private, "x-1", &json!("hi"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("forbidden"), "{err}");
    let mut raw = crate::support::RawWs::connect(&relay.url()).await;
    raw.send(json!({"type": "hello"})).await;
    let welcome = raw.next_json().await;
    assert_eq!(welcome["type"], "welcome");
    raw.send(json!({"type": "subscribe", "channel": b_private, "from": 1}))
        .await;
    let e = raw.next_json().await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("forbidden"))
    );
    // Nor through a resume map.
    let mut raw2 = crate::support::RawWs::connect(&relay.url()).await;
    raw2.send(json!({"type": "hello", "resume": {b_private.clone(): 0}}))
        .await;
    let welcome = raw2.next_json().await;
    assert!(welcome["catch_up"].get(&b_private).is_none(), "{welcome}");

    // B reads its own: A's attempts left nothing in it; a message B's session
    // publishes there arrives.
    let own = b
        .publish(&b_private, "note-1", &json!("mine"))
        .await
        .unwrap();
    assert_eq!(
        own, 1,
        "nothing else was ever stored in B's private channel"
    );
    let got = collect(&mut b, &b_private, 1, Duration::from_secs(10)).await;
    assert_eq!(got, vec![(1, "note-1".to_owned())]);
    let ids: HashSet<_> = [a.session_id(), b.session_id()].into_iter().collect();
    assert_eq!(ids.len(), 2);
}

/// Without offsets in its hello, a resumed session restarts after the last
/// offset it acknowledged; unsubscribed channels stay quiet.
#[tokio::test]
async fn ack_sets_where_a_resumed_session_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("data"), Opts::default()).await;
    let publisher = client(&relay.url()).await;
    for i in 1..=5 {
        publisher
            .publish("acked", &format!("a-{i}"), &json!(i))
            .await
            .unwrap();
        publisher
            .publish("dropped", &format!("d-{i}"), &json!(i))
            .await
            .unwrap();
    }

    let mut ws = RawWs::connect(&relay.url()).await;
    ws.send(json!({"type": "hello"})).await;
    let token = ws.next_json().await["token"].as_str().unwrap().to_owned();
    ws.send(json!({"type": "subscribe", "channel": "acked", "from": 1}))
        .await;
    ws.send(json!({"type": "subscribe", "channel": "dropped", "from": 1}))
        .await;
    let mut seen = Vec::new();
    while seen.len() < 10 {
        let f = ws.next_json().await;
        if f["type"] == "deliver" {
            seen.push((
                f["channel"].as_str().unwrap().to_owned(),
                f["offset"].as_u64().unwrap(),
            ));
        }
    }
    ws.send(json!({"type": "ack", "channel": "acked", "offset": 3}))
        .await;
    ws.send(json!({"type": "unsubscribe", "channel": "dropped"}))
        .await;
    ws.send(json!({"type": "ack", "channel": "dropped", "offset": 1}))
        .await;
    let e = ws.next_json().await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("invalid_state")),
        "{e}"
    );
    drop(ws);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut again = RawWs::connect(&relay.url()).await;
    again.send(json!({"type": "hello", "token": token})).await;
    let welcome = again.next_json().await;
    assert_eq!(welcome["state"], "DETACHED");
    assert!(welcome["catch_up"].get("dropped").is_none(), "{welcome}");
    let mut redelivered = Vec::new();
    while redelivered.len() < 2 {
        let f = again.next_json().await;
        if f["type"] == "deliver" {
            assert_eq!(f["channel"], "acked", "{f}");
            redelivered.push(f["offset"].as_u64().unwrap());
        }
    }
    assert_eq!(redelivered, [4, 5], "after the acknowledged offset");
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            config: Some("[limits]\nidle_timeout_ms = 400\n".into()),
            ..Default::default()
        },
    )
    .await;
    let mut ws = RawWs::connect(&relay.url()).await;
    ws.send(json!({"type": "hello"})).await;
    assert_eq!(ws.next_json().await["type"], "welcome");
    // Pings keep it open ...
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        ws.send(json!({"type": "ping"})).await;
        assert_eq!(ws.next_json().await["type"], "pong");
    }
    // ... silence does not.
    let code = loop {
        match ws.next().await {
            Ok(_) => continue,
            Err(code) => break code,
        }
    };
    assert_eq!(code, Some(4002));
}

/// Naming a channel in `resume` subscribes the session to it.
#[tokio::test]
async fn resuming_a_channel_subscribes_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("data"), Opts::default()).await;
    let publisher = client(&relay.url()).await;
    publisher.publish("news", "n-1", &json!(1)).await.unwrap();

    let mut first = RawWs::connect(&relay.url()).await;
    first.send(json!({"type": "hello"})).await;
    let token = first.next_json().await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    drop(first);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut second = RawWs::connect(&relay.url()).await;
    second
        .send(json!({"type": "hello", "token": token, "resume": {"news": 0}}))
        .await;
    assert_eq!(second.next_json().await["type"], "welcome");
    let d = second.next_json().await;
    assert_eq!(
        (d["channel"].as_str(), d["offset"].as_u64()),
        (Some("news"), Some(1))
    );
    drop(second);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut third = RawWs::connect(&relay.url()).await;
    third.send(json!({"type": "hello", "token": token})).await;
    let welcome = third.next_json().await;
    assert_eq!(
        welcome["catch_up"]["news"], 2,
        "still subscribed: {welcome}"
    );
}

/// One WebSocket frame as it is on the wire: FIN, opcode, payload (server
/// frames are not masked).
async fn raw_frame(s: &mut tokio::net::TcpStream) -> (bool, u8, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(head[1] & 0x80, 0, "a server frame is never masked");
    let len = match head[1] & 0x7f {
        126 => u64::from(s.read_u16().await.unwrap()),
        127 => s.read_u64().await.unwrap(),
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).await.unwrap();
    (head[0] & 0x80 != 0, head[0] & 0x0f, payload)
}

/// A masked client text frame.
fn client_frame(text: &str) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut out = vec![0x81];
    let len = text.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// The upgrade answers as RFC 6455 says (the accept key of its example,
/// keel.v1 chosen), and a delivery larger than 64 KiB goes out as a text
/// frame and continuation frames of 64 KiB, the last one final, which
/// together are the whole deliver frame, its payload byte for byte.
#[tokio::test]
async fn large_deliveries_go_out_in_64_kib_fragments() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("data"), Opts::default()).await;
    let mut s = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    s.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: other, keel.v1\r\n\r\n",
            relay.addr
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = String::new();
    {
        let mut reader = tokio::io::BufReader::new(&mut s);
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap();
            if line == "\r\n" {
                break;
            }
            head.push_str(&line.to_ascii_lowercase());
        }
        assert!(reader.buffer().is_empty(), "no frame before the hello");
    }
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    assert!(head.contains("sec-websocket-protocol: keel.v1"), "{head}");

    s.write_all(&client_frame(r#"{"type":"hello"}"#))
        .await
        .unwrap();
    s.write_all(&client_frame(
        r#"{"type":"subscribe","channel":"big","from":1}"#,
    ))
    .await
    .unwrap();
    let body = "z".repeat(200_000);
    let publisher = client(&relay.url()).await;
    publisher
        .publish("big", &new_message_id(), &json!(body))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (fin, opcode, payload) = tokio::time::timeout_at(deadline, raw_frame(&mut s))
            .await
            .expect("a deliver within 20 s");
        assert_eq!(opcode, 1, "a text frame starts each message");
        if fin {
            // welcome, subscribed, ...: short, whole.
            assert!(payload.len() <= 64 * 1024);
            continue;
        }
        assert_eq!(payload.len(), 64 * 1024, "first fragment");
        let mut message = payload;
        let mut fragments = 1;
        loop {
            let (fin, opcode, payload) = raw_frame(&mut s).await;
            assert_eq!(opcode, 0, "continuation frames, nothing between");
            fragments += 1;
            message.extend_from_slice(&payload);
            if fin {
                break;
            }
            assert_eq!(payload.len(), 64 * 1024);
        }
        let v: serde_json::Value = serde_json::from_slice(&message).unwrap();
        assert_eq!(v["type"], "deliver");
        assert_eq!(v["payload"].as_str(), Some(body.as_str()));
        assert_eq!(fragments, message.len().div_ceil(64 * 1024));
        break;
    }
}

/// What is not a WebSocket upgrade gets a clear HTTP answer from `/ws`, and
/// the relay goes on serving.
#[tokio::test]
async fn a_plain_request_to_ws_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("data"), Opts::default()).await;
    let answer = http_get(&format!("http://{}/ws", relay.addr)).await;
    assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
    assert!(answer.contains("did not include 'upgrade'"), "{answer}");
    let c = client(&relay.url()).await;
    c.publish("after", &new_message_id(), &json!(1))
        .await
        .unwrap();
}
