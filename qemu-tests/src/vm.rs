//! One QEMU virtual machine: the command line for both architectures
//! ([`VmBuilder`]), the running process with its serial console captured
//! and parsed into events ([`Vm`]), and its cleanup (the QEMU process is
//! killed by PID and its files removed on drop; the serial log is kept
//! under the log directory when something failed).
//!
//! Layout follows Cloud Hypervisor's test_infra: a builder collects what the
//! test wants (firmware or direct kernel boot, disk, networking, fw_cfg
//! user-data, watchdog), [`VmBuilder::command`] turns it into a plain
//! `qemu-system-*` command line in a work directory (per-VM firmware vars
//! copy, qcow2 overlay over the built image), and [`VmBuilder::spawn`] starts
//! it with the serial console on a pipe read by a thread.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ballast_updater::payload::Arch;

use crate::disk::{self, DiskError};
use crate::events::{self, Event, EventError};

/// The agent's API port inside the guest.
pub const API_GUEST_PORT: u16 = 9465;
/// fw_cfg file name the agent reads user-data from.
pub const USER_DATA_FW_CFG: &str = "opt/ballast/user-data";
/// Serial lines kept in memory for error messages.
const TAIL_LINES: usize = 60;
/// Size both AAVMF pflash devices of QEMU's `virt` machine must have.
const AAVMF_FLASH_SIZE: u64 = 64 * 1024 * 1024;

/// Errors building, starting or watching a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("preparing the disk of VM {vm}")]
    Disk {
        vm: String,
        #[source]
        source: DiskError,
    },
    #[error("{what} {path} for VM {vm}")]
    Io {
        vm: String,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("firmware file {0} is missing (install the ovmf / qemu-efi-aarch64 packages: cargo xtask deps)")]
    Firmware(PathBuf),
    #[error("no free TCP port on 127.0.0.1")]
    Port(#[source] std::io::Error),
    #[error("starting {program} for VM {vm}")]
    Spawn {
        vm: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for {0:?}, which is neither an agent event (agent/src/console.rs) nor a test program's")]
    UnknownEvent(String),
    #[error("no {wanted} event within {timeout:?}; {at}")]
    Timeout {
        wanted: String,
        timeout: Duration,
        at: Box<SerialTail>,
    },
    #[error("QEMU exited ({status}) before a {wanted} event; qemu stderr: {stderr}; {at}")]
    Exited {
        wanted: String,
        status: String,
        stderr: String,
        at: Box<SerialTail>,
    },
    #[error("{message}; {at}")]
    Check {
        message: String,
        at: Box<SerialTail>,
    },
}

/// Where to look when a VM misbehaved: its name, its serial log and the
/// last console lines.
#[derive(Debug, Clone)]
pub struct SerialTail {
    pub vm: String,
    pub log: PathBuf,
    pub tail: String,
}

impl std::fmt::Display for SerialTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VM {} (serial log {}); last console lines:\n{}",
            self.vm,
            self.log.display(),
            self.tail
        )
    }
}

/// Accelerator. TCG (software emulation) is the default: nested KVM is
/// unreliable on the project's machines, so KVM is used only after
/// [`crate::floor::kvm_works`] proved it by booting a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Tcg,
    Kvm,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// How the guest starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// UEFI firmware (OVMF / AAVMF) with a per-VM copy of its variable
    /// store; the firmware boots the disk's ESP (systemd-boot).
    Uefi,
    /// QEMU loads the kernel and initrd itself (no firmware, no loader).
    Direct {
        kernel: PathBuf,
        initrd: PathBuf,
        cmdline: String,
    },
}

/// Where the serial console goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Console {
    /// A pipe read by the harness (events, log file).
    Capture,
    /// This terminal, with QEMU's monitor multiplexed (Ctrl-A X quits).
    Interactive,
}

/// A `guestfwd` rule: connections from the guest to `guest_addr`
/// (`10.0.2.100:80`) are served by `socat - TCP:127.0.0.1:<host_port>`,
/// one after another (the command form; see host-setup.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFwd {
    pub guest_addr: String,
    pub host_port: u16,
}

/// A TAP device in a network namespace (see [`crate::netlab`]): QEMU runs
/// inside the namespace (`ip netns exec`) and its NIC is the TAP device,
/// instead of user networking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapNet {
    pub netns: String,
    pub ifname: String,
    pub mac: String,
}

/// Firmware files of one architecture.
#[derive(Debug, Clone)]
pub struct Firmware {
    pub code: PathBuf,
    pub vars_template: PathBuf,
}

