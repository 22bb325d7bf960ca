//! Runs a suite: expands and prints each plan, runs the scenario with a live
//! progress display, checks its history, judges its thresholds, writes the
//! run directory (`target/keel-report/<stamp>-<suite>/`) and decides the exit
//! code. Ctrl-C kills every child and removes temporary directories.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use comfy_table::{Cell, Color, ColumnConstraint, ContentArrangement, Table};

use crate::Error;
use crate::check::check;
use crate::fixture::{Target, kill_all};
use crate::report::{Comparison, Machine, RunReport, ScenarioReport, Series, Status};
use crate::scenario::{Ctx, Plan, PlanInput, Scale, Scenario, Suite};
use crate::threshold::{Band, judge, num};

/// Exit code: every scenario green or yellow.
pub const EXIT_OK: i32 = 0;
/// Exit code: the harness failed.
pub const EXIT_HARNESS: i32 = 1;
/// Exit code: an invariant was violated.
pub const EXIT_VIOLATED: i32 = 3;
/// Exit code: a threshold is red.
pub const EXIT_RED: i32 = 4;

/// Lines of `history.jsonl` written per scenario at most.
const MAX_HISTORY_LINES: usize = 2_000_000;

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The suite.
    pub suite: Suite,
    /// Scenario names (empty: the whole suite).
    pub scenarios: Vec<String>,
    /// The scale.
    pub scale: Scale,
    /// `--duration`.
    pub duration: Option<Duration>,
    /// `--iterations`.
    pub iterations: Option<usize>,
    /// The master seed.
    pub seed: u64,
    /// What to run against.
    pub target: Target,
    /// Where run directories go (`target/keel-report`).
    pub report_root: PathBuf,
    /// An earlier report to compare with.
    pub compare: Option<PathBuf>,
    /// The command line, for the report.
    pub command: String,
    /// Print the plans and progress (false in tests).
    pub verbose: bool,
    /// Run only these actions of each plan (by index; `--keep-actions`,
    /// what `--shrink` prints): the plan is expanded from the seed as
    /// always, then the others are dropped.
    pub keep_actions: Option<Vec<usize>>,
    /// Environment for every relay started (`--failpoints` sets
    /// `KEEL_FAILPOINTS`).
    pub relay_env: Vec<(String, String)>,
}

impl RunOptions {
    /// The command that reproduces a run of `scenario` with these options.
    pub fn repro(&self, scenario: &Scenario) -> String {
        let mut cmd = scenario.repro(self.seed, self.scale);
        if let Some(d) = self.duration {
            cmd.push_str(&format!(" --duration {}s", d.as_secs_f64()));
        }
        if let Some(n) = self.iterations {
            cmd.push_str(&format!(" --iterations {n}"));
        }
        if let Some(keep) = &self.keep_actions {
            let list: Vec<String> = keep.iter().map(usize::to_string).collect();
            cmd.push_str(&format!(" --keep-actions {}", list.join(",")));
        }
        for (k, v) in &self.relay_env {
            if k == "KEEL_FAILPOINTS" {
                cmd.push_str(&format!(" --failpoints {v}"));
            }
        }
        cmd
    }
}

/// `plan` with only the actions at `keep` (a repeat count in `iterations`
/// follows).
pub fn keep_actions(mut plan: Plan, keep: &[usize]) -> Plan {
    plan.actions = plan
        .actions
        .into_iter()
        .enumerate()
        .filter(|(i, _)| keep.contains(i))
        .map(|(_, a)| a)
        .collect();
    if plan.params.contains_key("iterations") {
        plan.params
            .insert("iterations".into(), serde_json::json!(plan.actions.len()));
    }
    plan
}

/// What a run produced.
#[derive(Debug)]
pub struct RunSummary {
    /// The run directory.
    pub dir: PathBuf,
    /// The exit code (see the `EXIT_*` constants).
    pub exit_code: i32,
    /// The report.
    pub report: RunReport,
}

