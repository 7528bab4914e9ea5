//! `cargo xtask vm-test`: builds the image if it is missing (trusting the
//! test key in `build/test-keys/`, releases 1.1.0 and 1.2.0 when an
//! update scenario runs, and the k8s-profile image when `k8s` runs), boots it and runs the scenarios of `qemu-tests`,
//! one line per scenario, then `N passed, M failed`. Also the helpers `run` and `bench boot` share:
//! finding or building the image, choosing the accelerator.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use ballast_image::Profile;
use ballast_updater::payload::Arch;
use clap::{Args, FromArgMatches};
use qemu_tests::image::BuiltImage;
use qemu_tests::scenarios::{self, Context};
use qemu_tests::update::{self, fixture};
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
    /// Build the images the scenarios need, then stop without booting any
    /// (so the build runs outside the VM lock).
    #[arg(long)]
    pub build_only: bool,
    /// Scenarios to run (default when empty: the core tier on both arches,
    /// the extended tier too on x86_64): boot, reboot, verity, runtime,
    /// remote, k8s (builds build/<arch>/k8s/1.0.0 when missing), update,
    /// update-unhealthy, update-never-boots, update-power-cut,
    /// update-tampered, update-fleetlock, update-watchdog,
    /// update-kubernetes (builds build/<arch>/k8s-node/{1.0.0,1.1.0});
    /// update-all for every update one, all for every one.
    pub scenarios: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    Tcg,
    Kvm,
    Auto,
}

/// Name that selects every scenario, whatever its tier.
pub const GROUP_EVERY: &str = "all";

/// Versions built besides the test image for the update scenarios (only
/// their payloads are used).
pub const UPDATE_VERSIONS: &[&str] = &["1.1.0", "1.2.0"];

/// `build/<arch>/1.0.0`, built with `cargo xtask image` trusting the test
/// key (`build/test-keys/`, generated when missing) when its disk.raw is
/// missing or it was built without that key.
pub fn ensure_image(arch: Arch) -> Result<PathBuf> {
    ensure_version(arch, TEST_VERSION)
}

/// `build/<arch>/<version>`, built like [`ensure_image`]: into a scratch
/// directory first, then moved into place with a stamp naming the key.
pub fn ensure_version(arch: Arch, version: &str) -> Result<PathBuf> {
    ensure_profile(arch, version, Profile::Base)
}

/// Like [`ensure_version`] for any profile, in the profile's own
/// directory (`build/<arch>/<profile>/<version>` unless base).
pub fn ensure_profile(arch: Arch, version: &str, profile: Profile) -> Result<PathBuf> {
    let root = crate::workspace_root();
    let dir = crate::image::default_out(&root, arch, profile, version);
    ensure_built(&dir, arch, version, profile, &[])
}

/// The metal-flavour image of the `metal` scenarios
/// (`build/<arch>/metal/<version>`).
pub fn ensure_metal(arch: Arch) -> Result<PathBuf> {
    let root = crate::workspace_root();
    let base = crate::image::default_out(&root, arch, Profile::Base, TEST_VERSION);
    let dir = qemu_tests::metal::image_dir_beside(&base, TEST_VERSION);
    ensure_built(
        &dir,
        arch,
        TEST_VERSION,
        Profile::Base,
        &["--platform", qemu_tests::metal::PLATFORM],
    )
}

/// The k8s-profile images of `update-kubernetes`
/// (`build/<arch>/k8s-node/<version>`): containerd, and a placeholder
/// at /usr/bin/kubelet ([`kubelet_placeholder`]) so that the node passes
/// the health gate of a cluster node, which needs a kubelet.
pub fn ensure_k8s_node(arch: Arch, version: &str) -> Result<PathBuf> {
    let root = crate::workspace_root();
    let base = crate::image::default_out(&root, arch, Profile::Base, TEST_VERSION);
    let dir = qemu_tests::k8s_strategy::image_dir_beside(&base, version);
    let kubelet = kubelet_placeholder(arch)?;
    let kubelet = kubelet.to_string_lossy();
    ensure_built(
        &dir,
        arch,
        version,
        Profile::K8s,
        &[
            "--kubelet",
            &kubelet,
            "--kubelet-version",
            "v0.0.0-placeholder",
        ],
    )
}