impl Firmware {
    /// Debian's OVMF (4M) / AAVMF files.
    pub fn for_arch(arch: Arch) -> Self {
        match arch {
            Arch::X86_64 => Firmware {
                code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
                vars_template: "/usr/share/OVMF/OVMF_VARS_4M.fd".into(),
            },
            Arch::Aarch64 => Firmware {
                code: "/usr/share/AAVMF/AAVMF_CODE.fd".into(),
                vars_template: "/usr/share/AAVMF/AAVMF_VARS.fd".into(),
            },
        }
    }
}

/// A QEMU command line ready to run, with the work directory its files
/// live in (removed on drop when it is a temporary directory).
#[derive(Debug)]
pub struct QemuCommand {
    pub program: String,
    pub args: Vec<String>,
    /// Host port forwarded to the agent's API, when asked for.
    pub api_port: Option<u16>,
    pub work_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl QemuCommand {
    /// The command as one shell line (arguments quoted where needed).
    pub fn shell_line(&self) -> String {
        std::iter::once(self.program.as_str())
            .chain(self.args.iter().map(String::as_str))
            .map(shell_quote)
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        cmd
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=,./:@+%".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Collects what a test wants from a VM.
#[derive(Debug, Clone)]
pub struct VmBuilder {
    name: String,
    arch: Arch,
    accel: Accel,
    memory_mib: u32,
    cpus: u32,
    boot: Boot,
    disk: Option<PathBuf>,
    disk_size: Option<u64>,
    work_dir: Option<PathBuf>,
    forward_api: bool,
    guestfwd: Vec<GuestFwd>,
    /// `net=` and `host=` of the user network (QEMU's 10.0.2.0/24 when None).
    user_net: Option<(String, String)>,
    /// SMBIOS type 1 (system) fields, e.g. `manufacturer=Amazon EC2`.
    smbios_system: Option<String>,
    user_data: Option<Vec<u8>>,
    extra_drives: Vec<PathBuf>,
    storage: Storage,
    nic: &'static str,
    watchdog: bool,
    second_nic: bool,
    log_dir: PathBuf,
    keep_log: bool,
    quiet: bool,
    resume: bool,
    cache: &'static str,
    tap: Option<TapNet>,
    rtc_base: Option<String>,
}

/// The boot disk's controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    VirtioBlk,
    /// An NVMe controller with the disk as its namespace.
    Nvme,
    /// A SATA disk on an AHCI controller of its own.
    Ahci,
}

impl VmBuilder {
    /// A VM called `name` (used in progress lines and log names): UEFI
    /// boot, TCG, 1 GiB, 2 vCPUs, no disk yet, logs under `target/vm-logs`.
    pub fn new(name: &str, arch: Arch) -> Self {
        VmBuilder {
            name: name.to_owned(),
            arch,
            accel: Accel::Tcg,
            memory_mib: 1024,
            cpus: 2,
            boot: Boot::Uefi,
            disk: None,
            disk_size: None,
            work_dir: None,
            forward_api: false,
            guestfwd: Vec::new(),
            user_net: None,
            smbios_system: None,
            user_data: None,
            extra_drives: Vec::new(),
            storage: Storage::VirtioBlk,
            nic: "virtio-net-pci",
            watchdog: false,
            second_nic: false,
            log_dir: PathBuf::from("target/vm-logs"),
            keep_log: false,
            quiet: false,
            resume: false,
            cache: "unsafe",
            tap: None,
            rtc_base: None,
        }
    }

    /// Attach the NIC to a TAP device in a network namespace instead of
    /// QEMU's user network (no API forward or guestfwd there).
    pub fn tap(mut self, tap: TapNet) -> Self {
        self.tap = Some(tap);
        self
    }

    /// Start the guest's RTC at `base` (`2015-06-01T00:00:00`, UTC).
    pub fn rtc_base(mut self, base: &str) -> Self {
        self.rtc_base = Some(base.to_owned());
        self
    }

    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    pub fn boot(mut self, boot: Boot) -> Self {
        self.boot = boot;
        self
    }

    /// Attaches `image` (raw) as a virtio-blk disk through a qcow2 overlay,
    /// so the image itself is never written.
    pub fn disk(mut self, image: &Path) -> Self {
        self.disk = Some(image.to_owned());
        self
    }

    /// Makes the overlay (the guest's disk) `bytes` large.
    pub fn disk_size(mut self, bytes: u64) -> Self {
        self.disk_size = Some(bytes);
        self
    }

    /// Keeps overlay and firmware vars in `dir` (created if missing)
    /// instead of a temporary directory removed on drop.
    pub fn work_dir(mut self, dir: &Path) -> Self {
        self.work_dir = Some(dir.to_owned());
        self
    }

    /// With [`VmBuilder::work_dir`]: keeps the overlay and firmware vars
    /// already there (a VM started again after a power cut) instead of
    /// starting from fresh copies.
    pub fn resume(mut self, resume: bool) -> Self {
        self.resume = resume;
        self
    }

    /// The disk's cache mode: `unsafe` (default, fastest: guest flushes are
    /// ignored) or `writeback` (flushes reach the host file, so killing
    /// QEMU is a fair power cut).
    pub fn cache(mut self, mode: &'static str) -> Self {
        self.cache = mode;
        self
    }

    /// Forwards a free port on 127.0.0.1 to the agent's API (guest port 9465).
    pub fn forward_api(mut self) -> Self {
        self.forward_api = true;
        self
    }

    pub fn guestfwd(mut self, rule: GuestFwd) -> Self {
        self.guestfwd.push(rule);
        self
    }

    /// How the boot disk is attached (default virtio-blk).
    pub fn storage(mut self, storage: Storage) -> Self {
        self.storage = storage;
        self
    }

    /// The NIC's QEMU device model (default `virtio-net-pci`), e.g. `e1000e`.
    pub fn nic(mut self, model: &'static str) -> Self {
        self.nic = model;
        self
    }

    /// Attaches `image` (raw) read-only as another virtio-blk disk, e.g. a
    /// `CIDATA` volume.
    pub fn extra_drive(mut self, image: &Path) -> Self {
        self.extra_drives.push(image.to_owned());
        self
    }

    /// The user network's prefix and the host's address in it (QEMU's
    /// `net=` and `host=`), e.g. `169.254.0.0/16` and `169.254.0.2` for a
    /// cloud's link-local metadata address.
    pub fn user_net(mut self, net: &str, host: &str) -> Self {
        self.user_net = Some((net.to_owned(), host.to_owned()));
        self
    }

    /// SMBIOS system (type 1) fields the guest reads from
    /// `/sys/class/dmi/id`, e.g. `manufacturer=Amazon EC2`.
    pub fn smbios_system(mut self, fields: &str) -> Self {
        self.smbios_system = Some(fields.to_owned());
        self
    }

    /// Hands `data` to the guest as fw_cfg `opt/ballast/user-data`.
    pub fn user_data(mut self, data: &[u8]) -> Self {
        self.user_data = Some(data.to_owned());
        self
    }

    /// Adds a second NIC of the same model on a user network of its own
    /// (`restrict=on`, nothing forwarded): eth1, for bonds.
    pub fn second_nic(mut self) -> Self {
        self.second_nic = true;
        self
    }

    /// Adds an i6300esb watchdog that resets the guest when it fires.
    pub fn watchdog(mut self) -> Self {
        self.watchdog = true;
        self
    }

    pub fn log_dir(mut self, dir: &Path) -> Self {
        self.log_dir = dir.to_owned();
        self
    }

    /// Keeps the serial log even when the VM's test passes.
    pub fn keep_log(mut self, keep: bool) -> Self {
        self.keep_log = keep;
        self
    }

    /// Prints no progress lines.
    pub fn quiet(mut self, quiet: bool) -> Self {
        self.quiet = quiet;
        self
    }

    fn io_err(&self, what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VmError {
        let vm = self.name.clone();
        let path = path.to_owned();
        move |source| VmError::Io {
            vm,
            what,
            path,
            source,
        }
    }

    /// Prepares the work directory (overlay, firmware vars, user-data) and
    /// returns the command line.
    pub fn command(&self, console: Console) -> Result<QemuCommand, VmError> {
        let (temp, work_dir) = match &self.work_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(self.io_err("creating", dir))?;
                (None, dir.clone())
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix(&format!("ballast-vm-{}-", self.name))
                    .tempdir()
                    .map_err(
                        self.io_err("creating a temporary directory in", &std::env::temp_dir()),
                    )?;
                let p = t.path().to_owned();
                (Some(t), p)
            }
        };
        let work_dir =
            std::path::absolute(&work_dir).map_err(self.io_err("resolving", &work_dir))?;
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| (*s).to_owned()));

