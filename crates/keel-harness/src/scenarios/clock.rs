//! The wall clock steps (NTP setting the time, a VM resumed or migrated, an
//! operator's `date -s`) while the relay runs, under publish load through
//! the SDK: `clock_steps`. The relay runs under libfaketime, its wall clock
//! moved forward and back by hours through keel-faults' control file; its
//! monotonic clocks stay real, as on a real machine. The relay is set to
//! purge sessions ten minutes without a connection and to drop messages
//! ten minutes old, checked every second: a step forward read as time
//! passing would purge the sessions that are away and cut the logs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use keel_faults::clock::{ClockSteps, REREAD_S, Steps};
use keel_relay::client::{Client, ClientConfig, Event};
use rand::Rng;
use rand::seq::IndexedRandom;
use serde_json::json;

use super::{body, params, setup};
use crate::Error;
use crate::fixture::RelayOptions;
use crate::history::{Expectation, Recorder};
use crate::scenario::{Action, Ctx, Measured, Plan, PlanInput, Scenario, SeedRef, Suite};
use crate::threshold::Threshold;

const NAME: &str = "clock_steps";

/// Sessions without a connection this long are purged; messages this old
/// are dropped (both checked every second).
const TTL_S: u64 = 600;

/// The relay's configuration over the harness's base.
const CONFIG: &str = "[retention]
session_ttl_s = 600
max_age_s = 600
interval_s = 1
";

/// Steps forward (seconds): all beyond the TTL.
const FORWARD: [i64; 4] = [3_600, 7_200, 6 * 3_600, 86_400];
/// Steps back (seconds).
const BACK: [i64; 3] = [-1_800, -3_600, -4 * 3_600];

pub(crate) const CLOCK_STEPS: Scenario = Scenario {
    name: NAME,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "-",
        test: "(keel's own: wall-clock steps)",
        threshold: "nothing acknowledged lost or duplicated; no session purged and no message dropped early because of a step",
    },
    what: "the relay's wall clock steps forward and back by seeded amounts of hours (libfaketime; monotonic clocks real) while SDK publishers publish every 20 ms; before each step a subscriber leaves (its session DETACHED) and comes back after it; the relay purges sessions 10 minutes without a connection and drops messages 10 minutes old, every second; at the end a new subscriber reads every channel from offset 1",
    target: "every subscriber resumes its own session after each step; every acknowledged message delivered once and in order to every subscriber, the late reader included (none dropped by retention); no session purged, no message removed; stored times never go backwards (message logs, health log)",
    needs_process: Some(
        "steps the relay's wall clock through libfaketime: run it against a relay it starts",
    ),
    thresholds: |_| {
        vec![
            Threshold::all("resumed_ratio"),
            Threshold::all("late_read_ratio"),
            Threshold::zero("sessions_purged"),
            Threshold::zero("messages_removed"),
            Threshold::zero("times_backwards"),
            Threshold::zero("publish_errors"),
        ]
    },
    plan: |input: &PlanInput| {
        let steps = input.scale.pick(2, 4);
        let publishers = input.scale.pick(1, 2);
        let gap_ms = input.scale.pick(5_000, 6_000) as u64;
        let mut plan = input.plan(
            NAME,
            &params(&[
                ("publishers", publishers as f64),
                ("steps", steps as f64),
                ("publish_every_ms", 20.0),
                ("session_ttl_s", TTL_S as f64),
                ("max_age_s", TTL_S as f64),
            ]),
        );
        // Forward first (the step that purges early if it is read as time),
        // then back, then either.
        let mut rng = input.rng(NAME, "steps");
        let mut offset = 0i64;
        for k in 0..steps {
            let step = match k {
                0 => *FORWARD.choose(&mut rng).unwrap_or(&3_600),
                1 => *BACK.choose(&mut rng).unwrap_or(&-1_800),
                _ if rng.random_bool(0.5) => *FORWARD.choose(&mut rng).unwrap_or(&3_600),
                _ => *BACK.choose(&mut rng).unwrap_or(&-1_800),
            };
            offset += step;
            plan.actions.push(Action {
                at_ms: (k as u64 + 1) * gap_ms,
                duration_ms: 0,
                kind: "clock_step".into(),
                target: "the relay's wall clock".into(),
                params: json!({ "step_s": step, "offset_s": offset }),
            });
        }
        plan
    },
    run: body!(run),
    budget: Duration::from_secs(180),
};

/// A subscriber of every channel that leaves before a step and comes back
/// after it, resuming from what it handed over (not from the SDK's own
/// offsets, which count deliveries still queued inside the client).
struct Traveller {
    sub: u32,
    conn: u32,
    client: Option<Client>,
    session: String,
    token: String,
    seen: BTreeMap<String, u64>,
}

