//! Process faults against the relay under publish and subscribe load:
//! `daemon_crash_recovery` SIGKILLs it at seeded moments, checks the
//! database after every kill, restarts it on the same data and address, and
//! repeats; `pause_resume` SIGSTOPs it past the clients' liveness timeout
//! and SIGCONTs it, repeatedly; `partition_heal` blackholes every client's
//! link through a chaos proxy (no FIN, no RST: half-open links) past the
//! liveness timeout, then heals it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use keel_relay::client::{Client, ClientConfig, Event};
use rand::Rng;
use serde_json::json;

use super::{body, params, setup, wait_until};
use crate::Error;
use crate::fixture::RelayOptions;
use crate::history::{After, Expectation, Op, Outcome, Recorder, StateCheck};
use crate::scenario::{Action, Ctx, Measured, Plan, PlanInput, Scenario, SeedRef, Suite};
use crate::threshold::{Bound, Threshold};

const CRASH: &str = "daemon_crash_recovery";

pub(crate) const DAEMON_CRASH_RECOVERY: Scenario = Scenario {
    name: CRASH,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "000/002",
        test: "test_daemon_crash_recovery; chaos MTTR",
        threshold: "ACTIVE sessions CRASHED after a crash, state preserved, no corruption; MTTR < 5 min",
    },
    what: "SIGKILL the relay at seeded moments under publish/subscribe load, integrity check, restart on the same data, repeat (--iterations)",
    target: "0 acknowledged lost or duplicated, integrity ok after every kill, only connected sessions CRASHED, MTTR p95 < 1 s",
    needs_process: Some("SIGKILLs and restarts the relay, and checks its database"),
    thresholds: |plan| {
        vec![
            Threshold::exact("kills", plan.num("iterations")),
            Threshold::zero("integrity_failures"),
            Threshold::zero("publish_errors"),
            Threshold::zero("redelivered"),
            Threshold::all("converged"),
            Threshold::new(
                "mttr_p95_ms",
                "ms",
                Some(Bound::Le(300_000.0)),
                Bound::Le(1_000.0),
            ),
        ]
    },
    plan: plan_crash,
    run: body!(run_crash),
    budget: Duration::from_secs(900),
};

const PAUSE: &str = "pause_resume";

pub(crate) const PAUSE_RESUME: Scenario = Scenario {
    name: PAUSE,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "002",
        test: "process termination / timeouts: signal handling, no deadlocks",
        threshold: "95% no deadlocks; MTTR < 5 min",
    },
    what: "SIGSTOP the relay under publish/subscribe load for longer than the clients' liveness timeout, then SIGCONT; repeat (--iterations)",
    target: "clients detect the dead links, resume after SIGCONT with nothing lost or duplicated; every publisher acknowledged again within 2 s of SIGCONT (p95)",
    needs_process: Some("SIGSTOPs the relay"),
    thresholds: |plan| outage_thresholds(plan, "pauses", true),
    plan: plan_pause,
    run: body!(run_pause),
    budget: Duration::from_secs(600),
};

const PARTITION: &str = "partition_heal";

pub(crate) const PARTITION_HEAL: Scenario = Scenario {
    name: PARTITION,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "001/002",
        test: "network partition: cut connections, behaviour without connection",
        threshold: "85% graceful handling; MTTR < 5 min",
    },
    what: "every client's link cut by a chaos proxy, which then refuses new connections for the partition, then heals; repeat (--iterations)",
    target: "every link seen dropping, clients retry until the heal and resume with nothing lost or duplicated, every publisher acknowledged again within 2 s of the heal (p95)",
    needs_process: Some("puts its own chaos proxy in front of the relay"),
    thresholds: |plan| outage_thresholds(plan, "partitions", true),
    plan: |input| plan_outages(input, PARTITION, "partition", &OutageShape::PROCESS),
    run: body!(run_partition),
    budget: Duration::from_secs(600),
};

async fn run_partition(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    run_faults(ctx, plan, Fault::Partition).await
}

/// Thresholds of the outage scenarios: every outage happened, every client
/// found every dead link (or, when `drops` is false, none lost its link),
/// nothing failed or came twice, everyone caught up, publishers were
/// acknowledged again soon.
pub(super) fn outage_thresholds(plan: &Plan, count: &'static str, drops: bool) -> Vec<Threshold> {
    let clients = plan.num("publishers") + plan.num("subscribers");
    vec![
        Threshold::exact(count, plan.num("iterations")),
        if drops {
            Threshold::new(
                "links_dropped",
                "",
                None,
                Bound::Ge(plan.num("iterations") * clients),
            )
        } else {
            Threshold::zero("links_dropped")
        },
        Threshold::zero("publish_errors"),
        Threshold::zero("redelivered"),
        Threshold::all("converged"),
        Threshold::new(
            "recovery_p95_ms",
            "ms",
            Some(Bound::Le(300_000.0)),
            Bound::Le(plan.num("recovery_target_ms")),
        ),
    ]
}

/// The sizes of an outage scenario, (small, full) each.
pub(super) struct OutageShape {
    pub(super) iterations: (usize, usize),
    pub(super) outage_ms: (usize, usize),
    pub(super) publishers: (usize, usize),
    pub(super) subscribers: (usize, usize),
    pub(super) channels: (usize, usize),
    pub(super) publish_interval_ms: f64,
    /// keel's bound on the time from the heal to every publisher
    /// acknowledged again (p95).
    pub(super) recovery_target_ms: f64,
    /// The clients' liveness timeout is shortened to a third of the outage
    /// (for faults only liveness can find).
    pub(super) short_liveness: bool,
}

impl OutageShape {
    pub(super) const PROCESS: OutageShape = OutageShape {
        iterations: (2, 6),
        outage_ms: (1_500, 5_000),
        publishers: (3, 16),
        subscribers: (2, 4),
        channels: (2, 4),
        publish_interval_ms: 5.0,
        recovery_target_ms: 2_000.0,
        short_liveness: true,
    };
}

