//! The verdict holds outside the lab. A healthy relay stands behind
//! keel-faults' WebSocket chaos proxy, and every load scenario whose clients
//! receive deliveries runs against it as a user would run it, with
//! `--target` (here `Target::Url`), once per frame toxic: `ws_drop`,
//! `ws_duplicate`, `ws_reorder`, `ws_corrupt` on `deliver` frames (three
//! each), `ws_delay`, and none (the proxy only forwards). The proxy records
//! what it did; the checker's witnesses must equal that record one for one
//! (channel, offset, id), of the kind each tampering must be found as, with
//! nothing else found; the run must exit 3. With no toxic, or only delays,
//! it must exit 0. Beside the failpoints planted inside the relay
//! (`checker_catches_every_planted_bug`), this is the evidence that the
//! checker sees what a relay or anything in front of it does wrong, and
//! cries wolf on nothing.

use std::collections::BTreeMap;
use std::path::Path;

use keel_faults::{Protocol, Proxy, ProxyConfig, TamperAction, Tampering, Toxic};
use keel_harness::fixture::{RelayOptions, RelayProcess, Remote, Resources, Target};
use keel_harness::report::Status;
use keel_harness::run::{EXIT_OK, EXIT_VIOLATED};
use keel_harness::{Suite, check};
use serde_json::json;

use keel_tests::ONE_AT_A_TIME;

/// What each run puts on the proxy, and what the checker must call it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    None,
    Drop,
    Duplicate,
    Reorder,
    Corrupt,
    Delay,
}

const MODES: [Mode; 6] = [
    Mode::None,
    Mode::Drop,
    Mode::Duplicate,
    Mode::Reorder,
    Mode::Corrupt,
    Mode::Delay,
];

/// Tamperings per run.
const LIMIT: u64 = 3;

impl Mode {
    /// The toxic (as the proxy's HTTP API takes it): one `deliver` frame in
    /// `every`, at most [`LIMIT`].
    fn toxic(self, every: u64) -> Option<Toxic> {
        let attributes = json!({"match": {"type": "deliver"}, "every": every, "limit": LIMIT});
        let (kind, attributes) = match self {
            Mode::None => return None,
            Mode::Drop => ("ws_drop", attributes),
            Mode::Duplicate => ("ws_duplicate", attributes),
            Mode::Reorder => {
                let mut a = attributes;
                a["same"] = json!(["channel"]);
                ("ws_reorder", a)
            }
            Mode::Corrupt => ("ws_corrupt", attributes),
            Mode::Delay => {
                let mut a = attributes;
                a["delay"] = json!(200);
                ("ws_delay", a)
            }
        };
        let toxic = json!({"name": "tamper", "type": kind, "stream": "downstream", "attributes": attributes});
        Some(serde_json::from_value(toxic).expect("a toxic the API takes"))
    }

    /// The check a tampering of this kind must show up as.
    fn caught_as(action: TamperAction) -> Option<&'static str> {
        match action {
            TamperAction::Drop => Some("lost"),
            TamperAction::Duplicate => Some("duplicated"),
            TamperAction::Reorder => Some("reordered"),
            TamperAction::Corrupt => Some("corrupted"),
            TamperAction::Delay => None,
        }
    }
}

