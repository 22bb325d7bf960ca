//! Abusive clients against the relay's byte budgets, beside a well-behaved
//! one: pipelined maximum-size publishes, subscribers that never read, and
//! replays of a large backlog that are never read either.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::{body, params, peak_rss_mib, rss_mib, wait_until};
use crate::Error;
use crate::client::{self, Answer, PayloadCheck, Publisher, SubscriberSpec, spawn_subscriber};
use crate::fixture::RelayOptions;
use crate::load::{LatencySink, Schedule};
use crate::scenario::{Ctx, Measured, Plan, PlanInput, Scenario, SeedRef, Suite};
use crate::threshold::{Bound, Threshold};

const ABUSE: &str = "abuse_memory";

/// The relay's default budget of payload bytes held, MiB.
const GLOBAL_BUDGET_MIB: f64 = 512.0;

pub(crate) const ABUSE_MEMORY: Scenario = Scenario {
    name: ABUSE,
    suite: Suite::Load,
    seed: SeedRef {
        seed: "003",
        test: "test_stress_memory_saturation_event_queue (under abuse)",
        threshold: "no OOM crash, memory stabilizes under a backlog the consumers cannot take",
    },
    what: "100 connections pipelining 1 MiB publishes, 100 subscribers that never read the channel they flood, 100 replays of a 100 MiB backlog never read, beside a well-behaved client publishing and receiving 50 messages/s",
    target: "relay RSS within its baseline plus the 512 MiB global budget plus 10%; the well-behaved client's p99 < 100 ms, nothing of it lost",
    needs_process: Some(
        "starts the relay with its own byte budget, which its memory is judged against",
    ),
    thresholds: |plan| {
        let mut t = vec![
            Threshold::new("growth_over_budget", "x", None, Bound::Le(1.1)),
            Threshold::all("calm_delivered_ratio"),
        ];
        // The calm client's latency is real speed on a shared machine: it
        // is judged at full scale (xtask), and at small scale (`cargo test`,
        // a handful of abusers) only printed, never a wall-clock verdict.
        if plan.scale != "small" {
            t.insert(
                1,
                Threshold::new("calm_p99_ms", "ms", None, Bound::Le(100.0)),
            );
        }
        t
    },
    plan: |input: &PlanInput| {
        let each = input.scale.pick(5, 100);
        let secs = input
            .duration
            .unwrap_or_else(|| {
                input
                    .scale
                    .duration(Duration::from_secs(4), Duration::from_secs(12))
            })
            .as_secs_f64();
        let backlog = input.scale.pick(10, 100);
        let payload = input.scale.pick(256 * 1024, 1024 * 1024);
        input.plan(
            ABUSE,
            &params(&[
                ("connections_per_kind", each as f64),
                ("seconds", secs),
                ("backlog_messages", backlog as f64),
                ("payload_bytes", payload as f64),
                ("calm_rate", 50.0),
            ]),
        )
    },
    run: body!(run_abuse),
    budget: Duration::from_secs(240),
};

