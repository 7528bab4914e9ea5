//! The initramfs: `/init` (the ballast binary), `/dev/console`, the early
//! mount points, the early-boot kernel modules with a filtered
//! `modules.dep`, `modules.alias` and `modules.builtin`, and
//! `/etc/ballast/initrd-modules` (the modules that no device names, in load
//! order, one a line; drivers are loaded by modalias).

use std::fs;
use std::path::{Path, PathBuf};

use crate::cpio::{Archive, CpioError, Node};
use crate::kmod::{ModulesDep, Selection};
use crate::platform::alias_subset;

/// Modules early boot needs that no device's modalias names (closure added;
/// built-in ones skipped); drivers come from the platform and are loaded by
/// modalias. The load order follows this list wherever dependencies allow.
pub const EARLY_MODULES: &[&str] = &[
    // libcrc32c (erofs, ext4) has `softdep pre: crc32c`, which modules.dep
    // does not carry: load it before anything else. The generic kernel builds
    // it as a module, the cloud kernel in. The C version, not crc32c_intel,
    // which fails with ENODEV on CPUs without SSE4.2.
    "crc32c_generic",
    "dm_verity",
    "erofs",
    "squashfs",
    "ext4",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_utf8",
];

/// Shipped when the kernel has them. Empty: the CPU-specific SHA-256
/// modules (sha256_ssse3, sha2_ce) would speed up dm-verity but fail with
/// ENODEV on CPUs without the instructions (QEMU's default x86 CPU), and
/// early boot treats every listed module as required.
pub const EARLY_OPTIONAL_MODULES: &[&str] = &[];

/// Where the load order is written, relative to the initrd root.
pub const MODULE_LIST: &str = "etc/ballast/initrd-modules";

#[derive(Debug, thiserror::Error)]
pub enum InitrdError {
    #[error(transparent)]
    Cpio(#[from] CpioError),
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, InitrdError> {
    fs::read(path).map_err(|source| InitrdError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Module files, filtered `modules.dep` and `modules.alias`,
/// `modules.builtin` into `archive` under `lib/modules/<kver>/`.
pub fn add_modules(
    archive: &mut Archive,
    modules_dir: &Path,
    kver: &str,
    dep: &ModulesDep,
    sel: &Selection,
) -> Result<(), InitrdError> {
    let base = format!("lib/modules/{kver}");
    for name in &sel.order {
        if let Some(entry) = dep.get(name) {
            let data = read(&modules_dir.join(&entry.path))?;
            archive.file(&format!("{base}/{}", entry.path), 0o644, data)?;
        }
    }
    archive.file(
        &format!("{base}/modules.dep"),
        0o644,
        dep.render_subset(&sel.order).into_bytes(),
    )?;
    let alias = read(&modules_dir.join("modules.alias"))?;
    archive.file(
        &format!("{base}/modules.alias"),
        0o644,
        alias_subset(&String::from_utf8_lossy(&alias), &sel.order).into_bytes(),
    )?;
    let builtin = read(&modules_dir.join("modules.builtin"))?;
    archive.file(&format!("{base}/modules.builtin"), 0o644, builtin)?;
    Ok(())
}

/// The load-order file's text.
pub fn module_list(sel: &Selection) -> String {
    sel.order.iter().map(|m| format!("{m}\n")).collect()
}

/// The whole initrd as an archive (call [`Archive::to_bytes`] for bytes):
/// `shipped` are the module files (fixed list and drivers), `listed` the
/// fixed list early boot loads by name.
pub fn build(
    agent: &Path,
    modules_dir: &Path,
    kver: &str,
    dep: &ModulesDep,
    shipped: &Selection,
    listed: &Selection,
) -> Result<Archive, InitrdError> {
    let mut a = Archive::new();
    a.file("init", 0o755, read(agent)?)?;
    for d in ["dev", "proc", "sys", "sysroot", "run", "tmp", "etc/ballast"] {
        a.dir(d)?;
    }
    a.add(
        "dev/console",
        Node::CharDev {
            mode: 0o600,
            major: 5,
            minor: 1,
        },
    )?;
    add_modules(&mut a, modules_dir, kver, dep, shipped)?;
    a.file(MODULE_LIST, 0o644, module_list(listed).into_bytes())?;
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn initrd_has_init_console_modules_and_order() {
        let dir = tempfile::tempdir().unwrap();
        let kver = "6.1.0-test";
        let mdir = dir.path().join(kver);
        fs::create_dir_all(mdir.join("kernel/fs/fat")).unwrap();
        fs::write(mdir.join("kernel/fs/fat/fat.ko"), b"fat").unwrap();
        fs::write(mdir.join("kernel/fs/fat/vfat.ko"), b"vfat").unwrap();
        fs::write(mdir.join("modules.builtin"), b"kernel/fs/ext4/ext4.ko\n").unwrap();
        fs::write(
            mdir.join("modules.alias"),
            b"alias fs-vfat vfat\nalias pci:v00001AF4d*sv*sd*bc*sc*i* other\n",
        )
        .unwrap();
        let agent = dir.path().join("ballast");
        fs::write(&agent, b"\x7fELF").unwrap();
        let dep = ModulesDep::parse(
            "kernel/fs/fat/fat.ko:\nkernel/fs/fat/vfat.ko: kernel/fs/fat/fat.ko\nkernel/x/other.ko:\n",
        )
        .unwrap();
        let builtin: BTreeSet<String> = ["ext4".to_owned()].into();
        let sel = dep.select(kver, &builtin, &["vfat", "ext4"], &[]).unwrap();
        let listed = dep.select(kver, &builtin, &["fat"], &[]).unwrap();
        let a = build(&agent, &mdir, kver, &dep, &sel, &listed).unwrap();
        assert_eq!(
            a.get("init"),
            Some(&Node::File {
                mode: 0o755,
                data: b"\x7fELF".to_vec()
            })
        );
        assert!(matches!(
            a.get("dev/console"),
            Some(Node::CharDev {
                major: 5,
                minor: 1,
                ..
            })
        ));
        for d in ["proc", "sys", "sysroot", "run", "tmp", "etc/ballast"] {
            assert!(matches!(a.get(d), Some(Node::Dir { .. })), "{d}");
        }
        let Some(Node::File { data, .. }) = a.get(MODULE_LIST) else {
            panic!("no module list")
        };
        assert_eq!(data, b"fat\n");
        let Some(Node::File { data, .. }) = a.get(&format!("lib/modules/{kver}/modules.alias"))
        else {
            panic!("no modules.alias")
        };
        assert_eq!(data, b"alias fs-vfat vfat\n");
        let Some(Node::File { data, .. }) = a.get(&format!("lib/modules/{kver}/modules.dep"))
        else {
            panic!("no modules.dep")
        };
        assert_eq!(
            String::from_utf8_lossy(data),
            "kernel/fs/fat/fat.ko:\nkernel/fs/fat/vfat.ko: kernel/fs/fat/fat.ko\n"
        );
        assert!(a
            .get(&format!("lib/modules/{kver}/kernel/x/other.ko"))
            .is_none());
        assert!(a
            .get(&format!("lib/modules/{kver}/kernel/fs/fat/vfat.ko"))
            .is_some());
        // reproducible
        assert_eq!(
            a.to_bytes(1).unwrap(),
            build(&agent, &mdir, kver, &dep, &sel, &listed)
                .unwrap()
                .to_bytes(1)
                .unwrap()
        );
    }
}
