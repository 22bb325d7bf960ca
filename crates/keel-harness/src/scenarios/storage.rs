//! Storage faults: `sqlite_corruption` kills the relay, writes garbage over
//! its database and restarts it: the damaged files must be moved aside
//! (never deleted), the operator told what happened and how to salvage, and
//! the relay serving again on a fresh database.

use std::time::Duration;

use keel_relay::client::{Client, ClientConfig};
use serde_json::json;

use super::{body, params, setup};
use crate::Error;
use crate::fixture::RelayOptions;
use crate::history::{Op, Outcome};
use crate::scenario::{Action, Ctx, Measured, Plan, PlanInput, Scenario, SeedRef, Suite};
use crate::threshold::{Bound, Threshold};

const CORRUPTION: &str = "sqlite_corruption";

pub(crate) const SQLITE_CORRUPTION: Scenario = Scenario {
    name: CORRUPTION,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "000/002",
        test: "test_corrupt_state_recovery; database consistency",
        threshold: "corrupt state handled gracefully: logged, no crash at startup",
    },
    what: "publish, SIGKILL the relay, overwrite the database's first pages with seeded garbage, restart",
    target: "the damaged files quarantined (moved, not deleted), an operator message naming them and the salvage command, the relay serving on a fresh database within 1 s",
    needs_process: true,
    thresholds: |_| {
        vec![
            Threshold::all("quarantined"),
            Threshold::all("operator_message"),
            Threshold::all("serves_after"),
            Threshold::all("old_token_refused"),
            Threshold::new(
                "restart_ms",
                "ms",
                Some(Bound::Le(300_000.0)),
                Bound::Le(1_000.0),
            ),
        ]
    },
    plan: plan_corruption,
    run: body!(run_corruption),
    budget: Duration::from_secs(120),
};

fn plan_corruption(input: &PlanInput) -> Plan {
    let mut plan = input.plan(
        CORRUPTION,
        &params(&[("messages", input.scale.pick(50, 1_000) as f64)]),
    );
    plan.actions.push(Action {
        at_ms: 0,
        duration_ms: 0,
        kind: "corrupt".into(),
        target: "keel.db and keel.db-wal".into(),
        // The header and the first pages: "file is not a database".
        params: json!({"from": 0, "to": 8192, "seed": crate::scenario::sub_seed(input.seed, CORRUPTION)}),
    });
    plan
}

async fn run_corruption(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let mut relay = ctx.relay(RelayOptions::default()).await?;
    let r = &ctx.recorder;
    ctx.phase("publishing");
    let client = Client::connect(ClientConfig::new(&relay.url()))
        .await
        .map_err(|e| setup("connect", e))?;
    let token = client.token().unwrap_or_default();
    for n in 0..plan.count("messages") {
        client
            .publish("store:0", &format!("m{n}"), &json!({"n": n}))
            .await
            .map_err(|e| setup("publish", e))?;
    }
    client.close().await;

    ctx.phase("kill, corrupt, restart");
    let t0 = r.now();
    relay.kill9().await?;
    let data = relay.data_dir();
    let corrupt = &plan.actions[0].params;
    let (from, to) = (
        corrupt["from"].as_u64().unwrap_or(0),
        corrupt["to"].as_u64().unwrap_or(8192),
    );
    // Both files: pages still in the WAL would otherwise stand in for the
    // main file's damaged ones (what a dying disk does to both is garbage).
    let seed = corrupt["seed"].as_u64().unwrap_or(0);
    for (k, name) in ["keel.db", "keel.db-wal"].into_iter().enumerate() {
        let path = data.join(name);
        if path.exists() {
            keel_faults::corrupt::overwrite(
                &path,
                std::slice::from_ref(&(from..to)),
                seed.wrapping_add(k as u64),
            )
            .map_err(|e| setup("corrupt the database", e))?;
        }
    }
    let spawned = tokio::time::Instant::now();
    let restarted = relay.restart().await;
    let restart = spawned.elapsed();
    r.fault("corrupt", "keel.db", t0, r.now());
    r.op(Op {
        client: u32::MAX,
        kind: "restart".into(),
        invoke: t0,
        done: r.now(),
        outcome: match &restarted {
            Ok(()) => Outcome::Ok { offset: 0 },
            Err(e) => Outcome::Fail {
                code: e.to_string(),
            },
        },
        detail: "after corruption".into(),
    });
    let mut m = Measured::default();
    m.set("restart_ms", restart.as_secs_f64() * 1000.0);
    if let Err(e) = restarted {
        m.note(format!("the relay did not come back: {e}"));
        for k in [
            "quarantined",
            "operator_message",
            "serves_after",
            "old_token_refused",
        ] {
            m.set(k, 0.0);
        }
        return Ok(m);
    }

    // Moved aside, not deleted.
    let moved: Vec<String> = std::fs::read_dir(&data)
        .map_err(|e| Error::io("list the data directory", e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("keel.db") && n.contains(".corrupt-"))
        .collect();
    // The operator is told what happened, where the files went, how to salvage.
    let log = std::fs::read_to_string(ctx.dir.join("relay-1.log")).unwrap_or_default();
    let told = log.contains("was damaged") && log.contains(".recover") && log.contains(".corrupt-");
    // The old session lived in the damaged file: its token is unknown now.
    let mut old = ClientConfig::new(&relay.url());
    old.token = Some(token);
    old.connect_timeout = Duration::from_secs(3);
    let old_refused = Client::connect(old).await.is_err();
    // A new session publishes and reads back.
    let serves = async {
        let c = Client::connect(ClientConfig::new(&relay.url()))
            .await
            .ok()?;
        let offset = c.publish("store:0", "after", &json!("fresh")).await.ok()?;
        c.close().await;
        Some(offset)
    }
    .await;
    m.set("quarantined", if moved.is_empty() { 0.0 } else { 1.0 })
        .set("operator_message", if told { 1.0 } else { 0.0 })
        .set("old_token_refused", if old_refused { 1.0 } else { 0.0 })
        // A fresh log: the first message is offset 1 again.
        .set("serves_after", if serves == Some(1) { 1.0 } else { 0.0 });
    m.note(format!(
        "{} messages published, then {from}..{to} of keel.db and its WAL overwritten; restarted in {:.0} ms; moved aside: {}",
        plan.count("messages"),
        restart.as_secs_f64() * 1000.0,
        moved.join(", ")
    ));
    Ok(m)
}
