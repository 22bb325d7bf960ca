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

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Barrier;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const RAW_CHILD: &str = "KEEL_BENCH_RAW_SERVER";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn wanted(part: &str) -> bool {
    std::env::var("KEEL_BENCH_ONLY").map_or(true, |v| v.split(',').any(|p| p == part))
}

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

struct Server {
    child: tokio::process::Child,
    addr: SocketAddr,
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    async fn relay(config: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("relay.toml");
        std::fs::write(&cfg, config).unwrap();
        let mut command = match std::env::var("KEEL_BENCH_SERVER_CPUS") {
            // e.g. "0": the server on its own core, the measuring clients
            // (run this bench under `taskset -c 1`) on the other.
            Ok(cpus) => {
                let mut c = tokio::process::Command::new("taskset");
                c.args(["-c", &cpus, env!("CARGO_BIN_EXE_keel-relay")]);
                c
            }
            Err(_) => tokio::process::Command::new(env!("CARGO_BIN_EXE_keel-relay")),
        };
        let mut child = command
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let addr = first_line_addr(&mut child, "keel-relay listening on ").await;
        Server {
            child,
            addr,
            _dir: Some(dir),
        }
    }

    async fn raw() -> Server {
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

    fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    fn rss_kib(&self) -> u64 {
        let pid = self.child.id().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

async fn first_line_addr(child: &mut tokio::process::Child, prefix: &str) -> SocketAddr {
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = out.next_line().await.unwrap().unwrap();
    // Keep draining so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
    line.strip_prefix(prefix)
        .unwrap_or_else(|| panic!("unexpected line {line}"))
        .parse()
        .unwrap()
}

const RELAY_CONFIG: &str = r#"
[limits]
max_connections_per_ip = 20000
publish_rate = 1000000
publish_burst = 1000000
outbound_queue = 65536
max_in_flight = 1024
handshake_timeout_ms = 120000
idle_timeout_ms = 600000
"#;

// ------------------------------------------------------------------ clients

async fn connect(url: &str) -> Ws {
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(4096);
    loop {
        match tokio_tungstenite::connect_async_with_config(url, Some(config), true).await {
            Ok((ws, _)) => return ws,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn next_text(ws: &mut Ws) -> Option<String> {
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Text(t)) => return Some(t.as_str().to_owned()),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
    None
}

/// Connects and says hello; returns once welcomed.
async fn hello(url: &str) -> Ws {
    let mut ws = connect(url).await;
    ws.send(Message::text(r#"{"type":"hello"}"#)).await.unwrap();
    loop {
        let t = next_text(&mut ws).await.expect("welcome");
        if t.contains("\"welcome\"") {
            return ws;
        }
    }
}

// ------------------------------------------------------------ 1. sessions

async fn connect_many(url: &str, n: usize) -> (Vec<Ws>, Duration) {
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(500));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (url, sem) = (url.to_owned(), sem.clone());
        tasks.spawn(async move {
            let _p = sem.acquire().await.unwrap();
            hello(&url).await
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(ws) = tasks.join_next().await {
        all.push(ws.unwrap());
    }
    (all, started.elapsed())
}

async fn sessions() -> String {
    let n = env_usize("KEEL_BENCH_SESSIONS", 10_000);
    let mut rows = Vec::new();
    for (name, server) in [
        ("raw tokio-tungstenite", Server::raw().await),
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

// -------------------------------------------------------------- 2. fan-out

/// Subscribers that count deliver frames of the timed phase (payloads with
/// `"i":`) until the last one; each reports when it had them all. `ready`
/// counts subscribers that have seen a warm-up delivery.
async fn subscribers(
    url: &str,
    n: usize,
    channel: &str,
    expect: u64,
    relay: bool,
    ready: Arc<AtomicU64>,
) -> (Arc<AtomicU64>, tokio::task::JoinSet<Option<Instant>>) {
    let delivered = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(200));
    for _ in 0..n {
        let (url, delivered, ready, sem) = (
            url.to_owned(),
            delivered.clone(),
            ready.clone(),
            sem.clone(),
        );
        let sub = format!(r#"{{"type":"subscribe","channel":"{channel}","from":1}}"#);
        tasks.spawn(async move {
            let mut ws = {
                let _p = sem.acquire().await.unwrap();
                if relay {
                    hello(&url).await
                } else {
                    connect(&url).await
                }
            };
            ws.send(Message::text(sub)).await.unwrap();
            let mut warm = false;
            let mut got = 0u64;
            while got < expect {
                match ws.next().await {
                    Some(Ok(Message::Text(t)))
                        if t.as_str().starts_with("{\"type\":\"deliver\"") =>
                    {
                        if t.as_str().contains("\"i\":") {
                            got += 1;
                            delivered.fetch_add(1, Ordering::Relaxed);
                        } else if !warm {
                            warm = true;
                            ready.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => return None,
                }
            }
            Some(Instant::now())
        });
    }
    (delivered, tasks)
}

/// Sends `n` publish frames to `channel` as fast as the socket takes them,
/// with at most `window` unacknowledged (relay) or none awaited (raw). Before
/// that, while `warm` is given, sends warm-up messages every 20 ms until
/// `warm.1` subscribers have seen one.
async fn publisher(
    url: &str,
    channel: &str,
    n: u64,
    window: u64,
    relay: bool,
    warm: Option<(Arc<AtomicU64>, u64)>,
) -> Option<Instant> {
    let ws = if relay {
        hello(url).await
    } else {
        connect(url).await
    };
    let (mut tx, mut rx) = ws.split();
    let acked = Arc::new(AtomicU64::new(0));
    let notify = Arc::new(tokio::sync::Notify::new());
    let reader = {
        let (acked, notify) = (acked.clone(), notify.clone());
        tokio::spawn(async move {
            while let Some(Ok(m)) = rx.next().await {
                if let Message::Text(t) = m
                    && t.as_str().starts_with("{\"type\":\"published\"")
                {
                    acked.fetch_add(1, Ordering::Relaxed);
                    notify.notify_one();
                }
            }
        })
    };
    let id_base = keel_relay::client::new_message_id();
    let mut sent = 0u64;
    if let Some((ready, want)) = warm {
        let mut k = 0;
        while ready.load(Ordering::Relaxed) < want {
            let frame = format!(
                r#"{{"type":"publish","channel":"{channel}","id":"{id_base}-w{k:06}","payload":{{"warm":{k}}}}}"#
            );
            tx.send(Message::text(frame)).await.unwrap();
            k += 1;
            sent += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let started = Instant::now();
    let pad = "x".repeat(40);
    for i in 0..n {
        while relay && sent + i >= acked.load(Ordering::Relaxed) + window {
            notify.notified().await;
        }
        let frame = format!(
            r#"{{"type":"publish","channel":"{channel}","id":"{id_base}-{i:08}","payload":{{"p":"{pad}","i":{i}}}}}"#
        );
        tx.feed(Message::text(frame)).await.unwrap();
        if i % 32 == 31 {
            tx.flush().await.unwrap();
        }
    }
    tx.flush().await.unwrap();
    if relay {
        while acked.load(Ordering::Relaxed) < sent + n {
            notify.notified().await;
        }
    }
    reader.abort();
    Some(started)
}

async fn fanout_once(server: &Server, subs: usize, messages: u64, relay: bool) -> (f64, Duration) {
    let channel = "fan";
    let ready = Arc::new(AtomicU64::new(0));
    let (delivered, mut tasks) =
        subscribers(&server.url(), subs, channel, messages, relay, ready.clone()).await;
    let url = server.url();
    let pubtask = tokio::spawn(async move {
        publisher(
            &url,
            channel,
            messages,
            4096,
            relay,
            Some((ready, subs as u64)),
        )
        .await
    });
    let mut last = None;
    let mut complete = 0;
    let limit = tokio::time::Instant::now() + Duration::from_secs(180);
    while let Ok(Some(r)) = tokio::time::timeout_at(limit, tasks.join_next()).await {
        if let Ok(Some(at)) = r {
            complete += 1;
            last = Some(last.map_or(at, |l: Instant| l.max(at)));
        }
    }
    let started = pubtask.await.unwrap().unwrap();
    let took = last.unwrap() - started;
    let total = delivered.load(Ordering::Relaxed);
    assert_eq!(
        complete, subs,
        "every subscriber got all {messages} ({total} delivered)"
    );
    (total as f64 / took.as_secs_f64(), took)
}

async fn fanout() -> String {
    let subs = env_usize("KEEL_BENCH_SUBSCRIBERS", 1000);
    let messages = env_usize("KEEL_BENCH_FANOUT_MESSAGES", 3000) as u64;
    let raw = Server::raw().await;
    let (raw_rate, raw_took) = fanout_once(&raw, subs, messages, false).await;
    println!(
        "fan-out bare broadcast: {:.0} deliveries/s ({raw_took:.2?})",
        raw_rate
    );
    drop(raw);
    let relay = Server::relay(RELAY_CONFIG).await;
    let (rate, took) = fanout_once(&relay, subs, messages, true).await;
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
    let raw = Server::raw().await;
    let (r50, r99, rmax) = latency_once(&raw, false, subs, rate).await;
    drop(raw);
    let config = format!(
        "batch_delay_us = {}\n{RELAY_CONFIG}",
        env_usize("KEEL_BENCH_BATCH_DELAY_US", 0)
    );
    let relay = Server::relay(&config).await;
    let (p50, p99, max) = latency_once(&relay, true, subs, rate).await;
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

/// Publish-to-deliver latency through `server`: returns p50, p99, max in ms.
async fn latency_once(server: &Server, relay: bool, subs: usize, rate: u64) -> (f64, f64, f64) {
    let seconds = 5u64;
    let total = rate * seconds;
    let epoch = Instant::now();
    let hist = Arc::new(std::sync::Mutex::new(
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap(),
    ));
    let ready = Arc::new(Barrier::new(subs + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..subs {
        let (url, hist, ready) = (server.url(), hist.clone(), ready.clone());
        tasks.spawn(async move {
            let mut ws = if relay {
                hello(&url).await
            } else {
                connect(&url).await
            };
            ws.send(Message::text(
                r#"{"type":"subscribe","channel":"lat","from":1}"#,
            ))
            .await
            .unwrap();
            ready.wait().await;
            let mut local =
                hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let mut got = 0;
            while got < total {
                let Some(t) = next_text(&mut ws).await else {
                    break;
                };
                // {"type":"deliver",...,"payload":{"t":MICROS}}
                if let Some(at) = t.rfind("\"t\":") {
                    let sent: u64 = t[at + 4..].trim_end_matches('}').parse().unwrap_or(0);
                    let now = epoch.elapsed().as_micros() as u64;
                    local.record(now.saturating_sub(sent).max(1)).ok();
                    got += 1;
                }
            }
            hist.lock().unwrap().add(&local).ok();
        });
    }
    ready.wait().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ws = if relay {
        hello(&server.url()).await
    } else {
        connect(&server.url()).await
    };
    let (mut tx, mut rx) = ws.split();
    let drain = tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
    let id_base = keel_relay::client::new_message_id();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let per_tick = rate / 1000;
    let mut i = 0;
    while i < total {
        tick.tick().await;
        for _ in 0..per_tick {
            let t = epoch.elapsed().as_micros() as u64;
            tx.feed(Message::text(format!(
                r#"{{"type":"publish","channel":"lat","id":"{id_base}-{i:08}","payload":{{"t":{t}}}}}"#
            )))
            .await
            .unwrap();
            i += 1;
        }
        tx.flush().await.unwrap();
    }
    let limit = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Ok(Some(_)) = tokio::time::timeout_at(limit, tasks.join_next()).await {}
    drain.abort();
    let h = hist.lock().unwrap();
    let p50 = h.value_at_quantile(0.5) as f64 / 1000.0;
    let p99 = h.value_at_quantile(0.99) as f64 / 1000.0;
    let max = h.max() as f64 / 1000.0;
    println!(
        "latency {}: {} samples, p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms",
        if relay {
            "keel-relay"
        } else {
            "bare broadcast"
        },
        h.len()
    );
    (p50, p99, max)
}

// ------------------------------------------------------------ raw server

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

async fn http_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = TcpStream::connect(host).await.unwrap();
    s.write_all(
        format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
