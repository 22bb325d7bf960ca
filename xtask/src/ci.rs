//! `cargo xtask ci`: runs `.ci/run`, so that a local pass means a CI pass.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

pub(crate) fn run() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?
        .to_path_buf();
    let status = Command::new("bash")
        .arg(root.join(".ci/run"))
        .current_dir(&root)
        .status()
        .context("cannot run .ci/run; is bash installed?")?;
    if !status.success() {
        bail!(".ci/run failed ({status}); fix the first error it printed and run it again");
    }
    Ok(())
}