/// A session that subscribes to `channel` from its first offset and never
/// reads, until `until`.
async fn non_reader(url: String, i: usize, channel: &'static str, until: tokio::time::Instant) {
    let Ok((mut ws, _)) = client::open_session(&url, client::source_ip(i)).await else {
        return;
    };
    let sub = format!(r#"{{"type":"subscribe","channel":"{channel}","from":1}}"#);
    let _ = ws.send(Message::text(sub)).await;
    tokio::time::sleep_until(until).await;
    drop(ws);
}

async fn run_abuse(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    // The relay's own per-connection byte rate (the harness's base
    // configuration lifts it for load tests): abuse meets the defaults.
    let defaults = keel_relay::config::Limits::default();
    let relay = ctx
        .relay(RelayOptions {
            config: format!(
                "publish_bytes_rate = {}\npublish_bytes_burst = {}\n",
                defaults.publish_bytes_rate,
                defaults.bytes_burst()
            ),
            ..Default::default()
        })
        .await?;
    let (each, secs) = (plan.count("connections_per_kind"), plan.num("seconds"));
    let payload_bytes = plan.count("payload_bytes");
    let big = format!("\"{}\"", "a".repeat(payload_bytes - 2));
    // The backlog, written before the baseline (it also fills the store's
    // page cache, which is not what is measured).
    // One publisher a message, all at once: each stays within its
    // connection's byte rate, so the backlog takes a second, not a minute.
    ctx.phase("writing the backlog");
    let backlog = ctx.recorder.channel("abuse-backlog");
    let fillers = (0..plan.count("backlog_messages")).map(|k| {
        let (url, big, recorder) = (relay.url(), &big, &ctx.recorder);
        async move {
            let filler = Publisher::open(&url, 7_002 + k as u32, None, recorder).await?;
            match filler.publish(backlog, "abuse-backlog", big, None).await {
                Answer::Published(_) => Ok(()),
                other => Err(Error::Relay(format!(
                    "a backlog publish was answered {other:?}"
                ))),
            }
        }
    });
    futures::future::try_join_all(fillers).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = rss_mib(relay.pid());
    let t0 = ctx.recorder.now();

    // The well-behaved client, measured throughout, runs on a runtime of
    // its own (one thread), as a load generator keeps its measuring client
    // apart from the load it makes: in one scheduler with the harness's
    // 300 abusive tasks (each formatting and masking 1 MiB frames), its
    // sends and reads would wait behind theirs, and the harness's own
    // queueing would be charged to the relay. It still shares the
    // machine's CPUs with the relay and the abusers, as any client does.
    let calm_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("keel-harness-calm")
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            context: "starting the calm client's runtime".into(),
            source,
        })?;
    let sink = LatencySink::default();
    let calm_rate = plan.num("calm_rate");
    let calm = ctx.recorder.channel("calm");
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let (go, go_rx) = tokio::sync::oneshot::channel::<()>();
    let calm_task = calm_rt.spawn({
        let (url, recorder, sink) = (relay.url(), ctx.recorder.clone(), sink.clone());
        async move {
            let calm_events = (calm_rate * secs) as u64;
            let (stop_calm, stop) = tokio::sync::watch::channel(false);
            let (progress, sub) = spawn_subscriber(
                SubscriberSpec {
                    sub: 1,
                    url: url.clone(),
                    source: None,
                    channels: vec![("calm".into(), 1)],
                    read_delay: None,
                    resume: true,
                    payloads: PayloadCheck::Latency(sink),
                    stop_after: Some(calm_events),
                },
                recorder.clone(),
                stop,
                Duration::from_secs(2),
            );
            let publisher = Publisher::open(&url, 7_001, None, &recorder).await;
            let ok = publisher.is_ok();
            let _ = ready_tx.send(publisher.as_ref().err().map(ToString::to_string));
            if !ok || go_rx.await.is_err() {
                let _ = stop_calm.send(true);
                return None;
            }
            let publisher = publisher.ok()?;
            let schedule = Schedule::constant(calm_rate, Duration::from_secs_f64(secs));
            let intended = schedule.intended();
            let start = tokio::time::Instant::now();
            let stats = crate::load::run(&schedule, start, 1_000, Duration::from_millis(10), |i| {
                let at = start + intended[i as usize];
                let payload = format!(r#"{{"t":{}}}"#, recorder.micros(at.into_std()));
                let p = &publisher;
                async move {
                    matches!(
                        p.publish(calm, "calm", &payload, Some(at)).await,
                        Answer::Published(_)
                    )
                }
            })
            .await;
            // Everything it published acknowledged reaches it.
            wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
                let done = progress.get() >= stats.ok;
                async move { done }
            })
            .await;
            let _ = stop_calm.send(true);
            let _ = sub.await;
            Some((stats, progress.get()))
        }
    });
    match ready.await {
        Ok(None) => {}
        Ok(Some(e)) => return Err(Error::Client(format!("the calm publisher: {e}"))),
        Err(_) => return Err(Error::Client("the calm client's runtime stopped".into())),
    }

    ctx.phase("abusers connecting");
    let until = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
    let mut abusers = Vec::new();
    for i in 0..each {
        let (url, big) = (relay.url(), big.clone());
        // Pipelined maximum-size publishes, answers read and dropped.
        abusers.push(tokio::spawn(async move {
            let Ok((ws, _)) = client::open_session(&url, client::source_ip(i)).await else { return };
            let (mut tx, mut rx) = ws.split();
            let drain = tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
            let mut n = 0u64;
            while tokio::time::Instant::now() < until {
                let f = format!(r#"{{"type":"publish","channel":"abuse-firehose","id":"a{i}-{n}","payload":{big}}}"#);
                match tokio::time::timeout_at(until, tx.send(Message::text(f))).await {
                    Ok(Ok(())) => n += 1,
                    _ => break,
                }
            }
            drain.abort();
        }));
        // A subscriber of the firehose that never reads.
        abusers.push(tokio::spawn(non_reader(
            relay.url(),
            i + 1,
            "abuse-firehose",
            until,
        )));
        // A replay of the whole backlog that is never read.
        abusers.push(tokio::spawn(non_reader(
            relay.url(),
            i + 2,
            "abuse-backlog",
            until,
        )));
    }
    ctx.phase("abuse, and a calm client beside it");
    let _ = go.send(());
    for a in abusers {
        let _ = a.await;
    }
    let t1 = ctx.recorder.now();
    ctx.phase("the calm client drains");
    let calm_result = calm_task.await;
    calm_rt.shutdown_background();
    let Ok(Some((calm_stats, calm_delivered))) = calm_result else {
        return Err(Error::Client("the calm client stopped early".into()));
    };
    let peak = peak_rss_mib(&ctx.resources, t0 as f64 / 1e6, t1 as f64 / 1e6).max(baseline);
    let growth = peak - baseline;
    let latency = sink.snapshot();
    let hits = relay.metrics().await.unwrap_or_default();
    let limit = |name: &str| {
        crate::fixture::metric_value(&hits, &format!("keel_limit_hits_total{{limit=\"{name}\"}}"))
    };
    let mut m = Measured::default();
    m.set("baseline_rss_mib", baseline)
        .set("peak_rss_mib", peak)
        .set("growth_mib", growth)
        .set("growth_over_budget", growth / GLOBAL_BUDGET_MIB)
        .set("calm_p50_ms", latency.ms(0.5))
        .set("calm_p99_ms", latency.ms(0.99))
        .set("calm_ack_p50_ms", calm_stats.latency.ms(0.5))
        .set("calm_ack_p99_ms", calm_stats.latency.ms(0.99))
        .set(
            "calm_delivered_ratio",
            calm_delivered as f64 / calm_stats.ok.max(1) as f64,
        )
        .set("byte_rate_waits", limit("publish_bytes"))
        .set("inbound_pauses", limit("inbound_bytes"))
        .set("global_pauses", limit("global_bytes"))
        .set("outbound_closes", limit("outbound_bytes"))
        .set("write_deadlines", limit("write_deadline"));
    m.note(format!(
        "{each} abusers of each kind for {secs:.0} s: relay RSS {baseline:.0} -> peak {peak:.0} MiB (+{growth:.0} MiB; budget {GLOBAL_BUDGET_MIB:.0} MiB); calm client p50 {:.1} ms, p99 {:.1} ms",
        latency.ms(0.5),
        latency.ms(0.99)
    ));
    m.latency = Some(latency);
    m.throughput = calm_stats
        .latency
        .series()
        .iter()
        .map(|(t, _, _, n)| (*t, *n as f64))
        .collect();
    Ok(m)
}
