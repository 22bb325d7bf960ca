//! Reports: `report.json` (schema in docs/report-format.md), `report.md`,
//! and a self-contained `report.html` (inline SVG charts drawn by plotters,
//! inline CSS, no script, no network).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::check::Verdict;
use crate::scenario::SeedRef;
use crate::threshold::{Band, Judged, num};

/// The report schema version; docs/report-format.md describes it.
pub const SCHEMA: u32 = 1;

/// How a scenario ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Every threshold green, no violation.
    Green,
    /// Some threshold yellow (the seed's floor met, keel's target not).
    Yellow,
    /// Some threshold red.
    Red,
    /// An invariant was violated.
    Violated,
    /// The harness failed (the scenario's result is unknown).
    Error,
    /// Not applicable to `--target`.
    NotApplicable,
}

impl Status {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Green => "green",
            Status::Yellow => "yellow",
            Status::Red => "red",
            Status::Violated => "VIOLATED",
            Status::Error => "error",
            Status::NotApplicable => "n/a",
        }
    }
}

/// Time series for the charts, in seconds since the scenario started.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Series {
    /// (second, p50 ms, p99 ms).
    pub latency: Vec<(f64, f64, f64)>,
    /// (second, operations per second).
    pub throughput: Vec<(f64, f64)>,
    /// (second, RSS MiB, open fds, CPU % of one core).
    pub resources: Vec<(f64, f64, f64, f64)>,
    /// (start s, end s, kind): faults, shaded on the charts.
    pub faults: Vec<(f64, f64, String)>,
    /// For each fault, when it was recovered from: the earliest completion
    /// of an acknowledged operation invoked at or after its heal (s).
    #[serde(default)]
    pub recovered: Vec<Option<f64>>,
    /// Operations drawn as points: (completed s, latency ms, outcome: 0
    /// ok, 1 failed, 2 unknown); sampled (see `ok_stride`).
    #[serde(default)]
    pub ops: Vec<(f64, f64, u8)>,
    /// One acknowledged operation in this many is drawn (of those no
    /// slower than `tail_from_ms`).
    #[serde(default)]
    pub ok_stride: u64,
    /// The run's p99 of acknowledged operations, ms: every one slower is
    /// drawn, one in `tail_stride` (0 when none was slower).
    #[serde(default)]
    pub tail_from_ms: f64,
    /// One in this many of the operations slower than `tail_from_ms`.
    #[serde(default)]
    pub tail_stride: u64,
    /// One in this many failed or unknown operations is drawn.
    #[serde(default)]
    pub bad_stride: u64,
    /// Operations in the history: ok, failed, unknown.
    #[serde(default)]
    pub op_counts: [u64; 3],
    /// (window start s, acknowledged/s, failed or unknown/s), windows of
    /// `window_s`.
    #[serde(default)]
    pub rate: Vec<(f64, f64, f64)>,
    /// (window middle s, p50 ms, p99 ms) of acknowledged operations.
    #[serde(default)]
    pub op_latency: Vec<(f64, f64, f64)>,
    /// The window of `rate` and `op_latency`, s.
    #[serde(default)]
    pub window_s: f64,
}

/// One scenario's report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioReport {
    /// Its name.
    pub name: String,
    /// What it does.
    pub what: String,
    /// The seed test it covers: `<seed file> <test>: <threshold>`.
    pub seed: String,
    /// keel's target, in words.
    pub target: String,
    /// How it ended.
    pub status: Status,
    /// The harness error, if any.
    pub error: Option<String>,
    /// The command that reproduces it.
    pub repro: String,
    /// The plan's parameters.
    pub params: BTreeMap<String, serde_json::Value>,
    /// Seconds it took.
    pub seconds: f64,
    /// Everything it measured.
    pub metrics: BTreeMap<String, f64>,
    /// Its thresholds, judged.
    pub thresholds: Vec<Judged>,
    /// The checker's verdict (absent after a harness error).
    pub checks: Option<Verdict>,
    /// Lines of `history.jsonl` written, and how many there were.
    pub history_lines: (usize, usize),
    /// Notes.
    pub notes: Vec<String>,
    /// Charts' data.
    pub series: Series,
}

impl ScenarioReport {
    /// The status its thresholds and checks give.
    pub fn judge(checks: &Verdict, thresholds: &[Judged]) -> Status {
        if checks.violated() {
            return Status::Violated;
        }
        match thresholds.iter().map(|j| j.band).max() {
            Some(Band::Red) => Status::Red,
            Some(Band::Yellow) => Status::Yellow,
            _ => Status::Green,
        }
    }

