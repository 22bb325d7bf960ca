//! The relay under abuse: every buffer bounded in bytes, every wait in
//! time, the disk bounded by retention. Small budgets keep each test short;
//! assertions are on the relay's own RSS (from /proc) and its counters.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

fn rss_mib(pid: i32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

async fn healthz(relay: &RelayProcess) -> serde_json::Value {
    let text = http_get(&format!("http://{}/healthz", relay.addr)).await;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or(&text);
    serde_json::from_str(body).unwrap()
}

/// Waits (up to 10 s) for `probe` to hold.
async fn eventually<F, Fut>(what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !probe().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Connects and says hello; returns the raw socket.
async fn session(url: &str) -> RawWs {
    let mut ws = RawWs::connect(url).await;
    ws.send(json!({"type": "hello"})).await;
    assert_eq!(ws.next_json().await["type"], "welcome");
    ws
}

fn big(n: usize) -> String {
    format!("\"{}\"", "p".repeat(n - 2))
}

/// Pipelined maximum-size publishes from many connections: the relay stops
/// reading them (per-connection and global byte budgets) instead of
/// buffering, so its RSS stays near its baseline plus the global budget,
/// the store's page cache and one read buffer per connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bounded_under_pipelined_max_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let global_mib = 16.0;
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            config: Some(format!(
                "[limits]\nmax_inbound_bytes = {}\nglobal_buffer_bytes = {}\nmax_outbound_bytes = 2097152\npublish_rate = 100000\npublish_burst = 100000\npublish_bytes_rate = 4000000000\npublish_bytes_burst = 4000000000\n",
                2 << 20,
                (global_mib as usize) << 20
            )),
            ..Default::default()
        },
    )
    .await;
    let baseline = rss_mib(relay.pid());
    let conns = 8;
    let payload = big(1 << 20);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (url, payload) = (relay.url(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let ws = session(&url).await;
            let (mut sink, mut stream) = ws.into_inner().split();
            // Answers are read, slowly, so that what is bounded is the
            // relay's intake, not its replies.
            let reader =
                tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
            let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
            let mut i = 0;
            while tokio::time::Instant::now() < deadline {
                let frame = format!(
                    r#"{{"type":"publish","channel":"big-{c}","id":"m{i}","payload":{payload}}}"#
                );
                if tokio::time::timeout(Duration::from_secs(5), sink.send(Message::text(frame)))
                    .await
                    .is_err()
                {
                    break;
                }
                i += 1;
            }
            reader.abort();
            i
        }));
    }
    let mut peak: f64 = 0.0;
    let watch = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < watch {
        peak = peak.max(rss_mib(relay.pid()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut sent = 0;
    for t in tasks {
        sent += t.await.unwrap();
    }
    // The bound: the global budget, the store writer's page cache (64 MiB,
    // filled by what was appended), the replay cache (a sixteenth of the
    // budget, the newest frames), a read and a write buffer of one frame
    // per connection, plus 10%.
    let frame_mib = 1.1;
    let bound =
        (baseline + global_mib * (1.0 + 1.0 / 16.0) + 64.0 + conns as f64 * 2.0 * frame_mib) * 1.1;
    println!(
        "{conns} connections sent {sent} x 1 MiB; relay RSS {baseline:.0} -> peak {peak:.0} MiB (bound {bound:.0})"
    );
    let paused = metric(&relay, "keel_limit_hits_total{limit=\"inbound_bytes\"}").await
        + metric(&relay, "keel_limit_hits_total{limit=\"global_bytes\"}").await;
    println!("reads paused by a byte budget {paused} times");
    assert!(sent >= conns, "they published");
    assert!(peak <= bound, "peak RSS {peak:.0} MiB over {bound:.0} MiB");
}

/// A connection publishing past its byte rate is slowed (its socket is not
/// read until the bucket refills), never refused: every publish is
/// acknowledged and the limit is counted (the bucket's arithmetic is
/// keel-ratelimit's, tested on paused time). A connection publishing small
/// payloads beside it is answered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_byte_rate_slows_without_refusing() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            config: Some(
                "[limits]\nmax_payload_bytes = 65536\nmax_frame_bytes = 131072\npublish_bytes_rate = 262144\npublish_bytes_burst = 65536\n"
                    .into(),
            ),
            ..Default::default()
        },
    )
    .await;
    let mut heavy = session(&relay.url()).await;
    let mut light = session(&relay.url()).await;
    let payload = big(60_000);
    let started = std::time::Instant::now();
    // 20 x 60 KB = 1.2 MB at 256 KiB/s after a 64 KiB burst: about 4.3 s.
    for i in 0..20 {
        heavy
            .send(json!({"type": "publish", "channel": "heavy", "id": format!("h{i}"), "payload": serde_json::from_str::<serde_json::Value>(&payload).unwrap()}))
            .await;
    }
    for i in 0..20 {
        light
            .send(json!({"type": "publish", "channel": "light", "id": format!("l{i}"), "payload": {"n": i}}))
            .await;
        assert_eq!(
            light.next_json().await["type"],
            "published",
            "the light one goes on"
        );
    }
    for _ in 0..20 {
        let answer = heavy.next_json().await;
        assert_eq!(
            answer["type"], "published",
            "slowed, never refused: {answer}"
        );
    }
    let hits = metric(&relay, "keel_limit_hits_total{limit=\"publish_bytes\"}").await;
    println!(
        "20 x 60 KB at 256 KiB/s took {:.2} s; limit hit {hits} times",
        started.elapsed().as_secs_f64()
    );
    assert!(hits >= 1.0, "the byte rate was met");
}

