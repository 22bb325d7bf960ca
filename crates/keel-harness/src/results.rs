//! The page a run becomes in `docs/results/` (`cargo xtask results`): the
//! run's header, one table of every threshold of every scenario, the
//! checker's totals, and per scenario what it did, its history's size, its
//! figures, its notes and its two charts. Generated, so that a page always
//! says what a run measured and nothing else.

use std::fmt::Write as _;
use std::path::Path;

use crate::Error;
use crate::check::CHECKS;
use crate::report::{RunReport, ScenarioReport, Status};

/// `n` with thousands separated by commas and at most `decimals` decimals
/// (trailing zeros dropped for whole numbers).
pub fn grouped(n: f64, decimals: usize) -> String {
    if !n.is_finite() {
        return n.to_string();
    }
    let text = if n.fract() == 0.0 {
        format!("{n:.0}")
    } else {
        format!("{n:.decimals$}")
    };
    let (sign, text) = match text.strip_prefix('-') {
        Some(t) => ("-", t.to_owned()),
        None => ("", text),
    };
    let (whole, frac) = text.split_once('.').unwrap_or((&text, ""));
    let mut out = String::new();
    for (i, c) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if frac.is_empty() {
        format!("{sign}{out}")
    } else {
        format!("{sign}{out}.{frac}")
    }
}

/// A figure as the page shows it: three significant digits below 100, one
/// decimal above, grouped, with its unit.
fn figure(v: f64, unit: &str) -> String {
    let text = if v.fract() == 0.0 {
        grouped(v, 0)
    } else if v.abs() >= 100.0 {
        grouped(v, 1)
    } else {
        let digits = (2 - v.abs().log10().floor() as i64).clamp(0, 6) as usize;
        let t = grouped(v, digits);
        t.trim_end_matches('0').trim_end_matches('.').to_owned()
    };
    match unit {
        "" => text,
        "%" => format!("{text} %"),
        u => format!("{text} {u}"),
    }
}

/// The run `r` as a docs/results page; its charts are linked as
/// `<charts>/<scenario>-latency.svg` and `-resources.svg`.
pub fn page(r: &RunReport, charts: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# {} suite: a full run\n", title(&r.suite));
    let _ = writeln!(
        out,
        "Command: `{}` (seed {}; `--seed {}` reproduces the plan).  ",
        r.command, r.seed, r.seed
    );
    let _ = writeln!(
        out,
        "Machine: {} CPUs, {:.0} GiB, {}, open-file limit {}.  ",
        r.machine.cpus,
        r.machine.memory_gib,
        r.machine.kernel,
        grouped(r.machine.open_files as f64, 0)
    );
    let seconds: f64 = r.scenarios.iter().map(|s| s.seconds).sum();
    let _ = writeln!(
        out,
        "Started {} UTC; commit `{}`; scale {}; target {}; exit code {}.  ",
        r.started,
        r.commit
            .as_deref()
            .map_or("unknown", |c| &c[..c.len().min(10)]),
        r.scale,
        r.target,
        r.exit_code
    );
    let count = |s: Status| r.scenarios.iter().filter(|x| x.status == s).count();
    let _ = writeln!(
        out,
        "Scenario time: {:.1} minutes. {} scenarios: {} green, {} yellow, {} red, {} violated, {} harness errors, {} not applicable.\n",
        seconds / 60.0,
        r.scenarios.len(),
        count(Status::Green),
        count(Status::Yellow),
        count(Status::Red),
        count(Status::Violated),
        count(Status::Error),
        count(Status::NotApplicable)
    );
    let _ = writeln!(
        out,
        "| scenario | status | figure | observed | seed threshold | keel target | band |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for s in &r.scenarios {
        let status = s.status.as_str();
        if s.thresholds.is_empty() {
            let _ = writeln!(out, "| `{}` | {status} | — | — | — | — | — |", s.name);
        }
        for (i, j) in s.thresholds.iter().enumerate() {
            let (name, st) = if i == 0 {
                (format!("`{}`", s.name), status)
            } else {
                (String::new(), "")
            };
            let _ = writeln!(
                out,
                "| {name} | {st} | {} | {} | {} | {} | {} |",
                j.metric,
                figure(j.observed, &j.unit),
                j.seed,
                j.target,
                j.band.as_str()
            );
        }
    }
    // The checker's totals over every scenario, every check by name.
    let totals: Vec<String> = CHECKS
        .iter()
        .map(|name| {
            let n: u64 = r
                .scenarios
                .iter()
                .filter_map(|s| s.checks.as_ref())
                .map(|v| v.count(name))
                .sum();
            format!("{n} {name}")
        })
        .collect();
    let (checked, payloads): (u64, u64) = r
        .scenarios
        .iter()
        .filter_map(|s| s.checks.as_ref())
        .fold((0, 0), |(a, b), v| {
            (a + v.stats.delivered, b + v.stats.payloads_checked)
        });
    let _ = writeln!(
        out,
        "\nChecker (every scenario): {}; {} deliveries judged, {} payloads compared with their publishes.",
        totals.join(", "),
        grouped(checked as f64, 0),
        grouped(payloads as f64, 0)
    );
    let _ = writeln!(out, "\n## Per scenario");
    for s in &r.scenarios {
        scenario(&mut out, s, charts);
    }
    out
}

