//! Drivers by hardware, as udev's coldplug does: every device the kernel
//! knows has a `modalias` file under `/sys/devices`; each is resolved
//! through the kernel's `modules.alias` (shell globs, as depmod writes them)
//! and the matching modules are loaded with [`ModuleIndex`], dependencies
//! first and built-ins skipped. Loading a bus driver makes new devices
//! appear (PCI -> NVMe or AHCI -> SCSI disk), so the walk repeats until a
//! round finds nothing new. [`Drivers`] keeps what was tried, so that the
//! run-time uevent listener ([`crate::boot::hotplug`]) shares it.
//!
//! Pure parts (the alias table, the sysfs walk over any directory, the
//! rounds) are tested against a fixture tree; [`KernelLoader`] is the only
//! part that calls the kernel.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use glob::{MatchOptions, Pattern};

use crate::boot::modules::{ModuleError, ModuleIndex};

/// The alias file depmod writes beside `modules.dep`.
pub const MODULES_ALIAS: &str = "modules.alias";
/// Upper bound on coldplug rounds: each round loads drivers for the devices
/// the previous one made appear; real bus chains are 3-4 deep.
const MAX_ROUNDS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ColdplugError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel modules in {dir}")]
    Index {
        dir: PathBuf,
        #[source]
        source: ModuleError,
    },
}

/// One `alias PATTERN MODULE` line.
#[derive(Debug)]
struct Alias {
    pattern: Pattern,
    module: String,
}

/// A `modules.alias` line that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedLine {
    pub line: usize,
    pub reason: String,
}

/// The parsed `modules.alias` of one kernel.
#[derive(Debug, Default)]
pub struct AliasTable {
    aliases: Vec<Alias>,
    skipped: Vec<SkippedLine>,
}

/// fnmatch(3) without flags, as kmod matches aliases: `/` and leading dots
/// are ordinary characters.
const FNMATCH: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: false,
    require_literal_leading_dot: false,
};

impl AliasTable {
    /// Reads `dir/modules.alias`.
    pub fn load(dir: &Path) -> Result<Self, ColdplugError> {
        let path = dir.join(MODULES_ALIAS);
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ColdplugError::Read { path, source })?;
        Ok(Self::parse(&text))
    }

    /// Parses `modules.alias` text. A malformed line (wrong field count, a
    /// pattern that is not a valid glob) is skipped with a warning: one bad
    /// line must not cost the node every other driver.
    pub fn parse(text: &str) -> Self {
        let mut table = AliasTable::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_ascii_whitespace().collect();
            let skip = |reason: String| SkippedLine {
                line: i + 1,
                reason,
            };
            let entry = match fields.as_slice() {
                ["alias", pattern, module] => Pattern::new(pattern)
                    .map(|pattern| Alias {
                        pattern,
                        module: module.replace('-', "_"),
                    })
                    .map_err(|e| skip(format!("pattern {pattern:?}: {e}"))),
                _ => Err(skip(format!("{line:?} is not `alias PATTERN MODULE`"))),
            };
            match entry {
                Ok(alias) => table.aliases.push(alias),
                Err(skipped) => {
                    tracing::warn!(line = skipped.line, reason = %skipped.reason, "modules.alias line skipped");
                    table.skipped.push(skipped);
                }
            }
        }
        table
    }

    pub fn len(&self) -> usize {
        self.aliases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.aliases.is_empty()
    }

    /// Lines left out by [`AliasTable::parse`].
    pub fn skipped(&self) -> &[SkippedLine] {
        &self.skipped
    }

    /// Modules whose aliases match `modalias`, in file order, each once.
    pub fn modules_for(&self, modalias: &str) -> Vec<&str> {
        let mut found: Vec<&str> = Vec::new();
        for alias in &self.aliases {
            if alias.pattern.matches_with(modalias, FNMATCH) && !found.contains(&&*alias.module) {
                found.push(&alias.module);
            }
        }
        found
    }
}

/// Every distinct `modalias` value under `devices` (`/sys/devices`). Never
/// follows symbolic links (sysfs is full of them, many pointing back up);
/// unreadable entries are skipped, since devices come and go during a walk.
pub fn scan_modaliases(devices: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut stack = vec![devices.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() && entry.file_name() == "modalias" {
                if let Ok(text) = std::fs::read_to_string(entry.path()) {
                    let alias = text.trim();
                    if !alias.is_empty() {
                        found.insert(alias.to_owned());
                    }
                }
            }
        }
    }
    found
}

/// Loads one module with its dependencies; the kernel side of coldplug.
pub trait ModuleLoader {
    fn load(&mut self, module: &str) -> Result<(), ModuleError>;
    /// Whether `module` is in the kernel already (loaded by the fixed
    /// list, by early boot before `switch_root`, or built in): coldplug
    /// then neither loads it again nor counts it as new, so it needs no
    /// further round and no settle pause for it.
    fn is_loaded(&self, _module: &str) -> bool {
        false
    }
}

