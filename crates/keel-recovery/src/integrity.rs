//! Opening a database only after checking it, and moving a damaged one aside.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use keel_session::{Config, OpenError, Store};
use rusqlite::{Connection, ErrorCode, OpenFlags};

use crate::error::StartError;

/// A damaged database that was moved aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantine {
    /// Why the database was judged damaged (SQLite's words).
    pub reason: String,
    /// Each file moved, from its old path to its new one: the database first,
    /// then its `-wal` and `-shm` files where they existed.
    pub moved: Vec<(PathBuf, PathBuf)>,
    /// The `<timestamp>` in the new names (`*.corrupt-<timestamp>`, UTC).
    pub stamp: String,
}

impl Quarantine {
    /// What the operator should read: what happened, which files moved where,
    /// and how to inspect them.
    pub fn message(&self) -> String {
        let mut out = format!(
            "the database was damaged ({}) and was moved aside; a fresh database was created.",
            self.reason
        );
        for (from, to) in &self.moved {
            out.push_str(&format!(" Moved {} to {}.", from.display(), to.display()));
        }
        if let Some((_, db)) = self.moved.first() {
            out.push_str(&format!(
                " Nothing was deleted. To salvage what is readable: \
                 copy the moved -wal file (if any) next to it under its old name, then run \
                 `sqlite3 {} .recover | sqlite3 salvaged.db`.",
                db.display()
            ));
        }
        out
    }
}

/// The result of checking a database file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// There is no database yet (or it is empty).
    Missing,
    /// `PRAGMA quick_check` passed (over what the check covers).
    Intact,
    /// SQLite cannot read it, or `quick_check` found problems.
    Damaged(String),
}

/// The `meta` key a full check sets when it finds damage the startup check
/// does not cover: the next start then checks everything and quarantines.
pub const DAMAGE_FLAG: &str = "integrity.damaged";

/// The tables the startup check leaves to [`full_check`]: the message log
/// and its large payloads (keel-session's schema 4), the tables whose size
/// does not depend on sessions and claims.
const LOG_TABLES: [&str; 2] = ["messages", "message_payloads"];

/// Checks what startup needs, in time that depends on sessions and claims
/// rather than on the size of the message log: `PRAGMA quick_check` of the
/// schema and of every table but the message log (sessions, subscriptions,
/// outbox, meta, health log, ...), each with its indexes. When an earlier
/// [`full_check`] recorded damage ([`DAMAGE_FLAG`]), the whole file is
/// checked instead, so that the damage is quarantined now.
///
/// Read-only: such a connection reads the `-wal` file (committed
/// transactions that were never checkpointed are part of the database) but
/// never checkpoints, truncates or deletes it, so a damaged database is left
/// exactly as the crash left it. Errors that say nothing about the file's
/// content (permissions, a missing directory) are returned, not judged.
pub fn check(path: &Path) -> Result<Check, StartError> {
    run_check(path, false)
}

/// `PRAGMA quick_check` of the whole file, message log included: what
/// `keel-relay doctor` runs, and what [`full_check`] runs in the background
/// after startup. Takes time in proportion to the file.
pub fn check_everything(path: &Path) -> Result<Check, StartError> {
    run_check(path, true)
}

fn run_check(path: &Path, everything: bool) -> Result<Check, StartError> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() > 0 => {}
        Ok(_) => return Ok(Check::Missing),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Check::Missing),
        Err(e) => return Err(StartError::io(path, e)),
    }
    let run = || -> rusqlite::Result<Vec<String>> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let quick_check = |sql: &str| problems(&conn, sql);
        let flagged = || -> rusqlite::Result<bool> {
            let has_meta = conn
                .prepare("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'meta'")?
                .exists([])?;
            Ok(has_meta
                && conn
                    .prepare("SELECT 1 FROM meta WHERE key = ?1 AND value <> ''")?
                    .exists([DAMAGE_FLAG])?)
        };
        if everything || flagged()? {
            return quick_check("PRAGMA quick_check");
        }
        let tables: Vec<String> = conn
            .prepare(
                "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT IN (?1, ?2)
                 ORDER BY name",
            )?
            .query_map(LOG_TABLES, |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut problems = Vec::new();
        for table in tables {
            let quoted = table.replace('"', "\"\"");
            problems.extend(quick_check(&format!("PRAGMA quick_check(\"{quoted}\")"))?);
        }
        Ok(problems)
    };
    match run() {
        Ok(problems) if problems.is_empty() => Ok(Check::Intact),
        Ok(problems) => Ok(Check::Damaged(format!(
            "quick_check: {}",
            problems
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        ))),
        Err(rusqlite::Error::SqliteFailure(e, msg))
            if matches!(e.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) =>
        {
            Ok(Check::Damaged(msg.unwrap_or_else(|| e.to_string())))
        }
        Err(e) => Err(StartError::Unreadable {
            path: path.to_path_buf(),
            detail: e.to_string(),
        }),
    }
}

