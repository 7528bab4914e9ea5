//! `cargo xtask bench boot`. Owned by the VM test work.

use anyhow::Result;

#[derive(Debug, clap::Args)]
pub struct BootBenchArgs {}

pub fn run(_args: BootBenchArgs) -> Result<()> {
    anyhow::bail!("bench boot: not written yet")
}
