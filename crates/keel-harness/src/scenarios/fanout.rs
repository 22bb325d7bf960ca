//! Seed 003's memory and duration tests: fan-out with slow subscribers,
//! large payloads, and a compressed 24-hour soak.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rand::Rng;
use rand::seq::SliceRandom;
use serde_json::json;
use tokio::sync::watch;

use super::{body, params, peak_rss_mib, wait_until};
use crate::Error;
use crate::client::{
    self, Answer, PayloadCheck, Progress, Publisher, SubscriberReport, SubscriberSpec,
    spawn_subscriber,
};
use crate::fixture::RelayOptions;
use crate::history::ChannelId;
use crate::load::{LatencySink, Schedule};
use crate::scenario::{Action, Ctx, Measured, Plan, PlanInput, Scenario, SeedRef, Suite};
use crate::threshold::{Bound, Threshold};

/// Subscribers started together, and how to stop them.
struct Subscribers {
    progress: Vec<Progress>,
    tasks: Vec<tokio::task::JoinHandle<SubscriberReport>>,
    stop: watch::Sender<bool>,
}

impl Subscribers {
    fn start(ctx: &Ctx, specs: Vec<SubscriberSpec>) -> Subscribers {
        let (stop, rx) = watch::channel(false);
        let mut progress = Vec::new();
        let mut tasks = Vec::new();
        for spec in specs {
            let (p, t) = spawn_subscriber(
                spec,
                ctx.recorder.clone(),
                rx.clone(),
                Duration::from_secs(2),
            );
            progress.push(p);
            tasks.push(t);
        }
        Subscribers {
            progress,
            tasks,
            stop,
        }
    }

    /// Waits until `want` distinct deliveries in all (at most `limit`, and
    /// 5 s without progress), then stops them.
    async fn finish(self, want: u64, limit: Duration) -> Vec<SubscriberReport> {
        client::settle(&self.progress, want, limit, Duration::from_secs(5)).await;
        let _ = self.stop.send(true);
        let mut out = Vec::new();
        for t in self.tasks {
            if let Ok(r) = t.await {
                out.push(r);
            }
        }
        out
    }
}

/// Opens `n` publishers (clients `base..base+n`).
async fn publishers(ctx: &Ctx, url: &str, base: u32, n: u32) -> Result<Vec<Publisher>, Error> {
    let mut v = Vec::new();
    for p in 0..n {
        v.push(Publisher::open(url, base + p, None, &ctx.recorder).await?);
    }
    Ok(v)
}

// ------------------------------------------------------------ fan-out

const FANOUT: &str = "fanout_backpressure";

pub(crate) const FANOUT_BACKPRESSURE: Scenario = Scenario {
    name: FANOUT,
    suite: Suite::Load,
    seed: SeedRef {
        seed: "003",
        test: "test_stress_memory_saturation_event_queue",
        threshold: "10,000 events to 100 subscribers, faster than some consume: no OOM, all eventually delivered",
    },
    what: "10,000 events at an open-model rate to 100 subscribers of one channel, 10 of them slow readers (closed as slow consumers and resuming): every event to every subscriber, exactly once, in order",
    target: "every event to every live or resumed subscriber; relay RSS bounded (<= 512 MiB)",
    needs_process: None,
    thresholds: |_| {
        vec![
            Threshold::all("delivered_ratio"),
            Threshold::new("relay_peak_rss_mib", "MiB", None, Bound::Le(512.0)),
            Threshold::zero("violations"),
            Threshold::new("dropped_ratio", "", Some(Bound::Le(0.01)), Bound::Le(0.0)),
        ]
    },
    plan: plan_fanout,
    run: body!(run_fanout),
    budget: Duration::from_secs(180),
};

fn plan_fanout(input: &PlanInput) -> Plan {
    let subs = input.scale.pick(20, 100);
    let events = input.scale.pick(1_000, 10_000);
    let rate = input.scale.pick(2_000, 5_000);
    let slow = (subs / 10).max(1);
    let mut plan = input.plan(
        FANOUT,
        &params(&[
            ("subscribers", subs as f64),
            ("events", events as f64),
            ("rate", rate as f64),
            ("slow_subscribers", slow as f64),
            ("payload_bytes", 100.0),
        ]),
    );
    let mut rng = input.rng(FANOUT, "slow");
    let mut who: Vec<usize> = (0..subs).collect();
    who.shuffle(&mut rng);
    for s in who.into_iter().take(slow) {
        plan.actions.push(Action {
            at_ms: 0,
            duration_ms: 0,
            kind: "slow_reader".into(),
            target: format!("subscriber#{s}"),
            params: json!({"delay_us": rng.random_range(500..=2_000)}),
        });
    }
    plan
}

