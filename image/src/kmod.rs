//! Kernel modules: parses `modules.dep` and `modules.builtin` (as `depmod`
//! writes them), picks the closure of the modules an image needs in a
//! dependency-safe load order, and writes `modules.dep` filtered to the
//! modules actually shipped.

use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KmodError {
    #[error("modules.dep line {line}: {text:?} is not `path: deps...`")]
    Syntax { line: usize, text: String },
    #[error("kernel {kver} has no module {module} (neither a .ko in modules.dep nor built in)")]
    Missing { kver: String, module: String },
    #[error("modules.dep names dependency {dep} of {module}, which has no line of its own")]
    DanglingDep { module: String, dep: String },
    #[error("modules.dep has a dependency cycle through {0}")]
    Cycle(String),
}

/// The module name of a `modules.dep` path: file name without `.ko[.xz|.zst|.gz]`,
/// dashes turned to underscores (the kernel's spelling).
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    normalize(stem)
}

/// `dm-verity` and `dm_verity` name the same module.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// How module files are compressed (the agent loads them with
/// `finit_module`, which needs the kernel to decompress anything but `.ko`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Xz,
    Zstd,
    Gzip,
}

impl Compression {
    pub fn of(path: &str) -> Compression {
        if path.ends_with(".ko.xz") {
            Compression::Xz
        } else if path.ends_with(".ko.zst") {
            Compression::Zstd
        } else if path.ends_with(".ko.gz") {
            Compression::Gzip
        } else {
            Compression::None
        }
    }
}

/// One line of `modules.dep`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEntry {
    /// Path relative to `/lib/modules/<kver>/`.
    pub path: String,
    /// Paths of every module it needs (transitively), as depmod lists them.
    pub deps: Vec<String>,
    /// Line number, to keep depmod's order when writing a subset.
    line: usize,
}

/// A parsed `modules.dep`.
#[derive(Debug, Clone, Default)]
pub struct ModulesDep {
    by_name: BTreeMap<String, ModuleEntry>,
    by_path: BTreeMap<String, String>,
}

/// Modules picked for one place (initrd or usr image).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Module names in load order (dependencies first).
    pub order: Vec<String>,
    /// Requested modules that are built into the kernel (nothing to ship).
    pub builtin: Vec<String>,
    /// Optional modules this kernel lacks.
    pub absent: Vec<String>,
}

impl ModulesDep {
    pub fn parse(text: &str) -> Result<Self, KmodError> {
        let mut dep = ModulesDep::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (path, deps) = line.split_once(':').ok_or_else(|| KmodError::Syntax {
                line: i + 1,
                text: raw.to_owned(),
            })?;
            let path = path.trim().to_owned();
            if path.is_empty() || !path.contains(".ko") {
                return Err(KmodError::Syntax {
                    line: i + 1,
                    text: raw.to_owned(),
                });
            }
            let entry = ModuleEntry {
                path: path.clone(),
                deps: deps.split_whitespace().map(str::to_owned).collect(),
                line: i,
            };
            dep.by_path.insert(path.clone(), module_name(&path));
            dep.by_name.insert(module_name(&path), entry);
        }
        Ok(dep)
    }

    pub fn get(&self, name: &str) -> Option<&ModuleEntry> {
        self.by_name.get(&normalize(name))
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Every module file's path (for checking compression).
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.by_path.keys().map(String::as_str)
    }

    /// The closure of `required` and `optional` modules in load order.
    /// Built-in modules are skipped; a missing required one is an error, a
    /// missing optional one is recorded in [`Selection::absent`].
    pub fn select(
        &self,
        kver: &str,
        builtin: &BTreeSet<String>,
        required: &[&str],
        optional: &[&str],
    ) -> Result<Selection, KmodError> {
        let mut sel = Selection::default();
        let mut done = BTreeSet::new();
        let wanted = required
            .iter()
            .map(|m| (m, true))
            .chain(optional.iter().map(|m| (m, false)));
        for (m, is_required) in wanted {
            let name = normalize(m);
            if self.by_name.contains_key(&name) {
                self.visit(&name, &mut done, &mut Vec::new(), &mut sel.order)?;
            } else if builtin.contains(&name) {
                sel.builtin.push(name);
            } else if is_required {
                return Err(KmodError::Missing {
                    kver: kver.to_owned(),
                    module: name,
                });
            } else {
                sel.absent.push(name);
            }
        }
        Ok(sel)
    }

    fn visit(
        &self,
        name: &str,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<(), KmodError> {
        if done.contains(name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            return Err(KmodError::Cycle(name.to_owned()));
        }
        let entry = self
            .by_name
            .get(name)
            .ok_or_else(|| KmodError::DanglingDep {
                module: stack.last().cloned().unwrap_or_default(),
                dep: name.to_owned(),
            })?;
        stack.push(name.to_owned());
        // modprobe loads the listed dependencies last-to-first.
        for dep_path in entry.deps.iter().rev() {
            let dep =
                self.by_path
                    .get(dep_path)
                    .cloned()
                    .ok_or_else(|| KmodError::DanglingDep {
                        module: name.to_owned(),
                        dep: dep_path.clone(),
                    })?;
            self.visit(&dep, done, stack, order)?;
        }
        stack.pop();
        done.insert(name.to_owned());
        order.push(name.to_owned());
        Ok(())
    }

    /// `modules.dep` text holding only `names`, in depmod's original order.
    pub fn render_subset<S: AsRef<str>>(&self, names: &[S]) -> String {
        let mut entries: Vec<&ModuleEntry> = names
            .iter()
            .filter_map(|n| self.by_name.get(&normalize(n.as_ref())))
            .collect();
        entries.sort_by_key(|e| e.line);
        entries.dedup_by_key(|e| e.line);
        let mut out = String::new();
        for e in entries {
            out.push_str(&e.path);
            out.push(':');
            for d in &e.deps {
                out.push(' ');
                out.push_str(d);
            }
            out.push('\n');
        }
        out
    }
}