    /// `<seed file> <test>: <threshold>`.
    pub fn seed_text(seed: &SeedRef) -> String {
        format!("seed {} {}: {}", seed.seed, seed.test, seed.threshold)
    }
}

/// The machine a run ran on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// CPUs online.
    pub cpus: usize,
    /// Memory, GiB.
    pub memory_gib: f64,
    /// `uname -sr`.
    pub kernel: String,
    /// The open-file limit of the harness process.
    pub open_files: u64,
}

impl Machine {
    /// This machine.
    pub fn here() -> Machine {
        let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|k| format!("Linux {}", k.trim()))
            .unwrap_or_else(|_| "unknown".into());
        let open_files = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(0);
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: mem_kib / (1024.0 * 1024.0),
            kernel,
            open_files,
        }
    }
}

/// One row of `--compare`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    /// The scenario.
    pub scenario: String,
    /// The metric.
    pub metric: String,
    /// Its value in the earlier run.
    pub before: f64,
    /// Its value now.
    pub after: f64,
    /// Relative change, %.
    pub change_pct: f64,
    /// The run-to-run noise measured for it, % (see `run::compare`).
    pub noise_pct: f64,
    /// Whether the change is beyond the noise.
    pub flagged: bool,
}

/// A whole run's report: `report.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    /// [`SCHEMA`].
    pub schema: u32,
    /// `load` or `chaos`.
    pub suite: String,
    /// When it started, UTC (`YYYYMMDDTHHMMSSZ`).
    pub started: String,
    /// The command line.
    pub command: String,
    /// The machine.
    pub machine: Machine,
    /// `git rev-parse HEAD`, when known.
    pub commit: Option<String>,
    /// The master seed.
    pub seed: u64,
    /// The scale.
    pub scale: String,
    /// The target (`spawned keel-relay <path>` or the URL).
    pub target: String,
    /// Every scenario.
    pub scenarios: Vec<ScenarioReport>,
    /// `--compare` rows, if asked.
    pub comparison: Option<Vec<Comparison>>,
    /// The exit code.
    pub exit_code: i32,
}

