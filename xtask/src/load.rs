//! `cargo xtask load`: builds the relay, runs the load suite (keel-harness),
//! prints the verdict table, writes the report, exits by its verdict.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use keel_harness::fixture::{RelayBinary, Remote, Target};
use keel_harness::{RunOptions, Scale, Suite};

/// Flags shared by the load and chaos suites.
#[derive(clap::Args, Debug)]
pub(crate) struct SuiteArgs {
    /// Run only this scenario (repeatable).
    #[arg(long = "scenario", value_name = "NAME")]
    scenarios: Vec<String>,
    /// `small` (what `cargo test` runs), `full` (the seeds' and keel's
    /// sizes) or a factor of full such as 0.25.
    #[arg(long, default_value = "full")]
    scale: Scale,
    /// Length of scenarios whose length is a choice (e.g. 90s, 5m).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Repetitions of scenarios that repeat a fault (daemon_crash_recovery:
    /// kills; default 50 at full scale).
    #[arg(long)]
    iterations: Option<usize>,
    /// Master seed (default: from the clock; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// Where run directories go (default: target/keel-report).
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
    /// Compare with an earlier run (its directory or report.json).
    #[arg(long, value_name = "DIR")]
    compare: Option<PathBuf>,
    /// Run against a relay you started (ws://HOST:PORT/ws), perhaps through
    /// a proxy; scenarios that must control the relay process are reported
    /// as not applicable, saying why.
    #[arg(long, value_name = "URL")]
    target: Option<String>,
    /// With --target: where the relay's Prometheus /metrics is (default:
    /// http://<the target's host and port>/metrics); the memory, file
    /// descriptor and CPU figures of scenarios run against --target are
    /// read there (process_resident_memory_bytes, process_open_fds,
    /// process_cpu_seconds_total).
    #[arg(long, value_name = "URL", requires = "target")]
    metrics_url: Option<String>,
    /// Use this relay binary instead of building target/release/keel-relay.
    #[arg(long, value_name = "PATH")]
    relay_bin: Option<PathBuf>,
    /// Run only these actions of the plan, by index (what --shrink prints).
    #[arg(long, value_name = "I,J,...", value_delimiter = ',')]
    keep_actions: Option<Vec<usize>>,
    /// Arm relay failpoints (KEEL_FAILPOINTS, e.g. hide_crash=1; the
    /// checker's self-test, in relays built with them).
    #[arg(long, value_name = "SPEC")]
    failpoints: Option<String>,
    /// Re-run a failing scenario with faults removed (delta debugging)
    /// until none can go without the failure going too; print the minimal
    /// plan and its command. One --scenario.
    #[arg(long)]
    shrink: bool,
    /// The cluster suite (chaos only): three relay nodes on PostgreSQL
    /// (KEEL_PG_URL) and NATS (KEEL_NATS_URL), defaults the standard local
    /// ports; a fresh database per run.
    #[arg(long)]
    pub(crate) cluster: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit, e.g. 90s or 5m"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unit must be ms, s, m or h")),
    };
    Ok(Duration::from_secs_f64(secs))
}

pub(crate) fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// A `cargo` command without the package variables `cargo run` gave this
/// process: build scripts (ring's, cc's) rerun when those differ, so every
/// `cargo xtask` rebuilt the relay's TLS stack and everything above it.
pub(crate) fn cargo() -> std::process::Command {
    let mut cargo =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || matches!(
                key.as_ref(),
                "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE" | "OUT_DIR"
            )
        {
            cargo.env_remove(key.as_ref());
        }
    }
    cargo
}