/// A byte bucket smaller than the largest payload could never admit it,
/// and one that refills over more than a minute makes a publish wait that
/// long: both configurations are refused at start.
#[test]
fn byte_bucket_is_checked_at_start() {
    let config: keel_relay::config::Config =
        toml::from_str("[limits]\nmax_payload_bytes = 1048576\npublish_bytes_burst = 65536\n")
            .unwrap();
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("publish_bytes_burst"), "{err}");
    // A bucket that takes more than a minute to refill: a publish could
    // wait that long.
    let config: keel_relay::config::Config =
        toml::from_str("[limits]\npublish_bytes_rate = 1024\n").unwrap();
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("60 s"), "{err}");
    // Unset, the bucket is one maximum-size payload, whatever that is.
    let config: keel_relay::config::Config =
        toml::from_str("[limits]\nmax_payload_bytes = 4194304\nmax_frame_bytes = 4194304\nmax_inbound_bytes = 4194304\npublish_bytes_rate = 1048576\n").unwrap();
    config.validate().unwrap();
    assert_eq!(config.limits.bytes_burst(), 4 << 20);
}

/// A subscriber that never reads is closed once its queue passes its byte
/// budget; the relay keeps nothing for it afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_reader_closed_by_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            config: Some(
                "[limits]\nmax_payload_bytes = 262144\nmax_frame_bytes = 300000\nmax_outbound_bytes = 1048576\nmax_inbound_bytes = 1048576\nglobal_buffer_bytes = 67108864\nwrite_deadline_ms = 2000\n"
                    .into(),
            ),
            ..Default::default()
        },
    )
    .await;
    let mut reader = session(&relay.url()).await;
    reader
        .send(json!({"type": "subscribe", "channel": "firehose", "from": 1}))
        .await;
    still_up_raw(&mut reader).await;
    // The reader stops reading; 64 x 200 KB go to its channel.
    let publisher = client(&relay.url()).await;
    let payload = json!("q".repeat(200_000));
    for i in 0..64 {
        publisher
            .publish("firehose", &format!("f{i}"), &payload)
            .await
            .unwrap();
    }
    eventually("the non-reader is closed as a slow consumer", || async {
        metric(&relay, "keel_limit_hits_total{limit=\"outbound_bytes\"}").await >= 1.0
    })
    .await;
    eventually("its connection is gone", || async {
        healthz(&relay).await["connections"] == 1
    })
    .await;
    assert!(metric(&relay, "keel_buffered_bytes{direction=\"outbound\"}").await < 1_000_000.0);
    drop(reader);
}

async fn still_up_raw(ws: &mut RawWs) {
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(ws.next_answer().await["type"], "pong");
}

