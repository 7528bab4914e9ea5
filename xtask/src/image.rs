//! `cargo xtask image`: builds the agent for the target and calls the image
//! library. Owned by the image work.

use std::path::PathBuf;

use anyhow::Result;
use ballast_updater::payload::Arch;

#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    #[arg(long, value_parser = crate::parse_arch, default_value = "x86_64")]
    pub arch: Arch,
    #[arg(long, default_value = "1.0.0")]
    pub version: String,
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub trust: Vec<PathBuf>,
}

/// Builds the image; returns the output directory.
pub fn run(_args: ImageArgs) -> Result<PathBuf> {
    anyhow::bail!("xtask image: not written yet")
}