fn plan_pause(input: &PlanInput) -> Plan {
    plan_outages(input, PAUSE, "sigstop", &OutageShape::PROCESS)
}

/// Outages (a pause, a partition, a slow link) of the shape's length, each
/// after a seeded stretch of load.
pub(super) fn plan_outages(
    input: &PlanInput,
    scenario: &str,
    kind: &str,
    shape: &OutageShape,
) -> Plan {
    let iterations = input
        .iterations
        .unwrap_or_else(|| input.scale.pick(shape.iterations.0, shape.iterations.1))
        .max(1);
    let outage_ms = input.scale.pick(shape.outage_ms.0, shape.outage_ms.1) as u64;
    let pick = |(small, full): (usize, usize)| input.scale.pick(small, full) as f64;
    let mut plan = input.plan(
        scenario,
        &params(&[
            ("iterations", iterations as f64),
            ("publishers", pick(shape.publishers)),
            ("subscribers", pick(shape.subscribers)),
            ("channels", pick(shape.channels)),
            ("publish_interval_ms", shape.publish_interval_ms),
            ("heal_deadline_s", 30.0),
            ("recovery_target_ms", shape.recovery_target_ms),
            (
                "liveness_timeout_ms",
                if shape.short_liveness {
                    (outage_ms / 3) as f64
                } else {
                    0.0
                },
            ),
        ]),
    );
    let mut rng = input.rng(scenario, "outages");
    let mut at = 0;
    for k in 0..iterations {
        let up = rng.random_range(500..=2_000);
        at += up + outage_ms;
        plan.actions.push(Action {
            at_ms: at - outage_ms,
            duration_ms: outage_ms,
            kind: kind.into(),
            target: if kind == "sigstop" {
                "relay"
            } else {
                "every client link"
            }
            .into(),
            params: json!({"outage": k + 1, "up_ms": up}),
        });
    }
    plan
}

async fn run_pause(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    run_faults(ctx, plan, Fault::Pause).await
}

async fn run_crash(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    run_faults(ctx, plan, Fault::Kill).await
}

/// The fault a scenario repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    /// SIGKILL, integrity check, restart.
    Kill,
    /// SIGSTOP for the action's duration, then SIGCONT.
    Pause,
    /// Every client link cut by the chaos proxy, which refuses new
    /// connections for the action's duration, then heals.
    Partition,
    /// Every client link blackholed (held: no FIN, no RST) for the action's
    /// duration, new connections hang; then healed.
    HalfOpen,
    /// `latency` ± `jitter` ms added to every chunk both ways for the
    /// action's duration.
    Latency { latency: u64, jitter: u64 },
    /// As `Partition`, with one more client whose reconnect backoff (1 s
    /// base, no jitter) is observed state by state.
    Drop,
    /// The relay's data directory on a small tmpfs, filled up for the
    /// action's duration, then given its space back.
    DiskFull,
    /// `latency` ms added both ways, and every second a fresh 10% of the
    /// links reset (churn), for the action's duration.
    Combined { latency: u64 },
    /// Each action its own fault, by its kind (`kill9`, `sigstop`,
    /// `partition`, `blackhole`, `latency`).
    Monkey,
}

impl Fault {
    /// What its repetitions are called in the results.
    pub(super) fn count_name(self) -> &'static str {
        match self {
            Fault::Kill => "kills",
            Fault::Pause => "pauses",
            Fault::Partition => "partitions",
            Fault::HalfOpen => "blackholes",
            Fault::Latency { .. } => "slowdowns",
            Fault::Drop => "drops",
            Fault::DiskFull => "disk_fulls",
            Fault::Combined { .. } => "stress_windows",
            Fault::Monkey => "faults",
        }
    }

    /// The fault a monkey's action names.
    pub(super) fn of_action(kind: &str) -> Fault {
        match kind {
            "kill9" => Fault::Kill,
            "sigstop" => Fault::Pause,
            "blackhole" => Fault::HalfOpen,
            "latency" => Fault::Latency {
                latency: 300,
                jitter: 100,
            },
            _ => Fault::Partition,
        }
    }

    /// Added latency and jitter, for faults that slow links.
    fn slowing(self) -> Option<(u64, u64)> {
        match self {
            Fault::Latency { latency, jitter } => Some((latency, jitter)),
            Fault::Combined { latency } => Some((latency, 0)),
            _ => None,
        }
    }

    /// Whether the clients reach the relay through the chaos proxy.
    fn proxied(self) -> bool {
        !matches!(self, Fault::Kill | Fault::Pause | Fault::DiskFull)
    }
}

fn plan_crash(input: &PlanInput) -> Plan {
    let iterations = input
        .iterations
        .unwrap_or_else(|| input.scale.pick(3, 50))
        .max(1);
    let publishers = input.scale.pick(3, 16);
    let mut plan = input.plan(
        CRASH,
        &params(&[
            ("iterations", iterations as f64),
            ("publishers", publishers as f64),
            ("subscribers", input.scale.pick(2, 4) as f64),
            ("channels", input.scale.pick(2, 4) as f64),
            ("publish_interval_ms", 5.0),
            ("heal_deadline_s", 30.0),
        ]),
    );
    // When each kill comes: the relay runs this long after it is ready
    // (restarts take a variable time, so kills are not absolute times).
    let (low, high) = match input.scale {
        crate::Scale::Small => (200, 800),
        _ => (300, 2_000),
    };
    let mut rng = input.rng(CRASH, "kills");
    let mut at = 0;
    for k in 0..iterations {
        let up = rng.random_range(low..=high);
        at += up;
        plan.actions.push(Action {
            at_ms: at,
            duration_ms: 0,
            kind: "kill9".into(),
            target: "relay".into(),
            params: json!({"kill": k + 1, "up_ms": up}),
        });
    }
    plan
}

