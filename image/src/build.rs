//! The whole image build, step by step: agent, Debian packages, kernel
//! modules, initrd, usr image with dm-verity, payload directory, ESP, STATE,
//! `disk.raw`, size report. Every identifier and timestamp is derived from
//! fixed names, the version, the architecture and `SOURCE_DATE_EPOCH`, so
//! the same inputs give byte-identical outputs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use ballast_updater::bootentry::{version_dir, BootEntry, EntryName};
use ballast_updater::cmdline::{BootParams, Slot};
use ballast_updater::payload::{self, Arch, Artifact, PayloadMetadata, Version};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::apt::{self, Apt, AptError, KernelFlavor, PackageInfo};
use crate::cmd::{Cmd, CmdError};
use crate::fsimage::{self, FsError};
use crate::gpt::{self, GptError, Layout, PartitionSpec};
use crate::initrd::{self, InitrdError};
use crate::kmod::{self, Compression, KmodError, ModulesDep, Selection};
use crate::platform::{self, Platform};
use crate::profile::{self, Profile, ProfileError};

const MIB: u64 = 1 << 20;

/// Load order of the runtime modules inside the usr image.
pub const RUNTIME_MODULE_LIST: &str = "usr/lib/ballast/modules-load";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error(transparent)]
    Apt(#[from] AptError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Kmod(#[from] KmodError),
    #[error(transparent)]
    Initrd(#[from] InitrdError),
    #[error(transparent)]
    Gpt(#[from] GptError),
    #[error(transparent)]
    Cpio(#[from] crate::cpio::CpioError),
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error("the usr image of profile {profile} is {need} bytes, more than the {have}-byte slot (--slot-size)")]
    SlotTooSmall {
        profile: Profile,
        need: u64,
        have: u64,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel package {package} ships {count} kernels under /lib/modules, expected one")]
    KernelRelease { package: String, count: usize },
    #[error("{package} lacks {path}")]
    MissingFile { package: String, path: PathBuf },
    #[error("trust key {path} must be a file named *.pub")]
    TrustKey { path: PathBuf },
    #[error("built payload metadata is invalid: {0}")]
    Metadata(#[from] payload::PayloadError),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

fn ioe(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where the agent binary comes from.
#[derive(Debug, Clone)]
pub enum AgentSource {
    /// `cargo build --release -p ballast --target <arch>-unknown-linux-musl`
    /// in this workspace.
    Build { workspace: PathBuf },
    /// A binary built elsewhere.
    Prebuilt(PathBuf),
}

/// Everything one build depends on.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub arch: Arch,
    pub version: Version,
    /// Image profile (`variant` in the metadata).
    pub profile: Profile,
    /// A kubelet binary for `/usr/bin/kubelet` (k8s profile only).
    pub kubelet: Option<PathBuf>,
    /// The kubelet's version, recorded as `kubelet=VERSION` in
    /// `packages.txt` and the payload's package list (`unknown` when a
    /// kubelet is shipped without one).
    pub kubelet_version: Option<String>,
    /// Test images only: `NAME=ACTIONS` lines written to
    /// `/usr/lib/ballast/failpoints` (see the agent's failpoints.rs).
    pub failpoints: Option<String>,
    pub kernel: KernelFlavor,
    /// Where the image runs: which drivers it ships.
    pub platform: Platform,
    pub agent: AgentSource,
    /// Update-repository public keys copied to `/usr/lib/ballast/trust/`.
    pub trust: Vec<PathBuf>,
    /// `NAME=VERSION` pins for Debian packages.
    pub pins: BTreeMap<String, String>,
    pub out_dir: PathBuf,
    /// Download cache for .deb files of this arch (`.cache/debian/<arch>`).
    pub cache_dir: PathBuf,
    pub source_date_epoch: u64,
    pub esp_size: u64,
    pub slot_size: u64,
    pub state_size: u64,
    /// erofs compressor for the usr image (`None`: uncompressed).
    pub usr_compression: Option<String>,
}

impl BuildOptions {
    /// Defaults for everything but the identity of the build.
    pub fn new(
        arch: Arch,
        version: Version,
        out_dir: PathBuf,
        cache_dir: PathBuf,
        agent: AgentSource,
    ) -> Self {
        BuildOptions {
            arch,
            version,
            profile: Profile::Base,
            kubelet: None,
            kubelet_version: None,
            failpoints: None,
            kernel: KernelFlavor::Cloud,
            platform: Platform::Qemu,
            agent,
            trust: Vec::new(),
            pins: BTreeMap::new(),
            out_dir,
            cache_dir,
            source_date_epoch: DEFAULT_SOURCE_DATE_EPOCH,
            esp_size: 256 * MIB,
            slot_size: 1024 * MIB,
            state_size: 256 * MIB,
            usr_compression: Some("lz4hc".to_owned()),
        }
    }
}

/// Used when neither `SOURCE_DATE_EPOCH` nor a git commit time is given
/// (2024-01-01T00:00:00Z).
pub const DEFAULT_SOURCE_DATE_EPOCH: u64 = 1_704_067_200;
/// The mtime of every initrd entry (2024-01-01, as the default epoch).
const INITRD_MTIME: u32 = 1_704_067_200;

/// Receives progress while a build runs.
pub trait Progress {
    /// Step `n` of `total` starts.
    fn step(&mut self, n: usize, total: usize, what: &str);
    /// A detail inside the current step.
    fn detail(&mut self, what: &str);
}

/// Prints progress to stderr.
#[derive(Debug, Default)]
pub struct StderrProgress;

impl Progress for StderrProgress {
    fn step(&mut self, n: usize, total: usize, what: &str) {
        eprintln!("[{n}/{total}] {what}…");
    }
    fn detail(&mut self, what: &str) {
        eprintln!("      {what}");
    }
}

const STEPS: usize = 10;

/// What a build produced.
#[derive(Debug, Clone)]
pub struct BuildOutput {
    pub out_dir: PathBuf,
    pub disk: PathBuf,
    pub payload_dir: PathBuf,
    pub metadata: PayloadMetadata,
    pub layout: Layout,
    pub report: String,
    pub module_compression: Vec<(String, usize)>,
}

/// Namespace of every UUID the build derives.
pub fn namespace() -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_DNS, b"image.ballast.invalid")
}

/// UUIDv5 of a fixed name.
pub fn fixed_uuid(name: &str) -> Uuid {
    Uuid::new_v5(&namespace(), name.as_bytes())
}

/// The GPT layout for `arch`, with GUIDs from fixed names.
pub fn disk_layout(arch: Arch, esp: u64, slot: u64, state: u64) -> Result<Layout, GptError> {
    let usr_type = match arch {
        Arch::X86_64 => gpt::TYPE_USR_X86_64,
        Arch::Aarch64 => gpt::TYPE_USR_AARCH64,
    };
    let part = |label: &str, type_guid, size| PartitionSpec {
        label: label.to_owned(),
        type_guid,
        guid: fixed_uuid(&format!("ballast/{arch}/{label}")),
        size,
    };
    Layout::new(
        fixed_uuid(&format!("ballast/{arch}/disk")),
        vec![
            part("ESP", gpt::TYPE_ESP, esp),
            part(Slot::A.partition_label(), usr_type, slot),
            part(Slot::B.partition_label(), usr_type, slot),
            part("STATE", gpt::TYPE_LINUX, state),
        ],
    )
}

/// The dm-verity salt of a version: fixed per version and arch.
pub fn verity_salt(arch: Arch, version: Version) -> String {
    hex::encode(Sha256::digest(format!(
        "ballast/{arch}/{version}/verity-salt"
    )))
}

/// The target triple the agent is built for.
pub fn rust_target(arch: Arch) -> String {
    format!("{}-unknown-linux-musl", arch.as_str())
}

/// Builds the agent with cargo (its output on this terminal).
pub fn build_agent(workspace: &Path, arch: Arch) -> Result<PathBuf, BuildError> {
    let target = rust_target(arch);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    Cmd::new(cargo)
        .args(["build", "--release", "-p", "ballast", "--target", &target])
        .current_dir(workspace)
        .run_inherit()?;
    Ok(agent_path(workspace, arch))
}

/// Where cargo puts the release agent for `arch` (honours `CARGO_TARGET_DIR`).
pub fn agent_path(workspace: &Path, arch: Arch) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join(rust_target(arch))
        .join("release/ballast")
}

fn sha256_hex(path: &Path) -> Result<String, BuildError> {
    Ok(apt::sha256_file(path)?)
}

fn file_size(path: &Path) -> Result<u64, BuildError> {
    Ok(fs::metadata(path).map_err(ioe(path))?.len())
}

/// Runs the whole build.
pub fn build(opts: &BuildOptions, progress: &mut dyn Progress) -> Result<BuildOutput, BuildError> {
    let arch = opts.arch;
    let version = opts.version;
    let epoch = opts.source_date_epoch;
    let out = &opts.out_dir;
    let work = out.join(".work");
    let payload_dir = out.join("payload");
    for p in [&work, &payload_dir] {
        if p.exists() {
            fs::remove_dir_all(p).map_err(ioe(p))?;
        }
    }
    fs::create_dir_all(&work).map_err(ioe(&work))?;
    fs::create_dir_all(&payload_dir).map_err(ioe(&payload_dir))?;

    // 1. agent
    progress.step(1, STEPS, "building the agent (static musl)");
    let agent = match &opts.agent {
        AgentSource::Build { workspace } => build_agent(workspace, arch)?,
        AgentSource::Prebuilt(p) => p.clone(),
    };
    let agent_size = file_size(&agent)?;
    progress.detail(&format!("{} ({agent_size} bytes)", agent.display()));

    // 2. resolve packages
    progress.step(2, STEPS, "resolving Debian packages");
    let apt = Apt::new(arch.debian(), opts.cache_dir.clone(), opts.pins.clone());
    let (meta_pkg, kernel_pkg) = apt.resolve_kernel(opts.kernel)?;
    let boot_pkg = apt.resolve_stable("systemd-boot-efi")?;
    for p in [&meta_pkg, &kernel_pkg, &boot_pkg] {
        progress.detail(&p.spec());
    }

    // 3. fetch
    progress.step(3, STEPS, "fetching packages (SHA-256 checked)");
    let mut debs = BTreeMap::new();
    for p in [&kernel_pkg, &boot_pkg] {
        let deb = apt.fetch(p)?;
        progress.detail(&format!("{} ok", deb.display()));
        debs.insert(p.name.clone(), deb);
    }
    let mut packages: Vec<String> = {
        let mut v: Vec<String> = [&meta_pkg, &kernel_pkg, &boot_pkg]
            .iter()
            .map(|p| p.spec())
            .collect();
        v.sort();
        v
    };

    // 4. kernel + modules
    progress.step(
        4,
        STEPS,
        "unpacking kernel, running depmod, picking modules",
    );
    let kroot = work.join("kernel");
    let broot = work.join("systemd-boot");
    apt::unpack(&debs[&kernel_pkg.name], &kroot)?;
    apt::unpack(&debs[&boot_pkg.name], &broot)?;
    let kver = kernel_release(&kroot, &kernel_pkg)?;
    Cmd::new("depmod").arg("-b").arg(&kroot).arg(&kver).run()?;
    let mdir = kroot.join("lib/modules").join(&kver);
    let read = |p: PathBuf| fs::read_to_string(&p).map_err(ioe(&p));
    let dep = ModulesDep::parse(&read(mdir.join("modules.dep"))?)?;
    let builtin = kmod::parse_builtin(&read(mdir.join("modules.builtin"))?);
    let mut compression: BTreeMap<String, usize> = BTreeMap::new();
    for p in dep.paths() {
        *compression
            .entry(format!("{:?}", Compression::of(p)))
            .or_default() += 1;
    }
    // Listed modules are loaded by name; drivers are only shipped, with
    // their aliases, and loaded by what the machine has.
    let storage = opts.platform.storage_drivers();
    let early_listed = dep.select(
        &kver,
        &builtin,
        initrd::EARLY_MODULES,
        initrd::EARLY_OPTIONAL_MODULES,
    )?;
    let early_optional: Vec<&str> = initrd::EARLY_OPTIONAL_MODULES
        .iter()
        .chain(&storage)
        .copied()
        .collect();
    let early = dep.select(&kver, &builtin, initrd::EARLY_MODULES, &early_optional)?;
    let runtime_listed = dep.select(
        &kver,
        &builtin,
        opts.profile.required_modules(),
        opts.profile.optional_modules(),
    )?;
    let runtime_optional: Vec<&str> = opts
        .profile
        .optional_modules()
        .iter()
        .chain(&storage)
        .chain(opts.platform.runtime_drivers())
        .copied()
        .collect();
    let runtime = dep.select(
        &kver,
        &builtin,
        opts.profile.required_modules(),
        &runtime_optional,
    )?;
    progress.detail(&format!("kernel {kver}; module files: {compression:?}"));
    progress.detail(&format!("initrd modules: {}", early.order.join(" ")));
    progress.detail(&format!("built in: {}", early.builtin.join(" ")));
    progress.detail(&format!(
        "usr modules: {} (absent: {})",
        runtime.order.join(" "),
        runtime.absent.join(" ")
    ));
    let vmlinuz = kroot.join("boot").join(format!("vmlinuz-{kver}"));
    if !vmlinuz.exists() {
        return Err(BuildError::MissingFile {
            package: kernel_pkg.spec(),
            path: vmlinuz,
        });
    }

    // 5. initrd
    progress.step(5, STEPS, "building initrd (cpio newc)");
    let archive = initrd::build(&agent, &mdir, &kver, &dep, &early, &early_listed)?;
    // One fixed mtime for every release, not the build's epoch: nothing
    // reads the initramfs's times, and a per-build stamp in every cpio
    // header changed every 64 KiB chunk of it, defeating delta updates
    // (docs/update-repository.md, "Delta updates").
    let initrd_bytes = archive.to_bytes(INITRD_MTIME)?;
    let initrd_path = payload_dir.join(payload::INITRD);
    fs::write(&initrd_path, &initrd_bytes).map_err(ioe(&initrd_path))?;
    let kernel_path = payload_dir.join(payload::KERNEL);
    fs::copy(&vmlinuz, &kernel_path).map_err(ioe(&kernel_path))?;

    // 6. usr image
    progress.step(6, STEPS, "building usr image (erofs + dm-verity)");
    let tree = work.join("usr-tree");
    stage_usr(
        opts,
        &tree,
        &agent,
        &mdir,
        &kver,
        &dep,
        (&runtime, &runtime_listed),
    )?;
    let contents = profile::Stager::new(&apt, arch, &work.join("packages"), &tree).stage(
        opts.profile,
        opts.kubelet.as_deref(),
        progress,
    )?;
    packages.extend(contents.specs());
    if contents.kubelet.is_some() {
        packages.push(format!(
            "kubelet={}",
            opts.kubelet_version.as_deref().unwrap_or("unknown")
        ));
    }
    packages.sort();
    packages.dedup();
    fsimage::normalize_tree(
        &tree,
        opts.source_date_epoch,
        &[("root", 0o700), ("tmp", 0o1777)],
    )?;
    let erofs = work.join("usr.erofs");
    mkfs_erofs_logged(opts, &tree, &erofs, progress)?;
    let usr_img = payload_dir.join(payload::USR_IMAGE);
    let verity = fsimage::verity_format(
        &erofs,
        &usr_img,
        &verity_salt(arch, version),
        fixed_uuid(&format!("ballast/{arch}/{version}/verity")),
    )?;
    fsimage::verity_verify(&usr_img, &verity)?;
    let usr_size = file_size(&usr_img)?;
    if usr_size > opts.slot_size {
        return Err(BuildError::SlotTooSmall {
            profile: opts.profile,
            need: usr_size,
            have: opts.slot_size,
        });
    }
    progress.detail(&format!(
        "{} data blocks, root hash {} (verified with veritysetup verify --hash-offset)",
        verity.data_blocks, verity.root_hash
    ));

    // 7. payload metadata
    progress.step(7, STEPS, "writing payload metadata");
    let mut artifacts = Vec::new();
    for name in [payload::USR_IMAGE, payload::KERNEL, payload::INITRD] {
        let p = payload_dir.join(name);
        artifacts.push(Artifact {
            name: name.to_owned(),
            size: file_size(&p)?,
            sha256: sha256_hex(&p)?,
        });
    }
    let metadata = PayloadMetadata {
        version,
        arch,
        variant: opts.profile.to_string(),
        kernel_release: kver.clone(),
        usr_fstype: "erofs".to_owned(),
        verity,
        artifacts,
        packages: packages.clone(),
    };
    metadata.validate()?;
    let meta_path = payload_dir.join(payload::METADATA_FILE);
    let mut json = serde_json::to_string_pretty(&metadata)?;
    json.push('\n');
    fs::write(&meta_path, json).map_err(ioe(&meta_path))?;
    let pkgs_path = out.join("packages.txt");
    fs::write(
        &pkgs_path,
        packages
            .iter()
            .map(|p| format!("{p}\n"))
            .collect::<String>(),
    )
    .map_err(ioe(&pkgs_path))?;

    // 8. ESP
    progress.step(8, STEPS, "building ESP (FAT32, systemd-boot, boot entry)");
    let layout = disk_layout(arch, opts.esp_size, opts.slot_size, opts.state_size)?;
    let usr_a = layout
        .by_label(Slot::A.partition_label())
        .map(|p| p.spec.guid)
        .unwrap_or_default();
    let entry = BootEntry {
        params: BootParams::for_payload(&metadata, Slot::A, usr_a),
        extra_args: BootEntry::default_extra_args(arch),
    };
    let esp_tree = work.join("esp-tree");
    let efi_name = match arch {
        Arch::X86_64 => "systemd-bootx64.efi",
        Arch::Aarch64 => "systemd-bootaa64.efi",
    };
    let efi_src = broot.join("usr/lib/systemd/boot/efi").join(efi_name);
    if !efi_src.exists() {
        return Err(BuildError::MissingFile {
            package: boot_pkg.spec(),
            path: efi_src,
        });
    }
    let copy = |from: &Path, to: PathBuf| -> Result<(), BuildError> {
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(ioe(parent))?;
        }
        fs::copy(from, &to).map_err(ioe(&to))?;
        Ok(())
    };
    copy(&efi_src, esp_tree.join(arch.efi_boot_path()))?;
    fsimage::write_file(
        &esp_tree.join("loader/loader.conf"),
        b"timeout 0\neditor no\n",
    )?;
    fsimage::write_file(
        &esp_tree
            .join(ballast_updater::bootentry::ENTRIES_DIR)
            .join(EntryName::blessed(version).to_string()),
        entry.render().as_bytes(),
    )?;
    let vdir = esp_tree.join(version_dir(version));
    copy(&kernel_path, vdir.join("vmlinuz"))?;
    copy(&initrd_path, vdir.join("initrd"))?;
    fsimage::normalize_tree(&esp_tree, epoch, &[])?;
    let esp_img = work.join("esp.img");
    fsimage::mkfs_esp(&esp_tree, &esp_img, opts.esp_size, esp_volume_id(arch))?;
    let esp_used = tree_bytes(&esp_tree)?;

    // 9. STATE
    progress.step(9, STEPS, "building STATE (empty ext4)");
    let state_img = work.join("state.img");
    fsimage::mkfs_state(
        &state_img,
        opts.state_size,
        fixed_uuid(&format!("ballast/{arch}/STATE/fs")),
        fixed_uuid(&format!("ballast/{arch}/STATE/hash-seed")),
        epoch,
    )?;
    let state_used = fsimage::ext4_used(&state_img)?;

    // 10. disk
    progress.step(10, STEPS, "writing disk.raw (GPT)");
    let disk = out.join("disk.raw");
    write_disk(
        &layout,
        &disk,
        &[
            ("ESP", &esp_img),
            (Slot::A.partition_label(), &usr_img),
            ("STATE", &state_img),
        ],
    )?;

    let payload_total: u64 =
        metadata.artifacts.iter().map(|a| a.size).sum::<u64>() + file_size(&meta_path)?;
    let mut report = String::new();
    let _ = writeln!(
        report,
        "Ballast {version} {arch} ({} profile, {} platform, kernel {kver})",
        opts.profile, opts.platform
    );
    let _ = writeln!(report, "{:<8} {:>12} {:>12}", "part", "size", "used");
    let used = |label: &str| match label {
        "ESP" => esp_used,
        "USR-A" => file_size(&usr_img).unwrap_or(0),
        "STATE" => state_used,
        _ => 0,
    };
    for p in &layout.partitions {
        let _ = writeln!(
            report,
            "{:<8} {:>12} {:>12}",
            p.spec.label,
            p.size(),
            used(&p.spec.label)
        );
    }
    let _ = writeln!(report, "disk.raw     {:>12}", layout.size);
    let _ = writeln!(
        report,
        "usr.img      {:>12}  (erofs {} + verity {})",
        file_size(&usr_img)?,
        metadata.verity.hash_offset,
        file_size(&usr_img)? - metadata.verity.hash_offset
    );
    for a in &metadata.artifacts {
        if a.name != payload::USR_IMAGE {
            let _ = writeln!(report, "{:<12} {:>12}", a.name, a.size);
        }
    }
    let _ = writeln!(
        report,
        "payload      {:>12}  (all artifacts + metadata.json)",
        payload_total
    );
    let _ = writeln!(
        report,
        "agent        {agent_size:>12}  (ballast, stripped static)"
    );
    let _ = writeln!(report, "initrd modules: {}", early.order.join(" "));
    let _ = writeln!(report, "usr modules: {}", runtime.order.join(" "));
    let mut absent: Vec<&str> = early
        .absent
        .iter()
        .chain(&runtime.absent)
        .map(String::as_str)
        .collect();
    absent.sort_unstable();
    absent.dedup();
    let _ = writeln!(
        report,
        "drivers ({} platform) not in this kernel: {}",
        opts.platform,
        if absent.is_empty() {
            "none".to_owned()
        } else {
            absent.join(" ")
        }
    );
    report.push_str(&contents.report(opts.profile));
    let _ = writeln!(report, "packages: {}", packages.join(" "));
    let report_path = out.join("size-report.txt");
    fs::write(&report_path, &report).map_err(ioe(&report_path))?;

    fs::remove_dir_all(&work).map_err(ioe(&work))?;
    Ok(BuildOutput {
        out_dir: out.clone(),
        disk,
        payload_dir,
        metadata,
        layout,
        report,
        module_compression: compression.into_iter().collect(),
    })
}

fn mkfs_erofs_logged(
    opts: &BuildOptions,
    tree: &Path,
    out: &Path,
    progress: &mut dyn Progress,
) -> Result<(), BuildError> {
    let size = fsimage::mkfs_erofs(
        tree,
        out,
        opts.source_date_epoch,
        fixed_uuid(&format!("ballast/{}/{}/usr", opts.arch, opts.version)),
        opts.usr_compression.as_deref(),
    )?;
    progress.detail(&format!(
        "erofs ({}): {size} bytes",
        opts.usr_compression.as_deref().unwrap_or("uncompressed")
    ));
    Ok(())
}

fn esp_volume_id(arch: Arch) -> u32 {
    let b = fixed_uuid(&format!("ballast/{arch}/ESP/volume-id")).into_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn kernel_release(kroot: &Path, pkg: &PackageInfo) -> Result<String, BuildError> {
    let dir = kroot.join("lib/modules");
    let mut kvers: Vec<String> = fs::read_dir(&dir)
        .map_err(ioe(&dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match kvers.len() {
        1 => Ok(kvers.remove(0)),
        count => Err(BuildError::KernelRelease {
            package: pkg.spec(),
            count,
        }),
    }
}

fn tree_bytes(root: &Path) -> Result<u64, BuildError> {
    let mut total = 0;
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).map_err(ioe(&d))? {
            let e = e.map_err(ioe(&d))?;
            let md = e.metadata().map_err(ioe(&e.path()))?;
            if md.is_dir() {
                stack.push(e.path());
            } else {
                total += md.len();
            }
        }
    }
    Ok(total)
}

/// The usr image's tree (see ARCHITECTURE.md, "usr image").
#[allow(clippy::too_many_arguments)]
fn stage_usr(
    opts: &BuildOptions,
    tree: &Path,
    agent: &Path,
    mdir: &Path,
    kver: &str,
    dep: &ModulesDep,
    (runtime, runtime_listed): (&Selection, &Selection),
) -> Result<(), BuildError> {
    let version = opts.version;
    fs::create_dir_all(tree).map_err(ioe(tree))?;
    for d in [
        "proc", "sys", "dev", "run", "tmp", "var", "etc", "efi", "root", "sbin", "usr/bin",
    ] {
        let p = tree.join(d);
        fs::create_dir_all(&p).map_err(ioe(&p))?;
    }
    let bin = tree.join("usr/bin/ballast");
    fs::copy(agent, &bin).map_err(ioe(&bin))?;
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).map_err(ioe(&bin))?;
    }
    let link = tree.join("sbin/init");
    std::os::unix::fs::symlink("../usr/bin/ballast", &link).map_err(ioe(&link))?;
    let os_release = format!(
        "NAME=\"Ballast\"\nID=ballast\nVERSION_ID={version}\nVERSION=\"{version}\"\nPRETTY_NAME=\"Ballast {version}\"\nVARIANT_ID={}\nHOME_URL=\"https://github.com/ballast\"\n",
        opts.profile
    );
    fsimage::write_file(&tree.join("usr/lib/os-release"), os_release.as_bytes())?;
    let trust = tree.join("usr/lib/ballast/trust");
    fs::create_dir_all(&trust).map_err(ioe(&trust))?;
    for key in &opts.trust {
        let name = key
            .file_name()
            .filter(|n| n.to_string_lossy().ends_with(".pub"))
            .ok_or_else(|| BuildError::TrustKey { path: key.clone() })?;
        let dst = trust.join(name);
        fs::copy(key, &dst).map_err(ioe(&dst))?;
    }
    if let Some(spec) = &opts.failpoints {
        fsimage::write_file(&tree.join("usr/lib/ballast/failpoints"), spec.as_bytes())?;
    }
    let factory = tree.join("usr/share/factory/etc");
    fsimage::write_file(&factory.join("hostname"), b"ballast\n")?;
    let osr = factory.join("os-release");
    std::os::unix::fs::symlink("../usr/lib/os-release", &osr).map_err(ioe(&osr))?;
    // runtime modules
    let mtree = tree.join("lib/modules").join(kver);
    fs::create_dir_all(&mtree).map_err(ioe(&mtree))?;
    for name in &runtime.order {
        if let Some(e) = dep.get(name) {
            let dst = mtree.join(&e.path);
            if let Some(parent) = dst.parent() {
                fs::create_dir_all(parent).map_err(ioe(parent))?;
            }
            fs::copy(mdir.join(&e.path), &dst).map_err(ioe(&dst))?;
        }
    }
    fsimage::write_file(
        &mtree.join("modules.dep"),
        dep.render_subset(&runtime.order).as_bytes(),
    )?;
    let alias_path = mdir.join("modules.alias");
    let alias = fs::read_to_string(&alias_path).map_err(ioe(&alias_path))?;
    fsimage::write_file(
        &mtree.join("modules.alias"),
        platform::alias_subset(&alias, &runtime.order).as_bytes(),
    )?;
    let builtin = mdir.join("modules.builtin");
    fs::copy(&builtin, mtree.join("modules.builtin")).map_err(ioe(&builtin))?;
    fsimage::write_file(
        &tree.join(RUNTIME_MODULE_LIST),
        initrd::module_list(runtime_listed).as_bytes(),
    )?;
    Ok(())
}