/// Looks scenarios up by name in `suite`; an unknown name is a usage error
/// that lists the known ones.
pub fn select(suite: Suite, names: &[String]) -> Result<Vec<Scenario>, Error> {
    let all: Vec<Scenario> = crate::catalogue()
        .into_iter()
        .filter(|s| s.suite == suite)
        .collect();
    if names.is_empty() {
        return Ok(all);
    }
    names
        .iter()
        .map(|n| {
            all.iter().find(|s| s.name == n).copied().ok_or_else(|| {
                Error::Usage(format!(
                    "no {} scenario named {n:?}; known: {}",
                    suite.as_str(),
                    all.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                ))
            })
        })
        .collect()
}

/// `YYYYMMDDTHHMMSSZ` now: keel-recovery's stamp, whole seconds.
pub fn utc_stamp() -> String {
    let stamp = keel_recovery::utc_stamp(std::time::SystemTime::now());
    format!("{}Z", &stamp[..15])
}

/// Runs the suite. Ctrl-C ends it with [`Error::Interrupted`] after killing
/// every child.
pub async fn run(opts: RunOptions) -> Result<RunSummary, Error> {
    let scenarios = select(opts.suite, &opts.scenarios)?;
    // The harness holds one descriptor per client connection (up to
    // 19,000 at full scale): the soft limit goes up to the hard one.
    match keel_recovery::raise_open_files() {
        Ok(f) if f.now > f.before => {
            eprintln!("open-file limit raised from {} to {}", f.before, f.now)
        }
        Ok(f) => eprintln!("open-file limit: {}", f.now),
        Err(e) => eprintln!("cannot read or raise the open-file limit: {e}"),
    }
    let started = utc_stamp();
    let dir = opts
        .report_root
        .join(format!("{started}-{}", opts.suite.as_str()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(&format!("create {}", dir.display()), e))?;
    let body = run_in(&opts, &scenarios, &dir, &started);
    let result = tokio::select! {
        r = body => r,
        _ = tokio::signal::ctrl_c() => {
            let killed = kill_all();
            eprintln!("interrupted: killed {killed} child process(es); partial results in {}", dir.display());
            Err(Error::Interrupted)
        }
    };
    // Whatever happened, no child outlives the run.
    kill_all();
    result
}

async fn run_in(
    opts: &RunOptions,
    scenarios: &[Scenario],
    dir: &Path,
    started: &str,
) -> Result<RunSummary, Error> {
    let mut reports = Vec::new();
    let commit = git_commit();
    let live = opts.verbose && std::io::stderr().is_terminal();
    for s in scenarios {
        let input = PlanInput {
            seed: opts.seed,
            scale: opts.scale,
            duration: opts.duration,
            iterations: opts.iterations,
        };
        let mut plan = (s.plan)(&input);
        if let Some(keep) = &opts.keep_actions {
            plan = keep_actions(plan, keep);
        }
        let sdir = dir.join(s.name);
        std::fs::create_dir_all(&sdir).map_err(|e| Error::io("create a scenario directory", e))?;
        std::fs::write(sdir.join("plan.json"), plan.to_json())
            .map_err(|e| Error::io("write plan.json", e))?;
        if opts.verbose {
            eprintln!("\n== {} ({})\n{}", s.name, s.what, plan.summary(8));
        }
        let repro = opts.repro(s);
        let base = ScenarioReport {
            name: s.name.to_owned(),
            what: s.what.to_owned(),
            seed: ScenarioReport::seed_text(&s.seed),
            target: s.target.to_owned(),
            status: Status::Error,
            error: None,
            repro: repro.clone(),
            params: plan.params.clone(),
            seconds: 0.0,
            metrics: Default::default(),
            thresholds: Vec::new(),
            checks: None,
            history_lines: (0, 0),
            notes: Vec::new(),
            series: Series::default(),
        };
        if let (Target::Url(_), Some(why)) = (&opts.target, s.needs_process) {
            reports.push(ScenarioReport {
                status: Status::NotApplicable,
                notes: vec![format!("not applicable to --target: it {why}")],
                ..base
            });
            continue;
        }
        let env: Vec<(&str, &str)> = opts
            .relay_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let ctx = Ctx::new(opts.target.clone(), &sdir, opts.scale).with_relay_env(&env);
        let t0 = Instant::now();
        let budget = match opts.scale {
            Scale::Small => Duration::from_secs(180),
            _ => {
                s.budget.mul_f64(match opts.scale {
                    Scale::Factor(f) => f.max(1.0),
                    _ => 1.0,
                }) + opts.duration.unwrap_or_default()
            }
        };
        let progress = show_progress(&ctx, s.name, live, opts.verbose);
        let outcome = tokio::time::timeout(budget, (s.run)(&ctx, &plan)).await;
        progress.abort();
        let seconds = t0.elapsed().as_secs_f64();
        let history = ctx.recorder.take();
        let history_lines = history
            .write_jsonl(&sdir.join("history.jsonl"), MAX_HISTORY_LINES)
            .map_err(|e| Error::io("write history.jsonl", e))?;
        let verdict = check(&history);
        let mut series = Series {
            faults: history
                .faults
                .iter()
                .map(|f| (f.start as f64 / 1e6, f.end as f64 / 1e6, f.kind.clone()))
                .collect(),
            resources: resources_series(&ctx),
            ..Default::default()
        };
        crate::chart::fill(&mut series, &history);
        write_resources_csv(&sdir, &series)?;
        let report = match outcome {
            Err(_) => ScenarioReport {
                status: errored(&verdict),
                error: Some(format!("did not finish within its budget of {budget:?}")),
                seconds,
                checks: Some(verdict),
                history_lines,
                series,
                ..base
            },
            Ok(Err(e @ Error::UnknownMetric(_))) => return Err(e),
            // The machine lacks what the scenario needs (root for a tmpfs,
            // say): said so, and left out of the exit code.
            Ok(Err(Error::NotApplicable(why))) => ScenarioReport {
                status: Status::NotApplicable,
                notes: vec![format!("not applicable: {why}")],
                seconds,
                checks: Some(verdict),
                history_lines,
                series,
                ..base
            },
            Ok(Err(e)) => ScenarioReport {
                status: errored(&verdict),
                error: Some(e.to_string()),
                seconds,
                checks: Some(verdict),
                history_lines,
                series,
                ..base
            },
            Ok(Ok(measured)) => {
                series.latency = measured
                    .latency
                    .as_ref()
                    .map(|l| {
                        l.series()
                            .into_iter()
                            .map(|(t, p50, p99, _)| (t, p50, p99))
                            .collect()
                    })
                    .unwrap_or_default();
                series.throughput = measured.throughput.clone();
                let mut metrics = measured.metrics.clone();
                metrics.insert("violations".into(), verdict.violations() as f64);
                let thresholds = judge(&(s.thresholds)(&plan), &metrics)?;
                let status = ScenarioReport::judge(&verdict, &thresholds);
                ScenarioReport {
                    status,
                    seconds,
                    metrics,
                    thresholds,
                    checks: Some(verdict),
                    history_lines,
                    notes: measured.notes,
                    series,
                    ..base
                }
            }
        };
        if opts.verbose {
            eprintln!(
                "{}: {} in {:.1} s{}",
                s.name,
                report.status.as_str(),
                seconds,
                report
                    .error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            );
            if report.status != Status::Green && report.status != Status::NotApplicable {
                eprintln!("   reproduce: {repro}");
            }
        }
        reports.push(report);
        // What this scenario wrote and deleted (a soak's database, its
        // history) reaches the disk now, not during the next scenario,
        // whose fsyncs would wait behind it.
        nix::unistd::sync();
    }
    let exit_code = exit_code(&reports);
    let comparison = match &opts.compare {
        Some(path) => Some(compare(&RunReport::read(path)?, &reports)),
        None => None,
    };
    let report = RunReport {
        schema: crate::report::SCHEMA,
        suite: opts.suite.as_str().to_owned(),
        started: started.to_owned(),
        command: opts.command.clone(),
        machine: Machine::here(),
        commit,
        seed: opts.seed,
        scale: opts.scale.label(),
        target: match &opts.target {
            Target::Spawn(b) => format!("spawned {}", b.program.display()),
            Target::Url(r) => format!("{} (metrics {})", r.url, r.metrics),
        },
        scenarios: reports,
        comparison,
        exit_code,
    };
    report.write(dir)?;
    Ok(RunSummary {
        dir: dir.to_path_buf(),
        exit_code,
        report,
    })
}

/// A scenario that ended in a harness error: a violation its history shows
/// up to the error still stands (a duplicate, a corruption, an order, a
/// state), except `lost`: a scenario cut short leaves messages acknowledged
/// and not yet delivered, and deliveries read and not yet recorded, so a
/// loss there proves nothing. Otherwise the result is unknown.
fn errored(verdict: &crate::check::Verdict) -> Status {
    if verdict.violations() > verdict.count("lost") {
        Status::Violated
    } else {
        Status::Error
    }
}

/// 3 if any invariant was violated, else 4 if any threshold is red, else 1
/// if the harness failed on any scenario, else 0 (yellow exits 0).
pub fn exit_code(reports: &[ScenarioReport]) -> i32 {
    let any = |s: Status| reports.iter().any(|r| r.status == s);
    if any(Status::Violated) {
        EXIT_VIOLATED
    } else if any(Status::Red) {
        EXIT_RED
    } else if any(Status::Error) {
        EXIT_HARNESS
    } else {
        EXIT_OK
    }
}

fn resources_series(ctx: &Ctx) -> Vec<(f64, f64, f64, f64)> {
    let samples = ctx.resources.samples();
    let mut out = Vec::with_capacity(samples.len());
    let mut prev: Option<(f64, Duration)> = None;
    for (t, s) in samples {
        let cpu = match prev {
            Some((pt, pc)) if t > pt && s.cpu_time >= pc => {
                (s.cpu_time - pc).as_secs_f64() / (t - pt) * 100.0
            }
            _ => 0.0,
        };
        prev = Some((t, s.cpu_time));
        out.push((
            t,
            s.rss_bytes as f64 / (1024.0 * 1024.0),
            s.open_fds as f64,
            cpu,
        ));
    }
    out
}

fn write_resources_csv(dir: &Path, s: &Series) -> Result<(), Error> {
    let mut csv = String::from("seconds,rss_mib,open_fds,cpu_percent\n");
    for (t, rss, fds, cpu) in &s.resources {
        csv.push_str(&format!("{t:.3},{rss:.2},{fds},{cpu:.1}\n"));
    }
    std::fs::write(dir.join("resources.csv"), csv).map_err(|e| Error::io("write resources.csv", e))
}

/// The commit the run starts on, `+dirty` when tracked files differ from
/// it. Read before the first scenario: a commit made while a long run
/// goes on is not what the run measured.
fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let head = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let clean = std::process::Command::new("git")
        .args(["diff", "--quiet", "HEAD", "--"])
        .status()
        .is_ok_and(|s| s.success());
    Some(if clean { head } else { format!("{head}+dirty") })
}

