//! `cargo xtask fuzz`: builds every cargo-fuzz target under updater/fuzz
//! (manifest, boot entries) and agent/fuzz (the disk scanner) and runs
//! each for a short, bounded time. Only stable Rust exists on
//! these machines, so cargo-fuzz runs with RUSTC_BOOTSTRAP=1 (it needs the
//! `-Z sanitizer` flags of a nightly compiler).
//!
//! The smoke runs are built for speed of building, which is most of their
//! CI minutes: unoptimised (`--dev`, which also keeps overflow checks on,
//! the arithmetic bugs we fuzz for), without AddressSanitizer (`-s none`:
//! the fuzzed code is safe Rust, `unsafe` lives only in `sys.rs`, which no
//! target reaches, so ASan has nothing to find), and both fuzz crates share
//! one target directory, so the updater and the common dependencies build
//! once. A long campaign can still be run by hand with `cargo fuzz run`.

use std::process::Command;

use anyhow::{ensure, Context, Result};

#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 20)]
    pub seconds: u32,
}

/// Crates (relative to the workspace root) whose `fuzz/` holds targets.
const FUZZED_CRATES: [&str; 2] = ["updater", "agent"];

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
    let mut count = 0;
    for krate in FUZZED_CRATES {
        count += run_crate(krate, &args)?;
    }
    println!("fuzz: {count} targets ran without a crash");
    Ok(())
}

/// Runs every target of `krate/fuzz`; returns how many ran.
fn run_crate(krate: &str, args: &FuzzArgs) -> Result<usize> {
    let root = crate::workspace_root();
    let dir = root.join(krate);
    let target_dir = root.join("target/fuzz");
    let target_dir = target_dir.to_string_lossy();
    let list = Command::new("cargo")
        .args(["fuzz", "list"])
        .current_dir(&dir)
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
        println!("fuzz: {t} for {} s", args.seconds);
        let ok = Command::new("cargo")
            .args([
                "fuzz",
                "run",
                "--dev",
                "--sanitizer",
                "none",
                "--target-dir",
                &target_dir,
                t,
                "--",
                &format!("-max_total_time={}", args.seconds),
            ])
            .current_dir(&dir)
            .env("RUSTC_BOOTSTRAP", "1")
            .status()
            .with_context(|| format!("running fuzz target {t}"))?
            .success();
        ensure!(
            ok,
            "fuzz target {t} failed (see its crash artifact under {krate}/fuzz/artifacts)"
        );
    }
    Ok(targets.len())
}
