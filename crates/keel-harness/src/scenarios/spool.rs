//! Seed 004's burn-in: spool jobs at a steady rate, an upstream outage on
//! the way (health transitions), then idle.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde_json::json;

use super::{body, params, setup};
use crate::Error;
use crate::client::{PayloadCheck, SubscriberSpec, spawn_subscriber};
use crate::fixture::RelayOptions;
use crate::history::{Digest, Micros, Outcome, Publish};
use crate::load::{Latency, Schedule};
use crate::scenario::{Action, Ctx, Measured, Plan, PlanInput, Scenario, SeedRef, Suite};
use crate::threshold::{Bound, Threshold};

const BURN: &str = "burn_in";

pub(crate) const BURN_IN: Scenario = Scenario {
    name: BURN,
    suite: Suite::Load,
    seed: SeedRef {
        seed: "004",
        test: "Phase 1 burn-in (tests 1 and 2)",
        threshold: "job latency p95 < 500 ms, 0 duplicates, 0 stale claims, failed notifications < 0.1%, idle CPU < 2%",
    },
    what: "publish jobs dropped into the relay's spool directory at a steady rate, through an upstream outage (health DEGRADED and back, logged), then idle: results, claims, the channel and the health log checked",
    target: "p95 < 20 ms, 0 failed, 0 duplicates, 0 stale claims, health log a valid chain, idle CPU < 0.5%",
    needs_process: Some("gives the relay its own spool directory and mock upstream"),
    thresholds: |_| {
        vec![
            Threshold::new("job_p95_ms", "ms", Some(Bound::Le(500.0)), Bound::Le(20.0)),
            Threshold::zero("duplicates"),
            Threshold::zero("stale_claims"),
            Threshold::new("failed_ratio", "", Some(Bound::Le(0.001)), Bound::Le(0.0)),
            Threshold::all("completed_ratio"),
            Threshold::exact("health_log_valid", 1.0),
            Threshold::new(
                "idle_cpu_percent",
                "%",
                Some(Bound::Le(2.0)),
                Bound::Le(0.5),
            ),
        ]
    },
    plan: plan_burn_in,
    run: body!(run_burn_in),
    budget: Duration::from_secs(240),
};

fn plan_burn_in(input: &PlanInput) -> Plan {
    let rate = input.scale.pick(50, 20) as f64;
    let secs = input
        .duration
        .unwrap_or_else(|| {
            input
                .scale
                .duration(Duration::from_secs(4), Duration::from_secs(60))
        })
        .as_secs_f64();
    let idle = input
        .scale
        .duration(Duration::from_secs(3), Duration::from_secs(20))
        .as_secs_f64();
    let mut plan = input.plan(
        BURN,
        &params(&[
            ("jobs_per_second", rate),
            ("seconds", secs),
            ("idle_seconds", idle),
        ]),
    );
    // One upstream outage in the middle third, a fifth of the run long.
    let mut rng = input.rng(BURN, "outage");
    let at = secs * (1.0 / 3.0 + rand::Rng::random_range(&mut rng, 0.0..1.0 / 3.0));
    plan.actions.push(Action {
        at_ms: (at * 1000.0) as u64,
        duration_ms: (secs * 200.0) as u64,
        kind: "upstream_down".into(),
        target: "mock upstream".into(),
        params: json!({}),
    });
    plan
}

