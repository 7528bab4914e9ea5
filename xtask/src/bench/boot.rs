//! `cargo xtask bench boot`: boot to agent-ready against a floor, the same
//! kernel and QEMU booting a busybox initramfs that only prints a marker.
//! Both boot the same way for the ratio (QEMU direct kernel boot, same
//! command line; Ballast with its disk attached); the full UEFI +
//! systemd-boot boot of Ballast is measured beside them. Several runs,
//! interleaved; medians; written to BENCHMARKS.md under `## Boot to ready`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use ballast_image::Profile;
use ballast_updater::payload::Arch;
use qemu_tests::floor::{self, FLOOR_EVENT};
use qemu_tests::image::BuiltImage;
use qemu_tests::vm::{Accel, Boot, VmBuilder};
use serde_json::Value;

use crate::vm_test::{ensure_profile, log_dir, resolve_accel, AccelChoice, TEST_VERSION};

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
    /// Image profile: base, or k8s (containerd, runc, CNI: a 93 MB usr).
    #[arg(long, default_value = "base")]
    pub profile: Profile,
    /// Accelerator: tcg, kvm, or auto (KVM only when a probe boot works).
    #[arg(long, value_enum, default_value_t = AccelChoice::Tcg)]
    pub accel: AccelChoice,
    /// Only build the image (and the floor's initramfs) and exit: run it
    /// before taking the VM lock for the boots.
    #[arg(long)]
    pub prepare: bool,
    /// Measure only the floor with this kernel (no image, nothing written):
    /// checks QEMU and the busybox initramfs on a host without an image.
    #[arg(long, hide = true)]
    pub floor_kernel: Option<PathBuf>,
}

/// One boot's two clocks.
#[derive(Debug, Clone)]
struct Sample {
    /// `ms` of the marker/ready event: since the kernel started.
    guest_ms: u64,
    /// From QEMU's start to the host reading the event line.
    wall_ms: u64,
    /// `ms` of the agent's `early-boot` event (its initrd `/init` started).
    early_ms: Option<u64>,
    /// The boot split into phases (Ballast only; empty for the floor).
    phases: Vec<(String, u64)>,
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
    /// Phase names in the order of the first run that has them.
    fn phase_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for s in &self.0 {
            for (name, _) in &s.phases {
                if !names.contains(name) {
                    names.push(name.clone());
                }
            }
        }
        names
    }
    fn phase(&self, name: &str) -> Vec<u64> {
        self.0
            .iter()
            .filter_map(|s| s.phases.iter().find(|(n, _)| n == name).map(|(_, ms)| *ms))
            .collect()
    }
}

