//! `cargo xtask bench`: benchmarks, each a ratio against a baseline
//! measured in the same run, recorded in BENCHMARKS.md.

mod boot;
mod install;

use anyhow::Result;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: Bench,
}

#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// Boot to agent-ready against a busybox initramfs floor.
    Boot(boot::BootBenchArgs),
    /// Install throughput against curl | tee >(openssl dgst) > file && sync.
    Install(install::InstallBenchArgs),
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.which {
        Bench::Boot(a) => boot::run(a),
        Bench::Install(a) => install::run(a),
    }
}
