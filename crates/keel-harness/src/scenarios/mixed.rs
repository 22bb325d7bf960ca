//! Mixed faults: `combined_stressors` (seed 003: 500 ms latency, 100 KB
//! payloads, 100 subscribers, churn and 10% failures at once),
//! `chaos_monkey` (a seeded random mix of the process and network faults
//! for `--duration`), and `concurrent_transitions` (seed 004's state test:
//! the relay's health flapping fast, every transition logged once).

use std::time::Duration;

use rand::Rng;
use serde_json::json;

use super::process::{Fault, OutageShape, outage_thresholds, plan_outages, run_faults};
use super::{body, params, setup};
use crate::Error;
use crate::fixture::RelayOptions;
use crate::scenario::{Action, Ctx, Measured, Plan, PlanInput, Scenario, SeedRef, Suite};
use crate::threshold::{Bound, Threshold};

const COMBINED: &str = "combined_stressors";

pub(crate) const COMBINED_STRESSORS: Scenario = Scenario {
    name: COMBINED,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "003",
        test: "test_stress_high_latency_plus_large_payload_plus_many_subscribers",
        threshold: "events eventually delivered (high latency OK), no crash",
    },
    what: "100 SDK subscribers (10 small) of 100 KB payloads through the chaos proxy; for the window, 500 ms added each way and every second a fresh 10% of the links reset (churn and failures at once)",
    target: "nothing lost or duplicated, no publish failed (the SDK re-sends across resets), round trips at least 1 s while slow, every publisher acknowledged again within 4 s of the end (p95)",
    needs_process: Some("puts its own chaos proxy in front of the relay"),
    thresholds: |plan| {
        let mut t = outage_thresholds(plan, "stress_windows", false);
        // Churn drops links: at least one, not none.
        t[1] = Threshold::new("links_dropped", "", Some(Bound::Ge(1.0)), Bound::Ge(1.0));
        t.push(Threshold::new(
            "slow_rtt_p5_ms",
            "ms",
            Some(Bound::Ge(990.0)),
            Bound::Ge(990.0),
        ));
        t
    },
    plan: |input| {
        let mut plan = plan_outages(
            input,
            COMBINED,
            "combined",
            &OutageShape {
                iterations: (1, 2),
                outage_ms: (4_000, 10_000),
                publishers: (2, 4),
                subscribers: (10, 100),
                channels: (2, 4),
                publish_interval_ms: 1_000.0,
                recovery_target_ms: 4_000.0,
                short_liveness: false,
            },
        );
        plan.params
            .insert("payload_pad_bytes".into(), json!(100 * 1024));
        plan
    },
    run: body!(run_combined),
    budget: Duration::from_secs(300),
};

async fn run_combined(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    run_faults(ctx, plan, Fault::Combined { latency: 500 }).await
}

const MONKEY: &str = "chaos_monkey";

/// The kinds the monkey draws from (each a fault of its own scenario).
const MONKEY_KINDS: [&str; 5] = ["kill9", "sigstop", "partition", "blackhole", "latency"];

pub(crate) const CHAOS_MONKEY: Scenario = Scenario {
    name: MONKEY,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "002",
        test: "chaos monkey: random faults, success rate and MTTR",
        threshold: "95% of client operations succeed; MTTR < 5 min",
    },
    what: "for --duration (5 min; 20 s small), a seeded random sequence of SIGKILL, SIGSTOP, partition, blackhole and latency faults under SDK publish/subscribe load, each after a seeded stretch of calm",
    target: "99.9% of publishes succeed, nothing lost or duplicated, every publisher acknowledged again within 3 s of each fault (p95); time to recover reported per fault kind",
    needs_process: Some("SIGKILLs, SIGSTOPs and partitions the relay"),
    thresholds: |plan| {
        vec![
            Threshold::exact("faults", plan.num("iterations")),
            Threshold::new("success_ratio", "", Some(Bound::Ge(0.95)), Bound::Ge(0.999)),
            Threshold::zero("redelivered"),
            Threshold::all("converged"),
            Threshold::new(
                "recovery_p95_ms",
                "ms",
                Some(Bound::Le(300_000.0)),
                Bound::Le(3_000.0),
            ),
        ]
    },
    plan: plan_monkey,
    run: body!(run_monkey),
    budget: Duration::from_secs(900),
};

