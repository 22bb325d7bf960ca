//! Seed 003's extreme-concurrency tests: 10,000 connections, as many as the
//! open-file limit allows, and 50,000 subscriptions in waves.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::sync::watch;

use super::{body, open_many, params, wait_until};
use crate::Error;
use crate::client::{
    self, PayloadCheck, Publisher, SubscriberSpec, next_text, parse, spawn_subscriber,
};
use crate::fixture::RelayOptions;
use crate::scenario::{Ctx, Measured, Plan, PlanInput, Scenario, SeedRef, Suite};
use crate::threshold::{Bound, Threshold};

const TEN_K: &str = "connections_10k";

pub(crate) const CONNECTIONS_10K: Scenario = Scenario {
    name: TEN_K,
    suite: Suite::Load,
    seed: SeedRef {
        seed: "003",
        test: "test_stress_10000_concurrent_connections",
        threshold: ">99% of 10,000 connect in <30 s, memory <2 GB",
    },
    what: "10,000 WebSocket sessions open at once (500 handshakes in flight), then stay idle; all must still answer",
    target: "100% in <= 2 s, <= 16 KiB of relay RSS per idle session",
    needs_process: None,
    thresholds: |plan| {
        let mut t = vec![
            Threshold::new("connected_ratio", "", Some(Bound::Ge(0.99)), Bound::Ge(1.0)),
            Threshold::new(
                "connect_seconds",
                "s",
                Some(Bound::Le(30.0)),
                Bound::Le(2.0),
            ),
            Threshold::new(
                "relay_rss_mib",
                "MiB",
                Some(Bound::Le(2048.0)),
                Bound::Le(2048.0),
            ),
            Threshold::new(
                "alive_after_idle_ratio",
                "",
                Some(Bound::Ge(0.99)),
                Bound::Ge(1.0),
            ),
        ];
        // Memory per session is measured from the relay's RSS: over a few
        // hundred sessions that is mostly the allocator's own growth, so it
        // is judged from thousands on (and reported either way).
        if plan.num("connections") >= 5_000.0 {
            t.push(Threshold::new(
                "kib_per_session",
                "KiB",
                None,
                Bound::Le(16.0),
            ));
        }
        t
    },
    plan: |input| {
        let n = input.scale.pick(200, 10_000);
        let idle = input
            .scale
            .duration(Duration::from_secs(1), Duration::from_secs(5));
        input.plan(
            TEN_K,
            &params(&[
                ("connections", n as f64),
                ("handshakes_in_flight", 500.0),
                ("idle_seconds", idle.as_secs_f64()),
            ]),
        )
    },
    run: body!(run_many),
    budget: Duration::from_secs(120),
};

const MAX: &str = "connections_max";

pub(crate) const CONNECTIONS_MAX: Scenario = Scenario {
    name: MAX,
    suite: Suite::Load,
    seed: SeedRef {
        seed: "003",
        test: "test_stress_10000_concurrent_connections (upper bound)",
        threshold: "failures expected at the upper bound; find the ceiling",
    },
    what: "as many sessions as the per-process open-file limit (20,000) leaves room for: 19,000, spread over 127.0.0.1-8",
    target: "100% of 19,000; the ceiling reported",
    needs_process: Some(
        "finds the connection ceiling of a relay it started under the known per-process open-file limit",
    ),
    thresholds: |_| {
        vec![
            Threshold::new("connected_ratio", "", None, Bound::Ge(1.0)),
            Threshold::new("alive_after_idle_ratio", "", None, Bound::Ge(1.0)),
        ]
    },
    plan: |input| {
        let n = input.scale.pick(500, 19_000);
        input.plan(
            MAX,
            &params(&[
                ("connections", n as f64),
                ("handshakes_in_flight", 500.0),
                ("idle_seconds", 1.0),
            ]),
        )
    },
    run: body!(run_many),
    budget: Duration::from_secs(180),
};

