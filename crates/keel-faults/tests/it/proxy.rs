//! The chaos proxy: byte-exact by default; each toxic, cut and partition observable.

use std::time::{Duration, Instant};

use keel_faults::{PartitionMode, Stream, Toxic, ToxicKind};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{echo_server, proxy_to, read_sizes_server, round_trip};

fn toxic(name: &str, stream: Stream, kind: ToxicKind) -> Toxic {
    Toxic::new(name, stream, kind)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Whatever is written, in whatever chunks, comes back byte for byte.
    #[test]
    fn byte_exact_without_toxics(
        payload in prop::collection::vec(any::<u8>(), 1..200_000),
        chunks in prop::collection::vec(1usize..20_000, 1..40),
    ) {
        rt().block_on(async {
            let proxy = proxy_to(echo_server().await, 1).await;
            let client = TcpStream::connect(proxy.listen_addr()).await.unwrap();
            let (mut read, mut write) = client.into_split();
            let expected = payload.clone();
            let writer = tokio::spawn(async move {
                let mut rest = &payload[..];
                let mut i = 0;
                while !rest.is_empty() {
                    let n = chunks[i % chunks.len()].min(rest.len());
                    write.write_all(&rest[..n]).await.unwrap();
                    rest = &rest[n..];
                    i += 1;
                }
                write.shutdown().await.unwrap();
            });
            let mut back = Vec::new();
            tokio::time::timeout(Duration::from_secs(20), read.read_to_end(&mut back)).await.unwrap().unwrap();
            writer.await.unwrap();
            assert_eq!(back.len(), expected.len());
            assert!(back == expected, "bytes differ");
            let stats = proxy.stats();
            assert_eq!(stats.bytes_upstream, expected.len() as u64);
            assert_eq!(stats.bytes_downstream, expected.len() as u64);
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_applies_to_a_live_connection() {
    let proxy = proxy_to(echo_server().await, 1).await;
    let mut c = TcpStream::connect(proxy.listen_addr()).await.unwrap();
    let start = Instant::now();
    round_trip(&mut c, b"ping", Duration::from_secs(2))
        .await
        .unwrap();
    let direct = start.elapsed();
    assert!(
        direct < Duration::from_millis(50),
        "{direct:?} without toxics"
    );

    proxy
        .add_toxic(toxic(
            "lag",
            Stream::Downstream,
            ToxicKind::Latency {
                latency: 150,
                jitter: 20,
            },
        ))
        .unwrap();
    for _ in 0..3 {
        let start = Instant::now();
        round_trip(&mut c, b"ping", Duration::from_secs(2))
            .await
            .unwrap();
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(130),
            "{took:?} is shorter than the latency"
        );
        assert!(
            took < Duration::from_millis(400),
            "{took:?} is far above latency + jitter"
        );
    }
    proxy.remove_toxic("lag").unwrap();
    let start = Instant::now();
    round_trip(&mut c, b"ping", Duration::from_secs(2))
        .await
        .unwrap();
    assert!(start.elapsed() < Duration::from_millis(100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_holds_data_until_removed() {
    let proxy = proxy_to(echo_server().await, 1).await;
    let mut c = TcpStream::connect(proxy.listen_addr()).await.unwrap();
    round_trip(&mut c, b"before", Duration::from_secs(2))
        .await
        .unwrap();
    proxy
        .add_toxic(toxic(
            "hole",
            Stream::Upstream,
            ToxicKind::Timeout { timeout: 0 },
        ))
        .unwrap();
    let stalled = round_trip(&mut c, b"during", Duration::from_millis(400)).await;
    assert_eq!(
        stalled.unwrap_err().kind(),
        std::io::ErrorKind::TimedOut,
        "nothing gets through a blackhole"
    );
    proxy.remove_toxic("hole").unwrap();
    // The held bytes are delivered once the toxic is gone.
    let mut back = vec![0u8; 6];
    tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"during");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_closes_after_its_time() {
    let proxy = proxy_to(echo_server().await, 1).await;
    let mut c = TcpStream::connect(proxy.listen_addr()).await.unwrap();
    round_trip(&mut c, b"x", Duration::from_secs(2))
        .await
        .unwrap();
    let start = Instant::now();
    proxy
        .add_toxic(toxic(
            "t",
            Stream::Downstream,
            ToxicKind::Timeout { timeout: 200 },
        ))
        .unwrap();
    c.write_all(b"lost").await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without delivering");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_millis(1_000),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_peer_gives_econnreset() {
    let proxy = proxy_to(echo_server().await, 1).await;
    let mut c = TcpStream::connect(proxy.listen_addr()).await.unwrap();
    round_trip(&mut c, b"x", Duration::from_secs(2))
        .await
        .unwrap();
    proxy
        .add_toxic(toxic(
            "rst",
            Stream::Downstream,
            ToxicKind::ResetPeer { timeout: 50 },
        ))
        .unwrap();
    let mut buf = [0u8; 16];
    let err = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_data_closes_after_n_bytes() {
    let proxy = proxy_to(echo_server().await, 1).await;
    proxy
        .add_toxic(toxic(
            "cap",
            Stream::Downstream,
            ToxicKind::LimitData { bytes: 1_000 },
        ))
        .unwrap();
    let c = TcpStream::connect(proxy.listen_addr()).await.unwrap();
    let (mut read, mut write) = c.into_split();
    tokio::spawn(async move {
        for _ in 0..10 {
            if write.write_all(&[7u8; 300]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), read.read_to_end(&mut back))
        .await
        .unwrap();
    assert_eq!(back.len(), 1_000, "exactly the limit, then closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slicer_splits_writes() {
    let (addr, mut sizes) = read_sizes_server().await;
    let proxy = proxy_to(addr, 1).await;
    proxy
        .add_toxic(toxic(
            "slice",
            Stream::Upstream,
            ToxicKind::Slicer {
                average_size: 100,
                size_variation: 20,
                delay: 3_000,
            },
        ))
        .unwrap();
    let mut c = TcpStream::connect(proxy.listen_addr()).await.unwrap();
    c.write_all(&[1u8; 2_000]).await.unwrap();
    c.shutdown().await.unwrap();
    let reads = tokio::time::timeout(Duration::from_secs(5), sizes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reads.iter().sum::<usize>(), 2_000);
    assert!(
        reads.len() >= 10,
        "one 2,000-byte write arrived in {} reads",
        reads.len()
    );
    assert!(reads.iter().all(|&n| n <= 120), "{reads:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_limits_throughput() {
    let proxy = proxy_to(echo_server().await, 1).await;
    proxy
        .add_toxic(toxic(
            "bw",
            Stream::Downstream,
            ToxicKind::Bandwidth { rate: 32 },
        ))
        .unwrap();
    let mut c = TcpStream::connect(proxy.listen_addr()).await.unwrap();
    let start = Instant::now();
    round_trip(&mut c, &[3u8; 24 * 1024], Duration::from_secs(5))
        .await
        .unwrap();
    let took = start.elapsed();
    // 24 KiB at 32 KiB/s: the first chunk is free, the rest must wait ~0.75 s in all.
    assert!(took >= Duration::from_millis(500), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_close_delays_the_close() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"bye").await.unwrap();
        // Server closes at once.
    });
    let proxy = proxy_to(addr, 1).await;
    proxy
        .add_toxic(toxic(
            "slow",
            Stream::Downstream,
            ToxicKind::SlowClose { delay: 300 },
        ))
        .unwrap();
    let mut c = TcpStream::connect(proxy.listen_addr()).await.unwrap();
    let start = Instant::now();
    let mut all = Vec::new();
    c.read_to_end(&mut all).await.unwrap();
    assert_eq!(all, b"bye");
    assert!(
        start.elapsed() >= Duration::from_millis(280),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toxicity_zero_is_a_no_op_and_toxicity_is_seeded() {
    let echo = echo_server().await;
    let proxy = proxy_to(echo, 1).await;
    proxy
        .add_toxic(Toxic {
            toxicity: 0.0,
            ..toxic("off", Stream::Upstream, ToxicKind::Timeout { timeout: 0 })
        })
        .unwrap();
    let mut c = TcpStream::connect(proxy.listen_addr()).await.unwrap();
    round_trip(&mut c, b"free", Duration::from_secs(1))
        .await
        .unwrap();

    // Which connections a 50% blackhole hits depends only on the seed.
    let pattern = |seed: u64| async move {
        let proxy = proxy_to(echo, seed).await;
        proxy
            .add_toxic(Toxic {
                toxicity: 0.5,
                ..toxic("half", Stream::Upstream, ToxicKind::Timeout { timeout: 0 })
            })
            .unwrap();
        let mut hit = Vec::new();
        for _ in 0..16 {
            let mut c = TcpStream::connect(proxy.listen_addr()).await.unwrap();
            hit.push(
                round_trip(&mut c, b"?", Duration::from_millis(150))
                    .await
                    .is_err(),
            );
        }
        hit
    };
    let a = pattern(42).await;
    assert_eq!(a, pattern(42).await, "same seed, same decisions");
    assert!(a.iter().any(|h| *h) && a.iter().any(|h| !*h), "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_drops_live_connections_only() {
    let proxy = proxy_to(echo_server().await, 1).await;
    let mut a = TcpStream::connect(proxy.listen_addr()).await.unwrap();
    let mut b = TcpStream::connect(proxy.listen_addr()).await.unwrap();
    round_trip(&mut a, b"a", Duration::from_secs(1))
        .await
        .unwrap();
    round_trip(&mut b, b"b", Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(proxy.cut(), 2);
    for c in [&mut a, &mut b] {
        let mut buf = [0u8; 4];
        let n = tokio::time::timeout(Duration::from_secs(1), c.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "a cut connection is closed");
    }
    let mut fresh = TcpStream::connect(proxy.listen_addr()).await.unwrap();
    round_trip(&mut fresh, b"new", Duration::from_secs(1))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_hangs_then_heals() {
    let proxy = proxy_to(echo_server().await, 1).await;
    let mut live = TcpStream::connect(proxy.listen_addr()).await.unwrap();
    round_trip(&mut live, b"1", Duration::from_secs(1))
        .await
        .unwrap();
    let started = Instant::now();
    proxy.partition(Duration::from_millis(600), PartitionMode::Hang);

    live.write_all(b"2").await.unwrap();
    let mut fresh = TcpStream::connect(proxy.listen_addr()).await.unwrap();
    fresh.write_all(b"3").await.unwrap();
    let mut buf = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), live.read_exact(&mut buf))
            .await
            .is_err(),
        "live traffic is blackholed"
    );
    // After the partition heals, both get their bytes.
    tokio::time::timeout(Duration::from_secs(2), live.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"2");
    tokio::time::timeout(Duration::from_secs(2), fresh.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"3");
    assert!(started.elapsed() >= Duration::from_millis(580));
    assert!(proxy.partitioned().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_refuses_then_heals() {
    let proxy = proxy_to(echo_server().await, 1).await;
    proxy.partition(Duration::from_millis(400), PartitionMode::Refuse);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let err = TcpStream::connect(proxy.listen_addr()).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut c = TcpStream::connect(proxy.listen_addr()).await.unwrap();
    round_trip(&mut c, b"ok", Duration::from_secs(1))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_refuses_and_enable_listens_again() {
    let proxy = proxy_to(echo_server().await, 1).await;
    proxy.set_enabled(false);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(TcpStream::connect(proxy.listen_addr()).await.is_err());
    proxy.set_enabled(true);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut c = TcpStream::connect(proxy.listen_addr()).await.unwrap();
    round_trip(&mut c, b"back", Duration::from_secs(1))
        .await
        .unwrap();
}
