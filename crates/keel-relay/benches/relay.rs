//! keel-relay against baselines measured in the same run.
//!
//! `cargo bench -p keel-relay --bench relay` (release build of the relay
//! binary, run as its own process on 127.0.0.1). Four figures:
//!
//! 1. sessions: 10,000 clients connect and say hello; connect time and the
//!    server's RSS per idle session, against a raw tokio-tungstenite server
//!    (4 KiB buffers, same handshake) in a child process. Target ≤ 16 KiB.
//! 2. fan-out: 1,000 subscribers of one channel, a pipelined publisher,
//!    durable log on: deliveries/s, against a bare broadcast server with
//!    per-connection write batching. Target ≥ 0.5x and ≥ 1,000,000/s.
//! 3. publishes: 64 publishers pipelining durable publishes to their own
//!    channels: acknowledged publishes/s, against keel-session appends by 64
//!    in-process writers (no network). Target ≥ 50,000/s.
//! 4. latency: 100 subscribers, 10,000 msgs/s paced: publish-to-deliver
//!    p50/p99. Target p99 ≤ 5 ms.
//!
//! Scale with `KEEL_BENCH_SESSIONS`, `KEEL_BENCH_SUBSCRIBERS`,
//! `KEEL_BENCH_FANOUT_MESSAGES`, `KEEL_BENCH_PUBLISHES`; pick parts with
//! `KEEL_BENCH_ONLY=sessions,fanout,publishes,latency`.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;

use common::*;

const RAW_CHILD: &str = "KEEL_BENCH_RAW_SERVER";

fn main() {
    if std::env::var(RAW_CHILD).is_ok() {
        raw::serve();
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut lines = Vec::new();
        if wanted("sessions") {
            lines.push(sessions().await);
        }
        if wanted("fanout") {
            lines.push(fanout().await);
        }
        if wanted("publishes") {
            lines.push(publishes().await);
        }
        if wanted("latency") {
            // The measuring side on one thread, so that it does not take both
            // cores from the relay it measures.
            let line = std::thread::spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(latency())
            })
            .join()
            .unwrap();
            lines.push(line);
        }
        println!("\nkeel-relay summary");
        for l in lines {
            println!("{l}");
        }
    });
}

// ---------------------------------------------------------------- processes

// ------------------------------------------------------------ 1. sessions