        let program = match self.arch {
            Arch::X86_64 => {
                push(&["-M", "q35"]);
                "qemu-system-x86_64"
            }
            Arch::Aarch64 => {
                push(&["-M", "virt"]);
                // pauth-impdef: QEMU's own pointer-authentication hash instead
                // of QARMA, far cheaper under TCG; the guest cannot tell.
                match self.accel {
                    Accel::Tcg => push(&["-cpu", "max,pauth-impdef=on"]),
                    Accel::Kvm => push(&["-cpu", "host"]),
                }
                "qemu-system-aarch64"
            }
        };
        push(&["-accel", self.accel.as_str()]);
        push(&[
            "-m",
            &self.memory_mib.to_string(),
            "-smp",
            &self.cpus.to_string(),
        ]);
        push(&["-nodefaults", "-display", "none"]);
        match console {
            Console::Capture => push(&["-serial", "stdio", "-monitor", "none"]),
            Console::Interactive => push(&["-serial", "mon:stdio"]),
        }

        match &self.boot {
            Boot::Uefi => {
                let fw = Firmware::for_arch(self.arch);
                for f in [&fw.code, &fw.vars_template] {
                    if !f.exists() {
                        return Err(VmError::Firmware(f.clone()));
                    }
                }
                let code = match self.arch {
                    Arch::X86_64 => fw.code.clone(),
                    Arch::Aarch64 => {
                        let size = disk::file_size(&fw.code).map_err(|source| VmError::Disk {
                            vm: self.name.clone(),
                            source,
                        })?;
                        if size == AAVMF_FLASH_SIZE {
                            fw.code.clone()
                        } else {
                            let padded = work_dir.join("AAVMF_CODE.fd");
                            self.copy_padded(&fw.code, &padded)?;
                            padded
                        }
                    }
                };
                let vars = work_dir.join(match self.arch {
                    Arch::X86_64 => "OVMF_VARS_4M.fd",
                    Arch::Aarch64 => "AAVMF_VARS.fd",
                });
                // A fresh variable store per VM: boot entries and boot
                // counters must not leak between tests.
                if !(self.resume && vars.exists()) {
                    self.copy_padded(&fw.vars_template, &vars)?;
                }
                push(&[
                    "-drive",
                    &format!(
                        "if=pflash,format=raw,unit=0,readonly=on,file={}",
                        code.display()
                    ),
                    "-drive",
                    &format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
                ]);
            }
            Boot::Direct {
                kernel,
                initrd,
                cmdline,
            } => {
                let kernel =
                    std::path::absolute(kernel).map_err(self.io_err("resolving", kernel))?;
                let initrd =
                    std::path::absolute(initrd).map_err(self.io_err("resolving", initrd))?;
                push(&["-kernel", &kernel.to_string_lossy()]);
                push(&["-initrd", &initrd.to_string_lossy()]);
                push(&["-append", cmdline]);
            }
        }

