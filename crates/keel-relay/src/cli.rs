//! The `keel-relay` command line: serve, doctor, redrive, and the exec helper.

use std::path::PathBuf;

use crate::{Config, Relay};
use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "keel-relay", version, about = "The keel relay daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the daemon until SIGTERM or SIGINT.
    Serve {
        /// Data directory (overrides the config file).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Address to listen on, e.g. 127.0.0.1:0 (overrides the config file).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Upstream WebSocket URL (overrides the config file).
        #[arg(long)]
        upstream: Option<String>,
        /// Spool directory (overrides the config file).
        #[arg(long)]
        spool: Option<PathBuf>,
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// PEM certificate chain: serve wss:// (with --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key for --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Serve `auth.mode = "open"` on a non-loopback address (anyone who
        /// can reach it may read and write every channel).
        #[arg(long)]
        insecure_open: bool,
        /// Log format on stderr: `human` (coloured), `plain` (the same
        /// text without colour codes) or `json` (one object a line).
        /// Default: `human` when stderr is a terminal, else `plain`.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Reports integrity, sessions per state, outbox states (DEAD listed) and
    /// quarantined files. Run it while the relay is stopped (a PostgreSQL
    /// store may be inspected beside live nodes). Exit 0: healthy; 1: findings
    /// (listed on the last line); 2: cannot inspect (no data directory or
    /// database, directory in use, store unreachable).
    Doctor {
        #[command(flatten)]
        store: StoreArg,
    },
    /// Re-queues every DEAD send. Run it while the relay is stopped (a
    /// PostgreSQL store: while its nodes run, the leader picks them up).
    Redrive {
        #[command(flatten)]
        store: StoreArg,
    },
    /// Copies the database to FILE while the relay runs (SQLite's online
    /// backup API: one consistent view, writers never blocked), checked
    /// with integrity_check and synced before it takes FILE's name. For a
    /// PostgreSQL store use pg_dump.
    Backup {
        /// Data directory.
        #[arg(long)]
        data: PathBuf,
        /// The backup file to write (replaced once the copy is checked).
        #[arg(long)]
        to: PathBuf,
    },
    /// Puts a backup in place as a data directory's database. Run it while
    /// the relay is stopped; the files it replaces are moved aside. The
    /// next start runs crash recovery, as after a kill at the backup's
    /// moment.
    Restore {
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
        /// Data directory (created if missing).
        #[arg(long)]
        data: PathBuf,
    },
    /// Reads, parses and validates a configuration file without starting
    /// anything, then prints the configuration in effect (every default
    /// filled in). Exit 0 when it is valid, 2 (with the file, the key and
    /// the reason) when not.
    CheckConfig {
        /// The TOML file.
        file: PathBuf,
    },
    /// Prints the default configuration as TOML (a file to start from).
    PrintDefaultConfig,
    /// Internal: the exec helper for supervised children.
    #[command(name = "__exec", hide = true)]
    Exec {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

/// The store `doctor` and `redrive` work on: a data directory or a
/// PostgreSQL URL, one of the two.
#[derive(clap::Args)]
struct StoreArg {
    /// Data directory (the embedded SQLite store).
    #[arg(
        long,
        required_unless_present = "postgres",
        conflicts_with = "postgres"
    )]
    data: Option<PathBuf>,
    /// A PostgreSQL store's URL (cluster mode), e.g.
    /// postgres://keel@127.0.0.1:5432/keel.
    #[arg(long)]
    postgres: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
enum LogFormat {
    Human,
    Plain,
    Json,
}

impl LogFormat {
    /// The format when none is asked for: colour only for a terminal, so a
    /// log written to a file, a pipe or the journal carries no escape codes.
    fn default_for(terminal: bool) -> LogFormat {
        if terminal {
            LogFormat::Human
        } else {
            LogFormat::Plain
        }
    }
}

/// Runs the `keel-relay` command line on `args` (the program name first).
///
/// The `keel-relay` binary is this function; test and harness binaries that
/// need a relay process of their own build call it too.
pub fn run<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    let command = match cli.command {
        Command::Exec { args } => {
            std::process::exit(keel_recovery::supervise::exec_helper_main(args));
        }
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(config) => {
                print!("{}", effective_toml(&config)?);
                return Ok(());
            }
            Err(e @ crate::config::ConfigError::Invalid(_)) => {
                eprintln!("keel-relay: {}: {e}", file.display());
                std::process::exit(2);
            }
            Err(e) => {
                eprintln!("keel-relay: {e}");
                std::process::exit(2);
            }
        },
        Command::PrintDefaultConfig => {
            print!("{}", effective_toml(&Config::default())?);
            return Ok(());
        }
        Command::Backup { data, to } => {
            let r = keel_recovery::backup::backup(&data, &to)
                .with_context(|| format!("backup of {} failed", data.display()))?;
            println!(
                "backed up {} to {}: {} bytes, {} pages, integrity_check ok, in {:.2?}",
                data.display(),
                r.path.display(),
                r.bytes,
                r.pages,
                r.took
            );
            return Ok(());
        }
        Command::Restore { from, data } => {
            let r = keel_recovery::backup::restore(&from, &data)
                .with_context(|| format!("restore into {} failed", data.display()))?;
            println!("restored {} as {}", from.display(), r.database.display());
            for aside in &r.moved_aside {
                println!("moved aside: {}", aside.display());
            }
            return Ok(());
        }
        other => other,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        match command {
            Command::Serve {
                data,
                listen,
                upstream,
                spool,
                config,
                tls_cert,
                tls_key,
                insecure_open,
                log_format,
            } => {
                init_logs(log_format.unwrap_or_else(|| {
                    use std::io::IsTerminal;
                    LogFormat::default_for(std::io::stderr().is_terminal())
                }));
                let mut cfg = match &config {
                    Some(path) => Config::load(path)?,
                    None => Config::default(),
                };
                if let Some(d) = data {
                    cfg.data = d;
                }
                if let Some(l) = listen {
                    cfg.listen = l;
                }
                if upstream.is_some() {
                    cfg.upstream = upstream;
                }
                if spool.is_some() {
                    cfg.spool = spool;
                }
                if tls_cert.is_some() {
                    (cfg.tls.cert_file, cfg.tls.key_file) = (tls_cert, tls_key);
                }
                cfg.auth.insecure_open |= insecure_open;
                raise_open_files(cfg.limits.max_connections);
                serve(cfg).await
            }
            Command::Doctor {
                store: StoreArg { data, postgres },
            } => {
                let report = match (data, postgres) {
                    (_, Some(url)) => crate::doctor::run_postgres(&url).await,
                    (Some(data), None) => crate::doctor::run(&data).await,
                    (None, None) => unreachable!("clap requires one"),
                };
                match report {
                    Ok(report) => {
                        print!("{}", report.text);
                        if !report.findings.is_empty() {
                            println!("findings: {}", report.findings.join("; "));
                        }
                        std::process::exit(report.exit_code());
                    }
                    Err(e) => {
                        eprintln!("keel-relay doctor: cannot inspect: {e:#}");
                        std::process::exit(2);
                    }
                }
            }
            Command::Redrive {
                store: StoreArg { data, postgres },
            } => redrive(data, postgres).await,
            Command::Exec { .. }
            | Command::CheckConfig { .. }
            | Command::PrintDefaultConfig
            | Command::Backup { .. }
            | Command::Restore { .. } => {
                unreachable!("handled before the runtime starts")
            }
        }
    })
}