/// Loads from `/lib/modules/<kver>` with `finit_module`, each file once.
#[derive(Debug)]
pub struct KernelLoader {
    index: ModuleIndex,
    loaded: HashSet<PathBuf>,
}

impl KernelLoader {
    pub fn new(index: ModuleIndex) -> Self {
        KernelLoader {
            index,
            loaded: HashSet::new(),
        }
    }
}

impl ModuleLoader for KernelLoader {
    fn load(&mut self, module: &str) -> Result<(), ModuleError> {
        for path in self.index.load_order(&[module])? {
            if !self.loaded.contains(&path) {
                crate::boot::modules::load_file(&path)?;
                self.loaded.insert(path);
            }
        }
        Ok(())
    }

    /// `/sys/module/<name>` exists for every loaded module (and for
    /// built-in ones with parameters): one `stat` instead of the kernel
    /// reading and checking the whole module file to answer `EEXIST`.
    fn is_loaded(&self, module: &str) -> bool {
        Path::new("/sys/module").join(module).exists()
    }
}

/// What one coldplug run or one uevent did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Devices (distinct modaliases) looked at.
    pub devices: usize,
    /// Modules loaded, in load order.
    pub loaded: Vec<String>,
    /// Modules that failed, with the error (a driver whose probe fails, a
    /// module missing from the image).
    pub failed: Vec<(String, String)>,
    /// Walks of the device tree (coldplug only).
    pub rounds: usize,
}

impl Outcome {
    fn merge(&mut self, other: Outcome) {
        self.loaded.extend(other.loaded);
        self.failed.extend(other.failed);
    }
}

/// The alias table, the loader and what was tried so far; shared by
/// coldplug and the uevent listener so that no module is tried twice.
#[derive(Debug)]
pub struct Drivers<L> {
    aliases: AliasTable,
    loader: L,
    seen_devices: HashSet<String>,
    tried_modules: HashSet<String>,
}

impl Drivers<KernelLoader> {
    /// The running kernel's tables in `dir` (`/lib/modules/<kver>`).
    pub fn for_kernel(dir: &Path) -> Result<Self, ColdplugError> {
        let aliases = AliasTable::load(dir)?;
        let index = ModuleIndex::load(dir).map_err(|source| ColdplugError::Index {
            dir: dir.to_owned(),
            source,
        })?;
        Ok(Drivers::new(aliases, KernelLoader::new(index)))
    }
}

impl<L: ModuleLoader> Drivers<L> {
    pub fn new(aliases: AliasTable, loader: L) -> Self {
        Drivers {
            aliases,
            loader,
            seen_devices: HashSet::new(),
            tried_modules: HashSet::new(),
        }
    }

    /// Loads the drivers for one device; a device seen before is skipped.
    pub fn device_added(&mut self, modalias: &str) -> Outcome {
        let mut outcome = Outcome::default();
        if !self.seen_devices.insert(modalias.to_owned()) {
            return outcome;
        }
        outcome.devices = 1;
        let modules: Vec<String> = self
            .aliases
            .modules_for(modalias)
            .into_iter()
            .map(str::to_owned)
            .collect();
        for module in modules {
            if !self.tried_modules.insert(module.clone()) || self.loader.is_loaded(&module) {
                continue;
            }
            match self.loader.load(&module) {
                Ok(()) => {
                    tracing::debug!(%module, %modalias, "driver loaded");
                    outcome.loaded.push(module);
                }
                Err(e) => {
                    let error = crate::error_chain(&e);
                    tracing::warn!(%module, %modalias, %error, "driver not loaded");
                    outcome.failed.push((module, error));
                }
            }
        }
        outcome
    }

