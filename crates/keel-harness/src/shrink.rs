//! `--shrink`: delta debugging over a failing plan's actions (Zeller's
//! ddmin). The plan is expanded from the seed as always; subsets of its
//! actions are re-run (`--keep-actions`) and a subset that still fails the
//! same way replaces the whole, until removing any one action makes the
//! failure disappear. The result is the minimal plan and the command that
//! reproduces it.

use std::collections::BTreeSet;

use crate::Error;
use crate::report::{ScenarioReport, Status};
use crate::run::{RunOptions, keep_actions, run};
use crate::threshold::Band;

/// How a scenario run failed: its violated checks, red thresholds and
/// harness error, by name. Empty when it passed.
pub fn signature(report: &ScenarioReport) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Some(c) = &report.checks {
        out.extend(
            c.checks
                .iter()
                .filter(|c| c.count > 0)
                .map(|c| format!("check:{}", c.name)),
        );
    }
    out.extend(
        report
            .thresholds
            .iter()
            .filter(|t| t.band == Band::Red)
            .map(|t| format!("red:{}", t.metric)),
    );
    if report.status == Status::Error {
        out.insert("error".into());
    }
    out
}

/// What shrinking found.
#[derive(Debug)]
pub struct Shrunk {
    /// The failure being shrunk (empty: the full plan passed).
    pub failure: BTreeSet<String>,
    /// The actions of the full plan.
    pub original: usize,
    /// The indices of the minimal failing plan's actions.
    pub kept: Vec<usize>,
    /// Those actions, as `t+… kind target`.
    pub actions: Vec<String>,
    /// Scenario runs it took.
    pub runs: usize,
    /// The command reproducing the minimal plan.
    pub command: String,
}

/// Runs `opts` (one scenario) and, if it fails, shrinks its plan.
pub async fn shrink(opts: RunOptions) -> Result<Shrunk, Error> {
    let scenarios = crate::run::select(opts.suite, &opts.scenarios)?;
    let [scenario] = scenarios.as_slice() else {
        return Err(Error::Usage("--shrink takes exactly one --scenario".into()));
    };
    let plan = (scenario.plan)(&crate::scenario::PlanInput {
        seed: opts.seed,
        scale: opts.scale,
        duration: opts.duration,
        iterations: opts.iterations,
    });
    let all: Vec<usize> = (0..plan.actions.len()).collect();
    let runs = std::cell::Cell::new(0);
    let trial = |keep: Vec<usize>| {
        let mut o = opts.clone();
        o.keep_actions = Some(keep);
        o.verbose = false;
        runs.set(runs.get() + 1);
        async move {
            let summary = run(o).await?;
            Ok::<_, Error>(
                summary
                    .report
                    .scenarios
                    .first()
                    .map(signature)
                    .unwrap_or_default(),
            )
        }
    };
    let failure = trial(all.clone()).await?;
    let fails = |got: &BTreeSet<String>| got.intersection(&failure).next().is_some();
    let mut kept = all.clone();
    if !failure.is_empty() {
        let mut n = 2;
        while kept.len() >= 2 {
            let chunk = kept.len().div_ceil(n);
            let mut reduced = false;
            for part in kept
                .chunks(chunk)
                .map(<[usize]>::to_vec)
                .collect::<Vec<_>>()
            {
                // The complement of each part: does the failure survive
                // without it?
                let rest: Vec<usize> = kept.iter().copied().filter(|i| !part.contains(i)).collect();
                if rest.is_empty() {
                    continue;
                }
                eprintln!(
                    "shrink: trying {} of {} actions {rest:?}",
                    rest.len(),
                    all.len()
                );
                if fails(&trial(rest.clone()).await?) {
                    kept = rest;
                    n = (n - 1).max(2);
                    reduced = true;
                    break;
                }
            }
            if !reduced {
                if n >= kept.len() {
                    break;
                }
                n = (n * 2).min(kept.len());
            }
        }
    }
    let minimal = keep_actions(plan, &kept);
    let actions = minimal
        .actions
        .iter()
        .map(|a| format!("t+{}ms {} {} {}", a.at_ms, a.kind, a.target, a.params))
        .collect();
    let mut o = opts.clone();
    o.keep_actions = Some(kept.clone());
    Ok(Shrunk {
        failure,
        original: all.len(),
        kept,
        actions,
        runs: runs.get(),
        command: o.repro(scenario),
    })
}
