//! keel-relay in cluster mode (docs/cluster.md) beside the single node and beside
//! NATS JetStream, all measured in the same run.
//!
//! `cargo bench -p keel-relay --bench cluster` (or `cargo xtask bench
//! --cluster`). The cluster is 3 relay processes on a fresh database of the
//! PostgreSQL at `KEEL_PG_URL` and on the NATS at `KEEL_NATS_URL` (defaults:
//! the standard local ports); without them the bench says what to start and
//! exits 1. The peer is a `nats-server -js` of its own with a temporary
//! store (file storage), driven by async-nats clients. Four workloads, each
//! run on keel single node (SQLite), keel cluster and JetStream:
//!
//! 1. publishes: 64 publishers, 512 in flight each, to their own channels
//!    (subjects); acknowledged when durable (JetStream: the stream's publish
//!    ack, de-duplicated by `Nats-Msg-Id` as keel is by message id). Target:
//!    cluster ≥ 0.5x single node.
//! 2. latency: one publisher paced at 10,000 msgs/s for 5 s, 100 subscribers
//!    (cluster: spread over the 3 nodes, the publisher on node 0).
//!    Publish-to-deliver p50/p99 of subscribers on another node than the
//!    publisher's. Target: p99 ≤ 20 ms. JetStream is measured at this rate
//!    and at a tenth of it (below the fan-out it sustains here).
//! 3. fan-out: 3,000 messages to 1,000 subscribers (cluster: spread over the
//!    nodes; JetStream: ordered push consumers): deliveries/s.
//! 4. sessions: 45,000 sessions over the 3 nodes (3 holder processes of
//!    15,000: the open-file limit is 20,000 per process), 10,000 on the
//!    single node, 10,000 idle NATS connections: server RSS per session.
//!    Target: the cluster costs no more than 1.1x the single node per session.
//!
//! One markdown table at the end: keel single node, keel cluster, JetStream,
//! ratios. Scale with `KEEL_BENCH_PUBLISHES`, `KEEL_BENCH_SUBSCRIBERS`,
//! `KEEL_BENCH_FANOUT_MESSAGES`, `KEEL_BENCH_CLUSTER_SESSIONS`,
//! `KEEL_BENCH_SESSIONS`; pick parts with
//! `KEEL_BENCH_ONLY=publishes,latency,fanout,sessions`.

mod common;

use std::future::IntoFuture;
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use futures::{StreamExt, stream::FuturesOrdered};
use keel_session_pg::testing::{TestDatabase, admin_url, nats_check, nats_url};
use tokio::io::{AsyncBufReadExt, BufReader};

use common::*;

/// The bench run as a child that holds idle connections: `keel URL N` or
/// `nats URL N`.
const HOLD_CHILD: &str = "KEEL_BENCH_HOLD";

const NODES: usize = 3;

/// A JetStream publish acknowledgement being awaited.
type AckFuture = <jetstream::context::PublishAckFuture as IntoFuture>::IntoFuture;

fn main() {
    if let Ok(spec) = std::env::var(HOLD_CHILD) {
        hold::run(&spec);
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    std::process::exit(rt.block_on(async {
        if let Err(why) = check_engines().await {
            eprintln!("{why}");
            return 1;
        }
        print_engines().await;
        let mut rows = Vec::new();
        if wanted("publishes") {
            rows.push(publishes().await);
        }
        if wanted("latency") {
            rows.push(latency().await);
        }
        if wanted("fanout") {
            rows.push(fanout().await);
        }
        if wanted("sessions") {
            rows.push(sessions().await);
        }
        println!("\nkeel cluster summary (same run, this machine)\n");
        println!(
            "| workload | keel single node (SQLite) | keel cluster, 3 nodes (PostgreSQL + NATS) | NATS JetStream | cluster / single | cluster / JetStream |"
        );
        println!("|---|---|---|---|---|---|");
        for r in rows {
            println!("{}", r.markdown());
        }
        0
    }));
}

async fn check_engines() -> Result<(), String> {
    let mut missing = Vec::new();
    if let Err(why) = TestDatabase::create_at(&admin_url()).await {
        missing.push(why);
    }
    if let Err(why) = nats_check(&nats_url()).await {
        missing.push(why);
    }
    if which_nats_server().is_none() {
        missing.push(
            "no nats-server binary for the JetStream peer: install nats-server or set KEEL_NATS_SERVER to its path".to_owned(),
        );
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the cluster bench needs PostgreSQL, NATS and nats-server:\n  {}",
            missing.join("\n  ")
        ))
    }
}

