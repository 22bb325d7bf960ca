//! Seed 000's rate-limiting tests: sends through the relay to a mock
//! upstream that enforces a real rate limit (the one part of the system
//! that cannot be real here), and keel-ratelimit's bounded queue.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use keel_faults::{MockUpstream, UpstreamConfig};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::{body, params, setup, wait_until};
use crate::Error;
use crate::client::{self, next_text, parse};
use crate::fixture::RelayOptions;
use crate::history::{Op, Outcome, Recorder};
use crate::load::{Latency, Schedule};
use crate::scenario::{Ctx, Measured, Plan, Scenario, SeedRef, Suite};
use crate::threshold::{Bound, Threshold};

/// Sends waiting for their answer, by id; `None` once the link is gone (a
/// send then fails at once instead of waiting for an answer that cannot
/// come).
type Waiting = Arc<Mutex<Option<BTreeMap<String, oneshot::Sender<Result<(), String>>>>>>;

/// One session that sends `send` frames and waits for `sent`.
pub(super) struct Sender {
    client: u32,
    tx: mpsc::UnboundedSender<String>,
    waiting: Waiting,
    recorder: Recorder,
}

impl Sender {
    pub(super) async fn open(url: &str, client: u32, recorder: &Recorder) -> Result<Sender, Error> {
        let (ws, _) = client::open_session(url, None).await?;
        let (mut sink, mut stream) = ws.split();
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(t) = rx.recv().await {
                if sink
                    .send(tokio_tungstenite::tungstenite::Message::text(t))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let waiting: Waiting = Arc::new(Mutex::new(Some(BTreeMap::new())));
        let w = waiting.clone();
        tokio::spawn(async move {
            while let Ok(Some(t)) = next_text(&mut stream).await {
                let Ok(f) = parse(&t) else { continue };
                let (key, answer) = match f.kind.as_ref() {
                    "sent" => (f.id, Ok(())),
                    "error" => (f.reference, Err(f.code.unwrap_or_default().into_owned())),
                    _ => continue,
                };
                if let Some(k) = key
                    && let Some(tx) = w
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_mut()
                        .and_then(|m| m.remove(k.as_ref()))
                {
                    let _ = tx.send(answer);
                }
            }
            // The link is gone: sends still waiting fail now rather than
            // at their timeout (their answer senders dropped with the
            // map), and later ones fail at once.
            *w.lock().unwrap_or_else(|p| p.into_inner()) = None;
        });
        Ok(Sender {
            client,
            tx,
            waiting,
            recorder: recorder.clone(),
        })
    }

    /// Sends `id` to `to`; true when the relay answered `sent`.
    pub(super) async fn send(
        &self,
        id: &str,
        to: &str,
        intended: Option<tokio::time::Instant>,
    ) -> bool {
        let invoke = intended.map_or_else(
            || self.recorder.now(),
            |t| self.recorder.micros(t.into_std()),
        );
        let (tx, rx) = oneshot::channel();
        let live = match self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            Some(waiting) => {
                waiting.insert(id.to_owned(), tx);
                true
            }
            None => false,
        };
        let frame = json!({"type": "send", "id": id, "to": to, "body": {"text": id}}).to_string();
        let answer = if !live || self.tx.send(frame).is_err() {
            Err("link closed".to_owned())
        } else {
            match tokio::time::timeout(client::WAIT, rx).await {
                Ok(Ok(a)) => a,
                _ => Err("no answer".to_owned()),
            }
        };
        let ok = answer.is_ok();
        self.recorder.op(Op {
            client: self.client,
            kind: "send".into(),
            invoke,
            done: self.recorder.now(),
            outcome: match answer {
                Ok(()) => Outcome::Ok { offset: 0 },
                Err(code) => Outcome::Fail { code },
            },
            detail: format!("{id} to {to}"),
        });
        ok
    }
}

// -------------------------------------------------------------- burst

const BURST: &str = "burst_handling";