async fn run_fanout(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let relay = ctx.measured_relay(RelayOptions::default()).await?;
    let (subs, events, rate) = (
        plan.count("subscribers"),
        plan.count("events"),
        plan.num("rate"),
    );
    let channel = &ctx.unique("fanout");
    let cid = ctx.recorder.channel(channel);
    let slow: std::collections::HashMap<usize, u64> = plan
        .actions
        .iter()
        .filter(|a| a.kind == "slow_reader")
        .filter_map(|a| {
            Some((
                a.target.strip_prefix("subscriber#")?.parse().ok()?,
                a.params["delay_us"].as_u64()?,
            ))
        })
        .collect();
    let (fast_sink, slow_sink) = (LatencySink::default(), LatencySink::default());
    let specs = (0..subs)
        .map(|s| SubscriberSpec {
            sub: s as u32,
            url: relay.url(),
            source: client::source_ip(s),
            channels: vec![(channel.to_owned(), 1)],
            read_delay: slow.get(&s).map(|us| Duration::from_micros(*us)),
            resume: true,
            payloads: PayloadCheck::Latency(if slow.contains_key(&s) {
                slow_sink.clone()
            } else {
                fast_sink.clone()
            }),
            stop_after: Some(events as u64),
        })
        .collect();
    ctx.phase("subscribing");
    let base = relay.metric("keel_subscriptions").await.unwrap_or(0.0);
    let subscribers = Subscribers::start(ctx, specs);
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(20),
        || async {
            relay.metric("keel_subscriptions").await.unwrap_or(0.0) >= base + (2 * subs) as f64
        },
    )
    .await;
    let pubs = publishers(ctx, &relay.url(), 1_000, 4).await?;
    let pad = "x".repeat(plan.count("payload_bytes"));
    let schedule = Schedule::constant(rate, Duration::from_secs_f64(events as f64 / rate));
    let intended = schedule.intended();
    let start = tokio::time::Instant::now();
    let t_load = ctx.recorder.now();
    ctx.phase("publishing");
    let recorder = ctx.recorder.clone();
    let stats = crate::load::run(&schedule, start, 20_000, Duration::from_millis(10), |i| {
        let at = start + intended[i as usize];
        let payload = format!(
            r#"{{"t":{},"pad":"{pad}"}}"#,
            recorder.micros(at.into_std())
        );
        let p = &pubs[i as usize % pubs.len()];
        async move {
            matches!(
                p.publish(cid, channel, &payload, Some(at)).await,
                Answer::Published(_)
            )
        }
    })
    .await;
    ctx.phase("draining to every subscriber");
    let want = (events * subs) as u64;
    let reports = subscribers.finish(want, Duration::from_secs(120)).await;
    let t_end = ctx.recorder.now();
    let delivered: u64 = reports.iter().map(|r| r.delivered).sum();
    let (fast_latency, slow_latency) = (fast_sink.snapshot(), slow_sink.snapshot());
    let slow_closes: usize = reports
        .iter()
        .map(|r| r.closes.iter().filter(|c| **c == Some(1013)).count())
        .sum();
    let mut m = Measured::default();
    m.set("events_acked", stats.ok as f64)
        .set("delivered_ratio", delivered as f64 / want as f64)
        .set(
            "relay_peak_rss_mib",
            peak_rss_mib(&ctx.resources, t_load as f64 / 1e6, t_end as f64 / 1e6),
        )
        .set("slow_consumer_closes", slow_closes as f64)
        .set("deliver_p50_ms", fast_latency.ms(0.5))
        .set("deliver_p99_ms", fast_latency.ms(0.99))
        .set("slow_deliver_p99_ms", slow_latency.ms(0.99))
        .set("publish_ack_p99_ms", stats.latency.ms(0.99))
        .set("late_sends", stats.late as f64)
        .set("dropped_sends", stats.dropped as f64)
        .set(
            "dropped_ratio",
            stats.dropped as f64 / stats.scheduled.max(1) as f64,
        );
    m.note(format!(
        "{} events at {rate}/s to {subs} subscribers ({} slow); {delivered} of {want} deliveries; {slow_closes} slow-consumer closes (1013) resumed",
        stats.ok,
        slow.len()
    ));
    m.throughput = stats
        .latency
        .series()
        .iter()
        .map(|(t, _, _, n)| (*t, *n as f64))
        .collect();
    m.latency = Some(fast_latency);
    Ok(m)
}

