//! Network faults through keel-faults' chaos proxy, between live SDK
//! clients under publish/subscribe load and the relay (the machinery is
//! [`super::process::run_faults`]): `half_open_links` blackholes every link
//! without FIN or RST, `latency_1000ms` and `jitter_50_500ms` slow every
//! chunk both ways, `websocket_drop_reconnect` cuts every link and refuses
//! new ones while a client with the seed's backoff (1 s doubling) is
//! watched state by state.

use std::time::Duration;

use super::body;
use super::process::{Fault, OutageShape, outage_thresholds, plan_outages, run_faults};
use crate::Error;
use crate::scenario::{Ctx, Measured, Plan, PlanInput, Scenario, SeedRef, Suite};
use crate::threshold::{Bound, Threshold};

const HALF_OPEN: &str = "half_open_links";

pub(crate) const HALF_OPEN_LINKS: Scenario = Scenario {
    name: HALF_OPEN,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "002",
        test: "network failures: connections that hang",
        threshold: "85% graceful handling; MTTR < 5 min",
    },
    what: "every client's link blackholed by the chaos proxy (held: no FIN, no RST) past the clients' liveness timeout, new connections hang; then healed; repeat (--iterations)",
    target: "every half-open link detected by liveness within its timeout, clients resume after the heal with nothing lost or duplicated, every publisher acknowledged again within 2 s of the heal (p95)",
    needs_process: Some("puts its own chaos proxy in front of the relay"),
    thresholds: |plan| outage_thresholds(plan, "blackholes", true),
    plan: |input| plan_outages(input, HALF_OPEN, "blackhole", &OutageShape::PROCESS),
    run: body!(run_half_open),
    budget: Duration::from_secs(600),
};

async fn run_half_open(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    run_faults(ctx, plan, Fault::HalfOpen).await
}

/// The seed's latency scenarios: about 1,000 connections at full scale,
/// every publisher publishing once a second; recovery is bounded by the
/// slowest round trip still in flight at the heal plus one interval.
const fn slow_shape(latency: u64, jitter: u64) -> OutageShape {
    OutageShape {
        iterations: (1, 2),
        outage_ms: (4_000, 10_000),
        publishers: (20, 980),
        subscribers: (4, 20),
        channels: (2, 10),
        publish_interval_ms: 1_000.0,
        recovery_target_ms: (2 * (latency + jitter) + 2_000) as f64,
        short_liveness: false,
    }
}

/// Thresholds of the latency scenarios: the outage ones with no link lost,
/// and proof that the latency was in force.
fn slow_thresholds(plan: &Plan) -> Vec<Threshold> {
    let mut t = outage_thresholds(plan, "slowdowns", false);
    t.push(Threshold::new(
        "slow_publishes",
        "",
        Some(Bound::Ge(plan.num("slow_publishes_floor"))),
        Bound::Ge(plan.num("slow_publishes_floor")),
    ));
    t.push(Threshold::new(
        "slow_rtt_p5_ms",
        "ms",
        Some(Bound::Ge(plan.num("rtt_floor_ms"))),
        Bound::Ge(plan.num("rtt_floor_ms")),
    ));
    t
}

fn plan_slow(input: &PlanInput, scenario: &str, latency: u64, jitter: u64) -> Plan {
    let mut plan = plan_outages(input, scenario, "latency", &slow_shape(latency, jitter));
    plan.params
        .insert("latency_ms".into(), serde_json::json!(latency));
    plan.params
        .insert("jitter_ms".into(), serde_json::json!(jitter));
    // Both ways, at least latency - jitter each.
    plan.params.insert(
        "rtt_floor_ms".into(),
        serde_json::json!(2 * (latency - jitter) - 10),
    );
    plan.params.insert(
        "slow_publishes_floor".into(),
        serde_json::json!(input.scale.pick(10, 1_000)),
    );
    for a in &mut plan.actions {
        a.params["latency_ms"] = serde_json::json!(latency);
        a.params["jitter_ms"] = serde_json::json!(jitter);
    }
    plan
}

async fn run_slow(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    run_faults(
        ctx,
        plan,
        Fault::Latency {
            latency: plan.num("latency_ms") as u64,
            jitter: plan.num("jitter_ms") as u64,
        },
    )
    .await
}

