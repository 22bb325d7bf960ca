//! Every scenario of `cargo xtask chaos` at small scale against a real
//! relay process (`cargo test -p keel-tests --test chaos`).

use std::path::Path;

use keel_harness::scenario::PlanInput;
use keel_harness::{Scale, Suite, catalogue};

fn relay() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_keel-relay-test"))
}

#[track_caller]
fn scenario(name: &'static str) {
    keel_tests::small_run(Suite::Chaos, name, relay());
}

#[test]
fn daemon_crash_recovery() {
    scenario("daemon_crash_recovery");
}

#[test]
fn pause_resume() {
    scenario("pause_resume");
}

#[test]
fn process_kill_during_command() {
    scenario("process_kill_during_command");
}

#[test]
fn no_orphans() {
    scenario("no_orphans");
}

#[test]
fn partition_heal() {
    scenario("partition_heal");
}

#[test]
fn half_open_links() {
    scenario("half_open_links");
}

#[test]
fn websocket_drop_reconnect() {
    scenario("websocket_drop_reconnect");
}

#[test]
fn latency_1000ms() {
    scenario("latency_1000ms");
}

#[test]
fn jitter_50_500ms() {
    scenario("jitter_50_500ms");
}

#[test]
fn thundering_herd() {
    scenario("thundering_herd");
}

#[test]
fn cascading_failures() {
    scenario("cascading_failures");
}

#[test]
fn random_connection_drops() {
    scenario("random_connection_drops");
}

#[test]
fn buffer_during_disconnect() {
    scenario("buffer_during_disconnect");
}

#[test]
fn session_sync_after_reconnect() {
    scenario("session_sync_after_reconnect");
}

#[test]
fn upstream_outage() {
    scenario("upstream_outage");
}

#[test]
fn invalid_upstream_responses() {
    scenario("invalid_upstream_responses");
}

#[test]
fn timeouts() {
    scenario("timeouts");
}

#[test]
fn rate_limit_storm() {
    scenario("rate_limit_storm");
}

#[test]
fn disk_full() {
    scenario("disk_full");
}

#[test]
fn slowloris() {
    scenario("slowloris");
}

#[test]
fn session_flood() {
    scenario("session_flood");
}

#[test]
fn corrupt_state_recovery() {
    scenario("corrupt_state_recovery");
}

#[test]
fn memory_pressure() {
    scenario("memory_pressure");
}

#[test]
fn concurrent_transitions() {
    scenario("concurrent_transitions");
}

#[test]
fn combined_stressors() {
    scenario("combined_stressors");
}

#[test]
fn chaos_monkey() {
    scenario("chaos_monkey");
}

#[test]
fn sqlite_corruption() {
    scenario("sqlite_corruption");
}

/// The relay runs under libfaketime: ignored unless asked for (`cargo test
/// -- --include-ignored`, as CI does, which installs it); asked for, a
/// missing library fails it.
#[test]
#[ignore = "needs libfaketime: cargo test -- --include-ignored"]
fn clock_steps() {
    assert!(
        keel_faults::clock::ClockSteps::library().is_some(),
        "clock_steps needs libfaketime (Debian: apt-get install libfaketime)"
    );
    scenario("clock_steps");
}

/// A cluster scenario (three nodes on PostgreSQL and NATS) at small scale.
/// These tests are ignored unless asked for (`cargo test --
/// --include-ignored`, as CI does); asked for, a missing engine fails them.
#[track_caller]
fn cluster_scenario(name: &'static str) {
    let engines = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(keel_harness::cluster::check_engines());
    if let Err(why) = engines {
        panic!("{name} needs PostgreSQL and NATS: {why}");
    }
    keel_tests::small_run(Suite::Cluster, name, relay());
}

#[test]
#[ignore = "needs PostgreSQL and NATS on 127.0.0.1: cargo test -- --include-ignored"]
fn node_kill() {
    cluster_scenario("node_kill");
}

#[test]
#[ignore = "needs PostgreSQL and NATS on 127.0.0.1: cargo test -- --include-ignored"]
fn pg_restart() {
    cluster_scenario("pg_restart");
}