// ------------------------------------------------------- large payloads

const LARGE: &str = "large_payloads";

pub(crate) const LARGE_PAYLOADS: Scenario = Scenario {
    name: LARGE,
    suite: Suite::Load,
    seed: SeedRef {
        seed: "003",
        test: "test_stress_large_payload_memory_limits",
        threshold: "100 KB, 500 KB, 1 MB events to 100 subscribers: all delivered uncorrupted, memory not 10x the payloads",
    },
    what: "100 events each of 100 KB, 500 KB and 1 MB to 100 subscribers, after a warm-up (7 x 100 events of 100 KB to a channel nobody reads: the relay's page and replay caches full, noted, not judged): every payload byte-exact (the checker's `corrupted`), relay RSS growth against the payload bytes published",
    target: "byte-exact; relay RSS growth <= 2x the payload working set",
    needs_process: None,
    thresholds: |_| {
        vec![
            Threshold::all("delivered_ratio"),
            Threshold::new(
                "rss_growth_ratio",
                "x",
                Some(Bound::Le(10.0)),
                Bound::Le(2.0),
            ),
        ]
    },
    plan: |input| {
        let subs = input.scale.pick(10, 100);
        let events = input.scale.pick(5, 100);
        input.plan(
            LARGE,
            &params(&[
                ("subscribers", subs as f64),
                ("events_per_size", events as f64),
                ("publishes_in_flight", 8.0),
            ]),
        )
    },
    run: body!(run_large),
    budget: Duration::from_secs(300),
};

const SIZES: [usize; 3] = [100_000, 500_000, 1_000_000];

/// The warm-up publishes this many times `events_per_size` 100 KB payloads
/// to a channel nobody reads: about 70 MB at full scale, more than the
/// writer's page cache (64 MiB by default).
const WARM_UP_ROUNDS: usize = 7;