/// Live progress: an indicatif spinner per scenario on a terminal, a plain
/// line every 5 s otherwise (CI logs).
fn show_progress(
    ctx: &Ctx,
    name: &'static str,
    live: bool,
    verbose: bool,
) -> tokio::task::JoinHandle<()> {
    let recorder = ctx.recorder.clone();
    let started = Instant::now();
    let phase = ctx.phase_handle();
    tokio::spawn(async move {
        if !verbose {
            return;
        }
        let bar = live.then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {prefix:.bold} {elapsed:>4} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            b.set_prefix(name);
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        let mut last = (0u64, 0u64, Instant::now());
        let mut tick = tokio::time::interval(if live {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(5)
        });
        tick.tick().await;
        loop {
            tick.tick().await;
            let (acked, failed, delivered, suspicious) = recorder.counts();
            let dt = last.2.elapsed().as_secs_f64().max(1e-3);
            let rate = (acked + delivered).saturating_sub(last.0 + last.1) as f64 / dt;
            last = (acked, delivered, Instant::now());
            let msg = format!(
                "{} · {} acked · {} refused/unknown · {} delivered · {}/s · {} suspicious",
                phase.lock().unwrap_or_else(|p| p.into_inner()),
                acked,
                failed,
                delivered,
                num(rate.round()),
                suspicious
            );
            match &bar {
                Some(b) => b.set_message(msg),
                None => eprintln!("  [{name} {:>5.0}s] {msg}", started.elapsed().as_secs_f64()),
            }
        }
    })
}

