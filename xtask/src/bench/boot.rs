//! `cargo xtask bench boot`: boot to agent-ready against a floor, the same
//! kernel and QEMU booting a busybox initramfs that only prints a marker.
//! Both boot the same way for the ratio (QEMU direct kernel boot, same
//! command line; Ballast with its disk attached); the full UEFI +
//! systemd-boot boot of Ballast is measured beside them. Several runs,
//! interleaved; medians; written to BENCHMARKS.md under `## Boot to ready`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use ballast_updater::payload::Arch;
use qemu_tests::floor::{self, FLOOR_EVENT};
use qemu_tests::image::BuiltImage;
use qemu_tests::vm::{Accel, Boot, VmBuilder};

use crate::vm_test::{ensure_image, log_dir, resolve_accel, AccelChoice};

/// Heading of this benchmark's section in BENCHMARKS.md.
const SECTION: &str = "## Boot to ready";

/// The paragraph under [`SECTION`].
const INTRO: &str = "Boot to agent-ready against the floor: the same kernel and QEMU booting a \
busybox initramfs whose /init only prints a marker. Both boot the same way for the ratio: QEMU \
direct kernel boot (`-kernel/-initrd/-append`) with the command line of the image's boot entry, \
Ballast with its disk attached (fresh qcow2 overlay per run). The UEFI row is Ballast's full \
boot through OVMF/AAVMF and systemd-boot. `ms` is the guest kernel's clock (CLOCK_BOOTTIME) \
when the marker or the agent's `ready` event was printed; wall is measured by the harness from \
QEMU's start to reading that line. Under TCG on a shared 2-core machine single runs vary by \
tens of percent: compare the ratio measured within one run, not times across runs. Written by \
`cargo xtask bench boot`.";

#[derive(Debug, clap::Args)]
pub struct BootBenchArgs {
    /// Architecture (both, one after the other, when not given).
    #[arg(long, value_parser = crate::parse_arch)]
    pub arch: Option<Arch>,
    /// Runs of each kind.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Accelerator: tcg, kvm, or auto (KVM only when a probe boot works).
    #[arg(long, value_enum, default_value_t = AccelChoice::Tcg)]
    pub accel: AccelChoice,
    /// Measure only the floor with this kernel (no image, nothing written):
    /// checks QEMU and the busybox initramfs on a host without an image.
    #[arg(long, hide = true)]
    pub floor_kernel: Option<PathBuf>,
}

/// One boot's two clocks.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// `ms` of the marker/ready event: since the kernel started.
    guest_ms: u64,
    /// From QEMU's start to the host reading the event line.
    wall_ms: u64,
    /// `ms` of the agent's `early-boot` event (its initrd `/init` started).
    early_ms: Option<u64>,
}

/// Runs of one kind.
#[derive(Debug, Default)]
struct Series(Vec<Sample>);

impl Series {
    fn guest(&self) -> Vec<u64> {
        self.0.iter().map(|s| s.guest_ms).collect()
    }
    fn wall(&self) -> Vec<u64> {
        self.0.iter().map(|s| s.wall_ms).collect()
    }
    fn early(&self) -> Vec<u64> {
        self.0.iter().filter_map(|s| s.early_ms).collect()
    }
}

fn median(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    match v.len() {
        0 => 0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2,
    }
}

fn ratio(a: u64, b: u64) -> String {
    if b == 0 {
        "–".to_owned()
    } else {
        format!("{:.2}×", a as f64 / b as f64)
    }
}

fn measure(b: VmBuilder, event: &str, timeout: Duration) -> Result<Sample> {
    let mut vm = b.spawn()?;
    let ev = vm.wait_for_any(&[event, "boot-failed"], timeout)?;
    if ev.name == "boot-failed" {
        return Err(vm.fail(format!("boot failed: {}", ev.json())).into());
    }
    let sample = Sample {
        guest_ms: ev.ms().context("event without ms")?,
        wall_ms: u64::try_from(ev.host_elapsed.unwrap_or_default().as_millis()).unwrap_or(u64::MAX),
        early_ms: vm
            .events_seen()
            .iter()
            .find(|e| e.name == "early-boot")
            .and_then(|e| e.ms()),
    };
    vm.progress(&format!(
        "{event}: guest {} ms, wall {} ms",
        sample.guest_ms, sample.wall_ms
    ));
    vm.kill();
    Ok(sample)
}

pub fn run(args: BootBenchArgs) -> Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let arches = match args.arch {
        Some(a) => vec![a],
        None => vec![Arch::X86_64, Arch::Aarch64],
    };
    if let Some(kernel) = &args.floor_kernel {
        for arch in arches {
            floor_only(arch, kernel, &args)?;
        }
        return Ok(());
    }
    for arch in arches {
        let report = bench_arch(arch, &args)?;
        println!("{report}");
        super::write_arch_section(SECTION, Some(INTRO), arch, &report)?;
    }
    Ok(())
}

fn cache_dir() -> PathBuf {
    crate::workspace_root().join(".cache").join("qemu-tests")
}

