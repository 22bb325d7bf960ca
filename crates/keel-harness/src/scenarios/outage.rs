//! Upstream faults: `upstream_outage` takes the mock messaging API down
//! under send load and brings it back; every send the relay acknowledged
//! must reach the upstream exactly once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use keel_relay::client::{Client, ClientConfig};
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::{body, params, setup, wait_until};
use crate::Error;
use crate::fixture::RelayOptions;
use crate::history::{Op, Outcome};
use crate::scenario::{Action, Ctx, Measured, Plan, PlanInput, Scenario, SeedRef, Suite};
use crate::threshold::{Bound, Threshold};

const OUTAGE: &str = "upstream_outage";

pub(crate) const UPSTREAM_OUTAGE: Scenario = Scenario {
    name: OUTAGE,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "004",
        test: "upstream outage during burn-in",
        threshold: "upstream down 30 s under load: sends held, none lost, none sent twice",
    },
    what: "SDK sessions send to the upstream at a steady rate; the mock upstream goes down (refusing connections) for the outage, then returns",
    target: "every acknowledged send accepted by the upstream exactly once; the backlog drained within 10 s of its return",
    needs_process: true,
    thresholds: |plan| {
        vec![
            Threshold::zero("sends_lost"),
            Threshold::zero("sends_twice"),
            Threshold::zero("sends_unexpected"),
            Threshold::zero("send_errors"),
            Threshold::new(
                "sends_during_outage",
                "",
                None,
                Bound::Ge(plan.num("senders")),
            ),
            Threshold::new(
                "drain_seconds",
                "s",
                Some(Bound::Le(300.0)),
                Bound::Le(10.0),
            ),
        ]
    },
    plan: plan_outage,
    run: body!(run_outage),
    budget: Duration::from_secs(300),
};

fn plan_outage(input: &PlanInput) -> Plan {
    let outage_ms = input.scale.pick(2_000, 30_000) as u64;
    let mut plan = input.plan(
        OUTAGE,
        &params(&[
            ("senders", input.scale.pick(2, 8) as f64),
            ("sends_per_second_each", 10.0),
            ("recipients", 20.0),
            ("outage_ms", outage_ms as f64),
        ]),
    );
    let mut rng = input.rng(OUTAGE, "outage");
    let before = rng.random_range(1_000..=2_000);
    plan.actions.push(Action {
        at_ms: before,
        duration_ms: outage_ms,
        kind: "upstream_down".into(),
        target: "mock upstream".into(),
        params: json!({}),
    });
    // Load goes on for a while after the upstream returns.
    plan.params
        .insert("load_ms".into(), json!(before + outage_ms + 1_000));
    plan
}