/// What the figures depend on: PostgreSQL's durability settings and the
/// NATS server's version, as this run found them.
async fn print_engines() {
    if let Ok((client, conn)) = tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls).await {
        let driver = tokio::spawn(conn);
        let mut facts = Vec::new();
        for setting in ["server_version", "synchronous_commit", "fsync"] {
            if let Ok(row) = client.query_one(&format!("SHOW {setting}"), &[]).await {
                facts.push(format!("{setting}={}", row.get::<_, String>(0)));
            }
        }
        println!("PostgreSQL at KEEL_PG_URL: {}", facts.join(" "));
        driver.abort();
    }
    if let Some(bin) = which_nats_server()
        && let Ok(out) = std::process::Command::new(&bin).arg("--version").output()
    {
        println!(
            "JetStream peer: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
}

/// One row of the summary table: a figure for each system.
struct Row {
    workload: String,
    unit: &'static str,
    single: f64,
    cluster: f64,
    peer: f64,
    /// Whether more is better (rates) or less (latency, memory).
    higher_better: bool,
}

impl Row {
    fn markdown(&self) -> String {
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:.2}x", a / b)
            } else {
                "—".to_owned()
            }
        };
        let v = |x: f64| format!("{} {}", num(x), self.unit);
        format!(
            "| {} ({}) | {} | {} | {} | {} | {} |",
            self.workload,
            if self.higher_better {
                "higher is better"
            } else {
                "lower is better"
            },
            v(self.single),
            v(self.cluster),
            v(self.peer),
            ratio(self.cluster, self.single),
            ratio(self.cluster, self.peer),
        )
    }
}

/// Numbers as `cargo xtask bench` prints them: thousands separated, two
/// decimals below 100.
fn num(x: f64) -> String {
    if x.abs() < 100.0 {
        return format!("{x:.2}");
    }
    let s = format!("{:.0}", x);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn met(ok: bool) -> &'static str {
    if ok { "MET" } else { "NOT MET" }
}

// ---------------------------------------------------------------- cluster

/// Three relay nodes on one fresh database.
struct Cluster {
    nodes: Vec<Server>,
    _db: TestDatabase,
}

impl Cluster {
    async fn start() -> Cluster {
        let db = TestDatabase::create_at(&admin_url()).await.unwrap();
        let nats = nats_url();
        let mut nodes = Vec::with_capacity(NODES);
        for i in 0..NODES {
            let config = format!(
                "{RELAY_CONFIG}\n[store]\nbackend = \"postgres\"\nurl = \"{}\"\npool_size = 16\n\
                 [cluster]\nnats_url = \"{nats}\"\nnode_id = \"bench-{i}\"\n",
                db.url
            );
            nodes.push(Server::relay(&config).await);
        }
        Cluster { nodes, _db: db }
    }

    fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Server::url).collect()
    }

    fn rss_kib(&self) -> u64 {
        self.nodes.iter().map(Server::rss_kib).sum()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The nodes before the database they hold connections to.
        self.nodes.clear();
    }
}

// -------------------------------------------------------------- JetStream

fn which_nats_server() -> Option<String> {
    if let Ok(p) = std::env::var("KEEL_NATS_SERVER") {
        return Some(p);
    }
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/usr/local/bin", "/usr/bin"])
        .map(|d| std::path::Path::new(d).join("nats-server"))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
}

