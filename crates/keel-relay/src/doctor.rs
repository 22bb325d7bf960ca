//! `keel-relay doctor` and `keel-relay redrive`: offline inspection and repair
//! of a data directory. Both take the directory lock, so they refuse to run
//! beside a live relay, and both leave the clean-shutdown flag as they found
//! it, so a crashed relay still gets its recovery on the next start.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use keel_recovery::integrity::{Check, check_everything};
use keel_recovery::{DB_FILE, DirLock};
use keel_session::{OutboxState, SessionStore, Store};

async fn open(data: &Path) -> anyhow::Result<(DirLock, Store)> {
    let lock = DirLock::acquire(data).context("the data directory is in use")?;
    let store = Store::open(&data.join(DB_FILE), keel_session::Config::default())
        .await
        .context("cannot open the database")?;
    Ok((lock, store))
}

async fn close<S: SessionStore>(store: S) -> anyhow::Result<()> {
    if store.startup().previous_clean_shutdown {
        store.close().await?;
    } else {
        store.close_unclean().await?;
    }
    Ok(())
}

/// The data directory and its files whose mode lets anyone but the owner
/// in, as `path (mode)`.
fn loose_modes(data: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut paths = vec![data.to_path_buf(), data.join(keel_recovery::LOCK_FILE)];
    for suffix in ["", "-wal", "-shm"] {
        paths.push(data.join(format!("{DB_FILE}{suffix}")));
    }
    paths
        .into_iter()
        .filter_map(|p| {
            let mode = std::fs::metadata(&p).ok()?.permissions().mode() & 0o777;
            (mode & 0o077 != 0).then(|| format!("{} ({mode:o})", p.display()))
        })
        .collect()
}

/// What the doctor found: its report, and the findings an operator must
/// look at (each also in the report).
#[derive(Debug, Default)]
pub struct Report {
    /// The report as text.
    pub text: String,
    /// One line per finding: a damaged database, files others can read, an
    /// unclean previous shutdown, DEAD sends, quarantined files, a broken
    /// health log. Empty when the store is healthy.
    pub findings: Vec<String>,
}

impl Report {
    /// The exit code `keel-relay doctor` ends with: 0 healthy, 1 findings
    /// (2, cannot inspect, is an error before any report).
    pub fn exit_code(&self) -> i32 {
        i32::from(!self.findings.is_empty())
    }
}

/// The doctor's report on a data directory. An error means it could not
/// inspect it (missing directory or database, directory in use, unreadable).
pub async fn run(data: &Path) -> anyhow::Result<Report> {
    let mut r = Report::default();
    let out = &mut r.text;
    if !data.is_dir() {
        anyhow::bail!(
            "{} is not a directory (no data directory to inspect)",
            data.display()
        );
    }
    writeln!(out, "keel-relay doctor: {}", data.display())?;
    let db = data.join(DB_FILE);
    let integrity = match check_everything(&db)? {
        Check::Missing => {
            anyhow::bail!(
                "{} does not exist: no relay has run on this directory",
                db.display()
            );
        }
        Check::Intact => "ok".to_owned(),
        Check::Damaged(why) => {
            r.findings.push(format!("database damaged: {why}"));
            format!("DAMAGED ({why}); the next start quarantines it")
        }
    };
    let size = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
    writeln!(
        out,
        "database: {} ({size} bytes), quick_check: {integrity}",
        db.display()
    )?;
    if integrity != "ok" {
        return Ok(r);
    }
    // Before opening: taking the lock and opening the store narrow them.
    let loose = loose_modes(data);
    if loose.is_empty() {
        writeln!(out, "permissions: owner only")?;
    } else {
        writeln!(
            out,
            "permissions: WARNING readable or writable by others: {} (narrowed to owner only now; check who could read them)",
            loose.join(", ")
        )?;
        r.findings
            .push(format!("files others could read: {}", loose.join(", ")));
    }
    let (_lock, store) = open(data).await?;
    if !store.startup().previous_clean_shutdown {
        r.findings.push("previous shutdown unclean".to_owned());
    }
    report(&mut r, &store).await?;
    let out = &mut r.text;
    let mut quarantined: Vec<String> = std::fs::read_dir(data)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains(".corrupt-"))
        .collect();
    quarantined.sort();
    if quarantined.is_empty() {
        writeln!(out, "quarantined files: none")?;
    } else {
        writeln!(
            out,
            "quarantined files (inspect with `sqlite3 FILE .recover`):"
        )?;
        for name in &quarantined {
            writeln!(out, "  {}", data.join(name).display())?;
        }
        r.findings
            .push(format!("{} quarantined files", quarantined.len()));
    }
    close(store).await?;
    Ok(r)
}

