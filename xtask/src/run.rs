//! `cargo xtask run`: installs missing host packages (`xtask deps`), builds
//! the image if needed and boots it in QEMU with
//! the serial console on this terminal (Ctrl-A X quits). The disk is a
//! qcow2 overlay in `build/<arch>/run/`, so the built image stays as built;
//! the plain qemu-system command line is printed first.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use ballast_updater::payload::Arch;
use qemu_tests::image::BuiltImage;
use qemu_tests::vm::{Console, VmBuilder};

use crate::vm_test::{ensure_image, resolve_accel, AccelChoice};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[arg(long, value_parser = crate::parse_arch, default_value = "x86_64")]
    pub arch: Arch,
    /// Accelerator: tcg, kvm, or auto (KVM only when a probe boot works).
    #[arg(long, value_enum, default_value_t = AccelChoice::Tcg)]
    pub accel: AccelChoice,
    /// Hand this file to the node as user-data (fw_cfg opt/ballast/user-data).
    #[arg(long)]
    pub user_data: Option<PathBuf>,
    /// Forward a free port on 127.0.0.1 to the agent's API (guest port 9465).
    #[arg(long)]
    pub forward_api: bool,
}

pub fn run(args: RunArgs) -> Result<()> {
    // README's first command: a fresh machine gets its host packages here.
    eprintln!("Checking host packages (cargo xtask deps)...");
    crate::deps::install()?;
    let dir = ensure_image(args.arch)?;
    let image = BuiltImage::load(&dir)?;
    let accel = resolve_accel(args.accel, &image)?;
    let work = crate::workspace_root()
        .join("build")
        .join(args.arch.as_str())
        .join("run");
    let mut b = VmBuilder::new("run", args.arch)
        .accel(accel)
        .disk(&image.disk)
        .work_dir(&work);
    if let Some(path) = &args.user_data {
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        b = b.user_data(&data);
    }
    if args.forward_api {
        b = b.forward_api();
    }
    let qemu = b.command(Console::Interactive)?;
    eprintln!(
        "Booting Ballast {} ({}) from {}",
        image.meta.version,
        args.arch,
        image.disk.display()
    );
    eprintln!("Disk overlay and firmware variables: {}", work.display());
    if let Some(port) = qemu.api_port {
        eprintln!("Agent API: http://127.0.0.1:{port}/ (the node must listen on 0.0.0.0:9465)");
    }
    eprintln!(
        "Quit with Ctrl-A X. QEMU command line:\n\n{}\n",
        qemu.shell_line()
    );
    let status = qemu
        .command()
        .status()
        .with_context(|| format!("starting {}", qemu.program))?;
    if !status.success() {
        anyhow::bail!("{} exited with {status}", qemu.program);
    }
    Ok(())
}
