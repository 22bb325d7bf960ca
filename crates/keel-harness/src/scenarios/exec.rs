//! Exec-session faults (seed 002's process termination): supervised
//! children of the relay and what is left of them after a kill.
//! `process_kill_during_command` SIGKILLs sessions' children mid-command
//! from outside; `no_orphans` SIGKILLs the relay while sessions' children
//! and their own children run, restarts it, and looks for survivors.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use keel_recovery::procfs::group_members;
use keel_relay::client::{Client, ClientConfig, Event};
use rand::Rng;
use serde_json::{Value, json};

use super::{body, params, setup, wait_until};
use crate::Error;
use crate::fixture::RelayOptions;
use crate::history::{After, StateCheck};
use crate::scenario::{Action, Ctx, Measured, Plan, PlanInput, Scenario, SeedRef, Suite};
use crate::threshold::{Bound, Threshold};

/// The commands the exec scenarios start: `work` takes one command per
/// line and works on it in a background `sleep` it waits for; `tree`
/// starts two background `sleep`s and reads its stdin.
const EXEC_CONFIG: &str = r#"[exec]
enabled = true
max_children = 256
detach_grace_ms = 60000
[[exec.allow]]
name = "work"
program = "sh"
args = ["-c", "while read l; do echo \"working on $l\"; sleep 30 & wait; done"]
[[exec.allow]]
name = "tree"
program = "sh"
args = ["-c", "sleep 300 & sleep 300 & echo ready; while read l; do :; done"]
"#;

/// How long the harness waits for a notice or for a process group to go.
const WAIT: Duration = Duration::from_secs(10);

const KILL_CMD: &str = "process_kill_during_command";

pub(crate) const PROCESS_KILL_DURING_COMMAND: Scenario = Scenario {
    name: KILL_CMD,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "002",
        test: "process termination: kill agents in various states",
        threshold: "clean termination, no orphaned processes, database consistent",
    },
    what: "sessions run a supervised child working on a command (with a child of its own); each child is SIGKILLed from outside at a seeded moment mid-command while another session publishes",
    target: "each session told child_exited (signal 9) within 500 ms (p95), CRASHED on its next welcome, the child's whole process group gone; the relay and the other session unaffected",
    needs_process: Some("starts the relay with a command allowed to run and SIGKILLs its children"),
    thresholds: |plan| {
        vec![
            Threshold::exact("kills", plan.num("sessions")),
            Threshold::all("notices_ok_ratio"),
            Threshold::all("groups_gone_ratio"),
            Threshold::zero("control_publish_errors"),
            Threshold::new("notice_p95_ms", "ms", None, Bound::Le(500.0)),
        ]
    },
    plan: plan_kill_cmd,
    run: body!(run_kill_cmd),
    budget: Duration::from_secs(300),
};

fn plan_kill_cmd(input: &PlanInput) -> Plan {
    let sessions = input.scale.pick(3, 20);
    let mut plan = input.plan(KILL_CMD, &params(&[("sessions", sessions as f64)]));
    let mut rng = input.rng(KILL_CMD, "kills");
    for s in 0..sessions {
        plan.actions.push(Action {
            at_ms: rng.random_range(50..=1_000),
            duration_ms: 0,
            kind: "kill9_child".into(),
            target: format!("session {s}'s child"),
            params: json!({"session": s}),
        });
    }
    plan.actions.sort_by_key(|a| a.at_ms);
    plan
}

/// The next payload of the session's own channel of type `kind`.
async fn next_notice(client: &mut Client, kind: &str) -> Result<Value, Error> {
    let private = format!("session:{}", client.session_id().unwrap_or_default());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, client.next_event()).await {
            Ok(Some(Event::Deliver {
                channel, payload, ..
            })) if channel == private && payload["type"] == kind => return Ok(payload),
            Ok(Some(_)) => {}
            Ok(None) => return Err(setup(kind, "the client closed")),
            Err(_) => return Err(setup(kind, format!("no {kind} within {WAIT:?}"))),
        }
    }
}

/// What one killed session saw.
struct KillSeen {
    notice_ok: bool,
    notice_ms: f64,
    group_gone: bool,
}