/// What the clients share with the kill loop.
#[derive(Default)]
pub(super) struct Shared {
    /// Publishers stop (the heal phase begins).
    pub(super) stop: AtomicBool,
    /// Subscribers stop (the heal phase is over: caught up, or out of time).
    pub(super) done: AtomicBool,
    /// Kills so far: a welcome after the first kill must say CRASHED.
    pub(super) kills: AtomicU32,
    /// Whether the latest fault was a kill (the monkey mixes them: a
    /// welcome after another fault is not checked).
    pub(super) last_kill: AtomicBool,
    pub(super) publish_errors: AtomicU64,
    pub(super) acked: AtomicU64,
    /// Highest acknowledged offset per channel.
    pub(super) heads: std::sync::Mutex<BTreeMap<String, u64>>,
    /// Whether welcome states are checked (after a pause the old link may
    /// or may not have been seen closing: ACTIVE and DETACHED are both right).
    pub(super) check_states: bool,
    /// When each publisher last had a publish acknowledged (run µs).
    pub(super) last_ack: Vec<AtomicU64>,
    /// The clients' liveness timeout, when the scenario shortens it.
    pub(super) liveness: Option<Duration>,
    /// Links the clients saw die (keel-reconnect's count).
    pub(super) drops: AtomicU64,
    /// Bytes of padding in each publish's payload.
    pub(super) pad: usize,
    /// Every client's link state: a fault is over once all are connected
    /// again (the next fault, a kill say, finds each session connected).
    pub(super) links: std::sync::Mutex<Vec<tokio::sync::watch::Receiver<keel_reconnect::State>>>,
}

impl Shared {
    fn watch(&self, client: &Client) {
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(client.link().state());
    }

    /// Waits (at most `limit`) until every client's link is up.
    async fn all_connected(&self, limit: Duration) -> bool {
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner()).clone();
        tokio::time::timeout(limit, async {
            for mut l in links {
                let _ = l.wait_for(|s| *s == keel_reconnect::State::Connected).await;
            }
        })
        .await
        .is_ok()
    }
}

/// The SDK's configuration for `url`: one relay URL, or (a cluster)
/// several separated by spaces, the first the client's home, the others
/// where it fails over to in turn.
pub(super) fn sdk_config(url: &str, liveness: Option<Duration>) -> ClientConfig {
    let mut urls = url.split(' ');
    let mut config = ClientConfig::new(urls.next().unwrap_or(url));
    config.fallback_urls = urls.map(str::to_owned).collect();
    config.reconnect.backoff.base = Duration::from_millis(20);
    config.reconnect.backoff.cap = Duration::from_millis(500);
    config.connect_timeout = Duration::from_secs(30);
    if let Some(l) = liveness {
        // Dead links found within `l`: pings at a third of it, and the
        // handshake to a stopped relay given up as fast.
        config.reconnect.liveness_timeout = l;
        config.reconnect.ping_interval = l / 3;
        config.reconnect.handshake_timeout = l;
        config.reconnect.resume_timeout = l;
        config.reconnect.write_timeout = l;
    }
    config
}

/// Records a welcome's state: the first is a new session, later ones (the
/// relay was killed while the session was connected, or before it could
/// reconnect) CRASHED.
fn check_welcome(r: &Recorder, shared: &Shared, client: u32, session: &str, state: &str, n: u32) {
    if n > 1 && (!shared.check_states || !shared.last_kill.load(Ordering::Acquire)) {
        return;
    }
    let expected = if n == 1 {
        "CREATED"
    } else if shared.kills.load(Ordering::Acquire) > 0 {
        "CRASHED"
    } else {
        "DETACHED"
    };
    r.state(StateCheck {
        client,
        session: session.to_owned(),
        expected: expected.to_owned(),
        observed: state.to_owned(),
        at: r.now(),
        after: After::Settled,
    });
}

/// A subscriber through the SDK (which resumes after each kill from the
/// last offsets it saw); every delivery and welcome is recorded.
pub(super) async fn subscriber(
    url: String,
    sub: u32,
    channels: Vec<String>,
    r: Recorder,
    shared: Arc<Shared>,
    progress: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    ready: tokio::sync::mpsc::UnboundedSender<u32>,
) -> Result<u64, Error> {
    let mut client = Client::connect(sdk_config(&url, shared.liveness))
        .await
        .map_err(|e| setup("subscriber connect", e))?;
    shared.watch(&client);
    let mut conns = 0;
    for c in &channels {
        client
            .subscribe(c, Some(1))
            .await
            .map_err(|e| setup("subscribe", e))?;
        r.expect(Expectation {
            sub,
            channel: r.channel(c),
            from: 1,
        });
    }
    let _ = ready.send(sub);
    let mut batch = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_millis(200), client.next_event()).await;
        match event {
            Ok(Some(Event::Welcome {
                session_id, state, ..
            })) => {
                conns += 1;
                check_welcome(&r, &shared, 1000 + sub, &session_id, &state, conns);
            }
            Ok(Some(Event::Deliver {
                channel,
                offset,
                id,
                payload,
            })) => {
                batch.push(crate::workload::sdk_delivery(
                    &r,
                    (sub, conns.max(1)),
                    r.channel(&channel),
                    offset,
                    &id,
                    &payload,
                ));
                let mut p = progress.lock().unwrap_or_else(|p| p.into_inner());
                let seen = p.entry(format!("{sub}/{channel}")).or_default();
                *seen = (*seen).max(offset);
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                if shared.done.load(Ordering::Acquire) {
                    break;
                }
            }
        }
        if batch.len() >= 64 {
            r.deliveries(&mut batch);
        }
    }
    r.deliveries(&mut batch);
    shared
        .drops
        .fetch_add(client.link().counters().drops, Ordering::Relaxed);
    Ok(client.duplicates_dropped())
}

