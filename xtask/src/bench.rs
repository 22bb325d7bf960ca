//! `cargo xtask bench`: every crate's benchmark, then one table of every
//! figure beside its same-run baseline and its target.
//!
//! Each bench prints its figures as `figure | name | value | unit |
//! baseline name | baseline | target | MET/NOT MET` lines; this collects
//! them. By default the benches run their summaries only
//! (`KEEL_BENCH_SUMMARY_ONLY=1`: the figures, minutes faster); `--criterion`
//! runs the criterion groups too.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use anyhow::{Context, Result};
use comfy_table::{Cell, Color};

use crate::load::workspace_root;

#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// Run only these crates' benches (keel-session, keel-relay, ...).
    #[arg(long = "crate", value_name = "CRATE")]
    crates: Vec<String>,
    /// Also run the criterion groups (slow), not only the summaries.
    #[arg(long)]
    criterion: bool,
    /// Run the cluster bench instead: keel single node, a 3-node cluster
    /// on PostgreSQL and NATS, and NATS JetStream, side by side. Needs
    /// PostgreSQL (`KEEL_PG_URL`), NATS (`KEEL_NATS_URL`) and `nats-server`.
    #[arg(long)]
    cluster: bool,
}

/// The cluster bench (`--cluster`): its own run, for it needs the engines.
const CLUSTER_BENCH: [(&str, &str); 1] = [("keel-relay", "cluster")];

/// (crate, bench target) in the order they run.
const BENCHES: [(&str, &str); 6] = [
    ("keel-session", "store"),
    ("keel-ratelimit", "queue"),
    ("keel-faults", "proxy"),
    ("keel-reconnect", "client"),
    ("keel-recovery", "startup"),
    ("keel-relay", "relay"),
];

struct Figure {
    bench: String,
    name: String,
    value: f64,
    unit: String,
    baseline_name: String,
    baseline: f64,
    target: String,
    met: bool,
}

fn parse(bench: &str, line: &str) -> Option<Figure> {
    let f: Vec<&str> = line.strip_prefix("figure | ")?.split(" | ").collect();
    let [name, value, unit, baseline_name, baseline, target, met] = f.as_slice() else {
        return None;
    };
    Some(Figure {
        bench: bench.to_owned(),
        name: (*name).to_owned(),
        value: value.parse().ok()?,
        unit: (*unit).to_owned(),
        baseline_name: (*baseline_name).to_owned(),
        baseline: baseline.parse().unwrap_or(0.0),
        target: (*target).to_owned(),
        met: *met == "MET",
    })
}

pub(crate) fn run(args: BenchArgs) -> Result<i32> {
    let mut figures = Vec::new();
    let mut failed = Vec::new();
    let benches: &[(&str, &str)] = if args.cluster {
        &CLUSTER_BENCH
    } else {
        &BENCHES
    };
    for &(krate, bench) in benches {
        if !args.crates.is_empty() && !args.crates.iter().any(|c| c == krate) {
            continue;
        }
        eprintln!("\n== cargo bench -p {krate} --bench {bench}");
        let mut cmd = crate::load::cargo();
        cmd.args(["bench", "-p", krate, "--bench", bench])
            .current_dir(workspace_root())
            .stdout(Stdio::piped());
        if !args.criterion {
            cmd.env("KEEL_BENCH_SUMMARY_ONLY", "1");
        }
        let mut child = cmd.spawn().context("cannot run cargo bench")?;
        let out = child.stdout.take().context("no stdout")?;
        for line in BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(f) = parse(&format!("{krate}/{bench}"), &line) {
                figures.push(f);
            }
        }
        if !child.wait()?.success() {
            failed.push(format!("{krate}/{bench}"));
        }
    }
    let mut t = keel_harness::run::fitted_table();
    t.set_header(vec![
        "bench",
        "figure",
        "value",
        "baseline (same run)",
        "ratio",
        "target",
        "",
    ]);
    for f in &figures {
        let ratio = if f.baseline > 0.0 {
            format!("{:.2}x", f.value / f.baseline)
        } else {
            "—".into()
        };
        let baseline = if f.baseline_name == "-" {
            "—".to_owned()
        } else {
            format!(
                "{} {}",
                f.baseline_name,
                keel_harness::threshold::num(f.baseline)
            )
        };
        t.add_row(vec![
            Cell::new(&f.bench),
            Cell::new(&f.name),
            Cell::new(format!(
                "{} {}",
                keel_harness::threshold::num(f.value),
                f.unit
            )),
            Cell::new(baseline),
            Cell::new(ratio),
            Cell::new(&f.target),
            if f.met {
                Cell::new("met").fg(Color::Green)
            } else {
                Cell::new("NOT MET").fg(Color::Red)
            },
        ]);
    }
    println!("\n{t}");
    if !failed.is_empty() {
        eprintln!("benches that failed to run: {}", failed.join(", "));
        return Ok(1);
    }
    Ok(if figures.iter().all(|f| f.met) { 0 } else { 4 })
}
