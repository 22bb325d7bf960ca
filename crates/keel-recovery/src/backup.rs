//! Live backup and restore of a data directory's database.
//!
//! [`backup`] copies the database with SQLite's online backup API while the
//! service runs: one step over every page inside one read transaction, so
//! the copy is the database as of one commit (the `-wal` file's committed
//! frames included) and writers are never blocked (in WAL mode a reader
//! holds back only the checkpoint, for the length of the copy). The copy is
//! written beside its destination, checked with `PRAGMA integrity_check`,
//! synced and renamed into place: a crash mid-backup leaves no half file
//! under the destination's name.
//!
//! [`restore`] puts a backup in place of a stopped service's database. A
//! backup taken from a live service records that service as running, so the
//! first start on it runs crash recovery, exactly as after `kill -9` at the
//! moment of the backup: sessions connected then are CRASHED, claimed sends
//! go back to PENDING, nothing acknowledged before the backup began is lost.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

use crate::{DB_FILE, DirLock, LockError};

/// Why a backup or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// There is no database to back up.
    #[error("{0} does not exist: nothing to back up")]
    Missing(PathBuf),
    /// SQLite refused (opening, copying or checking).
    #[error("{path}: {detail}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// SQLite's message.
        detail: String,
    },
    /// The copy failed `integrity_check`: it is left under `.partial`.
    #[error("the copy at {path} failed integrity_check: {problems}")]
    Damaged {
        /// The rejected copy.
        path: PathBuf,
        /// The first problems reported.
        problems: String,
    },
    /// A file could not be written, synced or renamed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The data directory is in use (restore needs the service stopped).
    #[error(transparent)]
    Locked(#[from] LockError),
}