        if let Some(image) = &self.disk {
            let overlay = work_dir.join("overlay.qcow2");
            if !(self.resume && overlay.exists()) {
                if overlay.exists() {
                    std::fs::remove_file(&overlay).map_err(self.io_err("removing", &overlay))?;
                }
                disk::create_overlay(image, &overlay, self.disk_size).map_err(|source| {
                    VmError::Disk {
                        vm: self.name.clone(),
                        source,
                    }
                })?;
            }
            push(&[
                "-drive",
                &format!(
                    "if=none,id=disk0,format=qcow2,cache={},discard=unmap,file={}",
                    self.cache,
                    overlay.display()
                ),
            ]);
            // bootindex only matters to firmware; with -kernel, QEMU
            // itself takes index 0.
            let bootindex = match self.boot {
                Boot::Uefi => ",bootindex=0",
                Boot::Direct { .. } => "",
            };
            match self.storage {
                Storage::VirtioBlk => {
                    push(&["-device", &format!("virtio-blk-pci,drive=disk0{bootindex}")])
                }
                Storage::Nvme => push(&[
                    "-device",
                    &format!("nvme,drive=disk0,serial=ballast-nvme0{bootindex}"),
                ]),
                Storage::Ahci => push(&[
                    "-device",
                    "ahci,id=sata0",
                    "-device",
                    &format!("ide-hd,drive=disk0,bus=sata0.0{bootindex}"),
                ]),
            }
        }

        for (i, image) in self.extra_drives.iter().enumerate() {
            push(&[
                "-drive",
                &format!(
                    "if=none,id=extra{i},format=raw,readonly=on,file={}",
                    image.display()
                ),
                "-device",
                &format!("virtio-blk-pci,drive=extra{i}"),
            ]);
        }