fn title(suite: &str) -> String {
    let mut c = suite.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

fn scenario(out: &mut String, s: &ScenarioReport, charts: &str) {
    let _ = writeln!(out, "\n### {} — {}\n", s.name, s.status.as_str());
    let _ = writeln!(
        out,
        "{}. ({}.) keel target: {}.\n",
        s.what, s.seed, s.target
    );
    if let Some(e) = &s.error {
        let _ = writeln!(out, "**Harness error:** {e}\n");
    }
    if let Some(v) = &s.checks {
        let _ = writeln!(
            out,
            "History: {} publishes acknowledged, {} deliveries ({} payloads compared), {} deliveries expected.\n",
            grouped(v.stats.acked as f64, 0),
            grouped(v.stats.delivered as f64, 0),
            grouped(v.stats.payloads_checked as f64, 0),
            grouped(v.stats.expected_deliveries as f64, 0)
        );
        for c in v.checks.iter().filter(|c| c.count > 0) {
            let _ = writeln!(out, "- **{}**: {}", c.name, c.count);
            for w in &c.witnesses {
                let _ = writeln!(out, "  - {}", w.summary);
            }
        }
    }
    if !s.metrics.is_empty() {
        let figures: Vec<String> = s
            .metrics
            .iter()
            .map(|(k, v)| format!("{k} {}", figure(*v, "")))
            .collect();
        let _ = writeln!(out, "Measured: {}.\n", figures.join(", "));
    }
    for n in &s.notes {
        let _ = writeln!(out, "- {n}");
    }
    if !s.notes.is_empty() {
        out.push('\n');
    }
    if s.status != Status::NotApplicable {
        let _ = writeln!(
            out,
            "![{0} latency and throughput]({1}/{0}-latency.svg) ![{0} relay resources]({1}/{0}-resources.svg)",
            s.name, charts
        );
    }
}

/// Writes the page of the run in `run` (its directory) to `page_path`,
/// and copies its charts into the directory `charts` beside it (the page
/// links them relatively).
pub fn write(run: &Path, page_path: &Path, charts: &str) -> Result<(), Error> {
    let report = RunReport::read(run)?;
    let dir = page_path.parent().unwrap_or(Path::new("."));
    let chart_dir = dir.join(charts);
    std::fs::create_dir_all(&chart_dir)
        .map_err(|e| Error::io(&format!("create {}", chart_dir.display()), e))?;
    for s in &report.scenarios {
        for kind in ["latency", "resources"] {
            let from = run.join(&s.name).join(format!("{kind}.svg"));
            if from.exists() {
                std::fs::copy(&from, chart_dir.join(format!("{}-{kind}.svg", s.name)))
                    .map_err(|e| Error::io(&format!("copy {}", from.display()), e))?;
            }
        }
    }
    std::fs::write(page_path, page(&report, charts))
        .map_err(|e| Error::io(&format!("write {}", page_path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped_and_rounded() {
        assert_eq!(grouped(10_000.0, 0), "10,000");
        assert_eq!(grouped(1_324.04, 1), "1,324.0");
        assert_eq!(grouped(-1_234_567.0, 0), "-1,234,567");
        assert_eq!(grouped(999.0, 0), "999");
        assert_eq!(figure(0.755, "s"), "0.755 s");
        assert_eq!(figure(163.2, "MiB"), "163.2 MiB");
        assert_eq!(figure(4.7421, "x"), "4.74 x");
        assert_eq!(figure(0.26, "%"), "0.26 %");
        assert_eq!(figure(0.0, ""), "0");
    }
}