#[test]
#[ignore = "needs PostgreSQL and NATS on 127.0.0.1: cargo test -- --include-ignored"]
fn nats_restart() {
    cluster_scenario("nats_restart");
}

#[test]
#[ignore = "needs PostgreSQL and NATS on 127.0.0.1: cargo test -- --include-ignored"]
fn node_partition() {
    cluster_scenario("node_partition");
}

#[test]
#[ignore = "needs PostgreSQL and NATS on 127.0.0.1: cargo test -- --include-ignored"]
fn leader_kill() {
    cluster_scenario("leader_kill");
}

#[test]
#[ignore = "needs PostgreSQL and NATS on 127.0.0.1: cargo test -- --include-ignored"]
fn cluster_crash_recovery() {
    cluster_scenario("cluster_crash_recovery");
}

#[test]
#[ignore = "needs PostgreSQL and NATS on 127.0.0.1: cargo test -- --include-ignored"]
fn cluster_thundering_herd() {
    cluster_scenario("cluster_thundering_herd");
}

#[test]
#[ignore = "needs PostgreSQL and NATS on 127.0.0.1: cargo test -- --include-ignored"]
fn cluster_chaos_monkey() {
    cluster_scenario("cluster_chaos_monkey");
}

/// Every cluster scenario of the catalogue has a test above.
#[test]
fn every_cluster_scenario_is_tested() {
    let source = include_str!("main.rs");
    for s in catalogue()
        .into_iter()
        .filter(|s| s.suite == Suite::Cluster)
    {
        assert!(
            source.contains(&format!("cluster_scenario(\"{}\")", s.name)),
            "{} has no test",
            s.name
        );
    }
}

/// Every chaos scenario of the catalogue has a test above.
#[test]
fn every_chaos_scenario_is_tested() {
    let source = include_str!("main.rs");
    for s in catalogue().into_iter().filter(|s| s.suite == Suite::Chaos) {
        assert!(
            source.contains(&format!("scenario(\"{}\")", s.name)),
            "{} has no test",
            s.name
        );
    }
}

/// The kill plan is data: one seed expands to the same kills, another
/// seed to others, and `--iterations` sets their number.
#[test]
fn kill_plans_are_deterministic_per_seed() {
    let crash = catalogue()
        .into_iter()
        .find(|s| s.name == "daemon_crash_recovery")
        .expect("in the catalogue");
    let plan = |seed, iterations| {
        (crash.plan)(&PlanInput {
            seed,
            scale: Scale::Full,
            duration: None,
            iterations,
        })
    };
    assert_eq!(plan(7, None).to_json(), plan(7, None).to_json());
    assert_ne!(plan(7, None).to_json(), plan(8, None).to_json());
    assert_eq!(plan(7, None).actions.len(), 50);
    let three = plan(7, Some(3));
    assert_eq!(three.actions.len(), 3);
    assert!(three.actions.iter().all(|a| a.kind == "kill9"));
}

/// The scenario's state checks are trusted because they catch a planted
/// bug: a relay that reports a crashed session as DETACHED (failpoint
/// `hide_crash`) is a `session_state` violation; unarmed, none.
#[test]
fn crash_scenario_catches_a_hidden_crash() {
    use keel_harness::check::check;
    use keel_harness::fixture::{RelayBinary, Target};
    use keel_harness::scenario::Ctx;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let _one = keel_tests::ONE_AT_A_TIME.lock().await;
        let crash = catalogue()
            .into_iter()
            .find(|s| s.name == "daemon_crash_recovery")
            .unwrap();
        let plan = (crash.plan)(&PlanInput {
            seed: 11,
            scale: Scale::Small,
            duration: None,
            iterations: Some(2),
        });
        let dir = tempfile::tempdir().unwrap();
        let ctx = Ctx::new(
            Target::Spawn(RelayBinary::at(relay())),
            dir.path(),
            Scale::Small,
        )
        .with_relay_env(&[("KEEL_FAILPOINTS", "hide_crash=1")]);
        (crash.run)(&ctx, &plan).await.unwrap();
        let verdict = check(&ctx.recorder.take());
        let hidden = verdict.count("session_state");
        assert!(
            hidden > 0,
            "hide_crash planted, nothing caught: {verdict:?}"
        );
        assert_eq!(verdict.count("lost") + verdict.count("duplicated"), 0);
    });
}