fn plan_monkey(input: &PlanInput) -> Plan {
    let duration = input.duration.unwrap_or_else(|| {
        input
            .scale
            .duration(Duration::from_secs(20), Duration::from_secs(300))
    });
    let mut rng = input.rng(MONKEY, "faults");
    let mut actions = Vec::new();
    let mut at = 0u64;
    loop {
        let up = rng.random_range(500..=2_000);
        let kind = MONKEY_KINDS[rng.random_range(0..MONKEY_KINDS.len())];
        let length = if kind == "kill9" {
            0
        } else {
            rng.random_range(1_500..=3_000)
        };
        if at + up + length > duration.as_millis() as u64 {
            break;
        }
        at += up;
        actions.push(Action {
            at_ms: at,
            duration_ms: length,
            kind: kind.into(),
            target: if matches!(kind, "kill9" | "sigstop") {
                "relay"
            } else {
                "every client link"
            }
            .into(),
            params: json!({"fault": actions.len() + 1, "up_ms": up}),
        });
        at += length;
    }
    let mut plan = input.plan(
        MONKEY,
        &params(&[
            ("iterations", actions.len() as f64),
            ("publishers", input.scale.pick(3, 16) as f64),
            ("subscribers", input.scale.pick(2, 4) as f64),
            ("channels", input.scale.pick(2, 4) as f64),
            ("publish_interval_ms", 5.0),
            ("heal_deadline_s", 30.0),
            ("liveness_timeout_ms", 1_000.0),
            ("duration_s", duration.as_secs_f64()),
        ]),
    );
    plan.actions = actions;
    plan
}

async fn run_monkey(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    run_faults(ctx, plan, Fault::Monkey).await
}

const FLAP: &str = "concurrent_transitions";

pub(crate) const CONCURRENT_TRANSITIONS: Scenario = Scenario {
    name: FLAP,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "004",
        test: "health state machine under rapid changes",
        threshold: "every transition logged once with a unique id, no corrupt state",
    },
    what: "the mock upstream flaps down and up at seeded intervals of 20 to 300 ms while clients send and publish and /healthz is read every 10 ms; then it stays up and the relay is stopped",
    target: "the health log's ids unique and its chain unbroken (each from = the last to), at least as many transitions logged as /healthz showed, OPERATIONAL at the end, the database intact, every send accepted once (none DEAD: a flapping link uses no attempts)",
    needs_process: Some("points the relay at its own mock upstream, and stops the relay"),
    thresholds: |_| {
        vec![
            Threshold::all("chain_valid"),
            Threshold::all("logged_covers_observed"),
            Threshold::new("observed_changes", "", Some(Bound::Ge(2.0)), Bound::Ge(4.0)),
            Threshold::all("operational_at_end"),
            Threshold::all("database_ok"),
            Threshold::zero("sends_lost"),
            Threshold::zero("sends_twice"),
            // A flapping link uses no attempts: nothing goes DEAD.
            Threshold::zero("sends_dead"),
        ]
    },
    plan: |input: &PlanInput| {
        let flips = input.scale.pick(20, 100);
        let mut plan = input.plan(FLAP, &params(&[("flips", flips as f64)]));
        let mut rng = input.rng(FLAP, "flips");
        let mut at = 500;
        for k in 0..flips {
            let length = rng.random_range(20..=300);
            plan.actions.push(Action {
                at_ms: at,
                duration_ms: length,
                kind: if k % 2 == 0 {
                    "upstream_down"
                } else {
                    "upstream_up"
                }
                .into(),
                target: "mock upstream".into(),
                params: json!({}),
            });
            at += length;
        }
        plan
    },
    run: body!(run_flap),
    budget: Duration::from_secs(300),
};

