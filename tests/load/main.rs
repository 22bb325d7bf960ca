//! Every load scenario at small scale against a real relay process, the
//! checker's self-test with planted bugs, plan determinism, and the report
//! in a real browser. `cargo test -p keel-tests --test load`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keel_harness::check::check;
use keel_harness::client::{PayloadCheck, Publisher, SubscriberSpec, spawn_subscriber};
use keel_harness::fixture::{RelayBinary, RelayOptions, Target};
use keel_harness::scenario::{Ctx, PlanInput};
use keel_harness::{RunOptions, Scale, Suite, catalogue};

mod browser;
mod tamper;

use keel_tests::ONE_AT_A_TIME;

fn relay() -> RelayBinary {
    RelayBinary::at(Path::new(env!("CARGO_BIN_EXE_keel-relay-test")))
}

fn options(scenarios: &[&str], report: &Path, seed: u64) -> RunOptions {
    keel_tests::small_options(Suite::Load, scenarios, &relay().program, report, seed)
}

/// Runs one load scenario at small scale (see [`keel_tests::small_run`]).
#[track_caller]
fn scenario(name: &'static str) {
    keel_tests::small_run(Suite::Load, name, &relay().program);
}

#[test]
fn concurrent_sessions() {
    scenario("concurrent_sessions");
}

#[test]
fn session_isolation() {
    scenario("session_isolation");
}

#[test]
fn database_contention() {
    scenario("database_contention");
}

#[test]
fn burst_handling() {
    scenario("burst_handling");
}

#[test]
fn sustained_load() {
    scenario("sustained_load");
}

#[test]
fn queue_overflow() {
    scenario("queue_overflow");
}

#[test]
fn connections_10k() {
    scenario("connections_10k");
}

#[test]
fn connections_max() {
    scenario("connections_max");
}

#[test]
fn subscriptions_50k() {
    scenario("subscriptions_50k");
}

#[test]
fn fanout_backpressure() {
    scenario("fanout_backpressure");
}

#[test]
fn large_payloads() {
    scenario("large_payloads");
}

#[test]
fn soak() {
    scenario("soak");
}

#[test]
fn burn_in() {
    scenario("burn_in");
}

#[test]
fn abuse_memory() {
    scenario("abuse_memory");
}

/// Every scenario of the catalogue has a test above (a new scenario without
/// one fails here).
#[test]
fn every_load_scenario_is_tested() {
    let source = include_str!("main.rs");
    for s in catalogue().into_iter().filter(|s| s.suite == Suite::Load) {
        assert!(
            source.contains(&format!("scenario(\"{}\")", s.name)),
            "{} has no test",
            s.name
        );
    }
}

/// One seed, one plan: two expansions are byte for byte the same, and
/// another seed changes what is random.
#[test]
fn plans_are_deterministic_per_seed() {
    for s in catalogue() {
        for scale in [Scale::Small, Scale::Full] {
            let input = PlanInput {
                seed: 42,
                scale,
                duration: None,
                iterations: None,
            };
            let (a, b) = ((s.plan)(&input), (s.plan)(&input));
            assert_eq!(a.to_json(), b.to_json(), "{} {scale:?}", s.name);
        }
    }
    let isolation = catalogue()
        .into_iter()
        .find(|s| s.name == "session_isolation")
        .unwrap();
    let plan = |seed| {
        (isolation.plan)(&PlanInput {
            seed,
            scale: Scale::Small,
            duration: None,
            iterations: None,
        })
        .to_json()
    };
    assert_ne!(plan(42), plan(43), "the seed must matter");
}

