//! keel's task runner. `cargo xtask` with no arguments lists the tasks.

mod bench;
mod ci;
mod load;
mod results;

use anyhow::Result;
use clap::{Parser, Subcommand};
use keel_harness::Suite;

/// keel's tasks (`cargo xtask <task>`).
///
/// Exit codes of load and chaos: 0 every scenario green or yellow, 3 an invariant was
/// violated, 4 a threshold is red, 1 the harness failed, 130 interrupted.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Option<Task>,
}

#[derive(Subcommand)]
enum Task {
    /// Run the load suite against a real relay (exit 0 green/yellow, 3
    /// invariant violated, 4 threshold red, 1 harness error).
    Load(load::SuiteArgs),
    /// Run the chaos suite against a real relay: faults from one seed,
    /// each scenario healed and checked (exit codes as load).
    Chaos(load::SuiteArgs),
    /// Run every benchmark and print one table of figures against their
    /// same-run baselines and targets.
    Bench(bench::BenchArgs),
    /// Run exactly what CI runs (`.ci/run`): fmt check, clippy, the test suite.
    Ci,
    /// Write a run's docs/results page from its report.json, its charts
    /// beside it (e.g. `cargo xtask results target/keel-report/<stamp>-load
    /// docs/results/load.md`: charts into docs/results/load/).
    Results {
        /// The run directory (`target/keel-report/<stamp>-<suite>`).
        run: std::path::PathBuf,
        /// The page to write; its charts go into a directory of its name
        /// beside it.
        page: std::path::PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        None => {
            println!("cargo xtask <task>\n\ntasks:");
            println!(
                "  load    the load suite against a real relay: verdicts, report (cargo xtask load --list)"
            );
            println!(
                "  chaos   the chaos suite: seeded faults against a real relay, verdicts, report (cargo xtask chaos --list)"
            );
            println!(
                "          --cluster: three nodes on PostgreSQL and NATS (cargo xtask chaos --cluster --list)"
            );
            println!(
                "  bench   every benchmark, one table of figures against baselines and targets"
            );
            println!("  ci      run exactly what CI runs (.ci/run): fmt check, clippy, tests");
            println!(
                "  results a run's docs/results page from its report (cargo xtask results RUN_DIR PAGE.md)"
            );
            Ok(())
        }
        Some(Task::Load(args)) => {
            if args.cluster {
                anyhow::bail!("--cluster is a chaos suite: cargo xtask chaos --cluster");
            }
            std::process::exit(load::run(Suite::Load, args)?)
        }
        Some(Task::Chaos(args)) => {
            let suite = if args.cluster {
                Suite::Cluster
            } else {
                Suite::Chaos
            };
            std::process::exit(load::run(suite, args)?)
        }
        Some(Task::Bench(args)) => std::process::exit(bench::run(args)?),
        Some(Task::Ci) => ci::run(),
        Some(Task::Results { run, page }) => results::run(&run, &page),
    }
}
