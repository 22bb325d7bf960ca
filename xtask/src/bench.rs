//! `cargo xtask bench`: every crate's criterion benches and the relay bench,
//! then one table of every figure with its baseline ratio and target.

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {}

pub(crate) fn run(_args: BenchArgs) -> Result<i32> {
    anyhow::bail!("not built yet")
}
