//! `cargo xtask deps`: installs what building and testing Ballast needs on
//! a Debian 12 host, idempotently, saying what it does and skipping what is
//! there: the bookworm-backports suite, the arm64 foreign architecture, the
//! host packages (QEMU from backports), and the Rust musl targets.
//! Owned by the image work.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Host packages from bookworm itself.
pub const HOST_PACKAGES: &[&str] = &[
    "ovmf",
    "qemu-efi-aarch64",
    "socat",
    "erofs-utils",
    "squashfs-tools",
    "cryptsetup-bin",
    "mtools",
    "dosfstools",
    // iso9660 config-2 drives in the cloud-config-drive scenario.
    "xorriso",
    "gdisk",
    "e2fsprogs",
    "kmod",
    "musl-tools",
    // C code in the agent's dependencies (ring) for the static targets:
    // gcc builds x86_64, the cross gcc aarch64. Each needs its libc headers,
    // which are only Recommends of the compiler and so left out by
    // --no-install-recommends: name them, or a fresh machine cannot build
    // the aarch64 agent (`stdint.h` not found).
    "libc6-dev",
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "cpio",
    "zstd",
    "busybox-static",
    "openssl",
    "curl",
    "nginx-light",
    // efi-virtio.rom, the option ROM of virtio-net-pci under UEFI: a
    // Depends of qemu-system-x86 but only a Recommends of qemu-system-arm.
    "ipxe-qemu",
    // The VM network lab (qemu-tests/src/netlab.rs): a real DHCP/RA server
    // and a real NTP server in a network namespace the test creates. They
    // are installed with services held back (see `install`), so neither
    // ever serves or sets this host's clock.
    "dnsmasq-base",
    "chrony",
    "iproute2",
];

/// Host packages taken from bookworm-backports (they must match the
/// preinstalled backports qemu-utils).
pub const BACKPORTS_PACKAGES: &[&str] = &["qemu-system-x86", "qemu-system-arm"];

/// Rust targets the agent is built for.
pub const RUST_TARGETS: &[&str] = &["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"];

const BACKPORTS_FILE: &str = "/etc/apt/sources.list.d/bookworm-backports.sources";

fn run(program: &str, args: &[&str]) -> Result<()> {
    eprintln!("+ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether a package (`name` or `name:arch`) is installed.
fn installed(pkg: &str) -> bool {
    output("dpkg-query", &["-W", "-f=${Status}", pkg])
        .is_some_and(|s| s.contains("install ok installed"))
}

/// Whether an installed package's version is a backports one.
fn installed_from_backports(pkg: &str) -> bool {
    installed(pkg)
        && output("dpkg-query", &["-W", "-f=${Version}", pkg]).is_some_and(|v| v.contains("bpo"))
}

/// The deb822 source for bookworm-backports, copying URIs and Signed-By
/// from the main `debian.sources`.
fn backports_source() -> String {
    let main =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let field = |name: &str, default: &str| {
        main.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| default.to_owned())
    };
    format!(
        "Types: deb\nURIs: {}\nSuites: bookworm-backports\nComponents: main\nSigned-By: {}\n",
        field("URIs:", "http://deb.debian.org/debian"),
        field(
            "Signed-By:",
            "/usr/share/keyrings/debian-archive-keyring.gpg"
        )
    )
}

fn backports_configured() -> bool {
    let dir = Path::new("/etc/apt/sources.list.d");
    let mut texts: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.ends_with(".sources") || n.ends_with(".list")
                })
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    texts.push(std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default());
    texts.iter().any(|t| {
        t.lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains("bookworm-backports"))
    })
}