        let api_port = if self.forward_api {
            Some(free_port()?)
        } else {
            None
        };
        if let Some(tap) = &self.tap {
            push(&[
                "-netdev",
                &format!("tap,id=net0,ifname={},script=no,downscript=no", tap.ifname),
                "-device",
                &format!("{},netdev=net0,mac={},romfile=", self.nic, tap.mac),
            ]);
        } else {
            let mut netdev = String::from("user,id=net0,restrict=on");
            if let Some((net, host)) = &self.user_net {
                netdev.push_str(&format!(",net={net},host={host}"));
            }
            if let Some(port) = api_port {
                netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{port}-:{API_GUEST_PORT}"));
            }
            for g in &self.guestfwd {
                netdev.push_str(&format!(
                    ",guestfwd=tcp:{}-cmd:socat - TCP:127.0.0.1:{}",
                    g.guest_addr, g.host_port
                ));
            }
            push(&[
                "-netdev",
                &netdev,
                "-device",
                &format!("{},netdev=net0,romfile=", self.nic),
            ]);
        }
        if self.second_nic {
            push(&[
                "-netdev",
                "user,id=net1,restrict=on",
                "-device",
                &format!("{},netdev=net1,romfile=", self.nic),
            ]);
        }
        if let Some(base) = &self.rtc_base {
            push(&["-rtc", &format!("base={base},clock=host")]);
        }

        if let Some(data) = &self.user_data {
            let path = work_dir.join("user-data.toml");
            std::fs::write(&path, data).map_err(self.io_err("writing", &path))?;
            push(&[
                "-fw_cfg",
                &format!("name={USER_DATA_FW_CFG},file={}", path.display()),
            ]);
        }
        if let Some(fields) = &self.smbios_system {
            push(&["-smbios", &format!("type=1,{fields}")]);
        }
        if self.watchdog {
            push(&["-device", "i6300esb", "-action", "watchdog=reset"]);
        }

        // In a lab, QEMU runs inside its namespace; `ip netns exec` execs
        // it, so the child's pid is QEMU's.
        let (program, a) = match &self.tap {
            Some(tap) => {
                let mut wrapped: Vec<String> = ["netns", "exec", tap.netns.as_str(), program]
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect();
                wrapped.extend(a);
                ("ip", wrapped)
            }
            None => (program, a),
        };
        Ok(QemuCommand {
            program: program.to_owned(),
            args: a,
            api_port,
            work_dir,
            _temp: temp,
        })
    }

    /// Copies a firmware file; on aarch64 pads it to the 64 MiB the `virt`
    /// machine's flash needs.
    fn copy_padded(&self, src: &Path, dst: &Path) -> Result<(), VmError> {
        std::fs::copy(src, dst).map_err(self.io_err("copying firmware to", dst))?;
        if self.arch == Arch::Aarch64 {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(dst)
                .map_err(self.io_err("opening", dst))?;
            let len = f.metadata().map_err(self.io_err("reading", dst))?.len();
            if len < AAVMF_FLASH_SIZE {
                f.set_len(AAVMF_FLASH_SIZE)
                    .map_err(self.io_err("padding", dst))?;
            }
        }
        Ok(())
    }

    /// Starts the VM with its serial console captured.
    pub fn spawn(self) -> Result<Vm, VmError> {
        let qemu = self.command(Console::Capture)?;
        std::fs::create_dir_all(&self.log_dir).map_err(self.io_err("creating", &self.log_dir))?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let log_path = self
            .log_dir
            .join(format!("{}-{}-{stamp}.log", self.name, self.arch));
        let mut log = File::create(&log_path).map_err(self.io_err("creating", &log_path))?;
        let _ = writeln!(log, "# {}\n", qemu.shell_line());
        let stderr_path = qemu.work_dir.join("qemu-stderr.log");
        let stderr = File::create(&stderr_path).map_err(self.io_err("creating", &stderr_path))?;

        let started = Instant::now();
        let mut child = qemu
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|source| VmError::Spawn {
                vm: self.name.clone(),
                program: qemu.program.clone(),
                source,
            })?;
        let stdout = child.stdout.take();
        let tail = Arc::new(Mutex::new(TailBuf::default()));
        let (tx, rx) = mpsc::channel();
        let reader = stdout.map(|out| {
            let tail = Arc::clone(&tail);
            std::thread::spawn(move || read_serial(out, log, tail, tx, started))
        });

        let vm = Vm {
            name: self.name,
            arch: self.arch,
            pid: child.id(),
            child,
            started,
            events: rx,
            tail,
            seen: Vec::new(),
            log_path,
            stderr_path,
            failed: false,
            keep_log: self.keep_log,
            quiet: self.quiet,
            api_port: qemu.api_port,
            reader,
            qemu,
        };
        vm.progress(&format!(
            "started QEMU (pid {}, {})",
            vm.pid,
            self.accel.as_str()
        ));
        Ok(vm)
    }
}

