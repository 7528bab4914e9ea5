//! `cargo xtask ci`: the whole suite as CI runs it, step by step with
//! timings: host dependencies, formatting, lints, unit and integration tests, fuzz smoke runs,
//! image builds for both architectures, and the VM scenarios on both.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ballast_updater::payload::Arch;

#[derive(Debug, clap::Args)]
pub struct CiArgs {
    /// Skip the image builds and VM tests (host-only checks).
    #[arg(long)]
    pub no_vm: bool,
    /// Only these architectures for images and VM tests (default: both).
    #[arg(long, value_parser = crate::parse_arch)]
    pub arch: Vec<Arch>,
}

/// What one CI run may take on the 2-core machines (the hard limit is 90
/// minutes). The VM scenarios are tiered to stay inside it: see
/// `qemu_tests::scenarios::Tier` and the README.
const TIME_BUDGET: Duration = Duration::from_secs(60 * 60);

/// One step: a name and the command line it runs.
struct Step {
    name: String,
    program: String,
    args: Vec<String>,
}

impl Step {
    fn cargo(name: &str, args: &[&str]) -> Self {
        Step {
            name: name.to_owned(),
            program: "cargo".into(),
            args: args.iter().map(|s| (*s).to_owned()).collect(),
        }
    }
}

pub fn run(args: CiArgs) -> Result<()> {
    let root = crate::workspace_root();
    let arches = if args.arch.is_empty() {
        vec![Arch::X86_64, Arch::Aarch64]
    } else {
        args.arch
    };
    let mut steps = vec![
        Step::cargo("host dependencies", &["xtask", "deps"]),
        Step::cargo("format", &["fmt", "--all", "--check"]),
        Step::cargo(
            "clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
        Step::cargo("unit and integration tests", &["test", "--workspace"]),
    ];
    if root.join("updater/fuzz/Cargo.toml").exists() {
        steps.push(Step::cargo("fuzz smoke runs", &["xtask", "fuzz"]));
    }
    if !args.no_vm {
        for arch in &arches {
            let a = arch.as_str();
            // vm-test builds the images it needs (1.0.0 trusting a test key
            // made for the run, and the 1.1.0 and 1.2.0 update payloads).
            steps.push(Step::cargo(
                &format!("images and VM tests {a}"),
                &["xtask", "vm-test", "--arch", a],
            ));
        }
    }

    let total = steps.len();
    let mut failed = Vec::new();
    let started = Instant::now();
    for (i, step) in steps.iter().enumerate() {
        println!(
            "==> [{}/{total}] {} ({} {})",
            i + 1,
            step.name,
            step.program,
            step.args.join(" ")
        );
        let t = Instant::now();
        let status = Command::new(&step.program)
            .args(&step.args)
            .current_dir(&root)
            .status()
            .with_context(|| format!("starting {}", step.program))?;
        let secs = t.elapsed().as_secs();
        if status.success() {
            println!("==> [{}/{total}] {}: ok in {secs} s", i + 1, step.name);
        } else {
            println!(
                "==> [{}/{total}] {}: FAILED ({status}) in {secs} s",
                i + 1,
                step.name
            );
            failed.push(step.name.clone());
            // Everything after it needs the host packages.
            if step.name == "host dependencies" {
                break;
            }
        }
    }
    let took = started.elapsed();
    let verdict = if took <= TIME_BUDGET {
        "within"
    } else {
        "OVER"
    };
    println!(
        "==> CI took {} s ({verdict} the {} min budget)",
        took.as_secs(),
        TIME_BUDGET.as_secs() / 60
    );
    if failed.is_empty() {
        println!("ci: all {total} steps passed");
        Ok(())
    } else {
        anyhow::bail!("{} step(s) failed: {}", failed.len(), failed.join(", "))
    }
}