async fn run_many(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let relay = ctx.measured_relay(RelayOptions::default()).await?;
    let n = plan.count("connections");
    // Warm the allocator and runtime, then take the baseline.
    let (warm, _, _) = open_many(&relay.url(), 20, 20).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = relay.rss_mib().await?;
    ctx.phase(&format!("{n} sessions connecting"));
    let (open, failed, took) = open_many(&relay.url(), n, plan.count("handshakes_in_flight")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = relay.rss_mib().await?;
    ctx.phase("idle");
    tokio::time::sleep(Duration::from_secs_f64(plan.num("idle_seconds"))).await;
    ctx.phase("pinging every session");
    let connected = open.len();
    let pings = open.into_iter().map(|(_, ws, _)| async move {
        let (mut sink, mut stream) = ws.split();
        if sink
            .send(client::text(&serde_json::json!({"type": "ping"})))
            .await
            .is_err()
        {
            return false;
        }
        let answered = async {
            while let Ok(Some(t)) = next_text(&mut stream).await {
                if parse(&t).is_ok_and(|f| f.kind == "pong") {
                    return true;
                }
            }
            false
        };
        tokio::time::timeout(Duration::from_secs(30), answered)
            .await
            .unwrap_or(false)
    });
    let alive = futures::stream::iter(pings)
        .buffer_unordered(1000)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await;
    let mut m = Measured::default();
    m.set("connected", connected as f64)
        .set("connected_ratio", connected as f64 / n as f64)
        .set("connect_seconds", took.as_secs_f64())
        .set("relay_rss_mib", after)
        .set(
            "kib_per_session",
            (after - before).max(0.0) * 1024.0 / connected.max(1) as f64,
        )
        .set("alive_after_idle_ratio", alive as f64 / n as f64);
    m.note(format!(
        "{connected} of {n} connected and welcomed in {:.2} s ({:.0}/s); relay RSS {before:.1} -> {after:.1} MiB",
        took.as_secs_f64(),
        connected as f64 / took.as_secs_f64()
    ));
    if let Some((i, e)) = failed.first() {
        m.note(format!(
            "ceiling: the first failure was connection {i}: {e} ({} failed in all)",
            failed.len()
        ));
    }
    drop(warm);
    Ok(m)
}

// --------------------------------------------------------- subscriptions

const SUBS: &str = "subscriptions_50k";

pub(crate) const SUBSCRIPTIONS_50K: Scenario = Scenario {
    name: SUBS,
    suite: Suite::Load,
    seed: SeedRef {
        seed: "003",
        test: "test_stress_50000_subscriptions_cascade",
        threshold: "50,000 subscriptions in waves of 10,000, all active, in <60 s; the active-subscriber stat accurate",
    },
    what: "500 sessions x 100 channels subscribed in waves of 10,000; /metrics must count them exactly; one message to every channel must reach its subscriber",
    target: "all active, exact count on /metrics, <= 10 s",
    needs_process: None,
    thresholds: |_| {
        vec![
            Threshold::all("active_ratio"),
            Threshold::new(
                "subscribe_seconds",
                "s",
                Some(Bound::Le(60.0)),
                Bound::Le(10.0),
            ),
            Threshold::exact("count_exact", 1.0),
        ]
    },
    plan: |input: &PlanInput| {
        let connections = input.scale.pick(20, 500);
        let per = input.scale.pick(25, 100);
        let wave = input.scale.pick(100, 10_000);
        input.plan(
            SUBS,
            &params(&[
                ("connections", connections as f64),
                ("per_connection", per as f64),
                ("wave", wave as f64),
            ]),
        )
    },
    run: body!(run_subscriptions),
    budget: Duration::from_secs(180),
};

async fn run_subscriptions(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let relay = ctx.measured_relay(RelayOptions::default()).await?;
    // Subscriptions a --target relay holds already are not this run's.
    let base = relay.metric("keel_subscriptions").await.unwrap_or(0.0);
    let (conns, per, wave) = (
        plan.count("connections"),
        plan.count("per_connection"),
        plan.count("wave"),
    );
    let total = conns * per;
    let per_wave = (wave / per).max(1);
    let (stop_tx, stop) = watch::channel(false);
    let started = tokio::time::Instant::now();
    let mut subscribers = Vec::new();
    let mut progress = Vec::new();
    for first in (0..conns).step_by(per_wave) {
        let last = (first + per_wave).min(conns);
        ctx.phase(&format!("wave: sessions {first}..{last}"));
        for c in first..last {
            let spec = SubscriberSpec {
                sub: c as u32,
                url: relay.url(),
                source: client::source_ip(c),
                channels: (0..per)
                    .map(|k| (ctx.unique(&format!("s50k-{c}-{k}")), 1))
                    .collect(),
                read_delay: None,
                resume: true,
                payloads: PayloadCheck::None,
                stop_after: Some(per as u64),
            };
            let (p, task) = spawn_subscriber(
                spec,
                ctx.recorder.clone(),
                stop.clone(),
                Duration::from_secs(1),
            );
            progress.push(p);
            subscribers.push(task);
        }
        // A wave is done when /metrics counts it (each session also reads
        // its private channel: one more subscription per session).
        let want = base + (last * per + last) as f64;
        let counted = wait_until(
            Duration::from_secs(60),
            Duration::from_millis(25),
            || async { relay.metric("keel_subscriptions").await.unwrap_or(0.0) >= want },
        )
        .await;
        if !counted {
            break;
        }
    }
    let subscribe_seconds = started.elapsed().as_secs_f64();
    let counted = relay.metric("keel_subscriptions").await.unwrap_or(0.0) - base - conns as f64;
    ctx.phase("one message to every channel");
    let publishers: Vec<Publisher> = {
        let mut v = Vec::new();
        for p in 0..8u32 {
            v.push(Publisher::open(&relay.url(), 1_000_000 + p, None, &ctx.recorder).await?);
        }
        v
    };
    let channels: Vec<(String, crate::history::ChannelId)> = (0..conns)
        .flat_map(|c| (0..per).map(move |k| ctx.unique(&format!("s50k-{c}-{k}"))))
        .map(|name| {
            let id = ctx.recorder.channel(&name);
            (name, id)
        })
        .collect();
    let (publishers, channels) = (&publishers, &channels);
    let sends = (0..channels.len()).map(|i| async move {
        let (name, id) = &channels[i];
        publishers[i % 8].publish(*id, name, "{}", None).await
    });
    futures::stream::iter(sends)
        .buffer_unordered(4096)
        .for_each(|_| async {})
        .await;
    ctx.phase("waiting for every delivery");
    client::settle(
        &progress,
        total as u64,
        Duration::from_secs(60),
        Duration::from_secs(5),
    )
    .await;
    let delivered: u64 = progress.iter().map(|p| p.get()).sum();
    let _ = stop_tx.send(true);
    for s in subscribers {
        let _ = s.await;
    }
    let mut m = Measured::default();
    m.set("subscriptions", total as f64)
        .set("subscriptions_counted", counted)
        .set("count_exact", f64::from(u8::from(counted == total as f64)))
        .set("subscribe_seconds", subscribe_seconds)
        .set("active_ratio", delivered as f64 / total as f64)
        .set("relay_rss_mib", relay.rss_mib().await?);
    m.note(format!("{total} subscriptions in waves of {} in {subscribe_seconds:.2} s; /metrics counted {counted}", per_wave * per));
    Ok(m)
}