/// Source of the kubelet placeholder: takes any arguments, runs until
/// signalled. Not a kubelet: the scenario tests the agent's calls.
const KUBELET_PLACEHOLDER_C: &str =
    "/* ballast update-kubernetes: a placeholder for /usr/bin/kubelet. */\n\
#include <unistd.h>\n\
int main(void) { for (;;) pause(); }\n";

/// `build/<arch>/kubelet-placeholder`, compiled static with the host's
/// (cross) gcc from `xtask deps`.
fn kubelet_placeholder(arch: Arch) -> Result<PathBuf> {
    let dir = crate::workspace_root().join("build").join(arch.as_str());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let src = dir.join("kubelet-placeholder.c");
    let out = dir.join("kubelet-placeholder");
    std::fs::write(&src, KUBELET_PLACEHOLDER_C)
        .with_context(|| format!("writing {}", src.display()))?;
    let cc = match arch {
        Arch::X86_64 => "gcc",
        Arch::Aarch64 => "aarch64-linux-gnu-gcc",
    };
    let status = std::process::Command::new(cc)
        .args(["-static", "-Os", "-s", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .with_context(|| format!("running {cc} (cargo xtask deps installs it)"))?;
    anyhow::ensure!(status.success(), "{cc} failed to build {}", out.display());
    Ok(out)
}

/// The hung release of the `update-watchdog` scenario
/// (`build/<arch>/watchdog-metal/1.1.0`): the metal flavour, whose
/// i6300esb driver (loaded by modalias) the trial arms, and the fail point
/// that hangs the trial.
pub fn ensure_hung_release(arch: Arch) -> Result<PathBuf> {
    let root = crate::workspace_root();
    let dir = root
        .join("build")
        .join(arch.as_str())
        .join(qemu_tests::update::scenarios::HUNG_RELEASE);
    ensure_built(
        &dir,
        arch,
        "1.1.0",
        Profile::Base,
        &[
            "--platform",
            qemu_tests::metal::PLATFORM,
            "--failpoint",
            "trial-gate=pause",
        ],
    )
}

/// The release of the `update-delta` scenario
/// (`build/<arch>/agent-delta/1.1.0`): 1.1.0 whose only change is the
/// agent binary, which gets an ELF section naming the release (`objcopy
/// --add-section`; gcc's binutils), so it differs from 1.0.0's without a
/// second compile.
pub fn ensure_agent_release(arch: Arch) -> Result<PathBuf> {
    let root = crate::workspace_root();
    let dir = root
        .join("build")
        .join(arch.as_str())
        .join(qemu_tests::update::delta::AGENT_RELEASE);
    ensure_built_with(&dir, arch, "1.1.0", Profile::Base, &[], Some(mark_agent))
}

fn mark_agent(agent: &Path) -> Result<()> {
    let note = agent.with_extension("release");
    std::fs::write(&note, "ballast update-delta test release 1.1.0\n")?;
    let status = std::process::Command::new("objcopy")
        .arg(format!(
            "--add-section=.note.ballast-release={}",
            note.display()
        ))
        .arg(agent)
        .status()
        .context("running objcopy (binutils)")?;
    anyhow::ensure!(status.success(), "objcopy failed: {status}");
    Ok(())
}

/// `dir` holding an image of `version` trusting the test key, built with
/// `extra` image arguments when missing.
fn ensure_built(
    dir: &Path,
    arch: Arch,
    version: &str,
    profile: Profile,
    extra: &[&str],
) -> Result<PathBuf> {
    ensure_built_with(dir, arch, version, profile, extra, None)
}

/// [`ensure_built`], the agent changed by `patch` first.
fn ensure_built_with(
    dir: &Path,
    arch: Arch,
    version: &str,
    profile: Profile,
    extra: &[&str],
    patch: Option<fn(&Path) -> Result<()>>,
) -> Result<PathBuf> {
    let root = crate::workspace_root();
    let public = fixture::ensure_test_key(&root.join("build").join("test-keys"))?;
    let dir = dir.to_owned();
    // The agent as the sources make it now (cargo does nothing when it is
    // fresh), copied so that a build running beside us cannot change what
    // the image gets after it was hashed.
    let built = ballast_image::build::build_agent(&root, arch)?;
    let scratch = tempfile::tempdir()?;
    let agent = scratch.path().join("ballast");
    std::fs::copy(&built, &agent).with_context(|| format!("copying {}", built.display()))?;
    if let Some(patch) = patch {
        patch(&agent)?;
    }
    let agent_digest = qemu_tests::image::agent_digest(&agent)?;
    if dir.join("disk.raw").exists()
        && fixture::trusts(&dir, &public)
        && qemu_tests::image::holds_agent(&dir, &agent_digest)
    {
        return Ok(dir);
    }
    eprintln!(
        "{}: no disk.raw, not built trusting {}, or built with another agent: building the image",
        dir.display(),
        public.display()
    );
    let tmp = dir.with_file_name(format!("{version}.new"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    let mut args = image_args(arch, version, profile, &public, &tmp, extra)?;
    args.agent = Some(agent);
    let out = crate::image::run(args)?;
    anyhow::ensure!(
        out.join("disk.raw").exists(),
        "the image build wrote no disk.raw in {}",
        out.display()
    );
    let stamp = fixture::trust_stamp(&out, &public)?;
    std::fs::write(out.join(fixture::TRUST_STAMP), stamp)
        .with_context(|| format!("writing the trust stamp in {}", out.display()))?;
    qemu_tests::image::stamp_agent(&out, &agent_digest)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::rename(&out, &dir)
        .with_context(|| format!("moving {} to {}", out.display(), dir.display()))?;
    Ok(dir)
}

/// `cargo xtask image --arch A --version V --trust KEY --out DIR`, parsed
/// by clap so that options added to `ImageArgs` keep their defaults.
fn image_args(
    arch: Arch,
    version: &str,
    profile: Profile,
    trust: &Path,
    out: &Path,
    extra: &[&str],
) -> Result<crate::image::ImageArgs> {
    let cmd = crate::image::ImageArgs::augment_args(clap::Command::new("image"));
    let trust = trust.to_string_lossy();
    let out = out.to_string_lossy();
    let matches = cmd
        .try_get_matches_from(
            [
                "image",
                "--arch",
                arch.as_str(),
                "--version",
                version,
                "--profile",
                profile.as_str(),
                "--trust",
                &trust,
                "--out",
                &out,
            ]
            .into_iter()
            .chain(extra.iter().copied()),
        )
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

/// The scenarios named (`update-all`: every update scenario; `all`:
/// every scenario), or by default those whose tier runs on `arch` (core on
/// both, extended on x86_64).
fn select(names: &[String], arch: Arch) -> Result<Vec<&'static scenarios::Scenario>> {
    let every = || scenarios::ALL.iter().chain(update::UPDATE);
    if names.is_empty() {
        return Ok(every()
            .filter(|s| s.tier.runs_by_default_on(arch))
            .collect());
    }
    if names.iter().any(|n| n == GROUP_EVERY) {
        return Ok(every().collect());
    }
    let mut out = Vec::new();
    for n in names {
        if n == update::GROUP_ALL {
            out.extend(update::UPDATE.iter());
            continue;
        }
        let s = scenarios::find(n)
            .or_else(|| update::find(n))
            .with_context(|| {
                let known: Vec<&str> = scenarios::ALL
                    .iter()
                    .chain(update::UPDATE)
                    .map(|s| s.name)
                    .chain([update::GROUP_ALL, GROUP_EVERY])
                    .collect();
                format!("unknown scenario {n:?} (known: {})", known.join(", "))
            })?;
        out.push(s);
    }
    Ok(out)
}

pub fn run(args: VmTestArgs) -> Result<()> {
    let selected = select(&args.scenarios, args.arch)?;
    if args.image.is_none() && selected.iter().any(|s| update::find(s.name).is_some()) {
        for v in UPDATE_VERSIONS {
            ensure_version(args.arch, v)?;
        }
    }
    if args.image.is_none() && selected.iter().any(|s| s.name == "update-watchdog") {
        ensure_hung_release(args.arch)?;
    }
    if args.image.is_none() && selected.iter().any(|s| s.name == "update-delta") {
        ensure_agent_release(args.arch)?;
    }
    if args.image.is_none() && selected.iter().any(|s| s.name == "k8s") {
        ensure_profile(args.arch, TEST_VERSION, Profile::K8s)?;
    }
    if args.image.is_none() && selected.iter().any(|s| s.name == "update-kubernetes") {
        for v in [TEST_VERSION, "1.1.0"] {
            ensure_k8s_node(args.arch, v)?;
        }
    }
    if args.image.is_none() && selected.iter().any(|s| s.name.starts_with("metal")) {
        ensure_metal(args.arch)?;
    }
    let dir = match &args.image {
        Some(dir) => dir.clone(),
        None => ensure_image(args.arch)?,
    };
    if args.build_only {
        eprintln!("images built; --build-only boots nothing");
        return Ok(());
    }
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
        let a = image_args(
            Arch::Aarch64,
            TEST_VERSION,
            Profile::K8s,
            Path::new("k.pub"),
            Path::new("out"),
            &[
                "--platform",
                qemu_tests::metal::PLATFORM,
                "--failpoint",
                "trial-gate=pause",
            ],
        )
        .unwrap();
        assert_eq!(a.arch, Arch::Aarch64);
        assert_eq!(a.version, TEST_VERSION);
        assert_eq!(a.profile, Profile::K8s);
        assert_eq!(a.trust, vec![PathBuf::from("k.pub")]);
        assert_eq!(a.out, Some(PathBuf::from("out")));
        assert!(a.kernel.is_none());
        assert_eq!(a.platform, ballast_image::Platform::Metal);
        assert_eq!(a.failpoints, ["trial-gate=pause"]);
    }

    #[test]
    fn update_scenarios_are_selected_by_name_group_and_arch_default() {
        let names = |v: Vec<&scenarios::Scenario>| v.iter().map(|s| s.name).collect::<Vec<_>>();
        let x86 = names(select(&[], Arch::X86_64).unwrap());
        assert!(x86.contains(&"boot") && x86.contains(&"update-fleetlock"));
        assert!(x86.contains(&"remote"));
        let arm = names(select(&[], Arch::Aarch64).unwrap());
        assert!(arm.contains(&"update") && !arm.contains(&"update-fleetlock"));
        assert!(arm.contains(&"boot") && arm.contains(&"verity") && !arm.contains(&"k8s"));
        assert!(arm.contains(&"remote"));
        assert!(x86.contains(&"update-watchdog") && arm.contains(&"update-watchdog"));
        assert!(x86.contains(&"metal") && arm.contains(&"metal"));
        assert!(!arm.contains(&"metal-sata"));
        assert!(x86.contains(&"k8s") && x86.contains(&"runtime"));
        let every = names(select(&["all".into()], Arch::Aarch64).unwrap());
        assert_eq!(every.len(), scenarios::ALL.len() + update::UPDATE.len());
        let all = names(select(&["update-all".into()], Arch::Aarch64).unwrap());
        assert_eq!(all.len(), update::UPDATE.len());
        let one = names(select(&["update-tampered".into()], Arch::Aarch64).unwrap());
        assert_eq!(one, vec!["update-tampered"]);
        assert!(select(&["nope".into()], Arch::X86_64).is_err());
    }
}
