//! `cargo xtask run`: build an image if needed and boot it interactively.
//! Owned by the VM test work.

use anyhow::Result;
use ballast_updater::payload::Arch;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[arg(long, value_parser = crate::parse_arch, default_value = "x86_64")]
    pub arch: Arch,
}

pub fn run(_args: RunArgs) -> Result<()> {
    anyhow::bail!("xtask run: not written yet")
}