/// Catch-up replay reads the log a bounded page at a time, so subscribers
/// that do not read hold at most a page each, not the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_bounded_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            config: Some(
                "[limits]\nreplay_page_bytes = 524288\nwrite_deadline_ms = 60000\n".into(),
            ),
            ..Default::default()
        },
    )
    .await;
    let publisher = client(&relay.url()).await;
    let payload = json!("r".repeat(512 * 1024));
    for i in 0..40 {
        publisher
            .publish("backlog", &format!("b{i}"), &payload)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = rss_mib(relay.pid());
    // 16 subscribers ask for the whole 20 MB backlog and never read.
    let mut held = Vec::new();
    for _ in 0..16 {
        let mut ws = session(&relay.url()).await;
        ws.send(json!({"type": "subscribe", "channel": "backlog", "from": 1}))
            .await;
        held.push(ws);
    }
    let mut peak: f64 = 0.0;
    for _ in 0..40 {
        peak = peak.max(rss_mib(relay.pid()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Each holds a page (0.5 MiB) and the frame in its write buffer.
    let bound = baseline + 16.0 * (0.5 + 2.0 * 0.55) + 16.0;
    println!(
        "16 non-readers of a 20 MiB backlog: relay RSS {baseline:.0} -> peak {peak:.0} MiB (bound {bound:.0}; unbounded replay would hold {} MiB)",
        16 * 20
    );
    assert!(peak <= bound, "peak {peak:.0} MiB over {bound:.0}");
    drop(held);
}

/// A write that makes no progress for the deadline ends the connection:
/// its task is gone, its buffers freed, its slot free, and `/healthz`
/// counts it gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_deadline_frees_everything() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            config: Some(
                "[limits]\nwrite_deadline_ms = 500\nmax_outbound_bytes = 67108864\nidle_timeout_ms = 600000\n"
                    .into(),
            ),
            ..Default::default()
        },
    )
    .await;
    // One connection that subscribes and then never reads.
    let mut dead = session(&relay.url()).await;
    dead.send(json!({"type": "subscribe", "channel": "flood", "from": 1}))
        .await;
    still_up_raw(&mut dead).await;
    let publisher = client(&relay.url()).await;
    // Two WebSockets, and the request asking.
    let h = healthz(&relay).await;
    assert_eq!(
        (h["connections"].as_u64(), h["tcp_connections"].as_u64()),
        (Some(2), Some(3)),
        "{h}"
    );
    let payload = json!("w".repeat(500_000));
    for i in 0..30 {
        publisher
            .publish("flood", &format!("w{i}"), &payload)
            .await
            .unwrap();
    }
    eventually("the stuck writer hits its deadline", || async {
        metric(&relay, "keel_limit_hits_total{limit=\"write_deadline\"}").await >= 1.0
    })
    .await;
    eventually(
        "healthz counts only the publisher, and its slot is free",
        || async {
            let h = healthz(&relay).await;
            h["connections"] == 1 && h["tcp_connections"] == 2
        },
    )
    .await;
    assert!(metric(&relay, "keel_buffered_bytes{direction=\"outbound\"}").await < 1_000_000.0);
    let mut again = session(&relay.url()).await;
    still_up_raw(&mut again).await;
    drop(dead);
}

/// A client that trickles its request head, or sends nothing, is closed at
/// the header timeout, and frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_closed_by_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            config: Some("[limits]\nheader_timeout_ms = 400\nmax_connections_per_ip = 2\n".into()),
            ..Default::default()
        },
    )
    .await;
    let started = tokio::time::Instant::now();
    let mut silent = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let mut slow = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    // A third is over the per-address cap, refused at accept.
    let refused = http_get(&format!("http://{}/healthz", relay.addr)).await;
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    let trickle = tokio::spawn(async move {
        let head = b"GET /ws HTTP/1.1\r\nHost: relay\r\nX-Slow: ";
        for b in head.iter().chain(b"aaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter()) {
            if slow.write_all(&[*b]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut buf = [0u8; 64];
        matches!(slow.read(&mut buf).await, Ok(0) | Err(_))
    });
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the silent socket is closed: {closed:?}"
    );
    assert!(trickle.await.unwrap(), "the trickling socket is closed");
    assert!(started.elapsed() < Duration::from_secs(4));
    // Their places are free again.
    let ok = http_get(&format!("http://{}/healthz", relay.addr)).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}

/// Over the total cap, a connection is answered 503 at accept and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_at_accept() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            config: Some("[limits]\nmax_connections = 3\nheader_timeout_ms = 60000\n".into()),
            ..Default::default()
        },
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(relay.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = http_get(&format!("http://{}/healthz", relay.addr)).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    drop(held);
    eventually("places come back", || async {
        http_get(&format!("http://{}/healthz", relay.addr))
            .await
            .starts_with("HTTP/1.1 200")
    })
    .await;
    assert!(metric(&relay, "keel_limit_hits_total{limit=\"connections_total\"}").await >= 1.0);
}

/// `send` is limited per session: a rate, and a quota of sends waiting for
/// the upstream (no upstream here, so every send waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_rate_and_outbox_quota() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            config: Some("[limits]\nsend_rate = 1\nsend_burst = 4\nmax_pending_sends = 3\n".into()),
            ..Default::default()
        },
    )
    .await;
    let mut ws = session(&relay.url()).await;
    let send = |id: &str| json!({"type": "send", "id": id, "to": "bob", "body": {"n": id}});
    for id in ["s1", "s2", "s3"] {
        ws.send(send(id)).await;
        assert_eq!(ws.next_answer().await["type"], "sent");
    }
    ws.send(send("s4")).await;
    let e = ws.next_answer().await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("limit_exceeded"), Some("s4")),
        "{e}"
    );
    // The burst of 4 is spent: the next is over the rate, whatever it is.
    ws.send(send("s1")).await;
    let e = ws.next_answer().await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("rate_limited"), Some("s1")),
        "{e}"
    );
    // Another session has its own budget and quota.
    let mut other = session(&relay.url()).await;
    other.send(send("o1")).await;
    assert_eq!(other.next_answer().await["type"], "sent");
    assert!(metric(&relay, "keel_limit_hits_total{limit=\"send_quota\"}").await >= 1.0);
    assert!(metric(&relay, "keel_limit_hits_total{limit=\"send_rate\"}").await >= 1.0);
}