pub(crate) const BURST_HANDLING: Scenario = Scenario {
    name: BURST,
    suite: Suite::Load,
    seed: SeedRef {
        seed: "000",
        test: "test_burst_handling",
        threshold: "30/min burst 5: 10 sent at once, 5 go at once, the rest drain at the controlled rate (exact)",
    },
    what: "10 sends at once through the relay, whose upstream quota is 30/min with a burst of 5: the mock upstream's clock says when each arrived",
    target: "5 at once, then one per interval, each within ±5 ms of its slot",
    needs_process: Some("points the relay at its own mock upstream"),
    thresholds: |plan| {
        let interval = plan.num("interval_ms");
        vec![
            Threshold::exact("at_once", 5.0),
            Threshold::exact("sent", 10.0),
            Threshold::new(
                "max_slot_error_ms",
                "ms",
                Some(Bound::Le(interval / 2.0)),
                Bound::Le(5.0),
            ),
        ]
    },
    plan: |input| {
        // Full: the seed's 30/min (a send every 2 s). Small: 300/min, the
        // same shape in a tenth of the time.
        let per_min = input.scale.pick(300, 30) as f64;
        input.plan(
            BURST,
            &params(&[
                ("per_minute", per_min),
                ("burst", 5.0),
                ("sends", 10.0),
                ("interval_ms", 60_000.0 / per_min),
            ]),
        )
    },
    run: body!(run_burst),
    budget: Duration::from_secs(60),
};

