//! Seed 000's session tests against the relay: many sessions at once, each
//! isolated from the others, and concurrent state updates.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use rand::Rng;
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};

use super::{body, open_many, params, wait_until};
use crate::Error;
use crate::client::{self, Publisher, Reader, next_text, parse};
use crate::fixture::RelayOptions;
use crate::history::{After, Micros, Op, Outcome, Recorder, StateCheck};
use crate::scenario::{Action, Ctx, Measured, Plan, PlanInput, Scenario, SeedRef, Suite};
use crate::threshold::{Bound, Threshold};

const CONCURRENT: &str = "concurrent_sessions";

pub(crate) const CONCURRENT_SESSIONS: Scenario = Scenario {
    name: CONCURRENT,
    suite: Suite::Load,
    seed: SeedRef {
        seed: "000",
        test: "test_100_concurrent_sessions",
        threshold: "100 sessions created in parallel, no race; a command to a random session reaches only it",
    },
    what: "sessions opened in parallel; commands pushed by the upstream to random sessions must reach only them",
    target: "10,000 sessions, 0 errors, 0 cross-talk",
    needs_process: Some("points the relay at its own mock upstream, which pushes the commands"),
    thresholds: |plan| {
        let n = plan.num("sessions");
        vec![
            Threshold::new(
                "sessions_ok",
                "",
                Some(Bound::Ge(n.min(100.0))),
                Bound::Ge(n),
            ),
            Threshold::zero("errors"),
            Threshold::zero("cross_talk"),
            Threshold::all("commands_delivered_ratio"),
            Threshold::new("create_seconds", "s", Some(Bound::Le(30.0)), Bound::Le(5.0)),
        ]
    },
    plan: plan_concurrent,
    run: body!(run_concurrent),
    budget: Duration::from_secs(120),
};

fn plan_concurrent(input: &PlanInput) -> Plan {
    let n = input.scale.pick(50, 10_000);
    let commands = input.scale.pick(5, 20);
    let mut plan = input.plan(
        CONCURRENT,
        &params(&[
            ("sessions", n as f64),
            ("handshakes_in_flight", 500.0),
            ("commands", commands as f64),
        ]),
    );
    let mut rng = input.rng(CONCURRENT, "commands");
    for k in 0..commands {
        plan.actions.push(Action {
            at_ms: k as u64 * 50,
            duration_ms: 0,
            kind: "command".into(),
            target: format!("session#{}", rng.random_range(0..n)),
            params: json!({"n": k}),
        });
    }
    plan
}

