//! Many resuming subscribers (raw protocol clients: each reconnects with
//! its token and last offsets at once, no backoff) under SDK publish load,
//! and a fault that takes many links at the same moment:
//! `thundering_herd` SIGKILLs and restarts the relay, so that every
//! subscriber comes back at once; `cascading_failures` cuts the half of
//! the links that run through a chaos proxy (and refuses them for a while);
//! `random_connection_drops` resets about 20% of the links, chosen by the
//! proxy's seed. Every acknowledged message must reach every subscriber of
//! its channel once, in order (the checker), and the relay's own counts
//! must come back exact.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use serde_json::json;

use super::process::{Shared, publisher};
use super::{body, params, setup, wait_until};
use crate::Error;
use crate::client::{PayloadCheck, SubscriberSpec, spawn_subscriber};
use crate::fixture::{RelayOptions, RelayProcess, http_get};
use crate::scenario::{Action, Ctx, Measured, Plan, PlanInput, Scenario, SeedRef, Suite};
use crate::threshold::{Bound, Threshold};

/// The fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Herd {
    Kill,
    CutHalf,
    RandomDrops,
}

const HERD: &str = "thundering_herd";

pub(crate) const THUNDERING_HERD: Scenario = Scenario {
    name: HERD,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "000/003",
        test: "test_thundering_herd_reconnect",
        threshold: "500 of 1,000 clients reconnect within 5 s",
    },
    what: "10,000 subscribers (200 at small scale) on 100 channels under publish load; the relay is SIGKILLed and restarted, and every subscriber reconnects and resumes at once",
    target: "all 10,000 back within 5 s of the restart, every acknowledged message delivered once and in order",
    needs_process: Some("SIGKILLs and restarts the relay"),
    thresholds: |_| {
        vec![
            Threshold::new(
                "back_within_5s_ratio",
                "",
                Some(Bound::Ge(0.5)),
                Bound::Ge(1.0),
            ),
            Threshold::new("all_back_ms", "ms", None, Bound::Le(5_000.0)),
            Threshold::zero("publish_errors"),
            Threshold::all("converged"),
            Threshold::all("counts_exact"),
        ]
    },
    plan: |input| plan_herd(input, HERD, (200, 10_000), (10, 100), "kill9", 0),
    run: body!(run_kill),
    budget: Duration::from_secs(300),
};

const CASCADE: &str = "cascading_failures";

pub(crate) const CASCADING_FAILURES: Scenario = Scenario {
    name: CASCADE,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "003",
        test: "test_stress_cascading_failures",
        threshold: "healthy connections unaffected by the failing half; automatic recovery",
    },
    what: "100 channels × 10 subscribers (10 × 10 small); the half of them that run through a chaos proxy lose their links, and new ones are refused, for the outage; the other half connect directly",
    target: "the direct half never reconnects, the proxied half all back within 5 s of the heal, every acknowledged message delivered once and in order, the relay's counts exact",
    needs_process: Some("puts its own chaos proxy in front of the relay"),
    thresholds: |_| {
        vec![
            Threshold::zero("healthy_reconnects"),
            Threshold::all("failed_half_back_ratio"),
            Threshold::new("all_back_ms", "ms", None, Bound::Le(5_000.0)),
            Threshold::zero("publish_errors"),
            Threshold::all("converged"),
            Threshold::all("counts_exact"),
        ]
    },
    plan: |input| {
        let outage = input.scale.pick(2_000, 5_000) as u64;
        plan_herd(
            input,
            CASCADE,
            (100, 1_000),
            (10, 100),
            "partition_half",
            outage,
        )
    },
    run: body!(run_cascade),
    budget: Duration::from_secs(300),
};

const DROPS: &str = "random_connection_drops";

pub(crate) const RANDOM_CONNECTION_DROPS: Scenario = Scenario {
    name: DROPS,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "003",
        test: "test_stress_random_connection_drops",
        threshold: "20% of 1,000 connections dropped: the rest unaffected, stats exact",
    },
    what: "1,000 subscribers (100 small) through a chaos proxy under publish load; a reset toxic with toxicity 0.2 (decided per link from the proxy's seed) applies for 300 ms",
    target: "about 20% of the subscribers lose their link and resume, the others never reconnect, every acknowledged message delivered once and in order, the relay's connection and subscription counts exact afterwards",
    needs_process: Some("puts its own chaos proxy in front of the relay"),
    thresholds: |_| {
        vec![
            Threshold::new(
                "dropped_ratio",
                "",
                Some(Bound::Within(0.2, 0.1)),
                Bound::Within(0.2, 0.1),
            ),
            Threshold::zero("publish_errors"),
            Threshold::all("converged"),
            Threshold::all("counts_exact"),
        ]
    },
    plan: |input| plan_herd(input, DROPS, (100, 1_000), (10, 100), "reset_20pct", 300),
    run: body!(run_drops),
    budget: Duration::from_secs(300),
};