/// Writes a sparse disk image: GPT plus each `(label, content)` at its
/// partition's offset.
pub fn write_disk(
    layout: &Layout,
    path: &Path,
    contents: &[(&str, &Path)],
) -> Result<(), BuildError> {
    use std::os::unix::fs::FileExt;
    let _ = fs::remove_file(path);
    let f = fs::File::create(path).map_err(ioe(path))?;
    f.set_len(layout.size).map_err(ioe(path))?;
    let (head, tail) = layout.table_bytes();
    f.write_all_at(&head, 0).map_err(ioe(path))?;
    f.write_all_at(&tail, layout.tail_offset())
        .map_err(ioe(path))?;
    for (label, src) in contents {
        let p = layout
            .by_label(label)
            .ok_or_else(|| BuildError::MissingFile {
                package: "disk layout".to_owned(),
                path: PathBuf::from(label),
            })?;
        fsimage::copy_into(
            src,
            &f,
            path,
            p.offset(),
            p.size(),
            &format!("partition {label}"),
        )?;
    }
    f.sync_all().map_err(ioe(path))?;
    Ok(())
}

/// SHA-256 of `disk.raw`, `packages.txt` and every payload file, by
/// relative path (for reproducibility checks).
pub fn output_digests(out_dir: &Path) -> Result<BTreeMap<String, String>, BuildError> {
    let mut names: BTreeSet<String> = ["disk.raw", "packages.txt"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for n in [
        payload::USR_IMAGE,
        payload::KERNEL,
        payload::INITRD,
        payload::METADATA_FILE,
    ] {
        names.insert(format!("payload/{n}"));
    }
    names
        .into_iter()
        .map(|n| {
            let p = out_dir.join(&n);
            sha256_hex(&p).map(|h| (n, h))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_layout_is_fixed_per_arch() {
        let a = disk_layout(Arch::X86_64, 256 * MIB, 1024 * MIB, 256 * MIB).unwrap();
        let b = disk_layout(Arch::X86_64, 256 * MIB, 1024 * MIB, 256 * MIB).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.table_bytes(), b.table_bytes());
        let labels: Vec<&str> = a.partitions.iter().map(|p| p.spec.label.as_str()).collect();
        assert_eq!(labels, ["ESP", "USR-A", "USR-B", "STATE"]);
        assert_eq!(a.partitions[1].spec.type_guid, gpt::TYPE_USR_X86_64);
        let arm = disk_layout(Arch::Aarch64, 256 * MIB, 1024 * MIB, 256 * MIB).unwrap();
        assert_eq!(arm.partitions[2].spec.type_guid, gpt::TYPE_USR_AARCH64);
        assert_ne!(arm.partitions[1].spec.guid, a.partitions[1].spec.guid);
        assert_ne!(a.partitions[1].spec.guid, a.partitions[2].spec.guid);
        assert_eq!(a.size, (1 + 256 + 2048 + 256 + 1) * MIB);
    }

    #[test]
    fn salt_is_per_version_and_arch() {
        let v1: Version = "1.0.0".parse().unwrap();
        let v2: Version = "1.0.1".parse().unwrap();
        assert_eq!(verity_salt(Arch::X86_64, v1).len(), 64);
        assert_eq!(verity_salt(Arch::X86_64, v1), verity_salt(Arch::X86_64, v1));
        assert_ne!(verity_salt(Arch::X86_64, v1), verity_salt(Arch::X86_64, v2));
        assert_ne!(
            verity_salt(Arch::X86_64, v1),
            verity_salt(Arch::Aarch64, v1)
        );
    }
}
