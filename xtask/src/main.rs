//! keel's task runner. `cargo xtask` with no arguments lists the tasks.

mod ci;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// keel's tasks (`cargo xtask <task>`).
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Option<Task>,
}

#[derive(Subcommand)]
enum Task {
    /// Run exactly what CI runs (`.ci/run`): fmt check, clippy, the test suite.
    Ci,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        None => {
            println!("cargo xtask <task>\n\ntasks:");
            println!("  ci      run exactly what CI runs (.ci/run): fmt check, clippy, tests");
            println!(
                "\nload, chaos and bench arrive with keel-harness; until then the main job is\n\
                 `cargo run --release -p keel-session --example session_demo`."
            );
            Ok(())
        }
        Some(Task::Ci) => ci::run(),
    }
}
