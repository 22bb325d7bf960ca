//! What a service does after `kill -9`, a corrupt database, a dead child
//! process or a full disk.
//!
//! - [`start`]: lock the data directory ([`DirLock`]), kill process groups a
//!   previous run left behind ([`supervise::reap_orphans`]), check the
//!   database's state tables and quarantine it if damaged ([`integrity`];
//!   [`integrity::full_check`] checks the message log once the service
//!   runs), run crash recovery
//!   if the last run did not shut down cleanly ([`recover`]), and start the
//!   persisted [`Health`] machine.
//! - [`graceful_shutdown`]: stop intake, drain, terminate children, record a
//!   clean shutdown.
//! - [`Supervisor`]: child processes in their own process groups, with line
//!   streams, timeouts, group-wide TERM/KILL, and a parent-death signal.
//!
//! # Example
//!
//! ```
//! use keel_recovery::{HealthState, StartOptions, start};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let started = start(StartOptions::new(dir.path())).await?;
//! assert!(started.report.previous_clean_shutdown);
//! started.health.ready("listening").await?;
//! assert_eq!(started.health.state(), HealthState::Operational);
//!
//! // A second instance on the same directory is refused, naming the holder.
//! let err = start(StartOptions::new(dir.path())).await.unwrap_err();
//! assert!(err.to_string().contains(&format!("pid {}", std::process::id())));
//!
//! let intake = keel_recovery::Shutdown::new();
//! let report = keel_recovery::graceful_shutdown(
//!     "example done", &started.health, &intake, async {},
//!     std::time::Duration::from_secs(5), None, &started.store,
//! ).await?;
//! assert!(report.clean);
//! # Ok(())
//! # }
//! ```

pub mod backup;
pub mod disk;
mod error;
mod files;
pub mod health;
pub mod integrity;
mod lock;
pub mod procfs;
mod recover;
mod session_child;
mod shutdown;
pub mod supervise;

use std::path::{Path, PathBuf};
use std::time::Instant;

use keel_session::{SessionStore, Store};

pub use crate::disk::{DiskThresholds, disk_status, watch_disk};
pub use crate::error::StartError;
pub use crate::files::{FileLimit, raise_open_files};
pub use crate::health::{DiskStatus, Health, HealthError, HealthState, Inputs, Transition};
pub use crate::integrity::Quarantine;
pub use crate::integrity::utc_stamp;
pub use crate::lock::{DirLock, LOCK_FILE, LockError};
pub use crate::recover::{RecoveryReport, crash_notice, recover};
pub use crate::session_child::{ChildEnded, crash_session_on_exit};
pub use crate::shutdown::{
    Shutdown, ShutdownReport, ShutdownToken, Signals, graceful_shutdown, wait_for_signal,
};
pub use crate::supervise::{
    Child, CommandSpec, Exit, ExitCause, Line, Stream, Supervisor, SupervisorConfig,
};

/// The database file's name inside the data directory.
pub const DB_FILE: &str = "keel.db";
/// The supervisor registry's directory inside the data directory.
pub const REGISTRY_DIR: &str = "pgroups";

/// Where and how [`start`] runs.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// The data directory (created if missing).
    pub data_dir: PathBuf,
    /// The store's configuration.
    pub store: keel_session::Config,
}

impl StartOptions {
    /// Defaults for `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        StartOptions {
            data_dir: data_dir.to_path_buf(),
            store: keel_session::Config::default(),
        }
    }

    /// `<data_dir>/keel.db`.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join(DB_FILE)
    }

    /// `<data_dir>/pgroups`: give it to [`SupervisorConfig::registry`] so the
    /// next start can find groups this run leaves behind.
    pub fn registry_dir(&self) -> PathBuf {
        self.data_dir.join(REGISTRY_DIR)
    }
}

/// A started service's recovered parts.
#[derive(Debug)]
pub struct Started<S: SessionStore = Store> {
    /// Held for the life of the service.
    pub lock: DirLock,
    /// The (possibly fresh) store, recovered.
    pub store: S,
    /// In STARTING; call [`Health::ready`] once serving.
    pub health: Health<S>,
    /// What recovery found and did, timed from the start of [`start`].
    pub report: RecoveryReport,
}

/// Runs startup recovery (see the crate docs for the steps).
///
/// Fails only when the service must not run: another instance holds the
/// directory, the database cannot be read for a reason other than damage, or
/// the disk cannot take the recovery writes. Damage is not a failure: the
/// file is quarantined and the service starts on a fresh database.
pub async fn start(options: StartOptions) -> Result<Started, StartError> {
    let (path, config) = (options.db_path(), options.store.clone());
    start_on(&options, async move |_: &Path| {
        integrity::open_checked(&path, config).await
    })
    .await
}

/// [`start`] on a store that `open` opens (given the data directory): the
/// same lock, orphan reaping, crash recovery and health log, for a store
/// that is not the data directory's SQLite file (keel-session-pg's, in
/// cluster mode). `open` returns the store and, if it moved a damaged
/// database aside, the quarantine.
pub async fn start_on<S, F>(options: &StartOptions, open: F) -> Result<Started<S>, StartError>
where
    S: SessionStore,
    F: AsyncFnOnce(&Path) -> Result<(S, Option<Quarantine>), StartError>,
{
    let started = Instant::now();
    let mut steps = Vec::new();
    let lock = DirLock::acquire(&options.data_dir)?;
    let registry = options.registry_dir();
    let reaped = tokio::task::spawn_blocking(move || supervise::reap_orphans(&registry))
        .await
        .map_err(|e| StartError::io(&options.data_dir, std::io::Error::other(e)))?
        .map_err(|e| StartError::io(&options.registry_dir(), e))?;
    steps.push(("lock and reap orphans", started.elapsed()));
    let step = Instant::now();
    let (store, quarantine) = open(&options.data_dir).await?;
    steps.push(("check state tables and open", step.elapsed()));
    let mut report = recover(&store).await?;
    steps.append(&mut report.steps);
    report.steps = steps;
    report.reaped_groups = reaped;
    report.quarantine = quarantine;
    report.duration = started.elapsed();
    let mut reason = format!("start: {}", report.summary());
    if let Some(q) = &report.quarantine {
        reason.push_str(&format!("; {}", q.message()));
    }
    let health = Health::start(store.clone(), &reason).await;
    tracing::info!(target: "keel_recovery", "{reason}");
    Ok(Started {
        lock,
        store,
        health,
        report,
    })
}

/// The README's examples, compiled and run as doctests so that they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
