//! Chaos proxy overhead with no toxics (`cargo bench -p keel-faults`), against
//! a direct connection to the same server in the same run:
//!
//! - throughput: bytes/s from a client to a server that discards them;
//! - round trip: 100-byte echo, p50 and p99, and the latency the proxy adds.
//!
//! A summary pass prints the figures and ratios after criterion's report;
//! `KEEL_BENCH_SUMMARY_ONLY=1` runs only the summary.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use hdrhistogram::Histogram;
use keel_faults::{Proxy, ProxyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

const MIB: u64 = 1 << 20;

/// A server that reads and discards; reports each connection's byte count.
async fn discard_server() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<u64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0u64;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = tx.send(total);
            });
        }
    });
    (addr, rx)
}

async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn proxy(upstream: SocketAddr) -> Proxy {
    Proxy::start(ProxyConfig {
        name: "bench".into(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        upstream,
        seed: 0,
        protocol: keel_faults::Protocol::Tcp,
    })
    .await
    .expect("proxy")
}

/// Sends `mib` MiB to `to`; returns the time until the server read them all.
async fn blast(
    to: SocketAddr,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<u64>,
    mib: u64,
) -> Duration {
    let chunk = vec![0x42u8; 256 * 1024];
    let start = Instant::now();
    let mut s = TcpStream::connect(to).await.expect("connect");
    for _ in 0..mib * 4 {
        s.write_all(&chunk).await.expect("write");
    }
    s.shutdown().await.expect("shutdown");
    let got = rx.recv().await.expect("server count");
    assert_eq!(got, mib * MIB);
    start.elapsed()
}

async fn round_trips(to: SocketAddr, n: usize) -> Histogram<u64> {
    let mut s = TcpStream::connect(to).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let msg = [7u8; 100];
    let mut back = [0u8; 100];
    let mut hist = Histogram::<u64>::new(3).expect("hist");
    for i in 0..n + 200 {
        let start = Instant::now();
        s.write_all(&msg).await.expect("write");
        s.read_exact(&mut back).await.expect("read");
        if i >= 200 {
            hist.record(start.elapsed().as_nanos() as u64)
                .expect("record");
        }
    }
    hist
}

struct Setup {
    direct_sink: SocketAddr,
    direct_rx: tokio::sync::mpsc::UnboundedReceiver<u64>,
    proxied_rx: tokio::sync::mpsc::UnboundedReceiver<u64>,
    sink_proxy: Proxy,
    echo: SocketAddr,
    echo_proxy: Proxy,
}

fn setup(rt: &Runtime) -> Setup {
    rt.block_on(async {
        let (direct_sink, direct_rx) = discard_server().await;
        let (proxied_sink, proxied_rx) = discard_server().await;
        let sink_proxy = proxy(proxied_sink).await;
        let echo = echo_server().await;
        let echo_proxy = proxy(echo).await;
        Setup {
            direct_sink,
            direct_rx,
            proxied_rx,
            sink_proxy,
            echo,
            echo_proxy,
        }
    })
}

fn benches(c: &mut Criterion, rt: &Runtime, s: &mut Setup) {
    let mut group = c.benchmark_group("proxy_throughput");
    group.throughput(Throughput::Bytes(MIB));
    group.sample_size(10);
    group.bench_function("direct", |b| {
        b.iter_custom(|mib| rt.block_on(blast(s.direct_sink, &mut s.direct_rx, mib)))
    });
    let via = s.sink_proxy.listen_addr();
    group.bench_function("via_proxy", |b| {
        b.iter_custom(|mib| rt.block_on(blast(via, &mut s.proxied_rx, mib)))
    });
    group.finish();
}

fn summary(rt: &Runtime, s: &mut Setup) {
    let mib = 256;
    let best = |f: &mut dyn FnMut() -> Duration| (0..3).map(|_| f()).min().expect("runs");
    let direct = best(&mut || rt.block_on(blast(s.direct_sink, &mut s.direct_rx, mib)));
    let via = s.sink_proxy.listen_addr();
    let proxied = best(&mut || rt.block_on(blast(via, &mut s.proxied_rx, mib)));
    let rate = |d: Duration| (mib * MIB) as f64 / d.as_secs_f64() / MIB as f64;
    println!("\nkeel-faults proxy summary (best of 3, no toxics)");
    println!(
        "throughput, {mib} MiB: direct {:.0} MiB/s, via proxy {:.0} MiB/s, ratio {:.2}x (target >= 0.5x)",
        rate(direct),
        rate(proxied),
        rate(proxied) / rate(direct)
    );
    println!(
        "figure | proxy throughput, {mib} MiB one way | {:.0} | MiB/s | direct TCP | {:.0} | >= 0.5x | {}",
        rate(proxied),
        rate(direct),
        if rate(proxied) / rate(direct) >= 0.5 {
            "MET"
        } else {
            "NOT MET"
        }
    );
    let n = 20_000;
    let d = rt.block_on(round_trips(s.echo, n));
    let p = rt.block_on(round_trips(s.echo_proxy.listen_addr(), n));
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e3;
    println!(
        "round trip, 100 B x {n}: direct p50 {:.1} us p99 {:.1} us; via proxy p50 {:.1} us p99 {:.1} us; added p50 {:.1} us (target <= 50 us)",
        us(&d, 0.5),
        us(&d, 0.99),
        us(&p, 0.5),
        us(&p, 0.99),
        us(&p, 0.5) - us(&d, 0.5)
    );
    println!(
        "figure | proxy round trip p50, 100 B | {:.1} | us | direct TCP | {:.1} | <= +50 us | {}",
        us(&p, 0.5),
        us(&d, 0.5),
        if us(&p, 0.5) - us(&d, 0.5) <= 50.0 {
            "MET"
        } else {
            "NOT MET"
        }
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut setup = setup(&rt);
    if std::env::var_os("KEEL_BENCH_SUMMARY_ONLY").is_none() {
        let mut c = Criterion::default().configure_from_args();
        benches(&mut c, &rt, &mut setup);
        c.final_summary();
    }
    if !std::env::args().any(|a| a == "--list") {
        summary(&rt, &mut setup);
    }
}