async fn sessions() -> String {
    let n = env_usize("KEEL_BENCH_SESSIONS", 10_000);
    let mut rows = Vec::new();
    for (name, server) in [
        ("raw tokio-tungstenite", raw_server().await),
        ("keel-relay", Server::relay(RELAY_CONFIG).await),
    ] {
        // Warm up allocator and runtime with a few connections first.
        let (warm, _) = connect_many(&server.url(), 20).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = server.rss_kib();
        let (conns, took) = connect_many(&server.url(), n).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = server.rss_kib();
        let per = (after.saturating_sub(before)) as f64 / n as f64;
        println!(
            "sessions {name}: {n} connected and welcomed in {took:.2?}; RSS {before} -> {after} KiB = {per:.1} KiB per idle session"
        );
        rows.push((name, took, per));
        drop(conns);
        drop(warm);
        drop(server);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (raw, relay) = (&rows[0], &rows[1]);
    println!(
        "figure | relay RSS per idle session, {n} sessions | {:.1} | KiB | raw tokio-tungstenite server | {:.1} | <= 16 KiB | {}",
        relay.2,
        raw.2,
        if relay.2 <= 16.0 { "MET" } else { "NOT MET" }
    );
    format!(
        "1. {n} sessions: relay {:.2?} to connect, {:.1} KiB per idle session (raw server {:.2?}, {:.1} KiB; {:.2}x); target <= 16 KiB: {}",
        relay.1,
        relay.2,
        raw.1,
        raw.2,
        relay.2 / raw.2.max(0.1),
        if relay.2 <= 16.0 { "MET" } else { "NOT MET" }
    )
}

async fn fanout() -> String {
    let subs = env_usize("KEEL_BENCH_SUBSCRIBERS", 1000);
    let messages = env_usize("KEEL_BENCH_FANOUT_MESSAGES", 3000) as u64;
    let raw = raw_server().await;
    let (raw_rate, raw_took) = fanout_once(&[raw.url()], &raw.url(), subs, messages, false).await;
    println!(
        "fan-out bare broadcast: {:.0} deliveries/s ({raw_took:.2?})",
        raw_rate
    );
    drop(raw);
    let relay = Server::relay(RELAY_CONFIG).await;
    let (rate, took) = fanout_once(&[relay.url()], &relay.url(), subs, messages, true).await;
    let metrics = http_get(&format!("http://{}/metrics", relay.addr)).await;
    for line in metrics.lines().filter(|l| {
        l.starts_with("keel_gap")
            || l.starts_with("keel_start_replays")
            || l.starts_with("keel_slow")
    }) {
        println!("  relay metric {line}");
    }
    println!("fan-out keel-relay: {rate:.0} deliveries/s ({took:.2?})");
    let ratio = rate / raw_rate;
    println!(
        "figure | durable fan-out, {subs} subscribers | {rate:.0} | deliveries/s | bare broadcast server | {raw_rate:.0} | >= 0.5x and >= 1,000,000/s | {}",
        if ratio >= 0.5 && rate >= 1_000_000.0 {
            "MET"
        } else {
            "NOT MET"
        }
    );
    format!(
        "2. fan-out {messages} x {subs} subscribers, durable: relay {rate:.0} deliveries/s vs bare broadcast {raw_rate:.0}/s = {ratio:.2}x; target >= 0.5x and >= 1,000,000/s: {}",
        if ratio >= 0.5 && rate >= 1_000_000.0 {
            "MET"
        } else {
            "NOT MET"
        }
    )
}

// ------------------------------------------------------------ 3. publishes

async fn publishes() -> String {
    let publishers = 64;
    let total = env_usize("KEEL_BENCH_PUBLISHES", 200_000) as u64;
    let per = total / publishers;

    // Baseline: keel-session appends by 64 writers in this process.
    let dir = tempfile::tempdir().unwrap();
    let store = keel_session::Store::open(&dir.path().join("b.db"), Default::default())
        .await
        .unwrap();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..publishers {
        let store = store.clone();
        tasks.spawn(async move {
            // Pipelined like the relay's publishers: up to 512 in flight.
            let id_base = keel_relay::client::new_message_id();
            let channel = format!("ch-{p}");
            let mut in_flight = futures::stream::FuturesOrdered::new();
            for i in 0..per {
                if in_flight.len() >= 512 {
                    in_flight.next().await;
                }
                let (store, channel, id) =
                    (store.clone(), channel.clone(), format!("{id_base}-{i:08}"));
                in_flight.push_back(async move {
                    store.append(&channel, &id, &[b'x'; 60]).await.unwrap()
                });
            }
            while in_flight.next().await.is_some() {}
        });
    }
    while tasks.join_next().await.is_some() {}
    let base_rate = (per * publishers) as f64 / started.elapsed().as_secs_f64();
    store.close().await.unwrap();
    println!(
        "publishes baseline keel-session, 64 in-process writers, 512 in flight each: {base_rate:.0}/s"
    );

    let relay = Server::relay(RELAY_CONFIG).await;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..publishers {
        let url = relay.url();
        tasks.spawn(async move {
            publisher(&url, &format!("ch-{p}"), per, 512, true, None).await;
        });
    }
    while tasks.join_next().await.is_some() {}
    let rate = (per * publishers) as f64 / started.elapsed().as_secs_f64();
    println!("publishes keel-relay, 64 publishers: {rate:.0} acknowledged/s");
    println!(
        "figure | durable acknowledged publishes, 64 publishers | {rate:.0} | /s | keel-session in-process | {base_rate:.0} | >= 50,000/s | {}",
        if rate >= 50_000.0 { "MET" } else { "NOT MET" }
    );
    format!(
        "3. durable acknowledged publishes, 64 publishers: {rate:.0}/s ({:.2}x keel-session in-process {base_rate:.0}/s); target >= 50,000/s: {}",
        rate / base_rate,
        if rate >= 50_000.0 { "MET" } else { "NOT MET" }
    )
}

// -------------------------------------------------------------- 4. latency

async fn latency() -> String {
    let subs = env_usize("KEEL_BENCH_LAT_SUBSCRIBERS", 100);
    let rate = env_usize("KEEL_BENCH_LAT_RATE", 10_000) as u64;
    let raw = raw_server().await;
    let (r, _) = latency_once(&[raw.url()], &raw.url(), false, subs, rate).await;
    let (r50, r99, rmax) = (r.p50, r.p99, r.max);
    println!("latency bare broadcast: {r}");
    drop(raw);
    let config = format!(
        "batch_delay_us = {}\n{RELAY_CONFIG}",
        env_usize("KEEL_BENCH_BATCH_DELAY_US", 0)
    );
    let relay = Server::relay(&config).await;
    let (q, _) = latency_once(&[relay.url()], &relay.url(), true, subs, rate).await;
    let (p50, p99, max) = (q.p50, q.p99, q.max);
    println!("latency keel-relay: {q}");
    let metrics = http_get(&format!("http://{}/metrics", relay.addr)).await;
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("keel_publish_commit_seconds_") || l.starts_with("keel_store_"))
    {
        println!("  relay metric {line}");
    }
    println!(
        "figure | publish-to-deliver p99, {rate} msgs/s to {subs} subscribers | {p99:.2} | ms | bare broadcast (no durability) | {r99:.2} | <= 5 ms | {}",
        if p99 <= 5.0 { "MET" } else { "NOT MET" }
    );
    format!(
        "4. publish-to-deliver at {rate} msgs/s to {subs} subscribers: relay p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.1} ms (bare broadcast, no durability: p50 {r50:.2}, p99 {r99:.2}, max {rmax:.1}); target p99 <= 5 ms: {}",
        if p99 <= 5.0 { "MET" } else { "NOT MET" }
    )
}