fn plan_herd(
    input: &PlanInput,
    scenario: &str,
    subscribers: (usize, usize),
    channels: (usize, usize),
    kind: &str,
    duration_ms: u64,
) -> Plan {
    let mut plan = input.plan(
        scenario,
        &params(&[
            (
                "subscribers",
                input.scale.pick(subscribers.0, subscribers.1) as f64,
            ),
            ("channels", input.scale.pick(channels.0, channels.1) as f64),
            ("publishers", 4.0),
            ("publish_interval_ms", 20.0),
            ("heal_deadline_s", 60.0),
        ]),
    );
    let mut rng = input.rng(scenario, "fault");
    plan.actions.push(Action {
        at_ms: rng.random_range(1_000..=2_000),
        duration_ms,
        kind: kind.into(),
        target: match kind {
            "kill9" => "relay",
            "partition_half" => "the proxied half of the links",
            _ => "every link, toxicity 0.2",
        }
        .into(),
        params: json!({}),
    });
    plan
}

async fn run_kill(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    run_herd(ctx, plan, Herd::Kill).await
}

async fn run_cascade(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    run_herd(ctx, plan, Herd::CutHalf).await
}

async fn run_drops(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    run_herd(ctx, plan, Herd::RandomDrops).await
}

/// Opens `n` resuming subscribers, subscriber `i` on `url(i)` (URLs
/// separated by spaces for a cluster) and `channel(i)`, a few hundred at a
/// time; their progress and tasks.
pub(super) async fn spawn_herd(
    n: usize,
    url: impl Fn(usize) -> String,
    channel: &impl Fn(usize) -> String,
    r: &crate::history::Recorder,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Vec<(
    crate::client::Progress,
    tokio::task::JoinHandle<crate::client::SubscriberReport>,
)> {
    let mut subs = Vec::with_capacity(n);
    for i in 0..n {
        subs.push(spawn_subscriber(
            SubscriberSpec {
                sub: i as u32,
                url: url(i),
                source: crate::client::source_ip(i),
                channels: vec![(channel(i), 1)],
                read_delay: None,
                resume: true,
                payloads: PayloadCheck::None,
                stop_after: None,
            },
            r.clone(),
            stop.clone(),
            Duration::from_secs(2),
        ));
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    subs
}

/// Waits (up to 60 s from `from`) until `connections()` counts the `n`
/// subscribers and the publishers again; returns how long that took and
/// the share of the subscribers back 5 s after `from`.
pub(super) async fn everyone_back<F, Fut>(
    from: tokio::time::Instant,
    n: usize,
    publishers: usize,
    connections: F,
) -> (Option<Duration>, f64)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let everyone = (n + publishers) as f64;
    let mut at_5s = None;
    let all_back = loop {
        let now = connections().await;
        let waited = from.elapsed();
        if waited >= Duration::from_secs(5) && at_5s.is_none() {
            at_5s = Some(now);
        }
        if now >= everyone {
            break Some(waited);
        }
        if waited > Duration::from_secs(60) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let back_5s = match (all_back, at_5s) {
        (Some(t), _) if t <= Duration::from_secs(5) => 1.0,
        (_, Some(c)) => ((c - publishers as f64) / n as f64).clamp(0.0, 1.0),
        _ => 0.0,
    };
    (all_back, back_5s)
}

/// Stops the publishers and waits (up to `heal_deadline_s`) until the
/// subscribers, subscriber `i` on `channel(i)`, have every acknowledged
/// message; whether they did.
pub(super) async fn catch_up(
    ctx: &Ctx,
    plan: &Plan,
    shared: &Shared,
    pubs: Vec<tokio::task::JoinHandle<Result<(), Error>>>,
    progress: &[crate::client::Progress],
    channel: impl Fn(usize) -> String,
) -> Result<bool, Error> {
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
    let expected: u64 = (0..progress.len())
        .map(|i| heads.get(&channel(i)).copied().unwrap_or(0))
        .sum();
    Ok(wait_until(
        Duration::from_secs(plan.num("heal_deadline_s") as u64),
        Duration::from_millis(50),
        || async move { progress.iter().map(|p| p.get()).sum::<u64>() >= expected },
    )
    .await)
}

/// The relay's own counts, exact once the publishers' links have closed:
/// every one of `n` subscribers connected once, each with two live
/// subscriptions (its channel and its session's private channel). Waits
/// up to 5 s; returns (connections, subscriptions, exact).
pub(super) async fn counts_settle<F, Fut>(n: usize, counts: F) -> (f64, f64, bool)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = (f64, f64)>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (conns, subscriptions) = counts().await;
        if conns == n as f64 && subscriptions == 2.0 * n as f64 {
            return (conns, subscriptions, true);
        }
        if tokio::time::Instant::now() >= deadline {
            return (conns, subscriptions, false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The relay's `/healthz` figure `key` (`connections`, ...).
pub(super) async fn health_figure(relay: &RelayProcess, key: &str) -> f64 {
    let text = http_get(relay.addr(), "/healthz").await.unwrap_or_default();
    let body = match (text.find('{'), text.rfind('}')) {
        (Some(a), Some(b)) if a < b => &text[a..=b],
        _ => "{}",
    };
    serde_json::from_str::<serde_json::Value>(body).unwrap_or_default()[key]
        .as_f64()
        .unwrap_or(0.0)
}

async fn run_herd(ctx: &Ctx, plan: &Plan, herd: Herd) -> Result<Measured, Error> {
    let mut relay = ctx.relay(RelayOptions::default()).await?;
    let proxy = match herd {
        Herd::Kill => None,
        _ => Some(
            keel_faults::Proxy::start(keel_faults::ProxyConfig {
                name: "subscribers".into(),
                listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                upstream: relay.addr(),
                seed: plan.seed,
                protocol: keel_faults::Protocol::Tcp,
            })
            .await
            .map_err(|e| setup("chaos proxy", e))?,
        ),
    };
    let r = &ctx.recorder;
    let n = plan.count("subscribers");
    let channels = plan.count("channels").max(1);
    let publishers = plan.count("publishers");
    let channel = |i: usize| format!("{}:{}", plan.scenario, i % channels);
    let proxied = |i: usize| match herd {
        Herd::Kill => false,
        Herd::CutHalf => i.is_multiple_of(2),
        Herd::RandomDrops => true,
    };

    ctx.phase("subscribers connecting");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let subs = spawn_herd(
        n,
        |i| match (&proxy, proxied(i)) {
            (Some(p), true) => format!("ws://{}/ws", p.listen_addr()),
            _ => relay.url(),
        },
        &channel,
        r,
        &stop_rx,
    )
    .await;
    let all_connected = wait_until(Duration::from_secs(60), Duration::from_millis(50), || {
        let relay = &relay;
        async move { health_figure(relay, "connections").await >= n as f64 }
    })
    .await;
    if !all_connected {
        return Err(setup("subscribers", "not all connected within 60 s"));
    }

    ctx.phase("publishing");
    let shared = Arc::new(Shared {
        last_ack: (0..publishers).map(|_| AtomicU64::new(0)).collect(),
        ..Shared::default()
    });
    let chans: Vec<String> = (0..channels).map(channel).collect();
    let mut pubs = Vec::new();
    for p in 0..publishers as u32 {
        pubs.push(tokio::spawn(publisher(
            relay.url(),
            // (Publishers and subscribers are numbered apart in the history.)
            p,
            chans.clone(),
            Duration::from_millis(plan.num("publish_interval_ms") as u64),
            r.clone(),
            shared.clone(),
        )));
    }
    let action = plan
        .actions
        .first()
        .ok_or_else(|| setup("plan", "no fault"))?
        .clone();
    tokio::time::sleep(Duration::from_millis(action.at_ms)).await;
    ctx.phase(&action.kind);
    let t_fault = r.now();
    // The moment from which everyone must come back.
    let back_from = match (herd, &proxy) {
        (Herd::Kill, _) => {
            relay.kill9().await?;
            relay.restart().await?;
            tokio::time::Instant::now()
        }
        (Herd::CutHalf, Some(p)) => {
            let outage = Duration::from_millis(action.duration_ms);
            p.partition(outage, keel_faults::PartitionMode::Refuse);
            p.cut();
            tokio::time::sleep(outage).await;
            tokio::time::Instant::now()
        }
        (_, Some(p)) => {
            use keel_faults::{Stream, Toxic, ToxicKind};
            let mut reset = Toxic::new(
                "reset",
                Stream::Downstream,
                ToxicKind::ResetPeer { timeout: 0 },
            );
            reset.toxicity = 0.2;
            p.add_toxic(reset).map_err(|e| setup("reset toxic", e))?;
            tokio::time::sleep(Duration::from_millis(action.duration_ms)).await;
            p.remove_toxic("reset")
                .map_err(|e| setup("reset toxic", e))?;
            tokio::time::Instant::now()
        }
        _ => return Err(setup("chaos proxy", "missing")),
    };
    r.fault(&action.kind, &action.target, t_fault, r.now());
    ctx.phase("everyone coming back");
    let (all_back, back_5s) = everyone_back(back_from, n, publishers, || async {
        health_figure(&relay, "connections").await
    })
    .await;

    // Load goes on a second, then stops; everyone must catch up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let progress: Vec<_> = subs.iter().map(|(p, _)| p.clone()).collect();
    let converged = catch_up(ctx, plan, &shared, pubs, &progress, channel).await?;
    let (conns, subscriptions, counts_exact) = counts_settle(n, || async {
        (
            health_figure(&relay, "connections").await,
            relay.metric("keel_subscriptions").await.unwrap_or(0.0),
        )
    })
    .await;
    let _ = stop_tx.send(true);
    let mut reconnects = Vec::with_capacity(n);
    for (_, task) in subs {
        let report = task.await.map_err(|e| setup("subscriber task", e))?;
        if let Some(e) = report.error {
            return Err(setup("subscriber", e));
        }
        reconnects.push(report.connections.saturating_sub(1));
    }

    let mut m = Measured::default();
    m.set(
        "publish_errors",
        shared.publish_errors.load(Ordering::Relaxed) as f64,
    )
    .set("acked", shared.acked.load(Ordering::Relaxed) as f64)
    .set("converged", f64::from(u8::from(converged)))
    .set("counts_exact", f64::from(u8::from(counts_exact)))
    .set(
        "all_back_ms",
        all_back.map_or(f64::INFINITY, |d| d.as_secs_f64() * 1000.0),
    );
    let dropped: Vec<usize> = (0..n).filter(|i| reconnects[*i] > 0).collect();
    let how_back = match all_back {
        Some(d) => format!("all back {:.0} ms after", d.as_secs_f64() * 1000.0),
        None => "not all back within 60 s".into(),
    };
    match herd {
        Herd::Kill => {
            m.set("back_within_5s_ratio", back_5s);
            m.note(format!(
                "{n} subscribers on {channels} channels; the relay SIGKILLed and restarted: {how_back} the restart; {} of them reconnected",
                dropped.len()
            ));
        }
        Herd::CutHalf => {
            let healthy: usize = (0..n)
                .filter(|i| !proxied(*i))
                .map(|i| reconnects[i] as usize)
                .sum();
            let failing: Vec<usize> = (0..n).filter(|i| proxied(*i)).collect();
            let back = failing.iter().filter(|i| reconnects[**i] > 0).count();
            m.set("healthy_reconnects", healthy as f64).set(
                "failed_half_back_ratio",
                back as f64 / failing.len().max(1) as f64,
            );
            m.note(format!(
                "{n} subscribers on {channels} channels, {} through the failing proxy: {back} of them lost their link and resumed, {how_back} the heal; the direct half reconnected {healthy} times",
                failing.len()
            ));
        }
        Herd::RandomDrops => {
            // The dropped ones resumed: every subscriber ended without an
            // error and caught up (`converged`).
            m.set("dropped_ratio", dropped.len() as f64 / n.max(1) as f64);
            m.note(format!(
                "{n} subscribers through the proxy: {} ({:.1}%) lost their link to the reset toxic and resumed, {how_back} it was removed; the others never reconnected",
                dropped.len(),
                100.0 * dropped.len() as f64 / n.max(1) as f64
            ));
        }
    }
    m.note(format!(
        "{} publishes acknowledged; every subscriber caught up: {converged}; relay counts afterwards: {conns} connections, {subscriptions} subscriptions (exact, {n} and {}: {counts_exact})",
        shared.acked.load(Ordering::Relaxed),
        2 * n
    ));
    m.throughput = super::ack_rate(r);
    Ok(m)
}
