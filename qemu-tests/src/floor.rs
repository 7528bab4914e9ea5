//! The boot-time floor: a busybox initramfs whose `/init` only prints a
//! marker event and powers off, booted with the same kernel as the image.
//! This module owns building that initramfs from Debian's `busybox-static`
//! package (cached), writing the cpio archive, and the KVM probe that boots
//! it to find out whether KVM really works on this host.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ballast_updater::payload::Arch;

use crate::disk::{self, DiskError};
use crate::vm::{Accel, Boot, VmBuilder};

/// Event the floor's `/init` prints: `BALLAST-EVENT {"event":"floor-ready","ms":N}`.
pub const FLOOR_EVENT: &str = "floor-ready";

/// The floor's `/init`: mount /proc for the uptime, print the marker with
/// ms since the kernel started (like the agent's `ms`), power off.
const INIT_SCRIPT: &str = r#"#!/bin/sh
/bin/busybox mount -t proc proc /proc
read up rest < /proc/uptime
ms=$(( ${up%.*} * 1000 + 1${up#*.} * 10 - 1000 ))
echo "BALLAST-EVENT {\"event\":\"floor-ready\",\"ms\":$ms}"
/bin/busybox poweroff -f
"#;

/// Errors building the floor initramfs.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("downloading busybox-static:{debarch} (a foreign architecture needs `dpkg --add-architecture {debarch} && apt-get update` first)")]
    Download {
        debarch: &'static str,
        #[source]
        source: DiskError,
    },
    #[error("unpacking {deb}")]
    Unpack {
        deb: PathBuf,
        #[source]
        source: DiskError,
    },
    #[error("busybox-static unpacked into {0} has no bin/busybox")]
    NoBusybox(PathBuf),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FloorError {
    let path = path.to_owned();
    move |source| FloorError::Io { what, path, source }
}

/// Builds (or reuses) `cache_dir/floor-<debarch>.cpio`: Debian's
/// `busybox-static:<debarch>` fetched with `apt-get download`, unpacked with
/// `dpkg-deb -x`, and `/init` = [`INIT_SCRIPT`].
pub fn initramfs(arch: Arch, cache_dir: &Path) -> Result<PathBuf, FloorError> {
    let out = cache_dir.join(format!("floor-{}.cpio", arch.debian()));
    if out.exists() {
        return Ok(out);
    }
    let debs = cache_dir.join(format!("busybox-{}", arch.debian()));
    std::fs::create_dir_all(&debs).map_err(io("creating", &debs))?;
    let deb = find_deb(&debs)?;
    let deb = match deb {
        Some(d) => d,
        None => {
            eprintln!("  floor: apt-get download busybox-static:{}", arch.debian());
            disk::run(
                Command::new("apt-get")
                    .arg("download")
                    .arg(format!("busybox-static:{}", arch.debian()))
                    .current_dir(&debs),
            )
            .map_err(|source| FloorError::Download {
                debarch: arch.debian(),
                source,
            })?;
            find_deb(&debs)?.ok_or_else(|| FloorError::NoBusybox(debs.clone()))?
        }
    };
    let root = debs.join("root");
    disk::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root)).map_err(|source| {
        FloorError::Unpack {
            deb: deb.clone(),
            source,
        }
    })?;
    let busybox_path = root.join("bin/busybox");
    let busybox = std::fs::read(&busybox_path).map_err(|_| FloorError::NoBusybox(root.clone()))?;

    let mut w = NewcWriter::default();
    for dir in ["bin", "dev", "proc"] {
        w.dir(dir);
    }
    w.char_dev("dev/console", 5, 1);
    w.file("bin/busybox", 0o755, &busybox);
    w.symlink("bin/sh", "busybox");
    w.file("init", 0o755, INIT_SCRIPT.as_bytes());
    let bytes = w.finish();
    let tmp = out.with_extension("cpio.tmp");
    std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&bytes).and_then(|_| f.sync_all()))
        .map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, &out).map_err(io("renaming", &tmp))?;
    Ok(out)
}

fn find_deb(dir: &Path) -> Result<Option<PathBuf>, FloorError> {
    let rd = std::fs::read_dir(dir).map_err(io("listing", dir))?;
    Ok(rd.filter_map(Result::ok).map(|e| e.path()).find(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("busybox-static_") && n.ends_with(".deb"))
    }))
}

/// A minimal cpio "newc" (SVR4, no CRC) writer: what the kernel unpacks
/// as an initramfs.
#[derive(Debug, Default)]
pub struct NewcWriter {
    buf: Vec<u8>,
    ino: u32,
}

impl NewcWriter {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let namesize = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0, // mtime: reproducible
            u32::try_from(data.len()).unwrap_or(u32::MAX),
            0,
            0,
            rdev.0,
            rdev.1,
            u32::try_from(namesize).unwrap_or(u32::MAX),
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, (0, 0), target.as_bytes());
    }

    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    /// Appends the trailer and returns the archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

/// Boots the floor with KVM and reports whether it reached the marker:
/// the only reliable KVM check on hosts with nested virtualisation.
pub fn kvm_works(arch: Arch, kernel: &Path, initrd: &Path, log_dir: &Path) -> bool {
    if arch != Arch::native() || !Path::new("/dev/kvm").exists() {
        return false;
    }
    let vm = VmBuilder::new("kvm-probe", arch)
        .accel(Accel::Kvm)
        .boot(Boot::Direct {
            kernel: kernel.to_owned(),
            initrd: initrd.to_owned(),
            cmdline: format!("console={} panic=-1", arch.serial_console()),
        })
        .log_dir(log_dir)
        .quiet(true)
        .spawn();
    match vm {
        Ok(mut vm) => vm
            .wait_for_event(FLOOR_EVENT, Duration::from_secs(30))
            .is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_download_names_the_package_the_hint_and_the_command() {
        let err = disk::run(Command::new("sh").args(["-c", "echo no such package >&2; exit 100"]))
            .map_err(|source| FloorError::Download {
                debarch: Arch::Aarch64.debian(),
                source,
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "downloading busybox-static:arm64 (a foreign architecture needs \
             `dpkg --add-architecture arm64 && apt-get update` first)"
        );
        let cause = std::error::Error::source(&err).unwrap().to_string();
        assert!(
            cause.contains("\"sh\"") && cause.contains("no such package"),
            "{cause}"
        );
    }

    #[test]
    fn newc_archive_is_aligned_and_terminated() {
        let mut w = NewcWriter::default();
        w.dir("dev");
        w.char_dev("dev/console", 5, 1);
        w.file("init", 0o755, b"#!/bin/sh\n");
        w.symlink("bin/sh", "busybox");
        let a = w.finish();
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("TRAILER!!!"));
        // The console node: mode 020600, rdev 5:1.
        let console = text.find("dev/console").unwrap();
        let hdr = &text[console - 110..console];
        assert_eq!(&hdr[14..22], "00002180");
        assert_eq!(&hdr[78..86], "00000005");
        assert_eq!(&hdr[86..94], "00000001");
    }

    #[test]
    fn init_script_marker_is_an_event_line() {
        let marker = INIT_SCRIPT
            .lines()
            .find(|l| l.starts_with("echo"))
            .unwrap()
            .replace("\\\"", "\"")
            .replace("$ms", "1234");
        let json = marker.trim_start_matches("echo \"").trim_end_matches('"');
        let ev = crate::events::parse_line(json).unwrap().unwrap();
        assert_eq!(ev.name, FLOOR_EVENT);
        assert_eq!(ev.ms(), Some(1234));
    }
}
