//! What the relay's benches share: relay processes, WebSocket clients, and
//! the fan-out, publish and latency workloads, each against one or several
//! relay URLs.

#![allow(dead_code)]

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

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub(crate) fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub(crate) fn wanted(part: &str) -> bool {
    std::env::var("KEEL_BENCH_ONLY").map_or(true, |v| v.split(',').any(|p| p == part))
}

pub(crate) struct Server {
    pub(crate) child: tokio::process::Child,
    pub(crate) addr: SocketAddr,
    pub(crate) _dir: Option<tempfile::TempDir>,
}

impl Server {
    pub(crate) async fn relay(config: &str) -> Server {
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

    pub(crate) fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub(crate) fn rss_kib(&self) -> u64 {
        let pid = self.child.id().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

pub(crate) async fn first_line_addr(child: &mut tokio::process::Child, prefix: &str) -> SocketAddr {
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = out.next_line().await.unwrap().unwrap();
    // Keep draining so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
    line.strip_prefix(prefix)
        .unwrap_or_else(|| panic!("unexpected line {line}"))
        .parse()
        .unwrap()
}

pub(crate) const RELAY_CONFIG: &str = r#"
[limits]
max_connections_per_ip = 20000
publish_rate = 1000000
publish_burst = 1000000
session_rate = 1000000
session_burst = 1000000
outbound_queue = 65536
max_in_flight = 1024
handshake_timeout_ms = 120000
idle_timeout_ms = 600000
"#;

// ------------------------------------------------------------------ clients

pub(crate) async fn connect(url: &str) -> Ws {
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

pub(crate) async fn next_text(ws: &mut Ws) -> Option<String> {
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
pub(crate) async fn hello(url: &str) -> Ws {
    let mut ws = connect(url).await;
    ws.send(Message::text(r#"{"type":"hello"}"#)).await.unwrap();
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str().contains("\"welcome\"") => return ws,
            Some(Ok(Message::Close(frame))) => panic!("closed before welcome: {frame:?}"),
            Some(Ok(_)) => {}
            other => panic!("no welcome: {other:?}"),
        }
    }
}

pub(crate) async fn connect_many(url: &str, n: usize) -> (Vec<Ws>, Duration) {
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

// ---------------------------------------------------------------- fan-out

/// Subscribers that count deliver frames of the timed phase (payloads with
/// `"i":`) until the last one; each reports when it had them all. `ready`
/// counts subscribers that have seen a warm-up delivery. Subscriber `k`
/// connects to `urls[k % urls.len()]`.
pub(crate) async fn subscribers(
    urls: &[String],
    n: usize,
    channel: &str,
    expect: u64,
    relay: bool,
    ready: Arc<AtomicU64>,
) -> (Arc<AtomicU64>, tokio::task::JoinSet<Option<Instant>>) {
    let delivered = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(200));
    for k in 0..n {
        let (url, delivered, ready, sem) = (
            urls[k % urls.len()].clone(),
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
pub(crate) async fn publisher(
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

/// `messages` published on `pub_url`, each delivered to `subs` subscribers
/// spread over `sub_urls`: deliveries/s over the timed phase, and how long it
/// took.
pub(crate) async fn fanout_once(
    sub_urls: &[String],
    pub_url: &str,
    subs: usize,
    messages: u64,
    relay: bool,
) -> (f64, Duration) {
    let channel = "fan";
    let ready = Arc::new(AtomicU64::new(0));
    let (delivered, mut tasks) =
        subscribers(sub_urls, subs, channel, messages, relay, ready.clone()).await;
    let url = pub_url.to_owned();
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

/// Latency quantiles in ms: p50, p99, max.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Quantiles {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    pub(crate) samples: u64,
}

impl Quantiles {
    pub(crate) fn of(h: &hdrhistogram::Histogram<u64>) -> Quantiles {
        Quantiles {
            p50: h.value_at_quantile(0.5) as f64 / 1000.0,
            p99: h.value_at_quantile(0.99) as f64 / 1000.0,
            max: h.max() as f64 / 1000.0,
            samples: h.len(),
        }
    }
}

impl std::fmt::Display for Quantiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms ({} samples)",
            self.p50, self.p99, self.max, self.samples
        )
    }
}

pub(crate) fn histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap()
}

/// Publish-to-deliver latency: one publisher on `pub_url` paced at `rate`
/// msgs/s for 5 s, `subs` subscribers spread over `sub_urls`. Returns the
/// quantiles of subscribers on the publisher's URL (local) and of those on
/// other URLs (remote: another node of a cluster).
pub(crate) async fn latency_once(
    sub_urls: &[String],
    pub_url: &str,
    relay: bool,
    subs: usize,
    rate: u64,
) -> (Quantiles, Quantiles) {
    let seconds = 5u64;
    let total = rate * seconds;
    let epoch = Instant::now();
    let local = Arc::new(std::sync::Mutex::new(histogram()));
    let remote = Arc::new(std::sync::Mutex::new(histogram()));
    let ready = Arc::new(Barrier::new(subs + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..subs {
        let url = sub_urls[k % sub_urls.len()].clone();
        let hist = if url == pub_url {
            local.clone()
        } else {
            remote.clone()
        };
        let ready = ready.clone();
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
            let mut mine = histogram();
            let mut got = 0;
            while got < total {
                let Some(t) = next_text(&mut ws).await else {
                    break;
                };
                // {"type":"deliver",...,"payload":{"t":MICROS}}
                if let Some(at) = t.rfind("\"t\":") {
                    let sent: u64 = t[at + 4..].trim_end_matches('}').parse().unwrap_or(0);
                    let now = epoch.elapsed().as_micros() as u64;
                    mine.record(now.saturating_sub(sent).max(1)).ok();
                    got += 1;
                }
            }
            hist.lock().unwrap().add(&mine).ok();
        });
    }
    ready.wait().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ws = if relay {
        hello(pub_url).await
    } else {
        connect(pub_url).await
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
    // A subscriber that had not finished by the limit took its samples
    // with it: the quantiles would be of the fast ones only.
    assert!(
        tasks.is_empty(),
        "{} of {subs} subscribers did not receive all {total} messages within 60 s",
        tasks.len()
    );
    let local = Quantiles::of(&local.lock().unwrap());
    let remote = Quantiles::of(&remote.lock().unwrap());
    (local, remote)
}

pub(crate) async fn http_get(url: &str) -> String {
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
