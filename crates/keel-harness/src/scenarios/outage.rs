//! Upstream faults under send load from SDK sessions; every send the relay
//! acknowledged must reach the mock upstream exactly once, whatever it did:
//! `upstream_outage` takes it down and brings it back,
//! `invalid_upstream_responses` answers with garbage, wrong ids and frames
//! cut short, `timeouts` stalls it (answers nothing) while a client that
//! never reads sits on a busy channel, `rate_limit_storm` gives the relay
//! limits far above the upstream's so that it lives on 429s.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::SinkExt;
use keel_faults::UpstreamMode;
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

/// What the upstream does wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpFault {
    /// Down (refusing connections) for the action.
    Outage,
    /// Garbage, then answers with wrong ids, then half frames, a third of
    /// the action each.
    Invalid,
    /// Answers nothing for the action; a client that never reads is
    /// subscribed to a busy channel all along.
    Stall,
    /// Limits far below the relay's own for the whole load.
    Storm,
}

/// Thresholds every upstream fault shares: exactly once, drained in time.
fn once_thresholds(plan: &Plan) -> Vec<Threshold> {
    vec![
        Threshold::zero("sends_lost"),
        Threshold::zero("sends_twice"),
        Threshold::zero("sends_unexpected"),
        Threshold::zero("send_errors"),
        Threshold::new(
            "drain_seconds",
            "s",
            Some(Bound::Le(300.0)),
            Bound::Le(plan.num("drain_target_s")),
        ),
    ]
}

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
    needs_process: Some("points the relay at its own mock upstream"),
    thresholds: |plan| {
        let mut t = once_thresholds(plan);
        t.push(Threshold::new(
            "sends_during_outage",
            "",
            None,
            Bound::Ge(plan.num("senders")),
        ));
        t
    },
    plan: |input| plan_upstream(input, OUTAGE, "upstream_down", (2_000, 30_000)),
    run: body!(run_outage),
    budget: Duration::from_secs(300),
};

const INVALID: &str = "invalid_upstream_responses";

pub(crate) const INVALID_UPSTREAM_RESPONSES: Scenario = Scenario {
    name: INVALID,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "002",
        test: "invalid input / corrupted responses: no crash",
        threshold: "no crash; graceful handling",
    },
    what: "under send load the mock upstream answers with garbage (non-JSON text, binary junk), then `ok` for ids never sent, then answers cut in half, a third of the fault each; then it is well again",
    target: "the relay stays up and counts the bad frames; every acknowledged send accepted exactly once (SENT), none DEAD, and `keel-relay doctor` says so",
    needs_process: Some("points the relay at its own mock upstream"),
    thresholds: |plan| {
        let mut t = once_thresholds(plan);
        t.push(Threshold::new(
            "bad_answers_counted",
            "",
            Some(Bound::Ge(1.0)),
            Bound::Ge(3.0),
        ));
        t.push(Threshold::all("doctor_agrees"));
        t
    },
    plan: |input| plan_upstream(input, INVALID, "upstream_invalid", (3_000, 15_000)),
    run: body!(run_invalid),
    budget: Duration::from_secs(300),
};

const STALL: &str = "timeouts";

pub(crate) const TIMEOUTS: Scenario = Scenario {
    name: STALL,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "002",
        test: "timeouts: stalled peers, no deadlocks",
        threshold: "95% of operations complete (no deadlock)",
    },
    what: "the mock upstream accepts sends and answers nothing for the fault, while a client that never reads is subscribed to a channel another client publishes 16 KiB messages to every 2 ms",
    target: "100% of client operations complete within 10 s; the relay times the upstream out and re-sends, every acknowledged send accepted exactly once; the stalled client shed as a slow consumer",
    needs_process: Some("points the relay at its own mock upstream"),
    thresholds: |plan| {
        let mut t = once_thresholds(plan);
        t.push(Threshold::new(
            "ops_completed_ratio",
            "",
            Some(Bound::Ge(0.95)),
            Bound::Ge(1.0),
        ));
        t.push(Threshold::new(
            "slow_consumers",
            "",
            Some(Bound::Ge(1.0)),
            Bound::Ge(1.0),
        ));
        t.push(Threshold::new(
            "sends_during_outage",
            "",
            None,
            Bound::Ge(plan.num("senders")),
        ));
        t
    },
    plan: |input| plan_upstream(input, STALL, "upstream_stall", (3_000, 20_000)),
    run: body!(run_stall),
    budget: Duration::from_secs(300),
};