/// A publisher through the SDK: one publish at a time, re-sent across kills
/// with the same id in the same session until it is acknowledged.
pub(super) async fn publisher(
    url: String,
    client_no: u32,
    channels: Vec<String>,
    interval: Duration,
    r: Recorder,
    shared: Arc<Shared>,
) -> Result<(), Error> {
    let mut client = Client::connect(sdk_config(&url, shared.liveness))
        .await
        .map_err(|e| setup("publisher connect", e))?;
    shared.watch(&client);
    let mut conns = 0;
    let mut seq = 0u64;
    while !shared.stop.load(Ordering::Acquire) {
        // Welcomes arrive as events between publishes: count them and
        // check their state.
        while let Ok(Some(e)) = tokio::time::timeout(Duration::ZERO, client.next_event()).await {
            if let Event::Welcome {
                session_id, state, ..
            } = e
            {
                conns += 1;
                check_welcome(&r, &shared, client_no, &session_id, &state, conns);
            }
        }
        seq += 1;
        let channel = &channels[seq as usize % channels.len()];
        // The SDK re-sends a publish the relay refused as `unavailable`
        // or `rate_limited` (same id) until it is acknowledged.
        let payload = json!({"seq": seq, "pad": "x".repeat(shared.pad)});
        let answer = crate::workload::sdk_publish(
            &client,
            &r,
            (client_no, conns.max(1)),
            channel,
            seq,
            &payload,
            Duration::from_secs(60),
        )
        .await;
        match answer {
            Ok(offset) => {
                shared.acked.fetch_add(1, Ordering::Relaxed);
                if let Some(at) = shared.last_ack.get(client_no as usize) {
                    at.store(r.now(), Ordering::Release);
                }
                let mut heads = shared.heads.lock().unwrap_or_else(|p| p.into_inner());
                let head = heads.entry(channel.clone()).or_default();
                *head = (*head).max(offset);
            }
            Err(_) => {
                shared.publish_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(interval).await;
    }
    shared
        .drops
        .fetch_add(client.link().counters().drops, Ordering::Relaxed);
    Ok(())
}

/// Starts the plan's subscribers (each on `sub_url(n)`) and, once every one
/// has stored its subscriptions (each must see offset 1 on), its publishers
/// (each on `pub_url(n)`). Returns (publishers, subscribers).
#[allow(clippy::type_complexity)]
pub(super) async fn spawn_load(
    plan: &Plan,
    r: &Recorder,
    shared: &Arc<Shared>,
    channels: &[String],
    progress: &Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    sub_url: impl Fn(u32) -> String,
    pub_url: impl Fn(u32) -> String,
) -> Result<
    (
        Vec<tokio::task::JoinHandle<Result<(), Error>>>,
        Vec<tokio::task::JoinHandle<Result<u64, Error>>>,
    ),
    Error,
> {
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
    let mut subs = Vec::new();
    for s in 0..plan.count("subscribers") as u32 {
        subs.push(tokio::spawn(subscriber(
            sub_url(s),
            s,
            channels.to_vec(),
            r.clone(),
            shared.clone(),
            progress.clone(),
            ready_tx.clone(),
        )));
    }
    for _ in 0..plan.count("subscribers") {
        ready_rx
            .recv()
            .await
            .ok_or_else(|| setup("subscriber", "ended early"))?;
    }
    let interval = Duration::from_millis(plan.num("publish_interval_ms") as u64);
    let mut pubs = Vec::new();
    for p in 0..plan.count("publishers") as u32 {
        pubs.push(tokio::spawn(publisher(
            pub_url(p),
            p,
            channels.to_vec(),
            interval,
            r.clone(),
            shared.clone(),
        )));
    }
    Ok((pubs, subs))
}

/// The heal phase: stops the publishers, waits (at most the plan's
/// `heal_deadline_s`) until every subscriber has every acknowledged head,
/// then stops the subscribers. Returns whether they caught up and how many
/// deliveries the SDK dropped as already seen.
pub(super) async fn heal(
    ctx: &Ctx,
    plan: &Plan,
    shared: &Arc<Shared>,
    progress: &Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    pubs: Vec<tokio::task::JoinHandle<Result<(), Error>>>,
    subs: Vec<tokio::task::JoinHandle<Result<u64, Error>>>,
) -> Result<(bool, u64), Error> {
    ctx.phase("healing: subscribers catch up");
    shared.stop.store(true, Ordering::Release);
    for p in pubs {
        p.await.map_err(|e| setup("publisher task", e))??;
    }
    let heads = shared
        .heads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let n_subs = plan.count("subscribers");
    let converged = wait_until(
        Duration::from_secs(plan.num("heal_deadline_s") as u64),
        Duration::from_millis(50),
        || {
            let (progress, heads) = (progress.clone(), heads.clone());
            async move {
                let p = progress.lock().unwrap_or_else(|p| p.into_inner());
                (0..n_subs).all(|s| {
                    heads
                        .iter()
                        .all(|(c, head)| p.get(&format!("{s}/{c}")).copied().unwrap_or(0) >= *head)
                })
            }
        },
    )
    .await;
    shared.done.store(true, Ordering::Release);
    let mut redelivered = 0;
    for s in subs {
        redelivered += s.await.map_err(|e| setup("subscriber task", e))??;
    }
    Ok((converged, redelivered))
}

pub(super) async fn run_faults(ctx: &Ctx, plan: &Plan, fault: Fault) -> Result<Measured, Error> {
    // A full disk is a real one: a size-limited tmpfs under the data.
    let tmpfs = match fault {
        Fault::DiskFull => Some(super::storage::small_tmpfs(ctx, 32 << 20)?),
        _ => None,
    };
    let mut relay = ctx
        .relay(match &tmpfs {
            Some(fs) => RelayOptions {
                data: Some(fs.path().join("data")),
                config: super::storage::DISK_CONFIG.into(),
                ..Default::default()
            },
            None => RelayOptions::default(),
        })
        .await?;
    let mut disk = super::storage::DiskWatch::default();
    // Partitions happen in a chaos proxy between the clients and the relay.
    let proxy = match fault {
        f if f.proxied() => Some(
            keel_faults::Proxy::start(keel_faults::ProxyConfig {
                name: "clients".into(),
                listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                upstream: relay.addr(),
                seed: plan.seed,
                protocol: keel_faults::Protocol::Tcp,
            })
            .await
            .map_err(|e| setup("chaos proxy", e))?,
        ),
        _ => None,
    };
    let url = match &proxy {
        Some(p) => format!("ws://{}/ws", p.listen_addr()),
        None => relay.url(),
    };
    let r = &ctx.recorder;
    let shared = Arc::new(Shared {
        check_states: matches!(fault, Fault::Kill | Fault::Monkey),
        last_ack: (0..plan.count("publishers"))
            .map(|_| AtomicU64::new(0))
            .collect(),
        pad: plan.count("payload_pad_bytes"),
        liveness: (fault != Fault::Kill && plan.num("liveness_timeout_ms") > 0.0)
            .then(|| Duration::from_millis(plan.num("liveness_timeout_ms") as u64)),
        ..Shared::default()
    });
    let channels: Vec<String> = (0..plan.count("channels"))
        .map(|c| format!("{}:{c}", plan.scenario))
        .collect();

    // A session that is not connected at any fault: it must stay DETACHED.
    ctx.phase("opening sessions");
    let idle = Client::connect(sdk_config(&url, None))
        .await
        .map_err(|e| setup("idle session", e))?;
    let idle_token = idle.token().unwrap_or_default();
    let idle_id = idle.session_id().unwrap_or_default();
    idle.close().await;

    let progress: Arc<std::sync::Mutex<BTreeMap<String, u64>>> = Arc::default();
    let (pubs, subs) = spawn_load(
        plan,
        r,
        &shared,
        &channels,
        &progress,
        |_| url.clone(),
        |_| url.clone(),
    )
    .await?;

    let mut mttr = crate::load::Latency::default();
    let mut mttrs = Vec::new();
    // When each fault was in force (run µs).
    let mut windows: Vec<(u64, u64)> = Vec::new();
    // Times to recover by fault kind (the monkey mixes them).
    let mut by_kind: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    // The client whose backoff is watched, state by state.
    let observer = match fault {
        Fault::Drop => Some(BackoffObserver::start(&url).await?),
        _ => None,
    };
    let mut integrity_failures = 0u64;
    let mut kills = 0u32;
    let db = relay.data_dir().join("keel.db");
    let mut previous = 0;
    for a in &plan.actions {
        let up = a.at_ms - previous;
        previous = a.at_ms;
        ctx.phase(&format!(
            "{} {} of {}",
            a.kind,
            kills + 1,
            plan.count("iterations")
        ));
        tokio::time::sleep(Duration::from_millis(up)).await;
        let f = match fault {
            Fault::Monkey => Fault::of_action(&a.kind),
            other => other,
        };
        shared.last_kill.store(f == Fault::Kill, Ordering::Release);
        if f != Fault::Kill {
            // Stopped (or blackholed) past the clients' liveness timeout:
            // they drop their links and retry against a relay that cannot
            // answer.
            let pid = relay.pid();
            let t_stop = r.now();
            let outage = Duration::from_millis(a.duration_ms);
            match (&proxy, f) {
                (Some(p), Fault::Combined { latency }) => {
                    use keel_faults::{Stream, Toxic, ToxicKind};
                    let slow = ToxicKind::Latency { latency, jitter: 0 };
                    for (name, stream) in [
                        ("slow-up", Stream::Upstream),
                        ("slow-down", Stream::Downstream),
                    ] {
                        p.add_toxic(Toxic::new(name, stream, slow.clone()))
                            .map_err(|e| setup("latency toxic", e))?;
                    }
                    // Churn: every second a fresh draw of 10% of the links
                    // (a new toxic name is a new decision per link).
                    let until = tokio::time::Instant::now() + outage;
                    let mut k = 0;
                    while tokio::time::Instant::now() < until {
                        k += 1;
                        let mut reset = Toxic::new(
                            &format!("churn-{k}"),
                            Stream::Downstream,
                            ToxicKind::ResetPeer { timeout: 0 },
                        );
                        reset.toxicity = 0.1;
                        p.add_toxic(reset).map_err(|e| setup("reset toxic", e))?;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        p.remove_toxic(&format!("churn-{k}"))
                            .map_err(|e| setup("reset toxic", e))?;
                        tokio::time::sleep_until(
                            (tokio::time::Instant::now() + Duration::from_millis(800)).min(until),
                        )
                        .await;
                    }
                    for name in ["slow-up", "slow-down"] {
                        p.remove_toxic(name)
                            .map_err(|e| setup("latency toxic", e))?;
                    }
                }
                (Some(p), Fault::Latency { latency, jitter }) => {
                    use keel_faults::{Stream, Toxic, ToxicKind};
                    for (name, stream) in [
                        ("slow-up", Stream::Upstream),
                        ("slow-down", Stream::Downstream),
                    ] {
                        p.add_toxic(Toxic::new(
                            name,
                            stream,
                            ToxicKind::Latency { latency, jitter },
                        ))
                        .map_err(|e| setup("latency toxic", e))?;
                    }
                    tokio::time::sleep(outage).await;
                    for name in ["slow-up", "slow-down"] {
                        p.remove_toxic(name)
                            .map_err(|e| setup("latency toxic", e))?;
                    }
                }
                (Some(p), Fault::HalfOpen) => {
                    p.partition(outage, keel_faults::PartitionMode::Hang);
                    tokio::time::sleep(outage).await;
                }
                (Some(p), _) => {
                    p.partition(outage, keel_faults::PartitionMode::Refuse);
                    p.cut();
                    tokio::time::sleep(outage).await;
                }
                (None, Fault::DiskFull) => {
                    let fs = tmpfs
                        .as_ref()
                        .ok_or_else(|| setup("tmpfs", "not mounted"))?;
                    disk.fill_for(&relay, fs.path(), outage).await?;
                }
                _ => {
                    keel_faults::process::pause(pid).map_err(|e| setup("SIGSTOP", e))?;
                    tokio::time::sleep(outage).await;
                    keel_faults::process::resume(pid).map_err(|e| setup("SIGCONT", e))?;
                }
            }
            windows.push((t_stop, r.now()));
            let t_cont = r.now();
            previous += a.duration_ms;
            kills += 1;
            r.fault(&a.kind, &a.target, t_stop, t_cont);
            // Recovered once every publisher has been acknowledged again.
            let acked_again = wait_until(Duration::from_secs(30), Duration::from_millis(5), || {
                let shared = shared.clone();
                async move {
                    shared
                        .last_ack
                        .iter()
                        .all(|t| t.load(Ordering::Acquire) > t_cont)
                }
            })
            .await;
            let took = Duration::from_micros(r.now().saturating_sub(t_cont));
            if !acked_again {
                r.op(Op {
                    client: u32::MAX,
                    kind: "recover".into(),
                    invoke: t_cont,
                    done: r.now(),
                    outcome: Outcome::Fail {
                        code: "a publisher was not acknowledged within 30 s of the heal".into(),
                    },
                    detail: format!("after {} {kills}", a.kind),
                });
            }
            mttr.record(Duration::from_micros(t_cont), took.as_micros() as u64);
            mttrs.push(took);
            by_kind.entry(a.kind.clone()).or_default().push(took);
            shared.all_connected(Duration::from_secs(30)).await;
            // The observer's last backoff may outlast the publishers'
            // recovery: the next fault waits for it, so that each fault's
            // ladder starts from a connected link.
            if let Some(o) = &observer {
                let mut state = o.state.clone();
                let _ = tokio::time::timeout(
                    Duration::from_secs(60),
                    state.wait_for(|s| *s == keel_reconnect::State::Connected),
                )
                .await;
            }
            continue;
        }
        let t_kill = r.now();
        let killed = tokio::time::Instant::now();
        relay.kill9().await?;
        let gone = killed.elapsed();
        kills += 1;
        shared.kills.store(kills, Ordering::Release);
        // The database as the crash left it (the relay is gone, nothing
        // holds it): SQLite's full integrity check.
        let check = {
            let db = db.clone();
            tokio::task::spawn_blocking(move || integrity(&db))
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
        };
        if let Err(why) = &check {
            integrity_failures += 1;
            r.op(Op {
                client: u32::MAX,
                kind: "integrity_check".into(),
                invoke: t_kill,
                done: r.now(),
                outcome: Outcome::Fail { code: why.clone() },
                detail: format!("after kill {kills}"),
            });
        }
        let spawned = tokio::time::Instant::now();
        relay.restart().await?;
        // Time to recover: the kill until the process was gone, plus its
        // restart until it listened (recovery done). The integrity check
        // between is the harness's, not the relay's.
        let took = gone + spawned.elapsed();
        mttr.record(Duration::from_micros(t_kill), took.as_micros() as u64);
        mttrs.push(took);
        by_kind.entry(a.kind.clone()).or_default().push(took);
        r.fault("kill9", "relay", t_kill, r.now());
    }

    // Heal: stop publishing, then every subscriber must catch up to every
    // acknowledged head within the deadline.
    let (converged, redelivered) = heal(ctx, plan, &shared, &progress, pubs, subs).await?;

    // The session that was never connected at a kill is DETACHED.
    let mut config = sdk_config(&url, None);
    config.token = Some(idle_token);
    let mut resumed = Client::connect(config)
        .await
        .map_err(|e| setup("resume the idle session", e))?;
    let observed = match resumed.next_event().await {
        Some(Event::Welcome { state, .. }) => state,
        other => format!("no welcome: {other:?}"),
    };
    r.state(StateCheck {
        client: u32::MAX - 1,
        session: idle_id,
        expected: "DETACHED".into(),
        observed,
        at: r.now(),
        // Closed long before the first kill, on a direct connection.
        after: After::Settled,
    });
    resumed.close().await;

    mttrs.sort();
    let pick = |q: f64| super::quantile_ms(&mttrs, q);
    let count = fault.count_name();
    let (figure, how) = match fault {
        Fault::Kill => ("mttr", "kill to listening, recovery done"),
        Fault::Pause => ("recovery", "SIGCONT to every publisher acknowledged again"),
        _ => ("recovery", "heal to every publisher acknowledged again"),
    };
    let acked = shared.acked.load(Ordering::Relaxed);
    let mut m = Measured::default();
    m.set(count, f64::from(kills))
        .set(
            "publish_errors",
            shared.publish_errors.load(Ordering::Relaxed) as f64,
        )
        .set("acked", acked as f64)
        .set("redelivered", redelivered as f64)
        .set("converged", if converged { 1.0 } else { 0.0 })
        .set(&format!("{figure}_p50_ms"), pick(0.5))
        .set(&format!("{figure}_p95_ms"), pick(0.95))
        .set(&format!("{figure}_max_ms"), pick(1.0));
    m.set("links_dropped", shared.drops.load(Ordering::Relaxed) as f64);
    if fault == Fault::Kill {
        m.set("integrity_failures", integrity_failures as f64);
    }
    if fault == Fault::Monkey {
        let acked = shared.acked.load(Ordering::Relaxed) as f64;
        let failed = shared.publish_errors.load(Ordering::Relaxed) as f64;
        m.set("success_ratio", acked / (acked + failed).max(1.0));
        let mut parts = Vec::new();
        for (kind, times) in &mut by_kind {
            times.sort();
            let max = times.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0);
            let p50 = times[(times.len() - 1) / 2].as_secs_f64() * 1000.0;
            m.set(&format!("mttr_max_ms_{kind}"), max);
            parts.push(format!(
                "{kind} ×{} p50 {p50:.0} ms max {max:.0} ms",
                times.len()
            ));
        }
        m.note(format!(
            "time to recover by fault: {}; {:.3}% of {} publishes succeeded",
            parts.join(", "),
            100.0 * acked / (acked + failed).max(1.0),
            acked + failed
        ));
    }
    if let Some((latency, jitter)) = fault.slowing() {
        // Round trips of publishes that ran wholly inside a slow window
        // (invoked at least one slowest round trip before its end): the
        // proof that the fault was in force, and how much it varied.
        let margin = 2 * (latency + jitter) * 1000;
        let mut rtts: Vec<f64> = r
            .snapshot()
            .publishes
            .iter()
            .filter(|p| matches!(p.outcome, Outcome::Ok { .. }))
            .filter(|p| {
                windows
                    .iter()
                    .any(|(from, to)| p.invoke >= *from && p.invoke + margin <= *to)
            })
            .map(|p| p.done.saturating_sub(p.invoke) as f64 / 1000.0)
            .collect();
        rtts.sort_by(f64::total_cmp);
        let q = |q: f64| {
            rtts.get(((rtts.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or(0.0)
        };
        m.set("slow_publishes", rtts.len() as f64)
            .set("slow_rtt_p50_ms", q(0.5))
            .set("slow_rtt_p5_ms", q(0.05))
            .set("slow_rtt_p95_ms", q(0.95))
            .set("slow_rtt_spread_ms", q(0.95) - q(0.05));
        m.note(format!(
            "{} publishes ran wholly under the added latency: round trip p5 {:.0} ms, p50 {:.0} ms, p95 {:.0} ms",
            rtts.len(),
            q(0.05),
            q(0.5),
            q(0.95)
        ));
    }
    if fault == Fault::DiskFull {
        disk.report(&relay, &mut m).await?;
    }
    if let Some(observer) = observer {
        let seen = observer.finish().await;
        m.set(
            "backoff_ladder_ok",
            if seen.ladder_ok() { 1.0 } else { 0.0 },
        )
        .set(
            "states_observed_ok",
            if seen.states_ok() { 1.0 } else { 0.0 },
        )
        .set("backoff_steps", seen.steps() as f64);
        m.note(seen.describe());
    }
    m.note(format!(
        "{kills} {count}; time to recover ({how}) p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms; {acked} publishes acknowledged",
        pick(0.5),
        pick(0.95),
        pick(1.0),
    ));
    // The chart: time to recover at each fault, and acknowledged
    // publishes per second around them.
    m.latency = Some(mttr);
    m.throughput = super::ack_rate(r);
    Ok(m)
}

/// `PRAGMA integrity_check` on the database a killed relay left.
fn integrity(db: &std::path::Path) -> Result<(), String> {
    let conn = rusqlite::Connection::open(db).map_err(|e| format!("open: {e}"))?;
    let verdict: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|e| format!("integrity_check: {e}"))?;
    if verdict == "ok" {
        Ok(())
    } else {
        Err(verdict)
    }
}

/// A client whose reconnect backoff is the seed's (1 s doubling, no jitter,
/// so the delays are exact), every state transition recorded with its time.
struct BackoffObserver {
    /// Its link's state.
    state: tokio::sync::watch::Receiver<keel_reconnect::State>,
    stop: Arc<AtomicBool>,
    events_stop: Arc<AtomicBool>,
    events: tokio::task::JoinHandle<()>,
    log: tokio::task::JoinHandle<Vec<(tokio::time::Instant, keel_reconnect::State)>>,
}

impl BackoffObserver {
    async fn start(url: &str) -> Result<BackoffObserver, Error> {
        let mut config = ClientConfig::new(url);
        config.reconnect.backoff = keel_reconnect::Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
            jitter: false,
            seed: 0,
            // Shorter than any stretch of load between faults: every fault
            // starts the ladder again from 1 s.
            stable_after: Duration::from_millis(400),
        };
        let mut client = Client::connect(config)
            .await
            .map_err(|e| setup("backoff observer", e))?;
        let mut transitions = client.link().transitions();
        let state = client.link().state();
        let stop = Arc::new(AtomicBool::new(false));
        let log = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut seen: Vec<(tokio::time::Instant, keel_reconnect::State)> = Vec::new();
                // After the stop, on until the link is back (its last
                // backoff may outlast the scenario's heal), for at most 30 s.
                let mut stopped: Option<tokio::time::Instant> = None;
                loop {
                    if stop.load(Ordering::Acquire) {
                        let since = *stopped.get_or_insert_with(tokio::time::Instant::now);
                        let up = seen
                            .last()
                            .is_none_or(|(_, s)| *s == keel_reconnect::State::Connected);
                        if up || since.elapsed() > Duration::from_secs(30) {
                            break;
                        }
                    }
                    match tokio::time::timeout(Duration::from_millis(100), transitions.recv()).await
                    {
                        Ok(Ok(state)) => seen.push((tokio::time::Instant::now(), state)),
                        Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                        Ok(Err(_)) => break,
                        Err(_) => {}
                    }
                }
                seen
            }
        });
        let events_stop = Arc::new(AtomicBool::new(false));
        let events = tokio::spawn({
            let stop = events_stop.clone();
            async move {
                while !stop.load(Ordering::Acquire) {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(100), client.next_event()).await;
                }
                client.close().await;
            }
        });
        Ok(BackoffObserver {
            state,
            stop,
            events_stop,
            events,
            log,
        })
    }

    async fn finish(self) -> BackoffSeen {
        self.stop.store(true, Ordering::Release);
        let log = self.log.await.unwrap_or_default();
        self.events_stop.store(true, Ordering::Release);
        let _ = self.events.await;
        BackoffSeen { log }
    }
}

