//! Storage faults: `sqlite_corruption` kills the relay, writes garbage over
//! its database and restarts it: the damaged files must be moved aside
//! (never deleted), the operator told what happened and how to salvage, and
//! the relay serving again on a fresh database. `disk_full` puts the
//! relay's data on a small real tmpfs under publish/subscribe load and fills
//! it: clear `unavailable` answers, health DEGRADED, nothing acknowledged
//! lost, and service again once the space returns.

use std::time::Duration;

use keel_relay::client::{Client, ClientConfig};
use rand::Rng;
use serde_json::json;

use super::{body, params, setup};
use crate::Error;
use crate::fixture::RelayOptions;
use crate::history::{After, Expectation, Op, Outcome, StateCheck};
use crate::scenario::{Action, Ctx, Measured, Plan, PlanInput, Scenario, SeedRef, Suite};
use crate::threshold::{Bound, Threshold};

const DISK_FULL: &str = "disk_full";

pub(crate) const DISK_FULL_SCENARIO: Scenario = Scenario {
    name: DISK_FULL,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "002",
        test: "disk exhaustion: write operations with a full disk",
        threshold: "no crashes, clear error messages, graceful degradation",
    },
    what: "the relay's data on a 32 MiB tmpfs under SDK publish/subscribe load (2 KiB payloads); a file fills the tmpfs for the fault, then is removed; repeat (--iterations)",
    target: "publishes answered `unavailable` (the SDK retries them), /healthz DEGRADED with \"disk full\", OPERATIONAL again within 5 s of the space returning, nothing acknowledged lost or duplicated, every publisher acknowledged again within 3 s (p95)",
    needs_process: Some("puts the relay's data on a tmpfs it mounts"),
    thresholds: |plan| {
        let mut t = super::process::outage_thresholds(plan, "disk_fulls", false);
        t.push(Threshold::new(
            "unavailable_answers",
            "",
            Some(Bound::Ge(1.0)),
            Bound::Ge(1.0),
        ));
        t.push(Threshold::all("degraded_seen_ratio"));
        t.push(Threshold::all("operational_again_ratio"));
        t
    },
    plan: |input| {
        let mut plan = super::process::plan_outages(
            input,
            DISK_FULL,
            "disk_full",
            &super::process::OutageShape {
                iterations: (2, 3),
                outage_ms: (2_000, 5_000),
                publishers: (3, 8),
                subscribers: (2, 2),
                channels: (2, 4),
                publish_interval_ms: 5.0,
                recovery_target_ms: 3_000.0,
                short_liveness: false,
            },
        );
        plan.params.insert("payload_pad_bytes".into(), json!(2048));
        for a in &mut plan.actions {
            a.target = "the data directory's tmpfs".into();
        }
        plan
    },
    run: body!(run_disk_full),
    budget: Duration::from_secs(300),
};

async fn run_disk_full(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    super::process::run_faults(ctx, plan, super::process::Fault::DiskFull).await
}

/// The relay's disk thresholds on the small tmpfs: low below 2 MiB, full
/// below 256 KiB, checked every 100 ms.
pub(super) const DISK_CONFIG: &str =
    "\n[disk]\nlow_bytes = 2097152\nfull_bytes = 262144\ncheck_interval_ms = 100\n";

/// A tmpfs of `size` bytes in the scenario's directory; where mounting is
/// not permitted (not root), the scenario is not applicable here (never a
/// pass: the report and the verdict table say "n/a" and why).
pub(super) fn small_tmpfs(ctx: &Ctx, size: u64) -> Result<keel_faults::disk::Tmpfs, Error> {
    match keel_faults::disk::Tmpfs::mount(&ctx.dir.join("tmpfs"), size) {
        keel_faults::disk::TmpfsMount::Mounted(fs) => Ok(fs),
        keel_faults::disk::TmpfsMount::Skipped { why } => Err(Error::NotApplicable(format!(
            "needs a tmpfs mount, which needs root (or CAP_SYS_ADMIN): {why}"
        ))),
    }
}

