//! The proxy in WebSocket mode, between a tokio-tungstenite client and
//! server: byte-exact without frame toxics, and with them the receiver sees
//! exactly what the tampering record says.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use keel_faults::{
    FrameFilter, Protocol, ProxyError, Stream, TamperAction, Tampering, Toxic, ToxicKind,
};
use serde_json::{Map, Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::support::{Taps, Ws, echo_server, proxy_to, proxy_with, round_trip, ws_pair, ws_proxy};

fn deliver(k: u64) -> Value {
    json!({"type": "deliver", "channel": "c", "offset": k, "id": format!("m-{k}"),
        "payload": {"n": k, "text": "hello"}})
}

fn deliveries(n: u64) -> Vec<Step> {
    (0..n).map(|k| Step::Send(deliver(k))).collect()
}

fn filter(every: u64, limit: Option<u64>) -> FrameFilter {
    FrameFilter {
        every,
        limit,
        ..FrameFilter::default()
    }
}

fn only(fields: Value) -> Map<String, Value> {
    fields.as_object().cloned().unwrap()
}

fn offset(m: &Value) -> u64 {
    m["offset"].as_u64().unwrap()
}

/// What the sending side does.
enum Step {
    Send(Value),
    Wait(Duration),
}

/// What one run saw.
struct Run {
    sent: Vec<Value>,
    received: Vec<(Value, Instant)>,
    records: Vec<Tampering>,
}

impl Run {
    fn received(&self) -> Vec<Value> {
        self.received.iter().map(|(m, _)| m.clone()).collect()
    }

    /// Checks that there are `n` records, all of `toxic` doing `action` to
    /// messages sent on `stream` (their scalar fields, as sent); returns
    /// their offsets in record order.
    #[track_caller]
    fn recorded(&self, toxic: &str, action: TamperAction, stream: Stream, n: usize) -> Vec<u64> {
        assert_eq!(self.records.len(), n, "{:#?}", self.records);
        let mut seqs = Vec::new();
        let offsets = self
            .records
            .iter()
            .map(|r| {
                assert_eq!(
                    (r.toxic.as_str(), r.action, r.connection, r.stream),
                    (toxic, action, 0, stream)
                );
                seqs.push(r.seq);
                let k = r.fields["offset"].as_u64().unwrap();
                let sent = self.sent.iter().find(|m| offset(m) == k).unwrap();
                let mut scalars = only(sent.clone());
                scalars.retain(|_, v| !v.is_object() && !v.is_array());
                assert_eq!(r.fields, scalars);
                k
            })
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
        offsets
    }
}

/// Sends per `steps` on `stream` through a WebSocket proxy with `toxics`,
/// then closes; the other side collects every text message until the end.
async fn run(seed: u64, stream: Stream, toxics: Vec<Toxic>, steps: Vec<Step>) -> Run {
    let (proxy, server) = ws_proxy(seed).await;
    for t in toxics {
        proxy.add_toxic(t).unwrap();
    }
    let ((client, _), (accepted, _)) = ws_pair(&proxy, &server).await;
    let (mut sender, mut receiver) = match stream {
        Stream::Upstream => (client, accepted),
        Stream::Downstream => (accepted, client),
    };
    let sent = steps
        .iter()
        .filter_map(|s| match s {
            Step::Send(m) => Some(m.clone()),
            Step::Wait(_) => None,
        })
        .collect();
    let sending = tokio::spawn(async move {
        for step in steps {
            match step {
                Step::Send(m) => sender.send(Message::text(m.to_string())).await.unwrap(),
                Step::Wait(d) => tokio::time::sleep(d).await,
            }
        }
        sender.close(None).await.unwrap();
        // Drive the close handshake to its end.
        while let Some(Ok(_)) = sender.next().await {}
    });
    let received = receive(&mut receiver).await;
    drop(receiver);
    tokio::time::timeout(Duration::from_secs(10), sending)
        .await
        .expect("the sender finishes")
        .unwrap();
    Run {
        sent,
        received,
        records: proxy.tamperings(),
    }
}

/// Every text message until the connection ends, with its arrival time.
async fn receive(ws: &mut Ws) -> Vec<(Value, Instant)> {
    let mut got = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(15), ws.next())
            .await
            .expect("the end of the conversation in time");
        match next {
            Some(Ok(Message::Text(t))) => {
                got.push((serde_json::from_str(t.as_str()).unwrap(), Instant::now()))
            }
            Some(Ok(_)) => {}
            None | Some(Err(_)) => return got,
        }
    }
}

