//! `cargo xtask results RUN_DIR PAGE.md`: a run's docs/results page, its
//! charts in a directory named after the page beside it.

use std::path::Path;

use anyhow::{Context, Result};

pub(crate) fn run(run: &Path, page: &Path) -> Result<()> {
    let charts = page
        .file_stem()
        .and_then(|s| s.to_str())
        .context("the page needs a file name, e.g. docs/results/load.md")?
        .to_owned();
    keel_harness::results::write(run, page, &charts)
        .with_context(|| format!("cannot write {} from {}", page.display(), run.display()))?;
    println!("wrote {} and its charts in {charts}/", page.display());
    Ok(())
}