/// `config` as TOML, every key written out.
fn effective_toml(config: &Config) -> anyhow::Result<String> {
    toml::to_string(config).context("cannot write the configuration as TOML")
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.with_ansi(true).init(),
        LogFormat::Plain => builder.with_ansi(false).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

/// Descriptors kept for everything but connections: the database and its
/// WAL, logs, listeners, the spool, children's pipes.
const RESERVED_FILES: u64 = 512;

/// Raises the open-file limit to the hard limit and logs it; warns when
/// `max_connections` asks for more than it leaves room for.
fn raise_open_files(max_connections: usize) {
    match keel_recovery::raise_open_files() {
        Ok(files) => {
            tracing::info!(
                open_files = files.now,
                was = files.before,
                hard = files.hard,
                "open-file limit"
            );
            let room = files.connections(RESERVED_FILES);
            if max_connections as u64 > room {
                tracing::warn!(
                    max_connections,
                    open_files = files.now,
                    "limits.max_connections is above what the open-file limit leaves room for \
                     ({room} after {RESERVED_FILES} kept for the store and the rest): connections \
                     past that are refused for want of descriptors; raise the hard limit \
                     (ulimit -Hn, systemd's LimitNOFILE=) or lower max_connections"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Caught before the relay says it is up: a SIGTERM right after the
    // "listening" line shuts it down cleanly instead of killing it.
    let mut signals = keel_recovery::Signals::catch().context("cannot catch signals")?;
    let exe = std::env::current_exe().context("cannot find this executable for the exec helper")?;
    let relay = Relay::start_with(config, Some((exe, vec!["__exec".into()])))
        .await
        .context("cannot start the relay")?;
    // Tests and scripts read this line to learn the port.
    println!("keel-relay listening on {}", relay.addr());
    let signal = signals.recv().await;
    tracing::info!(signal, "shutting down");
    let report = relay.shutdown(&format!("{signal} received")).await?;
    println!(
        "keel-relay stopped: drained={} clean={} in {:.1?}",
        report.drained, report.clean, report.total
    );
    Ok(())
}

async fn redrive(data: Option<PathBuf>, postgres: Option<String>) -> anyhow::Result<()> {
    let n = match (data, postgres) {
        (_, Some(url)) => crate::doctor::redrive_postgres(&url).await?,
        (Some(data), None) => crate::doctor::redrive(&data).await?,
        (None, None) => unreachable!("clap requires one"),
    };
    println!("re-queued {n} DEAD sends");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_for_a_terminal() {
        assert_eq!(LogFormat::default_for(true), LogFormat::Human);
        assert_eq!(LogFormat::default_for(false), LogFormat::Plain);
    }
}