pub(crate) const LATENCY_1000MS: Scenario = Scenario {
    name: "latency_1000ms",
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "003",
        test: "test_stress_latency_1000ms_connections",
        threshold: "1,000 connections at 1000 ms latency: all operations complete, 1000+ events delivered",
    },
    what: "1,000 SDK connections through the chaos proxy; 1000 ms added to every chunk both ways for the slow window, then removed; repeat (--iterations)",
    target: "no link lost, no publish failed, everything delivered once; round trips at least 2 s while slow (the fault was real); every publisher acknowledged again within 4 s of the heal (p95)",
    needs_process: Some("puts its own chaos proxy in front of the relay"),
    thresholds: slow_thresholds,
    plan: |input| plan_slow(input, "latency_1000ms", 1_000, 0),
    run: body!(run_slow),
    budget: Duration::from_secs(600),
};

pub(crate) const JITTER_50_500MS: Scenario = Scenario {
    name: "jitter_50_500ms",
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "003",
        test: "test_stress_jitter_50_500ms_latency",
        threshold: "all events delivered, delivery time varies, no deadlocks",
    },
    what: "as latency_1000ms with 50 to 500 ms (uniform, seeded) added to every chunk both ways",
    target: "no link lost, no publish failed, everything delivered once and in order; round trips vary by at least 200 ms (p5 to p95) while slow; acknowledged again within 3 s of the heal (p95)",
    needs_process: Some("puts its own chaos proxy in front of the relay"),
    thresholds: |plan| {
        let mut t = slow_thresholds(plan);
        t.push(Threshold::new(
            "slow_rtt_spread_ms",
            "ms",
            Some(Bound::Ge(1.0)),
            Bound::Ge(200.0),
        ));
        t
    },
    plan: |input| plan_slow(input, "jitter_50_500ms", 275, 225),
    run: body!(run_slow),
    budget: Duration::from_secs(600),
};

const DROP: &str = "websocket_drop_reconnect";

/// The proxy refuses for 14 s: the observer's attempts after 1, 3 and 7 s
/// are refused and the one after 15 s succeeds, so it backs off 1, 2, 4
/// and 8 s (the seed's ladder).
const DROP_SHAPE: OutageShape = OutageShape {
    iterations: (1, 2),
    outage_ms: (14_000, 14_000),
    publishers: (3, 16),
    subscribers: (2, 4),
    channels: (2, 4),
    publish_interval_ms: 5.0,
    recovery_target_ms: 2_000.0,
    short_liveness: false,
};

pub(crate) const WEBSOCKET_DROP_RECONNECT: Scenario = Scenario {
    name: DROP,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "000",
        test: "test_websocket_drop_reconnect",
        threshold: "DISCONNECTED → RECONNECTING → CONNECTED observed; exponential backoff 1 s, 2 s, 4 s, 8 s",
    },
    what: "every link cut by the chaos proxy, which refuses new connections for 14 s, under SDK load; one more client with the seed's backoff (1 s doubling, no jitter) is watched state by state",
    target: "the seed's states and ladder exactly (each wait within 250 ms of its delay), nothing lost or duplicated, every publisher acknowledged again within 2 s of the heal (p95)",
    needs_process: Some("puts its own chaos proxy in front of the relay"),
    thresholds: |plan| {
        let mut t = outage_thresholds(plan, "drops", true);
        t.push(Threshold::all("states_observed_ok"));
        t.push(Threshold::all("backoff_ladder_ok"));
        t.push(Threshold::exact(
            "backoff_steps",
            plan.num("expected_backoffs"),
        ));
        t
    },
    plan: plan_drop,
    run: body!(run_drop),
    budget: Duration::from_secs(300),
};

fn plan_drop(input: &PlanInput) -> Plan {
    let mut plan = plan_outages(input, DROP, "drop", &DROP_SHAPE);
    // Attempts after 1, 3, 7, 15, ... s (2^k - 1): each one before the
    // heal is refused and followed by one more backoff.
    let outage = plan.actions.first().map_or(0, |a| a.duration_ms);
    let refused = (1..32)
        .take_while(|k| ((1u64 << k) - 1) * 1000 < outage)
        .count();
    plan.params
        .insert("expected_backoffs".into(), serde_json::json!(refused + 1));
    plan
}

async fn run_drop(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    run_faults(ctx, plan, Fault::Drop).await
}
