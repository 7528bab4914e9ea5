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
    "gdisk",
    "e2fsprogs",
    "kmod",
    "musl-tools",
    "gcc-aarch64-linux-gnu",
    "cpio",
    "zstd",
    "busybox-static",
    "openssl",
    "curl",
    "nginx-light",
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
    eprintln!("host dependencies are in place");
    Ok(())
}