async fn run_burn_in(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let spool = tempfile::Builder::new()
        .prefix("keel-spool-")
        .tempdir()
        .map_err(|e| Error::io("create the spool directory", e))?;
    let up = keel_faults::MockUpstream::start(keel_faults::UpstreamConfig::default())
        .await
        .map_err(|e| setup("mock upstream", e))?;
    let mut relay = ctx
        .relay(RelayOptions {
            upstream: Some(up.url()),
            spool: Some(spool.path().to_path_buf()),
            ..Default::default()
        })
        .await?;
    let (rate, secs) = (plan.num("jobs_per_second"), plan.num("seconds"));
    let channel = "burn-in";
    let cid = ctx.recorder.channel(channel);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (progress, reader) = spawn_subscriber(
        SubscriberSpec {
            sub: 1,
            url: relay.url(),
            source: None,
            channels: vec![(channel.to_owned(), 1)],
            read_delay: None,
            resume: true,
            payloads: PayloadCheck::None,
            stop_after: None,
        },
        ctx.recorder.clone(),
        stop,
        Duration::from_secs(1),
    );
    let watcher = ResultWatcher::start(spool.path(), &ctx.recorder)?;
    let schedule = Schedule::constant(rate, Duration::from_secs_f64(secs));
    let intended = schedule.intended();
    let n = intended.len();
    let start = tokio::time::Instant::now();
    ctx.phase("jobs at a steady rate");
    // The outage runs beside the jobs.
    let outage = plan
        .actions
        .iter()
        .find(|a| a.kind == "upstream_down")
        .cloned();
    let recorder = ctx.recorder.clone();
    let fault = async {
        if let Some(a) = outage {
            tokio::time::sleep_until(start + Duration::from_millis(a.at_ms)).await;
            let t0 = recorder.now();
            up.set_mode(keel_faults::UpstreamMode::Down);
            tokio::time::sleep(Duration::from_millis(a.duration_ms)).await;
            up.set_mode(keel_faults::UpstreamMode::Normal);
            recorder.fault("upstream_down", "mock upstream", t0, recorder.now());
        }
    };
    let dir = spool.path().to_path_buf();
    let mut written: HashMap<String, Micros> = HashMap::new();
    let jobs = async {
        for (i, t) in intended.iter().enumerate() {
            tokio::time::sleep_until(start + *t).await;
            let job = format!("j{i:06}");
            let body =
                json!({"job_id": job, "type": "publish", "channel": channel, "payload": {"i": i}})
                    .to_string();
            // Written aside and renamed in, as a producer must: the relay
            // only takes whole files.
            let tmp = dir.join(format!(".{job}.tmp"));
            if std::fs::write(&tmp, body)
                .and_then(|_| std::fs::rename(&tmp, dir.join(format!("{job}.job.json"))))
                .is_ok()
            {
                written.insert(job, recorder.now());
            }
        }
    };
    tokio::join!(fault, jobs);
    ctx.phase("waiting for every result");
    let results = watcher.collect(n, Duration::from_secs(30)).await;
    let mut latency = Latency::default();
    let (mut ok, mut failed, mut duplicates) = (0u64, 0u64, 0u64);
    let mut times = Vec::new();
    for (job, (seen, text)) in &results {
        let Some(at) = written.get(job) else { continue };
        let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
        let good = v["status"] == "ok";
        if good {
            ok += 1;
        } else {
            failed += 1;
        }
        if v["duplicate"] == true {
            duplicates += 1;
        }
        latency.record(Duration::from_micros(*at), seen.saturating_sub(*at));
        times.push(*seen as f64 / 1e6);
        // Each job is its own "connection": the spool handles jobs side by
        // side and promises no order between them.
        let conn = job.trim_start_matches('j').parse().unwrap_or(0);
        ctx.recorder.publish(Publish {
            client: 0,
            conn,
            channel: cid,
            id: ctx.recorder.id(&format!("spool-{job}")),
            invoke: *at,
            done: *seen,
            outcome: if good {
                Outcome::Ok {
                    offset: v["offset"].as_u64().unwrap_or(0),
                }
            } else {
                Outcome::Fail {
                    code: v["status"].to_string(),
                }
            },
            // The job's payload, as the spool publishes it.
            digest: Digest::of(&json!({ "i": conn }).to_string()),
        });
    }
    // Every job's message in the channel, once: the subscriber must have them.
    super::wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        let p = progress.clone();
        async move { p.get() >= ok }
    })
    .await;
    let _ = stop_tx.send(true);
    let _ = reader.await;
    ctx.phase("idle");
    let idle = plan.num("idle_seconds");
    let idle_from = ctx.recorder.now() as f64 / 1e6;
    tokio::time::sleep(Duration::from_secs_f64(idle)).await;
    let idle_to = ctx.recorder.now() as f64 / 1e6;
    let cpu = idle_cpu_percent(ctx, idle_from + 0.5, idle_to);
    let stale = count_suffix(spool.path(), ".claimed");
    let failed_dir = count_suffix(&spool.path().join("failed"), ".job.json");
    ctx.phase("graceful stop and the health log");
    relay.terminate().await?;
    let doctor = run_doctor(ctx, &relay.data_dir()).await?;
    let valid = doctor
        .lines()
        .any(|l| l.starts_with("health log:") && l.contains("chain valid"));
    let mut m = Measured::default();
    m.set("jobs", n as f64)
        .set("completed_ratio", ok as f64 / n.max(1) as f64)
        .set(
            "failed_ratio",
            (failed + failed_dir as u64) as f64 / n.max(1) as f64,
        )
        .set("duplicates", duplicates as f64)
        .set("stale_claims", stale as f64)
        .set("job_p50_ms", latency.ms(0.5))
        .set("job_p95_ms", latency.ms(0.95))
        .set("job_max_ms", latency.ms(1.0))
        .set("idle_cpu_percent", cpu)
        .set("health_log_valid", f64::from(u8::from(valid)));
    m.note(format!(
        "{n} jobs at {rate}/s for {secs:.0} s; idle {idle:.0} s at {cpu:.2}% CPU"
    ));
    if let Some(line) = doctor.lines().find(|l| l.starts_with("health log:")) {
        m.note(format!("doctor: {line}"));
    }
    m.throughput = super::rate_series(&times);
    m.latency = Some(latency);
    Ok(m)
}

