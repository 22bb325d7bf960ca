//! keel's cross-crate load and chaos tests at small scale.
//!
//! `tests/load` runs every scenario of `cargo xtask load` at small scale
//! against a real relay process (this package's `keel-relay-test` binary:
//! keel-relay with its failpoints compiled in but unarmed), the checker's
//! self-test (each planted bug caught), plan determinism, and the HTML
//! report in a real browser. `tests/chaos` runs the scenarios of
//! `cargo xtask chaos` the same way.

use std::path::Path;

use keel_harness::fixture::{RelayBinary, Target};
use keel_harness::report::Status;
use keel_harness::{RunOptions, Scale, Suite};

/// Scenarios share two cores: one at a time within a test binary.
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Options for a small-scale run of `scenarios` of `suite` against `relay`.
pub fn small_options(
    suite: Suite,
    scenarios: &[&str],
    relay: &Path,
    report: &Path,
    seed: u64,
) -> RunOptions {
    RunOptions {
        suite,
        scenarios: scenarios.iter().map(|s| (*s).to_owned()).collect(),
        scale: Scale::Small,
        duration: None,
        iterations: None,
        seed,
        target: Target::Spawn(RelayBinary::at(relay)),
        report_root: report.to_path_buf(),
        compare: None,
        command: format!("cargo test ({}: {})", suite.as_str(), scenarios.join(", ")),
        verbose: false,
        keep_actions: None,
        relay_env: Vec::new(),
    }
}

/// Runs one scenario at small scale; it must end without a violation, a
/// red threshold or a harness error (yellow is allowed: a debug build on a
/// shared machine may miss keel's own speed targets, never the seed floors).
#[track_caller]
pub fn small_run(suite: Suite, name: &'static str, relay: &Path) {
    let caller = std::panic::Location::caller();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let _one = ONE_AT_A_TIME.lock().await;
        let dir = tempfile::tempdir().expect("a temporary directory");
        let summary = keel_harness::run(small_options(suite, &[name], relay, dir.path(), 20261201))
            .await
            .expect("the run");
        let s = &summary.report.scenarios[0];
        let table = keel_harness::run::table(&summary.report);
        println!("{table}");
        for n in &s.notes {
            println!("note: {n}");
        }
        assert!(
            matches!(s.status, Status::Green | Status::Yellow),
            "{name} ended {} ({caller}): {:?}\n{table}\nwitnesses: {:?}",
            s.status.as_str(),
            s.error,
            s.checks.as_ref().map(|c| c
                .checks
                .iter()
                .flat_map(|c| c.witnesses.clone())
                .collect::<Vec<_>>())
        );
        let checks = s.checks.as_ref().expect("checked");
        assert!(!checks.violated());
        assert!(summary.dir.join(name).join("plan.json").exists());
        assert!(summary.dir.join(name).join("history.jsonl").exists());
        assert!(summary.dir.join("report.html").exists());
    });
}