async fn run_concurrent(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let up = super::unlimited_upstream().await?;
    let relay = ctx
        .relay(RelayOptions {
            upstream: Some(up.url()),
            ..Default::default()
        })
        .await?;
    let n = plan.count("sessions");
    ctx.phase("opening sessions");
    let (open, failed, took) = open_many(&relay.url(), n, plan.count("handshakes_in_flight")).await;
    let r = &ctx.recorder;
    for (i, e) in &failed {
        r.op(Op {
            client: *i as u32,
            kind: "hello".into(),
            invoke: 0,
            done: r.now(),
            outcome: Outcome::Fail { code: e.clone() },
            detail: String::new(),
        });
    }
    // Each session reads its private channel; upstream messages are reported.
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, i64, Micros)>();
    let mut ids: HashMap<usize, String> = HashMap::new();
    let mut readers = Vec::with_capacity(open.len());
    for (i, ws, welcome) in open {
        ids.insert(i, welcome.session_id.clone());
        let (tx, recorder) = (tx.clone(), r.clone());
        readers.push(tokio::spawn(async move {
            let (_sink, mut stream) = ws.split();
            while let Ok(Some(t)) = next_text(&mut stream).await {
                let Ok(f) = parse(&t) else { continue };
                if f.kind == "deliver"
                    && let Some(p) = f.payload
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(p.get())
                    && v["type"] == "upstream_message"
                {
                    let _ = tx.send((i, v["body"]["n"].as_i64().unwrap_or(-1), recorder.now()));
                }
            }
        }));
    }
    drop(tx);
    ctx.phase("waiting for the relay's upstream link");
    if !wait_until(
        Duration::from_secs(15),
        Duration::from_millis(20),
        || async { up.connections() > 0 },
    )
    .await
    {
        return Err(Error::Relay(
            "the relay never connected to the mock upstream".into(),
        ));
    }
    ctx.phase("pushing commands");
    let mut pushed: BTreeMap<i64, (usize, Micros)> = BTreeMap::new();
    for a in &plan.actions {
        let idx: usize = a.target.trim_start_matches("session#").parse().unwrap_or(0);
        let k = a.params["n"].as_i64().unwrap_or(0);
        let Some(sid) = ids.get(&idx) else {
            continue; // the session failed to open: counted as an error already
        };
        let t = r.now();
        // The relay's link may still be settling: push until someone hears it.
        up.push("harness", sid, json!({"n": k}));
        pushed.insert(k, (idx, t));
        r.op(Op {
            client: idx as u32,
            kind: "command".into(),
            invoke: t,
            done: t,
            outcome: Outcome::Ok { offset: 0 },
            detail: format!("n={k} to {sid}"),
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut received: BTreeMap<i64, Vec<(usize, Micros)>> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let all = pushed
            .keys()
            .all(|k| received.get(k).is_some_and(|v| !v.is_empty()));
        // Once everything arrived, keep listening a little for strays.
        let until = if all {
            deadline.min(tokio::time::Instant::now() + Duration::from_millis(300))
        } else {
            deadline
        };
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some((i, k, t))) => received.entry(k).or_default().push((i, t)),
            _ => break,
        }
    }
    let mut delivered = 0;
    let mut cross_talk = 0;
    let mut latency = crate::load::Latency::default();
    for (k, (target, sent)) in &pushed {
        for (who, t) in received.get(k).into_iter().flatten() {
            if who == target {
                delivered += 1;
                latency.record(Duration::from_micros(*sent), t.saturating_sub(*sent));
            } else {
                cross_talk += 1;
            }
        }
    }
    for h in readers {
        h.abort();
    }
    let mut m = Measured::default();
    m.set("sessions_ok", (n - failed.len()) as f64)
        .set("errors", failed.len() as f64)
        .set("create_seconds", took.as_secs_f64())
        .set("cross_talk", cross_talk as f64)
        .set(
            "commands_delivered_ratio",
            if pushed.is_empty() {
                0.0
            } else {
                delivered as f64 / pushed.len() as f64
            },
        )
        .set("command_p99_ms", latency.ms(0.99));
    if let Some((_, e)) = failed.first() {
        m.note(format!("first failure: {e}"));
    }
    m.note(format!(
        "{} sessions opened in {:.2} s ({:.0}/s)",
        n - failed.len(),
        took.as_secs_f64(),
        (n - failed.len()) as f64 / took.as_secs_f64()
    ));
    m.latency = Some(latency);
    Ok(m)
}

// ------------------------------------------------------------- isolation

const ISOLATION: &str = "session_isolation";

pub(crate) const SESSION_ISOLATION: Scenario = Scenario {
    name: ISOLATION,
    suite: Suite::Load,
    seed: SeedRef {
        seed: "000",
        test: "test_session_isolation_under_load",
        threshold: "10 sessions, different commands in parallel, each keeps independent state",
    },
    what: "sessions in parallel each publish their own mix, read their own channel, ack a seeded offset and resume from it: no cross-talk, each cursor its own",
    target: "1,000 sessions isolated, 0 cross-talk, every resumed cursor exact",
    needs_process: None,
    thresholds: |plan| {
        let n = plan.num("sessions");
        vec![
            Threshold::new(
                "isolated_sessions",
                "",
                Some(Bound::Ge(n.min(10.0))),
                Bound::Ge(n),
            ),
            Threshold::zero("cross_talk"),
            Threshold::zero("cursor_errors"),
        ]
    },
    plan: plan_isolation,
    run: body!(run_isolation),
    budget: Duration::from_secs(120),
};