/// A `nats-server -js` of the bench's own, on a free port, with its store in
/// a temporary directory.
struct Nats {
    child: tokio::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Nats {
    async fn start() -> Nats {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = tokio::process::Command::new(which_nats_server().unwrap())
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path().join("js"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let url = format!("nats://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while nats_check(&url).await.is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Nats {
            child,
            url,
            _dir: dir,
        }
    }

    fn rss_kib(&self) -> u64 {
        rss_of(self.child.id().unwrap())
    }

    async fn context(&self) -> jetstream::Context {
        let client = async_nats::connect(&self.url).await.unwrap();
        jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(30))
            .ack_timeout(Duration::from_secs(30))
            .max_ack_inflight(1024)
            .backpressure_on_inflight(true)
            .build(client)
    }

    /// A stream on `subject.>` in files, as keel's log is.
    async fn stream(&self, name: &str) -> jetstream::stream::Stream {
        self.context()
            .await
            .create_stream(stream::Config {
                name: name.to_owned(),
                subjects: vec![format!("{}.>", name.to_lowercase())],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .unwrap()
    }
}

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// `n` ordered push consumers of `subject`, new messages only, each on a
/// connection of its own; each counts messages until `expect` and records
/// publish-to-deliver latency from a `"t":MICROS` payload when asked.
async fn js_consumers(
    nats: &Nats,
    stream_name: &str,
    subject: &str,
    n: usize,
    expect: u64,
    epoch: Option<Instant>,
) -> tokio::task::JoinSet<(Option<Instant>, hdrhistogram::Histogram<u64>)> {
    let mut tasks = tokio::task::JoinSet::new();
    let ready = std::sync::Arc::new(tokio::sync::Barrier::new(n + 1));
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(100));
    for _ in 0..n {
        let (url, ready, sem) = (nats.url.clone(), ready.clone(), sem.clone());
        let (stream_name, subject) = (stream_name.to_owned(), subject.to_owned());
        tasks.spawn(async move {
            let mut messages = {
                let _p = sem.acquire().await.unwrap();
                let client = async_nats::connect(&url).await.unwrap();
                let inbox = client.new_inbox();
                let js = jetstream::new(client);
                let stream = js.get_stream(&stream_name).await.unwrap();
                stream
                    .create_consumer(consumer::push::OrderedConfig {
                        deliver_subject: inbox,
                        filter_subject: subject,
                        deliver_policy: consumer::DeliverPolicy::New,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .messages()
                    .await
                    .unwrap()
            };
            ready.wait().await;
            let mut hist = histogram();
            let mut got = 0;
            while got < expect {
                match messages.next().await {
                    Some(Ok(m)) => {
                        got += 1;
                        if let Some(epoch) = epoch {
                            let t = std::str::from_utf8(&m.payload).unwrap_or("");
                            if let Some(at) = t.rfind("\"t\":") {
                                let sent: u64 =
                                    t[at + 4..].trim_end_matches('}').parse().unwrap_or(0);
                                let now = epoch.elapsed().as_micros() as u64;
                                hist.record(now.saturating_sub(sent).max(1)).ok();
                            }
                        }
                    }
                    _ => return (None, hist),
                }
            }
            (Some(Instant::now()), hist)
        });
    }
    ready.wait().await;
    tasks
}

// ------------------------------------------------------------ 1. publishes

const PUBLISHERS: u64 = 64;

/// Acknowledged publishes/s, from the first publisher's first publish
/// (after every hello: connecting is not timed, as for JetStream) to the
/// last answer.
async fn relay_publishes(urls: &[String], per: u64) -> f64 {
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..PUBLISHERS {
        let url = urls[p as usize % urls.len()].clone();
        tasks.spawn(async move {
            publisher(&url, &format!("ch-{p}"), per, 512, true, None)
                .await
                .expect("a publisher")
        });
    }
    let mut first: Option<Instant> = None;
    while let Some(t) = tasks.join_next().await {
        let started = t.expect("a publisher finished");
        first = Some(first.map_or(started, |f| f.min(started)));
    }
    let first = first.expect("publishers ran");
    (per * PUBLISHERS) as f64 / first.elapsed().as_secs_f64()
}

async fn js_publishes(nats: &Nats, per: u64) -> f64 {
    nats.stream("PUB").await;
    let mut contexts = Vec::new();
    for _ in 0..PUBLISHERS {
        contexts.push(nats.context().await);
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (p, js) in contexts.into_iter().enumerate() {
        tasks.spawn(async move {
            let id_base = keel_relay::client::new_message_id();
            let mut in_flight: FuturesOrdered<AckFuture> = FuturesOrdered::new();
            for i in 0..per {
                if in_flight.len() >= 512 {
                    in_flight.next().await.unwrap().map(drop).unwrap();
                }
                let msg = jetstream::message::PublishMessage::build()
                    .payload(vec![b'x'; 60].into())
                    .message_id(format!("{id_base}-{i:08}"));
                let ack = js.send_publish(format!("pub.ch-{p}"), msg).await.unwrap();
                in_flight.push_back(ack.into_future());
            }
            while let Some(ack) = in_flight.next().await {
                ack.unwrap();
            }
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }
    (per * PUBLISHERS) as f64 / started.elapsed().as_secs_f64()
}

async fn publishes() -> Row {
    let per = env_usize("KEEL_BENCH_PUBLISHES", 200_000) as u64 / PUBLISHERS;
    let single = Server::relay(RELAY_CONFIG).await;
    let base = relay_publishes(&[single.url()], per).await;
    drop(single);
    println!("publishes keel single node (SQLite): {base:.0} acknowledged/s");
    let cluster = Cluster::start().await;
    let rate = relay_publishes(&cluster.urls(), per).await;
    drop(cluster);
    println!("publishes keel cluster (3 nodes, PostgreSQL): {rate:.0} acknowledged/s");
    let nats = Nats::start().await;
    let peer = js_publishes(&nats, per).await;
    drop(nats);
    println!("publishes NATS JetStream (file storage): {peer:.0} acknowledged/s");
    println!(
        "figure | durable acknowledged publishes, 64 publishers over 3 nodes (PostgreSQL) | {rate:.0} | /s | keel single node (SQLite) | {base:.0} | >= 0.5x | {}",
        met(rate >= 0.5 * base)
    );
    Row {
        workload: format!(
            "durable acknowledged publishes, {PUBLISHERS} publishers, {} each",
            per
        ),
        unit: "/s",
        single: base,
        cluster: rate,
        peer,
        higher_better: true,
    }
}

// -------------------------------------------------------------- 2. latency

async fn js_latency(nats: &Nats, subs: usize, rate: u64) -> Quantiles {
    let seconds = 5u64;
    let total = rate * seconds;
    let epoch = Instant::now();
    nats.stream("LAT").await;
    let mut tasks = js_consumers(nats, "LAT", "lat.x", subs, total, Some(epoch)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let js = nats.context().await;
    let (acks_tx, mut acks_rx) = tokio::sync::mpsc::channel(4096);
    let acks = tokio::spawn(async move {
        while let Some(ack) = acks_rx.recv().await {
            let ack: jetstream::context::PublishAckFuture = ack;
            ack.await.unwrap();
        }
    });
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let per_tick = rate / 1000;
    let mut i = 0;
    while i < total {
        tick.tick().await;
        for _ in 0..per_tick {
            let t = epoch.elapsed().as_micros() as u64;
            let msg = jetstream::message::PublishMessage::build()
                .payload(format!(r#"{{"t":{t}}}"#).into_bytes().into())
                .message_id(format!("lat-{i}"));
            acks_tx
                .send(js.send_publish("lat.x", msg).await.unwrap())
                .await
                .unwrap();
            i += 1;
        }
    }
    drop(acks_tx);
    acks.await.unwrap();
    let mut all = histogram();
    let limit = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Ok(Some(r)) = tokio::time::timeout_at(limit, tasks.join_next()).await {
        all.add(&r.unwrap().1).ok();
    }
    assert!(
        tasks.is_empty(),
        "{} of {subs} JetStream consumers did not receive all {total} messages within 60 s",
        tasks.len()
    );
    Quantiles::of(&all)
}

async fn latency() -> Row {
    let subs = env_usize("KEEL_BENCH_LAT_SUBSCRIBERS", 100);
    let rate = env_usize("KEEL_BENCH_LAT_RATE", 10_000) as u64;
    // The measuring side on one thread of its own, as in the relay bench.
    let (single, cluster, (peer, calm)) = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let single = Server::relay(RELAY_CONFIG).await;
                let (s, _) = latency_once(&[single.url()], &single.url(), true, subs, rate).await;
                drop(single);
                let cluster = Cluster::start().await;
                let urls = cluster.urls();
                let (local, remote) = latency_once(&urls, &urls[0], true, subs, rate).await;
                drop(cluster);
                let nats = Nats::start().await;
                let peer = js_latency(&nats, subs, rate).await;
                drop(nats);
                // And at a tenth of the rate: below the fan-out JetStream
                // sustains here, for its latency when not saturated.
                let nats = Nats::start().await;
                let calm = js_latency(&nats, subs, rate / 10).await;
                drop(nats);
                (s, (local, remote), (peer, calm))
            })
    })
    .join()
    .unwrap();
    let (local, remote) = cluster;
    println!("latency keel single node: {single}");
    println!("latency keel cluster, subscribers on the publisher's node: {local}");
    println!("latency keel cluster, subscribers on other nodes: {remote}");
    println!("latency NATS JetStream (ordered push consumers): {peer}");
    println!("latency NATS JetStream at {} msgs/s: {calm}", rate / 10);
    println!(
        "figure | cross-node publish-to-deliver p99, {rate} msgs/s to {subs} subscribers over 3 nodes | {:.2} | ms | keel single node p99 | {:.2} | <= 20 ms | {}",
        remote.p99,
        single.p99,
        met(remote.p99 <= 20.0)
    );
    println!(
        "figure | cross-node publish-to-deliver p50 | {:.2} | ms | keel single node p50 | {:.2} | - | MET",
        remote.p50, single.p50
    );
    Row {
        workload: format!(
            "publish-to-deliver p99 at {rate} msgs/s to {subs} subscribers (cluster: other nodes'; p50 {:.2} / {:.2} / {:.2} ms)",
            single.p50, remote.p50, peer.p50
        ),
        unit: "ms",
        single: single.p99,
        cluster: remote.p99,
        peer: peer.p99,
        higher_better: false,
    }
}

// -------------------------------------------------------------- 3. fan-out

async fn js_fanout(nats: &Nats, subs: usize, messages: u64) -> f64 {
    nats.stream("FAN").await;
    let mut tasks = js_consumers(nats, "FAN", "fan.x", subs, messages, None).await;
    let js = nats.context().await;
    let started = Instant::now();
    let mut in_flight: FuturesOrdered<AckFuture> = FuturesOrdered::new();
    for i in 0..messages {
        if in_flight.len() >= 512 {
            in_flight.next().await.unwrap().map(drop).unwrap();
        }
        let msg = jetstream::message::PublishMessage::build()
            .payload(
                format!(r#"{{"p":"{}","i":{i}}}"#, "x".repeat(40))
                    .into_bytes()
                    .into(),
            )
            .message_id(format!("fan-{i}"));
        in_flight.push_back(js.send_publish("fan.x", msg).await.unwrap().into_future());
    }
    while let Some(ack) = in_flight.next().await {
        ack.unwrap();
    }
    let mut last = started;
    let mut complete = 0;
    let limit = tokio::time::Instant::now() + Duration::from_secs(180);
    while let Ok(Some(r)) = tokio::time::timeout_at(limit, tasks.join_next()).await {
        if let (Some(at), _) = r.unwrap() {
            complete += 1;
            last = last.max(at);
        }
    }
    assert_eq!(
        complete, subs,
        "every JetStream consumer got all {messages}"
    );
    (messages * subs as u64) as f64 / (last - started).as_secs_f64()
}

async fn fanout() -> Row {
    let subs = env_usize("KEEL_BENCH_SUBSCRIBERS", 1000);
    let messages = env_usize("KEEL_BENCH_FANOUT_MESSAGES", 3000) as u64;
    let single = Server::relay(RELAY_CONFIG).await;
    let (base, _) = fanout_once(&[single.url()], &single.url(), subs, messages, true).await;
    drop(single);
    println!("fan-out keel single node: {base:.0} deliveries/s");
    let cluster = Cluster::start().await;
    let urls = cluster.urls();
    let (rate, _) = fanout_once(&urls, &urls[0], subs, messages, true).await;
    drop(cluster);
    println!("fan-out keel cluster (subscribers over 3 nodes): {rate:.0} deliveries/s");
    let nats = Nats::start().await;
    let peer = js_fanout(&nats, subs, messages).await;
    drop(nats);
    println!("fan-out NATS JetStream (ordered push consumers): {peer:.0} deliveries/s");
    println!(
        "figure | durable fan-out, {subs} subscribers over 3 nodes | {rate:.0} | deliveries/s | keel single node | {base:.0} | - | MET"
    );
    Row {
        workload: format!("durable fan-out, {messages} messages to {subs} subscribers"),
        unit: "deliveries/s",
        single: base,
        cluster: rate,
        peer,
        higher_better: true,
    }
}

// ------------------------------------------------------------- 4. sessions

/// A child process holding `n` idle connections to `url` (`keel` sessions
/// said hello, or `nats` clients); dropped, it is killed.
struct Holder {
    _child: tokio::process::Child,
}

impl Holder {
    async fn start(kind: &str, url: &str, n: usize) -> Holder {
        let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .env(HOLD_CHILD, format!("{kind} {url} {n}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(300), out.next_line())
            .await
            .expect("holder did not finish connecting in 300 s")
            .unwrap()
            .expect("holder exited");
        println!("  holder ({kind} {url}): {line}");
        Holder { _child: child }
    }
}

/// Server RSS growth per connection: `rss` before and after `holders`.
async fn per_session(
    rss: impl Fn() -> u64,
    holders: impl std::future::Future<Output = Vec<Holder>>,
    n: usize,
) -> f64 {
    let before = rss();
    let held = holders.await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss();
    drop(held);
    after.saturating_sub(before) as f64 / n as f64
}

async fn sessions() -> Row {
    let n_single = env_usize("KEEL_BENCH_SESSIONS", 10_000);
    let n_cluster = env_usize("KEEL_BENCH_CLUSTER_SESSIONS", 45_000);
    let per_node = n_cluster / NODES;

    let single = Server::relay(RELAY_CONFIG).await;
    let (warm, _) = connect_many(&single.url(), 20).await;
    let url = single.url();
    let base = per_session(
        || single.rss_kib(),
        async { vec![Holder::start("keel", &url, n_single).await] },
        n_single,
    )
    .await;
    drop((warm, single));
    println!("sessions keel single node: {n_single} idle, {base:.1} KiB RSS each");

    let cluster = Cluster::start().await;
    let mut warm = Vec::new();
    for url in cluster.urls() {
        warm.push(connect_many(&url, 20).await.0);
    }
    let started = Instant::now();
    let urls = cluster.urls();
    let rate = per_session(
        || cluster.rss_kib(),
        async {
            futures::future::join_all(urls.iter().map(|u| Holder::start("keel", u, per_node))).await
        },
        per_node * NODES,
    )
    .await;
    println!(
        "sessions keel cluster: {} idle over 3 nodes (connected in {:.1?}), {rate:.1} KiB RSS each",
        per_node * NODES,
        started.elapsed()
    );
    drop((warm, cluster));

    let nats = Nats::start().await;
    let peer = per_session(
        || nats.rss_kib(),
        async { vec![Holder::start("nats", &nats.url, n_single).await] },
        n_single,
    )
    .await;
    drop(nats);
    println!("sessions NATS: {n_single} idle connections, {peer:.1} KiB RSS each");
    println!(
        "figure | RSS per session, {} sessions over 3 nodes | {rate:.1} | KiB | keel single node, {n_single} sessions | {base:.1} | <= 1.1x single node | {}",
        per_node * NODES,
        met(rate <= 1.1 * base)
    );
    Row {
        workload: format!(
            "server RSS per idle session (single {n_single}, cluster {}, JetStream {n_single} connections)",
            per_node * NODES
        ),
        unit: "KiB",
        single: base,
        cluster: rate,
        peer,
        higher_better: false,
    }
}

mod hold {
    //! The holder child: connects, prints one line, waits for stdin to close.

    use super::*;

    pub(super) fn run(spec: &str) {
        let mut parts = spec.split(' ');
        let (kind, url, n) = (
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().parse::<usize>().unwrap(),
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let started = Instant::now();
            let mut keel = Vec::new();
            let mut nats = Vec::new();
            if kind == "keel" {
                keel = connect_many(&url, n).await.0;
            } else {
                let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(200));
                let mut tasks = tokio::task::JoinSet::new();
                for _ in 0..n {
                    let (url, sem) = (url.clone(), sem.clone());
                    tasks.spawn(async move {
                        let _p = sem.acquire().await.unwrap();
                        async_nats::connect(&url).await.unwrap()
                    });
                }
                while let Some(c) = tasks.join_next().await {
                    nats.push(c.unwrap());
                }
            }
            println!(
                "{} connected in {:.1?}",
                keel.len() + nats.len(),
                started.elapsed()
            );
            // Held until the parent closes stdin (or kills this process).
            tokio::task::spawn_blocking(|| {
                use std::io::Read;
                let mut buf = [0u8; 64];
                while matches!(std::io::stdin().read(&mut buf), Ok(n) if n > 0) {}
            })
            .await
            .unwrap();
            drop((keel, nats));
        });
    }
}
