//! `cargo xtask fuzz`: builds every cargo-fuzz target under updater/fuzz
//! and agent/fuzz and runs each for a short, bounded time. Only stable Rust exists on
//! these machines, so cargo-fuzz runs with RUSTC_BOOTSTRAP=1 (it needs the
//! `-Z sanitizer` flags of a nightly compiler).

use std::process::Command;

use anyhow::{ensure, Context, Result};

#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 20)]
    pub seconds: u32,
}

pub fn run(args: FuzzArgs) -> Result<()> {
    let have_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_fuzz {
        println!("fuzz: installing cargo-fuzz (cargo install cargo-fuzz --locked)");
        let ok = Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked"])
            .status()?
            .success();
        ensure!(ok, "cargo install cargo-fuzz failed");
    }
    let mut ran = 0;
    for crate_dir in FUZZ_CRATES {
        ran += run_crate(&crate::workspace_root().join(crate_dir), args.seconds)?;
    }
    println!("fuzz: {ran} targets ran without a crash");
    Ok(())
}

/// The crates whose `fuzz/` directory holds cargo-fuzz targets.
const FUZZ_CRATES: [&str; 2] = ["updater", "agent"];

/// Runs every target of one crate's fuzz directory; returns how many ran.
fn run_crate(dir: &std::path::Path, seconds: u32) -> Result<usize> {
    let list = Command::new("cargo")
        .args(["fuzz", "list"])
        .current_dir(dir)
        .env("RUSTC_BOOTSTRAP", "1")
        .output()
        .context("cargo fuzz list")?;
    ensure!(
        list.status.success(),
        "cargo fuzz list failed: {}",
        String::from_utf8_lossy(&list.stderr)
    );
    let targets: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    ensure!(
        !targets.is_empty(),
        "no fuzz targets found in {}",
        dir.display()
    );
    for t in &targets {
        println!("fuzz: {t} for {seconds} s");
        let ok = Command::new("cargo")
            .args([
                "fuzz",
                "run",
                t,
                "--",
                &format!("-max_total_time={seconds}"),
            ])
            .current_dir(dir)
            .env("RUSTC_BOOTSTRAP", "1")
            .status()
            .with_context(|| format!("running fuzz target {t}"))?
            .success();
        ensure!(
            ok,
            "fuzz target {t} failed (see its crash artifact under {}/fuzz/artifacts)",
            dir.display()
        );
    }
    Ok(targets.len())
}