fn plan_isolation(input: &PlanInput) -> Plan {
    let n = input.scale.pick(20, 1_000);
    let mut plan = input.plan(
        ISOLATION,
        &params(&[("sessions", n as f64), ("in_flight", 100.0)]),
    );
    let mut rng = input.rng(ISOLATION, "mix");
    for i in 0..n {
        let messages: u64 = rng.random_range(1..=20);
        let ack: u64 = rng.random_range(0..=messages);
        plan.actions.push(Action {
            at_ms: 0,
            duration_ms: 0,
            kind: "session".into(),
            target: format!("iso:{i}"),
            params: json!({"messages": messages, "ack": ack}),
        });
    }
    plan
}

async fn run_isolation(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let (url, _relay) = ctx.endpoint(RelayOptions::default()).await?;
    let n = plan.count("sessions");
    let permits = Arc::new(Semaphore::new(plan.count("in_flight").max(1)));
    ctx.phase("sessions publishing, reading, acking and resuming");
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for (i, a) in plan.actions.iter().enumerate() {
        let (url, permits, recorder) = (url.clone(), permits.clone(), ctx.recorder.clone());
        let channel = a.target.clone();
        let messages = a.params["messages"].as_u64().unwrap_or(1) as usize;
        let ack = a.params["ack"].as_u64().unwrap_or(0);
        // Channels are per run: a --target relay may hold old ones, of an
        // earlier run with the same seed too.
        let channel = ctx.unique(&format!("{channel}-{}", plan.seed));
        let direct = ctx.direct();
        tasks.push(tokio::spawn(async move {
            let _p = permits.acquire_owned().await;
            isolated_session(
                &url, direct, i as u32, n as u32, &channel, messages, ack, &recorder,
            )
            .await
        }));
    }
    let (mut ok, mut cross_talk, mut cursor_errors, mut first_error) = (0, 0, 0, None);
    for t in tasks {
        match t.await {
            Ok(Ok((x, c))) => {
                cross_talk += x;
                cursor_errors += c;
                if x == 0 && c == 0 {
                    ok += 1;
                }
            }
            Ok(Err(e)) => {
                first_error.get_or_insert(e.to_string());
            }
            Err(e) => {
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let mut m = Measured::default();
    m.set("isolated_sessions", ok as f64)
        .set("cross_talk", cross_talk as f64)
        .set("cursor_errors", cursor_errors as f64)
        .set("seconds", started.elapsed().as_secs_f64());
    if let Some(e) = first_error {
        m.note(format!("first failure: {e}"));
    }
    Ok(m)
}

/// One session's life: returns (cross-talk deliveries, cursor errors).
#[allow(clippy::too_many_arguments)]
async fn isolated_session(
    url: &str,
    direct: bool,
    i: u32,
    n: u32,
    channel: &str,
    messages: usize,
    ack: u64,
    recorder: &Recorder,
) -> Result<(u64, u64), Error> {
    let publisher = Publisher::open(url, i, client::source_ip(i as usize), recorder).await?;
    let (ws, welcome) = client::open_session(url, client::source_ip(i as usize)).await?;
    let cid = recorder.channel(channel);
    let mut reader = Reader::new(i, 1, ws, recorder);
    reader.expect(channel, 1);
    reader
        .send(json!({"type": "subscribe", "channel": channel, "from": 1}))
        .await?;
    let payloads: Vec<String> = (0..messages)
        .map(|k| format!(r#"{{"session":{i},"k":{k}}}"#))
        .collect();
    let sends = payloads
        .iter()
        .map(|p| publisher.publish(cid, channel, p, None));
    futures::future::join_all(sends).await;
    let (got, _) = reader.deliveries(messages, Duration::from_secs(20)).await?;
    let mut cross_talk = got.iter().filter(|(c, _)| c != channel).count() as u64;
    let mut cursor_errors = 0;
    if ack > 0 {
        reader
            .send(json!({"type": "ack", "channel": channel, "offset": ack}))
            .await?;
    }
    // A ping answered means the ack was handled; then leave.
    reader.send(json!({"type": "ping"})).await?;
    reader.until_pong().await?;
    let (closed, answered) = reader.close(Duration::from_secs(2)).await;
    // The relay detaches the session when it sees the close; a resume that
    // came first would find it still ACTIVE. Wait for the close's effect
    // (through an intermediary the checker allows for it not having come).
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Resume with the token and no offsets: delivery restarts after the ack.
    let mut ws = client::connect(url, client::source_ip(i as usize)).await?;
    let w = client::hello(&mut ws, welcome.token.as_deref(), &BTreeMap::new()).await?;
    recorder.state(StateCheck {
        client: i,
        session: w.session_id.clone(),
        expected: "DETACHED".into(),
        observed: w.state.clone(),
        at: recorder.now(),
        after: After::ClientClose {
            at: closed,
            seen: answered && direct,
        },
    });
    let mut resumed = Reader::new(n + i, 1, ws, recorder);
    resumed.expect(channel, ack + 1);
    let rest = messages - ack as usize;
    let (again, _) = resumed.deliveries(rest, Duration::from_secs(20)).await?;
    cross_talk += again.iter().filter(|(c, _)| c != channel).count() as u64;
    let mut offsets: Vec<u64> = again
        .iter()
        .filter(|(c, _)| c == channel)
        .map(|(_, o)| *o)
        .collect();
    // Which offsets came back is the cursor's business (one at or below
    // the ack is a cursor error); in what order, or how often, is the
    // checker's.
    offsets.sort_unstable();
    offsets.dedup();
    let want: Vec<u64> = (ack + 1..=messages as u64).collect();
    if offsets != want {
        cursor_errors += 1;
    }
    // Nothing more may come (a repeat of one that came is the checker's).
    let (extra, _) = resumed.deliveries(1, Duration::from_millis(100)).await?;
    for (c, o) in extra {
        if c != channel {
            cross_talk += 1;
        } else if !offsets.contains(&o) {
            cursor_errors += 1;
        }
    }
    resumed.close(Duration::from_secs(2)).await;
    Ok((cross_talk, cursor_errors))
}

// ------------------------------------------------------------ contention

const CONTENTION: &str = "database_contention";

pub(crate) const DATABASE_CONTENTION: Scenario = Scenario {
    name: CONTENTION,
    suite: Suite::Load,
    seed: SeedRef {
        seed: "000",
        test: "test_database_contention",
        threshold: "50 concurrent session state updates, no SQLite locking errors, all committed",
    },
    what: "sessions at once each subscribe, ack three times and detach (five state updates each, all through the relay), then resume: every stored state and cursor must be the last one written",
    target: "5,000 concurrent updates, 0 errors, every final state exact",
    needs_process: None,
    thresholds: |plan| {
        let total = plan.num("sessions") * 5.0;
        vec![
            Threshold::new(
                "updates_ok",
                "",
                Some(Bound::Ge(total.min(50.0))),
                Bound::Ge(total),
            ),
            Threshold::zero("errors"),
            Threshold::zero("wrong_final_state"),
        ]
    },
    plan: plan_contention,
    run: body!(run_contention),
    budget: Duration::from_secs(120),
};

fn plan_contention(input: &PlanInput) -> Plan {
    let n = input.scale.pick(50, 1_000);
    let mut plan = input.plan(
        CONTENTION,
        &params(&[("sessions", n as f64), ("messages", 10.0)]),
    );
    let mut rng = input.rng(CONTENTION, "acks");
    for i in 0..n {
        plan.actions.push(Action {
            at_ms: 0,
            duration_ms: 0,
            kind: "updates".into(),
            target: format!("session#{i}"),
            params: json!({"acks": [3, 6, rng.random_range(7..=10)]}),
        });
    }
    plan
}

async fn run_contention(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let (url, _relay) = ctx.endpoint(RelayOptions::default()).await?;
    let direct = ctx.direct();
    let channel = ctx.unique(&format!("contention-{}", plan.seed));
    let messages = plan.count("messages");
    let r = &ctx.recorder;
    let cid = r.channel(&channel);
    ctx.phase("writing the channel");
    let publisher = Publisher::open(&url, u32::MAX >> 9, None, r).await?;
    for _ in 0..messages {
        publisher.publish(cid, &channel, "{}", None).await;
    }
    ctx.phase("concurrent state updates");
    let n = plan.count("sessions");
    let (open, failed, _) = open_many(&url, n, 500).await;
    let errors = Arc::new(AtomicU64::new(failed.len() as u64 * 5));
    let updates_ok = Arc::new(AtomicU64::new(0));
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for (i, ws, welcome) in open {
        let acks: Vec<u64> = plan.actions[i].params["acks"]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
            .unwrap_or_default();
        let (channel, errors, updates_ok) = (channel.clone(), errors.clone(), updates_ok.clone());
        let mut reader = Reader::new(i as u32, 1, ws, r);
        reader.expect(&channel, 1);
        tasks.push(tokio::spawn(async move {
            let closed = match contend(reader, &channel, messages, &acks).await {
                Ok(closed) => {
                    updates_ok.fetch_add(5, Ordering::Relaxed);
                    Some(closed)
                }
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    None
                }
            };
            (i, welcome, acks.last().copied().unwrap_or(0), closed)
        }));
    }
    let mut finals = Vec::new();
    for t in tasks {
        if let Ok(x) = t.await {
            finals.push(x);
        }
    }
    let update_seconds = started.elapsed().as_secs_f64();
    // Every session detached; its stored cursor is its last ack.
    tokio::time::sleep(Duration::from_millis(300)).await;
    ctx.phase("checking every final state");
    let wrong = Arc::new(AtomicU64::new(0));
    let permits = Arc::new(Semaphore::new(200));
    let mut checks = Vec::new();
    for (i, welcome, last_ack, closed) in finals {
        let (url, wrong, permits, recorder) =
            (url.clone(), wrong.clone(), permits.clone(), r.clone());
        // The resumed session reads as a subscriber of its own.
        let (sub, channel) = ((n + i) as u32, channel.clone());
        checks.push(tokio::spawn(async move {
            let _p = permits.acquire_owned().await;
            let ok = async {
                let mut ws = client::connect(&url, client::source_ip(i)).await?;
                let w = client::hello(&mut ws, welcome.token.as_deref(), &BTreeMap::new()).await?;
                let (at, answered) = closed.unwrap_or((0, false));
                recorder.state(StateCheck {
                    client: i as u32,
                    session: w.session_id,
                    expected: "DETACHED".into(),
                    observed: w.state,
                    at: recorder.now(),
                    after: After::ClientClose {
                        at,
                        seen: answered && direct,
                    },
                });
                let mut reader = Reader::new(sub, 1, ws, &recorder);
                reader.expect(&channel, last_ack + 1);
                let rest = messages - last_ack as usize;
                let (mut got, _) = reader.deliveries(rest, Duration::from_secs(10)).await?;
                // Nothing past the last message may come.
                got.extend(reader.deliveries(1, Duration::from_millis(200)).await?.0);
                reader.close(Duration::from_secs(2)).await;
                let mut got: Vec<u64> = got
                    .into_iter()
                    .filter(|(c, _)| *c == channel)
                    .map(|(_, o)| o)
                    .collect();
                got.sort_unstable();
                got.dedup();
                Ok::<bool, Error>(got == (last_ack + 1..=messages as u64).collect::<Vec<_>>())
            }
            .await;
            if !matches!(ok, Ok(true)) {
                wrong.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for c in checks {
        let _ = c.await;
    }
    let mut m = Measured::default();
    m.set("updates_ok", updates_ok.load(Ordering::Relaxed) as f64)
        .set("errors", errors.load(Ordering::Relaxed) as f64)
        .set("wrong_final_state", wrong.load(Ordering::Relaxed) as f64)
        .set("update_seconds", update_seconds);
    if let Some((_, e)) = failed.first() {
        m.note(format!("first failure: {e}"));
    }
    Ok(m)
}

/// Five updates through one connection: subscribe, three acks, detach.
/// The channel's messages are read first (for up to 10 s: one that never
/// comes is the checker's `lost`, and the updates go on); an error frame
/// fails it. Returns when the close was sent and whether it was answered.
async fn contend(
    mut reader: Reader,
    channel: &str,
    messages: usize,
    acks: &[u64],
) -> Result<(Micros, bool), Error> {
    reader
        .send(json!({"type": "subscribe", "channel": channel, "from": 1}))
        .await?;
    reader.deliveries(messages, Duration::from_secs(10)).await?;
    for a in acks {
        reader
            .send(json!({"type": "ack", "channel": channel, "offset": a}))
            .await?;
    }
    reader.send(json!({"type": "ping"})).await?;
    reader.until_pong().await?;
    Ok(reader.close(Duration::from_secs(2)).await)
}