async fn run_burst(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let up = MockUpstream::start(UpstreamConfig {
        global_rate: 10_000.0,
        global_burst: 10_000.0,
        ..Default::default()
    })
    .await
    .map_err(|e| setup("mock upstream", e))?;
    let per_min = plan.num("per_minute");
    let config = format!(
        "[sending]\nglobal_rate_per_minute = {per_min}\nglobal_burst = {}\nper_recipient_rate = 1000\nper_recipient_burst = 1000\n",
        plan.num("burst")
    );
    let relay = ctx
        .relay(RelayOptions {
            config,
            upstream: Some(up.url()),
            ..Default::default()
        })
        .await?;
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
    let sender = Sender::open(&relay.url(), 1, &ctx.recorder).await?;
    let n = plan.count("sends");
    ctx.phase("10 sends at once");
    let sends = (0..n).map(|i| {
        let (id, to) = (format!("burst-{i}"), format!("r{i}"));
        let sender = &sender;
        async move { sender.send(&id, &to, None).await }
    });
    let acked = futures::future::join_all(sends)
        .await
        .into_iter()
        .filter(|ok| *ok)
        .count();
    let interval = Duration::from_secs_f64(60.0 / per_min);
    ctx.phase("draining at the quota");
    wait_until(
        interval * (n as u32) + Duration::from_secs(10),
        Duration::from_millis(20),
        || async { up.accepted().len() >= n },
    )
    .await;
    let accepted = up.accepted();
    let mut m = Measured::default();
    m.set("acked", acked as f64)
        .set("sent", accepted.len() as f64);
    let Some(t0) = accepted.iter().map(|a| a.at).min() else {
        m.set("at_once", 0.0)
            .set("max_slot_error_ms", f64::INFINITY);
        return Ok(m);
    };
    let mut offsets: Vec<f64> = accepted
        .iter()
        .map(|a| (a.at - t0).as_secs_f64() * 1000.0)
        .collect();
    offsets.sort_by(f64::total_cmp);
    let interval_ms = interval.as_secs_f64() * 1000.0;
    let burst = plan.count("burst");
    let at_once = offsets.iter().filter(|o| **o < interval_ms / 2.0).count();
    // The k-th send after the burst belongs in slot t0 + k * interval.
    let max_error = offsets
        .iter()
        .skip(burst)
        .enumerate()
        .map(|(k, o)| (o - (k as f64 + 1.0) * interval_ms).abs())
        .fold(0.0, f64::max);
    let mut latency = Latency::default();
    for o in &offsets {
        latency.record(Duration::from_secs_f64(o / 1000.0), (o * 1000.0) as u64);
    }
    m.set("at_once", at_once as f64)
        .set("max_slot_error_ms", max_error)
        .set("rate_limited_by_upstream", up.rate_limited() as f64);
    m.note(format!(
        "arrival offsets at the upstream, ms from the first: {}",
        offsets
            .iter()
            .map(|o| format!("{o:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    m.throughput = super::rate_series(&offsets.iter().map(|o| o / 1000.0).collect::<Vec<_>>());
    Ok(m)
}

// ------------------------------------------------------------ sustained

const SUSTAINED: &str = "sustained_load";

pub(crate) const SUSTAINED_LOAD: Scenario = Scenario {
    name: SUSTAINED,
    suite: Suite::Load,
    seed: SeedRef {
        seed: "000",
        test: "test_sustained_high_load",
        threshold: "100 sends over 2 min: the rate limiter prevents API errors, all sent, none lost",
    },
    what: "sends at a steady rate through the relay to an upstream that limits, and at 10x the rate to one limiting 10x (run side by side): 429s, losses and duplicates counted at the upstream",
    target: "0 API errors, 0 lost, 0 duplicates, also at 10x",
    needs_process: Some("points the relay at its own mock upstream"),
    thresholds: |_| {
        vec![
            Threshold::zero("api_errors"),
            Threshold::zero("lost"),
            Threshold::zero("duplicates"),
            Threshold::new("api_errors_10x", "", None, Bound::Le(0.0)),
            Threshold::new("lost_10x", "", None, Bound::Le(0.0)),
            Threshold::new("duplicates_10x", "", None, Bound::Le(0.0)),
        ]
    },
    plan: |input| {
        let sends = input.scale.pick(20, 100);
        let secs = input
            .duration
            .unwrap_or_else(|| {
                input
                    .scale
                    .duration(Duration::from_secs(10), Duration::from_secs(120))
            })
            .as_secs_f64();
        input.plan(
            SUSTAINED,
            &params(&[
                ("sends", sends as f64),
                ("seconds", secs),
                ("upstream_per_second", 1.0),
                ("factor", 10.0),
            ]),
        )
    },
    run: body!(run_sustained),
    budget: Duration::from_secs(240),
};

async fn run_sustained(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let (sends, secs, per_sec, factor) = (
        plan.count("sends"),
        plan.num("seconds"),
        plan.num("upstream_per_second"),
        plan.num("factor"),
    );
    ctx.phase("sending at a steady rate (1x and 10x side by side)");
    let base = sustained_variant(ctx, 1, sends, secs, per_sec);
    let tenfold = sustained_variant(
        ctx,
        2,
        (sends as f64 * factor) as usize,
        secs,
        per_sec * factor,
    );
    let (a, b) = tokio::join!(base, tenfold);
    let (a, b) = (a?, b?);
    let mut m = Measured::default();
    for (suffix, v) in [("", &a), ("_10x", &b)] {
        m.set(&format!("api_errors{suffix}"), v.api_errors as f64)
            .set(&format!("lost{suffix}"), v.lost as f64)
            .set(&format!("duplicates{suffix}"), v.duplicates as f64)
            .set(&format!("acked{suffix}"), v.acked as f64)
            .set(&format!("sent{suffix}"), v.sent as f64)
            .set(&format!("dropped{suffix}"), v.dropped as f64)
            .set(
                &format!("send_to_upstream_p99_ms{suffix}"),
                v.to_upstream.ms(0.99),
            );
    }
    m.note(format!(
        "1x: {} sends over {secs:.0} s to an upstream allowing {per_sec}/s; 10x: {} to one allowing {}/s",
        sends,
        (sends as f64 * factor) as usize,
        per_sec * factor
    ));
    m.latency = Some(b.ack);
    m.throughput = b.throughput;
    Ok(m)
}

struct Variant {
    api_errors: u64,
    lost: u64,
    duplicates: u64,
    acked: u64,
    sent: u64,
    dropped: u64,
    to_upstream: Latency,
    ack: Latency,
    throughput: Vec<(f64, f64)>,
}

async fn sustained_variant(
    ctx: &Ctx,
    client: u32,
    sends: usize,
    secs: f64,
    per_sec: f64,
) -> Result<Variant, Error> {
    // The upstream allows a little more than the relay sends, with a burst
    // of 2: a timer firing late and the next on time must not look like
    // abuse, while a relay that ignored its quota would be caught.
    let up = MockUpstream::start(UpstreamConfig {
        global_rate: per_sec * 1.1,
        global_burst: 2.0_f64.max(per_sec * 0.2),
        ..Default::default()
    })
    .await
    .map_err(|e| setup("mock upstream", e))?;
    let config = format!(
        "[sending]\nglobal_rate = {}\nglobal_burst = 1\nper_recipient_rate = 1000\nper_recipient_burst = 1000\n",
        per_sec.max(1.0) as u32
    );
    let relay = ctx
        .relay(RelayOptions {
            config,
            upstream: Some(up.url()),
            ..Default::default()
        })
        .await?;
    let sender = Sender::open(&relay.url(), client, &ctx.recorder).await?;
    let schedule = Schedule::constant(sends as f64 / secs, Duration::from_secs_f64(secs));
    let start = tokio::time::Instant::now();
    let acked_at: Arc<Mutex<BTreeMap<String, tokio::time::Instant>>> = Arc::default();
    let acked = Arc::new(AtomicU64::new(0));
    let stats = crate::load::run(&schedule, start, 10_000, Duration::from_millis(50), |i| {
        let (sender, acked_at, acked) = (&sender, acked_at.clone(), acked.clone());
        let id = format!("s{client}-{i}");
        let intended = start
            + schedule
                .intended()
                .get(i as usize)
                .copied()
                .unwrap_or_default();
        async move {
            let ok = sender
                .send(&id, &format!("r{}", i % 20), Some(intended))
                .await;
            if ok {
                acked.fetch_add(1, Ordering::Relaxed);
                acked_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, intended);
            }
            ok
        }
    })
    .await;
    let acked_ids: HashSet<String> = acked_at
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .keys()
        .cloned()
        .collect();
    // Everything acknowledged must reach the upstream: at its rate, with slack.
    wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        let (up, acked_ids) = (&up, &acked_ids);
        async move {
            let got: HashSet<String> = up
                .accepted()
                .into_iter()
                .map(|a| send_key(&a.id).to_owned())
                .collect();
            acked_ids.iter().all(|id| got.contains(id))
        }
    })
    .await;
    let accepted = up.accepted();
    let got: HashSet<&str> = accepted.iter().map(|a| send_key(&a.id)).collect();
    let lost = acked_ids
        .iter()
        .filter(|id| !got.contains(id.as_str()))
        .count() as u64;
    let mut to_upstream = Latency::default();
    let map = acked_at.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut times = Vec::new();
    for a in &accepted {
        if let Some(intended) = map.get(send_key(&a.id)) {
            let at = intended.duration_since(start);
            to_upstream.record(
                at,
                a.at.into_std()
                    .saturating_duration_since(intended.into_std())
                    .as_micros() as u64,
            );
            times.push(
                a.at.into_std()
                    .saturating_duration_since(start.into_std())
                    .as_secs_f64(),
            );
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(Variant {
        api_errors: up.rate_limited(),
        lost,
        duplicates: up.duplicates().len() as u64,
        acked: acked.load(Ordering::Relaxed),
        sent: accepted.len() as u64,
        dropped: stats.dropped,
        to_upstream,
        ack: stats.latency,
        throughput: super::rate_series(&times),
    })
}

// ------------------------------------------------------------ overflow

const OVERFLOW: &str = "queue_overflow";

pub(crate) const QUEUE_OVERFLOW: Scenario = Scenario {
    name: OVERFLOW,
    suite: Suite::Load,
    seed: SeedRef {
        seed: "000",
        test: "test_queue_overflow_handling",
        threshold: "queue max_size=10, 20 submitted: the oldest 10 dropped (FIFO eviction), a warning logged",
    },
    what: "keel-ratelimit's SendQueue (drop-oldest, bound 10) takes 20 sends at once: which were dropped, warned and counted, which were sent, in what order (in-process: the relay's durable outbox never drops an acknowledged send)",
    target: "exactly the oldest 10 dropped, 10 warnings, the newest 10 sent in order",
    needs_process: None,
    thresholds: |_| {
        vec![
            Threshold::exact("dropped", 10.0),
            Threshold::exact("oldest_dropped", 1.0),
            Threshold::exact("warnings", 10.0),
            Threshold::exact("sent_in_order", 1.0),
        ]
    },
    plan: |input| input.plan(OVERFLOW, &params(&[("bound", 10.0), ("submitted", 20.0)])),
    run: body!(run_overflow),
    budget: Duration::from_secs(30),
};

async fn run_overflow(_ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let (bound, submitted) = (plan.count("bound"), plan.count("submitted"));
    // A runtime of its own on one thread, so that (a) every submit lands
    // before the dispatcher runs, as in the seed, and (b) the warnings the
    // queue logs are captured by a subscriber set for that thread only.
    let outcome = tokio::task::spawn_blocking(move || overflow_on_own_thread(bound, submitted))
        .await
        .map_err(|e| Error::Client(e.to_string()))??;
    let (dropped, sent, warnings) = outcome;
    let oldest: Vec<u64> = (0..(submitted - bound) as u64).collect();
    let newest: Vec<u64> = ((submitted - bound) as u64..submitted as u64).collect();
    let mut m = Measured::default();
    m.set("dropped", dropped.len() as f64)
        .set("oldest_dropped", f64::from(u8::from(dropped == oldest)))
        .set("warnings", warnings as f64)
        .set("sent_in_order", f64::from(u8::from(sent == newest)));
    m.note(format!(
        "dropped {dropped:?}; sent {sent:?}; {warnings} warnings logged"
    ));
    Ok(m)
}

type OverflowOutcome = (Vec<u64>, Vec<u64>, u64);

fn overflow_on_own_thread(bound: usize, submitted: usize) -> Result<OverflowOutcome, Error> {
    use keel_ratelimit::{Config, DeadReason, Overflow, SendOutcome, SendQueue, Sink};

    struct Recording(Arc<Mutex<Vec<u64>>>);
    impl Sink<&'static str, u64> for Recording {
        async fn send(&self, _key: &&'static str, msg: &u64) -> SendOutcome {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).push(*msg);
            SendOutcome::Sent
        }
    }

    let warnings = Arc::new(AtomicU64::new(0));
    let _guard = tracing::subscriber::set_default(WarnCounter(warnings.clone()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("start a runtime", e))?;
    let sent = Arc::new(Mutex::new(Vec::new()));
    let (dropped, sent_now) = rt.block_on(async {
        let (queue, mut dead) = SendQueue::new(
            Recording(sent.clone()),
            Config {
                max_total: bound,
                overflow: Overflow::DropOldest,
                ..Default::default()
            },
        );
        let mut receipts = Vec::new();
        for i in 0..submitted as u64 {
            if let Ok(r) = queue.submit("alice", i).await {
                receipts.push(r);
            }
        }
        for r in receipts {
            let _ = r.await;
        }
        let mut dropped = Vec::new();
        while let Ok(d) = dead.try_recv() {
            if matches!(d.reason, DeadReason::Overflow) {
                dropped.push(d.msg);
            }
        }
        let now = sent.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (dropped, now)
    });
    Ok((dropped, sent_now, warnings.load(Ordering::Relaxed)))
}

/// Counts WARN events from keel-ratelimit (a minimal tracing subscriber).
struct WarnCounter(Arc<AtomicU64>);

impl tracing::Subscriber for WarnCounter {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        *m.level() == tracing::Level::WARN && m.target().starts_with("keel_ratelimit")
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        struct Message(bool);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" && format!("{v:?}").contains("dropped the oldest") {
                    self.0 = true;
                }
            }
        }
        let mut m = Message(false);
        e.record(&mut m);
        if m.0 {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The client's send id in the id the upstream sees (`<session>/<id>`).
pub(super) fn send_key(upstream_id: &str) -> &str {
    upstream_id
        .split_once('/')
        .map_or(upstream_id, |(_, key)| key)
}