pub fn install() -> Result<()> {
    let root = output("id", &["-u"]).is_some_and(|u| u.trim() == "0");
    let mut need_update = false;

    if backports_configured() {
        eprintln!("ok: bookworm-backports apt source present");
    } else {
        if !root {
            bail!("adding {BACKPORTS_FILE} needs root");
        }
        eprintln!("adding {BACKPORTS_FILE}");
        std::fs::write(BACKPORTS_FILE, backports_source())
            .with_context(|| format!("writing {BACKPORTS_FILE}"))?;
        need_update = true;
    }

    let foreign = output("dpkg", &["--print-foreign-architectures"]).unwrap_or_default();
    if foreign.lines().any(|a| a.trim() == "arm64") {
        eprintln!("ok: dpkg foreign architecture arm64");
    } else {
        run("dpkg", &["--add-architecture", "arm64"])?;
        need_update = true;
    }

    // Package lists: apt-cache must know the arm64 kernel and systemd-boot.
    let lists_ok = output(
        "apt-cache",
        &["show", "--no-all-versions", "systemd-boot-efi:arm64"],
    )
    .is_some_and(|s| s.contains("Package:"))
        && output("apt-cache", &["policy", "qemu-system-x86"])
            .is_some_and(|s| s.contains("bookworm-backports"));
    if need_update || !lists_ok {
        // Unreachable third-party sources only warn; apt-get update still exits 0.
        run("apt-get", &["update"])?;
    } else {
        eprintln!("ok: apt package lists know bookworm-backports and arm64");
    }

    let missing_bpo: Vec<&str> = BACKPORTS_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed_from_backports(p))
        .collect();
    if missing_bpo.is_empty() {
        eprintln!("ok: {} (bookworm-backports)", BACKPORTS_PACKAGES.join(" "));
    } else {
        let mut args = vec![
            "install",
            "-y",
            "--no-install-recommends",
            "-t",
            "bookworm-backports",
        ];
        args.extend(&missing_bpo);
        run("apt-get", &args)?;
    }

    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        eprintln!("ok: {} host packages installed", HOST_PACKAGES.len());
    } else {
        let mut args = vec!["install", "-y", "--no-install-recommends"];
        args.extend(&missing);
        let _held = HeldServices::hold()?;
        run("apt-get", &args)?;
    }

    let have_targets = output("rustup", &["target", "list", "--installed"]).unwrap_or_default();
    let missing_targets: Vec<&str> = RUST_TARGETS
        .iter()
        .copied()
        .filter(|t| !have_targets.lines().any(|l| l.trim() == *t))
        .collect();
    if missing_targets.is_empty() {
        eprintln!("ok: rust targets {}", RUST_TARGETS.join(" "));
    } else {
        let mut args = vec!["target", "add"];
        args.extend(&missing_targets);
        run("rustup", &args)?;
    }
    verify()?;
    eprintln!("host dependencies are in place");
    Ok(())
}

/// Programs the image builder, the VM harness and the tests run, each with
/// the package that ships it.
/// Keeps package scripts from starting services (dnsmasq, chronyd, nginx)
/// while it lives: Debian's invoke-rc.d asks `/usr/sbin/policy-rc.d`, and
/// exit code 101 means "action forbidden". A policy already in place (as in
/// container images) is left alone.
struct HeldServices {
    created: bool,
}

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

impl HeldServices {
    fn hold() -> Result<Self> {
        if Path::new(POLICY_RC_D).exists() {
            return Ok(Self { created: false });
        }
        std::fs::write(POLICY_RC_D, "#!/bin/sh\nexit 101\n")
            .with_context(|| format!("writing {POLICY_RC_D}"))?;
        std::fs::set_permissions(
            POLICY_RC_D,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .with_context(|| format!("making {POLICY_RC_D} executable"))?;
        Ok(Self { created: true })
    }
}

impl Drop for HeldServices {
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_file(POLICY_RC_D);
        }
    }
}

