//! Disk faults: a size-limited tmpfs to hit ENOSPC for real, and a fill helper.

use std::io::Write;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// A tmpfs mounted on a directory; unmounted when dropped.
#[derive(Debug)]
pub struct Tmpfs {
    path: PathBuf,
    size_bytes: u64,
    mounted: bool,
}

/// The result of asking for a tmpfs: mounted, or skipped with the reason
/// (not root, no `CAP_SYS_ADMIN`, a container that forbids mounts). Callers
/// report a skip as a skip, never as a pass.
#[derive(Debug)]
pub enum TmpfsMount {
    /// Mounted and ready.
    Mounted(Tmpfs),
    /// Mounting is not permitted here.
    Skipped {
        /// Why, for the report.
        why: String,
    },
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_bytes` on `dir` (created if missing).
    pub fn mount(dir: &Path, size_bytes: u64) -> TmpfsMount {
        if let Err(e) = std::fs::create_dir_all(dir) {
            return TmpfsMount::Skipped {
                why: format!("cannot create {}: {e}", dir.display()),
            };
        }
        let options = format!("size={size_bytes},mode=0755");
        match mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(options.as_str()),
        ) {
            Ok(()) => TmpfsMount::Mounted(Tmpfs {
                path: dir.to_path_buf(),
                size_bytes,
                mounted: true,
            }),
            Err(errno) => TmpfsMount::Skipped {
                why: format!(
                    "mounting a tmpfs on {} is not permitted here ({errno}); run as root with CAP_SYS_ADMIN",
                    dir.display()
                ),
            },
        }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The size limit.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Unmounts now (also done on drop).
    pub fn unmount(mut self) -> nix::Result<()> {
        self.mounted = false;
        umount2(&self.path, MntFlags::MNT_DETACH)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = umount2(&self.path, MntFlags::MNT_DETACH);
        }
    }
}

/// Writes zeros to `file` until the disk is full (or `limit` bytes were
/// written); returns the bytes written. Remove the file to give the space back.
pub fn fill(file: &Path, limit: Option<u64>) -> std::io::Result<u64> {
    let mut f = std::fs::File::create(file)?;
    let block = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        if limit.is_some_and(|l| written >= l) {
            break;
        }
        match f.write(&block) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(e) => return Err(e),
        }
    }
    // Data that did not fit may surface only at sync; ENOSPC there is "full" too.
    match f.sync_all() {
        Err(e) if e.raw_os_error() != Some(nix::libc::ENOSPC) => return Err(e),
        _ => {}
    }
    Ok(written)
}