async fn run_large(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let relay = ctx.measured_relay(RelayOptions::default()).await?;
    let (subs, events, in_flight) = (
        plan.count("subscribers"),
        plan.count("events_per_size"),
        plan.count("publishes_in_flight"),
    );
    let publisher = Publisher::open(&relay.url(), 2_000, None, &ctx.recorder).await?;
    let mut m = Measured::default();
    let (mut delivered, mut wanted) = (0u64, 0u64);
    let mut worst_ratio: f64 = 0.0;
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(
        crate::scenario::sub_seed(plan.seed, "large_payloads/bytes"),
    );
    // Warm-up, not judged: a relay that has run a while has its writer's
    // page cache (64 MiB, what large payloads fill first) and its replay
    // cache (32 MiB by default) full, and its bulk threads started; a fresh one fills
    // them with the first sizes' payloads, once in its life and not in
    // proportion to them, and that would be counted against the first
    // size. Nobody subscribes: no connection's buffers are warmed.
    let idle_subs = relay.metric("keel_subscriptions").await.unwrap_or(0.0);
    ctx.phase("warm-up: filling the writer's page cache");
    let warm_channel = ctx.unique("large-warm-up");
    let warm_cid = ctx.recorder.channel(&warm_channel);
    let warm_base = relay.rss_mib().await?;
    let warm_body: String = (0..SIZES[0] - 2)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect();
    let warm_payload = format!("\"{warm_body}\"");
    let warm = (0..WARM_UP_ROUNDS * events).map(|_| {
        let (id, wire) = publisher.next_id();
        let (publisher, channel, payload) = (&publisher, warm_channel.clone(), &warm_payload);
        async move {
            publisher
                .publish_id(warm_cid, &channel, id, &wire, payload, None)
                .await
        }
    });
    futures::stream::iter(warm)
        .buffered(in_flight)
        .for_each(|_| async {})
        .await;
    let warm_rss = relay.rss_mib().await?;
    m.set("rss_growth_mib_warm_up", warm_rss - warm_base);
    m.note(format!(
        "warm-up: {} x 100 KB to a channel nobody reads: relay RSS {warm_base:.0} -> {warm_rss:.0} MiB (not judged)",
        WARM_UP_ROUNDS * events
    ));
    for (k, size) in SIZES.iter().enumerate() {
        let channel = ctx.unique(&format!("large-{size}"));
        let cid = ctx.recorder.channel(&channel);
        let specs = (0..subs)
            .map(|s| SubscriberSpec {
                sub: (k * subs + s) as u32,
                url: relay.url(),
                source: client::source_ip(s),
                channels: vec![(channel.clone(), 1)],
                read_delay: None,
                resume: true,
                payloads: PayloadCheck::None,
                stop_after: Some(events as u64),
            })
            .collect();
        ctx.phase(&format!("{} KB: subscribing", size / 1000));
        // The last round's subscribers are gone first, so that the count
        // below is of this round's (read after they start, or with the
        // last ones still leaving, the wait would run to its end).
        wait_until(
            Duration::from_secs(10),
            Duration::from_millis(20),
            || async { relay.metric("keel_subscriptions").await.unwrap_or(0.0) <= idle_subs },
        )
        .await;
        let before_subs = relay.metric("keel_subscriptions").await.unwrap_or(0.0);
        let subscribers = Subscribers::start(ctx, specs);
        wait_until(
            Duration::from_secs(30),
            Duration::from_millis(20),
            || async {
                relay.metric("keel_subscriptions").await.unwrap_or(0.0)
                    >= before_subs + (2 * subs) as f64
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = ctx.recorder.now();
        let base = relay.rss_mib().await?;
        // Payloads: JSON strings of seeded letters, exactly `size` bytes.
        let payloads: Vec<String> = (0..events)
            .map(|_| {
                let body: String = (0..size - 2)
                    .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
                    .collect();
                format!("\"{body}\"")
            })
            .collect();
        ctx.phase(&format!("{} KB: publishing", size / 1000));
        let payloads = &payloads;
        let sends = (0..payloads.len()).map(|i| {
            let (id, wire) = publisher.next_id();
            let (publisher, channel) = (&publisher, channel.clone());
            async move {
                publisher
                    .publish_id(cid, &channel, id, &wire, &payloads[i], None)
                    .await
            }
        });
        futures::stream::iter(sends)
            .buffered(in_flight)
            .for_each(|_| async {})
            .await;
        ctx.phase(&format!("{} KB: delivering", size / 1000));
        let reports = subscribers
            .finish((events * subs) as u64, Duration::from_secs(120))
            .await;
        let t1 = ctx.recorder.now();
        delivered += reports.iter().map(|r| r.delivered).sum::<u64>();
        wanted += (events * subs) as u64;
        let working = (events * size) as f64 / (1024.0 * 1024.0);
        let peak = peak_rss_mib(&ctx.resources, t0 as f64 / 1e6, t1 as f64 / 1e6).max(base);
        let ratio = (peak - base) / working;
        worst_ratio = worst_ratio.max(ratio);
        m.set(&format!("rss_growth_mib_{}kb", size / 1000), peak - base)
            .set(
                &format!("seconds_{}kb", size / 1000),
                (t1 - t0) as f64 / 1e6,
            );
        m.note(format!(
            "{} KB x {events} to {subs} subscribers: relay RSS {base:.0} -> peak {peak:.0} MiB for a {working:.1} MiB working set ({ratio:.2}x) in {:.1} s",
            size / 1000,
            (t1 - t0) as f64 / 1e6
        ));
    }
    m.set("delivered_ratio", delivered as f64 / wanted as f64)
        .set("rss_growth_ratio", worst_ratio);
    Ok(m)
}

// ----------------------------------------------------------------- soak

const SOAK_NAME: &str = "soak";

pub(crate) const SOAK: Scenario = Scenario {
    name: SOAK_NAME,
    suite: Suite::Load,
    seed: SeedRef {
        seed: "003",
        test: "test_stress_24hour_sustained_10k_subscriptions",
        threshold: "10,000 subscriptions, 8.64 M events (24 h at 100/s, compressed): no leak, no degradation, all delivered",
    },
    what: "10,000 subscriptions (1,000 sessions x 10 channels) under a steady open-model stream spread over the channels (6,000 events/s, for 5 minutes by default: 1.8 M events; --duration sets the length): RSS fitted over time, p99 per window",
    target: "all delivered, none dropped; RSS slope ~0 over the second half (fit reported); p99 flat (last third <= 2x first third)",
    needs_process: None,
    thresholds: |plan| {
        let mut t = vec![
            Threshold::all("delivered_ratio"),
            // A soak that sheds its own load proves nothing: sends the
            // generator could not start (in-flight bound full) are counted.
            Threshold::new("dropped_ratio", "", Some(Bound::Le(0.01)), Bound::Le(0.0)),
        ];
        // A slope fitted over less than a minute extrapolates start-up
        // growth to an hour, and thirds of a few seconds compare start-up
        // with steady state: both are judged only on runs long enough to
        // mean something (they are measured and reported either way).
        if plan.num("events") / plan.num("rate") >= 60.0 {
            t.push(Threshold::new(
                "p99_drift_ratio",
                "x",
                Some(Bound::Le(5.0)),
                Bound::Le(2.0),
            ));
            t.push(Threshold::new(
                "rss_slope_second_half_mib_per_hour",
                "MiB/h",
                Some(Bound::Le(1024.0)),
                Bound::Le(64.0),
            ));
        }
        t
    },
    plan: |input| {
        // The seed compresses 24 h into 86 s: 8.64 M events at 100,000/s.
        // A durable relay sharing 2 cores with its load generator peaks near
        // 20,000 acknowledged publishes/s spread over 10,000 channels on a
        // fresh database (each append dirties its channel's pages: SQLite's
        // WAL writes dominate), less as the log grows past a few million
        // rows. A soak belongs well below saturation: 6,000/s for 5 minutes
        // (1.8 M events), or for --duration.
        let conns = input.scale.pick(20, 1_000);
        let rate = input.scale.pick(5_000, 6_000);
        let secs = input
            .duration
            .unwrap_or_else(|| {
                input
                    .scale
                    .duration(Duration::from_secs(4), Duration::from_secs(300))
            })
            .as_secs_f64();
        let events = (rate as f64 * secs) as usize;
        input.plan(
            SOAK_NAME,
            &params(&[
                ("sessions", conns as f64),
                ("channels_per_session", 10.0),
                ("events", events as f64),
                ("rate", rate as f64),
                ("publishers", 16.0),
            ]),
        )
    },
    run: body!(run_soak),
    budget: Duration::from_secs(420),
};

async fn run_soak(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let relay = ctx.measured_relay(RelayOptions::default()).await?;
    let (conns, per, events, rate) = (
        plan.count("sessions"),
        plan.count("channels_per_session"),
        plan.count("events"),
        plan.num("rate"),
    );
    let names: Vec<String> = (0..conns * per)
        .map(|i| ctx.unique(&format!("soak-{i}")))
        .collect();
    let ids: Vec<ChannelId> = names.iter().map(|n| ctx.recorder.channel(n)).collect();
    let sink = LatencySink::default();
    let specs = (0..conns)
        .map(|c| SubscriberSpec {
            sub: c as u32,
            url: relay.url(),
            source: client::source_ip(c),
            channels: (0..per).map(|k| (names[c * per + k].clone(), 1)).collect(),
            read_delay: None,
            resume: true,
            payloads: PayloadCheck::Latency(sink.clone()),
            stop_after: None,
        })
        .collect();
    ctx.phase("subscribing");
    let base = relay.metric("keel_subscriptions").await.unwrap_or(0.0);
    let subscribers = Subscribers::start(ctx, specs);
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(50),
        || async {
            relay.metric("keel_subscriptions").await.unwrap_or(0.0)
                >= base + (conns * per + conns) as f64
        },
    )
    .await;
    let pubs =
        Arc::new(publishers(ctx, &relay.url(), 3_000, plan.count("publishers") as u32).await?);
    let schedule = Schedule::constant(rate, Duration::from_secs_f64(events as f64 / rate));
    let intended = schedule.intended();
    let start = tokio::time::Instant::now();
    let t_load = ctx.recorder.now();
    ctx.phase(&format!("{events} events at {rate}/s"));
    let recorder = ctx.recorder.clone();
    let channels = names.len();
    let stats = crate::load::run(&schedule, start, 50_000, Duration::from_millis(10), |i| {
        let at = start + intended[i as usize];
        let c = (i as usize * 7919) % channels;
        let payload = format!(r#"{{"t":{}}}"#, recorder.micros(at.into_std()));
        let (p, name, cid) = (&pubs[i as usize % pubs.len()], &names[c], ids[c]);
        async move {
            matches!(
                p.publish(cid, name, &payload, Some(at)).await,
                Answer::Published(_)
            )
        }
    })
    .await;
    ctx.phase("draining");
    let acked = stats.ok;
    let reports = subscribers.finish(acked, Duration::from_secs(120)).await;
    let t_end = ctx.recorder.now();
    let delivered: u64 = reports.iter().map(|r| r.delivered).sum();
    let latency = sink.snapshot();
    // RSS over the load phase, after a 10% warm-up: least-squares slope.
    let (from, to) = (t_load as f64 / 1e6, t_end as f64 / 1e6);
    let warm = from + (to - from) * 0.1;
    let samples: Vec<(f64, f64)> = ctx
        .resources
        .samples()
        .iter()
        .filter(|(t, _)| *t >= warm && *t <= to)
        .map(|(t, s)| (*t, s.rss_bytes as f64 / (1024.0 * 1024.0)))
        .collect();
    let slope_per_s = slope(&samples);
    // The store's page caches (64 MiB for the writer) fill during the first
    // minutes; the second half of the run is the steady state a leak shows in.
    let half = from + (to - from) * 0.5;
    let late: Vec<(f64, f64)> = samples
        .iter()
        .copied()
        .filter(|(t, _)| *t >= half)
        .collect();
    let late_slope_per_s = slope(&late);
    // p99 per window: the last third against the first third.
    let windows = latency.series();
    let third = windows.len() / 3;
    let p99_of =
        |w: &[(f64, f64, f64, u64)]| w.iter().map(|x| x.2).sum::<f64>() / w.len().max(1) as f64;
    let (first, last) = (
        p99_of(&windows[..third]),
        p99_of(&windows[windows.len() - third..]),
    );
    let mut m = Measured::default();
    m.set("events_acked", acked as f64)
        .set("delivered_ratio", delivered as f64 / acked.max(1) as f64)
        .set("rss_slope_mib_per_hour", slope_per_s * 3600.0)
        .set(
            "rss_slope_second_half_mib_per_hour",
            late_slope_per_s * 3600.0,
        )
        .set("relay_peak_rss_mib", peak_rss_mib(&ctx.resources, from, to))
        .set("p99_first_third_ms", first)
        .set("p99_last_third_ms", last)
        .set(
            "p99_drift_ratio",
            if first > 0.0 { last / first } else { 0.0 },
        )
        .set("deliver_p99_ms", latency.ms(0.99))
        .set("publish_ack_p99_ms", stats.latency.ms(0.99))
        .set("throughput_per_s", stats.throughput())
        .set("late_sends", stats.late as f64)
        .set("dropped_sends", stats.dropped as f64)
        .set(
            "dropped_ratio",
            stats.dropped as f64 / stats.scheduled.max(1) as f64,
        );
    m.note(format!(
        "{acked} events acknowledged in {:.0} s ({:.0}/s), {delivered} delivered; RSS slope {:.1} MiB/h over {} samples ({:.1} MiB/h over the second half, once the store's caches have filled); {} late, {} dropped sends",
        stats.elapsed.as_secs_f64(),
        stats.throughput(),
        slope_per_s * 3600.0,
        samples.len(),
        late_slope_per_s * 3600.0,
        stats.late,
        stats.dropped
    ));
    m.throughput = stats
        .latency
        .series()
        .iter()
        .map(|(t, _, _, n)| (*t, *n as f64))
        .collect();
    m.latency = Some(latency);
    Ok(m)
}

/// Least-squares slope of (x, y).
fn slope(points: &[(f64, f64)]) -> f64 {
    if points.len() < 2 {
        return 0.0;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let cov: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = points.iter().map(|(x, _)| (x - mx).powi(2)).sum();
    if var == 0.0 { 0.0 } else { cov / var }
}
