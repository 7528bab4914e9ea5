//! `cargo xtask image`: parses the options, picks the output and cache
//! directories and `SOURCE_DATE_EPOCH`, and runs `ballast_image::build`
//! (which also cross-compiles the agent). `--check-reproducible` builds a
//! second time into a scratch directory and compares every output's SHA-256.
//! Owned by the image work.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ballast_image::apt::{parse_pins, KernelFlavor};
use ballast_image::build::{output_digests, DEFAULT_SOURCE_DATE_EPOCH};
use ballast_image::formats::DiskFormat;
use ballast_image::{AgentSource, BuildOptions, Platform, Profile, StderrProgress};
use ballast_updater::payload::{Arch, Version};

#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    #[arg(long, value_parser = crate::parse_arch, default_value = "x86_64")]
    pub arch: Arch,
    #[arg(long, default_value = "1.0.0")]
    pub version: String,
    /// Output directory (default: build/<arch>/<version>/, or
    /// build/<arch>/<profile>/<version>/ for a profile other than base).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Update-repository public key (*.pub) to trust; repeatable.
    #[arg(long)]
    pub trust: Vec<PathBuf>,
    /// Where the image runs: qemu (virtio only, cloud kernel), metal
    /// (generic kernel; NVMe, SATA, USB, server NICs, hardware watchdogs) or
    /// cloud (cloud kernel; NVMe, ENA, gVNIC, virtio). Drivers are loaded
    /// by what the machine has.
    #[arg(long, default_value = "qemu")]
    pub platform: Platform,
    /// Kernel flavour, cloud or generic (default: the platform's).
    #[arg(long)]
    pub kernel: Option<KernelFlavor>,
    /// Disk formats to write besides disk.raw: qcow2, vhd (fixed, for
    /// Azure), vmdk (stream-optimised); repeatable.
    #[arg(long = "format")]
    pub formats: Vec<DiskFormat>,
    /// Image profile: base (the agent only) or k8s (containerd, runc, CNI
    /// plugins, iptables, conntrack, CA certificates and their libraries
    /// and kernel modules); recorded as the payload's variant.
    #[arg(long, default_value = "base")]
    pub profile: Profile,
    /// A kubelet binary for /usr/bin/kubelet (k8s profile; checked to be an
    /// ELF executable for --arch).
    #[arg(long, conflicts_with = "kubelet_url")]
    pub kubelet: Option<PathBuf>,
    /// Fetch the kubelet from this http(s) URL at build time (k8s profile;
    /// needs --kubelet-sha256; kept in .cache/kubelet/<sha256>/). Its
    /// version is read from the URL's vX.Y.Z segment (dl.k8s.io layout).
    #[arg(long, requires = "kubelet_sha256")]
    pub kubelet_url: Option<String>,
    /// The SHA-256 (hex) the --kubelet-url download must have; a mismatch
    /// fails the build and keeps nothing.
    #[arg(long, requires = "kubelet_url")]
    pub kubelet_sha256: Option<String>,
    /// The kubelet's version to record (`kubelet=VERSION` in packages.txt
    /// and the payload), when the URL does not name it or with --kubelet.
    #[arg(long)]
    pub kubelet_version: Option<String>,
    /// Pin a Debian package: NAME=VERSION; repeatable.
    #[arg(long = "pin")]
    pub pins: Vec<String>,
    /// Size of each usr slot in MiB.
    #[arg(long, default_value_t = 1024)]
    pub slot_size: u64,
    /// Size of the STATE partition in MiB (grown on first boot).
    #[arg(long, default_value_t = 256)]
    pub state_size: u64,
    /// Test images only: arm the agent's fail point NAME with ACTIONS
    /// (`fail` crate syntax, e.g. `trial-gate=pause`); repeatable. The
    /// agent announces each with a `failpoint-armed` console event.
    #[arg(long = "failpoint", value_name = "NAME=ACTIONS")]
    pub failpoints: Vec<String>,
    /// Use this agent binary instead of building one.
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Build twice and fail unless the outputs are byte-identical.
    #[arg(long)]
    pub check_reproducible: bool,
}

/// `SOURCE_DATE_EPOCH` from the environment, else the commit time of HEAD,
/// else a fixed constant.
pub fn source_date_epoch(root: &Path) -> Result<u64> {
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        return v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number"));
    }
    let git = std::process::Command::new("git")
        .args(["log", "-1", "--format=%ct"])
        .current_dir(root)
        .output();
    if let Ok(out) = git {
        if out.status.success() {
            if let Ok(t) = String::from_utf8_lossy(&out.stdout).trim().parse() {
                return Ok(t);
            }
        }
    }
    Ok(DEFAULT_SOURCE_DATE_EPOCH)
}

