//! The cluster suite (`cargo xtask chaos --cluster`, docs/cluster.md): three relay
//! nodes on one PostgreSQL database and NATS, under publish/subscribe load
//! from SDK clients spread over the nodes (each failing over to the others),
//! while a node is killed or PostgreSQL restarted. Every publish and
//! delivery goes to the checker: nothing acknowledged lost, nothing
//! delivered twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use serde_json::json;
use tokio_postgres::NoTls;

use keel_faults::{MockUpstream, UpstreamConfig};

use super::process::{Shared, heal, spawn_load};
use super::upstream::{Sender, send_key};
use super::{body, params, setup, wait_until};
use crate::Error;
use crate::cluster::{Cluster, ClusterOptions};
use crate::history::{Op, Outcome};
use crate::scenario::{Action, Ctx, Measured, Plan, PlanInput, Scenario, SeedRef, Suite};
use crate::threshold::{Bound, Threshold};

const NODE_KILL: &str = "node_kill";
const PG_RESTART: &str = "pg_restart";
const NATS_RESTART: &str = "nats_restart";
const NODE_PARTITION: &str = "node_partition";
const LEADER_KILL: &str = "leader_kill";
const CRASH_ALL: &str = "cluster_crash_recovery";
const MONKEY: &str = "cluster_chaos_monkey";
const HERD: &str = "cluster_thundering_herd";

/// The nodes of every cluster scenario.
const NODES: usize = 3;

pub(crate) const NODE_KILL_SCENARIO: Scenario = Scenario {
    name: NODE_KILL,
    suite: Suite::Cluster,
    seed: SeedRef {
        seed: "000/002",
        test: "test_daemon_crash_recovery; chaos MTTR (on a 3-node cluster)",
        threshold: "ACTIVE sessions CRASHED after a crash, state preserved; MTTR < 5 min",
    },
    what: "SIGKILL one of 3 nodes under publish/subscribe load (clients spread over the nodes, failing over), restart it; repeat (--iterations)",
    target: "0 acknowledged lost or duplicated; the dead node's connected sessions CRASHED exactly once (one notice each); failover p95 < 3 s",
    needs_process: Some("starts its own cluster of relay nodes on PostgreSQL and NATS"),
    thresholds: |plan| {
        vec![
            Threshold::exact("kills", plan.num("iterations")),
            Threshold::zero("publish_errors"),
            Threshold::zero("redelivered"),
            Threshold::all("converged"),
            Threshold::zero("crash_count_mismatches"),
            Threshold::zero("notices_not_matching_crashes"),
            Threshold::new("sessions_crashed", "", Some(Bound::Ge(1.0)), Bound::Ge(1.0)),
            Threshold::new(
                "failover_p95_ms",
                "ms",
                Some(Bound::Le(300_000.0)),
                Bound::Le(3_000.0),
            ),
        ]
    },
    plan: plan_node_kill,
    run: body!(run_node_kill),
    budget: Duration::from_secs(900),
};

pub(crate) const PG_RESTART_SCENARIO: Scenario = Scenario {
    name: PG_RESTART,
    suite: Suite::Cluster,
    seed: SeedRef {
        seed: "002",
        test: "database failure: service keeps its guarantees across a store outage",
        threshold: "no data loss; MTTR < 5 min",
    },
    what: "stop the cluster's PostgreSQL (its own instance) under load for the action's duration, start it again; repeat (--iterations)",
    target: "publishes refused with `unavailable` and retried, 0 acknowledged lost or duplicated, every node recovers without a restart; every publisher acknowledged again within 10 s (p95)",
    needs_process: Some("starts its own cluster of relay nodes on PostgreSQL and NATS"),
    thresholds: |plan| {
        vec![
            Threshold::exact("restarts", plan.num("iterations")),
            Threshold::zero("publish_errors"),
            Threshold::zero("redelivered"),
            Threshold::all("converged"),
            Threshold::exact("nodes_alive", NODES as f64),
            Threshold::zero("crash_count_mismatches"),
            Threshold::new("refused", "", Some(Bound::Ge(1.0)), Bound::Ge(1.0)),
            Threshold::new(
                "recovery_p95_ms",
                "ms",
                Some(Bound::Le(300_000.0)),
                Bound::Le(10_000.0),
            ),
        ]
    },
    plan: plan_pg_restart,
    run: body!(run_pg_restart),
    budget: Duration::from_secs(900),
};

pub(crate) const NATS_RESTART_SCENARIO: Scenario = Scenario {
    name: NATS_RESTART,
    suite: Suite::Cluster,
    seed: SeedRef {
        seed: "002",
        test: "message broker failure: delivery keeps its guarantees across a bus outage",
        threshold: "no data loss; MTTR < 5 min",
    },
    what: "kill the cluster's NATS server (its own) under load for the action's duration, start it again; repeat (--iterations)",
    target: "publishes go on; deliveries across nodes come from the store's catch-up meanwhile (delivery delay max < 3 s); 0 acknowledged lost or duplicated; every node's bus connected again without a restart",
    needs_process: Some("starts its own cluster of relay nodes on PostgreSQL and NATS"),
    thresholds: |plan| bus_outage_thresholds("restarts", plan),
    plan: plan_nats_restart,
    run: body!(run_nats_restart),
    budget: Duration::from_secs(900),
};

pub(crate) const NODE_PARTITION_SCENARIO: Scenario = Scenario {
    name: NODE_PARTITION,
    suite: Suite::Cluster,
    seed: SeedRef {
        seed: "002",
        test: "network partition: a node cut off from the message bus",
        threshold: "no data loss; MTTR < 5 min",
    },
    what: "blackhole one node's link to NATS (a fault proxy holds its traffic, new connections hang) under load for the action's duration; repeat (--iterations)",
    target: "the cut-off node's subscribers still get everything through the store's catch-up, and the others get its publishes (delivery delay max < 3 s); 0 acknowledged lost or duplicated; its bus connected again after the heal",
    needs_process: Some("starts its own cluster of relay nodes on PostgreSQL and NATS"),
    thresholds: |plan| bus_outage_thresholds("partitions", plan),
    plan: plan_node_partition,
    run: body!(run_node_partition),
    budget: Duration::from_secs(900),
};

