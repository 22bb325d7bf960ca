//! `memory_pressure` (seed 002's memory exhaustion, seed 003's memory
//! saturation): the relay in a memory cgroup (cgroup v1 `memory`, where the
//! machine has it; else RLIMIT_AS through `prlimit`) whose limit is far
//! below what buffering its traffic without bounds would need — large
//! payloads to subscribers that never read — must shed load by its byte
//! budgets and stay up, beside a calm client.

use std::path::PathBuf;
use std::time::Duration;

use futures::SinkExt;
use keel_relay::client::{Client, ClientConfig};
use serde_json::json;

use super::{body, params, setup};
use crate::Error;
use crate::fixture::RelayOptions;
use crate::scenario::{Action, Ctx, Measured, Plan, PlanInput, Scenario, SeedRef, Suite};
use crate::threshold::{Bound, Threshold};
use crate::workload::Calm;

const MEMORY: &str = "memory_pressure";

pub(crate) const MEMORY_PRESSURE: Scenario = Scenario {
    name: MEMORY,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "002/003",
        test: "memory exhaustion: agents under memory limits",
        threshold: "the system remains stable under memory pressure; no OOM crash",
    },
    what: "the relay in a memory cgroup limited to its idle RSS + 128 MiB (a 64 MiB global buffer budget); four publishers send 512 KiB payloads every 40 ms to a channel that 20 subscribers never read (unbounded buffering would hold everything published, more than the limit), beside a calm client",
    target: "no OOM kill and the process up throughout, its peak memory under the limit, the non-readers shed as slow consumers, the calm client without an error or a loss",
    needs_process: Some("runs the relay in a memory cgroup it makes"),
    thresholds: |plan| {
        let mut t = vec![
            Threshold::all("stayed_up"),
            Threshold::zero("oom_kills"),
            Threshold::new("peak_over_limit", "x", Some(Bound::Le(1.0)), Bound::Le(0.9)),
            Threshold::new("slow_consumers", "", Some(Bound::Ge(1.0)), Bound::Ge(1.0)),
            Threshold::zero("calm_errors"),
            Threshold::all("calm_delivered_ratio"),
        ];
        // More published than the limit holds: at full scale (a debug
        // build at small scale publishes too slowly to get there).
        if plan.scale != "small" {
            t.push(Threshold::new(
                "unbounded_need_over_limit",
                "x",
                None,
                Bound::Ge(1.0),
            ));
        }
        t
    },
    plan: |input: &PlanInput| {
        let load_ms = input.scale.pick(4_000, 8_000) as u64;
        let mut plan = input.plan(
            MEMORY,
            &params(&[
                ("headroom_mib", 128.0),
                ("global_buffer_mib", 64.0),
                ("non_readers", 20.0),
                ("publishers", 4.0),
                ("payload_kib", 512.0),
                ("publish_interval_ms", 40.0),
                ("load_ms", load_ms as f64),
            ]),
        );
        plan.actions.push(Action {
            at_ms: 0,
            duration_ms: load_ms,
            kind: "memory_limit".into(),
            target: "relay".into(),
            params: json!({}),
        });
        plan
    },
    run: body!(run_memory),
    budget: Duration::from_secs(180),
};

/// How the relay's memory is limited.
enum Limit {
    /// A cgroup v1 memory group (removed on drop).
    Cgroup(PathBuf),
    /// RLIMIT_AS on the process.
    AddressSpace,
}