fn options(args: &ImageArgs, out: PathBuf) -> Result<BuildOptions> {
    let root = crate::workspace_root();
    let version: Version = args.version.parse()?;
    let agent = match &args.agent {
        Some(p) => AgentSource::Prebuilt(p.clone()),
        None => AgentSource::Build {
            workspace: root.clone(),
        },
    };
    let cache = root.join(".cache/debian").join(args.arch.as_str());
    let mut opts = BuildOptions::new(args.arch, version, out, cache, agent);
    opts.platform = args.platform;
    opts.kernel = args.kernel.unwrap_or(args.platform.kernel());
    opts.profile = args.profile;
    opts.kubelet = args.kubelet.clone();
    opts.kubelet_version = args.kubelet_version.clone();
    if let (Some(url), Some(sha)) = (&args.kubelet_url, &args.kubelet_sha256) {
        if args.profile != Profile::K8s {
            bail!("--kubelet-url needs --profile k8s");
        }
        let cache = root.join(".cache/kubelet");
        eprintln!("kubelet: fetching {url} (SHA-256 {sha})");
        let path = ballast_image::kubelet::fetch(url, sha, &cache, &mut |n| {
            eprintln!("kubelet: {} MiB", n >> 20);
        })?;
        eprintln!("kubelet: {} (SHA-256 checked)", path.display());
        opts.kubelet = Some(path);
        if opts.kubelet_version.is_none() {
            opts.kubelet_version = ballast_image::kubelet::version_from_url(url);
        }
    }
    if !args.failpoints.is_empty() {
        eprintln!(
            "image: TEST IMAGE with fail points armed: {}",
            args.failpoints.join(", ")
        );
        opts.failpoints = Some(args.failpoints.iter().map(|f| format!("{f}\n")).collect());
    }
    opts.trust = args.trust.clone();
    opts.pins = parse_pins(&args.pins)?;
    opts.slot_size = args.slot_size << 20;
    opts.state_size = args.state_size << 20;
    opts.source_date_epoch = source_date_epoch(&root)?;
    Ok(opts)
}

/// `build/<arch>/<version>` for the base profile, `build/<arch>/<profile>/<version>`
/// for the others, so profiles never overwrite each other.
pub fn default_out(root: &Path, arch: Arch, profile: Profile, version: &str) -> PathBuf {
    let dir = root.join("build").join(arch.as_str());
    match profile {
        Profile::Base => dir.join(version),
        other => dir.join(other.as_str()).join(version),
    }
}

/// [`default_out`] for the qemu platform; other platforms get a directory
/// of their own (`build/<arch>/<platform>[/<profile>]/<version>`).
fn platform_out(root: &Path, args: &ImageArgs) -> PathBuf {
    let out = default_out(root, args.arch, args.profile, &args.version);
    if args.platform == Platform::Qemu {
        return out;
    }
    let dir = root
        .join("build")
        .join(args.arch.as_str())
        .join(args.platform.as_str());
    match args.profile {
        Profile::Base => dir.join(&args.version),
        other => dir.join(other.as_str()).join(&args.version),
    }
}

/// Builds the image; returns the output directory.
pub fn run(args: ImageArgs) -> Result<PathBuf> {
    let root = crate::workspace_root();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| platform_out(&root, &args));
    let opts = options(&args, out.clone())?;
    eprintln!(
        "building Ballast {} for {} ({} profile, {} platform) into {} (SOURCE_DATE_EPOCH={})",
        opts.version,
        opts.arch,
        opts.profile,
        opts.platform,
        out.display(),
        opts.source_date_epoch
    );
    let built = ballast_image::build(&opts, &mut StderrProgress)
        .with_context(|| format!("building the {} image", args.arch))?;
    eprintln!("\n{}", built.report);
    eprintln!(
        "disk: {}\npayload: {}",
        built.disk.display(),
        built.payload_dir.display()
    );
    for format in &args.formats {
        let converted = ballast_image::formats::convert(&built.disk, *format)
            .with_context(|| format!("writing the disk as {}", format.extension()))?;
        let size = std::fs::metadata(&converted)
            .with_context(|| format!("reading {}", converted.display()))?
            .len();
        eprintln!(
            "disk ({}): {} ({size} bytes)",
            format.extension(),
            converted.display()
        );
    }

    if args.check_reproducible {
        let second = out.with_file_name(format!(
            "{}.repro-check",
            out.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        eprintln!(
            "\nreproducibility check: building again into {}",
            second.display()
        );
        let mut opts2 = opts.clone();
        opts2.out_dir = second.clone();
        if let AgentSource::Build { .. } = opts2.agent {
            // cargo already built it; reuse the same binary
            opts2.agent = AgentSource::Prebuilt(ballast_image::build::agent_path(&root, args.arch));
        }
        ballast_image::build(&opts2, &mut StderrProgress).context("second build")?;
        let a = output_digests(&out)?;
        let b = output_digests(&second)?;
        let mut differ = Vec::new();
        for (name, hash) in &a {
            let same = b.get(name) == Some(hash);
            eprintln!("  {} {hash}  {name}", if same { "same" } else { "DIFF" });
            if !same {
                differ.push(name.clone());
            }
        }
        std::fs::remove_dir_all(&second)
            .with_context(|| format!("removing {}", second.display()))?;
        if !differ.is_empty() {
            bail!("not reproducible: {} differ", differ.join(", "));
        }
        eprintln!("reproducible: all outputs byte-identical");
    }
    Ok(out)
}
