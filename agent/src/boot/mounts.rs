//! The API filesystems both boot stages need, and unmounting at shutdown.

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// One filesystem to mount: source, target, type, flags, data.
type MountSpec = (
    &'static str,
    &'static str,
    &'static str,
    MsFlags,
    Option<&'static str>,
);

fn nosuid_nodev_noexec() -> MsFlags {
    MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC
}

/// `/proc`, `/sys`, `/dev`, `/run`: what the initramfs needs. Returns the
/// failing target with its error.
pub fn mount_api_filesystems() -> Result<(), (String, nix::Error)> {
    let specs: [MountSpec; 4] = [
        ("proc", "/proc", "proc", nosuid_nodev_noexec(), None),
        ("sysfs", "/sys", "sysfs", nosuid_nodev_noexec(), None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
    ];
    mount_all(&specs)
}

/// What PID 1 adds in the slot on top of the moved API filesystems.
pub fn mount_system_filesystems() -> Result<(), (String, nix::Error)> {
    let specs: [MountSpec; 6] = [
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/etc",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=0620,ptmxmode=0666"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nosuid_nodev_noexec(),
            None,
        ),
        (
            "efivarfs",
            "/sys/firmware/efi/efivars",
            "efivarfs",
            nosuid_nodev_noexec(),
            None,
        ),
    ];
    mount_all(&specs)
}

fn mount_all(specs: &[MountSpec]) -> Result<(), (String, nix::Error)> {
    for (source, target, fstype, flags, data) in specs {
        if is_mountpoint(target) {
            continue;
        }
        let _ = std::fs::create_dir_all(target);
        match mount(Some(*source), *target, Some(*fstype), *flags, *data) {
            Ok(()) => {}
            // efivarfs only exists on UEFI machines whose kernel has it.
            Err(e) if *fstype == "efivarfs" => tracing::debug!(error = %e, "no efivarfs"),
            Err(e) => return Err(((*target).to_owned(), e)),
        }
    }
    Ok(())
}

/// True if `path` is a mount point (its device differs from its parent's).
pub fn is_mountpoint(path: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let p = Path::new(path);
    let (Ok(me), Some(parent)) = (std::fs::metadata(p), p.parent()) else {
        return false;
    };
    std::fs::metadata(parent).is_ok_and(|pm| pm.dev() != me.dev())
}

/// Unmounts the writable filesystems in reverse order of dependence; a
/// busy one is remounted read-only so the journal is clean at reboot.
pub fn unmount_for_shutdown() {
    for target in ["/efi", "/var"] {
        if !is_mountpoint(target) {
            continue;
        }
        if let Err(e) = umount2(target, MntFlags::empty()) {
            tracing::warn!(target, error = %e, "busy; remounting read-only");
            let _ = mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            );
        }
    }
}