#[track_caller]
fn check_taps(client: &Taps, server: &Taps) {
    let (up_sent, up_got) = (client.written(), server.read());
    let (down_sent, down_got) = (server.written(), client.read());
    assert_eq!(up_sent.len(), up_got.len(), "client to server");
    assert!(up_sent == up_got, "client to server: bytes differ");
    assert_eq!(down_sent.len(), down_got.len(), "server to client");
    assert!(down_sent == down_got, "server to client: bytes differ");
}

/// Receives `n` data messages, echoing nothing; pings are answered by
/// tungstenite itself.
async fn data_messages(ws: &mut Ws, n: usize) -> Vec<Message> {
    let mut got = Vec::new();
    while got.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a message in time")
            .unwrap()
            .unwrap();
        if matches!(m, Message::Text(_) | Message::Binary(_)) {
            got.push(m);
        }
    }
    got
}

async fn close(mut ws: Ws) {
    ws.close(None).await.unwrap();
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {}
}

fn fragment(text: &'static str, opcode: Data, last: bool) -> Message {
    Message::Frame(Frame::message(text, OpCode::Data(opcode), last))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_exact_conversation_without_toxics() {
    let (proxy, server) = ws_proxy(1).await;
    let ((mut client, client_taps), (mut accepted, server_taps)) = ws_pair(&proxy, &server).await;
    let echo = tokio::spawn(async move {
        while let Some(Ok(m)) = accepted.next().await {
            match m {
                Message::Text(t) if t.as_str() == "your turn" => {
                    accepted
                        .send(fragment("frag", Data::Text, false))
                        .await
                        .unwrap();
                    accepted.send(Message::Ping("inside".into())).await.unwrap();
                    accepted
                        .send(fragment("mented", Data::Continue, true))
                        .await
                        .unwrap();
                    accepted
                        .send(Message::binary(vec![7u8; 70_000]))
                        .await
                        .unwrap();
                }
                m @ (Message::Text(_) | Message::Binary(_)) => accepted.send(m).await.unwrap(),
                _ => {}
            }
        }
    });
    client.send(Message::text("hello")).await.unwrap();
    client.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    // A fragmented message with a ping between its fragments (masked, as
    // every client frame).
    client
        .send(fragment("hel", Data::Text, false))
        .await
        .unwrap();
    client.send(Message::Ping("between".into())).await.unwrap();
    client
        .send(fragment("lo again", Data::Continue, true))
        .await
        .unwrap();
    client
        .send(Message::text("x".repeat(200_000)))
        .await
        .unwrap();
    client.send(Message::text("your turn")).await.unwrap();
    let got = data_messages(&mut client, 6).await;
    let texts: Vec<String> = got
        .iter()
        .map(|m| match m {
            Message::Text(t) => t.as_str().chars().take(12).collect(),
            Message::Binary(b) => format!("{} bytes", b.len()),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(
        texts,
        [
            "hello",
            "3 bytes",
            "hello again",
            "xxxxxxxxxxxx",
            "fragmented",
            "70000 bytes"
        ]
    );
    close(client).await;
    tokio::time::timeout(Duration::from_secs(5), echo)
        .await
        .unwrap()
        .unwrap();
    check_taps(&client_taps, &server_taps);
    let stats = proxy.stats();
    assert!(stats.frames_seen >= 18, "{stats:?}");
    assert_eq!(stats.frames_inspected, 0, "nothing to inspect for");
    assert!(stats.frames_opaque >= 3, "binary frames: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_exact_with_toxics_that_match_nothing() {
    let (proxy, server) = ws_proxy(1).await;
    for stream in [Stream::Upstream, Stream::Downstream] {
        let name = format!("{stream:?}");
        proxy
            .add_toxic(Toxic::new(
                &name,
                stream,
                ToxicKind::WsDrop {
                    filter: FrameFilter {
                        matching: only(json!({"type": "never"})),
                        ..FrameFilter::default()
                    },
                },
            ))
            .unwrap();
    }
    let ((mut client, client_taps), (mut accepted, server_taps)) = ws_pair(&proxy, &server).await;
    let echo = tokio::spawn(async move {
        while let Some(Ok(m)) = accepted.next().await {
            if matches!(m, Message::Text(_) | Message::Binary(_)) {
                accepted.send(m).await.unwrap();
            }
        }
    });
    for k in 0..20 {
        client
            .send(Message::text(deliver(k).to_string()))
            .await
            .unwrap();
    }
    client.send(Message::text("not JSON")).await.unwrap();
    client.send(Message::binary(vec![0u8; 300])).await.unwrap();
    client.send(Message::Ping("p".into())).await.unwrap();
    client
        .send(fragment("{\"a\":", Data::Text, false))
        .await
        .unwrap();
    client
        .send(fragment("1}", Data::Continue, true))
        .await
        .unwrap();
    data_messages(&mut client, 23).await;
    close(client).await;
    tokio::time::timeout(Duration::from_secs(5), echo)
        .await
        .unwrap()
        .unwrap();
    check_taps(&client_taps, &server_taps);
    assert!(proxy.tamperings().is_empty());
    assert!(proxy.stats().frames_inspected >= 44, "{:?}", proxy.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_traffic_passes_raw_in_websocket_mode() {
    let proxy = proxy_with(echo_server().await, 1, Protocol::WebSocket).await;
    for msg in [
        &b"hello, not HTTP"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /x HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc",
    ] {
        let mut c = TcpStream::connect(proxy.listen_addr()).await.unwrap();
        let back = round_trip(&mut c, msg, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(back, msg);
        // And more after it.
        let back = round_trip(&mut c, b"more", Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(back, b"more");
    }
    assert_eq!(proxy.stats().frames_seen, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_drop_removes_exactly_the_recorded_messages() {
    let drop = Toxic::new(
        "drop",
        Stream::Downstream,
        ToxicKind::WsDrop {
            filter: filter(4, Some(3)),
        },
    );
    let run = run(7, Stream::Downstream, vec![drop], deliveries(50)).await;
    let dropped = run.recorded("drop", TamperAction::Drop, Stream::Downstream, 3);
    let expected: Vec<Value> = run
        .sent
        .iter()
        .filter(|m| !dropped.contains(&offset(m)))
        .cloned()
        .collect();
    assert_eq!(run.received(), expected);
    assert!(run.records.iter().all(|r| r.effective));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_duplicate_repeats_exactly_the_recorded_messages() {
    let dup = Toxic::new(
        "dup",
        Stream::Downstream,
        ToxicKind::WsDuplicate {
            filter: filter(4, Some(3)),
        },
    );
    let run = run(7, Stream::Downstream, vec![dup], deliveries(50)).await;
    let repeated = run.recorded("dup", TamperAction::Duplicate, Stream::Downstream, 3);
    let expected: Vec<Value> = run
        .sent
        .iter()
        .flat_map(|m| {
            let times = if repeated.contains(&offset(m)) { 2 } else { 1 };
            std::iter::repeat_n(m.clone(), times)
        })
        .collect();
    assert_eq!(run.received(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_reorder_swaps_exactly_the_recorded_messages() {
    let reorder = Toxic::new(
        "swap",
        Stream::Downstream,
        ToxicKind::WsReorder {
            filter: filter(4, Some(3)),
            same: vec!["channel".into()],
            max_hold: 10_000,
        },
    );
    let run = run(7, Stream::Downstream, vec![reorder], deliveries(50)).await;
    let held = run.recorded("swap", TamperAction::Reorder, Stream::Downstream, 3);
    // Each held message comes right after the next one.
    let mut expected = run.sent.clone();
    for (k, r) in held.iter().zip(&run.records) {
        assert!(r.effective, "{r:?}");
        assert!(
            r.detail.starts_with(&format!(
                "overtaken by {{\"channel\":\"c\",\"id\":\"m-{}\"",
                k + 1
            )),
            "{}",
            r.detail
        );
        let i = expected.iter().position(|m| offset(m) == *k).unwrap();
        expected.swap(i, i + 1);
    }
    assert_eq!(run.received(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_reorder_not_overtaken_is_released_in_place() {
    let reorder = |max_hold| {
        Toxic::new(
            "swap",
            Stream::Downstream,
            ToxicKind::WsReorder {
                filter: filter(1, Some(1)),
                same: Vec::new(),
                max_hold,
            },
        )
    };
    // The next message comes after max_hold.
    let steps = vec![
        Step::Send(deliver(0)),
        Step::Wait(Duration::from_millis(1_000)),
        Step::Send(deliver(1)),
    ];
    let late = run(7, Stream::Downstream, vec![reorder(100)], steps).await;
    late.recorded("swap", TamperAction::Reorder, Stream::Downstream, 1);
    assert!(!late.records[0].effective);
    assert_eq!(
        late.records[0].detail,
        "released after max_hold 100 ms without being overtaken"
    );
    assert_eq!(late.received(), late.sent);
    let held_for = late.received[1].1 - late.received[0].1;
    assert!(
        held_for >= Duration::from_millis(500),
        "released long before the next message: {held_for:?}"
    );

    // A close comes first.
    let closed = run(7, Stream::Downstream, vec![reorder(10_000)], deliveries(1)).await;
    closed.recorded("swap", TamperAction::Reorder, Stream::Downstream, 1);
    assert!(!closed.records[0].effective);
    assert!(
        closed.records[0].detail.contains("before a close frame"),
        "{}",
        closed.records[0].detail
    );
    assert_eq!(closed.received(), closed.sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_corrupt_replaces_the_field_of_exactly_the_recorded_messages() {
    let corrupt = Toxic::new(
        "bad",
        Stream::Downstream,
        ToxicKind::WsCorrupt {
            filter: filter(4, Some(3)),
            field: "payload".into(),
            value: json!("corrupted by keel-chaos-proxy"),
        },
    );
    let run = run(7, Stream::Downstream, vec![corrupt], deliveries(50)).await;
    let corrupted = run.recorded("bad", TamperAction::Corrupt, Stream::Downstream, 3);
    let expected: Vec<Value> = run
        .sent
        .iter()
        .map(|m| {
            let mut m = m.clone();
            if corrupted.contains(&offset(&m)) {
                m["payload"] = json!("corrupted by keel-chaos-proxy");
            }
            m
        })
        .collect();
    assert_eq!(run.received(), expected);
    assert_eq!(
        run.records[0].detail,
        "payload replaced by \"corrupted by keel-chaos-proxy\""
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_delay_holds_the_stream_at_exactly_the_recorded_messages() {
    let delay = Toxic::new(
        "slow",
        Stream::Downstream,
        ToxicKind::WsDelay {
            filter: filter(8, Some(3)),
            delay: 300,
        },
    );
    let started = Instant::now();
    let run = run(7, Stream::Downstream, vec![delay], deliveries(50)).await;
    let delayed = run.recorded("slow", TamperAction::Delay, Stream::Downstream, 3);
    assert_eq!(run.received(), run.sent, "order kept");
    assert_eq!(run.records[0].detail, "delayed 300 ms");
    for k in &delayed {
        let k = *k as usize;
        let before = if k == 0 {
            started
        } else {
            run.received[k - 1].1
        };
        let gap = run.received[k].1 - before;
        assert!(gap >= Duration::from_millis(250), "message {k}: {gap:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn match_leaves_other_messages_alone() {
    let drop = Toxic::new(
        "drop",
        Stream::Downstream,
        ToxicKind::WsDrop {
            filter: FrameFilter {
                matching: only(json!({"type": "deliver"})),
                ..FrameFilter::default()
            },
        },
    );
    let steps: Vec<Step> = (0..20)
        .map(|k| {
            if k % 2 == 0 {
                Step::Send(deliver(k))
            } else {
                Step::Send(json!({"type": "ack", "offset": k}))
            }
        })
        .collect();
    let run = run(7, Stream::Downstream, vec![drop], steps).await;
    assert_eq!(run.records.len(), 10);
    assert!(run.records.iter().all(|r| r.fields["type"] == "deliver"));
    let acks: Vec<Value> = run
        .sent
        .iter()
        .filter(|m| m["type"] == "ack")
        .cloned()
        .collect();
    assert_eq!(run.received(), acks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_messages_are_re_masked() {
    // The tungstenite server refuses unmasked client frames, so a rewritten
    // frame that reaches it intact was masked again.
    let toxics = vec![
        Toxic::new(
            "bad",
            Stream::Upstream,
            ToxicKind::WsCorrupt {
                filter: FrameFilter {
                    matching: only(json!({"type": "deliver"})),
                    every: 3,
                    limit: Some(3),
                },
                field: "payload".into(),
                value: json!({"big": "y".repeat(70_000)}),
            },
        ),
        // Downstream toxics do not touch upstream messages.
        Toxic::new(
            "down",
            Stream::Downstream,
            ToxicKind::WsDrop {
                filter: FrameFilter::default(),
            },
        ),
    ];
    let run = run(3, Stream::Upstream, toxics, deliveries(30)).await;
    let corrupted = run.recorded("bad", TamperAction::Corrupt, Stream::Upstream, 3);
    let received = run.received();
    assert_eq!(received.len(), 30);
    for (sent, got) in run.sent.iter().zip(&received) {
        if corrupted.contains(&offset(sent)) {
            assert_eq!(got["payload"]["big"].as_str().map(str::len), Some(70_000));
            assert_eq!(got["id"], sent["id"]);
        } else {
            assert_eq!(got, sent);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_tampered_messages() {
    let plan = |seed: u64| async move {
        let drop = Toxic::new(
            "drop",
            Stream::Downstream,
            ToxicKind::WsDrop {
                filter: filter(5, Some(4)),
            },
        );
        let run = run(seed, Stream::Downstream, vec![drop], deliveries(60)).await;
        run.recorded("drop", TamperAction::Drop, Stream::Downstream, 4)
    };
    let first = plan(42).await;
    assert_eq!(first, plan(42).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_toxics_apply_to_frames_in_websocket_mode() {
    // Slices of a few bytes: frames are still found and rewritten whole.
    let toxics = vec![
        Toxic::new(
            "slice",
            Stream::Downstream,
            ToxicKind::Slicer {
                average_size: 7,
                size_variation: 3,
                delay: 0,
            },
        ),
        Toxic::new(
            "bad",
            Stream::Downstream,
            ToxicKind::WsCorrupt {
                filter: filter(1, Some(2)),
                field: "payload".into(),
                value: json!(0),
            },
        ),
    ];
    let run = run(7, Stream::Downstream, toxics, deliveries(10)).await;
    let corrupted = run.recorded("bad", TamperAction::Corrupt, Stream::Downstream, 2);
    assert_eq!(corrupted, [0, 1]);
    let received = run.received();
    assert_eq!(received.len(), 10);
    assert_eq!(
        (&received[1]["payload"], &received[2]),
        (&json!(0), &run.sent[2])
    );

    // Latency delays each message.
    let (proxy, server) = ws_proxy(1).await;
    proxy
        .add_toxic(Toxic::new(
            "lag",
            Stream::Downstream,
            ToxicKind::Latency {
                latency: 150,
                jitter: 0,
            },
        ))
        .unwrap();
    let ((mut client, _), (mut accepted, _)) = ws_pair(&proxy, &server).await;
    let started = Instant::now();
    accepted.send(Message::text("late")).await.unwrap();
    data_messages(&mut client, 1).await;
    assert!(started.elapsed() >= Duration::from_millis(140));
}

#[tokio::test]
async fn frame_toxics_need_a_websocket_proxy() {
    let proxy = proxy_to(echo_server().await, 1).await;
    let err = proxy
        .add_toxic(Toxic::new(
            "drop",
            Stream::Downstream,
            ToxicKind::WsDrop {
                filter: FrameFilter::default(),
            },
        ))
        .unwrap_err();
    match err {
        ProxyError::InvalidToxic(why) => {
            assert!(why.contains(r#""protocol":"websocket""#), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert!(proxy.toxics().is_empty());

    let (ws, _server) = ws_proxy(1).await;
    let zero = ws.add_toxic(Toxic::new(
        "drop",
        Stream::Downstream,
        ToxicKind::WsDrop {
            filter: filter(0, None),
        },
    ));
    assert!(matches!(zero, Err(ProxyError::InvalidToxic(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_spans_connections_and_restarts_with_the_toxic() {
    let (proxy, server) = ws_proxy(1).await;
    let drop = Toxic::new(
        "drop",
        Stream::Downstream,
        ToxicKind::WsDrop {
            filter: filter(1, Some(2)),
        },
    );
    proxy.add_toxic(drop.clone()).unwrap();
    // The first connection uses up the limit; the second gets everything.
    for first in [2, 0] {
        let ((mut client, _), (mut accepted, _)) = ws_pair(&proxy, &server).await;
        for k in 0..3 {
            accepted
                .send(Message::text(deliver(k).to_string()))
                .await
                .unwrap();
        }
        let got = data_messages(&mut client, 1).await;
        assert_eq!(got, [Message::text(deliver(first).to_string())]);
        // The server hangs up once the close handshake is done.
        let drain = async move { while let Some(Ok(_)) = accepted.next().await {} };
        tokio::join!(close(client), drain);
    }
    let records = proxy.tamperings();
    assert_eq!(records.len(), 2);
    assert_eq!((records[0].connection, records[1].connection), (0, 0));
    proxy.update_toxic(drop).unwrap();
    let ((mut client, _), (mut accepted, _)) = ws_pair(&proxy, &server).await;
    for k in 0..3 {
        accepted
            .send(Message::text(deliver(k).to_string()))
            .await
            .unwrap();
    }
    let got = data_messages(&mut client, 1).await;
    assert_eq!(got, [Message::text(deliver(2).to_string())]);
    let records = proxy.tamperings();
    assert_eq!(records.len(), 4);
    assert_eq!((records[2].connection, records[3].connection), (2, 2));
    proxy.clear_tamperings();
    assert!(proxy.tamperings().is_empty());
}

/// (opcode, payload) of each frame the client read after the HTTP
/// response; server frames are never masked.
fn frames_read(read: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let start = read.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut rest = &read[start..];
    let mut frames = Vec::new();
    while !rest.is_empty() {
        assert_eq!(rest[1] & 0x80, 0, "unmasked");
        let (len, at) = match rest[1] & 0x7f {
            126 => (usize::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            127 => (
                u64::from_be_bytes(rest[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (usize::from(n), 2),
        };
        frames.push((rest[0] & 0x0f, rest[at..at + len].to_vec()));
        rest = &rest[at + len..];
    }
    frames
}

fn early_close(delay: u64, limit: Option<u64>) -> Toxic {
    Toxic::new(
        "early",
        Stream::Upstream,
        ToxicKind::WsEarlyClose {
            filter: filter(1, limit),
            delay,
        },
    )
}

/// What one close through the proxy looked like from both ends.
struct Closing {
    /// From the client's close to its receiving a close frame.
    answered_after: Duration,
    /// From the client's close to the server's seeing it.
    server_after: Duration,
    /// The code and reason the server got.
    server_got: (u16, String),
    /// Every frame the client's socket delivered, to its end.
    client_read: Vec<(u8, Vec<u8>)>,
}

/// Connects a client and a server through `proxy`, sends one message up,
/// closes the client (code 1001, reason "bye"), and once the client has a
/// close frame sends `after_close` from the server; returns what each end
/// saw.
async fn closing(
    proxy: &keel_faults::Proxy,
    server: &tokio::net::TcpListener,
    after_close: Option<Value>,
) -> Closing {
    use tokio::io::AsyncReadExt;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let ((mut client, client_taps), (mut accepted, _)) = ws_pair(proxy, server).await;
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        let mut closed_rx = Some(closed_rx);
        let mut got = None;
        while let Some(Ok(m)) = accepted.next().await {
            match m {
                Message::Text(_) => {
                    if let (Some(rx), Some(m)) = (closed_rx.take(), &after_close) {
                        rx.await.unwrap();
                        accepted.send(Message::text(m.to_string())).await.unwrap();
                    }
                }
                Message::Close(frame) => {
                    let frame = frame.unwrap();
                    got = Some((
                        Instant::now(),
                        (u16::from(frame.code), frame.reason.to_string()),
                    ));
                }
                _ => {}
            }
        }
        got.expect("the client's close reached the server")
    });
    client.send(Message::text("hello")).await.unwrap();
    let sent = Instant::now();
    client
        .close(Some(CloseFrame {
            code: CloseCode::Away,
            reason: "bye".into(),
        }))
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match client.next().await {
                Some(Ok(Message::Close(_))) => return Instant::now(),
                Some(Ok(_)) => {}
                other => panic!("no close frame for the client: {other:?}"),
            }
        }
    })
    .await
    .expect("a close frame in time");
    let _ = closed_tx.send(());
    // The rest of what reaches the client's socket, to its end.
    let mut rest = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        client.get_mut().read_to_end(&mut rest),
    )
    .await
    .expect("the client's connection ends")
    .unwrap();
    let (server_at, server_got) = tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("the server finishes")
        .unwrap();
    Closing {
        answered_after: answer - sent,
        server_after: server_at - sent,
        server_got,
        client_read: frames_read(&client_taps.read()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_early_close_answers_the_client_at_once_and_the_server_late() {
    let (proxy, server) = ws_proxy(7).await;
    proxy.add_toxic(early_close(500, None)).unwrap();
    let c = closing(&proxy, &server, None).await;
    // Loose bound on a loaded 2-core machine; the point is that it is far
    // below the delay.
    assert!(
        c.answered_after < Duration::from_millis(150),
        "{:?}",
        c.answered_after
    );
    assert!(
        c.server_after >= Duration::from_millis(450),
        "{:?}",
        c.server_after
    );
    assert_eq!(
        c.server_got,
        (1001, "bye".to_owned()),
        "the client's own close"
    );
    assert_eq!(
        c.client_read,
        [(0x8, 1001u16.to_be_bytes().to_vec())],
        "the proxy's answer only, not the server's"
    );
    let records = proxy.tamperings();
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    assert_eq!(
        (
            r.toxic.as_str(),
            r.action,
            r.effective,
            r.connection,
            r.stream
        ),
        ("early", TamperAction::EarlyClose, true, 0, Stream::Upstream)
    );
    assert_eq!(r.fields, only(json!({"code": 1001})));
    assert_eq!(
        r.detail,
        "answered the client's close at once; passed it on 500 ms later"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_early_close_forwards_nothing_from_the_server_after_its_answer() {
    let (proxy, server) = ws_proxy(7).await;
    proxy.add_toxic(early_close(500, None)).unwrap();
    let c = closing(&proxy, &server, Some(deliver(3))).await;
    assert_eq!(c.client_read, [(0x8, 1001u16.to_be_bytes().to_vec())]);
    let records = proxy.tamperings();
    let summary: Vec<_> = records
        .iter()
        .map(|r| (r.action, r.stream, r.fields.get("offset").cloned()))
        .collect();
    assert_eq!(
        summary,
        [
            (TamperAction::Drop, Stream::Downstream, Some(json!(3))),
            (TamperAction::EarlyClose, Stream::Upstream, None),
        ],
        "{records:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_early_close_limit_leaves_later_closes_alone() {
    let (proxy, server) = ws_proxy(7).await;
    proxy.add_toxic(early_close(500, Some(1))).unwrap();
    let first = closing(&proxy, &server, None).await;
    assert!(first.server_after >= Duration::from_millis(450));
    // The second connection closes as it would without the proxy: the
    // server's answer (tungstenite echoes the reason) reaches the client.
    let second = closing(&proxy, &server, None).await;
    assert!(
        second.server_after < Duration::from_millis(300),
        "{:?}",
        second.server_after
    );
    let mut echoed = 1001u16.to_be_bytes().to_vec();
    echoed.extend_from_slice(b"bye");
    assert_eq!(second.client_read, [(0x8, echoed)]);
    let records = proxy.tamperings();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].connection, 0);
}

#[tokio::test]
async fn ws_early_close_is_refused_off_upstream_or_on_a_tcp_proxy() {
    let (proxy, _server) = ws_proxy(1).await;
    let refused = |toxic: Toxic| match proxy.add_toxic(toxic) {
        Err(ProxyError::InvalidToxic(why)) => why,
        other => panic!("{other:?}"),
    };
    let down = Toxic {
        stream: Stream::Downstream,
        ..early_close(500, None)
    };
    assert!(refused(down).contains(r#""stream":"upstream""#));
    let mut matching = early_close(500, None);
    if let ToxicKind::WsEarlyClose { filter, .. } = &mut matching.kind {
        filter.matching = only(json!({"type": "close"}));
    }
    assert!(refused(matching).contains("no match"));
    assert!(proxy.toxics().is_empty());

    let tcp = proxy_to(echo_server().await, 1).await;
    match tcp.add_toxic(early_close(500, None)) {
        Err(ProxyError::InvalidToxic(why)) => {
            assert!(why.contains(r#""protocol":"websocket""#), "{why}")
        }
        other => panic!("{other:?}"),
    }
}