const STORM: &str = "rate_limit_storm";

pub(crate) const RATE_LIMIT_STORM: Scenario = Scenario {
    name: STORM,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "000/001",
        test: "test_exponential_backoff_on_rejection; 429 handling",
        threshold: "rate limiter backs off on rejection; messages not dropped during backoff",
    },
    what: "the relay's send limits far above the mock upstream's (global and per recipient): it learns the real limits only from 429s, under steady send load twice the upstream's rate",
    target: "zero sends before a known retry_after; every acknowledged send accepted exactly once; the upstream's capacity at least 80% used while a backlog waits",
    needs_process: Some("points the relay at its own mock upstream"),
    thresholds: |plan| {
        let mut t = once_thresholds(plan);
        t.push(Threshold::zero("early_sends"));
        t.push(Threshold::new(
            "rate_limited",
            "",
            Some(Bound::Ge(1.0)),
            Bound::Ge(plan.num("senders")),
        ));
        // Capacity used is real speed: judged at full scale (xtask), only
        // printed at small scale (`cargo test`, a debug build on a shared
        // machine).
        if plan.scale != "small" {
            t.push(Threshold::new(
                "upstream_utilisation",
                "",
                None,
                Bound::Ge(0.8),
            ));
        }
        t
    },
    plan: plan_storm,
    run: body!(run_storm),
    budget: Duration::from_secs(300),
};

/// A steady send load with one upstream fault of `(small, full)` ms in it.
fn plan_upstream(input: &PlanInput, scenario: &str, kind: &str, fault_ms: (usize, usize)) -> Plan {
    let fault_ms = input.scale.pick(fault_ms.0, fault_ms.1) as u64;
    let mut plan = input.plan(
        scenario,
        &params(&[
            ("senders", input.scale.pick(2, 8) as f64),
            ("sends_per_second_each", 10.0),
            ("recipients", 20.0),
            ("fault_ms", fault_ms as f64),
            ("drain_target_s", 10.0),
        ]),
    );
    let mut rng = input.rng(scenario, "fault");
    let before = rng.random_range(1_000..=2_000);
    plan.actions.push(Action {
        at_ms: before,
        duration_ms: fault_ms,
        kind: kind.into(),
        target: "mock upstream".into(),
        params: json!({}),
    });
    // Load goes on for a while after the upstream is well again.
    plan.params
        .insert("load_ms".into(), json!(before + fault_ms + 1_000));
    plan
}

/// Twice the upstream's global rate, offered for the whole load.
fn plan_storm(input: &PlanInput) -> Plan {
    let senders = input.scale.pick(2, 8);
    let rate = input.scale.pick(10, 40) as f64;
    let load_ms = input.scale.pick(4_000, 15_000) as u64;
    let per_sender = 2.0 * rate / senders as f64;
    // The backlog left at the end drains at the upstream's rate.
    let backlog = (per_sender * senders as f64 - rate) * load_ms as f64 / 1000.0;
    let mut plan = input.plan(
        STORM,
        &params(&[
            ("senders", senders as f64),
            ("sends_per_second_each", per_sender),
            ("recipients", 20.0),
            ("upstream_rate", rate),
            ("upstream_burst", 5.0),
            ("upstream_recipient_rate", rate / 8.0),
            ("load_ms", load_ms as f64),
            ("drain_target_s", (backlog / rate * 1.25 + 5.0).ceil()),
        ]),
    );
    plan.actions.push(Action {
        at_ms: 0,
        duration_ms: load_ms,
        kind: "rate_limit_storm".into(),
        target: "mock upstream".into(),
        params: json!({"rate": rate, "recipient_rate": rate / 8.0}),
    });
    plan
}