/// Retention runs: a channel keeps its newest messages (and a prefix rule
/// its own age); a subscriber asking for more gets a `truncated` notice
/// naming the first offset retained, then continues from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_truncates_with_notice() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            config: Some(
                "[retention]\nmax_messages = 5\ninterval_s = 1\n[[retention.rule]]\nprefix = \"old:\"\nmax_age_s = 1\nmax_messages = 1000\n"
                    .into(),
            ),
            ..Default::default()
        },
    )
    .await;
    let publisher = client(&relay.url()).await;
    for i in 1..=20 {
        publisher
            .publish("kept", &format!("k{i}"), &json!(i))
            .await
            .unwrap();
    }
    for i in 1..=3 {
        publisher
            .publish("old:x", &format!("o{i}"), &json!(i))
            .await
            .unwrap();
    }
    eventually("retention ran", || async {
        metric(&relay, "keel_evictions_total{kind=\"retention\"}").await >= 18.0
    })
    .await;
    let mut ws = session(&relay.url()).await;
    ws.send(json!({"type": "subscribe", "channel": "kept", "from": 1}))
        .await;
    let t = ws.next_answer().await;
    assert_eq!(
        t,
        json!({"type": "truncated", "channel": "kept", "from": 1, "first": 16})
    );
    let mut offsets = Vec::new();
    while offsets.len() < 5 {
        let d = ws.next_json().await;
        offsets.push(d["offset"].as_u64().unwrap());
    }
    assert_eq!(offsets, [16, 17, 18, 19, 20]);
    // Everything of old:x aged out: the notice names the next offset.
    ws.send(json!({"type": "subscribe", "channel": "old:x", "from": 2}))
        .await;
    let t = ws.next_answer().await;
    assert_eq!(
        t,
        json!({"type": "truncated", "channel": "old:x", "from": 2, "first": 4})
    );
    // New messages continue the offsets; nothing is reused.
    let next = publisher.publish("old:x", "o4", &json!(4)).await.unwrap();
    assert_eq!(next, 4);
}

/// Sessions without a connection for the TTL are purged (their token opens
/// nothing any more); a connected one is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ttl_purges() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            config: Some("[retention]\nsession_ttl_s = 1\ninterval_s = 1\n".into()),
            ..Default::default()
        },
    )
    .await;
    let mut gone = RawWs::connect(&relay.url()).await;
    gone.send(json!({"type": "hello"})).await;
    let token = gone.next_json().await["token"].as_str().unwrap().to_owned();
    drop(gone);
    let mut kept = session(&relay.url()).await;
    eventually("the idle session is purged", || async {
        metric(&relay, "keel_evictions_total{kind=\"session_ttl\"}").await >= 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut again = RawWs::connect(&relay.url()).await;
    again.send(json!({"type": "hello", "token": token})).await;
    let e = again.next_json().await;
    assert_eq!(e["code"], "unauthorized", "{e}");
    // The connected session was never idle.
    still_up_raw(&mut kept).await;
    assert_eq!(
        metric(&relay, "keel_evictions_total{kind=\"session_ttl\"}").await,
        1.0
    );
}

/// Replay pages count what they hold, not the page size they may reach:
/// hundreds of subscribes of small logs at once fit a small outbound
/// budget, and nobody is closed for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_replays_count_what_they_hold() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            config: Some(
                "[limits]\nglobal_buffer_bytes = 3145728\nmax_inbound_bytes = 1048576\nmax_outbound_bytes = 1572864\nreplay_page_bytes = 1048576\n"
                    .into(),
            ),
            ..Default::default()
        },
    )
    .await;
    let publisher = client(&relay.url()).await;
    let channels = 10;
    for c in 0..channels {
        publisher
            .publish(&format!("small-{c}"), "m1", &json!("x"))
            .await
            .unwrap();
    }
    // 40 sessions subscribe to all ten at once: 400 replays of a few bytes
    // (at a whole page each, they would claim 400 MiB of a 1.5 MiB half).
    let mut readers = Vec::new();
    for _ in 0..40 {
        let mut ws = session(&relay.url()).await;
        for c in 0..channels {
            ws.send(json!({"type": "subscribe", "channel": format!("small-{c}"), "from": 1}))
                .await;
        }
        readers.push(ws);
    }
    for ws in &mut readers {
        let mut got = 0;
        while got < channels {
            if ws.next_json().await["type"] == "deliver" {
                got += 1;
            }
        }
    }
    let evicted = metric(&relay, "keel_limit_hits_total{limit=\"global_bytes\"}").await;
    assert_eq!(evicted, 0.0, "nobody closed for the budget");
}
