//! A client away from the relay, and what it finds when it comes back
//! (seed 000's network tests): `buffer_during_disconnect` publishes through
//! the SDK while its link is cut (50 at once, then 10 more while still
//! down) and every one must be acknowledged and delivered once after the
//! heal; `session_sync_after_reconnect` resumes a session after a seeded
//! five minutes of activity (compressed in time) and checks the welcome's
//! catch-up summary against it, channel by channel, then the catch-up.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keel_relay::client::{Client, ClientConfig, Event};
use rand::Rng;
use serde_json::json;

use super::{body, params, setup, wait_until};
use crate::Error;
use crate::fixture::RelayOptions;
use crate::history::{Expectation, Recorder};
use crate::scenario::{Action, Ctx, Measured, Plan, PlanInput, Scenario, SeedRef, Suite};
use crate::threshold::{Bound, Threshold};

/// Publishes `h<who>-<seq>` to `channel` and records it.
async fn publish_recorded(
    client: &Client,
    r: &Recorder,
    who: u32,
    channel: &str,
    seq: u64,
) -> Result<u64, Error> {
    crate::workload::sdk_publish(
        client,
        r,
        (who, 1),
        channel,
        seq,
        &json!({ "seq": seq }),
        Duration::from_secs(60),
    )
    .await
    .map_err(|e| setup("publish", e))
}

