//! The verdict holds outside the lab. A healthy relay stands behind
//! keel-faults' WebSocket chaos proxy, and every load scenario whose clients
//! receive deliveries runs against it as a user would run it, with
//! `--target` (here `Target::Url`), once per frame toxic: `ws_drop`,
//! `ws_duplicate`, `ws_reorder`, `ws_corrupt` on `deliver` frames (three
//! each), `ws_delay`, `ws_early_close` (the proxy answers each client's
//! close itself and passes it on late, as terminating intermediaries do),
//! and none (the proxy only forwards). The proxy records
//! what it did; the checker's witnesses must equal that record one for one
//! (channel, offset, id), of the kind each tampering must be found as, with
//! nothing else found; the run must exit 3. With no toxic, only delays,
//! or closes answered early (resumes then find sessions still ACTIVE), it
//! must exit 0. Beside the failpoints planted inside the relay
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
    /// The proxy answers each client's close itself and passes it on to
    /// the relay 500 ms later, as terminating intermediaries do: a resume
    /// right after may find the session still held (ACTIVE), which is no
    /// violation.
    EarlyClose,
}

const MODES: [Mode; 7] = [
    Mode::None,
    Mode::Drop,
    Mode::Duplicate,
    Mode::Reorder,
    Mode::Corrupt,
    Mode::Delay,
    Mode::EarlyClose,
];

/// Why the early close is moot for a scenario that never resumes a
/// session its client closed.
const NO_RESUME: &str = "its clients never resume a session they closed themselves";

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
            Mode::EarlyClose => {
                let toxic = json!({"name": "tamper", "type": "ws_early_close", "stream": "upstream",
                    "attributes": {"delay": 500}});
                return Some(serde_json::from_value(toxic).expect("a toxic the API takes"));
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
            TamperAction::Delay | TamperAction::EarlyClose => None,
        }
    }
}

/// (channel, offset, id) of a tampered message, from the proxy's record.
fn subject_of(t: &Tampering) -> (String, u64, String) {
    let field = |k: &str| t.fields.get(k);
    (
        field("channel")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned(),
        field("offset").and_then(|v| v.as_u64()).unwrap_or(0),
        field("id")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned(),
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
    // What the proxy does as a link ends (a close it held passed on, a
    // message it held never forwarded) is recorded then: every link ends
    // first (at most 5 s).
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while proxy.stats().open > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let all = proxy.tamperings();
    let truth: Vec<Tampering> = all.iter().filter(|t| t.effective).cloned().collect();
    let context = format!(
        "{scenario} with {mode:?}: status {}, exit {}, error {:?}\nground truth: {truth:#?}\nall records: {}, proxy {:?} {:?}\nverdict: {:#?}",
        s.status.as_str(),
        summary.exit_code,
        s.error,
        all.len(),
        proxy.stats(),
        proxy.toxics(),
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
        Mode::EarlyClose => {
            // The proxy answered every close itself; the relay saw each
            // 500 ms later (or never: a resume took the session over first
            // and the relay closed the old link): resumes found sessions
            // still held, and the checker must take that as the
            // asynchronous system it is.
            let closes = all
                .iter()
                .filter(|t| t.action == TamperAction::EarlyClose)
                .count();
            assert!(closes > 0, "no close was answered early: {context}");
            assert!(!verdict.violated(), "a false alarm: {context}");
            assert_eq!(summary.exit_code, EXIT_OK, "{context}");
            let history = std::fs::read_to_string(summary.dir.join(scenario).join("history.jsonl"))
                .expect("the history");
            let held = history
                .lines()
                .filter(|l| l.contains("\"f\":\"session_state\"") && l.contains("observed ACTIVE"))
                .count();
            assert!(
                held > 0,
                "no resume found its session still held: the early close proved nothing: {context}"
            );
            return format!(
                "{scenario} {mode:?}: exit {}, {closes} closes answered early, {held} resumes found the session ACTIVE, no violation",
                summary.exit_code
            );
        }
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
        &[
            (
                Mode::Reorder,
                "each channel carries one message: there is no order within a channel to break",
            ),
            (Mode::EarlyClose, NO_RESUME),
        ],
    );
}

#[test]
fn fanout_backpressure_through_a_tampering_proxy() {
    through_the_proxy("fanout_backpressure", 20, &[(Mode::EarlyClose, NO_RESUME)]);
}

#[test]
fn large_payloads_through_a_tampering_proxy() {
    through_the_proxy("large_payloads", 5, &[(Mode::EarlyClose, NO_RESUME)]);
}

#[test]
fn soak_through_a_tampering_proxy() {
    through_the_proxy("soak", 50, &[(Mode::EarlyClose, NO_RESUME)]);
}

/// Every load scenario that receives deliveries and runs against
/// `--target` has a test above; one that does not receive deliveries says
/// so here.
#[test]
fn every_target_scenario_that_receives_deliveries_is_tampered_with() {
    let source: String = include_str!("tamper.rs")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let without_deliveries = ["connections_10k", "queue_overflow"];
    for s in keel_harness::catalogue()
        .into_iter()
        .filter(|s| s.suite == Suite::Load && s.needs_process.is_none())
    {
        assert!(
            without_deliveries.contains(&s.name)
                || source.contains(&format!("through_the_proxy(\"{}\",", s.name)),
            "{} runs against --target and has no tampering test",
            s.name
        );
    }
}