async fn run_flap(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let up = super::unlimited_upstream().await?;
    let mut relay = ctx
        .relay(RelayOptions {
            upstream: Some(up.url()),
            config: "[sending]\nglobal_rate = 1000\nper_recipient_rate = 1000\nper_recipient_burst = 1000\nbackoff_base_ms = 20\nbackoff_cap_ms = 200\nanswer_timeout_ms = 500\n".into(),
            ..Default::default()
        })
        .await?;
    let r = &ctx.recorder;
    // Health read every 10 ms: the distinct states seen, in order.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (addr, stop) = (relay.addr(), stop.clone());
        tokio::spawn(async move {
            let mut seen: Vec<String> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let text = crate::fixture::http_get(addr, "/healthz")
                    .await
                    .unwrap_or_default();
                let state = ["OPERATIONAL", "DEGRADED", "STARTING", "DRAINING", "STOPPED"]
                    .into_iter()
                    .find(|s| text.contains(&format!("\"state\":\"{s}\"")));
                if let Some(s) = state
                    && seen.last().is_none_or(|l| l != s)
                {
                    seen.push(s.to_owned());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen
        })
    };
    // A sender all along: what it was told `sent` must reach the upstream once.
    let sender = {
        let (url, stop) = (relay.url(), stop.clone());
        tokio::spawn(async move {
            let client =
                keel_relay::client::Client::connect(keel_relay::client::ClientConfig::new(&url))
                    .await
                    .map_err(|e| setup("sender", e))?;
            let session = client.session_id().unwrap_or_default();
            let mut ids = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                n += 1;
                let id = format!("flap-{n}");
                if client.send(&id, "bob", &json!(n)).await.is_ok() {
                    ids.push(format!("session:{session}/{id}"));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            client.close().await;
            Ok::<_, Error>(ids)
        })
    };
    ctx.phase("flapping the upstream");
    let t0 = r.now();
    let started = tokio::time::Instant::now();
    for a in &plan.actions {
        tokio::time::sleep_until(started + Duration::from_millis(a.at_ms)).await;
        up.set_mode(if a.kind == "upstream_down" {
            keel_faults::UpstreamMode::Down
        } else {
            keel_faults::UpstreamMode::Normal
        });
    }
    up.set_mode(keel_faults::UpstreamMode::Normal);
    r.fault("upstream_flapping", "mock upstream", t0, r.now());
    ctx.phase("settling");
    let operational = super::wait_until(
        Duration::from_secs(15),
        Duration::from_millis(20),
        || async {
            crate::fixture::http_get(relay.addr(), "/healthz")
                .await
                .unwrap_or_default()
                .contains("\"state\":\"OPERATIONAL\"")
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let observed = poller.await.map_err(|e| setup("poller", e))?;
    let ids = sender.await.map_err(|e| setup("sender", e))??;
    let drained = super::wait_until(Duration::from_secs(30), Duration::from_millis(20), || {
        let (up, ids) = (&up, &ids);
        async move {
            let got: std::collections::HashSet<String> =
                up.accepted().into_iter().map(|a| a.id).collect();
            ids.iter().all(|i| got.contains(i))
        }
    })
    .await;
    let accepted = up.accepted();
    let mut times: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    for a in &accepted {
        *times.entry(a.id.as_str()).or_default() += 1;
    }
    let lost = ids
        .iter()
        .filter(|i| !times.contains_key(i.as_str()))
        .count();
    let twice = times.values().filter(|n| **n > 1).count();
    relay.terminate().await?;
    let report = keel_relay::doctor::run(&relay.data_dir())
        .await
        .map_err(|e| setup("keel-relay doctor", e))?
        .text;
    let line = |prefix: &str| {
        report
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or("")
            .to_owned()
    };
    let health = line("health log:");
    let outbox = line("outbox:");
    let dead: f64 = outbox
        .rsplit("dead ")
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(f64::NAN);
    let logged: f64 = health
        .strip_prefix("health log: ")
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    let changes = observed.len().saturating_sub(1) as f64;
    let mut m = Measured::default();
    m.set(
        "chain_valid",
        f64::from(u8::from(health.contains("ids unique, chain valid"))),
    )
    .set("logged_transitions", logged)
    .set("observed_changes", changes)
    .set(
        "logged_covers_observed",
        f64::from(u8::from(logged >= changes)),
    )
    .set("operational_at_end", f64::from(u8::from(operational)))
    .set(
        "database_ok",
        f64::from(u8::from(line("database:").contains("quick_check: ok"))),
    )
    .set("sends_lost", lost as f64)
    .set("sends_twice", twice as f64)
    .set("sends_dead", dead)
    .set("sends_acked", ids.len() as f64);
    m.note(format!(
        "{} upstream flips; /healthz showed {changes} state changes, the health log holds {logged} transitions ({}); {} sends acknowledged, all accepted once: {}; {outbox}",
        plan.actions.len(),
        health.split(", ").nth(1).unwrap_or("?"),
        ids.len(),
        drained && lost == 0 && twice == 0
    ));
    Ok(m)
}