/// Splits one boot into phases from its `boot-phases` events
/// (docs/console-events.md): the kernel up to the initramfs, each phase of
/// the initramfs, the `switch_root` and `exec` between the stages, each
/// phase of PID 1 in the slot, and the rest up to `ready` (`ready_ms`).
fn split_phases(
    events: &[(String, &serde_json::Map<String, Value>)],
    ready_ms: u64,
) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut last_end: Option<u64> = None;
    for (name, fields) in events {
        if name != "boot-phases" {
            continue;
        }
        let stage = fields.get("stage").and_then(Value::as_str).unwrap_or("?");
        let Some(start) = fields.get("start_ms").and_then(Value::as_u64) else {
            continue;
        };
        match last_end {
            None => out.push(("kernel → initramfs /init".to_owned(), start)),
            Some(end) => out.push(("switch_root + exec".to_owned(), start.saturating_sub(end))),
        }
        for p in fields
            .get("phases")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let phase = p.get("phase").and_then(Value::as_str).unwrap_or("?");
            let took = p.get("took_ms").and_then(Value::as_u64).unwrap_or(0);
            out.push((format!("{stage}: {phase}"), took));
        }
        last_end = fields.get("ms").and_then(Value::as_u64);
    }
    if let Some(end) = last_end {
        out.push(("→ `ready`".to_owned(), ready_ms.saturating_sub(end)));
    }
    out
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
    let guest_ms = ev.ms().context("event without ms")?;
    let seen: Vec<(String, &serde_json::Map<String, Value>)> = vm
        .events_seen()
        .iter()
        .map(|e| (e.name.clone(), &e.fields))
        .collect();
    let phases = split_phases(&seen, guest_ms);
    let sample = Sample {
        guest_ms,
        phases,
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
    if args.prepare {
        for arch in arches {
            let dir = ensure_profile(arch, TEST_VERSION, args.profile)?;
            floor::initramfs(arch, &cache_dir())?;
            eprintln!(
                "{arch}: {} and the floor's initramfs are ready",
                dir.display()
            );
        }
        return Ok(());
    }
    for arch in arches {
        let report = bench_arch(arch, &args)?;
        println!("{report}");
        let sub = match args.profile {
            Profile::Base => arch.to_string(),
            p => format!("{arch}, {} profile", p.as_str()),
        };
        super::write_arch_section(SECTION, Some(INTRO), sub, &report)?;
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
    let dir = ensure_profile(arch, TEST_VERSION, args.profile)?;
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

        // Its serial log is kept (target/vm-logs): the agent's own log
        // says what a slow phase did.
        let b = VmBuilder::new(&format!("direct-{i}"), arch)
            .accel(accel)
            .log_dir(&log_dir())
            .keep_log(true)
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
    let profile_arg = match args.profile {
        Profile::Base => String::new(),
        p => format!(" --profile {}", p.as_str()),
    };
    let cmd = match args.accel {
        AccelChoice::Tcg => format!(
            "cargo xtask bench boot --arch {arch}{profile_arg} --runs {}",
            args.runs
        ),
        other => format!(
            "cargo xtask bench boot --arch {arch}{profile_arg} --runs {} --accel {}",
            args.runs,
            format!("{other:?}").to_lowercase()
        ),
    };
    let mut phase_table = String::from(
        "Where the direct boot's time goes (`boot-phases` events, docs/console-events.md; \
         medians per phase, so they need not add up to the median total):\n\n\
         | phase | median ms | runs (ms) |\n|---|---|---|\n",
    );
    for name in direct.phase_names() {
        let v = direct.phase(&name);
        phase_table.push_str(&format!("| {name} | {} | {v:?} |\n", median(&v)));
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned());
    Ok(format!(
        "Command: `{cmd}` — QEMU {accel_name}, 1 GiB, 2 vCPUs, host with {cpus} cores (1-min load {load} at the end); \
         Ballast {version} ({profile} profile), kernel {kernel}; {runs} run(s) of each, interleaved; medians.\n\n\
         | boot | kernel start → marker/ready (guest `ms`) | QEMU start → marker/ready (wall) |\n\
         |---|---|---|\n\
         | floor: same kernel + busybox initramfs, direct kernel boot | {fg} ms | {fw} ms |\n\
         | Ballast: same kernel + our initrd + disk, direct kernel boot | {dg} ms | {dw} ms |\n\
         | **ratio Ballast / floor** | **{rg}** | **{rw}** |\n\
         | of which: Ballast kernel start → `early-boot` (initrd `/init` running), direct | {de} ms | |\n\
         | Ballast: full UEFI firmware + systemd-boot | {ug} ms | {uw} ms |\n\n\
         Runs (guest ms / wall ms): floor {fgs:?} / {fws:?}; direct {dgs:?} / {dws:?}; UEFI {ugs:?} / {uws:?}; \
         direct early-boot {des:?}.\n\n{phase_table}",
        accel_name = accel.as_str().to_uppercase(),
        version = image.meta.version,
        profile = args.profile.as_str(),
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

    #[test]
    fn a_boot_is_split_into_its_phases_and_the_gaps_between_stages() {
        let parse = |j: &str| match serde_json::from_str::<Value>(j).unwrap() {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let initramfs = parse(
            r#"{"event":"boot-phases","ms":1500,"stage":"initramfs","start_ms":1000,
                "phases":[{"phase":"modules","took_ms":200},{"phase":"verity-pre-read","took_ms":300}]}"#,
        );
        let init = parse(
            r#"{"event":"boot-phases","ms":2100,"stage":"init","start_ms":1600,
                "phases":[{"phase":"network","took_ms":500}]}"#,
        );
        let other = parse(r#"{"event":"early-boot","ms":1000}"#);
        let events = vec![
            ("early-boot".to_owned(), &other),
            ("boot-phases".to_owned(), &initramfs),
            ("boot-phases".to_owned(), &init),
        ];
        let phases = split_phases(&events, 2110);
        let want: Vec<(String, u64)> = [
            ("kernel → initramfs /init", 1000),
            ("initramfs: modules", 200),
            ("initramfs: verity-pre-read", 300),
            ("switch_root + exec", 100),
            ("init: network", 500),
            ("→ `ready`", 10),
        ]
        .iter()
        .map(|(n, ms)| ((*n).to_owned(), *ms))
        .collect();
        assert_eq!(phases, want);
        // No phase events (the floor, an older agent): no phases.
        assert!(split_phases(&events[..1], 2110).is_empty());
    }
}