/// Checks the whole database at `path` (see [`check_everything`]) on a
/// blocking thread, for a service to run in the background once it serves.
/// Damage found there (in the message log: startup checked the rest) is
/// logged at error level, recorded under [`DAMAGE_FLAG`] so that the next
/// start quarantines the file, and forces `health` DEGRADED with a reason
/// that tells the operator to restart.
pub async fn full_check<S: keel_session::SessionStore>(
    path: &Path,
    store: &Store,
    health: &crate::Health<S>,
) -> Check {
    let owned = path.to_path_buf();
    let checked = tokio::task::spawn_blocking(move || check_everything(&owned)).await;
    let check = match checked {
        Ok(Ok(check)) => check,
        Ok(Err(e)) => {
            tracing::warn!(target: "keel_recovery", error = %e, "full database check could not run");
            return Check::Intact;
        }
        Err(e) => {
            tracing::warn!(target: "keel_recovery", error = %e, "full database check failed to run");
            return Check::Intact;
        }
    };
    if let Check::Damaged(reason) = &check {
        let message = format!(
            "the message log of {} is damaged ({reason}); restart the service: the next start \
             moves the database aside and starts a fresh one",
            path.display()
        );
        tracing::error!(target: "keel_recovery", "{message}");
        let _ = store.set_meta(DAMAGE_FLAG, reason).await;
        health.degrade(&message).await;
    } else if store
        .meta(DAMAGE_FLAG)
        .await
        .ok()
        .flatten()
        .is_some_and(|v| !v.is_empty())
    {
        // Damage recorded earlier was not found again: stop checking
        // everything at startup.
        let _ = store.set_meta(DAMAGE_FLAG, "").await;
    }
    check
}

/// Renames those of the database `path`, its `-wal` and its `-shm` files
/// that exist to `<name>.<tag>`; returns each (from, to), or the file that
/// could not be renamed and why.
pub(crate) fn move_aside(
    path: &Path,
    tag: &str,
) -> Result<Vec<(PathBuf, PathBuf)>, (PathBuf, std::io::Error)> {
    let mut moved = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", path.display()));
        if !from.exists() {
            continue;
        }
        let to = PathBuf::from(format!("{}.{tag}", from.display()));
        std::fs::rename(&from, &to).map_err(|e| (from.clone(), e))?;
        moved.push((from, to));
    }
    Ok(moved)
}

/// The rows of a check pragma (`quick_check`, `integrity_check`) other
/// than `ok`: the problems it found.
pub(crate) fn problems(conn: &Connection, pragma: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(pragma)?;
    let rows = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows.into_iter().filter(|r| r != "ok").collect())
}

/// Renames `path` and its `-wal` and `-shm` files to `*.corrupt-<timestamp>`.
pub fn quarantine(path: &Path, reason: &str) -> Result<Quarantine, StartError> {
    let stamp = utc_stamp(SystemTime::now());
    let moved = move_aside(path, &format!("corrupt-{stamp}"))
        .map_err(|(from, e)| StartError::io(&from, e))?;
    if let Some(dir) = path.parent() {
        // Make the renames durable before a fresh file takes the old name.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(Quarantine {
        reason: reason.to_owned(),
        moved,
        stamp,
    })
}

/// Checks the database at `path`, quarantines it if it is damaged, and opens
/// it (or the fresh one that replaces it).
///
/// A quarantine is logged at error level with [`Quarantine::message`] and
/// recorded in the fresh database's `meta` table under
/// `quarantine.<timestamp>`; the health log entry is the caller's
/// (see [`crate::start`]).
pub async fn open_checked(
    path: &Path,
    config: Config,
) -> Result<(Store, Option<Quarantine>), StartError> {
    let owned = path.to_path_buf();
    let checked = tokio::task::spawn_blocking(move || check(&owned))
        .await
        .map_err(|e| StartError::io(path, std::io::Error::other(e)))??;
    let mut quarantined = match checked {
        Check::Damaged(reason) => Some(quarantine(path, &reason)?),
        Check::Missing | Check::Intact => None,
    };
    let store = match Store::open(path, config.clone()).await {
        Ok(store) => store,
        // Damage that quick_check cannot see but opening for writing can.
        Err(OpenError::Corrupt { detail, .. }) if quarantined.is_none() => {
            quarantined = Some(quarantine(path, &detail)?);
            Store::open(path, config).await?
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(q) = &quarantined {
        tracing::error!(target: "keel_recovery", "{}", q.message());
        let record = serde_json::json!({
            "reason": q.reason,
            "moved": q.moved.iter().map(|(f, t)| [f.display().to_string(), t.display().to_string()]).collect::<Vec<_>>(),
        });
        store
            .set_meta(&format!("quarantine.{}", q.stamp), &record.to_string())
            .await?;
    }
    Ok((store, quarantined))
}

/// `YYYYMMDDTHHMMSS.mmmZ` for `t` in UTC (quarantined files' suffix; the
/// harness's run directories use it without the milliseconds).
pub fn utc_stamp(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stamps_are_utc_calendar_times() {
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101T000000.000Z");
        // 2026-11-23 18:45:07.089 UTC
        let t = UNIX_EPOCH + Duration::from_millis(1_795_459_507_089);
        assert_eq!(utc_stamp(t), "20261123T184507.089Z");
        // A leap day.
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(utc_stamp(t), "20000229T000000.000Z");
    }
}