/// `--shrink` is trusted because it finds a planted bug's trigger: with
/// `hide_crash` armed (crash recovery skipped, so a welcome after a kill
/// does not say CRASHED), a monkey plan that mixes fault kinds fails, and
/// delta debugging must leave exactly one fault, a SIGKILL.
#[test]
fn shrinking_isolates_the_fault_that_triggers_a_planted_bug() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let _one = keel_tests::ONE_AT_A_TIME.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let mut opts =
            keel_tests::small_options(Suite::Chaos, &["chaos_monkey"], relay(), dir.path(), 17);
        opts.duration = Some(std::time::Duration::from_secs(12));
        opts.relay_env = vec![("KEEL_FAILPOINTS".into(), "hide_crash=1".into())];
        let monkey = catalogue()
            .into_iter()
            .find(|s| s.name == "chaos_monkey")
            .unwrap();
        let plan = (monkey.plan)(&PlanInput {
            seed: 17,
            scale: Scale::Small,
            duration: opts.duration,
            iterations: None,
        });
        let kinds: Vec<&str> = plan.actions.iter().map(|a| a.kind.as_str()).collect();
        assert!(
            kinds.contains(&"kill9") && kinds.iter().any(|k| *k != "kill9"),
            "seed 17 mixes a kill with other faults: {kinds:?}"
        );
        let shrunk = keel_harness::shrink::shrink(opts).await.unwrap();
        println!("{shrunk:?}");
        assert!(
            shrunk.failure.contains("check:session_state"),
            "the planted bug is seen: {:?}",
            shrunk.failure
        );
        assert_eq!(shrunk.kept.len(), 1, "one fault left: {:?}", shrunk.actions);
        assert_eq!(kinds[shrunk.kept[0]], "kill9");
        assert!(shrunk.command.contains(&format!(
            "--keep-actions {} --failpoints hide_crash=1",
            shrunk.kept[0]
        )));
    });
}

/// A session taken over by a new connection while its old connection is
/// still closing stays ACTIVE: the chaos monkey found it DETACHED (so not
/// CRASHED after the next kill) when the old link's close arrived late,
/// after a blackhole healed. `slow_detach` widens that race on purpose.
#[test]
fn a_late_close_of_a_replaced_connection_leaves_the_session_active() {
    use keel_harness::client::{connect, hello, open_session};
    use keel_harness::fixture::{RelayBinary, RelayOptions, Target};
    use keel_harness::scenario::Ctx;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let _one = keel_tests::ONE_AT_A_TIME.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let ctx = Ctx::new(
            Target::Spawn(RelayBinary::at(relay())),
            dir.path(),
            Scale::Small,
        )
        .with_relay_env(&[("KEEL_FAILPOINTS", "slow_detach=500")]);
        let mut relay = ctx.relay(RelayOptions::default()).await.unwrap();
        let (old, welcome) = open_session(&relay.url(), None).await.unwrap();
        let token = welcome.token.unwrap();
        // The old connection closes; its DETACHED write is 500 ms away when
        // the new one says hello and reads the session ACTIVE.
        drop(old);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let mut new = connect(&relay.url(), None).await.unwrap();
        let w = hello(&mut new, Some(&token), &Default::default())
            .await
            .unwrap();
        assert_eq!(w.state, "ACTIVE", "the old close had not been written yet");
        tokio::time::sleep(std::time::Duration::from_millis(1_000)).await;
        // Connected at the kill: CRASHED on the next welcome.
        relay.kill9().await.unwrap();
        relay.restart().await.unwrap();
        let mut again = connect(&relay.url(), None).await.unwrap();
        let w = hello(&mut again, Some(&token), &Default::default())
            .await
            .unwrap();
        assert_eq!(w.state, "CRASHED", "the session was held at the kill");
        drop(new);
    });
}