/// The doctor's report on a PostgreSQL store (cluster mode): the nodes'
/// leases and the same sections as for a data directory. It may run beside
/// live nodes (it writes nothing but its own node's meta, as `doctor`).
pub async fn run_postgres(url: &str) -> anyhow::Result<Report> {
    let mut r = Report::default();
    let out = &mut r.text;
    let store = open_postgres(url).await?;
    writeln!(
        out,
        "keel-relay doctor: postgres, schema version {}",
        store.startup().schema_version
    )?;
    let nodes = store.nodes().await?;
    if nodes.is_empty() {
        writeln!(out, "nodes: none has run")?;
    } else {
        let now = store.now();
        let list: Vec<String> = nodes
            .iter()
            .map(|n| format!("{} (lease renewed {} ms ago)", n.id, now - n.heartbeat_at))
            .collect();
        writeln!(out, "nodes: {}", list.join(", "))?;
    }
    report(&mut r, &store).await?;
    // The doctor's own meta says nothing about a node: clean either way.
    store.close().await?;
    Ok(r)
}

/// A PostgreSQL store opened as the node `doctor`: it writes nothing but
/// that node's meta.
async fn open_postgres(url: &str) -> anyhow::Result<keel_session_pg::PgStore> {
    keel_session_pg::PgStore::open(keel_session_pg::PgConfig {
        url: url.to_owned(),
        node_id: "doctor".to_owned(),
        pool_size: 2,
        ..keel_session_pg::PgConfig::default()
    })
    .await
    .context("cannot open the PostgreSQL store")
}

/// The sections common to both backends: sessions, outbox, dead sends,
/// the health log and the largest channels.
async fn report<S: SessionStore>(r: &mut Report, store: &S) -> anyhow::Result<()> {
    let out = &mut r.text;
    let clean = store.startup().previous_clean_shutdown;
    writeln!(
        out,
        "previous shutdown: {}",
        if clean {
            "clean"
        } else {
            "UNCLEAN (crash recovery runs on the next start)"
        }
    )?;

    let states = store.count_by_state().await?;
    let states: Vec<String> = states.iter().map(|(s, n)| format!("{s} {n}")).collect();
    writeln!(
        out,
        "sessions: {}",
        if states.is_empty() {
            "none".to_owned()
        } else {
            states.join(", ")
        }
    )?;
    let c = store.outbox_counts().await?;
    writeln!(
        out,
        "outbox: pending {}, claimed {}, sent {}, dead {}",
        c.pending, c.claimed, c.sent, c.dead
    )?;
    if c.dead > 0 {
        r.findings.push(format!("{} DEAD sends", c.dead));
    }
    let dead = store.outbox_items(OutboxState::Dead, 100).await?;
    if !dead.is_empty() {
        writeln!(out, "dead sends (re-queue with `keel-relay redrive`):")?;
        for item in &dead {
            writeln!(
                out,
                "  {} key={} attempts={} last_error={}",
                item.id,
                item.idem_key,
                item.attempts,
                item.last_error.as_deref().unwrap_or("-")
            )?;
        }
    }
    let (line, broken) = health_log_line(&store.health_transitions(100_000).await?);
    writeln!(out, "{line}")?;
    if broken {
        r.findings.push("health log chain broken".to_owned());
    }
    let (channels, largest) = store.channel_stats(10).await?;
    writeln!(out, "channels with messages: {channels}")?;
    for c in &largest {
        writeln!(
            out,
            "  {}: {} messages, oldest offset {}, newest {}, {} payload bytes",
            c.channel, c.messages, c.first, c.last, c.payload_bytes
        )?;
    }
    Ok(())
}

/// `health log: N transitions, ids unique, chain valid; last FROM -> TO (reason)`:
/// every entry's `from` must be the previous entry's `to`, ids increasing.
/// True beside it when the chain is broken.
fn health_log_line(log: &[keel_session::HealthTransition]) -> (String, bool) {
    let broken = log
        .windows(2)
        .find(|w| w[1].id <= w[0].id || w[1].from != w[0].to)
        .map(|w| w[1].id);
    let chain = match broken {
        None => "ids unique, chain valid".to_owned(),
        Some(id) => format!("chain BROKEN at transition {id}"),
    };
    let last = log
        .last()
        .map(|t| format!("; last {} -> {} ({})", t.from, t.to, t.reason))
        .unwrap_or_default();
    (
        format!("health log: {} transitions, {chain}{last}", log.len()),
        broken.is_some(),
    )
}

/// Re-queues every DEAD send; returns how many.
pub async fn redrive(data: &Path) -> anyhow::Result<u64> {
    let (_lock, store) = open(data).await?;
    let n = store.redrive_all().await?;
    close(store).await?;
    Ok(n)
}

/// Re-queues every DEAD send of a PostgreSQL store (cluster mode); returns
/// how many. Safe beside live nodes: one statement moves DEAD to PENDING,
/// and the leader's outbox loop claims them like any other.
pub async fn redrive_postgres(url: &str) -> anyhow::Result<u64> {
    let store = open_postgres(url).await?;
    let n = store.redrive_all().await?;
    store.close().await?;
    Ok(n)
}