/// What the backoff observer saw: its transitions, in order.
struct BackoffSeen {
    log: Vec<(tokio::time::Instant, keel_reconnect::State)>,
}

/// One loss of the link, from `Disconnected` to `Connected` again.
struct Episode {
    /// Each backoff's chosen delay and how long it really was (until
    /// the next `Connecting`).
    waits: Vec<(Duration, Duration)>,
    /// The state names, in order.
    states: Vec<&'static str>,
}

impl BackoffSeen {
    fn episodes(&self) -> Vec<Episode> {
        use keel_reconnect::State;
        let mut out = Vec::new();
        let mut current: Option<Episode> = None;
        let mut backoff: Option<(tokio::time::Instant, Duration)> = None;
        for (at, state) in &self.log {
            let name = match state {
                State::Connecting => "CONNECTING",
                State::Resuming => "RESUMING",
                State::Connected => "CONNECTED",
                State::Disconnected { .. } => "DISCONNECTED",
                State::Backoff { .. } => "RECONNECTING",
                State::Closed { .. } => "CLOSED",
            };
            if current.is_none() {
                if !matches!(state, State::Disconnected { .. }) {
                    continue;
                }
                current = Some(Episode {
                    waits: Vec::new(),
                    states: Vec::new(),
                });
            }
            let Some(ep) = current.as_mut() else { continue };
            ep.states.push(name);
            match state {
                State::Backoff { delay, .. } => backoff = Some((*at, *delay)),
                State::Connecting => {
                    if let Some((from, delay)) = backoff.take() {
                        ep.waits.push((delay, at.duration_since(from)));
                    }
                }
                State::Connected => out.extend(current.take()),
                _ => {}
            }
        }
        out
    }