impl Limit {
    /// Puts `pid` under `bytes`: a cgroup where possible, else RLIMIT_AS.
    fn apply(pid: u32, bytes: u64, name: &str) -> Result<Limit, Error> {
        let group = PathBuf::from("/sys/fs/cgroup/memory").join(name);
        let cgroup = std::fs::create_dir(&group)
            .and_then(|()| std::fs::write(group.join("memory.limit_in_bytes"), bytes.to_string()))
            .and_then(|()| std::fs::write(group.join("cgroup.procs"), pid.to_string()));
        if cgroup.is_ok() {
            return Ok(Limit::Cgroup(group));
        }
        let _ = std::fs::remove_dir(&group);
        // The address space holds far more than RSS (thread stacks, malloc
        // arenas): the limit goes on top of what it has mapped now.
        let vm = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmSize:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .unwrap_or(0)
            * 1024;
        let out = std::process::Command::new("prlimit")
            .arg("--pid")
            .arg(pid.to_string())
            .arg(format!("--as={}", vm + bytes))
            .output()
            .map_err(|e| setup("prlimit", e))?;
        if !out.status.success() {
            return Err(setup(
                "prlimit",
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        Ok(Limit::AddressSpace)
    }

    /// The cgroup's counter `file` (`memory.max_usage_in_bytes`, ...).
    fn read(&self, file: &str) -> Option<u64> {
        match self {
            Limit::Cgroup(g) => std::fs::read_to_string(g.join(file))
                .ok()?
                .trim()
                .parse()
                .ok(),
            Limit::AddressSpace => None,
        }
    }

    /// OOM kills in the group (cgroup v1 reports them in `memory.oom_control`).
    fn oom_kills(&self) -> u64 {
        match self {
            Limit::Cgroup(g) => std::fs::read_to_string(g.join("memory.oom_control"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("oom_kill "))
                        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                })
                .unwrap_or(0),
            Limit::AddressSpace => 0,
        }
    }
}

impl Drop for Limit {
    fn drop(&mut self) {
        // Removable once the relay in it is gone.
        if let Limit::Cgroup(g) = self {
            let _ = std::fs::remove_dir(g);
        }
    }
}

async fn run_memory(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let global = plan.num("global_buffer_mib") as u64;
    let mut relay = ctx
        .relay(RelayOptions {
            config: format!(
                "global_buffer_bytes = {}\nmax_outbound_bytes = {}\n",
                global << 20,
                4u64 << 20
            ),
            ..Default::default()
        })
        .await?;
    let pid = relay.pid();
    let idle = keel_faults::sample(pid, Duration::ZERO)
        .map(|s| s.rss_bytes)
        .unwrap_or(0);
    let limit_bytes = idle + ((plan.num("headroom_mib") as u64) << 20);
    let limit = Limit::apply(
        pid,
        limit_bytes,
        &format!("keel-{}-{}", std::process::id(), pid),
    )?;
    let how = match &limit {
        Limit::Cgroup(_) => "a cgroup v1 memory limit",
        Limit::AddressSpace => "RLIMIT_AS (no memory cgroup here)",
    };
    let epoch = tokio::time::Instant::from_std(ctx.recorder.epoch());
    let calm = Calm::start(&relay.url(), epoch, &ctx.recorder).await?;
    let channel = "memory:big";
    // The non-readers: subscribed, never reading again.
    let mut held = Vec::new();
    for i in 0..plan.count("non_readers") {
        let (mut ws, _) =
            crate::client::open_session(&relay.url(), crate::client::source_ip(i)).await?;
        ws.send(crate::client::text(
            &json!({"type": "subscribe", "channel": channel, "from": 1}),
        ))
        .await
        .map_err(|e| setup("subscribe", e))?;
        held.push(ws);
    }
    ctx.phase("large payloads to non-readers");
    let t0 = ctx.recorder.now();
    let load = Duration::from_millis(plan.num("load_ms") as u64);
    let payload = "x".repeat((plan.num("payload_kib") as usize) << 10);
    let interval = Duration::from_millis(plan.num("publish_interval_ms") as u64);
    let mut pubs = Vec::new();
    for p in 0..plan.count("publishers") {
        let (url, payload) = (relay.url(), payload.clone());
        pubs.push(tokio::spawn(async move {
            let client = Client::connect(ClientConfig::new(&url))
                .await
                .map_err(|e| setup("publisher", e))?;
            let started = tokio::time::Instant::now();
            let (mut bytes, mut n) = (0u64, 0u64);
            while started.elapsed() < load {
                n += 1;
                let ok = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.publish(channel, &format!("big-{p}-{n}"), &json!({"pad": payload})),
                )
                .await;
                if matches!(ok, Ok(Ok(_))) {
                    bytes += payload.len() as u64;
                }
                tokio::time::sleep(interval).await;
            }
            client.close().await;
            Ok::<_, Error>(bytes)
        }));
    }
    let mut peak_rss = 0u64;
    let mut alive = true;
    let until = tokio::time::Instant::now() + load;
    while tokio::time::Instant::now() < until {
        match keel_faults::sample(pid, Duration::ZERO) {
            Ok(s) => peak_rss = peak_rss.max(s.rss_bytes),
            Err(_) => alive = false,
        }
        alive &= keel_faults::process::is_alive(pid);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut published = 0u64;
    for p in pubs {
        published += p
            .await
            .map_err(|e| setup("publisher task", e))?
            .unwrap_or(0);
    }
    ctx.recorder
        .fault("memory_limit", "relay", t0, ctx.recorder.now());
    alive &= keel_faults::process::is_alive(pid);
    let slow = if alive {
        relay
            .metric("keel_slow_consumers_total")
            .await
            .unwrap_or(0.0)
    } else {
        0.0
    };
    let mut m = Measured::default();
    calm.finish(&mut m).await?;
    drop(held);
    // The process's own peak (VmHWM); the cgroup's figure also counts the
    // page cache of the database files it wrote, which the kernel reclaims.
    let peak = keel_faults::sample(pid, Duration::ZERO)
        .map(|s| s.peak_rss_bytes)
        .unwrap_or(0)
        .max(peak_rss);
    let group_peak = limit.read("memory.max_usage_in_bytes");
    let oom = limit.oom_kills();
    // Unread by anyone: holding it all (one copy, shared by the readers)
    // is what unbounded buffering would take.
    let need = published;
    m.set("stayed_up", f64::from(u8::from(alive)))
        .set("oom_kills", oom as f64)
        .set("peak_over_limit", peak as f64 / limit_bytes as f64)
        .set(
            "unbounded_need_over_limit",
            need as f64 / limit_bytes as f64,
        )
        .set("slow_consumers", slow)
        .set("peak_mib", peak as f64 / f64::from(1 << 20));
    m.note(format!(
        "{how} of {:.0} MiB (idle RSS {:.0} MiB + {:.0} MiB); {:.0} MiB published to {} non-readers (unbounded buffering would hold all {:.0} MiB); peak RSS {:.0} MiB (the group's, page cache included: {}); {oom} OOM kills; up throughout: {alive}; {slow} slow consumers shed",
        limit_bytes as f64 / f64::from(1 << 20),
        idle as f64 / f64::from(1 << 20),
        plan.num("headroom_mib"),
        published as f64 / f64::from(1 << 20),
        plan.count("non_readers"),
        need as f64 / f64::from(1 << 20),
        peak as f64 / f64::from(1 << 20),
        group_peak.map_or("n/a".to_owned(), |b| format!("{:.0} MiB", b as f64 / f64::from(1 << 20))),
    ));
    if alive {
        let _ = relay.terminate().await;
    }
    drop(limit);
    Ok(m)
}