/// `cargo build --release -p xtask -p keel-relay --bin keel-relay` (default features:
/// never the failpoints), or with `failpoints` keel-tests' `keel-relay-test`
/// (the same relay with its failpoints compiled in); returns the binary.
/// `-p xtask` alongside: features resolve as for xtask itself, and the
/// relay reuses the library `cargo xtask` built (alone, `-p keel-relay`
/// resolves its dependencies' features differently: a second build).
pub(crate) fn build_relay_with(failpoints: bool) -> Result<PathBuf> {
    let (package, bin) = if failpoints {
        ("keel-tests", "keel-relay-test")
    } else {
        ("keel-relay", "keel-relay")
    };
    eprintln!("building the relay: cargo build --release -p xtask -p {package} --bin {bin}");
    let mut cargo = cargo();
    cargo
        .args([
            "build",
            "--release",
            "-p",
            "xtask",
            "-p",
            package,
            "--bin",
            bin,
        ])
        .current_dir(workspace_root());
    let status = cargo
        .status()
        .context("cannot run cargo to build the relay")?;
    if !status.success() {
        bail!("building the relay failed ({status}); fix the build error above and run again");
    }
    Ok(target_dir().join("release").join(bin))
}

pub(crate) fn list(suite: Suite) {
    println!("{}", keel_harness::run::catalogue_table(suite, None));
}

pub(crate) fn run(suite: Suite, args: SuiteArgs) -> Result<i32> {
    if args.list {
        list(suite);
        return Ok(0);
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % 1_000_000_000)
    });
    if args.failpoints.is_some() && (args.target.is_some() || args.relay_bin.is_some()) {
        bail!(
            "--failpoints arms the relay xtask builds; it cannot go with --target or --relay-bin"
        );
    }
    if suite == Suite::Cluster {
        if args.target.is_some() {
            bail!("--cluster starts its own nodes; it cannot go with --target");
        }
        let engines = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the runtime")?
            .block_on(keel_harness::cluster::check_engines());
        if let Err(why) = engines {
            eprintln!("{why}");
            return Ok(1);
        }
    }
    let target = match (&args.target, &args.relay_bin) {
        (Some(url), _) => Target::Url(match &args.metrics_url {
            Some(m) => Remote::with_metrics(url, m),
            None => Remote::new(url),
        }),
        (None, Some(bin)) => Target::Spawn(RelayBinary::at(bin)),
        (None, None) => Target::Spawn(RelayBinary::at(&build_relay_with(
            args.failpoints.is_some(),
        )?)),
    };
    let command = format!(
        "cargo xtask {} {}",
        if suite == Suite::Load {
            "load"
        } else {
            "chaos"
        },
        std::env::args().skip(2).collect::<Vec<_>>().join(" ")
    );
    eprintln!(
        "keel {} suite, master seed {seed} (reproduce any run with --seed {seed})",
        suite.as_str()
    );
    let opts = RunOptions {
        suite,
        scenarios: args.scenarios,
        scale: args.scale,
        duration: args.duration,
        iterations: args.iterations,
        seed,
        target,
        report_root: args
            .report
            .unwrap_or_else(|| target_dir().join("keel-report")),
        compare: args.compare,
        command: command.trim_end().to_owned(),
        verbose: true,
        keep_actions: args.keep_actions,
        relay_env: args
            .failpoints
            .map(|f| vec![("KEEL_FAILPOINTS".to_owned(), f)])
            .unwrap_or_default(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    if args.shrink {
        let shrunk = runtime
            .block_on(keel_harness::shrink::shrink(opts))
            .context("shrinking failed")?;
        if shrunk.failure.is_empty() {
            println!("the full plan passed: nothing to shrink");
            return Ok(0);
        }
        let failure: Vec<&str> = shrunk.failure.iter().map(String::as_str).collect();
        println!(
            "failure: {}\nshrunk from {} actions to {} in {} runs:",
            failure.join(", "),
            shrunk.original,
            shrunk.kept.len(),
            shrunk.runs
        );
        for a in &shrunk.actions {
            println!("  {a}");
        }
        println!("reproduce: {}", shrunk.command);
        return Ok(keel_harness::run::EXIT_RED);
    }
    let summary = match runtime.block_on(keel_harness::run(opts)) {
        Ok(s) => s,
        Err(keel_harness::Error::Interrupted) => return Ok(130),
        Err(e) => return Err(e).context("the harness failed"),
    };
    println!("{}", keel_harness::run::table(&summary.report));
    println!("report: {}", summary.dir.join("report.html").display());
    Ok(summary.exit_code)
}