fn floor_vm(
    arch: Arch,
    accel: Accel,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    i: usize,
) -> VmBuilder {
    VmBuilder::new(&format!("floor-{i}"), arch)
        .accel(accel)
        .log_dir(&log_dir())
        .boot(Boot::Direct {
            kernel: kernel.to_owned(),
            initrd: initrd.to_owned(),
            cmdline: cmdline.to_owned(),
        })
}

fn floor_only(arch: Arch, kernel: &Path, args: &BootBenchArgs) -> Result<()> {
    let initramfs = floor::initramfs(arch, &cache_dir())?;
    let accel = match args.accel {
        AccelChoice::Kvm => Accel::Kvm,
        _ => Accel::Tcg,
    };
    let cmdline = format!("console={} panic=10 loglevel=4", arch.serial_console());
    let mut s = Series::default();
    for i in 0..args.runs {
        let b = floor_vm(arch, accel, kernel, &initramfs, &cmdline, i);
        s.0.push(measure(b, FLOOR_EVENT, Duration::from_secs(120))?);
    }
    println!(
        "{arch} floor: guest median {} ms {:?}, wall median {} ms {:?}",
        median(&s.guest()),
        s.guest(),
        median(&s.wall()),
        s.wall()
    );
    Ok(())
}

fn bench_arch(arch: Arch, args: &BootBenchArgs) -> Result<String> {
    let dir = ensure_image(arch)?;
    let image = BuiltImage::load(&dir)?;
    let accel = resolve_accel(args.accel, &image)?;
    let initramfs = floor::initramfs(arch, &cache_dir())?;
    let cmdline = image.entry_cmdline();
    let timeout = Duration::from_secs(300);
    eprintln!(
        "bench boot {arch} ({}), {} run(s) of each; kernel command line: {cmdline}",
        accel.as_str(),
        args.runs
    );

    let (mut fl, mut direct, mut uefi) = (Series::default(), Series::default(), Series::default());
    for i in 0..args.runs {
        eprintln!("run {}/{}", i + 1, args.runs);
        let b = floor_vm(arch, accel, &image.kernel(), &initramfs, &cmdline, i);
        fl.0.push(measure(b, FLOOR_EVENT, timeout)?);

        let b = VmBuilder::new(&format!("direct-{i}"), arch)
            .accel(accel)
            .log_dir(&log_dir())
            .disk(&image.disk)
            .boot(Boot::Direct {
                kernel: image.kernel(),
                initrd: image.initrd(),
                cmdline: cmdline.clone(),
            });
        direct.0.push(measure(b, "ready", timeout)?);

        let b = VmBuilder::new(&format!("uefi-{i}"), arch)
            .accel(accel)
            .log_dir(&log_dir())
            .disk(&image.disk);
        uefi.0.push(measure(b, "ready", timeout)?);
    }

    let (fg, fw) = (median(&fl.guest()), median(&fl.wall()));
    let (dg, dw) = (median(&direct.guest()), median(&direct.wall()));
    let (ug, uw) = (median(&uefi.guest()), median(&uefi.wall()));
    let de = median(&direct.early());
    let cmd = match args.accel {
        AccelChoice::Tcg => format!("cargo xtask bench boot --arch {arch} --runs {}", args.runs),
        other => format!(
            "cargo xtask bench boot --arch {arch} --runs {} --accel {}",
            args.runs,
            format!("{other:?}").to_lowercase()
        ),
    };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned());
    Ok(format!(
        "Command: `{cmd}` — QEMU {accel_name}, 1 GiB, 2 vCPUs, host with {cpus} cores (1-min load {load} at the end); \
         Ballast {version}, kernel {kernel}; {runs} run(s) of each, interleaved; medians.\n\n\
         | boot | kernel start → marker/ready (guest `ms`) | QEMU start → marker/ready (wall) |\n\
         |---|---|---|\n\
         | floor: same kernel + busybox initramfs, direct kernel boot | {fg} ms | {fw} ms |\n\
         | Ballast: same kernel + our initrd + disk, direct kernel boot | {dg} ms | {dw} ms |\n\
         | **ratio Ballast / floor** | **{rg}** | **{rw}** |\n\
         | of which: Ballast kernel start → `early-boot` (initrd `/init` running), direct | {de} ms | |\n\
         | Ballast: full UEFI firmware + systemd-boot | {ug} ms | {uw} ms |\n\n\
         Runs (guest ms / wall ms): floor {fgs:?} / {fws:?}; direct {dgs:?} / {dws:?}; UEFI {ugs:?} / {uws:?}; \
         direct early-boot {des:?}.\n",
        accel_name = accel.as_str().to_uppercase(),
        version = image.meta.version,
        kernel = image.meta.kernel_release,
        runs = args.runs,
        rg = ratio(dg, fg),
        rw = ratio(dw, fw),
        fgs = fl.guest(),
        fws = fl.wall(),
        dgs = direct.guest(),
        dws = direct.wall(),
        ugs = uefi.guest(),
        uws = uefi.wall(),
        des = direct.early(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_runs() {
        assert_eq!(median(&[3, 1, 2]), 2);
        assert_eq!(median(&[4, 1, 3, 2]), 2);
        assert_eq!(median(&[]), 0);
        assert_eq!(ratio(150, 100), "1.50×");
    }
}
