//! The initramfs stage: `ballast` as `/init`. Loads the kernel modules early
//! boot needs (a fixed list for what has no device, the drivers by
//! modalias), opens the slot named on the kernel command line through
//! dm-verity, checks every block of it, mounts it and STATE, and
//! `switch_root`s into the slot where `ballast` runs again as PID 1.
//!
//! Any failure prints a `boot-failed` event with the reason and reboots
//! after a delay, so systemd-boot's boot counting can fall back.

use std::convert::Infallible;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ballast_updater::cmdline::{BootParams, CmdlineError};
use nix::mount::{mount, MsFlags};

use crate::boot::bootinfo::BootInfo;
use crate::boot::disks::{DiskError, Partition, Roots, Wanted};
use crate::boot::modules::ModuleError;
use crate::boot::mounts;
use crate::console::{self, Event};
use crate::sys;

/// Where the slot is mounted before `switch_root`.
const SYSROOT: &str = "/sysroot";
/// Module names to load, one per line, written by the image build.
const MODULE_LIST: &str = "/etc/ballast/initrd-modules";
/// Time to read a failure on the console before the reboot.
const FAILURE_REBOOT_DELAY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum EarlyBootError {
    #[error("mounting {target}")]
    Mount {
        target: String,
        #[source]
        source: nix::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel command line")]
    Cmdline(#[from] CmdlineError),
    #[error("kernel modules")]
    Modules(#[from] ModuleError),
    #[error("finding partitions")]
    Disk(#[from] DiskError),
    #[error("setting up dm-verity for {device}")]
    Verity {
        device: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "dm-verity refused block {block} of slot {slot} ({device}): the slot is corrupt or was tampered with"
    )]
    Corrupt {
        slot: String,
        device: PathBuf,
        block: u64,
        source: std::io::Error,
    },
    #[error("switching root to {SYSROOT}")]
    SwitchRoot(#[source] std::io::Error),
    #[error("writing boot information")]
    BootInfo(#[source] std::io::Error),
}

/// Runs the initramfs stage; never returns.
pub fn run() -> ! {
    // First: a panic anywhere below (a hostile disk, a bug) must still end
    // in `boot-failed` and a reboot, or boot counting never falls back.
    crate::node::power::reboot_on_panic(
        |reason| Event::BootFailed { reason },
        FAILURE_REBOOT_DELAY,
    );
    let err = match boot() {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let reason = crate::error_chain(&err);
    eprintln!("ballast: early boot failed: {reason}");
    console::emit(&Event::BootFailed { reason });
    std::thread::sleep(FAILURE_REBOOT_DELAY);
    crate::node::power::reboot_now(crate::node::power::Action::Reboot)
}

fn boot() -> Result<Infallible, EarlyBootError> {
    let mut clock = console::PhaseClock::start("initramfs");
    mounts::mount_api_filesystems()
        .map_err(|(target, source)| EarlyBootError::Mount { target, source })?;
    crate::reopen_console();
    console::emit(&Event::EarlyBoot);
    clock.mark("mounts");

    let cmdline = read_to_string("/proc/cmdline")?;
    let params = BootParams::parse(&cmdline)?;
    tracing::info!(version = %params.version, slot = %params.slot, "booting");

    let wanted = read_to_string(MODULE_LIST)?;
    let wanted: Vec<&str> = wanted
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let kernel_dir = crate::boot::modules::running_kernel_dir();
    let count = crate::boot::modules::load(&kernel_dir, &wanted)?;
    tracing::info!(count, "kernel modules loaded");
    clock.mark("modules");
    // The disk's and its bus's drivers, by what the machine has; devices
    // that turn up later (a slow USB disk) are handled by the listener
    // while we wait for the partitions below.
    match crate::boot::hotplug::coldplug_and_listen(&kernel_dir, "initrd") {
        Ok(outcome) => tracing::info!(
            devices = outcome.devices,
            rounds = outcome.rounds,
            loaded = ?outcome.loaded,
            "drivers loaded by hardware"
        ),
        // An initrd from before coldplug lists every module it needs.
        Err(e) => tracing::warn!(error = %crate::error_chain(&e), "no drivers loaded by hardware"),
    }
    clock.mark("coldplug");

    let roots = Roots::default();
    let usr = find_usr(&roots, &params)?;
    clock.mark("find-usr");
    let verity_dev = open_verity(&usr, &params)?;
    clock.mark("verity-open");
    verify_every_block(&verity_dev, &usr, &params)?;
    clock.mark("verity-pre-read");

    mkdir(SYSROOT);
    mount(
        Some(&verity_dev),
        SYSROOT,
        Some(params.usr_fstype.as_str()),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|source| EarlyBootError::Mount {
        target: SYSROOT.into(),
        source,
    })?;
    clock.mark("mount-usr");

    let state = roots.wait_for(
        &Wanted::Label {
            disk: &usr.disk,
            label: "STATE",
        },
        Duration::from_secs(5),
    )?;
    let var = format!("{SYSROOT}/var");
    mount(
        Some(&state.device),
        var.as_str(),
        Some("ext4"),
        MsFlags::MS_NOATIME | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|source| EarlyBootError::Mount {
        target: var.clone(),
        source,
    })?;
    clock.mark("state-mount");
    if let Err(e) = crate::boot::state_grow::grow_to_disk_end(&state, Path::new(&var)) {
        // A node whose STATE could not grow still works; say so and go on.
        tracing::warn!(error = %crate::error_chain(&e), "STATE not grown");
    }
    clock.mark("state-grow");
    let esp = roots.wait_for(
        &Wanted::Label {
            disk: &usr.disk,
            label: "ESP",
        },
        Duration::from_secs(5),
    )?;

    let info = BootInfo {
        version: params.version.to_string(),
        slot: params.slot,
        cmdline: cmdline.trim().to_owned(),
        usr,
        usr_verity_device: verity_dev,
        state,
        esp,
    };
    info.write(Path::new(crate::boot::bootinfo::BOOT_INFO_PATH))
        .map_err(EarlyBootError::BootInfo)?;
    clock.mark("esp");
    console::emit(&clock.event());

    switch_root(Path::new(SYSROOT)).map_err(EarlyBootError::SwitchRoot)
}

/// The running slot's partition: the one with the command line's PARTUUID.
/// While the node renews its disk's GUIDs (boot::disk_identity) an entry
/// also names the slot's previous PARTUUID (`ballast.usr.was`); that one is
/// used only when no partition has the new PARTUUID after a full wait for
/// the disks, and is refused like any other when two partitions have it.
fn find_usr(roots: &Roots, params: &BootParams) -> Result<Partition, EarlyBootError> {
    let wait = Duration::from_secs(20);
    let new = roots.wait_for(&Wanted::PartUuid(params.usr_partuuid), wait);
    match (new, params.usr_was) {
        (Err(DiskError::NotFound { .. }), Some(was)) => {
            tracing::warn!(new = %params.usr_partuuid, was = %was, "slot not found under its new PARTUUID; trying the previous one");
            Ok(roots.wait_for(&Wanted::PartUuid(was), Duration::from_secs(1))?)
        }
        (found, _) => Ok(found?),
    }
}

fn read_to_string(path: &str) -> Result<String, EarlyBootError> {
    std::fs::read_to_string(path).map_err(|source| EarlyBootError::Read {
        path: path.into(),
        source,
    })
}

fn mkdir(path: &str) {
    let _ = std::fs::create_dir_all(path);
}

/// Creates `/dev/dm-N` for the slot with the root hash from the command
/// line; returns the device path.
fn open_verity(usr: &Partition, params: &BootParams) -> Result<PathBuf, EarlyBootError> {
    let verr = |source| EarlyBootError::Verity {
        device: usr.device.clone(),
        source,
    };
    let meta = std::fs::metadata(&usr.device).map_err(verr)?;
    let (major, minor) = (
        nix::sys::stat::major(meta.rdev()),
        nix::sys::stat::minor(meta.rdev()),
    );
    let v = params.verity();
    let needed = v.hash_offset + u64::from(v.hash_block_size);
    if needed > usr.length {
        return Err(verr(std::io::Error::other(format!(
            "slot is {} bytes, too small for {} data blocks and their hash tree",
            usr.length, v.data_blocks
        ))));
    }
    let dev = format!("{major}:{minor}");
    let table = sys::DmTarget {
        sector_start: 0,
        length: v.data_sectors(),
        target_type: "verity".into(),
        params: format!(
            "1 {dev} {dev} {} {} {} {} {} {} {}",
            v.data_block_size,
            v.hash_block_size,
            v.data_blocks,
            v.hash_start_block(),
            v.hash_algorithm,
            v.root_hash,
            v.salt
        ),
    };
    let control = File::options()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")
        .map_err(verr)?;
    let name = format!("usr-{}", params.slot);
    let (_, dm_minor) = sys::dm_create_readonly(&control, &name, &[table]).map_err(verr)?;
    let node = PathBuf::from(format!("/dev/dm-{dm_minor}"));
    for _ in 0..100 {
        if node.exists() {
            return Ok(node);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(verr(std::io::Error::other(format!(
        "{} did not appear",
        node.display()
    ))))
}

/// Readers of the pre-read: dm-verity hashes each read on the CPU that
/// completed it, so two readers on disjoint halves keep two CPUs busy.
const PRE_READ_READERS: u64 = 2;
/// Size of one pre-read request.
const PRE_READ_CHUNK: u64 = 1 << 20;
const PRE_READ_BUF: usize = 1 << 20;

/// Reads the whole verified device once. dm-verity checks each block as it
/// is read, so a flipped bit anywhere in the slot fails the boot here, with
/// a clear reason, instead of surfacing later as a random I/O error.
fn verify_every_block(
    device: &Path,
    usr: &Partition,
    params: &BootParams,
) -> Result<(), EarlyBootError> {
    let verr = |source| EarlyBootError::Verity {
        device: device.into(),
        source,
    };
    let mut file = File::open(device).map_err(verr)?;
    let len = file.seek(SeekFrom::End(0)).map_err(verr)?;
    read_all_in_parallel(&file, len, PRE_READ_READERS).map_err(|(offset, source)| {
        EarlyBootError::Corrupt {
            slot: format!("{} ({})", params.slot, usr.device.display()),
            device: device.into(),
            block: offset / 4096,
            source,
        }
    })
}

/// Reads `len` bytes of `file` with `readers` threads, each its own
/// contiguous part; the first failure (lowest offset) wins.
fn read_all_in_parallel(file: &File, len: u64, readers: u64) -> Result<(), (u64, std::io::Error)> {
    let readers = readers.max(1);
    let part = (len.div_ceil(PRE_READ_CHUNK).div_ceil(readers)) * PRE_READ_CHUNK;
    let results: Vec<Result<(), (u64, std::io::Error)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..readers)
            .map(|i| {
                let start = (i * part).min(len);
                let end = (start + part).min(len);
                (start, scope.spawn(move || read_range(file, start, end)))
            })
            .collect();
        handles
            .into_iter()
            .map(|(start, h)| {
                h.join().unwrap_or_else(|_| {
                    Err((start, std::io::Error::other("pre-read thread panicked")))
                })
            })
            .collect()
    });
    let mut errors: Vec<(u64, std::io::Error)> =
        results.into_iter().filter_map(Result::err).collect();
    errors.sort_by_key(|(offset, _)| *offset);
    match errors.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn read_range(file: &File, start: u64, end: u64) -> Result<(), (u64, std::io::Error)> {
    let mut buf = vec![0u8; PRE_READ_BUF];
    let mut offset = start;
    while offset < end {
        let want = usize::try_from((end - offset).min(PRE_READ_CHUNK)).unwrap_or(buf.len());
        match file.read_at(&mut buf[..want], offset) {
            Ok(0) => return Ok(()),
            Ok(n) => offset += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err((offset, e)),
        }
    }
    Ok(())
}

/// Moves the API filesystems into `new_root`, empties the initramfs (it
/// would otherwise pin its memory), makes `new_root` the root and execs the
/// agent there as PID 1.
fn switch_root(new_root: &Path) -> Result<Infallible, std::io::Error> {
    let io = |e: nix::Error| std::io::Error::from(e);
    for dir in ["/dev", "/proc", "/sys", "/run"] {
        let target = new_root.join(dir.trim_start_matches('/'));
        mount(
            Some(dir),
            &target,
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(io)?;
    }
    let root_dev = std::fs::metadata("/")?.dev();
    remove_same_device(Path::new("/"), root_dev, new_root);
    nix::unistd::chdir(new_root).map_err(io)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(io)?;
    nix::unistd::chroot(".").map_err(io)?;
    nix::unistd::chdir("/").map_err(io)?;
    let init = c"/usr/bin/ballast";
    let argv = [c"/sbin/init"];
    nix::unistd::execv(init, &argv).map_err(io)?;
    unreachable!("execv returned without an error")
}

/// Deletes the initramfs' own files: never crosses into another filesystem
/// (the new root and STATE are mounted below it) and never follows links.
fn remove_same_device(dir: &Path, dev: u64, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        if path == keep {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            remove_same_device(&path, dev, keep);
            let _ = std::fs::remove_dir(&path);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parallel_pre_read_reads_every_byte_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slot");
        // Not a multiple of the chunk, so the last part is short.
        let len = 3 * PRE_READ_CHUNK + 12345;
        std::fs::write(&path, vec![7u8; usize::try_from(len).unwrap()]).unwrap();
        let file = File::open(&path).unwrap();
        for readers in [1, 2, 3, 8] {
            read_all_in_parallel(&file, len, readers).unwrap();
        }
        // Empty device: nothing to read, no error.
        read_all_in_parallel(&file, 0, 2).unwrap();
        // A length past the end just stops at the end.
        read_all_in_parallel(&file, len + PRE_READ_CHUNK, 2).unwrap();
    }

    #[test]
    fn a_failed_read_reports_its_offset() {
        // A directory cannot be read: every reader fails at its start; the
        // lowest offset is reported.
        let dir = tempfile::tempdir().unwrap();
        let file = File::open(dir.path()).unwrap();
        let (offset, _) = read_all_in_parallel(&file, 4 * PRE_READ_CHUNK, 2).unwrap_err();
        assert_eq!(offset, 0);
    }

    #[test]
    fn initramfs_cleanup_keeps_the_new_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("sysroot/var")).unwrap();
        std::fs::write(root.join("sysroot/var/keep"), b"x").unwrap();
        std::fs::create_dir_all(root.join("lib/modules")).unwrap();
        std::fs::write(root.join("lib/modules/a.ko"), b"x").unwrap();
        std::fs::write(root.join("init"), b"x").unwrap();
        let dev = std::fs::metadata(root).unwrap().dev();
        remove_same_device(root, dev, &root.join("sysroot"));
        assert!(root.join("sysroot/var/keep").exists());
        assert!(!root.join("lib").exists());
        assert!(!root.join("init").exists());
    }
}