impl RunReport {
    /// Writes `report.json`, `report.md` and `report.html` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        let json = serde_json::to_string_pretty(self).map_err(|e| Error::Usage(e.to_string()))?;
        std::fs::write(dir.join("report.json"), json)
            .map_err(|e| Error::io("write report.json", e))?;
        std::fs::write(dir.join("report.md"), self.markdown())
            .map_err(|e| Error::io("write report.md", e))?;
        std::fs::write(dir.join("report.html"), self.html())
            .map_err(|e| Error::io("write report.html", e))?;
        // Each chart also as a file of its own, to commit or embed.
        for s in &self.scenarios {
            let sdir = dir.join(&s.name);
            if std::fs::create_dir_all(&sdir).is_ok() {
                std::fs::write(sdir.join("latency.svg"), crate::chart::timeline(&s.series))
                    .map_err(|e| Error::io("write latency.svg", e))?;
                std::fs::write(
                    sdir.join("resources.svg"),
                    crate::chart::resources(&s.series),
                )
                .map_err(|e| Error::io("write resources.svg", e))?;
            }
        }
        Ok(())
    }

    /// Reads an earlier `report.json` (for `--compare`).
    pub fn read(path: &Path) -> Result<RunReport, Error> {
        let file = if path.is_dir() {
            path.join("report.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file)
            .map_err(|e| Error::io(&format!("read {}", file.display()), e))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::Usage(format!("{}: not a keel report ({e})", file.display())))
    }

    /// The Markdown report.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# keel {} report\n", self.suite);
        let _ = writeln!(
            out,
            "`{}` — started {} UTC, seed {}, scale {}, target {}; {} CPUs, {:.0} GiB, {}, open-file limit {}; commit {}.\n",
            self.command,
            self.started,
            self.seed,
            self.scale,
            self.target,
            self.machine.cpus,
            self.machine.memory_gib,
            self.machine.kernel,
            self.machine.open_files,
            self.commit.as_deref().unwrap_or("unknown")
        );
        let _ = writeln!(
            out,
            "| scenario | status | key figures | seed threshold | keel target | checker |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|");
        for s in &self.scenarios {
            let figures: Vec<String> = s
                .thresholds
                .iter()
                .map(|j| {
                    format!(
                        "{} {}{} ({})",
                        j.metric,
                        num(j.observed),
                        j.unit,
                        j.band.as_str()
                    )
                })
                .collect();
            let seeds: Vec<String> = s
                .thresholds
                .iter()
                .map(|j| format!("{} {}", j.metric, j.seed))
                .collect();
            let targets: Vec<String> = s
                .thresholds
                .iter()
                .map(|j| format!("{} {}", j.metric, j.target))
                .collect();
            let _ = writeln!(
                out,
                "| `{}` | {} | {} | {} | {} | {} |",
                s.name,
                s.status.as_str(),
                figures.join("; "),
                seeds.join("; "),
                targets.join("; "),
                checker_text(s)
            );
        }
        for s in &self.scenarios {
            let _ = writeln!(
                out,
                "\n## {}\n\n{} ({}). keel target: {}.\n",
                s.name, s.what, s.seed, s.target
            );
            let _ = writeln!(out, "Reproduce: `{}`\n", s.repro);
            if let Some(e) = &s.error {
                let _ = writeln!(out, "**Harness error:** {e}\n");
            }
            let metrics: Vec<String> = s
                .metrics
                .iter()
                .map(|(k, v)| format!("{k} = {}", num(*v)))
                .collect();
            if !metrics.is_empty() {
                let _ = writeln!(out, "Measured: {}.\n", metrics.join(", "));
            }
            if let Some(v) = &s.checks {
                for c in v.checks.iter().filter(|c| c.count > 0) {
                    let _ = writeln!(out, "- **{}**: {}", c.name, c.count);
                    for w in &c.witnesses {
                        let _ = writeln!(out, "  - {}", w.summary);
                    }
                }
            }
            for n in &s.notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        if let Some(rows) = &self.comparison {
            let _ = writeln!(out, "\n## Compared with the earlier run\n");
            let _ = writeln!(
                out,
                "| scenario | metric | before | after | change | noise | |"
            );
            let _ = writeln!(out, "|---|---|---|---|---|---|---|");
            for r in rows {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {:+.1}% | ±{:.1}% | {} |",
                    r.scenario,
                    r.metric,
                    num(r.before),
                    num(r.after),
                    r.change_pct,
                    r.noise_pct,
                    if r.flagged { "beyond noise" } else { "" }
                );
            }
        }
        out
    }

    /// The HTML report: self-contained, charts as inline SVG.
    pub fn html(&self) -> String {
        let mut out = String::new();
        let _ = write!(
            out,
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>keel {} report</title><style>{CSS}</style></head><body>",
            self.suite
        );
        let _ = write!(
            out,
            "<h1>keel {} report</h1><p class=\"meta\"><code>{}</code><br>started {} UTC · seed {} · scale {} · {} · {} CPUs, {:.0} GiB, {} · commit {}</p>",
            esc(&self.suite),
            esc(&self.command),
            esc(&self.started),
            self.seed,
            esc(&self.scale),
            esc(&self.target),
            self.machine.cpus,
            self.machine.memory_gib,
            esc(&self.machine.kernel),
            esc(self.commit.as_deref().unwrap_or("unknown"))
        );
        let _ = write!(
            out,
            "<table id=\"verdicts\"><tr><th>scenario</th><th>status</th><th>thresholds</th><th>checker</th><th>time</th></tr>"
        );
        for s in &self.scenarios {
            let bands: Vec<String> = s
                .thresholds
                .iter()
                .map(|j| {
                    format!(
                        "<span class=\"{}\">{} {}{}</span>",
                        j.band.as_str(),
                        esc(&j.metric),
                        num(j.observed),
                        esc(&j.unit)
                    )
                })
                .collect();
            let _ = write!(
                out,
                "<tr><td><a href=\"#scenario-{0}\">{0}</a></td><td class=\"{1}\">{2}</td><td>{3}</td><td>{4}</td><td>{5:.1} s</td></tr>",
                esc(&s.name),
                status_class(s.status),
                s.status.as_str(),
                bands.join("<br>"),
                esc(&checker_text(s)),
                s.seconds
            );
        }
        out.push_str("</table>");
        for s in &self.scenarios {
            let _ = write!(
                out,
                "<section id=\"scenario-{0}\"><h2>{0} <span class=\"{1}\">{2}</span></h2><p>{3}<br><em>{4}</em><br>keel target: {5}<br>reproduce: <code>{6}</code></p>",
                esc(&s.name),
                status_class(s.status),
                s.status.as_str(),
                esc(&s.what),
                esc(&s.seed),
                esc(&s.target),
                esc(&s.repro)
            );
            if let Some(e) = &s.error {
                let _ = write!(out, "<p class=\"red\">harness error: {}</p>", esc(e));
            }
            if !s.thresholds.is_empty() {
                out.push_str("<table class=\"thresholds\"><tr><th>metric</th><th>observed</th><th>seed threshold</th><th>keel target</th><th>band</th></tr>");
                for j in &s.thresholds {
                    let _ = write!(
                        out,
                        "<tr><td>{}</td><td>{} {}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
                        esc(&j.metric),
                        num(j.observed),
                        esc(&j.unit),
                        esc(&j.seed),
                        esc(&j.target),
                        j.band.as_str(),
                        j.band.as_str()
                    );
                }
                out.push_str("</table>");
            }
            if let Some(v) = &s.checks {
                out.push_str("<table class=\"checks\"><tr><th>check</th><th>violations</th><th>witnesses</th></tr>");
                for c in &v.checks {
                    let witnesses: Vec<String> = c
                        .witnesses
                        .iter()
                        .map(|w| {
                            format!(
                                "<details><summary>{}</summary><pre>{}</pre></details>",
                                esc(&w.summary),
                                esc(&w.timeline.join("\n"))
                            )
                        })
                        .collect();
                    let _ = write!(
                        out,
                        "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
                        c.name,
                        if c.count > 0 { "red" } else { "green" },
                        c.count,
                        witnesses.join("")
                    );
                }
                let _ = write!(
                    out,
                    "</table><p class=\"meta\">acknowledged {} · refused {} · unknown {} · delivered {} (expected {}) · history lines {} of {}</p>",
                    v.stats.acked,
                    v.stats.failed,
                    v.stats.info,
                    v.stats.delivered,
                    v.stats.expected_deliveries,
                    s.history_lines.0,
                    s.history_lines.1
                );
            }
            let _ = write!(
                out,
                "<div class=\"charts\"><figure class=\"chart\" id=\"chart-latency-{0}\" data-points=\"{3}\" data-faults=\"{4}\">{1}<figcaption>every operation's latency (a point, coloured by outcome; log axis) with p50 and p99 per window, throughput below on the same time axis; faults in the lane above, one row per kind, a black tick where each was recovered from</figcaption></figure><figure class=\"chart\" id=\"chart-resources-{0}\" data-samples=\"{5}\">{2}<figcaption>relay RSS, CPU and open files over time; faults shaded</figcaption></figure></div>",
                esc(&s.name),
                crate::chart::timeline(&s.series),
                crate::chart::resources(&s.series),
                crate::chart::points(&s.series),
                s.series.faults.len(),
                s.series.resources.len()
            );
            if !s.notes.is_empty() {
                out.push_str("<ul class=\"notes\">");
                for n in &s.notes {
                    let _ = write!(out, "<li>{}</li>", esc(n));
                }
                out.push_str("</ul>");
            }
            out.push_str("</section>");
        }
        if let Some(rows) = &self.comparison {
            out.push_str("<section id=\"comparison\"><h2>compared with the earlier run</h2><table><tr><th>scenario</th><th>metric</th><th>before</th><th>after</th><th>change</th><th>noise</th><th></th></tr>");
            for r in rows {
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:+.1}%</td><td>±{:.1}%</td><td class=\"{}\">{}</td></tr>",
                    esc(&r.scenario),
                    esc(&r.metric),
                    num(r.before),
                    num(r.after),
                    r.change_pct,
                    r.noise_pct,
                    if r.flagged { "yellow" } else { "" },
                    if r.flagged { "beyond noise" } else { "" }
                );
            }
            out.push_str("</table></section>");
        }
        out.push_str("</body></html>\n");
        out
    }
}

fn checker_text(s: &ScenarioReport) -> String {
    match &s.checks {
        None => "not checked".into(),
        Some(v) if !v.violated() => format!(
            "ok ({} acked, {} delivered)",
            v.stats.acked, v.stats.delivered
        ),
        Some(v) => v
            .checks
            .iter()
            .filter(|c| c.count > 0)
            .map(|c| format!("{} {}", c.name, c.count))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn status_class(s: Status) -> &'static str {
    match s {
        Status::Green => "green",
        Status::Yellow => "yellow",
        Status::Red | Status::Violated | Status::Error => "red",
        Status::NotApplicable => "na",
    }
}

/// HTML-escapes `s`.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
.green{color:#176f2c;font-weight:600}.yellow{color:#9a6b00;font-weight:600}.red{color:#b3261e;font-weight:600}.na{color:#777}
.meta{color:#555;font-size:90%}section{border-top:2px solid #ddd;margin-top:2em}
.charts{display:flex;flex-direction:column;gap:1em}figure.chart{margin:0;width:100%}figure.chart svg{width:100%;height:auto}figcaption{font-size:85%;color:#555}
pre{font-size:80%;white-space:pre-wrap}";