fn free_port() -> Result<u16, VmError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(VmError::Port)?;
    Ok(l.local_addr().map_err(VmError::Port)?.port())
}

enum SerialMsg {
    Event(Event),
    Malformed(EventError),
}

/// The console's last lines, and the line being written (firmware screens
/// often go a long time without a newline).
#[derive(Debug, Default)]
struct TailBuf {
    lines: VecDeque<String>,
    partial: Vec<u8>,
}

impl TailBuf {
    fn text(&self) -> String {
        let mut out: Vec<String> = self.lines.iter().cloned().collect();
        if !self.partial.is_empty() {
            out.push(events::clean_line(&self.partial));
        }
        out.join("\n")
    }
}

/// Longest unfinished line kept for the tail.
const PARTIAL_MAX: usize = 4096;

fn read_serial<R: Read, W: Write>(
    mut out: R,
    mut log: W,
    tail: Arc<Mutex<TailBuf>>,
    tx: mpsc::Sender<SerialMsg>,
    started: Instant,
) {
    let mut chunk = [0u8; 4096];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match out.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let _ = log.write_all(&chunk[..n]);
        pending.extend_from_slice(&chunk[..n]);
        let mut lines = Vec::new();
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let rest = pending.split_off(nl + 1);
            lines.push(events::clean_line(&pending));
            pending = rest;
        }
        if pending.len() > PARTIAL_MAX {
            pending.drain(..pending.len() - PARTIAL_MAX);
        }
        if let Ok(mut t) = tail.lock() {
            for line in &lines {
                if t.lines.len() == TAIL_LINES {
                    t.lines.pop_front();
                }
                t.lines.push_back(line.clone());
            }
            t.partial.clone_from(&pending);
        }
        for line in lines {
            let msg = match events::parse_line(&line) {
                None => continue,
                Some(Ok(mut ev)) => {
                    ev.host_elapsed = Some(started.elapsed());
                    SerialMsg::Event(ev)
                }
                Some(Err(e)) => SerialMsg::Malformed(e),
            };
            // Keep draining the console even when nobody listens any more:
            // a full pipe would stall the guest.
            let _ = tx.send(msg);
        }
    }
    let _ = log.flush();
}

/// A running VM. Dropping it kills QEMU (by its PID) and removes its work
/// files; the serial log stays when a wait failed or [`Vm::fail`] was called.
#[derive(Debug)]
pub struct Vm {
    name: String,
    arch: Arch,
    pid: u32,
    child: Child,
    started: Instant,
    events: Receiver<SerialMsg>,
    tail: Arc<Mutex<TailBuf>>,
    seen: Vec<Event>,
    log_path: PathBuf,
    stderr_path: PathBuf,
    failed: bool,
    keep_log: bool,
    quiet: bool,
    api_port: Option<u16>,
    reader: Option<JoinHandle<()>>,
    qemu: QemuCommand,
}

impl std::fmt::Debug for SerialMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SerialMsg::Event(e) => write!(f, "Event({})", e.name),
            SerialMsg::Malformed(e) => write!(f, "Malformed({e})"),
        }
    }
}