/// Reads a subscriber's deliveries into the history until `want` arrived
/// in all (or `limit` passed); returns how many arrived and the welcomes'
/// catch-up maps. The SDK hands each offset over once, so counting
/// deliveries counts offsets.
async fn collect(
    client: &mut Client,
    r: &Recorder,
    sub: u32,
    conn: u32,
    want: usize,
    limit: Duration,
) -> (usize, Vec<BTreeMap<String, u64>>) {
    let deadline = tokio::time::Instant::now() + limit;
    let (mut got, mut welcomes, mut batch) = (0, Vec::new(), Vec::new());
    while got < want {
        match tokio::time::timeout_at(deadline, client.next_event()).await {
            Ok(Some(Event::Deliver {
                channel,
                offset,
                id,
                payload,
            })) if !channel.starts_with("session:") => {
                got += 1;
                batch.push(crate::workload::sdk_delivery(
                    r,
                    (sub, conn),
                    r.channel(&channel),
                    offset,
                    &id,
                    &payload,
                ));
            }
            Ok(Some(Event::Welcome { catch_up, .. })) => welcomes.push(catch_up),
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    r.deliveries(&mut batch);
    (got, welcomes)
}

const BUFFER: &str = "buffer_during_disconnect";

pub(crate) const BUFFER_DURING_DISCONNECT: Scenario = Scenario {
    name: BUFFER,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "000",
        test: "test_message_buffering_during_disconnect",
        threshold: "50 messages buffered while disconnected + 10 sent while down: all 60 delivered, once",
    },
    what: "an SDK publisher behind a chaos proxy; its link is cut and refused; 50 publishes are made at once while it is down, then 10 more, one per 100 ms; then the link heals",
    target: "all 60 acknowledged within 2 s of the heal and delivered to a subscriber exactly once, in order, after the 10 published before",
    needs_process: Some("puts its own chaos proxy in front of the relay"),
    thresholds: |_| {
        vec![
            Threshold::exact("acked_after_heal", 60.0),
            Threshold::new("buffered_peak", "", Some(Bound::Ge(50.0)), Bound::Ge(60.0)),
            Threshold::all("delivered_ratio"),
            Threshold::new("flush_ms", "ms", None, Bound::Le(2_000.0)),
        ]
    },
    plan: |input: &PlanInput| {
        let mut plan = input.plan(
            BUFFER,
            &params(&[("buffered", 50.0), ("sent_while_down", 10.0)]),
        );
        plan.actions.push(Action {
            at_ms: 500,
            duration_ms: input.scale.pick(2_000, 5_000) as u64,
            kind: "disconnect".into(),
            target: "the publisher's link".into(),
            params: json!({}),
        });
        plan
    },
    run: body!(run_buffer),
    budget: Duration::from_secs(120),
};

async fn run_buffer(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let relay = ctx.relay(RelayOptions::default()).await?;
    let proxy = keel_faults::Proxy::start(keel_faults::ProxyConfig {
        name: "publisher".into(),
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        upstream: relay.addr(),
        seed: plan.seed,
        protocol: keel_faults::Protocol::Tcp,
    })
    .await
    .map_err(|e| setup("chaos proxy", e))?;
    let r = &ctx.recorder;
    let channel = "buffer:0";
    let mut sub = Client::connect(ClientConfig::new(&relay.url()))
        .await
        .map_err(|e| setup("subscriber", e))?;
    sub.subscribe(channel, Some(1))
        .await
        .map_err(|e| setup("subscribe", e))?;
    r.expect(Expectation {
        sub: 0,
        channel: r.channel(channel),
        from: 1,
    });
    let publisher = Arc::new(
        Client::connect(ClientConfig::new(&format!(
            "ws://{}/ws",
            proxy.listen_addr()
        )))
        .await
        .map_err(|e| setup("publisher", e))?,
    );
    for seq in 1..=10 {
        publish_recorded(&publisher, r, 0, channel, seq).await?;
    }
    let action = plan
        .actions
        .first()
        .cloned()
        .ok_or_else(|| setup("plan", "empty"))?;
    tokio::time::sleep(Duration::from_millis(action.at_ms)).await;
    ctx.phase("link down: publishing into the buffer");
    let t_down = r.now();
    let outage = Duration::from_millis(action.duration_ms);
    proxy.partition(outage, keel_faults::PartitionMode::Refuse);
    proxy.cut();
    let healed_at = tokio::time::Instant::now() + outage;
    // Down for the client, too.
    wait_until(Duration::from_secs(5), Duration::from_millis(5), || {
        let state = publisher.link().state().borrow().clone();
        async move { state != keel_reconnect::State::Connected }
    })
    .await;
    let mut pending = Vec::new();
    // Made at once, so in no defined order among themselves: each is its
    // own client in the history (no send order is claimed between them).
    let spawn = |seq: u64| {
        let (publisher, r) = (publisher.clone(), r.clone());
        tokio::spawn(
            async move { publish_recorded(&publisher, &r, seq as u32, channel, seq).await },
        )
    };
    for seq in 11..=60 {
        pending.push(spawn(seq));
    }
    let mut peak = 0;
    for seq in 61..=70 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        pending.push(spawn(seq));
        peak = peak.max(publisher.link().buffered().0);
    }
    while tokio::time::Instant::now() < healed_at {
        peak = peak.max(publisher.link().buffered().0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep_until(healed_at).await;
    let healed = tokio::time::Instant::now();
    r.fault("disconnect", "the publisher's link", t_down, r.now());
    ctx.phase("healed: flushing the buffer");
    let mut acked = 0;
    for p in pending {
        if matches!(p.await, Ok(Ok(_))) {
            acked += 1;
        }
    }
    let flush = healed.elapsed();
    let (got, _) = collect(&mut sub, r, 0, 1, 70, Duration::from_secs(30)).await;
    sub.close().await;
    let mut m = Measured::default();
    m.set("acked_after_heal", acked as f64)
        .set("buffered_peak", peak as f64)
        .set("delivered_ratio", got as f64 / 70.0)
        .set("flush_ms", flush.as_secs_f64() * 1000.0);
    m.note(format!(
        "{acked} of 60 publishes made while the link was down acknowledged {:.0} ms after the heal (at most {peak} buffered in the client); the subscriber received {got} of the 70 messages (10 before)",
        flush.as_secs_f64() * 1000.0
    ));
    Ok(m)
}

const SYNC: &str = "session_sync_after_reconnect";

pub(crate) const SESSION_SYNC_AFTER_RECONNECT: Scenario = Scenario {
    name: SYNC,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "000",
        test: "test_session_sync_after_reconnect",
        threshold: "after a 5-minute disconnect, the client is synced from the activity log",
    },
    what: "a subscriber of several channels leaves; five minutes of seeded activity per channel (each a Poisson-like count at up to 2 messages/s, none on some) are published, compressed into seconds; the subscriber resumes with its token and offsets",
    target: "the welcome's catch_up names, for every channel, exactly the activity missed; the catch-up then delivers it all, once and in order",
    needs_process: Some(
        "judges the SDK's resume, whose de-duplication by offset would hide what an intermediary does to frames: run it against a relay it starts",
    ),
    thresholds: |_| {
        vec![
            Threshold::all("summary_exact_ratio"),
            Threshold::all("caught_up_ratio"),
            Threshold::zero("publish_errors"),
        ]
    },
    plan: |input: &PlanInput| {
        let channels = input.scale.pick(3, 10);
        let mut plan = input.plan(
            SYNC,
            &params(&[("channels", channels as f64), ("away_s", 300.0)]),
        );
        // Five minutes of activity per channel, at 0 to 2 messages/s.
        let mut rng = input.rng(SYNC, "activity");
        for c in 0..channels {
            let per_second: f64 = if c == 0 {
                0.0
            } else {
                rng.random_range(0.0..2.0)
            };
            let count = (per_second * 300.0).round() as u64;
            plan.actions.push(Action {
                at_ms: 0,
                duration_ms: 300_000,
                kind: "activity".into(),
                target: format!("{SYNC}:{c}"),
                params: json!({"messages": count}),
            });
        }
        plan
    },
    run: body!(run_sync),
    budget: Duration::from_secs(180),
};

async fn run_sync(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let relay = ctx.relay(RelayOptions::default()).await?;
    let r = &ctx.recorder;
    let channels: Vec<String> = plan.actions.iter().map(|a| a.target.clone()).collect();
    let publisher = Client::connect(ClientConfig::new(&relay.url()))
        .await
        .map_err(|e| setup("publisher", e))?;
    let mut sub = Client::connect(ClientConfig::new(&relay.url()))
        .await
        .map_err(|e| setup("subscriber", e))?;
    for c in &channels {
        sub.subscribe(c, Some(1))
            .await
            .map_err(|e| setup("subscribe", e))?;
        r.expect(Expectation {
            sub: 0,
            channel: r.channel(c),
            from: 1,
        });
    }
    // A little activity while it is there.
    let mut seq = 0;
    for c in &channels {
        for _ in 0..3 {
            seq += 1;
            publish_recorded(&publisher, r, 0, c, seq).await?;
        }
    }
    let (got, _) = collect(
        &mut sub,
        r,
        0,
        1,
        3 * channels.len(),
        Duration::from_secs(10),
    )
    .await;
    if got < 3 * channels.len() {
        return Err(setup("subscriber", "the first messages did not arrive"));
    }
    let (token, offsets) = (sub.token().unwrap_or_default(), sub.offsets());
    sub.close().await;

    ctx.phase("away: five minutes of activity, compressed");
    let t_away = r.now();
    let mut errors = 0;
    let mut missed: BTreeMap<String, u64> = BTreeMap::new();
    for a in &plan.actions {
        let n = a.params["messages"].as_u64().unwrap_or(0);
        for _ in 0..n {
            seq += 1;
            match publish_recorded(&publisher, r, 0, &a.target, seq).await {
                Ok(_) => *missed.entry(a.target.clone()).or_default() += 1,
                Err(_) => errors += 1,
            }
        }
        missed.entry(a.target.clone()).or_default();
    }
    r.fault("away", "the subscriber", t_away, r.now());
    publisher.close().await;

    ctx.phase("back: resuming");
    let back = tokio::time::Instant::now();
    let mut config = ClientConfig::new(&relay.url());
    config.token = Some(token);
    config.offsets = offsets.clone();
    let mut again = Client::connect(config)
        .await
        .map_err(|e| setup("resume", e))?;
    let total: u64 = missed.values().sum();
    let (got, welcomes) =
        collect(&mut again, r, 0, 2, total as usize, Duration::from_secs(60)).await;
    let took = back.elapsed();
    again.close().await;
    let catch_up = welcomes.first().cloned().unwrap_or_default();
    // The summary: per channel, the messages after the last one seen.
    let exact = channels
        .iter()
        .filter(|c| {
            let seen = offsets.get(*c).copied().unwrap_or(0);
            let next = catch_up.get(*c).copied().unwrap_or(0);
            next.saturating_sub(1).saturating_sub(seen) == missed.get(*c).copied().unwrap_or(0)
        })
        .count();
    let mut m = Measured::default();
    m.set(
        "summary_exact_ratio",
        exact as f64 / channels.len().max(1) as f64,
    )
    .set("caught_up_ratio", got as f64 / total.max(1) as f64)
    .set("publish_errors", errors as f64)
    .set("catch_up_ms", took.as_secs_f64() * 1000.0);
    let summary: Vec<String> = missed.iter().map(|(c, n)| format!("{c} {n}")).collect();
    m.note(format!(
        "away for five minutes of activity ({total} messages: {}); the welcome's summary matched on {exact} of {} channels; {got} delivered in the catch-up, {:.0} ms from reconnecting",
        summary.join(", "),
        channels.len(),
        took.as_secs_f64() * 1000.0
    ));
    Ok(m)
}
