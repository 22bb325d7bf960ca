//! keel-reconnect benchmarks (`cargo bench -p keel-reconnect`), each against
//! raw tokio-tungstenite to the same server, in the same run:
//!
//! - messages/s, 100-byte text frames, one flush per message;
//! - memory per idle connection: RSS growth of a child process holding 1,000
//!   idle connections, for `ReconnectingClient` and for raw streams with the
//!   same 4 KiB buffers. The server runs in another child process, so its
//!   memory is not counted.
//!
//! `KEEL_BENCH_SUMMARY_ONLY=1` skips criterion and prints only the summary.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use futures::{SinkExt, StreamExt};
use keel_reconnect::{Config, Message, Plain, ReconnectingClient, State};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(4096)
}

/// A server counting the data frames it receives, over all connections.
async fn counting_server(listener: TcpListener, count: Arc<AtomicU64>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let count = count.clone();
        tokio::spawn(async move {
            let Ok(mut ws) =
                tokio_tungstenite::accept_async_with_config(tcp, Some(ws_config())).await
            else {
                return;
            };
            while let Some(Ok(frame)) = ws.next().await {
                if frame.is_text() || frame.is_binary() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
}

async fn wait_count(count: &AtomicU64, target: u64) {
    while count.load(Ordering::Relaxed) < target {
        tokio::task::yield_now().await;
    }
}

fn payload() -> Message {
    Message::text("x".repeat(100))
}

type RawWs =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A raw tokio-tungstenite client with the same buffer sizes as the client's.
async fn raw_connect(addr: SocketAddr) -> RawWs {
    tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/"), Some(ws_config()), true)
        .await
        .expect("connect")
        .0
}

async fn raw_send(addr: SocketAddr, count: &AtomicU64, n: u64) -> Duration {
    let mut ws = raw_connect(addr).await;
    let base = count.load(Ordering::Relaxed);
    let start = Instant::now();
    for _ in 0..n {
        ws.send(payload()).await.expect("send");
    }
    wait_count(count, base + n).await;
    start.elapsed()
}

/// Raw, with the same write batching the client does: feed 64, flush once.
async fn raw_send_batched(addr: SocketAddr, count: &AtomicU64, n: u64) -> Duration {
    let mut ws = raw_connect(addr).await;
    let base = count.load(Ordering::Relaxed);
    let start = Instant::now();
    for i in 0..n {
        ws.feed(payload()).await.expect("feed");
        if i % 64 == 63 {
            ws.flush().await.expect("flush");
        }
    }
    ws.flush().await.expect("flush");
    wait_count(count, base + n).await;
    start.elapsed()
}

async fn client_send(client: &ReconnectingClient, count: &AtomicU64, n: u64) -> Duration {
    let base = count.load(Ordering::Relaxed);
    let start = Instant::now();
    for _ in 0..n {
        client.send(payload(), None).await.expect("send");
    }
    wait_count(count, base + n).await;
    start.elapsed()
}

async fn connected_client(addr: SocketAddr) -> ReconnectingClient {
    let (client, _inbound) =
        ReconnectingClient::start(format!("ws://{addr}/"), Plain, Config::default());
    let mut state = client.state();
    state
        .wait_for(|s| *s == State::Connected)
        .await
        .expect("state");
    client
}

fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// Child process: hold `n` idle connections of `kind`; print the RSS growth per connection.
fn hold(kind: &str, addr: SocketAddr, n: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        // Warm the runtime and allocator up with one connection of each kind first.
        let warm = connected_client(addr).await;
        let before = rss();
        let mut raws = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..n {
            match kind {
                "raw" => {
                    let ws = raw_connect(addr).await;
                    // Like any real client, an idle raw connection keeps a task
                    // reading (to see pings and the close) and its write half.
                    let (mut sink, mut stream) = ws.split();
                    sink.send(Message::Ping(Default::default()))
                        .await
                        .expect("ping");
                    tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
                    raws.push(sink);
                }
                _ => clients.push(connected_client(addr).await),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = rss();
        println!("{}", (after.saturating_sub(before)) / n as u64);
        drop(warm);
    });
}

fn spawn_self(args: &[&str]) -> Child {
    Command::new(std::env::current_exe().expect("exe"))
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child")
}

fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    line.trim().to_owned()
}

fn memory_per_connection(server: SocketAddr, kind: &str, n: usize) -> u64 {
    let mut child = spawn_self(&["--hold", kind, &server.to_string(), &n.to_string()]);
    let line = first_line(&mut child);
    let _ = child.wait();
    line.parse().expect("bytes per connection")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve") {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            println!("{}", listener.local_addr().expect("addr"));
            counting_server(listener, Arc::default()).await;
        });
        return;
    }
    if args.get(1).map(String::as_str) == Some("--hold") {
        hold(
            &args[2],
            args[3].parse().expect("addr"),
            args[4].parse().expect("n"),
        );
        return;
    }

    let rt: Runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    let count = Arc::new(AtomicU64::new(0));
    let addr = rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(counting_server(listener, count.clone()));
        addr
    });
    let client = rt.block_on(connected_client(addr));

    if std::env::var_os("KEEL_BENCH_SUMMARY_ONLY").is_none() && !args.iter().any(|a| a == "--list")
    {
        let mut c = Criterion::default().configure_from_args();
        let mut group = c.benchmark_group("messages");
        group.throughput(Throughput::Elements(1));
        group.sample_size(10);
        group.bench_function("raw_tungstenite", |b| {
            b.iter_custom(|n| rt.block_on(raw_send(addr, &count, n)))
        });
        group.bench_function("raw_tungstenite_batched", |b| {
            b.iter_custom(|n| rt.block_on(raw_send_batched(addr, &count, n)))
        });
        group.bench_function("reconnecting_client", |b| {
            b.iter_custom(|n| rt.block_on(client_send(&client, &count, n)))
        });
        group.finish();
        c.final_summary();
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }

    let n = 200_000;
    let best = |f: &mut dyn FnMut() -> Duration| (0..3).map(|_| f()).min().expect("runs");
    let raw = best(&mut || rt.block_on(raw_send(addr, &count, n)));
    let raw_batched = best(&mut || rt.block_on(raw_send_batched(addr, &count, n)));
    let ours = best(&mut || rt.block_on(client_send(&client, &count, n)));
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!("\nkeel-reconnect summary (best of 3)");
    println!(
        "messages/s, {n} x 100 B: raw tokio-tungstenite {:.0}/s (flush per message), raw batched {:.0}/s (flush per 64), ReconnectingClient {:.0}/s; ratio {:.2}x vs per-message raw, {:.2}x vs batched raw (target >= 0.8x)",
        rate(raw),
        rate(raw_batched),
        rate(ours),
        rate(ours) / rate(raw),
        rate(ours) / rate(raw_batched)
    );

    println!(
        "figure | ReconnectingClient messages/s, 100 B | {:.0} | /s | raw tokio-tungstenite, flush per message | {:.0} | >= 0.8x | {}",
        rate(ours),
        rate(raw),
        if rate(ours) / rate(raw) >= 0.8 {
            "MET"
        } else {
            "NOT MET"
        }
    );
    let mut server = spawn_self(&["--serve"]);
    let server_addr: SocketAddr = first_line(&mut server).parse().expect("server addr");
    let idle = 1_000;
    let raw_mem = memory_per_connection(server_addr, "raw", idle);
    let our_mem = memory_per_connection(server_addr, "client", idle);
    let _ = server.kill();
    let _ = server.wait();
    println!(
        "memory per idle connection, {idle} connections, 4 KiB buffers: raw {:.1} KiB, ReconnectingClient {:.1} KiB, ratio {:.2}x (target <= 2x)",
        raw_mem as f64 / 1024.0,
        our_mem as f64 / 1024.0,
        our_mem as f64 / raw_mem.max(1) as f64
    );
    println!(
        "figure | ReconnectingClient memory per idle connection | {:.1} | KiB | raw tokio-tungstenite | {:.1} | <= 2x | {}",
        our_mem as f64 / 1024.0,
        raw_mem as f64 / 1024.0,
        if our_mem as f64 / raw_mem.max(1) as f64 <= 2.0 {
            "MET"
        } else {
            "NOT MET"
        }
    );
}