/// CPU use of the relay between `from` and `to` (run seconds), % of one core.
fn idle_cpu_percent(ctx: &Ctx, from: f64, to: f64) -> f64 {
    let samples: Vec<_> = ctx
        .resources
        .samples()
        .into_iter()
        .filter(|(t, _)| *t >= from && *t <= to)
        .collect();
    match (samples.first(), samples.last()) {
        (Some((t0, a)), Some((t1, b))) if t1 > t0 => {
            b.cpu_time.saturating_sub(a.cpu_time).as_secs_f64() / (t1 - t0) * 100.0
        }
        _ => 0.0,
    }
}

fn count_suffix(dir: &Path, suffix: &str) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.ends_with(suffix))
                .count()
        })
        .unwrap_or(0)
}

/// `keel-relay doctor --data DIR` with the scenario's relay binary.
async fn run_doctor(ctx: &Ctx, data: &Path) -> Result<String, Error> {
    let crate::fixture::Target::Spawn(bin) = &ctx.target else {
        return Ok(String::new());
    };
    let out = tokio::process::Command::new(&bin.program)
        .args(&bin.prefix)
        .arg("doctor")
        .arg("--data")
        .arg(data)
        .output()
        .await
        .map_err(|e| Error::io("run keel-relay doctor", e))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Watches a spool directory for `*.result.json` with inotify (a blocking
/// read on a thread of its own), stamping each the moment it appears. The
/// thread ends when the directory is removed (the kernel then ends the
/// watch) or nobody listens any more.
struct ResultWatcher {
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, Micros, String)>,
}

impl ResultWatcher {
    fn start(dir: &Path, recorder: &crate::history::Recorder) -> Result<ResultWatcher, Error> {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let inotify =
            Inotify::init(InitFlags::IN_CLOEXEC).map_err(|e| Error::io("inotify", e.into()))?;
        inotify
            .add_watch(
                dir,
                AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE,
            )
            .map_err(|e| Error::io("watch the spool directory", e.into()))?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (dir, recorder) = (dir.to_path_buf(), recorder.clone());
        std::thread::Builder::new()
            .name("keel-harness-spool-watch".into())
            .spawn(move || {
                while let Ok(events) = inotify.read_events() {
                    for e in events {
                        if e.mask.contains(AddWatchFlags::IN_IGNORED) {
                            return;
                        }
                        let Some(name) = e.name.and_then(|n| n.into_string().ok()) else {
                            continue;
                        };
                        let Some(job) = name.strip_suffix(".result.json") else {
                            continue;
                        };
                        let seen = recorder.now();
                        let text = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
                        if tx.send((job.to_owned(), seen, text)).is_err() {
                            return;
                        }
                    }
                }
            })
            .map_err(|e| Error::io("start the spool watcher", e))?;
        Ok(ResultWatcher { rx })
    }

    /// Collects up to `n` results (or until `limit` passes without one):
    /// job -> (run-clock micros when seen, the result's text).
    async fn collect(mut self, n: usize, limit: Duration) -> HashMap<String, (Micros, String)> {
        let mut out = HashMap::new();
        while out.len() < n {
            match tokio::time::timeout(limit, self.rx.recv()).await {
                Ok(Some((job, seen, text))) => {
                    out.entry(job).or_insert((seen, text));
                }
                _ => break,
            }
        }
        out
    }
}