/// A workload small enough to run once per failpoint: one pipelining
/// publisher (bursts of 30 publishes in flight, so that commits hold
/// several), three subscribers from offset 1.
async fn planted(failpoint: &str, dir: &Path) -> keel_harness::check::Verdict {
    let ctx = Ctx::new(Target::Spawn(relay()), dir, Scale::Small)
        .with_relay_env(&[("KEEL_FAILPOINTS", failpoint)]);
    let relay = ctx.relay(RelayOptions::default()).await.unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let subs: Vec<_> = (0..3)
        .map(|s| {
            spawn_subscriber(
                SubscriberSpec {
                    sub: s,
                    url: relay.url(),
                    source: None,
                    channels: vec![("selftest".into(), 1)],
                    read_delay: None,
                    resume: true,
                    payloads: PayloadCheck::None,
                    stop_after: None,
                },
                ctx.recorder.clone(),
                stop.clone(),
                Duration::from_millis(500),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let publisher = Publisher::open(&relay.url(), 9, None, &ctx.recorder)
        .await
        .unwrap();
    let cid = ctx.recorder.channel("selftest");
    for _ in 0..10 {
        let burst = (0..30).map(|_| publisher.publish(cid, "selftest", "{}", None));
        futures_join(burst).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let _ = stop_tx.send(true);
    for (_, task) in subs {
        let _ = task.await;
    }
    check(&ctx.recorder.take())
}

async fn futures_join<F: std::future::Future>(futs: impl Iterator<Item = F>) {
    let handles: Vec<F> = futs.collect();
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = handles.into_iter().map(Box::pin).collect();
    // Poll all to completion together (a small join_all without the dependency).
    std::future::poll_fn(|cx| {
        pinned.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if pinned.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

/// The checker is trusted because it catches each planted bug: the relay
/// built with `failpoints` drops, duplicates, reorders or corrupts one live
/// delivery in N, or queues a batch of publishes in reverse; each is caught
/// as its own kind and nothing else; a run without a failpoint is clean.
#[test]
fn checker_catches_every_planted_bug() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let _one = ONE_AT_A_TIME.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let clean = planted("", dir.path()).await;
        assert!(!clean.violated(), "no failpoint, no violation: {clean:?}");
        assert!(
            clean.stats.acked >= 300
                && clean.stats.delivered >= 900
                && clean.stats.payloads_checked == clean.stats.delivered,
            "{:?}",
            clean.stats
        );
        for (failpoint, caught_as) in [
            ("drop_delivery=50", "lost"),
            ("duplicate_delivery=50", "duplicated"),
            ("reorder_delivery=20", "reordered"),
            ("corrupt_delivery=50", "corrupted"),
            ("reverse_batch=2", "send_order"),
        ] {
            let v = planted(failpoint, dir.path()).await;
            let counts: Vec<_> = v.checks.iter().map(|c| (c.name.clone(), c.count)).collect();
            println!("{failpoint}: {counts:?}");
            assert!(
                v.count(caught_as) > 0,
                "{failpoint} planted, but the checker found no {caught_as}: {v:?}"
            );
            assert_eq!(
                v.violations(),
                v.count(caught_as),
                "{failpoint} planted: only {caught_as} may be found: {counts:?}"
            );
            let witness = &v.get(caught_as).unwrap().witnesses[0];
            assert!(
                !witness.summary.is_empty()
                    && !witness.timeline.is_empty()
                    && witness.subject.is_some(),
                "{witness:?}"
            );
        }
    });
}

/// The checker holds a resume after a client's close to DETACHED only when
/// the relay itself answered the close on a direct connection and the
/// client resumed 100 ms later. That proof must be there in the lab (else
/// the strict rule never applies), and the resume must then find the
/// session DETACHED, also while deliveries were being written to it when
/// it closed.
#[test]
fn a_relay_answers_a_direct_close_and_the_session_is_detached() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let _one = ONE_AT_A_TIME.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let ctx = Ctx::new(Target::Spawn(relay()), dir.path(), Scale::Small);
        assert!(ctx.direct());
        let relay = ctx.relay(RelayOptions::default()).await.unwrap();
        let publisher = Publisher::open(&relay.url(), 9, None, &ctx.recorder)
            .await
            .unwrap();
        let busy = ctx.recorder.channel("busy");
        for round in 0..10u32 {
            let (ws, welcome) = keel_harness::client::open_session(&relay.url(), None)
                .await
                .unwrap();
            let mut reader = keel_harness::client::Reader::new(round, 1, ws, &ctx.recorder);
            reader
                .send(serde_json::json!({"type": "subscribe", "channel": "busy"}))
                .await
                .unwrap();
            // Deliveries on their way while the client closes.
            let flood = (0..200).map(|_| publisher.publish(busy, "busy", "{}", None));
            let flood = futures_join(flood);
            let close = async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                reader.close(Duration::from_secs(2)).await
            };
            let ((_, answered), ()) = tokio::join!(close, flood);
            assert!(answered, "the relay did not answer the close");
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut ws = keel_harness::client::connect(&relay.url(), None)
                .await
                .unwrap();
            let again = keel_harness::client::hello(
                &mut ws,
                welcome.token.as_deref(),
                &std::collections::BTreeMap::new(),
            )
            .await
            .unwrap();
            assert_eq!(again.state, "DETACHED", "round {round}");
        }
    });
}

/// Where `cargo test` leaves a report for the browser test.
fn report_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("keel-report-browser")
}