pub(crate) const CLUSTER_CRASH_RECOVERY: Scenario = Scenario {
    name: CRASH_ALL,
    suite: Suite::Cluster,
    seed: SeedRef {
        seed: "000/002",
        test: "test_daemon_crash_recovery (every node of a 3-node cluster at once)",
        threshold: "ACTIVE sessions CRASHED after a crash, state preserved, no corruption; MTTR < 5 min",
    },
    what: "SIGKILL all 3 nodes at once under publish/subscribe load, check the database (every channel's offsets contiguous, its head where the offsets end), restart them; repeat (--iterations)",
    target: "0 acknowledged lost or duplicated, the database intact after every kill, every session held by a node CRASHED exactly once per kill (one notice each), every publisher acknowledged again within 5 s of the restart (p95)",
    needs_process: Some("starts its own cluster of relay nodes on PostgreSQL and NATS"),
    thresholds: |plan| {
        vec![
            Threshold::exact("kills", plan.num("iterations")),
            Threshold::zero("integrity_failures"),
            Threshold::zero("publish_errors"),
            Threshold::zero("redelivered"),
            Threshold::all("converged"),
            Threshold::zero("crash_count_mismatches"),
            Threshold::zero("notices_not_matching_crashes"),
            Threshold::new("sessions_crashed", "", Some(Bound::Ge(1.0)), Bound::Ge(1.0)),
            Threshold::new(
                "mttr_p95_ms",
                "ms",
                Some(Bound::Le(300_000.0)),
                Bound::Le(5_000.0),
            ),
        ]
    },
    plan: plan_crash_all,
    run: body!(run_crash_all),
    budget: Duration::from_secs(900),
};

pub(crate) const CLUSTER_CHAOS_MONKEY: Scenario = Scenario {
    name: MONKEY,
    suite: Suite::Cluster,
    seed: SeedRef {
        seed: "002",
        test: "chaos monkey: random faults, success rate and MTTR (on a 3-node cluster)",
        threshold: "95% of client operations succeed; MTTR < 5 min",
    },
    what: "for --duration (5 min; 20 s small), a seeded random sequence of node SIGKILLs, node SIGSTOPs (at most half the node lease), PostgreSQL stops, NATS kills and one node's NATS link blackholed, under publish/subscribe load on 3 nodes, each after a seeded stretch of calm",
    target: "every publish acknowledged in the end (the SDK re-sends what was refused), nothing lost or duplicated, the database intact, only killed nodes' sessions CRASHED (once per kill), every node serving at the end; every publisher acknowledged again within 10 s of each fault (p95), time to recover reported per fault kind",
    needs_process: Some("starts its own cluster of relay nodes on PostgreSQL and NATS"),
    thresholds: |plan| {
        vec![
            Threshold::exact("faults", plan.num("iterations")),
            Threshold::zero("publish_errors"),
            Threshold::zero("redelivered"),
            Threshold::all("converged"),
            Threshold::zero("integrity_failures"),
            Threshold::exact("nodes_alive", NODES as f64),
            Threshold::zero("crash_count_mismatches"),
            Threshold::zero("notices_not_matching_crashes"),
            Threshold::new(
                "recovery_p95_ms",
                "ms",
                Some(Bound::Le(300_000.0)),
                Bound::Le(10_000.0),
            ),
        ]
    },
    plan: plan_monkey,
    run: body!(run_monkey),
    budget: Duration::from_secs(1_200),
};

pub(crate) const CLUSTER_THUNDERING_HERD: Scenario = Scenario {
    name: HERD,
    suite: Suite::Cluster,
    seed: SeedRef {
        seed: "000/003",
        test: "test_thundering_herd_reconnect (on a 3-node cluster)",
        threshold: "500 of 1,000 clients reconnect within 5 s",
    },
    what: "9,000 subscribers (300 at small scale) spread over 3 nodes on 100 channels under publish load; one node is SIGKILLed and its third of them reconnect and resume on the other two at once",
    target: "everyone back within 5 s of the kill, every acknowledged message delivered once and in order, the survivors' counts exact, the dead node's sessions CRASHED exactly once",
    needs_process: Some("starts its own cluster of relay nodes on PostgreSQL and NATS"),
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
            Threshold::new("moved", "", Some(Bound::Ge(1.0)), Bound::Ge(1.0)),
            Threshold::zero("crash_count_mismatches"),
            Threshold::zero("notices_not_matching_crashes"),
        ]
    },
    plan: plan_herd,
    run: body!(run_herd),
    budget: Duration::from_secs(600),
};

pub(crate) const LEADER_KILL_SCENARIO: Scenario = Scenario {
    name: LEADER_KILL,
    suite: Suite::Cluster,
    seed: SeedRef {
        seed: "000/002",
        test: "test_daemon_crash_recovery: sends survive the sender's crash (on a 3-node cluster)",
        threshold: "every acknowledged send reaches the API; none lost",
    },
    what: "SIGKILL the node holding the upstream lock (the one sending to the mock messaging API) while sessions on every node queue sends; restart it; repeat (--iterations)",
    target: "another node takes the lock and sends on; every acknowledged send accepted by the upstream, none accepted twice (a send re-sent after the kill carries its idempotency key); takeover p95 < 10 s",
    needs_process: Some("starts its own cluster of relay nodes on PostgreSQL and NATS"),
    thresholds: |plan| {
        vec![
            Threshold::exact("kills", plan.num("iterations")),
            Threshold::new("sends_acked", "", Some(Bound::Ge(1.0)), Bound::Ge(1.0)),
            Threshold::zero("sends_lost"),
            Threshold::zero("sends_twice"),
            Threshold::zero("takeovers_missing"),
            Threshold::new("leaders_seen", "", Some(Bound::Ge(2.0)), Bound::Ge(2.0)),
            Threshold::new(
                "takeover_p95_ms",
                "ms",
                Some(Bound::Le(300_000.0)),
                Bound::Le(10_000.0),
            ),
        ]
    },
    plan: plan_leader_kill,
    run: body!(run_leader_kill),
    budget: Duration::from_secs(900),
};