async fn run_outage(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    run_upstream_fault(ctx, plan, UpFault::Outage).await
}

async fn run_invalid(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    run_upstream_fault(ctx, plan, UpFault::Invalid).await
}

async fn run_stall(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    run_upstream_fault(ctx, plan, UpFault::Stall).await
}

async fn run_storm(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    run_upstream_fault(ctx, plan, UpFault::Storm).await
}

async fn run_upstream_fault(ctx: &Ctx, plan: &Plan, fault: UpFault) -> Result<Measured, Error> {
    let up = match fault {
        UpFault::Storm => keel_faults::MockUpstream::start(keel_faults::UpstreamConfig {
            global_rate: plan.num("upstream_rate"),
            global_burst: plan.num("upstream_burst"),
            recipient_rate: Some(plan.num("upstream_recipient_rate")),
            recipient_burst: 1.0,
            ..Default::default()
        })
        .await
        .map_err(|e| setup("mock upstream", e))?,
        _ => super::unlimited_upstream().await?,
    };
    // The relay's own limits well above the load (and, in the storm, far
    // above the upstream's): the scenario is about the fault, not the
    // relay's limits (tested elsewhere). Unanswered sends time out in 1 s;
    // attempts are not used up within a fault (a send given up on is DEAD,
    // never sent after: keel-relay's `a_dead_send_is_not_sent_later`).
    let mut config = String::new();
    if fault == UpFault::Stall {
        // The stalled reader is shed at 2 MiB behind.
        config.push_str("max_outbound_bytes = 2097152\n");
    }
    config.push_str("[sending]\nglobal_rate = 1000\nper_recipient_rate = 1000\nper_recipient_burst = 1000\nbackoff_base_ms = 100\nbackoff_cap_ms = 1000\nanswer_timeout_ms = 1000\nmax_attempts = 100\n");
    let mut relay = ctx
        .relay(RelayOptions {
            upstream: Some(up.url()),
            config,
            ..Default::default()
        })
        .await?;
    let r = &ctx.recorder;
    let senders = plan.count("senders");
    let interval = Duration::from_secs_f64(1.0 / plan.num("sends_per_second_each").max(0.1));
    let recipients = plan.count("recipients").max(1);
    let load = Duration::from_millis(plan.num("load_ms") as u64);
    let action = plan
        .actions
        .first()
        .ok_or_else(|| setup("plan", "no fault"))?
        .clone();

    ctx.phase("sending");
    let started = tokio::time::Instant::now();
    let during_fault = Arc::new(AtomicBool::new(fault == UpFault::Storm));
    let ops = Arc::new(OpCount::default());
    let mut tasks = Vec::new();
    for s in 0..senders as u32 {
        let (url, r, down, ops) = (relay.url(), r.clone(), during_fault.clone(), ops.clone());
        let mut rng = rand::rngs::StdRng::seed_from_u64(crate::scenario::sub_seed(
            plan.seed,
            &format!("{}/sender{s}", plan.scenario),
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
                let during = down.load(Ordering::Acquire);
                ops.issued.fetch_add(1, Ordering::Relaxed);
                let answer =
                    tokio::time::timeout(OP_DEADLINE, client.send(&id, &to, &json!({"n": n})))
                        .await;
                let outcome = match answer {
                    Ok(Ok(())) => {
                        ops.completed.fetch_add(1, Ordering::Relaxed);
                        acked.push((format!("session:{session}/{id}"), during));
                        Outcome::Ok { offset: 0 }
                    }
                    Ok(Err(e)) => {
                        ops.completed.fetch_add(1, Ordering::Relaxed);
                        errors += 1;
                        Outcome::Fail {
                            code: e.to_string(),
                        }
                    }
                    Err(_) => {
                        errors += 1;
                        Outcome::Info
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
    // The stalled reader and the busy publisher beside it.
    let stalled = match fault {
        UpFault::Stall => Some(stalled_reader(&relay.url(), load, ops.clone()).await?),
        _ => None,
    };

    let t_fault = r.now();
    // Drained: from the end of the fault (or of the storm's load).
    let mut back = tokio::time::Instant::now();
    if fault != UpFault::Storm {
        tokio::time::sleep(Duration::from_millis(action.at_ms)).await;
        ctx.phase(&action.kind);
        let t_fault = r.now();
        during_fault.store(true, Ordering::Release);
        let third = Duration::from_millis(action.duration_ms / 3);
        match fault {
            UpFault::Invalid => {
                for mode in [
                    UpstreamMode::Garbage,
                    UpstreamMode::WrongIds,
                    UpstreamMode::HalfFrames,
                ] {
                    up.set_mode(mode);
                    tokio::time::sleep(third).await;
                }
            }
            _ => {
                up.set_mode(if fault == UpFault::Outage {
                    UpstreamMode::Down
                } else {
                    UpstreamMode::Stall
                });
                tokio::time::sleep(Duration::from_millis(action.duration_ms)).await;
            }
        }
        up.set_mode(UpstreamMode::Normal);
        during_fault.store(false, Ordering::Release);
        back = tokio::time::Instant::now();
        r.fault(&action.kind, &action.target, t_fault, r.now());
        ctx.phase("upstream well again: draining");
    }

    let mut acked = Vec::new();
    let mut send_errors = 0;
    for t in tasks {
        let (a, e) = t.await.map_err(|e| setup("sender task", e))??;
        acked.extend(a);
        send_errors += e;
    }
    if fault == UpFault::Storm {
        during_fault.store(false, Ordering::Release);
        r.fault(&action.kind, &action.target, t_fault, r.now());
        back = tokio::time::Instant::now();
        ctx.phase("load over: draining the backlog");
    }
    let slow_consumers = match stalled {
        Some(task) => {
            task.await.map_err(|e| setup("stalled reader", e))??;
            relay.metric("keel_slow_consumers_total").await?
        }
        None => 0.0,
    };
    let wanted: HashSet<String> = acked.iter().map(|(id, _)| id.clone()).collect();
    let drained = wait_until(Duration::from_secs(240), Duration::from_millis(20), || {
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
    let epoch = tokio::time::Instant::from_std(r.epoch());
    let mut per_second: BTreeMap<u64, f64> = BTreeMap::new();
    for a in &accepted {
        *per_second
            .entry(a.at.duration_since(epoch).as_secs())
            .or_default() += 1.0;
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
    let fault_s = action.duration_ms as f64 / 1000.0;
    m.note(format!(
        "{} sends acknowledged ({during} during the fault of {fault_s:.0} s); {} of them lost, {twice} accepted twice; drained {:.2} s after the fault; {} re-sent and recognised as duplicates by the upstream",
        acked.len(),
        lost,
        drain.as_secs_f64(),
        up.duplicates().len()
    ));
    match fault {
        UpFault::Outage => {}
        UpFault::Invalid => {
            let bad = relay.metric("keel_upstream_garbage_total").await?
                + relay.metric("keel_upstream_unknown_answers_total").await?;
            m.set("bad_answers_counted", bad);
            // Stopped first: doctor refuses a data directory in use.
            relay.terminate().await?;
            let report = keel_relay::doctor::run(&relay.data_dir())
                .await
                .map_err(|e| setup("keel-relay doctor", e))?
                .text;
            let line = report
                .lines()
                .find(|l| l.starts_with("outbox:"))
                .unwrap_or("no outbox line")
                .to_owned();
            let agrees =
                line == format!("outbox: pending 0, claimed 0, sent {}, dead 0", acked.len());
            m.set("doctor_agrees", if agrees { 1.0 } else { 0.0 });
            m.note(format!(
                "{bad} bad upstream frames counted (garbage and answers to no send); doctor: {line}"
            ));
        }
        UpFault::Stall => {
            let (issued, completed) = (
                ops.issued.load(Ordering::Relaxed),
                ops.completed.load(Ordering::Relaxed),
            );
            m.set(
                "ops_completed_ratio",
                completed as f64 / issued.max(1) as f64,
            )
            .set("slow_consumers", slow_consumers);
            m.note(format!(
                "{completed} of {issued} client operations (sends and the busy channel's publishes) completed within {} s; the stalled reader shed {slow_consumers} times as a slow consumer",
                OP_DEADLINE.as_secs()
            ));
        }
        UpFault::Storm => {
            let early = up.early_sends();
            let rate = plan.num("upstream_rate");
            let mut at: Vec<f64> = accepted
                .iter()
                .map(|a| a.at.duration_since(epoch).as_secs_f64())
                .collect();
            at.sort_by(f64::total_cmp);
            // From the first acceptance to the last, a backlog was waiting
            // (the load offers twice the rate): how much of the upstream's
            // capacity was used.
            let span = at.last().copied().unwrap_or(0.0) - at.first().copied().unwrap_or(0.0);
            let capacity = rate * span + plan.num("upstream_burst");
            m.set("early_sends", early.len() as f64)
                .set("rate_limited", up.rate_limited() as f64)
                .set(
                    "upstream_utilisation",
                    accepted.len() as f64 / capacity.max(1.0),
                );
            m.note(format!(
                "{} 429s given, {} sends before a known retry_after; {} accepted in {span:.1} s at a limit of {rate}/s: {:.0}% of the capacity used",
                up.rate_limited(),
                early.len(),
                accepted.len(),
                100.0 * accepted.len() as f64 / capacity.max(1.0)
            ));
        }
    }
    Ok(m)
}

/// How long a client operation may take before it counts as hung.
const OP_DEADLINE: Duration = Duration::from_secs(10);

/// Client operations issued, and completed within [`OP_DEADLINE`].
#[derive(Default)]
struct OpCount {
    issued: AtomicU64,
    completed: AtomicU64,
}

/// A raw client that subscribes to a channel and never reads again, and an
/// SDK client publishing 16 KiB messages to it every 2 ms for `load` (more
/// than the kernel's socket buffers hold within a second); the
/// publishes count as client operations.
async fn stalled_reader(
    url: &str,
    load: Duration,
    ops: Arc<OpCount>,
) -> Result<tokio::task::JoinHandle<Result<(), Error>>, Error> {
    let channel = "timeouts:busy";
    let (mut ws, _) = crate::client::open_session(url, None).await?;
    ws.send(crate::client::text(
        &json!({"type": "subscribe", "channel": channel, "from": 1}),
    ))
    .await
    .map_err(|e| setup("stalled reader subscribe", e))?;
    let publisher = Client::connect(ClientConfig::new(url))
        .await
        .map_err(|e| setup("busy publisher", e))?;
    let payload = "x".repeat(16 * 1024);
    Ok(tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let mut n = 0u64;
        while started.elapsed() < load {
            n += 1;
            ops.issued.fetch_add(1, Ordering::Relaxed);
            let done = tokio::time::timeout(
                OP_DEADLINE,
                publisher.publish(channel, &format!("busy-{n}"), &json!({"pad": payload})),
            )
            .await;
            if matches!(done, Ok(Ok(_))) {
                ops.completed.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        publisher.close().await;
        // Held, unread, until the load is over.
        drop(ws);
        Ok(())
    }))
}