/// Compares this run with an earlier one, metric by metric. The noise of a
/// metric is what this run measured of itself: for rates and latencies, the
/// spread (coefficient of variation) of the per-second throughput windows
/// of the scenario, at least 5%; a change is flagged when it is beyond
/// twice the noise.
pub fn compare(before: &RunReport, now: &[ScenarioReport]) -> Vec<Comparison> {
    let mut rows = Vec::new();
    for s in now {
        let Some(old) = before.scenarios.iter().find(|o| o.name == s.name) else {
            continue;
        };
        let noise = noise_pct(&s.series).max(noise_pct(&old.series)).max(5.0);
        for (metric, after) in &s.metrics {
            let Some(before) = old.metrics.get(metric) else {
                continue;
            };
            let change_pct = if *before == 0.0 {
                if *after == 0.0 { 0.0 } else { 100.0 }
            } else {
                (after - before) / before.abs() * 100.0
            };
            rows.push(Comparison {
                scenario: s.name.clone(),
                metric: metric.clone(),
                before: *before,
                after: *after,
                change_pct,
                noise_pct: noise,
                flagged: change_pct.abs() > 2.0 * noise,
            });
        }
    }
    rows
}

fn noise_pct(s: &Series) -> f64 {
    let v: Vec<f64> = s
        .throughput
        .iter()
        .map(|(_, r)| *r)
        .filter(|r| *r > 0.0)
        .collect();
    if v.len() < 3 {
        return 0.0;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64;
    var.sqrt() / mean * 100.0
}

/// Columns a table is fitted to when its output is not a terminal (a pipe,
/// a log file, CI): what a reader's terminal shows without scrolling.
pub const PIPE_COLUMNS: u16 = 100;

/// A table that fits the terminal: on a terminal, its width (comfy-table
/// reads it); otherwise `$COLUMNS` when set, else [`PIPE_COLUMNS`]. Long
/// cells wrap inside their column instead of widening the table.
pub fn fitted_table() -> Table {
    fitted_table_in(None)
}

/// [`fitted_table`] `columns` wide when given (whatever the output is).
pub fn fitted_table_in(columns: Option<u16>) -> Table {
    let mut t = Table::new();
    t.set_content_arrangement(ContentArrangement::Dynamic);
    let columns = match columns {
        Some(c) => Some(c),
        None if t.is_tty() => None,
        None => Some(
            std::env::var("COLUMNS")
                .ok()
                .and_then(|c| c.trim().parse::<u16>().ok())
                .filter(|c| *c >= 40)
                .unwrap_or(PIPE_COLUMNS),
        ),
    };
    if let Some(c) = columns {
        t.force_no_tty().set_width(c);
    }
    t
}

/// `--list`: the suite's scenarios, what each comes from and is held to,
/// and whether it runs against `--target` (fitted as [`fitted_table_in`]).
pub fn catalogue_table(suite: Suite, columns: Option<u16>) -> String {
    let mut t = fitted_table_in(columns);
    t.set_header(vec![
        "scenario",
        "seed test",
        "seed threshold",
        "keel target",
        "--target",
    ]);
    for s in crate::catalogue().into_iter().filter(|s| s.suite == suite) {
        t.add_row(vec![
            s.name.to_owned(),
            format!("{} {}", s.seed.seed, s.seed.test),
            s.seed.threshold.to_owned(),
            s.target.to_owned(),
            match s.needs_process {
                Some(why) => format!("no: it {why}"),
                None => "yes".into(),
            },
        ]);
    }
    keep_whole(&mut t, 0);
    t.to_string()
}

/// Keeps column `i` as wide as its widest line (a scenario's name, a
/// status, a time), so that wrapping happens in the prose columns.
pub fn keep_whole(t: &mut Table, i: usize) {
    if let Some(c) = t.column_mut(i) {
        c.set_constraint(ColumnConstraint::ContentWidth);
    }
}

/// The verdict table for the terminal.
pub fn table(report: &RunReport) -> String {
    let mut t = fitted_table();
    t.set_header(vec![
        "scenario",
        "status",
        "figures (observed | seed | keel target)",
        "checker",
        "time",
    ]);
    for s in &report.scenarios {
        let color = match s.status {
            Status::Green => Color::Green,
            Status::Yellow => Color::Yellow,
            Status::NotApplicable => Color::Grey,
            _ => Color::Red,
        };
        let figures: Vec<String> = s
            .thresholds
            .iter()
            .map(|j| {
                format!(
                    "{} {}{} | {} | {}{}",
                    j.metric,
                    num(j.observed),
                    j.unit,
                    j.seed,
                    j.target,
                    match j.band {
                        Band::Green => "",
                        Band::Yellow => "  (yellow)",
                        Band::Red => "  (RED)",
                    }
                )
            })
            .collect();
        let checker = match &s.checks {
            None => "—".to_owned(),
            Some(v) if !v.violated() => "ok".to_owned(),
            Some(v) => v
                .checks
                .iter()
                .filter(|c| c.count > 0)
                .map(|c| format!("{} {}", c.name, c.count))
                .collect::<Vec<_>>()
                .join(", "),
        };
        let status = match &s.error {
            Some(e) => format!("{}: {e}", s.status.as_str()),
            None => s.status.as_str().to_owned(),
        };
        t.add_row(vec![
            Cell::new(&s.name),
            Cell::new(status).fg(color),
            Cell::new(figures.join("\n")),
            Cell::new(checker),
            Cell::new(format!("{:.1} s", s.seconds)),
        ]);
    }
    for i in [0, 4] {
        keep_whole(&mut t, i);
    }
    let mut out = t.to_string();
    if let Some(rows) = &report.comparison {
        let mut c = fitted_table();
        c.set_header(vec![
            "scenario",
            "metric",
            "before",
            "after",
            "change",
            "noise (measured)",
            "",
        ]);
        for r in rows {
            c.add_row(vec![
                Cell::new(&r.scenario),
                Cell::new(&r.metric),
                Cell::new(num(r.before)),
                Cell::new(num(r.after)),
                Cell::new(format!("{:+.1}%", r.change_pct)),
                Cell::new(format!("±{:.1}%", r.noise_pct)),
                Cell::new(if r.flagged { "beyond noise" } else { "" }),
            ]);
        }
        out.push_str("\n\ncompared with the earlier run (a change is flagged beyond twice the noise this run measured of itself):\n");
        out.push_str(&c.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    /// `--list` fits 100 columns (a pipe's default) and 80, and no
    /// scenario's name is broken across lines.
    #[test]
    fn the_catalogue_fits_the_terminal() {
        for suite in [crate::Suite::Load, crate::Suite::Chaos] {
            for width in [100u16, 80] {
                let text = super::catalogue_table(suite, Some(width));
                let widest = text.lines().map(|l| l.chars().count()).max().unwrap();
                assert!(widest <= width as usize, "{widest} > {width}:\n{text}");
                for s in crate::catalogue().iter().filter(|s| s.suite == suite) {
                    assert!(
                        text.lines()
                            .any(|l| l.starts_with(&format!("| {} ", s.name))),
                        "{} broken at {width} columns:\n{text}",
                        s.name
                    );
                }
            }
        }
    }

    /// Run directories sort by time: `YYYYMMDDTHHMMSSZ`, digits elsewhere.
    #[test]
    fn run_stamps_are_whole_utc_seconds() {
        let s = super::utc_stamp();
        assert_eq!(s.len(), 16, "{s}");
        assert_eq!((&s[8..9], &s[15..]), ("T", "Z"), "{s}");
        assert!(
            s[..8]
                .bytes()
                .chain(s[9..15].bytes())
                .all(|b| b.is_ascii_digit()),
            "{s}"
        );
        assert!(s.as_str() >= "20260101T000000Z", "{s}");
    }
}