/// What the disk-full faults showed.
#[derive(Default)]
pub(super) struct DiskWatch {
    fills: u32,
    degraded: u32,
    operational_again: u32,
    filled_bytes: u64,
    back_ms: Vec<f64>,
}

impl DiskWatch {
    /// Fills the tmpfs for `outage` (watching /healthz say DEGRADED), then
    /// frees it and waits for OPERATIONAL.
    pub(super) async fn fill_for(
        &mut self,
        relay: &crate::fixture::RelayProcess,
        mount: &std::path::Path,
        outage: Duration,
    ) -> Result<(), Error> {
        let filler = mount.join("filler");
        let written = {
            let filler = filler.clone();
            tokio::task::spawn_blocking(move || keel_faults::disk::fill(&filler, None))
                .await
                .map_err(|e| setup("fill", e))?
                .map_err(|e| setup("fill", e))?
        };
        self.fills += 1;
        self.filled_bytes += written;
        let until = tokio::time::Instant::now() + outage;
        let mut degraded = false;
        while tokio::time::Instant::now() < until {
            let health = crate::fixture::http_get(relay.addr(), "/healthz")
                .await
                .unwrap_or_default();
            degraded |= health.contains("DEGRADED") && health.contains("disk full");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.degraded += u32::from(degraded);
        std::fs::remove_file(&filler).map_err(|e| setup("free the tmpfs", e))?;
        let freed = tokio::time::Instant::now();
        let back = super::wait_until(
            Duration::from_secs(5),
            Duration::from_millis(20),
            || async {
                crate::fixture::http_get(relay.addr(), "/healthz")
                    .await
                    .unwrap_or_default()
                    .contains("OPERATIONAL")
            },
        )
        .await;
        self.operational_again += u32::from(back);
        self.back_ms.push(freed.elapsed().as_secs_f64() * 1000.0);
        Ok(())
    }

    /// Its figures.
    pub(super) async fn report(
        &self,
        relay: &crate::fixture::RelayProcess,
        m: &mut Measured,
    ) -> Result<(), Error> {
        let text = relay.metrics().await?;
        let unavailable = text
            .lines()
            .filter(|l| l.starts_with("keel_errors_total") && l.contains("code=\"unavailable\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
        let n = f64::from(self.fills.max(1));
        let back = self.back_ms.iter().copied().fold(0.0, f64::max);
        m.set("unavailable_answers", unavailable)
            .set("degraded_seen_ratio", f64::from(self.degraded) / n)
            .set(
                "operational_again_ratio",
                f64::from(self.operational_again) / n,
            )
            .set("operational_again_max_ms", back);
        m.note(format!(
            "{} fills of the tmpfs ({:.1} MiB written by the filler in all): {unavailable} publishes answered `unavailable`, /healthz DEGRADED (disk full) in {} of them, OPERATIONAL again in {} (at most {back:.0} ms after the space returned)",
            self.fills,
            self.filled_bytes as f64 / (1024.0 * 1024.0),
            self.degraded,
            self.operational_again
        ));
        Ok(())
    }
}

const BAD_STATE: &str = "corrupt_state_recovery";

pub(crate) const CORRUPT_STATE_RECOVERY: Scenario = Scenario {
    name: BAD_STATE,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "000/004",
        test: "test_corrupt_state_recovery; invalid state rows",
        threshold: "corrupt state handled gracefully: logged, no crash at startup",
    },
    what: "sessions publish, some connected and some not; the relay is SIGKILLed; seeded sessions get invalid state values written into the database; the relay restarts on it",
    target: "the relay starts and logs each invalid row; those sessions CRASHED with a notice naming the bad state, connected ones CRASHED, the others DETACHED; every acknowledged message still there",
    needs_process: Some("SIGKILLs the relay and writes into its database"),
    thresholds: |plan| {
        vec![
            Threshold::all("started"),
            Threshold::all("logged_ratio"),
            Threshold::all("notices_ok_ratio"),
            Threshold::all("messages_kept_ratio"),
            Threshold::exact("corrupted", plan.num("corrupted")),
        ]
    },
    plan: |input: &PlanInput| {
        let sessions = input.scale.pick(6, 50);
        let corrupted = input.scale.pick(3, 10);
        let mut plan = input.plan(
            BAD_STATE,
            &params(&[
                ("sessions", sessions as f64),
                ("corrupted", corrupted as f64),
                ("messages_each", 10.0),
            ]),
        );
        let bad = ["INVALID", "", "active", "CRASHED\u{0}", "9", "DETACHED "];
        let mut rng = input.rng(BAD_STATE, "rows");
        let mut chosen: Vec<usize> = (0..sessions).collect();
        for i in 0..corrupted {
            let j = rng.random_range(i..sessions);
            chosen.swap(i, j);
            plan.actions.push(Action {
                at_ms: 0,
                duration_ms: 0,
                kind: "bad_state".into(),
                target: format!("session {}", chosen[i]),
                params: json!({"session": chosen[i], "state": bad[rng.random_range(0..bad.len())]}),
            });
        }
        plan
    },
    run: body!(run_bad_state),
    budget: Duration::from_secs(120),
};

async fn run_bad_state(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let mut relay = ctx.relay(RelayOptions::default()).await?;
    let r = &ctx.recorder;
    let n = plan.count("sessions");
    let each = plan.count("messages_each");
    let channel = "corrupt:0";
    // Even sessions stay connected through the kill; odd ones leave first.
    let mut live = Vec::new();
    let mut tokens = Vec::new();
    let mut acked = 0u64;
    for i in 0..n {
        let client = Client::connect(ClientConfig::new(&relay.url()))
            .await
            .map_err(|e| setup("session", e))?;
        for k in 0..each {
            crate::workload::sdk_publish(
                &client,
                r,
                (i as u32, 1),
                channel,
                k as u64 + 1,
                &json!({ "k": k }),
                Duration::from_secs(30),
            )
            .await
            .map_err(|e| setup("publish", e))?;
            acked += 1;
        }
        tokens.push((
            client.session_id().unwrap_or_default(),
            client.token().unwrap_or_default(),
        ));
        if i % 2 == 0 {
            live.push(client);
        } else {
            client.close().await;
        }
    }
    // The closed ones are DETACHED in the database before the kill: the
    // relay has seen their connections end.
    let want = live.len() as f64;
    let settled = super::wait_until(
        Duration::from_secs(5),
        Duration::from_millis(10),
        || async {
            let text = crate::fixture::http_get(relay.addr(), "/healthz")
                .await
                .unwrap_or_default();
            text.contains(&format!("\"connections\":{want}"))
        },
    )
    .await;
    if !settled {
        return Err(setup(
            "closing sessions",
            "the relay still counted them after 5 s",
        ));
    }
    let t_kill = r.now();
    relay.kill9().await?;
    // Gone with the relay: closed before it returns, so that they do not
    // reconnect (their next welcome is checked below).
    for c in live {
        c.close().await;
    }
    // The bad rows, written into the database the killed relay left.
    let db = relay.data_dir().join("keel.db");
    let bad: Vec<(usize, String)> = plan
        .actions
        .iter()
        .map(|a| {
            (
                a.params["session"].as_u64().unwrap_or(0) as usize,
                a.params["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    {
        let (db, bad, tokens) = (db.clone(), bad.clone(), tokens.clone());
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let conn = rusqlite::Connection::open(&db).map_err(|e| e.to_string())?;
            for (i, state) in &bad {
                conn.execute(
                    "UPDATE sessions SET state = ?1 WHERE id = ?2",
                    rusqlite::params![state, tokens[*i].0],
                )
                .map_err(|e| e.to_string())?;
            }
            Ok(())
        })
        .await
        .map_err(|e| setup("corrupt", e))?
        .map_err(|e| setup("corrupt", e))?;
    }
    let started = relay.restart().await.is_ok();
    r.fault("bad_state", "sessions table", t_kill, r.now());
    let log = std::fs::read_to_string(ctx.dir.join("relay-1.log")).unwrap_or_default();
    // keel-recovery's error line for each: "session had an unknown stored
    // state; marked CRASHED", naming the session.
    let logged = bad
        .iter()
        .filter(|(i, _)| {
            log.lines()
                .any(|l| l.contains("unknown stored state") && l.contains(&tokens[*i].0))
        })
        .count();
    // Every session's next welcome, and the bad ones' notices.
    let mut notices_ok = 0;
    for (i, (id, token)) in tokens.iter().enumerate() {
        let mut config = ClientConfig::new(&relay.url());
        config.token = Some(token.clone());
        let mut c = Client::connect(config)
            .await
            .map_err(|e| setup("resume", e))?;
        let corrupted = bad.iter().find(|(b, _)| *b == i).map(|(_, s)| s.clone());
        let expected = if corrupted.is_some() || i % 2 == 0 {
            "CRASHED"
        } else {
            "DETACHED"
        };
        let mut observed = String::from("no welcome");
        let mut notice_ok = false;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Ok(Some(e)) = tokio::time::timeout_at(deadline, c.next_event()).await {
            match e {
                keel_relay::client::Event::Welcome { state, .. } => {
                    observed = state;
                    if corrupted.is_none() {
                        break;
                    }
                }
                keel_relay::client::Event::Deliver { payload, .. }
                    if payload["type"] == "session_crashed" =>
                {
                    notice_ok = Some(payload["previous_state"].as_str().unwrap_or("?"))
                        == corrupted.as_deref();
                    break;
                }
                _ => {}
            }
        }
        notices_ok += usize::from(notice_ok);
        r.state(StateCheck {
            client: i as u32,
            session: id.clone(),
            expected: expected.into(),
            observed,
            at: r.now(),
            after: After::Settled,
        });
        c.close().await;
    }
    // Every acknowledged message is still in the log.
    let mut reader = Client::connect(ClientConfig::new(&relay.url()))
        .await
        .map_err(|e| setup("reader", e))?;
    reader
        .subscribe(channel, Some(1))
        .await
        .map_err(|e| setup("subscribe", e))?;
    // It reads as a subscriber of the history: every acknowledged message
    // must reach it (the checker's `lost`), byte for byte.
    const READER: u32 = 500_000;
    let cid = r.channel(channel);
    r.expect(Expectation {
        sub: READER,
        channel: cid,
        from: 1,
    });
    let mut kept = 0u64;
    let mut batch = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while kept < acked {
        match tokio::time::timeout_at(deadline, reader.next_event()).await {
            Ok(Some(keel_relay::client::Event::Deliver {
                channel: c,
                offset,
                id,
                payload,
            })) if c == channel => {
                kept += 1;
                batch.push(crate::workload::sdk_delivery(
                    r,
                    (READER, 1),
                    cid,
                    offset,
                    &id,
                    &payload,
                ));
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    r.deliveries(&mut batch);
    reader.close().await;
    let k = bad.len().max(1) as f64;
    let mut m = Measured::default();
    m.set("started", f64::from(u8::from(started)))
        .set("corrupted", bad.len() as f64)
        .set("logged_ratio", logged as f64 / k)
        .set("notices_ok_ratio", notices_ok as f64 / k)
        .set("messages_kept_ratio", kept as f64 / acked.max(1) as f64);
    let states: Vec<String> = bad.iter().map(|(_, s)| format!("{s:?}")).collect();
    m.note(format!(
        "{} sessions, {} of them given invalid states ({}); the relay restarted: {started}; {logged} invalid rows named in its log; {notices_ok} session_crashed notices naming the bad state; {kept} of {acked} acknowledged messages kept",
        n,
        bad.len(),
        states.join(", ")
    ));
    Ok(m)
}

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
    needs_process: Some("SIGKILLs the relay and overwrites its database"),
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