pub const REQUIRED_PROGRAMS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("qemu-system-aarch64", "qemu-system-arm"),
    ("qemu-img", "qemu-utils"),
    ("socat", "socat"),
    ("mkfs.erofs", "erofs-utils"),
    ("veritysetup", "cryptsetup-bin"),
    ("mcopy", "mtools"),
    ("mkfs.fat", "dosfstools"),
    ("xorriso", "xorriso"),
    ("sgdisk", "gdisk"),
    ("mke2fs", "e2fsprogs"),
    ("dumpe2fs", "e2fsprogs"),
    ("depmod", "kmod"),
    ("cpio", "cpio"),
    ("zstd", "zstd"),
    ("openssl", "openssl"),
    ("curl", "curl"),
    ("nginx", "nginx-light"),
    ("gcc", "gcc"),
    ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    ("dnsmasq", "dnsmasq-base"),
    ("chronyd", "chrony"),
    ("ip", "iproute2"),
];

/// Files the VM harness reads: UEFI firmware for both arches and the
/// virtio-net option ROM.
pub const REQUIRED_FILES: &[(&str, &str)] = &[
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf"),
    ("/usr/share/OVMF/OVMF_VARS_4M.fd", "ovmf"),
    ("/usr/share/AAVMF/AAVMF_CODE.fd", "qemu-efi-aarch64"),
    ("/usr/share/AAVMF/AAVMF_VARS.fd", "qemu-efi-aarch64"),
    ("/usr/lib/ipxe/qemu/efi-virtio.rom", "ipxe-qemu"),
];

/// A C file that needs the libc headers ring's build includes.
const C_PROBE: &str = "#include <stdint.h>\n#include <string.h>\n\
    uint32_t probe(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }\n";

/// Checks what a package list cannot show: that every program is on PATH,
/// the firmware is where the harness looks, and each C compiler the
/// `.cargo/config.toml` names (`CC_<target>`) compiles against its libc
/// headers. A missing Recommends shows up here, at the first step of CI,
/// not half an hour later in the first aarch64 image.
pub fn verify() -> Result<()> {
    let mut problems = Vec::new();
    for (program, package) in REQUIRED_PROGRAMS {
        if which(program).is_none() {
            problems.push(format!("`{program}` is not on PATH (package {package})"));
        }
    }
    for (file, package) in REQUIRED_FILES {
        if !Path::new(file).is_file() {
            problems.push(format!("{file} is missing (package {package})"));
        }
    }
    let dir = tempfile::tempdir().context("creating a scratch directory")?;
    let source = dir.path().join("probe.c");
    std::fs::write(&source, C_PROBE).context("writing the C probe")?;
    for (target, cc) in cross_compilers()? {
        let object = dir.path().join(format!("{target}.o"));
        let out = Command::new(&cc)
            .arg("-c")
            .arg(&source)
            .arg("-o")
            .arg(&object)
            .output();
        match out {
            Ok(o) if o.status.success() => eprintln!("ok: {cc} compiles C for {target}"),
            Ok(o) => problems.push(format!(
                "{cc} (C compiler for {target}) cannot compile against its libc headers: {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .next()
                    .unwrap_or("")
            )),
            Err(e) => problems.push(format!("{cc} (C compiler for {target}): {e}")),
        }
    }
    if problems.is_empty() {
        eprintln!(
            "ok: {} programs, {} firmware files, C compilers for {} targets",
            REQUIRED_PROGRAMS.len(),
            REQUIRED_FILES.len(),
            RUST_TARGETS.len()
        );
        Ok(())
    } else {
        for p in &problems {
            eprintln!("missing: {p}");
        }
        bail!("{} host dependency check(s) failed", problems.len())
    }
}

/// The `CC_<target>` compilers `.cargo/config.toml` sets for [`RUST_TARGETS`].
fn cross_compilers() -> Result<Vec<(&'static str, String)>> {
    let path = crate::workspace_root().join(".cargo/config.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let config: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let env = config.get("env").and_then(|e| e.as_table());
    RUST_TARGETS
        .iter()
        .map(|target| {
            let key = format!("CC_{}", target.replace('-', "_"));
            env.and_then(|e| e.get(&key))
                .and_then(|v| v.as_str())
                .map(|cc| (*target, cc.to_owned()))
                .with_context(|| format!("{} sets no [env] {key}", path.display()))
        })
        .collect()
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}
