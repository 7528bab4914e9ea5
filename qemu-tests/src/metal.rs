//! The metal-flavour scenarios: the image built with `--platform metal`
//! (generic kernel, drivers loaded by modalias) boots from a disk on a
//! non-virtio controller and gets its DHCP lease through a non-virtio NIC.
//! Neither driver is on any fixed list, so ready proves the coldplug found
//! the disk controller (and, for SATA, the SCSI disk behind it), and the
//! lease proves it found the NIC. The `drivers-loaded` events must name
//! the disk controller's driver (initrd) and the NIC's and the i6300esb
//! watchdog's (runtime): the watchdog the trial boot arms on metal is
//! found by modalias too (`update-watchdog` runs a metal-flavour release
//! into it). One boot per variant.

use std::path::{Path, PathBuf};

use crate::events::AgentEvent;
use crate::image::BuiltImage;
use crate::scenarios::{check_dhcp_lease, Context, ScenarioError};
use crate::vm::Storage;

/// The platform name the image build takes and its directory is named by.
pub const PLATFORM: &str = "metal";

/// `build/<arch>/metal/<version>` beside the base image's
/// `build/<arch>/<version>`.
pub fn image_dir_beside(base: &Path, version: &str) -> PathBuf {
    base.parent()
        .unwrap_or(Path::new("."))
        .join(PLATFORM)
        .join(version)
}

/// The metal image: the one under test when it is a metal one
/// (`vm-test --image build/<arch>/metal/<version>`), else the one beside it.
fn metal_image(ctx: &Context) -> Result<BuiltImage, ScenarioError> {
    let parent = ctx.image.dir.parent().and_then(Path::file_name);
    if parent.is_some_and(|p| p == PLATFORM) {
        return Ok(ctx.image.clone());
    }
    let dir = image_dir_beside(&ctx.image.dir, &ctx.image.meta.version.to_string());
    let image = BuiltImage::load(&dir).map_err(|e| {
        ScenarioError::Setup(format!(
            "the metal image: {e} (cargo xtask vm-test builds it, or cargo xtask image --platform metal)"
        ))
    })?;
    if image.meta.arch != ctx.arch {
        return Err(ScenarioError::Setup(format!(
            "{} holds an {} image, expected {}",
            dir.display(),
            image.meta.arch,
            ctx.arch
        )));
    }
    Ok(image)
}

/// The drivers a metal boot must load by modalias: the disk controller's
/// in the initrd, the NIC's and the watchdog's in the slot.
struct Expected {
    storage: Storage,
    disk_driver: &'static str,
    nic: &'static str,
}

fn boot_on(ctx: &Context, name: &str, want: Expected) -> Result<(), ScenarioError> {
    let Expected {
        storage,
        disk_driver,
        nic,
    } = want;
    let image = metal_image(ctx)?;
    let mut vm = ctx
        .vm(name)
        .disk(&image.disk)
        .storage(storage)
        .nic(nic)
        .watchdog()
        .spawn()?;
    let ready = vm.wait_for_any(&["ready", "boot-failed"], ctx.boot_timeout)?;
    let version = image.meta.version.to_string();
    if ready.name != "ready" || ready.str_field("version") != Some(version.as_str()) {
        return Err(vm
            .fail(format!(
                "expected ready on the metal image {version} from {storage:?}, got {}",
                ready.json()
            ))
            .into());
    }
    vm.progress(&format!(
        "ready from {storage:?}: {} ms since kernel start",
        ready.ms().unwrap_or(0)
    ));
    check_drivers(&mut vm, "initrd", &[disk_driver])?;
    check_drivers(&mut vm, "runtime", &[nic, "i6300esb"])?;
    check_dhcp_lease(&mut vm)
}

/// The `drivers-loaded` event of `stage` (seen before `ready`) names every
/// module of `want`.
fn check_drivers(vm: &mut crate::vm::Vm, stage: &str, want: &[&str]) -> Result<(), ScenarioError> {
    let found = vm.events_seen().iter().find_map(|e| match &e.agent {
        Some(AgentEvent::DriversLoaded {
            stage: s,
            modules,
            failed,
            took_ms,
            ..
        }) if s == stage => Some((modules.clone(), failed.clone(), *took_ms)),
        _ => None,
    });
    let Some((modules, failed, took_ms)) = found else {
        return Err(vm
            .fail(format!(
                "no drivers-loaded event of stage {stage} before ready"
            ))
            .into());
    };
    let missing: Vec<&str> = want
        .iter()
        .copied()
        .filter(|m| !modules.iter().any(|l| l == m))
        .collect();
    if !missing.is_empty() {
        return Err(vm
            .fail(format!(
                "{stage} coldplug did not load {missing:?}: loaded {modules:?}, failed {failed:?}"
            ))
            .into());
    }
    vm.progress(&format!(
        "{stage} drivers by modalias in {took_ms} ms: {modules:?}"
    ));
    Ok(())
}

/// `metal`: NVMe boot disk, e1000e NIC.
pub fn metal(ctx: &Context) -> Result<(), ScenarioError> {
    boot_on(
        ctx,
        "metal",
        Expected {
            storage: Storage::Nvme,
            disk_driver: "nvme",
            nic: "e1000e",
        },
    )
}

/// `metal-sata`: SATA disk on AHCI, igb NIC.
pub fn metal_sata(ctx: &Context) -> Result<(), ScenarioError> {
    boot_on(
        ctx,
        "metal-sata",
        Expected {
            storage: Storage::Ahci,
            disk_driver: "ahci",
            nic: "igb",
        },
    )
}