    /// Every loss of the link walked the ladder 1 s, 2 s, 4 s, ... from
    /// its start, each wait as long as its delay (within 5 ms early, 250 ms
    /// late on a loaded machine).
    fn ladder_ok(&self) -> bool {
        let episodes = self.episodes();
        !episodes.is_empty()
            && episodes.iter().all(|ep| {
                !ep.waits.is_empty()
                    && ep.waits.iter().enumerate().all(|(k, (delay, waited))| {
                        *delay == Duration::from_secs(1 << k)
                            && *waited + Duration::from_millis(5) >= *delay
                            && *waited <= *delay + Duration::from_millis(250)
                    })
            })
    }

    /// Every loss of the link went DISCONNECTED → RECONNECTING →
    /// CONNECTING (→ DISCONNECTED → RECONNECTING → CONNECTING)* →
    /// RESUMING → CONNECTED.
    fn states_ok(&self) -> bool {
        let episodes = self.episodes();
        !episodes.is_empty()
            && episodes.iter().all(|ep| {
                let s = &ep.states;
                s.len() >= 5
                    && s[s.len() - 2..] == ["RESUMING", "CONNECTED"]
                    && s[..s.len() - 2]
                        .chunks(3)
                        .all(|c| c == ["DISCONNECTED", "RECONNECTING", "CONNECTING"])
            })
    }