/// Module names listed in `modules.builtin`.
pub fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(module_name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = include_str!("../tests/fixtures/modules.dep");
    const BUILTIN: &str = include_str!("../tests/fixtures/modules.builtin");

    fn position(order: &[String], m: &str) -> usize {
        order
            .iter()
            .position(|x| x == m)
            .unwrap_or_else(|| panic!("{m} not in {order:?}"))
    }

    #[test]
    fn closure_loads_dependencies_first() {
        let dep = ModulesDep::parse(DEP).unwrap();
        let builtin = parse_builtin(BUILTIN);
        let sel = dep
            .select(
                "k",
                &builtin,
                &[
                    "virtio_pci",
                    "virtio_blk",
                    "dm-verity",
                    "erofs",
                    "vfat",
                    "ext4",
                ],
                &["sha2_ce", "i6300esb"],
            )
            .unwrap();
        let o = &sel.order;
        assert_eq!(sel.builtin, vec!["ext4"]);
        assert_eq!(sel.absent, vec!["i6300esb"]);
        // every module appears once, after all of its dependencies
        let unique: BTreeSet<_> = o.iter().collect();
        assert_eq!(unique.len(), o.len());
        for m in o {
            for d in &dep.get(m).unwrap().deps {
                assert!(
                    position(o, &module_name(d)) < position(o, m),
                    "{d} after {m}"
                );
            }
        }
        assert!(position(o, "virtio_ring") < position(o, "virtio"));
        assert!(position(o, "dm_mod") < position(o, "dm_verity"));
        assert!(position(o, "libcrc32c") < position(o, "erofs"));
        assert!(position(o, "sha256_arm64") < position(o, "sha2_ce"));
        assert!(!o.contains(&"virtio_net".to_owned()));
    }

    #[test]
    fn missing_required_module_is_named() {
        let dep = ModulesDep::parse(DEP).unwrap();
        let err = dep
            .select("6.1.0-x", &BTreeSet::new(), &["no_such_mod"], &[])
            .unwrap_err();
        assert_eq!(
            err,
            KmodError::Missing {
                kver: "6.1.0-x".into(),
                module: "no_such_mod".into()
            }
        );
    }

    #[test]
    fn subset_keeps_only_shipped_lines_in_depmod_order() {
        let dep = ModulesDep::parse(DEP).unwrap();
        let sel = dep
            .select("k", &BTreeSet::new(), &["vfat", "nls_cp437"], &[])
            .unwrap();
        assert_eq!(sel.order, vec!["fat", "vfat", "nls_cp437"]);
        assert_eq!(
            dep.render_subset(&sel.order),
            "kernel/fs/nls/nls_cp437.ko:\nkernel/fs/fat/fat.ko:\nkernel/fs/fat/vfat.ko: kernel/fs/fat/fat.ko\n"
        );
    }

    #[test]
    fn cycles_and_syntax_errors_are_reported() {
        let cyc = "a.ko: b.ko\nb.ko: a.ko\n";
        let dep = ModulesDep::parse(cyc).unwrap();
        assert!(matches!(
            dep.select("k", &BTreeSet::new(), &["a"], &[]),
            Err(KmodError::Cycle(_))
        ));
        assert!(matches!(
            ModulesDep::parse("no colon here"),
            Err(KmodError::Syntax { line: 1, .. })
        ));
    }

    #[test]
    fn names_and_compression() {
        assert_eq!(module_name("kernel/drivers/md/dm-verity.ko"), "dm_verity");
        assert_eq!(module_name("kernel/fs/erofs/erofs.ko.zst"), "erofs");
        assert_eq!(Compression::of("a/b.ko"), Compression::None);
        assert_eq!(Compression::of("a/b.ko.xz"), Compression::Xz);
        assert_eq!(Compression::of("a/b.ko.zst"), Compression::Zstd);
    }
}
