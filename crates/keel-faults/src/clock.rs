//! Steps of a process's wall clock, as NTP, a VM resumed or migrated, or an
//! operator's `date -s` make them: the process runs under libfaketime
//! (Debian's `libfaketime`), which reads the offset from a control file
//! this module rewrites mid-run. Only the wall clock (`CLOCK_REALTIME`)
//! steps; the monotonic clocks stay real
//! (`FAKETIME_DONT_FAKE_MONOTONIC=1`), as they do on a real machine.
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! use keel_faults::clock::{ClockSteps, Steps};
//!
//! let dir = tempfile::tempdir()?;
//! let Steps::Ready(steps) = ClockSteps::prepare(dir.path())? else {
//!     return Ok(()); // no libfaketime here: say so, skip
//! };
//! let mut cmd = std::process::Command::new("date");
//! cmd.envs(steps.env());
//! steps.set_offset(3_600)?; // an hour ahead, within a second
//! cmd.status()?;
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};

/// Where Debian and a default `make install` put the library; the
/// environment variable `KEEL_LIBFAKETIME` names another.
const LIBRARY_PATHS: [&str; 4] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
];

/// How long libfaketime keeps the control file's offset before reading it
/// again, in seconds: a step takes effect within this.
pub const REREAD_S: u64 = 1;

/// A control file for one or more processes' wall-clock offset.
#[derive(Debug)]
pub struct ClockSteps {
    library: PathBuf,
    file: PathBuf,
    offset_s: AtomicI64,
}

/// What [`ClockSteps::prepare`] found.
#[derive(Debug)]
pub enum Steps {
    /// Ready: start processes with [`ClockSteps::env`].
    Ready(ClockSteps),
    /// libfaketime is not installed here.
    Unavailable {
        /// Why, for the report.
        why: String,
    },
}

impl ClockSteps {
    /// The library, if installed: `KEEL_LIBFAKETIME`, else the usual paths.
    pub fn library() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("KEEL_LIBFAKETIME") {
            return Some(PathBuf::from(p)).filter(|p| p.is_file());
        }
        LIBRARY_PATHS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    }

    /// A control file in `dir` at offset 0.
    pub fn prepare(dir: &Path) -> std::io::Result<Steps> {
        let Some(library) = Self::library() else {
            return Ok(Steps::Unavailable {
                why: "needs libfaketime (Debian: apt-get install libfaketime; or set \
                      KEEL_LIBFAKETIME to the library's path)"
                    .to_owned(),
            });
        };
        let steps = ClockSteps {
            library,
            file: dir.join("faketime"),
            offset_s: AtomicI64::new(0),
        };
        steps.set_offset(0)?;
        Ok(Steps::Ready(steps))
    }

    /// The environment a process needs to run on this control file.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("LD_PRELOAD".into(), self.library.display().to_string()),
            (
                "FAKETIME_TIMESTAMP_FILE".into(),
                self.file.display().to_string(),
            ),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
            ("FAKETIME_CACHE_DURATION".into(), REREAD_S.to_string()),
        ]
    }

    /// Sets the processes' wall clock `offset_s` seconds from the real one
    /// (negative: behind); they see it within [`REREAD_S`]. The file is
    /// replaced whole, so a reader never sees half an offset.
    pub fn set_offset(&self, offset_s: i64) -> std::io::Result<()> {
        let tmp = self.file.with_extension("new");
        std::fs::write(&tmp, format!("{offset_s:+}\n"))?;
        std::fs::rename(&tmp, &self.file)?;
        self.offset_s.store(offset_s, Ordering::SeqCst);
        Ok(())
    }

    /// The offset last set, seconds.
    pub fn offset(&self) -> i64 {
        self.offset_s.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::{ClockSteps, Steps};

    /// `date +%s` under the control file, minus the real time: the offset
    /// the child saw.
    fn seen_offset(steps: &ClockSteps) -> i64 {
        let out = Command::new("date")
            .arg("+%s")
            .envs(steps.env())
            .output()
            .expect("date runs");
        let child: i64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("date printed seconds");
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after the epoch")
            .as_secs() as i64;
        child - real
    }

    #[test]
    #[ignore = "needs libfaketime: cargo test -- --include-ignored"]
    fn a_child_sees_each_offset_set() {
        let dir = tempfile::tempdir().expect("tempdir");
        let steps = match ClockSteps::prepare(dir.path()).expect("control file") {
            Steps::Ready(s) => s,
            Steps::Unavailable { why } => panic!("{why}"),
        };
        for offset in [0, 7_200, -3_600, 86_400] {
            steps.set_offset(offset).expect("set");
            let seen = seen_offset(&steps);
            assert!(
                (seen - offset).abs() <= 1,
                "set {offset} s, the child saw {seen} s"
            );
            assert_eq!(steps.offset(), offset);
        }
    }
}