    /// Walks `devices` and loads drivers until a walk finds no new device.
    /// `settle` is the pause after a round that loaded something: drivers
    /// that probe asynchronously (NVMe, SCSI scans) add their children a
    /// little later, and the uevent listener catches any that come later
    /// still.
    pub fn coldplug(&mut self, devices: &Path, settle: Duration) -> Outcome {
        let mut total = Outcome::default();
        for round in 1..=MAX_ROUNDS {
            total.rounds = round;
            let new: Vec<String> = scan_modaliases(devices)
                .into_iter()
                .filter(|m| !self.seen_devices.contains(m))
                .collect();
            if new.is_empty() {
                break;
            }
            total.devices += new.len();
            let mut loaded_any = false;
            for modalias in &new {
                let outcome = self.device_added(modalias);
                loaded_any |= !outcome.loaded.is_empty();
                total.merge(outcome);
            }
            if !loaded_any {
                break;
            }
            std::thread::sleep(settle);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const ALIAS: &str = include_str!("../../tests/fixtures/coldplug/modules.alias");

    // Modaliases as QEMU's devices report them.
    const VIRTIO_BLK_PCI: &str = "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00";
    const VIRTIO_BLK: &str = "virtio:d00000002v00001AF4";
    const NVME_PCI: &str = "pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02";
    const E1000E_PCI: &str = "pci:v00008086d000010D3sv00008086sd00000000bc02sc00i00";
    const AHCI_PCI: &str = "pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01";
    const SCSI_DISK: &str = "scsi:t-0x00";
    const FW_CFG: &str = "acpi:QEMU0002:";
    const CPU: &str = "cpu:type:x86,ven0000fam0006mod003F:feature:,0000,0001";

    #[test]
    fn real_aliases_resolve_qemu_devices() {
        let table = AliasTable::parse(ALIAS);
        assert!(table.skipped().is_empty(), "{:?}", table.skipped());
        assert_eq!(table.modules_for(VIRTIO_BLK_PCI), ["virtio_pci"]);
        assert_eq!(table.modules_for(VIRTIO_BLK), ["virtio_blk"]);
        assert_eq!(table.modules_for(NVME_PCI), ["nvme"]);
        assert_eq!(table.modules_for(E1000E_PCI), ["e1000e"]);
        assert_eq!(table.modules_for(AHCI_PCI), ["ahci"]);
        assert_eq!(table.modules_for(SCSI_DISK), ["sd_mod"]);
        assert_eq!(table.modules_for(FW_CFG), ["qemu_fw_cfg"]);
        assert!(table.modules_for(CPU).is_empty());
        // `scsi:t-0x01` is a tape, not a disk
        assert!(table.modules_for("scsi:t-0x01").is_empty());
    }

    #[test]
    fn bracket_ranges_match_like_fnmatch() {
        let table = AliasTable::parse(ALIAS);
        let usb = |bcd: &str| format!("usb:v13FDp3940d{bcd}dc00dsc00dp00ic08isc06ip50in00");
        assert_eq!(table.modules_for(&usb("0150")), ["uas", "usb_storage"]);
        assert_eq!(table.modules_for(&usb("0250")), ["uas", "usb_storage"]);
        assert!(table.modules_for(&usb("0350")).is_empty());
        let exact = "usb:v1645p0007d0133dc00dsc00dp00ic08isc06ip50in00";
        assert_eq!(table.modules_for(exact), ["usb_storage"]);
        let outside = "usb:v1645p0007d0134dc00dsc00dp00ic08isc06ip50in00";
        assert!(table.modules_for(outside).is_empty());
    }

    #[test]
    fn bad_lines_are_skipped_and_the_rest_kept() {
        let text = "\
alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci
alias pci:v[0-9 broken
alias virtio:d00000002v[* virtio_blk
options nvme poll_queues=2
alias scsi:t-0x00* sd-mod
";
        let table = AliasTable::parse(text);
        assert_eq!(table.len(), 2);
        let lines: Vec<usize> = table.skipped().iter().map(|s| s.line).collect();
        assert_eq!(lines, [2, 3, 4]);
        assert!(table.skipped()[1].reason.contains("virtio:d00000002v[*"));
        assert_eq!(table.modules_for(VIRTIO_BLK_PCI), ["virtio_pci"]);
        assert!(table.modules_for(VIRTIO_BLK).is_empty());
        // dashes become the kernel's underscores
        assert_eq!(table.modules_for(SCSI_DISK), ["sd_mod"]);
    }

    /// A sysfs-like tree where loading a driver makes its children appear,
    /// as the kernel does.
    struct FakeKernel {
        root: PathBuf,
        /// module -> (device path, modalias) it adds when loaded
        children: HashMap<&'static str, Vec<(&'static str, &'static str)>>,
        loaded: Vec<String>,
        broken: &'static [&'static str],
        /// In the kernel before coldplug (the fixed list, early boot).
        preloaded: Vec<&'static str>,
    }

    impl FakeKernel {
        fn add(&self, path: &str, modalias: &str) {
            let dir = self.root.join(path);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("modalias"), format!("{modalias}\n")).unwrap();
        }
    }

    impl ModuleLoader for &mut FakeKernel {
        fn load(&mut self, module: &str) -> Result<(), ModuleError> {
            if self.broken.contains(&module) {
                return Err(ModuleError::Unknown(module.to_owned()));
            }
            self.loaded.push(module.to_owned());
            for (path, modalias) in self.children.get(module).cloned().unwrap_or_default() {
                self.add(path, modalias);
            }
            Ok(())
        }

        fn is_loaded(&self, module: &str) -> bool {
            self.preloaded.contains(&module)
        }
    }

    fn machine(root: &Path) -> FakeKernel {
        let kernel = FakeKernel {
            root: root.to_owned(),
            children: HashMap::from([
                (
                    "virtio_pci",
                    vec![("pci0000:00/0000:00:02.0/virtio0", VIRTIO_BLK)],
                ),
                (
                    "ahci",
                    vec![(
                        "pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0",
                        SCSI_DISK,
                    )],
                ),
            ]),
            loaded: Vec::new(),
            broken: &["e1000e"],
            preloaded: Vec::new(),
        };
        kernel.add("pci0000:00/0000:00:02.0", VIRTIO_BLK_PCI);
        kernel.add("pci0000:00/0000:00:03.0", NVME_PCI);
        kernel.add("pci0000:00/0000:00:04.0", E1000E_PCI);
        kernel.add("pci0000:00/0000:00:1f.2", AHCI_PCI);
        kernel.add("system/cpu/cpu0", CPU);
        kernel.add("platform/QEMU0002:00", FW_CFG);
        // sysfs links point back up the tree; the walk must not follow them
        std::os::unix::fs::symlink(root.join("pci0000:00"), root.join("system/cpu/cpu0/loop"))
            .unwrap();
        kernel
    }

    #[test]
    fn coldplug_repeats_until_no_new_device_appears() {
        let dir = tempfile::tempdir().unwrap();
        let mut kernel = machine(dir.path());
        let mut drivers = Drivers::new(AliasTable::parse(ALIAS), &mut kernel);
        let outcome = drivers.coldplug(dir.path(), Duration::ZERO);
        assert_eq!(outcome.rounds, 3, "{outcome:?}");
        assert_eq!(outcome.devices, 8);
        let loaded: BTreeSet<&str> = outcome.loaded.iter().map(String::as_str).collect();
        let want: BTreeSet<&str> = [
            "virtio_pci",
            "virtio_blk",
            "nvme",
            "ahci",
            "sd_mod",
            "qemu_fw_cfg",
        ]
        .into();
        assert_eq!(loaded, want);
        assert_eq!(outcome.failed.len(), 1);
        assert_eq!(outcome.failed[0].0, "e1000e");
        // bus drivers before the drivers of the devices they found
        let at = |m: &str| outcome.loaded.iter().position(|x| x == m).unwrap();
        assert!(at("virtio_pci") < at("virtio_blk"));
        assert!(at("ahci") < at("sd_mod"));

        // a device seen before, or a module tried before, is not tried again
        assert_eq!(drivers.device_added(SCSI_DISK), Outcome::default());
        let again = drivers.device_added("virtio:d00000002v00001234");
        assert_eq!(again.devices, 1);
        assert!(again.loaded.is_empty() && again.failed.is_empty());
        drop(drivers);
        assert_eq!(kernel.loaded.len(), 6);
    }

    #[test]
    fn modules_already_in_the_kernel_are_neither_loaded_nor_new() {
        let dir = tempfile::tempdir().unwrap();
        let mut kernel = machine(dir.path());
        // Early boot loaded the virtio bus and disk drivers; the disk is there.
        kernel.preloaded = vec!["virtio_pci", "virtio_blk"];
        kernel.add("pci0000:00/0000:00:02.0/virtio0", VIRTIO_BLK);
        let mut drivers = Drivers::new(AliasTable::parse(ALIAS), &mut kernel);
        let outcome = drivers.coldplug(dir.path(), Duration::ZERO);
        assert!(
            !outcome.loaded.iter().any(|m| m.starts_with("virtio")),
            "{outcome:?}"
        );
        assert!(outcome.loaded.contains(&"sd_mod".to_owned()), "{outcome:?}");
        drop(drivers);
        assert!(!kernel.loaded.iter().any(|m| m.starts_with("virtio")));

        // Nothing new on the machine: one walk, nothing loaded, no pause.
        let dir = tempfile::tempdir().unwrap();
        let mut kernel = machine(dir.path());
        kernel.preloaded = vec![
            "virtio_pci",
            "virtio_blk",
            "nvme",
            "ahci",
            "qemu_fw_cfg",
            "e1000e",
        ];
        kernel.children.clear();
        let mut drivers = Drivers::new(AliasTable::parse(ALIAS), &mut kernel);
        let outcome = drivers.coldplug(dir.path(), Duration::from_secs(60));
        assert_eq!(outcome.rounds, 1, "{outcome:?}");
        assert!(
            outcome.loaded.is_empty() && outcome.failed.is_empty(),
            "{outcome:?}"
        );
    }

    #[test]
    fn an_empty_or_missing_tree_loads_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut kernel = machine(dir.path());
        let mut drivers = Drivers::new(AliasTable::parse(ALIAS), &mut kernel);
        let outcome = drivers.coldplug(&dir.path().join("absent"), Duration::ZERO);
        assert_eq!(outcome.devices, 0);
        assert_eq!(outcome.rounds, 1);
        assert!(outcome.loaded.is_empty());
    }
}
