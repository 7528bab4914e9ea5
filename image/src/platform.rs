//! Image flavours by where the image runs (`--platform qemu|metal|cloud`):
//! the kernel flavour and the hardware drivers each ships. Drivers are
//! never loaded from a fixed list: the initrd carries the storage drivers
//! and the usr image every driver, each with a `modules.alias` filtered to
//! the modules shipped, and the agent loads what the machine's devices
//! name (coldplug at boot, uevents later).
//!
//! Firmware: none is shipped. The drivers listed either need none or carry
//! it on the card (mlx5_core, bnxt_en, i40e, ixgbe, igb, e1000e); the two
//! that can load firmware from disk find it only in Debian's non-free
//! firmware packages, not in its free archive: `ice` (the DDP package in
//! firmware-misc-nonfree; without it the NIC runs in safe mode, one queue)
//! and `r8169` (rtl_nic patches in firmware-realtek; most chips work
//! without them).

use crate::apt::KernelFlavor;

/// Where an image runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Platform {
    /// QEMU/KVM with virtio devices (the test lab): the small cloud kernel.
    #[default]
    Qemu,
    /// Bare-metal servers: the generic kernel with storage, NIC and
    /// watchdog drivers.
    Metal,
    /// Public clouds (EC2's Nitro, Google's gVNIC, virtio clouds): the cloud
    /// kernel.
    Cloud,
}

/// Drivers every platform carries: QEMU's paravirtual disks (virtio-scsi
/// disks need sd_mod) and its firmware configuration device (user-data in
/// the test lab).
const VIRTIO_STORAGE: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "qemu_fw_cfg",
];

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Qemu => "qemu",
            Platform::Metal => "metal",
            Platform::Cloud => "cloud",
        }
    }

    /// The kernel flavour unless `--kernel` says otherwise.
    pub fn kernel(self) -> KernelFlavor {
        match self {
            Platform::Qemu | Platform::Cloud => KernelFlavor::Cloud,
            Platform::Metal => KernelFlavor::Generic,
        }
    }

    /// Drivers the initrd ships to reach the boot disk (and the usr image
    /// too, for disks added later). Shipped when the kernel has them.
    pub fn storage_drivers(self) -> Vec<&'static str> {
        let extra: &[&str] = match self {
            Platform::Qemu => &[],
            // ahci's and usb-storage's disks are SCSI disks (sd_mod is in
            // every platform's list); xhci and usb-storage (and uas) to boot
            // from a USB stick.
            Platform::Metal => &["nvme", "ahci", "xhci_pci", "usb_storage", "uas"],
            Platform::Cloud => &["nvme"],
        };
        VIRTIO_STORAGE.iter().chain(extra).copied().collect()
    }

    /// NIC and watchdog drivers, and bonding and 802.1Q (loaded by the
    /// agent when `[network]` configures a bond or VLAN), in the usr image
    /// only (the initrd needs no network). Shipped when the kernel has them.
    pub fn runtime_drivers(self) -> &'static [&'static str] {
        match self {
            Platform::Qemu => &["virtio_net", "i6300esb", "bonding", "8021q"],
            Platform::Metal => &[
                "e1000e",
                "igb",
                "ixgbe",
                "i40e",
                "ice",
                "mlx5_core",
                "bnxt_en",
                "r8169",
                "ena",
                "gve",
                "vmxnet3",
                "virtio_net",
                "iTCO_wdt",
                "sp5100_tco",
                "sbsa_gwdt",
                "i6300esb",
                "bonding",
                "8021q",
            ],
            Platform::Cloud => &["ena", "gve", "virtio_net", "bonding", "8021q"],
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "qemu" => Ok(Platform::Qemu),
            "metal" => Ok(Platform::Metal),
            "cloud" => Ok(Platform::Cloud),
            _ => Err(format!(
                "unknown platform {s:?}: expected qemu, metal or cloud"
            )),
        }
    }
}

/// `modules.alias` text keeping only the lines for `modules` (names as
/// [`crate::kmod::module_name`] spells them), in the original order, so the
/// agent never resolves a device to a module the image does not carry.
pub fn alias_subset<S: AsRef<str>>(alias: &str, modules: &[S]) -> String {
    let wanted: std::collections::BTreeSet<String> = modules
        .iter()
        .map(|m| crate::kmod::normalize(m.as_ref()))
        .collect();
    let mut out = String::new();
    for line in alias.lines() {
        let mut fields = line.split_ascii_whitespace();
        if let (Some("alias"), Some(_), Some(module), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        {
            if wanted.contains(&crate::kmod::normalize(module)) {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_and_pick_their_kernel() {
        for p in [Platform::Qemu, Platform::Metal, Platform::Cloud] {
            assert_eq!(p.as_str().parse::<Platform>(), Ok(p));
        }
        assert!("azure".parse::<Platform>().unwrap_err().contains("qemu"));
        assert_eq!(Platform::Metal.kernel(), KernelFlavor::Generic);
        assert_eq!(Platform::Cloud.kernel(), KernelFlavor::Cloud);
        assert!(Platform::Metal.storage_drivers().contains(&"nvme"));
        assert!(Platform::Metal.runtime_drivers().contains(&"e1000e"));
        assert!(!Platform::Qemu.storage_drivers().contains(&"nvme"));
        assert_eq!(
            Platform::Cloud.runtime_drivers(),
            ["ena", "gve", "virtio_net", "bonding", "8021q"]
        );
        for p in [Platform::Qemu, Platform::Metal, Platform::Cloud] {
            assert!(p.runtime_drivers().contains(&"bonding"), "{p}");
            assert!(p.runtime_drivers().contains(&"8021q"), "{p}");
        }
    }

    #[test]
    fn alias_subset_keeps_shipped_modules_only() {
        let alias = "\
# Aliases extracted from modules themselves.
alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci
alias scsi:t-0x00* sd_mod
alias pci:v*d*sv*sd*bc01sc08i02* nvme
alias usb:v13FDp3940d0[0-2]*dc*dsc*dp*ic*isc*ip*in* usb_storage
";
        assert_eq!(
            alias_subset(alias, &["virtio-pci", "nvme"]),
            "alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci\nalias pci:v*d*sv*sd*bc01sc08i02* nvme\n"
        );
        assert_eq!(alias_subset(alias, &[] as &[&str]), "");
    }
}
