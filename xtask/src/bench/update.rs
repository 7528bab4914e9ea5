//! `cargo xtask bench update`: one whole update cycle in a VM, 1.0.0 →
//! 1.1.0 from a loopback repository, split into its phases from the
//! agent's console events: download and install (`update-found` →
//! `installed`, guest clock), reboot (`rebooting` → `ready` of the new
//! version, host clock, firmware included) and health gate (`trial-boot` →
//! `committed`, guest clock). The baseline, measured in the same run, is
//! the same VM's cold boot to `ready`.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use ballast_updater::payload::Arch;
use qemu_tests::events::Event;
use qemu_tests::image::BuiltImage;
use qemu_tests::scenarios::Context;
use qemu_tests::update::fixture::{Releases, TestRepo};
use qemu_tests::update::scenarios::{user_data, REPO_GUEST_ADDR};
use qemu_tests::update::server::RepoServer;
use qemu_tests::vm::{Accel, GuestFwd, Vm};

use crate::vm_test::{ensure_image, ensure_version, log_dir};

const SECTION: &str = "## Update cycle";

#[derive(Debug, clap::Args)]
pub struct UpdateBenchArgs {
    #[arg(long, value_parser = crate::parse_arch, default_value = "x86_64")]
    pub arch: Arch,
}

fn wait(vm: &mut Vm, name: &str) -> Result<Event> {
    let ev = vm.wait_for_any(
        &[name, "update-error", "trial-failed", "boot-failed"],
        Duration::from_secs(400),
    )?;
    ensure!(ev.name == name, "expected {name}, got {}", ev.json());
    Ok(ev)
}

fn host_ms(ev: &Event) -> u64 {
    ev.host_elapsed
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub fn run(args: UpdateBenchArgs) -> Result<()> {
    let dir = ensure_image(args.arch)?;
    ensure_version(args.arch, "1.1.0")?;
    let ctx = Context {
        arch: args.arch,
        image: BuiltImage::load(&dir)?,
        accel: Accel::Tcg,
        log_dir: log_dir(),
        keep_logs: false,
        boot_timeout: Duration::from_secs(300),
    };
    let releases = Releases::beside(&dir)?;
    let repo = TestRepo::new(releases.key()?)?;
    repo.add(&releases.payload("1.1.0")?)?;
    repo.sign()?;
    let server = RepoServer::start(repo.path())?;
    let mut vm = ctx
        .vm("bench-update")
        .forward_api()
        .guestfwd(GuestFwd {
            guest_addr: REPO_GUEST_ADDR.into(),
            host_port: server.port(),
        })
        .user_data(user_data("immediate", "120s", "")?.as_bytes())
        .spawn()?;

    let first_ready = wait(&mut vm, "ready")?;
    let found = wait(&mut vm, "update-found")?;
    let installed = wait(&mut vm, "installed")?;
    let rebooting = wait(&mut vm, "rebooting")?;
    let second_ready = wait(&mut vm, "ready")?;
    ensure!(
        second_ready.str_field("version") == Some("1.1.0"),
        "rebooted into {}",
        second_ready.json()
    );
    let trial = wait(&mut vm, "trial-boot")?;
    let committed = wait(&mut vm, "committed")?;
    vm.kill();

    let guest = |a: &Event, b: &Event| b.ms().unwrap_or(0).saturating_sub(a.ms().unwrap_or(0));
    let cold_boot = host_ms(&first_ready);
    let install = guest(&found, &installed);
    let reboot = host_ms(&second_ready).saturating_sub(host_ms(&rebooting));
    let gate = guest(&trial, &committed);
    let total = host_ms(&committed).saturating_sub(host_ms(&found));
    let payload: u64 = ctx.image.meta.artifacts.iter().map(|a| a.size).sum();
    let body = format!(
        "Command: `cargo xtask bench update --arch {arch}` — QEMU TCG, 1 GiB; 1.0.0 → 1.1.0 from a \
         loopback repository through guestfwd, strategy immediate, built-in health checks only. \
         Phases from the agent's console events; the baseline is the same VM's cold boot (QEMU \
         start → ready) in the same run.\n\n\
         | phase | ms | ratio to cold boot |\n|---|---|---|\n\
         | cold boot (baseline) | {cold_boot} | 1.00× |\n\
         | download + install ({mib:.1} MiB payload) | {install} | {ri:.2}× |\n\
         | reboot into the new version (firmware included) | {reboot} | {rr:.2}× |\n\
         | health gate (trial-boot → committed) | {gate} | {rg:.2}× |\n\
         | **found → committed** | **{total}** | **{rt:.2}×** |\n",
        arch = args.arch,
        mib = payload as f64 / f64::from(1 << 20),
        ri = install as f64 / cold_boot.max(1) as f64,
        rr = reboot as f64 / cold_boot.max(1) as f64,
        rg = gate as f64 / cold_boot.max(1) as f64,
        rt = total as f64 / cold_boot.max(1) as f64,
    );
    println!("{body}");
    super::write_arch_section(SECTION, None, args.arch, &body).context("writing BENCHMARKS.md")
}