async fn run_outage(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let up = super::unlimited_upstream().await?;
    let relay = ctx
        .relay(RelayOptions {
            upstream: Some(up.url()),
            // The relay's own limits well above the load: this scenario is
            // about the outage, not the rate limits (tested elsewhere).
            config: "[sending]\nglobal_rate = 1000\nper_recipient_rate = 1000\nper_recipient_burst = 1000\nbackoff_base_ms = 100\nbackoff_cap_ms = 1000\n".into(),
            ..Default::default()
        })
        .await?;
    let r = &ctx.recorder;
    let senders = plan.count("senders");
    let interval = Duration::from_secs_f64(1.0 / plan.num("sends_per_second_each").max(0.1));
    let recipients = plan.count("recipients").max(1);
    let load = Duration::from_millis(plan.num("load_ms") as u64);
    let outage = plan
        .actions
        .first()
        .ok_or_else(|| setup("plan", "no outage"))?
        .clone();

    ctx.phase("sending");
    let started = tokio::time::Instant::now();
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for s in 0..senders as u32 {
        let (url, r, down) = (relay.url(), r.clone(), down.clone());
        let mut rng = rand::rngs::StdRng::seed_from_u64(crate::scenario::sub_seed(
            plan.seed,
            &format!("{OUTAGE}/sender{s}"),
        ));
        tasks.push(tokio::spawn(async move {
            let client = Client::connect(ClientConfig::new(&url))
                .await
                .map_err(|e| setup("sender connect", e))?;
            let session = client.session_id().unwrap_or_default();
            let mut acked: Vec<(String, bool)> = Vec::new();
            let mut errors = 0u64;
            let mut n = 0u64;
            while started.elapsed() < load {
                n += 1;
                let id = format!("s{s}-{n}");
                let to = format!("user-{}", rng.random_range(0..recipients));
                let invoke = r.now();
                let during = down.load(std::sync::atomic::Ordering::Acquire);
                let outcome = match client.send(&id, &to, &json!({"n": n})).await {
                    Ok(()) => {
                        acked.push((format!("session:{session}/{id}"), during));
                        Outcome::Ok { offset: 0 }
                    }
                    Err(e) => {
                        errors += 1;
                        Outcome::Fail {
                            code: e.to_string(),
                        }
                    }
                };
                r.op(Op {
                    client: s,
                    kind: "send".into(),
                    invoke,
                    done: r.now(),
                    outcome,
                    detail: format!("{id} to {to}"),
                });
                tokio::time::sleep(interval).await;
            }
            Ok::<_, Error>((acked, errors))
        }));
    }
    tokio::time::sleep(Duration::from_millis(outage.at_ms)).await;
    ctx.phase("upstream down");
    let t_down = r.now();
    down.store(true, std::sync::atomic::Ordering::Release);
    up.set_mode(keel_faults::UpstreamMode::Down);
    tokio::time::sleep(Duration::from_millis(outage.duration_ms)).await;
    up.set_mode(keel_faults::UpstreamMode::Normal);
    down.store(false, std::sync::atomic::Ordering::Release);
    let back = tokio::time::Instant::now();
    r.fault("upstream_down", "mock upstream", t_down, r.now());
    ctx.phase("upstream back: draining");

    let mut acked = Vec::new();
    let mut send_errors = 0;
    for t in tasks {
        let (a, e) = t.await.map_err(|e| setup("sender task", e))??;
        acked.extend(a);
        send_errors += e;
    }
    let wanted: HashSet<String> = acked.iter().map(|(id, _)| id.clone()).collect();
    let drained = wait_until(Duration::from_secs(120), Duration::from_millis(20), || {
        let (up, wanted) = (&up, &wanted);
        async move {
            let got: HashSet<String> = up.accepted().into_iter().map(|a| a.id).collect();
            wanted.iter().all(|id| got.contains(id))
        }
    })
    .await;
    let drain = back.elapsed();
    // Anything still in flight settles.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let accepted = up.accepted();
    let mut times: HashMap<&str, u32> = HashMap::new();
    for a in &accepted {
        *times.entry(a.id.as_str()).or_default() += 1;
    }
    let lost = wanted
        .iter()
        .filter(|id| !times.contains_key(id.as_str()))
        .count();
    let twice = times.values().filter(|n| **n > 1).count();
    // Accepted, but no session was told `sent` for it.
    let unexpected = times.keys().filter(|id| !wanted.contains(**id)).count();
    let during = acked.iter().filter(|(_, d)| *d).count();
    let mut per_second: BTreeMap<u64, f64> = BTreeMap::new();
    for a in &accepted {
        let t =
            a.at.duration_since(tokio::time::Instant::from_std(r.epoch()));
        *per_second.entry(t.as_secs()).or_default() += 1.0;
    }
    let mut m = Measured::default();
    m.set("sends_acked", acked.len() as f64)
        .set("sends_lost", lost as f64)
        .set("sends_twice", twice as f64)
        .set("sends_unexpected", unexpected as f64)
        .set("send_errors", send_errors as f64)
        .set("sends_during_outage", during as f64)
        .set("resent_to_upstream", up.duplicates().len() as f64)
        .set(
            "drain_seconds",
            if drained {
                drain.as_secs_f64()
            } else {
                f64::INFINITY
            },
        );
    m.throughput = per_second.into_iter().map(|(s, n)| (s as f64, n)).collect();
    m.note(format!(
        "{} sends acknowledged ({during} while the upstream was down for {:.0} s); every one accepted once; backlog drained {:.2} s after it returned; {} re-sent and recognised as duplicates by the upstream",
        acked.len(),
        outage.duration_ms as f64 / 1000.0,
        drain.as_secs_f64(),
        up.duplicates().len()
    ));
    Ok(m)
}