/// (channel, offset, id) of a tampered message, from the proxy's record.
fn subject_of(t: &Tampering) -> (String, u64, String) {
    (
        t.fields["channel"].as_str().unwrap_or_default().to_owned(),
        t.fields["offset"].as_u64().unwrap_or(0),
        t.fields["id"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Runs `scenario` against the relay through `proxy` with `mode`'s toxic;
/// asserts the verdict against the proxy's record. Returns a line for the
/// test's output.
async fn one(scenario: &str, mode: Mode, every: u64, proxy: &Proxy, dir: &Path) -> String {
    if let Some(t) = mode.toxic(every) {
        proxy.add_toxic(t).expect("the toxic");
    }
    let url = format!("ws://{}/ws", proxy.listen_addr());
    let mut opts =
        keel_tests::small_options(Suite::Load, &[scenario], Path::new(""), dir, 20261206);
    // As a user runs it: --target, the metrics read through the proxy too.
    opts.target = Target::Url(Remote::new(&url));
    let summary = keel_harness::run(opts).await.expect("the run");
    let s = &summary.report.scenarios[0];
    let verdict: &check::Verdict = s.checks.as_ref().expect("checked");
    let truth: Vec<Tampering> = proxy
        .tamperings()
        .into_iter()
        .filter(|t| t.effective)
        .collect();
    let context = format!(
        "{scenario} with {mode:?}: status {}, exit {}, error {:?}\nground truth: {truth:#?}\nverdict: {:#?}",
        s.status.as_str(),
        summary.exit_code,
        s.error,
        verdict.checks
    );
    // What the proxy did, by the check it must be found as.
    let mut want: BTreeMap<&str, Vec<(String, u64, String)>> = BTreeMap::new();
    for t in &truth {
        if let Some(check) = Mode::caught_as(t.action) {
            want.entry(check).or_default().push(subject_of(t));
        }
    }
    match mode {
        Mode::None | Mode::Delay => {
            assert!(want.is_empty(), "nothing but delays was planted: {context}");
            assert!(!verdict.violated(), "a false alarm: {context}");
            assert_eq!(summary.exit_code, EXIT_OK, "{context}");
            assert!(
                matches!(s.status, Status::Green | Status::Yellow),
                "{context}"
            );
            if let Mode::Delay = mode {
                assert!(!truth.is_empty(), "no frame was delayed: {context}");
            }
        }
        _ => {
            // The test must be able to fail: something was tampered with.
            assert!(!want.is_empty(), "the toxic never acted: {context}");
            if !matches!(mode, Mode::Reorder) {
                assert_eq!(truth.len() as u64, LIMIT, "{context}");
            }
            assert_eq!(summary.exit_code, EXIT_VIOLATED, "{context}");
            for c in &verdict.checks {
                let mut planted = want.get(c.name.as_str()).cloned().unwrap_or_default();
                assert_eq!(
                    c.count,
                    planted.len() as u64,
                    "{}: one witness per tampering, nothing else: {context}",
                    c.name
                );
                let mut found: Vec<(String, u64, String)> = c
                    .witnesses
                    .iter()
                    .map(|w| {
                        let s = w.subject.clone().expect("a witness about a message");
                        (s.channel, s.offset, s.id)
                    })
                    .collect();
                planted.sort();
                found.sort();
                assert_eq!(
                    found, planted,
                    "{}: witnesses against ground truth: {context}",
                    c.name
                );
            }
        }
    }
    format!(
        "{scenario} {mode:?}: exit {}, {} tampered, violations {:?}",
        summary.exit_code,
        truth.len(),
        verdict
            .checks
            .iter()
            .filter(|c| c.count > 0)
            .map(|c| (c.name.as_str(), c.count))
            .collect::<Vec<_>>()
    )
}

/// Every mode against `scenario` but those in `moot` (with why), tampering
/// with one `deliver` frame in `every`: for each, a fresh relay (a run
/// kills every process the harness registered when it ends) behind a fresh
/// proxy.
#[track_caller]
fn through_the_proxy(scenario: &'static str, every: u64, moot: &[(Mode, &str)]) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let _one = ONE_AT_A_TIME.lock().await;
        let dir = tempfile::tempdir().expect("a temporary directory");
        for mode in MODES {
            if let Some((_, why)) = moot.iter().find(|(m, _)| *m == mode) {
                println!("{scenario} {mode:?}: skipped, moot: {why}");
                continue;
            }
            let relay = RelayProcess::start(
                &super::relay(),
                RelayOptions::default(),
                &dir.path().join("relay.log"),
                &Resources::default(),
                tokio::time::Instant::now(),
            )
            .await
            .expect("a relay");
            let proxy = Proxy::start(ProxyConfig {
                name: "frames".into(),
                listen: "127.0.0.1:0".parse().expect("an address"),
                upstream: relay.addr(),
                seed: 20261206,
                protocol: Protocol::WebSocket,
            })
            .await
            .expect("the proxy");
            println!("{}", one(scenario, mode, every, &proxy, dir.path()).await);
        }
    });
}

#[test]
fn session_isolation_through_a_tampering_proxy() {
    through_the_proxy("session_isolation", 10, &[]);
}

#[test]
fn database_contention_through_a_tampering_proxy() {
    through_the_proxy("database_contention", 10, &[]);
}

#[test]
fn subscriptions_50k_through_a_tampering_proxy() {
    through_the_proxy(
        "subscriptions_50k",
        10,
        &[(
            Mode::Reorder,
            "each channel carries one message: there is no order within a channel to break",
        )],
    );
}

#[test]
fn fanout_backpressure_through_a_tampering_proxy() {
    through_the_proxy("fanout_backpressure", 20, &[]);
}

#[test]
fn large_payloads_through_a_tampering_proxy() {
    through_the_proxy("large_payloads", 5, &[]);
}

#[test]
fn soak_through_a_tampering_proxy() {
    through_the_proxy("soak", 50, &[]);
}

/// Every load scenario that receives deliveries and runs against
/// `--target` has a test above; one that does not receive deliveries says
/// so here.
#[test]
fn every_target_scenario_that_receives_deliveries_is_tampered_with() {
    let source = include_str!("tamper.rs");
    let without_deliveries = ["connections_10k", "queue_overflow"];
    for s in keel_harness::catalogue()
        .into_iter()
        .filter(|s| s.suite == Suite::Load && s.needs_process.is_none())
    {
        assert!(
            without_deliveries.contains(&s.name)
                || source.contains(&format!("through_the_proxy(\"{}\"", s.name)),
            "{} runs against --target and has no tampering test",
            s.name
        );
    }
}
