//! Kernel module loading without kmod: resolves dependencies from
//! `modules.dep` and loads each module once with `finit_module`, dependencies
//! first. Built-in modules (`modules.builtin`) are skipped.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::File;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel module {0:?} is neither in modules.dep nor built in")]
    Unknown(String),
    #[error("loading kernel module {path}")]
    Load {
        path: PathBuf,
        #[source]
        source: Errno,
    },
}

/// Kernel's flag for a compressed module file it decompresses itself.
const MODULE_INIT_COMPRESSED_FILE: u32 = 4;

/// Module names compare with `-` and `_` as the same character.
fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

/// Module name of a path like `kernel/drivers/md/dm-verity.ko[.xz]`.
fn name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    normalise(stem)
}

/// The parsed `modules.dep` of one kernel.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    root: PathBuf,
    /// name -> (relative path, dependency names)
    modules: HashMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
}

impl ModuleIndex {
    /// Reads `dir/modules.dep` and, when present, `dir/modules.builtin`.
    pub fn load(dir: &Path) -> Result<Self, ModuleError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| ModuleError::Read { path, source })
        };
        let dep = read("modules.dep")?;
        let builtin = read("modules.builtin").unwrap_or_default();
        Ok(Self::parse(dir, &dep, &builtin))
    }

    pub fn parse(root: &Path, dep: &str, builtin: &str) -> Self {
        let mut modules = HashMap::new();
        for line in dep.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let deps = deps.split_ascii_whitespace().map(name_of).collect();
            modules.insert(name_of(path), (path.trim().to_owned(), deps));
        }
        let builtin = builtin
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(name_of)
            .collect();
        ModuleIndex {
            root: root.to_owned(),
            modules,
            builtin,
        }
    }

    /// The files to load for `wanted`, dependencies before dependents, each
    /// once. Built-in modules are left out.
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<PathBuf>, ModuleError> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for name in wanted {
            self.visit(&normalise(name), &mut seen, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut HashSet<String>,
        order: &mut Vec<PathBuf>,
    ) -> Result<(), ModuleError> {
        if !seen.insert(name.to_owned()) || self.builtin.contains(name) {
            return Ok(());
        }
        let (path, deps) = self
            .modules
            .get(name)
            .ok_or_else(|| ModuleError::Unknown(name.to_owned()))?;
        for dep in deps {
            self.visit(dep, seen, order)?;
        }
        order.push(self.root.join(path));
        Ok(())
    }
}

/// Loads `wanted` and their dependencies from `dir` (`/lib/modules/<kver>`).
/// Modules already loaded are fine.
pub fn load(dir: &Path, wanted: &[&str]) -> Result<usize, ModuleError> {
    let index = ModuleIndex::load(dir)?;
    let order = index.load_order(wanted)?;
    for path in &order {
        load_file(path)?;
    }
    Ok(order.len())
}

/// Loads `module` with its dependencies, passing `params` (`max_bonds=0`)
/// to the module itself; one already loaded is fine (and keeps the
/// parameters it was loaded with).
pub fn load_with_params(dir: &Path, module: &str, params: &str) -> Result<(), ModuleError> {
    let index = ModuleIndex::load(dir)?;
    let order = index.load_order(&[module])?;
    let Some((last, deps)) = order.split_last() else {
        return Ok(()); // built in
    };
    for path in deps {
        load_file(path)?;
    }
    load_file_params(last, params)
}

/// Loads one module file; one already loaded is fine.
pub fn load_file(path: &Path) -> Result<(), ModuleError> {
    load_file_params(path, "")
}

fn load_file_params(path: &Path, params: &str) -> Result<(), ModuleError> {
    let file = File::open(path).map_err(|source| ModuleError::Read {
        path: path.to_owned(),
        source,
    })?;
    let compressed = path
        .extension()
        .is_some_and(|e| e == "xz" || e == "zst" || e == "gz");
    let flags = if compressed {
        ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE)
    } else {
        ModuleInitFlags::empty()
    };
    // A NUL inside the parameters cannot come from our callers; none then.
    let params = CString::new(params).unwrap_or_default();
    match finit_module(&file, &params, flags) {
        Ok(()) | Err(Errno::EEXIST) => {
            tracing::debug!(module = %path.display(), "loaded");
            Ok(())
        }
        Err(source) => Err(ModuleError::Load {
            path: path.to_owned(),
            source,
        }),
    }
}

/// `/lib/modules/<running kernel release>`.
pub fn running_kernel_dir() -> PathBuf {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    Path::new("/lib/modules").join(release)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/md/dm-verity.ko: kernel/drivers/md/dm-bufio.ko kernel/drivers/md/dm-mod.ko
kernel/drivers/md/dm-bufio.ko: kernel/drivers/md/dm-mod.ko
kernel/drivers/md/dm-mod.ko:
kernel/fs/vfat/vfat.ko.xz: kernel/fs/fat/fat.ko.xz
kernel/fs/fat/fat.ko.xz:
";

    #[test]
    fn dependencies_come_first_and_once() {
        let idx = ModuleIndex::parse(Path::new("/m"), DEP, "kernel/fs/ext4/ext4.ko\n");
        let order = idx
            .load_order(&["dm_verity", "dm-mod", "vfat", "ext4"])
            .unwrap();
        let names: Vec<_> = order
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "dm-mod.ko",
                "dm-bufio.ko",
                "dm-verity.ko",
                "fat.ko.xz",
                "vfat.ko.xz"
            ]
        );
        assert_eq!(order[0], Path::new("/m/kernel/drivers/md/dm-mod.ko"));
    }

    #[test]
    fn unknown_modules_are_named() {
        let idx = ModuleIndex::parse(Path::new("/m"), DEP, "");
        let err = idx.load_order(&["nope"]).unwrap_err();
        assert!(err.to_string().contains("\"nope\""));
    }
}
