//! `cargo xtask vm-test`: boots built images and runs the scenarios of
//! qemu-tests. Owned by the VM test work.

use anyhow::Result;
use ballast_updater::payload::Arch;

#[derive(Debug, clap::Args)]
pub struct VmTestArgs {
    #[arg(long, value_parser = crate::parse_arch, default_value = "x86_64")]
    pub arch: Arch,
    /// Scenarios to run (all when empty).
    pub scenarios: Vec<String>,
}

pub fn run(_args: VmTestArgs) -> Result<()> {
    anyhow::bail!("xtask vm-test: not written yet")
}