impl Vm {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Time since QEMU started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Host port forwarded to the agent's API, if the builder asked for one.
    pub fn api_port(&self) -> Option<u16> {
        self.api_port
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The command line this VM runs.
    pub fn qemu_command(&self) -> &QemuCommand {
        &self.qemu
    }

    /// Every event read so far, in order.
    pub fn events_seen(&self) -> &[Event] {
        &self.seen
    }

    /// Prints one progress line: VM, arch, elapsed seconds, step.
    pub fn progress(&self, step: &str) {
        if !self.quiet {
            eprintln!(
                "  [{} {} {:6.1}s] {step}",
                self.name,
                self.arch,
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    /// The last console lines, joined.
    pub fn tail(&self) -> String {
        self.tail.lock().map(|t| t.text()).unwrap_or_default()
    }

    fn serial_tail(&self) -> Box<SerialTail> {
        Box::new(SerialTail {
            vm: self.name.clone(),
            log: self.log_path.clone(),
            tail: self.tail(),
        })
    }

    /// Marks the VM failed (its log is kept) and returns an error carrying
    /// `message` and the console tail.
    pub fn fail(&mut self, message: impl Into<String>) -> VmError {
        self.failed = true;
        VmError::Check {
            message: message.into(),
            at: self.serial_tail(),
        }
    }

    /// Waits for the next event called `name`; earlier events of other
    /// names are recorded and skipped.
    pub fn wait_for_event(&mut self, name: &str, timeout: Duration) -> Result<Event, VmError> {
        self.wait_for_any(&[name], timeout)
    }

    /// Waits for the next event whose name is one of `names`.
    pub fn wait_for_any(&mut self, names: &[&str], timeout: Duration) -> Result<Event, VmError> {
        match self.try_wait_for_any(names, timeout)? {
            Some(ev) => Ok(ev),
            None => {
                self.failed = true;
                Err(VmError::Timeout {
                    wanted: names.join(" or "),
                    timeout,
                    at: self.serial_tail(),
                })
            }
        }
    }

    /// Like [`Vm::wait_for_any`], but running out of time is an answer
    /// (`None`), not a failure: for checks that something does not happen.
    pub fn try_wait_for_any(
        &mut self,
        names: &[&str],
        timeout: Duration,
    ) -> Result<Option<Event>, VmError> {
        if let Some(unknown) = names.iter().find(|n| !events::is_known(n)) {
            return Err(VmError::UnknownEvent((*unknown).to_owned()));
        }
        let wanted = names.join(" or ");
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(SerialMsg::Event(ev)) => {
                    self.progress(&format!("event {} {}", ev.name, ev.json()));
                    self.seen.push(ev.clone());
                    if names.contains(&ev.name.as_str()) {
                        return Ok(Some(ev));
                    }
                }
                Ok(SerialMsg::Malformed(e)) => {
                    self.progress(&format!("warning: malformed event line: {e}"));
                }
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => {
                    self.failed = true;
                    // The console closed: QEMU exited (or is about to).
                    let status = self.wait_exit(Duration::from_secs(5));
                    let stderr = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
                    return Err(VmError::Exited {
                        wanted,
                        status: status
                            .map_or_else(|| "still running".to_owned(), |s| s.to_string()),
                        stderr: stderr.trim().to_owned(),
                        at: self.serial_tail(),
                    });
                }
            }
        }
    }

    /// Waits up to `timeout` for QEMU to exit by itself (e.g. a guest
    /// poweroff); returns its status, or `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => return None,
            }
        }
    }

    /// Kills QEMU (SIGKILL to its PID) and waits for it.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.progress("stopped QEMU");
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
        if self.failed || self.keep_log || std::thread::panicking() {
            if !self.quiet {
                eprintln!(
                    "  [{} {}] serial log kept: {}",
                    self.name,
                    self.arch,
                    self.log_path.display()
                );
            }
        } else {
            let _ = std::fs::remove_file(&self.log_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(b: &VmBuilder) -> (QemuCommand, String) {
        let c = b.command(Console::Capture).unwrap();
        let line = c.shell_line();
        (c, line)
    }

    #[test]
    fn direct_boot_command_line_has_the_expected_devices() {
        let dir = tempfile::tempdir().unwrap();
        let b = VmBuilder::new("t", Arch::Aarch64)
            .boot(Boot::Direct {
                kernel: "/k".into(),
                initrd: "/i".into(),
                cmdline: "console=ttyAMA0 panic=10".into(),
            })
            .work_dir(dir.path())
            .forward_api()
            .guestfwd(GuestFwd {
                guest_addr: "10.0.2.100:80".into(),
                host_port: 8080,
            })
            .user_data(b"[api]\n")
            .watchdog();
        let (c, line) = args(&b);
        assert_eq!(c.program, "qemu-system-aarch64");
        assert!(
            line.contains("-M virt -cpu max,pauth-impdef=on -accel tcg -m 1024 -smp 2"),
            "{line}"
        );
        assert!(
            line.contains("-kernel /k -initrd /i -append 'console=ttyAMA0 panic=10'"),
            "{line}"
        );
        let port = c.api_port.unwrap();
        assert!(
            line.contains(&format!("hostfwd=tcp:127.0.0.1:{port}-:9465")),
            "{line}"
        );
        assert!(line.contains("restrict=on"), "{line}");
        assert!(
            line.contains("guestfwd=tcp:10.0.2.100:80-cmd:socat - TCP:127.0.0.1:8080"),
            "{line}"
        );
        assert!(
            line.contains("-fw_cfg name=opt/ballast/user-data,file="),
            "{line}"
        );
        assert!(line.contains("-device i6300esb"), "{line}");
        assert!(!line.contains("pflash"), "{line}");
        assert_eq!(
            std::fs::read(dir.path().join("user-data.toml")).unwrap(),
            b"[api]\n"
        );
    }

    #[test]
    fn a_lab_vm_runs_in_its_namespace_on_the_tap_device() {
        let dir = tempfile::tempdir().unwrap();
        let b = VmBuilder::new("t", Arch::X86_64)
            .boot(Boot::Direct {
                kernel: "/k".into(),
                initrd: "/i".into(),
                cmdline: "console=ttyS0".into(),
            })
            .work_dir(dir.path())
            .tap(TapNet {
                netns: "ballast-lab-1-0".into(),
                ifname: "tap0".into(),
                mac: "52:54:00:77:00:10".into(),
            })
            .rtc_base("2015-06-01T00:00:00");
        let (c, line) = args(&b);
        assert_eq!(c.program, "ip");
        assert!(
            line.starts_with("ip netns exec ballast-lab-1-0 qemu-system-x86_64 "),
            "{line}"
        );
        assert!(
            line.contains("-netdev tap,id=net0,ifname=tap0,script=no,downscript=no"),
            "{line}"
        );
        assert!(
            line.contains("virtio-net-pci,netdev=net0,mac=52:54:00:77:00:10,romfile="),
            "{line}"
        );
        assert!(!line.contains("user,id=net0"), "{line}");
        assert!(
            line.contains("-rtc base=2015-06-01T00:00:00,clock=host"),
            "{line}"
        );
    }

    #[test]
    fn nvme_and_ahci_disks_and_other_nics() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
        let direct = || Boot::Direct {
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: "console=ttyS0".into(),
        };
        let b = VmBuilder::new("t", Arch::X86_64)
            .boot(direct())
            .work_dir(dir.path())
            .disk(&image)
            .storage(Storage::Nvme)
            .nic("e1000e");
        let (_c, line) = args(&b);
        assert!(
            line.contains("-device nvme,drive=disk0,serial=ballast-nvme0 "),
            "{line}"
        );
        assert!(
            line.contains("-device e1000e,netdev=net0,romfile="),
            "{line}"
        );
        assert!(!line.contains("virtio-blk"), "{line}");
        let b = VmBuilder::new("t", Arch::X86_64)
            .boot(direct())
            .work_dir(dir.path())
            .disk(&image)
            .storage(Storage::Ahci)
            .nic("igb");
        let (_c, line) = args(&b);
        assert!(
            line.contains("-device ahci,id=sata0 -device ide-hd,drive=disk0,bus=sata0.0 "),
            "{line}"
        );
        assert!(line.contains("-device igb,netdev=net0"), "{line}");
    }

    #[test]
    fn uefi_boot_uses_a_private_vars_copy() {
        let fw = Firmware::for_arch(Arch::X86_64);
        assert!(
            fw.code.exists(),
            "{} is missing: run `cargo xtask deps`",
            fw.code.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let b = VmBuilder::new("t", Arch::X86_64).work_dir(dir.path());
        let (_c, line) = args(&b);
        assert!(line.contains("-M q35"), "{line}");
        assert!(
            line.contains("readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"),
            "{line}"
        );
        let vars = dir.path().join("OVMF_VARS_4M.fd");
        assert!(
            line.contains(&format!("unit=1,file={}", vars.display())),
            "{line}"
        );
        assert!(vars.exists());
    }

    #[test]
    fn serial_reader_splits_lines_logs_bytes_and_keeps_the_partial_line() {
        let console: &[u8] = b"\x1b[2JBdsDxe: loading\r\nBALLAST-EVENT {\"event\":\"early-boot\",\"ms\":7}\r\nBALLAST-EVENT {bad\nhalf a line";
        let tail = Arc::new(Mutex::new(TailBuf::default()));
        let (tx, rx) = mpsc::channel();
        let mut log = Vec::new();
        read_serial(console, &mut log, Arc::clone(&tail), tx, Instant::now());
        assert_eq!(log, console);
        let msgs: Vec<SerialMsg> = rx.try_iter().collect();
        assert_eq!(msgs.len(), 2);
        assert!(
            matches!(&msgs[0], SerialMsg::Event(e) if e.name == "early-boot" && e.host_elapsed.is_some())
        );
        assert!(matches!(&msgs[1], SerialMsg::Malformed(_)));
        let text = tail.lock().unwrap().text();
        assert!(text.starts_with("[2JBdsDxe: loading\n"), "{text:?}");
        assert!(text.ends_with("\nhalf a line"), "{text:?}");
    }

    #[test]
    fn shell_quoting_keeps_words_together() {
        assert_eq!(shell_quote("-m"), "-m");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