async fn run_kill_cmd(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let relay = ctx
        .relay(RelayOptions {
            config: format!("\n{EXEC_CONFIG}"),
            ..Default::default()
        })
        .await?;
    let r = &ctx.recorder;
    let url = relay.url();

    // Another session publishes all along: it must not notice.
    let stop = Arc::new(AtomicBool::new(false));
    let control_errors = Arc::new(AtomicU64::new(0));
    let control = {
        let (url, stop, errors) = (url.clone(), stop.clone(), control_errors.clone());
        let client = Client::connect(ClientConfig::new(&url))
            .await
            .map_err(|e| setup("control session", e))?;
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                n += 1;
                let ok = tokio::time::timeout(
                    WAIT,
                    client.publish("control", &format!("c-{n}"), &json!(n)),
                )
                .await;
                if !matches!(ok, Ok(Ok(_))) {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            client.close().await;
            n
        })
    };

    ctx.phase("children working");
    let mut tasks = Vec::new();
    for a in &plan.actions {
        let (url, r) = (url.clone(), r.clone());
        let n = a.params["session"].as_u64().unwrap_or(0) as u32;
        let after = Duration::from_millis(a.at_ms);
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(ClientConfig::new(&url))
                .await
                .map_err(|e| setup("exec session", e))?;
            let (token, session) = (
                client.token().unwrap_or_default(),
                client.session_id().unwrap_or_default(),
            );
            client.exec("work").await.map_err(|e| setup("exec", e))?;
            let started = next_notice(&mut client, "exec_started").await?;
            let pid = started["pid"].as_u64().unwrap_or(0) as u32;
            client
                .publish(
                    &format!("session:{session}"),
                    &format!("job-{n}"),
                    &json!({"job": n}),
                )
                .await
                .map_err(|e| setup("command", e))?;
            let out = next_notice(&mut client, "exec_output").await?;
            let working = out["line"].as_str().unwrap_or("").starts_with("working on");
            // Mid-command: the child waits for its background sleep.
            let had_descendants = wait_until(WAIT, Duration::from_millis(10), || async {
                group_members(pid).len() >= 2
            })
            .await;
            tokio::time::sleep(after).await;
            let t_kill = r.now();
            let killed = tokio::time::Instant::now();
            keel_faults::process::kill9(pid).map_err(|e| setup("SIGKILL the child", e))?;
            let exited = next_notice(&mut client, "child_exited").await?;
            let notice_ms = killed.elapsed().as_secs_f64() * 1000.0;
            r.fault(
                "kill9_child",
                &format!("session {n}'s child"),
                t_kill,
                r.now(),
            );
            let notice_ok =
                working && had_descendants && exited["signal"] == 9 && exited["crash_count"] == 1;
            let group_gone = wait_until(WAIT, Duration::from_millis(10), || async {
                group_members(pid).is_empty()
            })
            .await;
            client.close().await;
            // Its next welcome says CRASHED.
            let mut config = ClientConfig::new(&url);
            config.token = Some(token);
            let mut again = Client::connect(config)
                .await
                .map_err(|e| setup("resume", e))?;
            let observed = match tokio::time::timeout(WAIT, again.next_event()).await {
                Ok(Some(Event::Welcome { state, .. })) => state,
                other => format!("no welcome: {other:?}"),
            };
            r.state(StateCheck {
                client: n,
                session,
                expected: "CRASHED".into(),
                observed,
                at: r.now(),
                after: After::Settled,
            });
            again.close().await;
            Ok::<_, Error>(KillSeen {
                notice_ok,
                notice_ms,
                group_gone,
            })
        }));
    }
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.map_err(|e| setup("exec session task", e))??);
    }
    stop.store(true, Ordering::Release);
    let published = control.await.map_err(|e| setup("control task", e))?;

    let n = seen.len().max(1) as f64;
    let mut ms: Vec<f64> = seen.iter().map(|s| s.notice_ms).collect();
    ms.sort_by(f64::total_cmp);
    let p95 = ms
        .get(((ms.len() as f64 * 0.95).ceil() as usize).saturating_sub(1))
        .copied()
        .unwrap_or(0.0);
    let notices_ok = seen.iter().filter(|s| s.notice_ok).count();
    let gone = seen.iter().filter(|s| s.group_gone).count();
    let mut m = Measured::default();
    m.set("kills", seen.len() as f64)
        .set("notices_ok_ratio", notices_ok as f64 / n)
        .set("groups_gone_ratio", gone as f64 / n)
        .set(
            "control_publish_errors",
            control_errors.load(Ordering::Relaxed) as f64,
        )
        .set("notice_p95_ms", p95)
        .set("notice_max_ms", ms.last().copied().unwrap_or(0.0));
    m.note(format!(
        "{} children SIGKILLed mid-command: {notices_ok} child_exited notices with signal 9 and crash_count 1 (p95 {p95:.1} ms after the kill), {gone} process groups gone; the control session published {published} times, {} failed",
        seen.len(),
        control_errors.load(Ordering::Relaxed)
    ));
    Ok(m)
}

const ORPHANS: &str = "no_orphans";