impl Traveller {
    async fn start(url: &str, r: &Recorder, sub: u32, channels: &[String]) -> Result<Self, Error> {
        let client = Client::connect(ClientConfig::new(url))
            .await
            .map_err(|e| setup("subscriber", e))?;
        for c in channels {
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
        Ok(Traveller {
            sub,
            conn: 1,
            session: client.session_id().unwrap_or_default(),
            token: client.token().unwrap_or_default(),
            client: Some(client),
            seen: BTreeMap::new(),
        })
    }

    /// Hands over what arrived, until nothing has for `quiet` (or `limit`).
    async fn drain(&mut self, r: &Recorder, quiet: Duration, limit: Duration) -> usize {
        let Some(client) = self.client.as_mut() else {
            return 0;
        };
        let deadline = tokio::time::Instant::now() + limit;
        let mut batch = Vec::new();
        while tokio::time::Instant::now() < deadline {
            match tokio::time::timeout(quiet, client.next_event()).await {
                Ok(Some(Event::Deliver {
                    channel,
                    offset,
                    id,
                    payload,
                })) if !channel.starts_with("session:") => {
                    batch.push(crate::workload::sdk_delivery(
                        r,
                        (self.sub, self.conn),
                        r.channel(&channel),
                        offset,
                        &id,
                        &payload,
                    ));
                    self.seen.insert(channel, offset);
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        let n = batch.len();
        r.deliveries(&mut batch);
        n
    }

    /// Leaves: the session is DETACHED on the relay.
    async fn leave(&mut self) {
        if let Some(client) = self.client.take() {
            client.close().await;
        }
    }

    /// Comes back with its token and what it handed over; whether it got
    /// its own session back.
    async fn back(&mut self, url: &str) -> Result<bool, String> {
        let mut config = ClientConfig::new(url);
        config.token = Some(self.token.clone());
        config.offsets = self.seen.clone();
        let client = Client::connect(config).await.map_err(|e| e.to_string())?;
        self.conn += 1;
        let same = client.session_id().as_deref() == Some(self.session.as_str());
        self.client = Some(client);
        Ok(same)
    }
}

async fn run(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let steps = match ClockSteps::prepare(&ctx.dir).map_err(|e| setup("clock control file", e))? {
        Steps::Ready(s) => s,
        Steps::Unavailable { why } => return Err(Error::NotApplicable(why)),
    };
    let mut relay = ctx
        .relay(RelayOptions {
            config: CONFIG.into(),
            env: steps.env(),
            ..RelayOptions::default()
        })
        .await?;
    let url = relay.url();
    let r = &ctx.recorder;
    let channels: Vec<String> = (0..plan.count("publishers"))
        .map(|p| format!("clock:{p}"))
        .collect();

    // Subscriber 0 stays; subscribers 1.. each travel across one step.
    let mut stay = Traveller::start(&url, r, 0, &channels).await?;
    let mut travellers = Vec::new();
    for k in 0..plan.actions.len() {
        travellers.push(Traveller::start(&url, r, k as u32 + 1, &channels).await?);
    }

    ctx.phase("publishing; the wall clock steps");
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let every = Duration::from_millis(plan.num("publish_every_ms").max(1.0) as u64);
    let mut publishers = tokio::task::JoinSet::new();
    for (p, channel) in channels.iter().enumerate() {
        let client = Client::connect(ClientConfig::new(&url))
            .await
            .map_err(|e| setup("publisher", e))?;
        let (r, channel) = (r.clone(), channel.clone());
        let (stop, acked, errors) = (stop.clone(), acked.clone(), errors.clone());
        publishers.spawn(async move {
            let who = 100 + p as u32;
            let mut tick = tokio::time::interval(every);
            // Bounded: at most ten minutes of ticks, whatever the plan says.
            for seq in 1..=(600_000 / every.as_millis().max(1) as u64) {
                tick.tick().await;
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let payload = json!({ "seq": seq, "p": p });
                match crate::workload::sdk_publish(
                    &client,
                    &r,
                    (who, 1),
                    &channel,
                    seq,
                    &payload,
                    Duration::from_secs(30),
                )
                .await
                {
                    Ok(_) => acked.fetch_add(1, Ordering::SeqCst),
                    Err(_) => errors.fetch_add(1, Ordering::SeqCst),
                };
            }
            client.close().await;
        });
    }

    let start = tokio::time::Instant::now();
    let (mut resumed, mut resume_failures) = (0u32, Vec::new());
    for (k, action) in plan.actions.iter().enumerate() {
        let at = start + Duration::from_millis(action.at_ms);
        let traveller = &mut travellers[k];
        // Leave a second before the step: DETACHED across it.
        tokio::time::sleep_until(at.checked_sub(Duration::from_secs(1)).unwrap_or(at)).await;
        traveller
            .drain(r, Duration::from_millis(50), Duration::from_millis(500))
            .await;
        traveller.leave().await;
        stay.drain(r, Duration::from_millis(10), Duration::from_millis(200))
            .await;
        tokio::time::sleep_until(at).await;
        let offset = action.params["offset_s"].as_i64().unwrap_or(0);
        let t0 = r.now();
        steps
            .set_offset(offset)
            .map_err(|e| setup("clock step", e))?;
        ctx.phase(&format!(
            "wall clock at {offset:+} s (step {:+} s)",
            action.params["step_s"].as_i64().unwrap_or(0)
        ));
        // The relay reads the new offset within REREAD_S; then let
        // retention run on it (every second) twice before coming back.
        tokio::time::sleep(Duration::from_secs(REREAD_S) + Duration::from_millis(2_500)).await;
        r.fault("clock_step", &format!("{offset:+} s"), t0, r.now());
        match traveller.back(&url).await {
            Ok(true) => resumed += 1,
            Ok(false) => resume_failures.push(format!("step {}: a new session", k + 1)),
            Err(e) => resume_failures.push(format!("step {}: {e}", k + 1)),
        }
        stay.drain(r, Duration::from_millis(10), Duration::from_millis(200))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    while publishers.join_next().await.is_some() {}
    let acked = acked.load(Ordering::SeqCst);

    ctx.phase("draining; a late reader reads every channel from offset 1");
    let want = Duration::from_secs(20);
    for t in travellers.iter_mut().chain(std::iter::once(&mut stay)) {
        t.drain(r, Duration::from_millis(500), want).await;
        t.leave().await;
    }
    let late_sub = 1_000;
    let mut late = Traveller::start(&url, r, late_sub, &channels).await?;
    let late_got = late
        .drain(r, Duration::from_millis(1_000), Duration::from_secs(30))
        .await;
    late.leave().await;

    let purged = relay
        .metric("keel_evictions_total{kind=\"session_ttl\"}")
        .await?;
    let removed = relay
        .metric("keel_evictions_total{kind=\"retention\"}")
        .await?;
    let offset_end = steps.offset();
    relay.terminate().await?;
    let backwards = times_backwards(&relay.data_dir().join("keel.db"))
        .map_err(|e| setup("reading the relay's database", e))?;

    let steps_n = plan.actions.len().max(1);
    let mut m = Measured::default();
    m.set("resumed_ratio", f64::from(resumed) / steps_n as f64)
        .set("late_read_ratio", late_got as f64 / acked.max(1) as f64)
        .set("sessions_purged", purged)
        .set("messages_removed", removed)
        .set("times_backwards", backwards as f64)
        .set("publish_errors", errors.load(Ordering::SeqCst) as f64)
        .set("acked", acked as f64);
    let offsets: Vec<String> = plan
        .actions
        .iter()
        .map(|a| format!("{:+}", a.params["step_s"].as_i64().unwrap_or(0)))
        .collect();
    m.note(format!(
        "wall clock stepped {} s (ending {offset_end:+} s from real time); {resumed} of {steps_n} subscribers resumed their own session after their step{}; {acked} publishes acknowledged, the late reader received {late_got}; {purged} sessions purged, {removed} messages removed by retention; {backwards} stored times earlier than the one before",
        offsets.join(", "),
        if resume_failures.is_empty() {
            String::new()
        } else {
            format!(" ({})", resume_failures.join("; "))
        },
    ));
    Ok(m)
}

/// Stored times that go backwards: a message's `at` earlier than the one
/// before it in its channel's log, a health transition's earlier than the
/// one before it.
fn times_backwards(db: &std::path::Path) -> Result<u64, rusqlite::Error> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut n = 0;
    for sql in [
        "SELECT channel, at FROM messages ORDER BY channel, offset",
        "SELECT '', at FROM transitions ORDER BY id",
    ] {
        let mut stmt = conn.prepare(sql)?;
        let mut rows = stmt.query([])?;
        let mut last: Option<(String, i64)> = None;
        while let Some(row) = rows.next()? {
            let (c, at): (String, i64) = (row.get(0)?, row.get(1)?);
            if let Some((lc, la)) = &last
                && *lc == c
                && at < *la
            {
                n += 1;
            }
            last = Some((c, at));
        }
    }
    Ok(n)
}