    /// The steps of the first loss: how many backoffs.
    fn steps(&self) -> usize {
        self.episodes().first().map_or(0, |ep| ep.waits.len())
    }

    fn describe(&self) -> String {
        let episodes = self.episodes();
        let Some(first) = episodes.first() else {
            return "backoff observer: no loss of the link seen".into();
        };
        let waits: Vec<String> = first
            .waits
            .iter()
            .map(|(d, w)| format!("{:.0} s (waited {:.3} s)", d.as_secs_f64(), w.as_secs_f64()))
            .collect();
        format!(
            "backoff observer, {} losses of the link; the first: {}; backoffs {}",
            episodes.len(),
            first.states.join(" → "),
            waits.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use keel_reconnect::State;
    use tokio::time::Instant;

    use super::BackoffSeen;

    /// A log of one loss of the link with these backoffs, each waited
    /// `late` longer than its delay.
    fn log(delays: &[u64], late: Duration) -> BackoffSeen {
        let t0 = Instant::now();
        let mut at = t0;
        let mut log = vec![(at, State::Connected)];
        for (k, d) in delays.iter().enumerate() {
            let delay = Duration::from_millis(*d);
            log.push((
                at,
                State::Disconnected {
                    reason: "cut".into(),
                },
            ));
            log.push((
                at,
                State::Backoff {
                    attempt: k as u32 + 1,
                    delay,
                    until: at + delay,
                },
            ));
            at += delay + late;
            log.push((at, State::Connecting));
        }
        log.push((at, State::Resuming));
        log.push((at, State::Connected));
        BackoffSeen { log }
    }

    #[test]
    fn the_seeds_ladder_passes() {
        let seen = log(&[1_000, 2_000, 4_000, 8_000], Duration::from_millis(3));
        assert!(seen.ladder_ok() && seen.states_ok());
        assert_eq!(seen.steps(), 4);
    }

    #[test]
    fn a_wrong_ladder_or_late_attempt_or_missing_state_fails() {
        // Jittered delays, a constant delay, a wait far past its delay.
        assert!(!log(&[1_000, 1_300, 4_000], Duration::ZERO).ladder_ok());
        assert!(!log(&[1_000, 1_000, 1_000], Duration::ZERO).ladder_ok());
        assert!(!log(&[1_000, 2_000], Duration::from_millis(400)).ladder_ok());
        // No RESUMING before CONNECTED.
        let mut seen = log(&[1_000], Duration::ZERO);
        seen.log.retain(|(_, s)| *s != State::Resuming);
        assert!(!seen.states_ok());
        // No loss seen at all.
        assert!(!BackoffSeen { log: Vec::new() }.ladder_ok());
    }
}