fn sqlite(path: &Path) -> impl FnOnce(rusqlite::Error) -> BackupError + '_ {
    move |e| BackupError::Sqlite {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |e| BackupError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// How long [`backup`] retries a source it cannot read (locked or busy).
const LOCKED_FOR_AT_MOST: Duration = Duration::from_secs(60);

/// What [`backup`] wrote.
#[derive(Debug, Clone)]
pub struct BackupReport {
    /// The backup file.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Pages copied.
    pub pages: u64,
    /// How long the copy, the check and the sync took.
    pub took: Duration,
}

/// Copies the database of the data directory `data` to `to` while the
/// service may be running (see the module docs). `to` is replaced only
/// once the copy passed `integrity_check` and was synced.
pub fn backup(data: &Path, to: &Path) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    let db = data.join(DB_FILE);
    if !db.is_file() {
        return Err(BackupError::Missing(db));
    }
    let partial = with_suffix(to, ".partial");
    let _ = std::fs::remove_file(&partial);
    let src = Connection::open_with_flags(
        &db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sqlite(&db))?;
    src.busy_timeout(Duration::from_secs(10))
        .map_err(sqlite(&db))?;
    let pages = {
        let mut dst = Connection::open(&partial).map_err(sqlite(&partial))?;
        let copy = rusqlite::backup::Backup::new(&src, &mut dst).map_err(sqlite(&partial))?;
        // Every page in one step: one read transaction, one commit's view.
        // Smaller steps would restart from the beginning each time a
        // writer commits in between, forever under steady load.
        let deadline = Instant::now() + LOCKED_FOR_AT_MOST;
        loop {
            match copy.step(-1).map_err(sqlite(&db))? {
                rusqlite::backup::StepResult::Done => break,
                _ if Instant::now() >= deadline => {
                    return Err(BackupError::Sqlite {
                        path: db,
                        detail: format!(
                            "locked for {} s: no read transaction could start",
                            LOCKED_FOR_AT_MOST.as_secs()
                        ),
                    });
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let pages = copy.progress().pagecount;
        drop(copy);
        // One file, no journal beside it: the copy is read by a service
        // that sets its own journal mode when it opens it.
        dst.pragma_update(None, "journal_mode", "DELETE")
            .map_err(sqlite(&partial))?;
        let problems = integrity_problems(&dst).map_err(sqlite(&partial))?;
        if !problems.is_empty() {
            return Err(BackupError::Damaged {
                path: partial,
                problems,
            });
        }
        pages
    };
    restrict_and_sync(&partial)?;
    std::fs::rename(&partial, to).map_err(io(to))?;
    sync_parent(to)?;
    let bytes = std::fs::metadata(to).map_err(io(to))?.len();
    Ok(BackupReport {
        path: to.to_path_buf(),
        bytes,
        pages: u64::try_from(pages).unwrap_or(0),
        took: started.elapsed(),
    })
}

/// What [`restore`] did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// The database now in place.
    pub database: PathBuf,
    /// Where the files it replaced were moved (none for an empty directory).
    pub moved_aside: Vec<PathBuf>,
}

/// Puts the backup `from` in place as the database of the data directory
/// `data` (created if missing). Takes the directory lock, so it refuses
/// while a service runs there. The backup is checked first; the files it
/// replaces (database, `-wal`, `-shm`) are moved aside under a
/// `.before-restore-<unix seconds>` suffix, never deleted.
pub fn restore(from: &Path, data: &Path) -> Result<RestoreReport, BackupError> {
    if !from.is_file() {
        return Err(BackupError::Missing(from.to_path_buf()));
    }
    {
        let conn = Connection::open_with_flags(
            from,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sqlite(from))?;
        let problems = integrity_problems(&conn).map_err(sqlite(from))?;
        if !problems.is_empty() {
            return Err(BackupError::Damaged {
                path: from.to_path_buf(),
                problems,
            });
        }
    }
    std::fs::create_dir_all(data).map_err(io(data))?;
    let _lock = DirLock::acquire(data)?;
    let db = data.join(DB_FILE);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let moved_aside = crate::integrity::move_aside(&db, &format!("before-restore-{stamp}"))
        .map_err(|(path, source)| BackupError::Io { path, source })?
        .into_iter()
        .map(|(_, aside)| aside)
        .collect();
    let incoming = with_suffix(&db, ".restoring");
    std::fs::copy(from, &incoming).map_err(io(&incoming))?;
    restrict_and_sync(&incoming)?;
    std::fs::rename(&incoming, &db).map_err(io(&db))?;
    sync_parent(&db)?;
    Ok(RestoreReport {
        database: db,
        moved_aside,
    })
}

/// `PRAGMA integrity_check`'s problems, the first five joined (empty: ok).
fn integrity_problems(conn: &Connection) -> rusqlite::Result<String> {
    let problems = crate::integrity::problems(conn, "PRAGMA integrity_check")?;
    Ok(problems.into_iter().take(5).collect::<Vec<_>>().join("; "))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Owner-only (the database holds every session's messages) and synced.
fn restrict_and_sync(path: &Path) -> Result<(), BackupError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io(path))?;
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// Syncs the directory holding `path`, so a rename into it survives power loss.
fn sync_parent(path: &Path) -> Result<(), BackupError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io(parent))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database(dir: &Path, rows: i64) {
        let conn = Connection::open(dir.join(DB_FILE)).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        for i in 0..rows {
            conn.execute("INSERT INTO t (id, v) VALUES (?1, zeroblob(1000))", [i])
                .unwrap();
        }
    }

    fn rows(db: &Path) -> i64 {
        Connection::open(db)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    /// A backup holds every committed row, WAL included, and a restore
    /// puts it in place, moving the old files aside.
    #[test]
    fn backup_then_restore_keeps_every_committed_row() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        database(&data, 500);
        // A connection left open keeps the rows in the WAL, uncheckpointed.
        let live = Connection::open(data.join(DB_FILE)).unwrap();
        live.execute("INSERT INTO t (id, v) VALUES (1000, x'01')", [])
            .unwrap();
        let to = dir.path().join("keel.backup");
        let report = backup(&data, &to).unwrap();
        assert_eq!(rows(&to), 501);
        assert!(report.bytes > 500 * 1000 && report.pages > 0);
        assert!(!with_suffix(&to, ".partial").exists());

        let fresh = dir.path().join("fresh");
        let r = restore(&to, &fresh).unwrap();
        assert!(r.moved_aside.is_empty());
        assert_eq!(rows(&fresh.join(DB_FILE)), 501);
        drop(live);
        // Over an existing database: it is moved aside, not deleted.
        let r = restore(&to, &data).unwrap();
        assert!(!r.moved_aside.is_empty(), "{r:?}");
        assert!(r.moved_aside.iter().all(|p| p.exists()));
        assert_eq!(rows(&data.join(DB_FILE)), 501);
    }

    /// A damaged backup is refused by restore, and nothing is moved.
    #[test]
    fn restore_refuses_a_damaged_backup() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        database(&data, 200);
        let to = dir.path().join("keel.backup");
        backup(&data, &to).unwrap();
        // Overwrite pages in the middle of the file with garbage.
        let mut bytes = std::fs::read(&to).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid..mid + 8192].fill(0xA5);
        std::fs::write(&to, &bytes).unwrap();
        let err = restore(&to, &data).unwrap_err();
        assert!(
            matches!(
                err,
                BackupError::Damaged { .. } | BackupError::Sqlite { .. }
            ),
            "{err}"
        );
        assert_eq!(rows(&data.join(DB_FILE)), 200, "nothing replaced");
    }

    #[test]
    fn backup_of_a_missing_database_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let err = backup(dir.path(), &dir.path().join("b")).unwrap_err();
        assert!(err.to_string().contains("nothing to back up"), "{err}");
    }
}