fn plan_leader_kill(input: &PlanInput) -> Plan {
    let iterations = input
        .iterations
        .unwrap_or_else(|| input.scale.pick(1, 4))
        .max(1);
    let mut plan = input.plan(
        LEADER_KILL,
        &params(&[
            ("iterations", iterations as f64),
            ("senders", input.scale.pick(3, 12) as f64),
            ("send_interval_ms", 100.0),
        ]),
    );
    let mut rng = input.rng(LEADER_KILL, "kills");
    let mut at = 0;
    for k in 0..iterations {
        at += rng.random_range(
            input.scale.pick(500, 1_000) as u64..=input.scale.pick(1_000, 3_000) as u64,
        );
        plan.actions.push(Action {
            at_ms: at,
            duration_ms: 0,
            kind: "kill9".into(),
            target: "the upstream leader".into(),
            params: json!({"kill": k + 1}),
        });
    }
    plan
}

/// The node that says it holds the upstream lock, if one does.
async fn upstream_leader(cluster: &Cluster) -> Option<usize> {
    for (i, node) in cluster.nodes.iter().enumerate() {
        if node.metric("keel_upstream_leader").await.unwrap_or(0.0) >= 1.0 {
            return Some(i);
        }
    }
    None
}

async fn run_leader_kill(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let up = MockUpstream::start(UpstreamConfig {
        global_rate: 1_000.0,
        global_burst: 1_000.0,
        ..Default::default()
    })
    .await
    .map_err(|e| setup("mock upstream", e))?;
    ctx.phase("starting the cluster");
    let options = ClusterOptions {
        upstream: Some(up.url()),
        ..ClusterOptions::default()
    };
    let sending =
        "[sending]\nglobal_rate = 500\nper_recipient_rate = 1000\nper_recipient_burst = 1000\n";
    let mut cluster = ctx.cluster(NODES, options, sending).await?;
    let r = &ctx.recorder;

    ctx.phase("sending");
    // Senders on every node; one whose link fails (its node was killed)
    // opens a new session on the next node. A send without an answer is
    // not counted: only acknowledged sends must arrive.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let unanswered = Arc::new(AtomicU64::new(0));
    let interval = Duration::from_millis(plan.num("send_interval_ms") as u64);
    let mut senders = Vec::new();
    for s in 0..plan.count("senders") {
        let urls = cluster.urls_from(s % NODES);
        let (r, stop, acked, unanswered) =
            (r.clone(), stop.clone(), acked.clone(), unanswered.clone());
        senders.push(tokio::spawn(async move {
            let mut next = 0usize;
            let mut sender: Option<Sender> = None;
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                let Some(current) = &sender else {
                    match Sender::open(&urls[next % urls.len()], s as u32, &r).await {
                        Ok(opened) => sender = Some(opened),
                        Err(_) => {
                            next += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                    continue;
                };
                let id = format!("lk{s}-{i}");
                i += 1;
                if current.send(&id, &format!("r{}", i % 10), None).await {
                    acked.lock().unwrap_or_else(|p| p.into_inner()).push(id);
                } else {
                    unanswered.fetch_add(1, Ordering::Relaxed);
                    sender = None;
                    next += 1;
                }
                tokio::time::sleep(interval).await;
            }
        }));
    }

    let mut leaders_seen = std::collections::BTreeSet::new();
    let mut takeovers = Vec::new();
    // The chart: time to take over at each kill.
    let mut timeline = crate::load::Latency::default();
    let mut missing = 0u32;
    let mut kills = 0u32;
    let mut previous = 0;
    for a in &plan.actions {
        tokio::time::sleep(Duration::from_millis(a.at_ms - previous)).await;
        previous = a.at_ms;
        ctx.phase(&format!("kill {} of {}", kills + 1, plan.actions.len()));
        let mut old = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while old.is_none() && tokio::time::Instant::now() < deadline {
            old = upstream_leader(&cluster).await;
            if old.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let Some(old) = old else {
            missing += 1;
            continue;
        };
        leaders_seen.insert(old);
        let before = up.accepted().len();
        let t_fault = r.now();
        cluster.nodes[old].kill9().await?;
        kills += 1;
        r.fault(&a.kind, &format!("node-{old}"), t_fault, r.now());
        // Taken over: another node holds the lock and the upstream accepts
        // sends again.
        let started = tokio::time::Instant::now();
        let mut new = None;
        while new.is_none() && started.elapsed() < Duration::from_secs(30) {
            if let Some(n) = upstream_leader(&cluster).await
                && n != old
                && up.accepted().len() > before
            {
                new = Some(n);
            } else {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        match new {
            Some(n) => {
                leaders_seen.insert(n);
                takeovers.push(started.elapsed());
                timeline.record(
                    Duration::from_micros(t_fault),
                    started.elapsed().as_micros() as u64,
                );
            }
            None => missing += 1,
        }
        cluster.nodes[old].restart().await?;
    }

    ctx.phase("stopping the senders; the upstream drains");
    let t_stop = tokio::time::Instant::now();
    stop.store(true, Ordering::Release);
    for t in senders {
        t.await.map_err(|e| setup("sender task", e))?;
    }
    let stopped_in = t_stop.elapsed();
    let wanted: std::collections::HashSet<String> = acked
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .cloned()
        .collect();
    wait_until(Duration::from_secs(60), Duration::from_millis(50), || {
        let (up, wanted) = (&up, &wanted);
        async move {
            let got: std::collections::HashSet<String> = up
                .accepted()
                .iter()
                .map(|a| send_key(&a.id).to_owned())
                .collect();
            wanted.iter().all(|id| got.contains(id))
        }
    })
    .await;
    let drained_in = t_stop.elapsed() - stopped_in;
    // Anything still in flight settles.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut times: BTreeMap<String, u32> = BTreeMap::new();
    for a in up.accepted() {
        *times.entry(send_key(&a.id).to_owned()).or_default() += 1;
    }
    let lost = wanted.iter().filter(|id| !times.contains_key(*id)).count();
    let twice = times.values().filter(|n| **n > 1).count();
    takeovers.sort();
    let pick = |q: f64| super::quantile_ms(&takeovers, q);
    let mut m = Measured::default();
    m.set("kills", f64::from(kills))
        .set("sends_acked", wanted.len() as f64)
        .set("sends_lost", lost as f64)
        .set("sends_twice", twice as f64)
        .set(
            "sends_unanswered",
            unanswered.load(Ordering::Relaxed) as f64,
        )
        .set("resent_to_upstream", up.duplicates().len() as f64)
        .set("takeovers_missing", f64::from(missing))
        .set("leaders_seen", leaders_seen.len() as f64)
        .set("takeover_p50_ms", pick(0.5))
        .set("takeover_p95_ms", pick(0.95))
        .set("takeover_max_ms", pick(1.0));
    m.note(format!(
        "{} sends acknowledged, {lost} of them lost, {twice} accepted twice; {} re-sent after a kill and recognised by the upstream as duplicates (same idempotency key); {} without an answer (their node died); leaders: {:?}; senders stopped in {stopped_in:.1?}, the upstream had every acknowledged send {drained_in:.1?} later",
        wanted.len(),
        up.duplicates().len(),
        unanswered.load(Ordering::Relaxed),
        leaders_seen
    ));
    m.latency = Some(timeline);
    drop(cluster);
    Ok(m)
}

/// What a bus outage (NATS down, or one node cut off from it) must keep:
/// everything delivered, through the store's catch-up, soon.
fn bus_outage_thresholds(count: &'static str, plan: &Plan) -> Vec<Threshold> {
    vec![
        Threshold::exact(count, plan.num("iterations")),
        Threshold::zero("publish_errors"),
        Threshold::zero("redelivered"),
        Threshold::all("converged"),
        Threshold::exact("nodes_alive", NODES as f64),
        Threshold::zero("crash_count_mismatches"),
        Threshold::new("caught_up", "", Some(Bound::Ge(1.0)), Bound::Ge(1.0)),
        Threshold::new(
            "delivery_delay_max_ms",
            "ms",
            Some(Bound::Le(300_000.0)),
            Bound::Le(3_000.0),
        ),
    ]
}

fn plan_node_kill(input: &PlanInput) -> Plan {
    let iterations = input
        .iterations
        .unwrap_or_else(|| input.scale.pick(1, 6))
        .max(1);
    let mut plan = input.plan(
        NODE_KILL,
        &params(&[
            ("iterations", iterations as f64),
            ("publishers", input.scale.pick(3, 48) as f64),
            ("subscribers", input.scale.pick(3, 12) as f64),
            ("channels", input.scale.pick(2, 8) as f64),
            ("publish_interval_ms", 5.0),
            ("heal_deadline_s", 30.0),
        ]),
    );
    let mut rng = input.rng(NODE_KILL, "kills");
    let mut at = 0;
    for k in 0..iterations {
        at += rng.random_range(500..=input.scale.pick(1_000, 5_000) as u64);
        let node = rng.random_range(0..NODES);
        plan.actions.push(Action {
            at_ms: at,
            duration_ms: 0,
            kind: "kill9".into(),
            target: format!("node-{node}"),
            params: json!({"kill": k + 1, "node": node}),
        });
    }
    plan
}

fn plan_crash_all(input: &PlanInput) -> Plan {
    let iterations = input
        .iterations
        .unwrap_or_else(|| input.scale.pick(1, 4))
        .max(1);
    let mut plan = input.plan(CRASH_ALL, &params(&load_params(input, iterations)));
    let mut rng = input.rng(CRASH_ALL, "kills");
    let mut at = 0;
    for k in 0..iterations {
        at += rng.random_range(500..=input.scale.pick(1_000, 5_000) as u64);
        plan.actions.push(Action {
            at_ms: at,
            duration_ms: 0,
            kind: "kill9_all".into(),
            target: "every node".into(),
            params: json!({"kill": k + 1}),
        });
    }
    plan
}

fn plan_herd(input: &PlanInput) -> Plan {
    let mut plan = input.plan(
        HERD,
        &params(&[
            ("subscribers", input.scale.pick(300, 9_000) as f64),
            ("channels", input.scale.pick(10, 100) as f64),
            ("publishers", 4.0),
            ("publish_interval_ms", 20.0),
            ("heal_deadline_s", 60.0),
        ]),
    );
    let mut rng = input.rng(HERD, "fault");
    let node = rng.random_range(0..NODES);
    plan.actions.push(Action {
        at_ms: rng.random_range(1_000..=2_000),
        duration_ms: 0,
        kind: "kill9".into(),
        target: format!("node-{node}"),
        params: json!({"node": node}),
    });
    plan
}

/// Subscribers' connections and subscriptions over the live nodes.
async fn live_counts(cluster: &Cluster, dead: usize) -> (f64, f64) {
    let (mut conns, mut subs) = (0.0, 0.0);
    for (i, node) in cluster.nodes.iter().enumerate() {
        if i != dead {
            conns += super::herd::health_figure(node, "connections").await;
            subs += node.metric("keel_subscriptions").await.unwrap_or(0.0);
        }
    }
    (conns, subs)
}

async fn run_herd(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    ctx.phase("starting the cluster");
    let mut cluster = ctx.cluster(NODES, ClusterOptions::default(), "").await?;
    let r = &ctx.recorder;
    let n = plan.count("subscribers");
    let channels = plan.count("channels").max(1);
    let publishers = plan.count("publishers");
    let channel = |i: usize| format!("{}:{}", plan.scenario, i % channels);
    let action = plan
        .actions
        .first()
        .ok_or_else(|| setup("plan", "no fault"))?
        .clone();
    let dead = action.params["node"].as_u64().unwrap_or(0) as usize;

    ctx.phase("subscribers connecting");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let subs = super::herd::spawn_herd(
        n,
        |i| cluster.urls_from(i % NODES).join(" "),
        &channel,
        r,
        &stop_rx,
    )
    .await;
    let all_connected = wait_until(Duration::from_secs(60), Duration::from_millis(50), || {
        let cluster = &cluster;
        async move { live_counts(cluster, usize::MAX).await.0 >= n as f64 }
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
    for p in 0..publishers {
        pubs.push(tokio::spawn(super::process::publisher(
            // Publishers too start on every node, the dead one included.
            cluster.urls_from(p % NODES).join(" "),
            p as u32,
            chans.clone(),
            Duration::from_millis(plan.num("publish_interval_ms") as u64),
            r.clone(),
            shared.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(action.at_ms)).await;
    ctx.phase("kill9: the dead node's clients come back on the others");
    let mut expected: BTreeMap<String, i32> = BTreeMap::new();
    for id in held_by(&cluster.db.url, &format!("node-{dead}")).await? {
        *expected.entry(id).or_default() += 1;
    }
    shared.kills.fetch_add(1, Ordering::AcqRel);
    // Who must move: the dead node's connections (subscribers and
    // publishers); the survivors' own are there already.
    let on_dead = super::herd::health_figure(&cluster.nodes[dead], "connections").await;
    let survivors_before = live_counts(&cluster, dead).await.0;
    let t_fault = r.now();
    let back_from = tokio::time::Instant::now();
    cluster.nodes[dead].kill9().await?;
    r.fault(&action.kind, &action.target, t_fault, r.now());
    // Back: the survivors hold the dead node's connections too; the ratio
    // is of those that moved.
    let (all_back, back_5s) =
        super::herd::everyone_back(back_from, on_dead as usize, 0, || async {
            live_counts(&cluster, dead).await.0 - survivors_before
        })
        .await;

    tokio::time::sleep(Duration::from_secs(1)).await;
    let progress: Vec<_> = subs.iter().map(|(p, _)| p.clone()).collect();
    let converged = super::herd::catch_up(ctx, plan, &shared, pubs, &progress, channel).await?;
    // The survivors' counts, exact once the publishers have gone.
    let (conns, subscriptions, counts_exact) =
        super::herd::counts_settle(n, || live_counts(&cluster, dead)).await;
    let _ = stop_tx.send(true);
    let mut moved = 0u32;
    for (_, task) in subs {
        let report = task.await.map_err(|e| setup("subscriber task", e))?;
        if let Some(e) = report.error {
            return Err(setup("subscriber", e));
        }
        if report.connections > 1 {
            moved += 1;
        }
    }
    let (crashed, wrong, mismatched, samples) = crash_census(&cluster.db.url, &expected).await?;

    let mut m = Measured::default();
    if !samples.is_empty() {
        m.note(format!(
            "crash counts not as expected: {}",
            samples.join("; ")
        ));
    }
    m.set(
        "publish_errors",
        shared.publish_errors.load(Ordering::Relaxed) as f64,
    )
    .set("acked", shared.acked.load(Ordering::Relaxed) as f64)
    .set("converged", f64::from(u8::from(converged)))
    .set("counts_exact", f64::from(u8::from(counts_exact)))
    .set("back_within_5s_ratio", back_5s)
    .set(
        "all_back_ms",
        all_back.map_or(f64::INFINITY, |d| d.as_secs_f64() * 1000.0),
    )
    .set("moved", f64::from(moved))
    .set("sessions_crashed", crashed as f64)
    .set("crash_count_mismatches", wrong as f64)
    .set("notices_not_matching_crashes", mismatched as f64);
    let how_back = match all_back {
        Some(d) => format!("all back {:.0} ms after the kill", d.as_secs_f64() * 1000.0),
        None => "not all back within 60 s".into(),
    };
    m.note(format!(
        "{n} subscribers on {channels} channels over {NODES} nodes; node-{dead} (holding {on_dead} connections) SIGKILLed: {moved} subscribers resumed on the others, {how_back}; {crashed} sessions crashed"
    ));
    m.note(format!(
        "{} publishes acknowledged; every subscriber caught up: {converged}; the survivors' counts afterwards: {conns} connections, {subscriptions} subscriptions (exact, {n} and {}: {counts_exact})",
        shared.acked.load(Ordering::Relaxed),
        2 * n
    ));
    m.throughput = super::ack_rate(r);
    drop(cluster);
    Ok(m)
}

/// The cluster monkey's fault kinds.
const MONKEY_KINDS: [&str; 5] = ["kill9", "sigstop", "pg_stop", "nats_stop", "nats_partition"];

fn plan_monkey(input: &PlanInput) -> Plan {
    let duration = input.duration.unwrap_or_else(|| {
        input
            .scale
            .duration(Duration::from_secs(20), Duration::from_secs(300))
    });
    let mut rng = input.rng(MONKEY, "faults");
    // The node behind the NATS proxy: one, for the whole run.
    let proxied = rng.random_range(0..NODES);
    let mut actions = Vec::new();
    let mut at = 0u64;
    loop {
        let calm = rng.random_range(500..=2_000);
        let kind = MONKEY_KINDS[rng.random_range(0..MONKEY_KINDS.len())];
        let length = match kind {
            "kill9" => 0,
            // At most half the node lease (3 s): a pause, not a death,
            // even with a slow heartbeat on a loaded machine.
            "sigstop" => rng.random_range(500..=1_500),
            _ => rng.random_range(1_000..=3_000),
        };
        // Every fault also waits for the recovery: leave it room.
        if at + calm + length + 2_000 > duration.as_millis() as u64 {
            break;
        }
        at += calm;
        let node = if kind == "nats_partition" {
            proxied
        } else {
            rng.random_range(0..NODES)
        };
        actions.push(Action {
            at_ms: at,
            duration_ms: length,
            kind: kind.into(),
            target: match kind {
                "pg_stop" => "postgres".into(),
                "nats_stop" => "nats".into(),
                _ => format!("node-{node}"),
            },
            params: json!({"fault": actions.len() + 1, "node": node}),
        });
        at += length;
    }
    let mut figures = load_params(input, actions.len());
    figures.push(("node", proxied as f64));
    figures.push(("duration_s", duration.as_secs_f64()));
    let mut plan = input.plan(MONKEY, &params(&figures));
    plan.actions = actions;
    plan
}

/// The load of the publish/subscribe cluster scenarios.
fn load_params(input: &PlanInput, iterations: usize) -> Vec<(&'static str, f64)> {
    vec![
        ("iterations", iterations as f64),
        ("publishers", input.scale.pick(3, 48) as f64),
        ("subscribers", input.scale.pick(3, 12) as f64),
        ("channels", input.scale.pick(2, 8) as f64),
        ("publish_interval_ms", 5.0),
        ("heal_deadline_s", 30.0),
    ]
}

fn plan_pg_restart(input: &PlanInput) -> Plan {
    plan_outages(input, PG_RESTART, "pg_stop", "postgres")
}

fn plan_nats_restart(input: &PlanInput) -> Plan {
    plan_outages(input, NATS_RESTART, "nats_stop", "nats")
}

fn plan_node_partition(input: &PlanInput) -> Plan {
    // The node behind the proxy: one, for the whole run.
    let node = input.rng(NODE_PARTITION, "node").random_range(0..NODES);
    let mut plan = plan_outages(
        input,
        NODE_PARTITION,
        "nats_partition",
        &format!("node-{node}"),
    );
    plan.params.insert("node".into(), json!(node));
    plan
}

/// `iterations` outages of `kind` on `target`, each lasting a while.
fn plan_outages(input: &PlanInput, name: &'static str, kind: &str, target: &str) -> Plan {
    let iterations = input
        .iterations
        .unwrap_or_else(|| input.scale.pick(1, 4))
        .max(1);
    let mut plan = input.plan(
        name,
        &params(&[
            ("iterations", iterations as f64),
            ("publishers", input.scale.pick(3, 48) as f64),
            ("subscribers", input.scale.pick(3, 12) as f64),
            ("channels", input.scale.pick(2, 8) as f64),
            ("publish_interval_ms", 5.0),
            ("heal_deadline_s", 30.0),
        ]),
    );
    let mut rng = input.rng(name, "outages");
    let mut at = 0;
    for k in 0..iterations {
        at += rng.random_range(500..=input.scale.pick(1_000, 3_000) as u64);
        let down = rng.random_range(
            input.scale.pick(1_000, 2_000) as u64..=input.scale.pick(2_000, 5_000) as u64,
        );
        plan.actions.push(Action {
            at_ms: at,
            duration_ms: down,
            kind: kind.into(),
            target: target.into(),
            params: json!({"outage": k + 1}),
        });
        at += down;
    }
    plan
}

async fn run_node_kill(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    run_cluster(ctx, plan, Fault::NodeKill).await
}

async fn run_pg_restart(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    run_cluster(ctx, plan, Fault::PgStop).await
}

async fn run_nats_restart(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    run_cluster(ctx, plan, Fault::NatsStop).await
}

async fn run_node_partition(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    run_cluster(ctx, plan, Fault::NatsPartition).await
}

async fn run_crash_all(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    run_cluster(ctx, plan, Fault::KillAll).await
}

async fn run_monkey(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    run_cluster(ctx, plan, Fault::Monkey).await
}

/// What a cluster scenario does to the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL a node, then start it again.
    NodeKill,
    /// Stop PostgreSQL (its own instance) for a while.
    PgStop,
    /// Kill NATS (its own server) for a while.
    NatsStop,
    /// Blackhole one node's link to NATS for a while.
    NatsPartition,
    /// SIGKILL every node at once, check the database, start them again.
    KillAll,
    /// Each action its own fault, by its kind (`kill9`, `sigstop`,
    /// `pg_stop`, `nats_stop`, `nats_partition`).
    Monkey,
}

impl Fault {
    /// The count figure's name.
    fn count_name(self) -> &'static str {
        match self {
            Fault::NodeKill | Fault::KillAll => "kills",
            Fault::PgStop | Fault::NatsStop => "restarts",
            Fault::NatsPartition => "partitions",
            Fault::Monkey => "faults",
        }
    }
}

/// Three nodes, load from clients spread over them, and the plan's faults.
async fn run_cluster(ctx: &Ctx, plan: &Plan, fault: Fault) -> Result<Measured, Error> {
    ctx.phase("starting the cluster");
    let options = ClusterOptions {
        own_pg: matches!(fault, Fault::PgStop | Fault::Monkey),
        own_nats: matches!(fault, Fault::NatsStop | Fault::Monkey),
        nats_proxy_for: matches!(fault, Fault::NatsPartition | Fault::Monkey)
            .then(|| plan.num("node") as usize),
        upstream: None,
    };
    let mut cluster = ctx.cluster(NODES, options, "").await?;
    let r = &ctx.recorder;
    let shared = Arc::new(Shared {
        // Welcome states are not checked here: clients also reconnect for
        // reasons other than a kill (a slow consumer's 1013, a failover
        // that lands on a live node). The crash census below checks, from
        // the database, that exactly the sessions held by a killed node
        // were crashed, once per kill.
        check_states: false,
        last_ack: (0..plan.count("publishers"))
            .map(|_| AtomicU64::new(0))
            .collect(),
        ..Shared::default()
    });
    let channels: Vec<String> = (0..plan.count("channels"))
        .map(|c| format!("{}:{c}", plan.scenario))
        .collect();
    let home = |i: usize| cluster.urls_from(i % NODES).join(" ");

    ctx.phase("opening sessions");
    let progress: Arc<std::sync::Mutex<BTreeMap<String, u64>>> = Arc::default();
    // Publishers start on the node after their subscribers' first, so that
    // most deliveries cross nodes.
    let (pubs, subs) = spawn_load(
        plan,
        r,
        &shared,
        &channels,
        &progress,
        |s| home(s as usize),
        |p| home(p as usize + 1),
    )
    .await?;

    let mut recoveries = Vec::new();
    // The chart: time to recover at each fault.
    let mut timeline = crate::load::Latency::default();
    // Crashes each session must have had: one per kill of the node that
    // held it.
    let mut expected: BTreeMap<String, i32> = BTreeMap::new();
    let mut faults = 0u32;
    let mut integrity_failures = 0u32;
    let mut integrity_samples: Vec<String> = Vec::new();
    // Time to recover per fault kind (the monkey mixes them).
    let mut by_kind: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let mut previous = 0;
    for a in &plan.actions {
        tokio::time::sleep(Duration::from_millis(a.at_ms - previous)).await;
        previous = a.at_ms;
        ctx.phase(&format!(
            "{} {} of {}",
            a.kind,
            faults + 1,
            plan.actions.len()
        ));
        let t_fault = r.now();
        let node = a.params["node"].as_u64().unwrap_or(0) as usize;
        match a.kind.as_str() {
            "pg_stop" => {
                let own = cluster
                    .own_pg
                    .as_ref()
                    .ok_or_else(|| setup("own PostgreSQL", "not started"))?;
                own.stop_server().await?;
                tokio::time::sleep(Duration::from_millis(a.duration_ms)).await;
                own.start_server().await?;
                previous += a.duration_ms;
            }
            "nats_stop" => {
                let own = cluster
                    .own_nats
                    .as_mut()
                    .ok_or_else(|| setup("own NATS", "not started"))?;
                own.stop_server().await?;
                tokio::time::sleep(Duration::from_millis(a.duration_ms)).await;
                own.start_server().await?;
                previous += a.duration_ms;
            }
            "nats_partition" => {
                let (_, proxy) = cluster
                    .nats_proxy
                    .as_ref()
                    .ok_or_else(|| setup("NATS proxy", "not started"))?;
                proxy.partition(
                    Duration::from_millis(a.duration_ms),
                    keel_faults::PartitionMode::Hang,
                );
                tokio::time::sleep(Duration::from_millis(a.duration_ms)).await;
                previous += a.duration_ms;
            }
            "sigstop" => {
                let pid = cluster.nodes[node].pid();
                keel_faults::process::pause(pid).map_err(|e| setup("SIGSTOP", e))?;
                tokio::time::sleep(Duration::from_millis(a.duration_ms)).await;
                keel_faults::process::resume(pid).map_err(|e| setup("SIGCONT", e))?;
                previous += a.duration_ms;
            }
            "kill9" => {
                for id in held_by(&cluster.db.url, &format!("node-{node}")).await? {
                    *expected.entry(id).or_default() += 1;
                }
                shared.kills.fetch_add(1, Ordering::AcqRel);
                cluster.nodes[node].kill9().await?;
            }
            "kill9_all" => {
                for k in 0..cluster.nodes.len() {
                    for id in held_by(&cluster.db.url, &format!("node-{k}")).await? {
                        *expected.entry(id).or_default() += 1;
                    }
                }
                shared.kills.fetch_add(1, Ordering::AcqRel);
                // Every node signalled before any is waited for: a client
                // of the first must not resume on the last before it dies
                // (its session would crash twice for one kill).
                for n in &cluster.nodes {
                    let _ = keel_faults::process::kill9(n.pid());
                }
                for n in &mut cluster.nodes {
                    n.kill9().await?;
                }
                // The database as the crash left it, before any node
                // recovers anything.
                let bad = integrity(&cluster.db.url).await?;
                if !bad.is_empty() {
                    integrity_failures += 1;
                    integrity_samples.extend(bad);
                }
                for n in &mut cluster.nodes {
                    n.restart().await?;
                }
            }
            other => return Err(setup("plan", format!("unknown fault {other}"))),
        }
        faults += 1;
        let t_heal = r.now();
        r.fault(&a.kind, &a.target, t_fault, t_heal);
        // Recovered once every publisher has been acknowledged again (after
        // a kill, its clients resumed on another node).
        let acked_again = wait_until(Duration::from_secs(30), Duration::from_millis(5), || {
            let shared = shared.clone();
            async move {
                shared
                    .last_ack
                    .iter()
                    .all(|t| t.load(Ordering::Acquire) > t_heal)
            }
        })
        .await;
        if !acked_again {
            r.op(Op {
                client: u32::MAX,
                kind: "recover".into(),
                invoke: t_heal,
                done: r.now(),
                outcome: Outcome::Fail {
                    code: "a publisher was not acknowledged within 30 s of the fault".into(),
                },
                detail: format!("after {} {faults}", a.kind),
            });
        }
        // A whole-cluster crash is measured from the kill: the restart is
        // part of the recovery.
        let from = if a.kind == "kill9_all" {
            t_fault
        } else {
            t_heal
        };
        let took = Duration::from_micros(r.now().saturating_sub(from));
        timeline.record(Duration::from_micros(t_heal), took.as_micros() as u64);
        recoveries.push(took);
        by_kind.entry(a.kind.clone()).or_default().push(took);
        if a.kind == "kill9" {
            // The killed node comes back (its clients stay where they are).
            cluster.nodes[node].restart().await?;
        }
    }

    let (converged, redelivered) = heal(ctx, plan, &shared, &progress, pubs, subs).await?;

    // Every node still serving, on the same process (a store or bus outage
    // must not need a restart): its store reachable and its bus connected
    // (async-nats reconnects by itself; allow it a few seconds).
    let mut alive = 0;
    for node in &cluster.nodes {
        let serving = wait_until(
            Duration::from_secs(10),
            Duration::from_millis(100),
            || async {
                let health = crate::fixture::http_get(node.addr(), "/healthz")
                    .await
                    .unwrap_or_default();
                health.contains("\"store_reachable\":true")
                    && health.contains("\"bus\":\"connected\"")
            },
        )
        .await;
        if serving {
            alive += 1;
        }
    }
    // Messages the catch-up read from the store because the bus did not
    // bring them: the path a bus outage must take.
    let mut caught_up = 0.0;
    for node in &cluster.nodes {
        caught_up += node
            .metric("keel_catch_up_messages_total")
            .await
            .unwrap_or(0.0);
    }
    let delay = delivery_delay(&r.snapshot());
    // What the nodes refused as `unavailable` (the SDK re-sent each).
    let mut refused = 0.0;
    for node in &cluster.nodes {
        refused += node
            .metric("keel_errors_total{code=\"unavailable\"}")
            .await
            .unwrap_or(0.0);
    }
    // Crashes as the database has them: exactly the expected ones, and one
    // notice per crash.
    let (crashed, wrong, mismatched, samples) = crash_census(&cluster.db.url, &expected).await?;
    // And the database as the run left it.
    let bad = integrity(&cluster.db.url).await?;
    if !bad.is_empty() {
        integrity_failures += 1;
        integrity_samples.extend(bad);
    }

    recoveries.sort();
    let pick = |q: f64| super::quantile_ms(&recoveries, q);
    let figure = match fault {
        Fault::NodeKill => "failover",
        Fault::KillAll => "mttr",
        _ => "recovery",
    };
    let mut m = Measured::default();
    if !samples.is_empty() {
        m.note(format!(
            "crash counts not as expected: {}",
            samples.join("; ")
        ));
    }
    if !integrity_samples.is_empty() {
        integrity_samples.truncate(5);
        m.note(format!(
            "database not intact: {}",
            integrity_samples.join("; ")
        ));
    }
    if fault == Fault::Monkey {
        let kinds: Vec<String> = by_kind
            .iter_mut()
            .map(|(kind, times)| {
                times.sort();
                format!(
                    "{kind} ×{}: p50 {:.0} ms, max {:.0} ms",
                    times.len(),
                    super::quantile_ms(times, 0.5),
                    super::quantile_ms(times, 1.0)
                )
            })
            .collect();
        m.note(format!("time to recover by fault: {}", kinds.join("; ")));
    }
    m.set("integrity_failures", f64::from(integrity_failures));
    m.set(fault.count_name(), f64::from(faults))
        .set(
            "publish_errors",
            shared.publish_errors.load(Ordering::Relaxed) as f64,
        )
        .set("acked", shared.acked.load(Ordering::Relaxed) as f64)
        .set("redelivered", redelivered as f64)
        .set("converged", if converged { 1.0 } else { 0.0 })
        .set("refused", refused)
        .set("caught_up", caught_up)
        .set("delivery_delay_p99_ms", delay.0)
        .set("delivery_delay_max_ms", delay.1)
        .set("nodes_alive", f64::from(alive))
        .set("sessions_crashed", crashed as f64)
        .set("crash_count_mismatches", wrong as f64)
        .set("notices_not_matching_crashes", mismatched as f64)
        .set(&format!("{figure}_p50_ms"), pick(0.5))
        .set(&format!("{figure}_p95_ms"), pick(0.95))
        .set(&format!("{figure}_max_ms"), pick(1.0));
    m.note(format!(
        "{} publishes acknowledged over {NODES} nodes; {refused} answers `unavailable` (re-sent by the SDK); {crashed} sessions crashed; {caught_up} messages read by the catch-up; delivery after acknowledgement p99 {:.0} ms, max {:.0} ms",
        shared.acked.load(Ordering::Relaxed),
        delay.0,
        delay.1
    ));
    // The chart: time to recover at each fault, and acknowledged
    // publishes per second around them.
    m.latency = Some(timeline);
    m.throughput = super::ack_rate(r);
    drop(cluster);
    Ok(m)
}

/// How long after its acknowledgement each delivery arrived: (p99, max)
/// in ms, over every delivery of an acknowledged publish.
fn delivery_delay(h: &crate::history::History) -> (f64, f64) {
    let acked: std::collections::HashMap<_, u64> = h
        .publishes
        .iter()
        .filter(|p| matches!(p.outcome, Outcome::Ok { .. }))
        .map(|p| ((p.channel, p.id), p.done))
        .collect();
    let mut delays: Vec<u64> = h
        .deliveries
        .iter()
        .filter_map(|d| Some(d.at.saturating_sub(*acked.get(&(d.channel, d.id))?)))
        .collect();
    if delays.is_empty() {
        return (0.0, 0.0);
    }
    delays.sort_unstable();
    let p99 = delays[(delays.len() * 99 / 100).min(delays.len() - 1)];
    let max = delays[delays.len() - 1];
    (p99 as f64 / 1000.0, max as f64 / 1000.0)
}

/// What is wrong with the cluster's database, if anything: every channel's
/// offsets contiguous (no gap, none twice: the primary key) and its head
/// (`next_offset`) just past the last; no session ACTIVE on a node that
/// holds no lease is checked by the crash census instead.
async fn integrity(url: &str) -> Result<Vec<String>, Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| setup("read the cluster's database", e))?;
    let driver = tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT c.name, c.next_offset, COUNT(m.seq), COALESCE(MIN(m.seq), 0), COALESCE(MAX(m.seq), 0)
             FROM channels c LEFT JOIN messages m ON m.channel = c.name
             GROUP BY c.name, c.next_offset",
            &[],
        )
        .await
        .map_err(|e| setup("read the cluster's channels", e))?;
    driver.abort();
    let mut bad = Vec::new();
    for row in rows {
        let (name, next, count, min, max): (String, i64, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        let contiguous = count == 0 || max - min + 1 == count;
        let head = count == 0 || next == max + 1;
        if !contiguous || !head {
            bad.push(format!(
                "{name}: {count} messages at offsets {min}..={max}, next offset {next}"
            ));
        }
    }
    Ok(bad)
}

/// The sessions ACTIVE on `node` now.
async fn held_by(url: &str, node: &str) -> Result<Vec<String>, Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| setup("read the cluster's database", e))?;
    let driver = tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT id FROM sessions WHERE state = 'ACTIVE' AND node = $1",
            &[&node],
        )
        .await
        .map_err(|e| setup("read the cluster's sessions", e))?;
    driver.abort();
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// (sessions crashed at least once, sessions whose crash count is not the
/// `expected` one (none expected: 0), sessions whose crash notices are not
/// one per crash), read from the database.
async fn crash_census(
    url: &str,
    expected: &BTreeMap<String, i32>,
) -> Result<(u64, u64, u64, Vec<String>), Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| setup("read the cluster's database", e))?;
    let driver = tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT s.id, s.crash_count,
                    (SELECT COUNT(*) FROM messages m
                     WHERE m.channel = 'session:' || s.id AND m.msg_id LIKE 'crash-notice-%')
             FROM sessions s",
            &[],
        )
        .await
        .map_err(|e| setup("read the cluster's sessions", e))?;
    driver.abort();
    let (mut crashed, mut wrong, mut mismatched) = (0, 0, 0);
    let mut samples = Vec::new();
    for row in rows {
        let (id, count, notices): (String, i32, i64) = (row.get(0), row.get(1), row.get(2));
        if count > 0 {
            crashed += 1;
        }
        let want = expected.get(&id).copied().unwrap_or(0);
        if count != want {
            wrong += 1;
            if samples.len() < 5 {
                samples.push(format!("{id}: crashed {count} times, expected {want}"));
            }
        }
        if i64::from(count) != notices {
            mismatched += 1;
        }
    }
    Ok((crashed, wrong, mismatched, samples))
}
