//! `cargo xtask`: Ballast's developer tasks (host dependencies, image
//! builds, VM runs and tests, benchmarks, the CI suite). Each task lives in
//! its own module; this file only parses the command line.

#![forbid(unsafe_code)]

mod bench;
mod ci;
mod deps;
mod fuzz;
mod image;
mod run;
#[cfg(test)]
mod tidy;
mod vm_test;

use std::path::PathBuf;

use anyhow::Result;
use ballast_updater::payload::Arch;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Ballast developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install the host packages and Rust targets the build and tests need.
    Deps,
    /// Build a bootable disk image and its update payload.
    Image(image::ImageArgs),
    /// Build an image if needed and boot it in QEMU on this terminal.
    Run(run::RunArgs),
    /// Boot images in QEMU and run the VM test scenarios.
    VmTest(vm_test::VmTestArgs),
    /// Run a benchmark and record it in BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// Build and briefly run the fuzz targets.
    Fuzz(fuzz::FuzzArgs),
    /// The whole test suite, as CI runs it.
    Ci(ci::CiArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Deps => deps::install(),
        Task::Image(args) => image::run(args).map(|_| ()),
        Task::Run(args) => run::run(args),
        Task::VmTest(args) => vm_test::run(args),
        Task::Bench(args) => bench::run(args),
        Task::Fuzz(args) => fuzz::run(args),
        Task::Ci(args) => ci::run(args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

/// Parses `x86_64` / `aarch64` for clap.
pub fn parse_arch(s: &str) -> Result<Arch, String> {
    s.parse()
        .map_err(|e: ballast_updater::payload::PayloadError| e.to_string())
}