// ------------------------------------------------------------ raw server

/// The bare tokio-tungstenite server (this bench, run as a child process).
async fn raw_server() -> Server {
    let exe = std::env::current_exe().unwrap();
    let mut command = match std::env::var("KEEL_BENCH_SERVER_CPUS") {
        Ok(cpus) => {
            let mut c = tokio::process::Command::new("taskset");
            c.arg("-c").arg(cpus).arg(&exe);
            c
        }
        Err(_) => tokio::process::Command::new(&exe),
    };
    let mut child = command
        .env(RAW_CHILD, "1")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr = first_line_addr(&mut child, "raw listening on ").await;
    Server {
        child,
        addr,
        _dir: None,
    }
}

mod raw {
    //! The baseline: a bare tokio-tungstenite server with 4 KiB buffers. A
    //! `hello` gets a welcome; `subscribe` joins a broadcast; `publish` is
    //! broadcast as a deliver frame; writes are batched per connection.

    use std::sync::Arc;

    use futures::{SinkExt, StreamExt};
    use tokio::sync::broadcast;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

    pub(super) fn serve() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_reuseaddr(true).unwrap();
            socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let listener = socket.listen(4096).unwrap();
            println!("raw listening on {}", listener.local_addr().unwrap());
            let (tx, _) = broadcast::channel::<Arc<str>>(65536);
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let config = WebSocketConfig::default()
                        .read_buffer_size(4096)
                        .write_buffer_size(4096);
                    let Ok(ws) =
                        tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
                    else {
                        return;
                    };
                    connection(ws, tx).await;
                });
            }
        });
    }

    async fn connection(
        ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
        tx: broadcast::Sender<Arc<str>>,
    ) {
        let (mut sink, mut stream) = ws.split();
        let mut rx: Option<broadcast::Receiver<Arc<str>>> = None;
        let mut offset = 0u64;
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(Ok(Message::Text(t))) = msg else { return };
                    let t = t.as_str();
                    if t.contains("\"hello\"") {
                        if sink.send(Message::text(r#"{"type":"welcome","session_id":"raw"}"#)).await.is_err() { return; }
                    } else if t.contains("\"subscribe\"") {
                        rx = Some(tx.subscribe());
                    } else if let Some(p) = t.find("\"payload\":") {
                        offset += 1;
                        let frame: Arc<str> = Arc::from(format!(
                            r#"{{"type":"deliver","channel":"fan","offset":{offset},"id":"x","payload":{}"#,
                            &t[p + 10..]
                        ));
                        let _ = tx.send(frame);
                    }
                }
                m = async { match &mut rx { Some(r) => r.recv().await.ok(), None => std::future::pending().await } } => {
                    let Some(first) = m else { return };
                    if sink.feed(Message::text(first.to_string())).await.is_err() { return; }
                    let mut n = 1;
                    while n < 64 {
                        match rx.as_mut().map(|r| r.try_recv()) {
                            Some(Ok(f)) => {
                                if sink.feed(Message::text(f.to_string())).await.is_err() { return; }
                                n += 1;
                            }
                            _ => break,
                        }
                    }
                    if sink.flush().await.is_err() { return; }
                }
            }
        }
    }
}
