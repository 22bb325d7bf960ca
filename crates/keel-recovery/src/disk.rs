//! Free space on the data disk, fed into health.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::health::{DiskStatus, Health};

/// When free space counts as low or full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskThresholds {
    /// Below this many free bytes the disk is [`DiskStatus::Low`]. Default 256 MiB.
    pub low_bytes: u64,
    /// Below this many free bytes the disk is [`DiskStatus::Full`]. Default 1 MiB.
    pub full_bytes: u64,
}

impl Default for DiskThresholds {
    fn default() -> Self {
        DiskThresholds {
            low_bytes: 256 * 1024 * 1024,
            full_bytes: 1024 * 1024,
        }
    }
}

/// Free bytes available to unprivileged writers on the file system holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// The status of the disk holding `path`.
pub fn disk_status(path: &Path, thresholds: DiskThresholds) -> std::io::Result<DiskStatus> {
    let free = free_bytes(path)?;
    Ok(if free < thresholds.full_bytes {
        DiskStatus::Full
    } else if free < thresholds.low_bytes {
        DiskStatus::Low
    } else {
        DiskStatus::Ok
    })
}

/// Checks the disk holding `path` every `every` and feeds the status into
/// `health`, until the task is aborted.
pub fn watch_disk<S: keel_session::SessionStore>(
    health: Health<S>,
    path: PathBuf,
    thresholds: DiskThresholds,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Ok(status) = disk_status(&path, thresholds) {
                health.set_disk(status).await;
            }
        }
    })
}