pub(crate) const NO_ORPHANS: Scenario = Scenario {
    name: ORPHANS,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "002",
        test: "process termination: resource cleanup",
        threshold: "no orphaned processes",
    },
    what: "sessions run supervised children that start background processes of their own; the relay is SIGKILLed, restarted on the same data, and every process of those groups is looked for; repeat (--iterations)",
    target: "no process of any child's group alive 5 s after the restart (the parent-death signal takes the children, the restart reaps the rest)",
    needs_process: Some("SIGKILLs and restarts the relay and looks for its children's processes"),
    thresholds: |plan| {
        vec![
            Threshold::exact("groups", plan.num("iterations") * plan.num("sessions")),
            Threshold::new(
                "processes_seen",
                "",
                Some(Bound::Ge(
                    3.0 * plan.num("iterations") * plan.num("sessions"),
                )),
                Bound::Ge(3.0 * plan.num("iterations") * plan.num("sessions")),
            ),
            Threshold::zero("orphans"),
        ]
    },
    plan: plan_orphans,
    run: body!(run_orphans),
    budget: Duration::from_secs(300),
};

fn plan_orphans(input: &PlanInput) -> Plan {
    let iterations = input
        .iterations
        .unwrap_or_else(|| input.scale.pick(2, 5))
        .max(1);
    let mut plan = input.plan(
        ORPHANS,
        &params(&[
            ("iterations", iterations as f64),
            ("sessions", input.scale.pick(3, 10) as f64),
        ]),
    );
    let mut rng = input.rng(ORPHANS, "kills");
    let mut at = 0;
    for k in 0..iterations {
        at += rng.random_range(200..=1_000);
        plan.actions.push(Action {
            at_ms: at,
            duration_ms: 0,
            kind: "kill9".into(),
            target: "relay".into(),
            params: json!({"kill": k + 1}),
        });
    }
    plan
}

async fn run_orphans(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let mut relay = ctx
        .relay(RelayOptions {
            config: format!("\n{EXEC_CONFIG}"),
            ..Default::default()
        })
        .await?;
    let r = &ctx.recorder;
    let (mut groups, mut seen, mut orphans) = (0usize, 0usize, 0usize);
    let mut after_kill = 0usize;
    let mut reap_ms: Vec<f64> = Vec::new();
    let mut previous = 0;
    for a in &plan.actions {
        ctx.phase(&format!("children, then {} {}", a.kind, a.params["kill"]));
        let mut clients = Vec::new();
        let mut pgids = Vec::new();
        for _ in 0..plan.count("sessions") {
            let mut client = Client::connect(ClientConfig::new(&relay.url()))
                .await
                .map_err(|e| setup("exec session", e))?;
            client.exec("tree").await.map_err(|e| setup("exec", e))?;
            let started = next_notice(&mut client, "exec_started").await?;
            let pid = started["pid"].as_u64().unwrap_or(0) as u32;
            next_notice(&mut client, "exec_output").await?;
            pgids.push(pid);
            clients.push(client);
        }
        // sh and its two sleeps, each group.
        wait_until(WAIT, Duration::from_millis(10), || {
            let pgids = &pgids;
            async move { pgids.iter().all(|g| group_members(*g).len() >= 3) }
        })
        .await;
        groups += pgids.len();
        seen += pgids.iter().map(|g| group_members(*g).len()).sum::<usize>();
        tokio::time::sleep(Duration::from_millis(a.at_ms - previous)).await;
        previous = a.at_ms;
        let t_kill = r.now();
        relay.kill9().await?;
        after_kill += pgids.iter().map(|g| group_members(*g).len()).sum::<usize>();
        let restarted = tokio::time::Instant::now();
        relay.restart().await?;
        let clean = wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
            let pgids = &pgids;
            async move { pgids.iter().all(|g| group_members(*g).is_empty()) }
        })
        .await;
        reap_ms.push(restarted.elapsed().as_secs_f64() * 1000.0);
        r.fault("kill9", "relay", t_kill, r.now());
        if !clean {
            orphans += pgids.iter().map(|g| group_members(*g).len()).sum::<usize>();
        }
        for c in clients {
            c.close().await;
        }
    }
    let max_reap = reap_ms.iter().copied().fold(0.0, f64::max);
    let mut m = Measured::default();
    m.set("groups", groups as f64)
        .set("processes_seen", seen as f64)
        .set("alive_right_after_kill", after_kill as f64)
        .set("orphans", orphans as f64)
        .set("restart_to_clean_max_ms", max_reap);
    m.note(format!(
        "{groups} process groups ({seen} processes) under {} relay kills; {after_kill} still alive right after the kills; {orphans} alive 5 s after the restarts; restart to no survivor at most {max_reap:.0} ms",
        plan.actions.len()
    ));
    Ok(m)
}
