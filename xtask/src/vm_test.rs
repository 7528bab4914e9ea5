//! `cargo xtask vm-test`: builds the image if it is missing, boots it and
//! runs the scenarios of `qemu-tests`, one line per scenario, then
//! `N passed, M failed`. Also the helpers `run` and `bench boot` share:
//! finding or building the image, choosing the accelerator.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use ballast_updater::payload::Arch;
use clap::{Args, FromArgMatches};
use qemu_tests::image::BuiltImage;
use qemu_tests::scenarios::{self, Context};
use qemu_tests::vm::Accel;

/// Version the test image is built as.
pub const TEST_VERSION: &str = "1.0.0";

#[derive(Debug, clap::Args)]
pub struct VmTestArgs {
    #[arg(long, value_parser = crate::parse_arch, default_value = "x86_64")]
    pub arch: Arch,
    /// Accelerator: tcg, kvm, or auto (KVM only when a probe boot works).
    #[arg(long, value_enum, default_value_t = AccelChoice::Tcg)]
    pub accel: AccelChoice,
    /// Keep serial logs of passing VMs too (under target/vm-logs).
    #[arg(long)]
    pub keep_logs: bool,
    /// Longest wait for one boot to reach ready, in seconds.
    #[arg(long, default_value_t = 300)]
    pub boot_timeout: u64,
    /// Test this built image directory (disk.raw + payload/) instead of
    /// build/<arch>/1.0.0.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Scenarios to run (all when empty): boot, reboot, verity.
    pub scenarios: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    Tcg,
    Kvm,
    Auto,
}

/// `build/<arch>/1.0.0`, built with `cargo xtask image` when its disk.raw
/// is missing.
pub fn ensure_image(arch: Arch) -> Result<PathBuf> {
    let dir = crate::workspace_root()
        .join("build")
        .join(arch.as_str())
        .join(TEST_VERSION);
    if dir.join("disk.raw").exists() {
        return Ok(dir);
    }
    eprintln!("{} has no disk.raw: building the image", dir.display());
    let out = crate::image::run(image_args(arch)?)?;
    if out.join("disk.raw").exists() {
        Ok(out)
    } else {
        anyhow::bail!("the image build wrote no disk.raw in {}", out.display())
    }
}

/// `cargo xtask image --arch <arch> --version 1.0.0`, parsed by clap so
/// that options added to `ImageArgs` keep their defaults.
fn image_args(arch: Arch) -> Result<crate::image::ImageArgs> {
    let cmd = crate::image::ImageArgs::augment_args(clap::Command::new("image"));
    let matches = cmd
        .try_get_matches_from(["image", "--arch", arch.as_str(), "--version", TEST_VERSION])
        .context("building image arguments")?;
    crate::image::ImageArgs::from_arg_matches(&matches).context("building image arguments")
}

/// Where serial logs of failed VMs stay.
pub fn log_dir() -> PathBuf {
    crate::workspace_root().join("target").join("vm-logs")
}

/// Resolves `auto` by booting the floor initramfs under KVM.
pub fn resolve_accel(choice: AccelChoice, image: &BuiltImage) -> Result<Accel> {
    Ok(match choice {
        AccelChoice::Tcg => Accel::Tcg,
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Auto => {
            let cache = crate::workspace_root().join(".cache").join("qemu-tests");
            let initramfs = qemu_tests::floor::initramfs(image.meta.arch, &cache)?;
            eprintln!("probing KVM with a busybox boot...");
            if qemu_tests::floor::kvm_works(
                image.meta.arch,
                &image.kernel(),
                &initramfs,
                &log_dir(),
            ) {
                eprintln!("KVM works: using it");
                Accel::Kvm
            } else {
                eprintln!("KVM does not boot a guest here: using TCG");
                Accel::Tcg
            }
        }
    })
}

pub fn run(args: VmTestArgs) -> Result<()> {
    let selected: Vec<&scenarios::Scenario> = if args.scenarios.is_empty() {
        scenarios::ALL.iter().collect()
    } else {
        args.scenarios
            .iter()
            .map(|n| {
                scenarios::find(n).with_context(|| {
                    let names: Vec<&str> = scenarios::ALL.iter().map(|s| s.name).collect();
                    format!("unknown scenario {n:?} (known: {})", names.join(", "))
                })
            })
            .collect::<Result<_>>()?
    };
    let dir = match &args.image {
        Some(dir) => dir.clone(),
        None => ensure_image(args.arch)?,
    };
    let image = BuiltImage::load(&dir)?;
    anyhow::ensure!(
        image.meta.arch == args.arch,
        "{} holds an {} image, not {}",
        dir.display(),
        image.meta.arch,
        args.arch
    );
    let accel = resolve_accel(args.accel, &image)?;
    let ctx = Context {
        arch: args.arch,
        image,
        accel,
        log_dir: log_dir(),
        keep_logs: args.keep_logs,
        boot_timeout: Duration::from_secs(args.boot_timeout),
    };
    eprintln!(
        "vm-test: {} scenario(s) on {} ({}), image {}",
        selected.len(),
        args.arch,
        accel.as_str(),
        dir.display()
    );
    let (mut passed, mut failed) = (0, 0);
    for s in selected {
        eprintln!("== {} {}: {}", s.name, args.arch, s.about);
        let t = Instant::now();
        let result = (s.run)(&ctx);
        let secs = t.elapsed().as_secs_f64();
        match result {
            Ok(()) => {
                passed += 1;
                println!("PASS {} {} ({secs:.1} s)", s.name, args.arch);
            }
            Err(e) => {
                failed += 1;
                println!(
                    "FAIL {} {} ({secs:.1} s): {:#}",
                    s.name,
                    args.arch,
                    anyhow::Error::from(e)
                );
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        anyhow::bail!("{failed} VM scenario(s) failed on {}", args.arch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_arguments_name_the_test_version_and_arch() {
        let a = image_args(Arch::Aarch64).unwrap();
        assert_eq!(a.arch, Arch::Aarch64);
        assert_eq!(a.version, TEST_VERSION);
        assert!(a.out.is_none());
    }
}
