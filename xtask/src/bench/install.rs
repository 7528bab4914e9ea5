//! `cargo xtask bench install`. Owned by the updater work.

use anyhow::Result;

#[derive(Debug, clap::Args)]
pub struct InstallBenchArgs {}

pub fn run(_args: InstallBenchArgs) -> Result<()> {
    anyhow::bail!("bench install: not written yet")
}
