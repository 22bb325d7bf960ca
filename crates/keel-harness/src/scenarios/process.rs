//! Process faults against the relay: `daemon_crash_recovery` SIGKILLs it at
//! seeded moments under publish and subscribe load, checks the database
//! after every kill, restarts it on the same data and address, and repeats.

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
use crate::history::{Delivery, Expectation, MsgId, Op, Outcome, Publish, Recorder, StateCheck};
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
    needs_process: true,
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
struct Shared {
    /// Publishers stop (the heal phase begins).
    stop: AtomicBool,
    /// Subscribers stop (the heal phase is over: caught up, or out of time).
    done: AtomicBool,
    /// Kills so far: a welcome after the first kill must say CRASHED.
    kills: AtomicU32,
    publish_errors: AtomicU64,
    acked: AtomicU64,
    /// Highest acknowledged offset per channel.
    heads: std::sync::Mutex<BTreeMap<String, u64>>,
}

fn sdk_config(url: &str) -> ClientConfig {
    let mut config = ClientConfig::new(url);
    config.reconnect.backoff.base = Duration::from_millis(20);
    config.reconnect.backoff.cap = Duration::from_millis(500);
    config.connect_timeout = Duration::from_secs(30);
    config
}

/// Records a welcome's state: the first is a new session, later ones (the
/// relay was killed while the session was connected, or before it could
/// reconnect) CRASHED.
fn check_welcome(r: &Recorder, shared: &Shared, client: u32, session: &str, state: &str, n: u32) {
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
    });
}

/// A subscriber through the SDK (which resumes after each kill from the
/// last offsets it saw); every delivery and welcome is recorded.
async fn subscriber(
    url: String,
    sub: u32,
    channels: Vec<String>,
    r: Recorder,
    shared: Arc<Shared>,
    progress: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    ready: tokio::sync::mpsc::UnboundedSender<u32>,
) -> Result<u64, Error> {
    let mut client = Client::connect(sdk_config(&url))
        .await
        .map_err(|e| setup("subscriber connect", e))?;
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
                ..
            })) => {
                batch.push(Delivery {
                    sub,
                    conn: conns.max(1),
                    channel: r.channel(&channel),
                    offset,
                    id: r.id(&id),
                    at: r.now(),
                });
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
    Ok(client.duplicates_dropped())
}

/// A publisher through the SDK: one publish at a time, re-sent across kills
/// with the same id in the same session until it is acknowledged.
async fn publisher(
    url: String,
    client_no: u32,
    channels: Vec<String>,
    interval: Duration,
    r: Recorder,
    shared: Arc<Shared>,
) -> Result<(), Error> {
    let mut client = Client::connect(sdk_config(&url))
        .await
        .map_err(|e| setup("publisher connect", e))?;
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
        let wire = format!("h{client_no}-{seq}");
        let invoke = r.now();
        let conn = conns.max(1);
        let answer = tokio::time::timeout(
            Duration::from_secs(60),
            client.publish(channel, &wire, &json!({"seq": seq})),
        )
        .await;
        let outcome = match answer {
            Ok(Ok(offset)) => {
                shared.acked.fetch_add(1, Ordering::Relaxed);
                let mut heads = shared.heads.lock().unwrap_or_else(|p| p.into_inner());
                let head = heads.entry(channel.clone()).or_default();
                *head = (*head).max(offset);
                Outcome::Ok { offset }
            }
            Ok(Err(e)) => {
                shared.publish_errors.fetch_add(1, Ordering::Relaxed);
                Outcome::Fail {
                    code: e.to_string(),
                }
            }
            Err(_) => {
                shared.publish_errors.fetch_add(1, Ordering::Relaxed);
                Outcome::Info
            }
        };
        r.publish(Publish {
            client: client_no,
            conn,
            channel: r.channel(channel),
            id: MsgId::harness(client_no, seq),
            invoke,
            done: r.now(),
            outcome,
        });
        tokio::time::sleep(interval).await;
    }
    Ok(())
}

async fn run_crash(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let mut relay = ctx.relay(RelayOptions::default()).await?;
    let url = relay.url();
    let r = &ctx.recorder;
    let shared = Arc::new(Shared::default());
    let channels: Vec<String> = (0..plan.count("channels"))
        .map(|c| format!("crash:{c}"))
        .collect();

    // A session that is not connected at any kill: it must stay DETACHED.
    ctx.phase("opening sessions");
    let idle = Client::connect(sdk_config(&url))
        .await
        .map_err(|e| setup("idle session", e))?;
    let idle_token = idle.token().unwrap_or_default();
    let idle_id = idle.session_id().unwrap_or_default();
    idle.close().await;

    let progress: Arc<std::sync::Mutex<BTreeMap<String, u64>>> = Arc::default();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
    let mut subs = Vec::new();
    for s in 0..plan.count("subscribers") as u32 {
        subs.push(tokio::spawn(subscriber(
            url.clone(),
            s,
            channels.clone(),
            r.clone(),
            shared.clone(),
            progress.clone(),
            ready_tx.clone(),
        )));
    }
    // Subscribed before anything is published (each must see offset 1
    // on): the subscribers signal once their subscriptions are stored.
    let mut ready = Vec::new();
    for _ in 0..plan.count("subscribers") {
        ready.push(
            ready_rx
                .recv()
                .await
                .ok_or_else(|| setup("subscriber", "ended early"))?,
        );
    }
    let interval = Duration::from_millis(plan.num("publish_interval_ms") as u64);
    let mut pubs = Vec::new();
    for p in 0..plan.count("publishers") as u32 {
        pubs.push(tokio::spawn(publisher(
            url.clone(),
            p,
            channels.clone(),
            interval,
            r.clone(),
            shared.clone(),
        )));
    }

    let mut mttr = crate::load::Latency::default();
    let mut mttrs = Vec::new();
    let mut integrity_failures = 0u64;
    let mut kills = 0u32;
    let db = relay.data_dir().join("keel.db");
    let mut previous = 0;
    for a in &plan.actions {
        let up = a.at_ms - previous;
        previous = a.at_ms;
        ctx.phase(&format!(
            "kill {} of {}",
            kills + 1,
            plan.count("iterations")
        ));
        tokio::time::sleep(Duration::from_millis(up)).await;
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
        r.fault("kill9", "relay", t_kill, r.now());
    }

    // Heal: stop publishing, then every subscriber must catch up to every
    // acknowledged head within the deadline.
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

    // The session that was never connected at a kill is DETACHED.
    let mut config = sdk_config(&relay.url());
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
    });
    resumed.close().await;

    mttrs.sort();
    let pick = |q: f64| {
        mttrs
            .get(((mttrs.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let mut m = Measured::default();
    m.set("kills", f64::from(kills))
        .set("integrity_failures", integrity_failures as f64)
        .set(
            "publish_errors",
            shared.publish_errors.load(Ordering::Relaxed) as f64,
        )
        .set("acked", shared.acked.load(Ordering::Relaxed) as f64)
        .set("redelivered", redelivered as f64)
        .set("converged", if converged { 1.0 } else { 0.0 })
        .set("mttr_p50_ms", pick(0.5))
        .set("mttr_p95_ms", pick(0.95))
        .set("mttr_max_ms", pick(1.0));
    m.note(format!(
        "{kills} kills; time to recover (kill to listening, recovery done) p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms; {} publishes acknowledged",
        pick(0.5),
        pick(0.95),
        pick(1.0),
        shared.acked.load(Ordering::Relaxed)
    ));
    m.latency = Some(mttr);
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
