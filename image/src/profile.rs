//! Image profiles: what the usr image holds besides the agent. `base` is the
//! agent alone; `k8s` adds Debian's containerd, runc, CNI plugins,
//! iptables, conntrack, mount and CA certificates, the shared libraries
//! their ELF files need (found from DT_NEEDED and PT_INTERP against the
//! packages' Depends, only the library files themselves shipped), the
//! kernel modules containers and CNI bridge networking need, and an
//! optional user-supplied kubelet. This module owns that list, the library
//! closure, and the few steps Debian's maintainer scripts would otherwise
//! do (iptables alternatives, the CA bundle).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::path::{Component, Path, PathBuf};

use ballast_updater::payload::Arch;

use crate::apt::{self, Apt, AptError, PackageInfo};
use crate::build::Progress;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(transparent)]
    Apt(#[from] AptError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown profile {0:?}: expected base or k8s")]
    Unknown(String),
    #[error("{path}: not an ELF file we can read: {reason}")]
    Elf { path: PathBuf, reason: String },
    #[error("kubelet {path}: {reason}")]
    Kubelet { path: PathBuf, reason: String },
    #[error("--kubelet needs the k8s profile; profile {0} ships no container runtime")]
    KubeletWithoutK8s(Profile),
    #[error("{file} (from {package}) needs {need}, which no package in the image provides; tried {tried}")]
    MissingLibrary {
        need: String,
        file: String,
        package: String,
        tried: String,
    },
    #[error("{path} is shipped by both {first} and {second} with different contents")]
    Conflict {
        path: String,
        first: String,
        second: String,
    },
    #[error("{package}: symlink {path} does not stay inside the package (-> {target})")]
    SymlinkEscapes {
        package: String,
        path: String,
        target: String,
    },
    #[error("{package}: {path} (needed as {need}) is missing from the package")]
    Dangling {
        package: String,
        path: String,
        need: String,
    },
    #[error("{what} {link} points at {target}, which the image does not hold")]
    BadLink {
        what: &'static str,
        link: String,
        target: String,
    },
    #[error("ca-certificates ships no *.crt under usr/share/ca-certificates")]
    NoCertificates,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProfileError + '_ {
    move |source| ProfileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What an image holds besides the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// The agent, its modules and nothing else.
    Base,
    /// Base plus a container runtime and what the kubelet needs.
    K8s,
}

impl Profile {
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Base => "base",
            Profile::K8s => "k8s",
        }
    }

    /// Debian packages whose files (less documentation) go into the image.
    pub fn packages(self) -> &'static [&'static str] {
        match self {
            Profile::Base => &[],
            // `mount`: the kubelet runs mount(8) for tmpfs-backed volumes
            // (secrets, projected service-account tokens).
            Profile::K8s => &[
                "containerd",
                "runc",
                "containernetworking-plugins",
                "iptables",
                "conntrack",
                "ca-certificates",
                "mount",
            ],
        }
    }

    /// Runtime modules the image must ship (the build fails when the
    /// kernel has neither the module nor it built in).
    pub fn required_modules(self) -> &'static [&'static str] {
        match self {
            Profile::Base => &[],
            Profile::K8s => &[
                // containerd's overlayfs snapshotter
                "overlay",
                // CNI bridge plugin: the bridge, veth pairs, bridged
                // traffic through iptables (kubelet and kube-proxy need
                // net.bridge.bridge-nf-call-iptables)
                "bridge",
                "br_netfilter",
                "veth",
                // iptables-nft (Debian's default iptables) and the matches
                // and targets CNI portmap/masquerade and kube-proxy use
                "nf_conntrack",
                "nf_nat",
                "nf_tables",
                "nft_compat",
                "nft_chain_nat",
                "xt_conntrack",
                "xt_MASQUERADE",
                "xt_addrtype",
                "xt_comment",
                "xt_mark",
                "xt_multiport",
                "xt_nat",
                "xt_statistic",
                "xt_tcpudp",
                // conntrack(8)
                "nf_conntrack_netlink",
            ],
        }
    }

    /// Runtime modules shipped when the kernel has them.
    pub fn optional_modules(self) -> &'static [&'static str] {
        // Drivers (NICs, watchdogs) are not here: the platform ships them
        // and the agent loads them by modalias. isofs (a filesystem, which
        // no device names): OpenStack config drives may be iso9660 (agent
        // boot::configdrive).
        match self {
            Profile::Base => &["isofs"],
            Profile::K8s => &[
                "isofs",
                // legacy iptables and kube-proxy's IPVS mode
                "ip_tables",
                "iptable_filter",
                "iptable_nat",
                "ip6_tables",
                "ip6table_filter",
                "ip6table_nat",
                "xt_physdev",
                "xt_set",
                "ip_set",
                "ip_vs",
                "ip_vs_rr",
                "ip_vs_wrr",
                "ip_vs_sh",
                // overlay networks (flannel, Calico VXLAN mode)
                "vxlan",
            ],
        }
    }

    /// Symlinks Debian's maintainer scripts would make
    /// (`update-alternatives`), as (link, target) relative to the image
    /// root; the target must exist in the image.
    pub fn links(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Profile::Base => &[],
            Profile::K8s => &[
                ("usr/sbin/iptables", "iptables-nft"),
                ("usr/sbin/iptables-save", "iptables-nft-save"),
                ("usr/sbin/iptables-restore", "iptables-nft-restore"),
                ("usr/sbin/ip6tables", "ip6tables-nft"),
                ("usr/sbin/ip6tables-save", "ip6tables-nft-save"),
                ("usr/sbin/ip6tables-restore", "ip6tables-nft-restore"),
            ],
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Profile {
    type Err = ProfileError;
    fn from_str(s: &str) -> Result<Self, ProfileError> {
        match s {
            "base" => Ok(Profile::Base),
            "k8s" => Ok(Profile::K8s),
            _ => Err(ProfileError::Unknown(s.to_owned())),
        }
    }
}

/// Where the kubelet goes in the image.
pub const KUBELET_PATH: &str = "usr/bin/kubelet";
/// Where the CA bundle goes (in the factory `/etc`).
pub const CA_BUNDLE: &str = "usr/share/factory/etc/ssl/certs/ca-certificates.crt";
/// What a k8s build without a kubelet prints.
pub const NO_KUBELET: &str =
    "no kubelet supplied: the k8s image will run containerd only; the agent reports kubelet not installed";

/// Package paths not shipped (documentation, shell completions, systemd
/// units: there is no systemd or shell).
const SKIP: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/lintian",
    "usr/share/bash-completion",
    "usr/share/zsh",
    "usr/share/fish",
    "usr/share/locale",
    "usr/share/bug",
    "lib/systemd",
    "usr/lib/systemd",
];

/// What the profile put into the image, for metadata and the size report.
#[derive(Debug, Clone, Default)]
pub struct Contents {
    /// The profile's packages, all files but [`SKIP`].
    pub packages: Vec<PackageInfo>,
    /// Packages only some library files were taken from.
    pub libraries: Vec<PackageInfo>,
    /// Library files shipped from them (relative paths, symlinks included).
    pub library_files: Vec<String>,
    /// Bytes of regular files shipped, per package name (and `kubelet`).
    pub bytes: BTreeMap<String, u64>,
    /// SHA-256 and size of the user's kubelet.
    pub kubelet: Option<(String, u64)>,
}

impl Contents {
    /// `name=version` of every package any file came from.
    pub fn specs(&self) -> Vec<String> {
        self.packages
            .iter()
            .chain(&self.libraries)
            .map(PackageInfo::spec)
            .collect()
    }

    /// Lines for the size report.
    pub fn report(&self, profile: Profile) -> String {
        let mut out = String::new();
        if profile == Profile::Base {
            return out;
        }
        out.push_str(&format!(
            "profile {profile} contents (bytes of files shipped):\n"
        ));
        for p in self.packages.iter().chain(&self.libraries) {
            out.push_str(&format!(
                "  {:<44} {:>12}\n",
                p.spec(),
                self.bytes.get(&p.name).copied().unwrap_or(0)
            ));
        }
        match &self.kubelet {
            Some((sha, size)) => out.push_str(&format!(
                "  {:<44} {size:>12}  sha256 {sha}\n",
                "kubelet (user-supplied)"
            )),
            None => out.push_str("  kubelet: none supplied (containerd only)\n"),
        }
        out.push_str(&format!(
            "library files: {}\n",
            self.library_files.join(" ")
        ));
        out
    }
}

/// The parts of an ELF file the closure needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    pub machine: u16,
    pub e_type: u16,
    /// DT_NEEDED sonames.
    pub needed: Vec<String>,
    /// PT_INTERP, without its trailing NUL.
    pub interp: Option<String>,
}

/// `e_machine` of `arch`.
pub fn elf_machine(arch: Arch) -> u16 {
    match arch {
        Arch::X86_64 => elf::abi::EM_X86_64,
        Arch::Aarch64 => elf::abi::EM_AARCH64,
    }
}

/// Debian's multiarch triplet of `arch`.
pub fn triplet(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "x86_64-linux-gnu",
        Arch::Aarch64 => "aarch64-linux-gnu",
    }
}

/// True when `data` starts with the ELF magic.
pub fn is_elf(data: &[u8]) -> bool {
    data.starts_with(b"\x7fELF")
}

/// Parses the header, DT_NEEDED and PT_INTERP of an ELF image.
pub fn parse_elf(data: &[u8]) -> Result<ElfInfo, String> {
    use elf::endian::AnyEndian;
    let file = elf::ElfBytes::<AnyEndian>::minimal_parse(data).map_err(|e| e.to_string())?;
    let mut info = ElfInfo {
        machine: file.ehdr.e_machine,
        e_type: file.ehdr.e_type,
        needed: Vec::new(),
        interp: None,
    };
    if let Some(segments) = file.segments() {
        for ph in segments.iter().filter(|p| p.p_type == elf::abi::PT_INTERP) {
            let bytes = file.segment_data(&ph).map_err(|e| e.to_string())?;
            let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
            info.interp = Some(String::from_utf8_lossy(&bytes[..end]).into_owned());
        }
    }
    let dynamic = file.dynamic().map_err(|e| e.to_string())?;
    if let Some(dynamic) = dynamic {
        let dynstr = file
            .section_header_by_name(".dynstr")
            .map_err(|e| e.to_string())?
            .ok_or("a .dynamic section but no .dynstr")?;
        let strtab = file
            .section_data_as_strtab(&dynstr)
            .map_err(|e| e.to_string())?;
        for d in dynamic.iter().filter(|d| d.d_tag == elf::abi::DT_NEEDED) {
            let off = usize::try_from(d.d_val()).map_err(|e| e.to_string())?;
            info.needed
                .push(strtab.get(off).map_err(|e| e.to_string())?.to_owned());
        }
    }
    Ok(info)
}

/// The Debian package name a library's soname conventionally lives in
/// (`libfoo_bar.so.3` -> `libfoo-bar3`, `libfoo2.so.1` -> `libfoo2-1`;
/// glibc's libraries and loader -> `libc6`). Only used to try the likely
/// dependency first.
pub fn package_for_soname(soname: &str) -> String {
    const GLIBC: &[&str] = &[
        "libc",
        "libm",
        "libdl",
        "libpthread",
        "librt",
        "libresolv",
        "libutil",
        "libanl",
    ];
    if soname.starts_with("ld-linux") {
        return "libc6".to_owned();
    }
    let Some((stem, ver)) = soname.split_once(".so.") else {
        return soname.replace('_', "-").to_ascii_lowercase();
    };
    if GLIBC.contains(&stem) {
        return "libc6".to_owned();
    }
    let stem = stem.replace('_', "-").to_ascii_lowercase();
    let major = ver.split('.').next().unwrap_or(ver);
    if stem.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{stem}-{major}")
    } else {
        format!("{stem}{major}")
    }
}

/// Joins `rel` (relative, may hold `..`) onto `base` without leaving the
/// root; `None` when it would.
fn normalize(base: &Path, rel: &Path) -> Option<PathBuf> {
    let mut out: Vec<std::ffi::OsString> = base
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            _ => None,
        })
        .collect();
    for c in rel.components() {
        match c {
            Component::RootDir => out.clear(),
            Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop()?;
            }
            Component::Normal(n) => out.push(n.to_owned()),
        }
    }
    Some(out.iter().collect())
}

/// A package unpacked in the work directory.
#[derive(Debug, Clone)]
struct Unpacked {
    info: PackageInfo,
    root: PathBuf,
}

/// Builds the profile's part of the usr tree; see the module docs.
#[derive(Debug)]
pub struct Stager<'a> {
    apt: &'a Apt,
    arch: Arch,
    work: PathBuf,
    tree: PathBuf,
    unpacked: BTreeMap<String, Unpacked>,
    /// Image path -> package that put it there.
    owner: BTreeMap<String, String>,
    contents: Contents,
}

impl<'a> Stager<'a> {
    /// `work` holds unpacked packages; `tree` is the usr image's staging
    /// tree.
    pub fn new(apt: &'a Apt, arch: Arch, work: &Path, tree: &Path) -> Self {
        Stager {
            apt,
            arch,
            work: work.to_owned(),
            tree: tree.to_owned(),
            unpacked: BTreeMap::new(),
            owner: BTreeMap::new(),
            contents: Contents::default(),
        }
    }

    fn unpack(&mut self, info: &PackageInfo) -> Result<Unpacked, ProfileError> {
        if let Some(u) = self.unpacked.get(&info.name) {
            return Ok(u.clone());
        }
        let deb = self.apt.fetch(info)?;
        let root = self.work.join(&info.name);
        if root.exists() {
            fs::remove_dir_all(&root).map_err(io(&root))?;
        }
        apt::unpack(&deb, &root)?;
        let u = Unpacked {
            info: info.clone(),
            root,
        };
        self.unpacked.insert(info.name.clone(), u.clone());
        Ok(u)
    }

    /// Copies one entry (file, symlink or directory, not recursing) from
    /// `src` to image path `rel`, recording `package` as its owner. Returns
    /// the bytes of a regular file copied.
    fn place(&mut self, src: &Path, rel: &str, package: &str) -> Result<u64, ProfileError> {
        let dst = self.tree.join(rel);
        let meta = fs::symlink_metadata(src).map_err(io(src))?;
        if meta.is_dir() {
            fs::create_dir_all(&dst).map_err(io(&dst))?;
            return Ok(0);
        }
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        if fs::symlink_metadata(&dst).is_ok() {
            let same = if meta.file_type().is_symlink() {
                fs::read_link(src).ok() == fs::read_link(&dst).ok()
            } else {
                fs::read(src).map_err(io(src))? == fs::read(&dst).unwrap_or_default()
            };
            if same {
                return Ok(0);
            }
            return Err(ProfileError::Conflict {
                path: rel.to_owned(),
                first: self
                    .owner
                    .get(rel)
                    .cloned()
                    .unwrap_or_else(|| "the base image".into()),
                second: package.to_owned(),
            });
        }
        self.owner.insert(rel.to_owned(), package.to_owned());
        if meta.file_type().is_symlink() {
            let target = fs::read_link(src).map_err(io(src))?;
            std::os::unix::fs::symlink(&target, &dst).map_err(io(&dst))?;
            Ok(0)
        } else {
            fs::copy(src, &dst).map_err(io(&dst))?;
            *self.contents.bytes.entry(package.to_owned()).or_default() += meta.len();
            Ok(meta.len())
        }
    }

    /// Ships every file of a profile package but [`SKIP`]; files under
    /// `etc/` go to the factory `/etc`.
    fn ship_package(&mut self, u: &Unpacked) -> Result<(), ProfileError> {
        let mut entries = Vec::new();
        walk(&u.root, &u.root, &mut entries)?;
        for rel in entries {
            if SKIP
                .iter()
                .any(|s| rel == *s || rel.starts_with(&format!("{s}/")))
            {
                continue;
            }
            let dst = match rel.strip_prefix("etc/") {
                Some(rest) => format!("usr/share/factory/etc/{rest}"),
                None if rel == "etc" => "usr/share/factory/etc".to_owned(),
                None => rel.clone(),
            };
            self.place(&u.root.join(&rel), &dst, &u.info.name)?;
        }
        Ok(())
    }

    /// Directories the dynamic loader searches (no ld.so.cache in the
    /// image), relative to the root.
    fn lib_dirs(&self) -> Vec<String> {
        let t = triplet(self.arch);
        vec![
            format!("lib/{t}"),
            format!("usr/lib/{t}"),
            "lib".to_owned(),
            "usr/lib".to_owned(),
        ]
    }

    /// The image path of `need` (a soname or an absolute loader path) if
    /// a tree rooted at `root` holds it.
    fn find_in(&self, root: &Path, need: &str) -> Option<String> {
        if let Some(abs) = need.strip_prefix('/') {
            return fs::symlink_metadata(root.join(abs))
                .is_ok()
                .then(|| abs.to_owned());
        }
        self.lib_dirs()
            .into_iter()
            .map(|d| format!("{d}/{need}"))
            .find(|p| fs::symlink_metadata(root.join(p)).is_ok())
    }

    /// Copies `rel` from a library package, following symlinks inside the
    /// package (each link and its target shipped); returns the regular
    /// file at the end of the chain.
    fn ship_library(
        &mut self,
        u: &Unpacked,
        rel: &str,
        need: &str,
    ) -> Result<String, ProfileError> {
        let mut cur = rel.to_owned();
        for _ in 0..16 {
            let src = u.root.join(&cur);
            let meta = fs::symlink_metadata(&src).map_err(|_| ProfileError::Dangling {
                package: u.info.spec(),
                path: cur.clone(),
                need: need.to_owned(),
            })?;
            if self.place(&src, &cur, &u.info.name)? > 0 || !meta.file_type().is_symlink() {
                if !self.contents.library_files.contains(&cur) {
                    self.contents.library_files.push(cur.clone());
                }
                return Ok(cur);
            }
            if !self.contents.library_files.contains(&cur) {
                self.contents.library_files.push(cur.clone());
            }
            let target = fs::read_link(&src).map_err(io(&src))?;
            let parent = Path::new(&cur).parent().unwrap_or(Path::new(""));
            let next = normalize(parent, &target).ok_or_else(|| ProfileError::SymlinkEscapes {
                package: u.info.spec(),
                path: cur.clone(),
                target: target.display().to_string(),
            })?;
            cur = next.to_string_lossy().into_owned();
        }
        Err(ProfileError::SymlinkEscapes {
            package: u.info.spec(),
            path: rel.to_owned(),
            target: "(more than 16 links)".to_owned(),
        })
    }

    /// Finds `need` of `file` (owned by `package`): in the tree, in a
    /// library package already unpacked, or in a dependency of `package`
    /// (the likely one first, then by name). Returns the newly shipped
    /// regular file, if any.
    fn resolve(
        &mut self,
        need: &str,
        file: &str,
        package: &str,
    ) -> Result<Option<String>, ProfileError> {
        if self.find_in(&self.tree, need).is_some() {
            return Ok(None);
        }
        let unpacked: Vec<Unpacked> = self.unpacked.values().cloned().collect();
        for u in &unpacked {
            if let Some(rel) = self.find_in(&u.root, need) {
                self.note_library(&u.info);
                return self.ship_library(u, &rel, need).map(Some);
            }
        }
        let owner = self
            .unpacked
            .get(package)
            .map(|u| u.info.clone())
            .ok_or_else(|| ProfileError::MissingLibrary {
                need: need.to_owned(),
                file: file.to_owned(),
                package: package.to_owned(),
                tried: "nothing (no package record)".to_owned(),
            })?;
        let likely = package_for_soname(need.rsplit('/').next().unwrap_or(need));
        let mut deps: Vec<String> = self.apt.depends(&owner)?;
        deps.sort();
        deps.dedup();
        deps.sort_by_key(|d| *d != likely);
        let mut tried = Vec::new();
        for dep in deps {
            if self.unpacked.contains_key(&dep) {
                continue;
            }
            let info = match self.apt.resolve(&dep) {
                Ok(info) => info,
                // An alternative or a name apt has no record of for this
                // arch cannot hold the library.
                Err(AptError::NotFound { .. }) => {
                    tried.push(format!("{dep} (unknown to apt)"));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            tried.push(dep.clone());
            let u = self.unpack(&info)?;
            if let Some(rel) = self.find_in(&u.root, need) {
                self.note_library(&u.info);
                return self.ship_library(&u, &rel, need).map(Some);
            }
        }
        Err(ProfileError::MissingLibrary {
            need: need.to_owned(),
            file: file.to_owned(),
            package: owner.spec(),
            tried: if tried.is_empty() {
                "no further dependency".to_owned()
            } else {
                tried.join(", ")
            },
        })
    }

    fn note_library(&mut self, info: &PackageInfo) {
        let listed = self
            .contents
            .packages
            .iter()
            .chain(&self.contents.libraries)
            .any(|p| p.name == info.name);
        if !listed {
            self.contents.libraries.push(info.clone());
        }
    }

    /// Every need of every ELF file for this arch in the tree is met,
    /// shipping library files as needed.
    fn close_libraries(&mut self) -> Result<(), ProfileError> {
        let mut queue: Vec<String> = self.owner.keys().cloned().collect();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        while let Some(rel) = queue.pop() {
            if !seen.insert(rel.clone()) {
                continue;
            }
            let path = self.tree.join(&rel);
            let meta = fs::symlink_metadata(&path).map_err(io(&path))?;
            if !meta.is_file() {
                continue;
            }
            let data = fs::read(&path).map_err(io(&path))?;
            if !is_elf(&data) {
                continue;
            }
            let info = parse_elf(&data).map_err(|reason| ProfileError::Elf {
                path: path.clone(),
                reason,
            })?;
            // Objects for other machines (firmware, BPF) are data here.
            if info.machine != elf_machine(self.arch) {
                continue;
            }
            let package = self.owner.get(&rel).cloned().unwrap_or_default();
            let needs = info.interp.iter().chain(&info.needed).cloned();
            for need in needs.collect::<Vec<_>>() {
                if let Some(shipped) = self.resolve(&need, &rel, &package)? {
                    queue.push(shipped);
                }
            }
        }
        Ok(())
    }

    fn make_links(&mut self, profile: Profile) -> Result<(), ProfileError> {
        for (link, target) in profile.links() {
            let parent = Path::new(link).parent().unwrap_or(Path::new(""));
            let resolved = normalize(parent, Path::new(target))
                .filter(|p| self.tree.join(p).exists())
                .ok_or_else(|| ProfileError::BadLink {
                    what: "alternative",
                    link: (*link).to_owned(),
                    target: (*target).to_owned(),
                })?;
            let dst = self.tree.join(link);
            if fs::symlink_metadata(&dst).is_ok() {
                return Err(ProfileError::Conflict {
                    path: (*link).to_owned(),
                    first: self.owner.get(*link).cloned().unwrap_or_default(),
                    second: format!("the alternative -> {}", resolved.display()),
                });
            }
            std::os::unix::fs::symlink(target, &dst).map_err(io(&dst))?;
        }
        Ok(())
    }

    /// `/etc/ssl/certs/ca-certificates.crt` as update-ca-certificates
    /// writes it with every certificate enabled: the `*.crt` files under
    /// `usr/share/ca-certificates`, in byte order of their paths.
    fn ca_bundle(&mut self) -> Result<(), ProfileError> {
        let base = self.tree.join("usr/share/ca-certificates");
        let mut files = Vec::new();
        if base.is_dir() {
            walk(&base, &base, &mut files)?;
        }
        files.retain(|f| f.ends_with(".crt"));
        files.sort();
        if files.is_empty() {
            return Err(ProfileError::NoCertificates);
        }
        let mut bundle = Vec::new();
        for f in &files {
            let p = base.join(f);
            let mut pem = fs::read(&p).map_err(io(&p))?;
            if !pem.ends_with(b"\n") {
                pem.push(b'\n');
            }
            bundle.extend_from_slice(&pem);
        }
        let dst = self.tree.join(CA_BUNDLE);
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        fs::write(&dst, &bundle).map_err(io(&dst))?;
        Ok(())
    }

    /// Stages `profile` into the tree, with `kubelet` when given.
    pub fn stage(
        mut self,
        profile: Profile,
        kubelet: Option<&Path>,
        progress: &mut dyn Progress,
    ) -> Result<Contents, ProfileError> {
        if profile == Profile::Base {
            if kubelet.is_some() {
                return Err(ProfileError::KubeletWithoutK8s(profile));
            }
            return Ok(self.contents);
        }
        for name in profile.packages() {
            let info = self.apt.resolve_stable(name)?;
            let u = self.unpack(&info)?;
            self.ship_package(&u)?;
            progress.detail(&format!(
                "{} ({} bytes shipped)",
                info.spec(),
                self.contents.bytes.get(&info.name).copied().unwrap_or(0)
            ));
            self.contents.packages.push(info);
        }
        match kubelet {
            Some(path) => {
                let (sha, size) = check_kubelet(path, self.arch)?;
                let dst = self.tree.join(KUBELET_PATH);
                fs::copy(path, &dst).map_err(io(&dst))?;
                {
                    use std::os::unix::fs::PermissionsExt;
                    fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))
                        .map_err(io(&dst))?;
                }
                self.owner
                    .insert(KUBELET_PATH.to_owned(), "kubelet".to_owned());
                self.contents.bytes.insert("kubelet".to_owned(), size);
                progress.detail(&format!(
                    "kubelet {} ({size} bytes, sha256 {sha})",
                    path.display()
                ));
                self.contents.kubelet = Some((sha, size));
            }
            None => progress.detail(NO_KUBELET),
        }
        self.close_libraries()?;
        self.make_links(profile)?;
        self.ca_bundle()?;
        self.contents.library_files.sort();
        self.contents.libraries.sort_by(|a, b| a.name.cmp(&b.name));
        progress.detail(&format!(
            "libraries from {}: {}",
            self.contents
                .libraries
                .iter()
                .map(PackageInfo::spec)
                .collect::<Vec<_>>()
                .join(" "),
            self.contents.library_files.join(" ")
        ));
        Ok(self.contents)
    }
}

/// Checks the user's kubelet is an executable ELF for `arch`; returns its
/// SHA-256 and size.
pub fn check_kubelet(path: &Path, arch: Arch) -> Result<(String, u64), ProfileError> {
    let bad = |reason: String| ProfileError::Kubelet {
        path: path.to_owned(),
        reason,
    };
    let data = fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    if !is_elf(&data) {
        return Err(bad("not an ELF file".to_owned()));
    }
    let info = parse_elf(&data).map_err(bad)?;
    if info.machine != elf_machine(arch) {
        return Err(bad(format!(
            "built for ELF machine {}, not {arch} ({})",
            info.machine,
            elf_machine(arch)
        )));
    }
    if info.e_type != elf::abi::ET_EXEC && info.e_type != elf::abi::ET_DYN {
        return Err(bad(format!(
            "ELF type {} is not an executable",
            info.e_type
        )));
    }
    let sha = apt::sha256_file(path)?;
    Ok((sha, data.len() as u64))
}

/// Every path under `dir` relative to `root` (directories before their
/// contents), sorted; symlinks are not followed.
fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), ProfileError> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(io(dir))?
        .collect::<Result<_, _>>()
        .map_err(io(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let rel = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned();
        out.push(rel);
        if e.file_type().map_err(io(&path))?.is_dir() {
            walk(root, &path, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse_and_list_what_they_ship() {
        assert_eq!("base".parse::<Profile>().unwrap(), Profile::Base);
        assert_eq!("k8s".parse::<Profile>().unwrap(), Profile::K8s);
        let err = "kube".parse::<Profile>().unwrap_err().to_string();
        assert!(
            err.contains("\"kube\"") && err.contains("base or k8s"),
            "{err}"
        );
        assert!(Profile::Base.packages().is_empty());
        for p in [
            "containerd",
            "runc",
            "containernetworking-plugins",
            "iptables",
            "conntrack",
            "ca-certificates",
        ] {
            assert!(Profile::K8s.packages().contains(&p), "{p}");
        }
        for m in ["overlay", "br_netfilter", "bridge", "veth", "nf_conntrack"] {
            assert!(Profile::K8s.required_modules().contains(&m), "{m}");
        }
        assert_eq!(Profile::Base.optional_modules(), ["isofs"]);
    }

    #[test]
    fn sonames_map_to_debian_library_packages() {
        assert_eq!(package_for_soname("libc.so.6"), "libc6");
        assert_eq!(package_for_soname("ld-linux-x86-64.so.2"), "libc6");
        assert_eq!(package_for_soname("libseccomp.so.2"), "libseccomp2");
        assert_eq!(
            package_for_soname("libnetfilter_conntrack.so.3"),
            "libnetfilter-conntrack3"
        );
        assert_eq!(package_for_soname("libip4tc.so.2"), "libip4tc2");
        assert_eq!(package_for_soname("libpcre2-8.so.0"), "libpcre2-8-0");
    }

    #[test]
    fn links_are_resolved_inside_the_root_only() {
        assert_eq!(
            normalize(Path::new("usr/lib/x"), Path::new("../y/libz.so.1")),
            Some(PathBuf::from("usr/lib/y/libz.so.1"))
        );
        assert_eq!(
            normalize(Path::new("lib64"), Path::new("/lib/x86_64-linux-gnu/ld.so")),
            Some(PathBuf::from("lib/x86_64-linux-gnu/ld.so"))
        );
        assert_eq!(normalize(Path::new("a"), Path::new("../../etc")), None);
    }

    /// A minimal 64-bit little-endian ELF: one PT_INTERP segment, a
    /// .dynamic section with two DT_NEEDED, and its .dynstr.
    fn tiny_elf(machine: u16) -> Vec<u8> {
        let dynstr = b"\0libc.so.6\0libfoo.so.1\0".to_vec();
        let shstr = b"\0.dynamic\0.dynstr\0.shstrtab\0".to_vec();
        let interp = b"/lib64/ld-linux-x86-64.so.2\0".to_vec();
        let mut dynamic = Vec::new();
        for (tag, val) in [(1i64, 1u64), (1, 11), (0, 0)] {
            dynamic.extend_from_slice(&tag.to_le_bytes());
            dynamic.extend_from_slice(&val.to_le_bytes());
        }
        let ph_off = 64u64;
        let interp_off = ph_off + 56;
        let dyn_off = interp_off + interp.len() as u64;
        let dynstr_off = dyn_off + dynamic.len() as u64;
        let shstr_off = dynstr_off + dynstr.len() as u64;
        let sh_off = shstr_off + shstr.len() as u64;
        let mut f = Vec::new();
        f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        f.extend_from_slice(&3u16.to_le_bytes()); // ET_DYN
        f.extend_from_slice(&machine.to_le_bytes());
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&0u64.to_le_bytes()); // entry
        f.extend_from_slice(&ph_off.to_le_bytes());
        f.extend_from_slice(&sh_off.to_le_bytes());
        f.extend_from_slice(&0u32.to_le_bytes()); // flags
        for v in [64u16, 56, 1, 64, 4, 3] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        // PT_INTERP
        f.extend_from_slice(&3u32.to_le_bytes());
        f.extend_from_slice(&4u32.to_le_bytes());
        for v in [
            interp_off,
            0,
            0,
            interp.len() as u64,
            interp.len() as u64,
            1,
        ] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(&interp);
        f.extend_from_slice(&dynamic);
        f.extend_from_slice(&dynstr);
        f.extend_from_slice(&shstr);
        let sh = |name: u32, ty: u32, off: u64, size: u64, link: u32, entsize: u64| {
            let mut s = Vec::new();
            s.extend_from_slice(&name.to_le_bytes());
            s.extend_from_slice(&ty.to_le_bytes());
            s.extend_from_slice(&0u64.to_le_bytes()); // flags
            s.extend_from_slice(&0u64.to_le_bytes()); // addr
            s.extend_from_slice(&off.to_le_bytes());
            s.extend_from_slice(&size.to_le_bytes());
            s.extend_from_slice(&link.to_le_bytes());
            s.extend_from_slice(&0u32.to_le_bytes()); // info
            s.extend_from_slice(&1u64.to_le_bytes()); // align
            s.extend_from_slice(&entsize.to_le_bytes());
            s
        };
        f.extend(sh(0, 0, 0, 0, 0, 0));
        f.extend(sh(1, 6, dyn_off, dynamic.len() as u64, 2, 16)); // SHT_DYNAMIC
        f.extend(sh(10, 3, dynstr_off, dynstr.len() as u64, 0, 0)); // .dynstr
        f.extend(sh(18, 3, shstr_off, shstr.len() as u64, 0, 0)); // .shstrtab
        f
    }

    #[test]
    fn needed_libraries_and_interpreter_are_read() {
        let data = tiny_elf(elf::abi::EM_X86_64);
        assert!(is_elf(&data));
        let info = parse_elf(&data).unwrap();
        assert_eq!(info.machine, elf_machine(Arch::X86_64));
        assert_eq!(info.e_type, elf::abi::ET_DYN);
        assert_eq!(info.needed, ["libc.so.6", "libfoo.so.1"]);
        assert_eq!(info.interp.as_deref(), Some("/lib64/ld-linux-x86-64.so.2"));
        assert!(parse_elf(b"\x7fELF garbage").is_err());
    }

    #[test]
    fn kubelet_must_be_an_executable_for_the_arch() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("kubelet");
        fs::write(&good, tiny_elf(elf::abi::EM_X86_64)).unwrap();
        let (sha, size) = check_kubelet(&good, Arch::X86_64).unwrap();
        assert_eq!(sha.len(), 64);
        assert_eq!(size, fs::metadata(&good).unwrap().len());
        let err = check_kubelet(&good, Arch::Aarch64).unwrap_err().to_string();
        assert!(err.contains("not aarch64"), "{err}");
        let text = dir.path().join("script");
        fs::write(&text, "#!/bin/sh\n").unwrap();
        let err = check_kubelet(&text, Arch::X86_64).unwrap_err().to_string();
        assert!(err.contains("not an ELF"), "{err}");
        let err = check_kubelet(&dir.path().join("none"), Arch::X86_64)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read"), "{err}");
    }

    #[test]
    fn packages_ship_without_docs_and_etc_goes_to_the_factory() {
        let dir = tempfile::tempdir().unwrap();
        let pkg = dir.path().join("pkg");
        for (p, data) in [
            ("usr/bin/tool", "x"),
            ("usr/share/doc/tool/copyright", "c"),
            ("etc/tool/config.toml", "k = 1"),
        ] {
            let f = pkg.join(p);
            fs::create_dir_all(f.parent().unwrap()).unwrap();
            fs::write(f, data).unwrap();
        }
        let apt = Apt::new("amd64", dir.path().join("cache"), BTreeMap::new());
        let tree = dir.path().join("tree");
        fs::create_dir_all(&tree).unwrap();
        let mut s = Stager::new(&apt, Arch::X86_64, &dir.path().join("work"), &tree);
        let info = PackageInfo {
            name: "tool".into(),
            version: "1".into(),
            sha256: String::new(),
            filename: "tool_1.deb".into(),
            arch: "amd64".into(),
        };
        s.ship_package(&Unpacked {
            info: info.clone(),
            root: pkg.clone(),
        })
        .unwrap();
        assert!(tree.join("usr/bin/tool").is_file());
        assert!(!tree.join("usr/share/doc").exists());
        assert_eq!(
            fs::read_to_string(tree.join("usr/share/factory/etc/tool/config.toml")).unwrap(),
            "k = 1"
        );
        assert_eq!(s.contents.bytes["tool"], 6);
        // The same path from another package with other bytes is refused.
        fs::write(pkg.join("usr/bin/tool"), "y").unwrap();
        let other = Unpacked {
            info: PackageInfo {
                name: "other".into(),
                ..info
            },
            root: pkg,
        };
        let err = s.ship_package(&other).unwrap_err().to_string();
        assert!(
            err.contains("usr/bin/tool") && err.contains("tool and other"),
            "{err}"
        );
    }

    #[test]
    fn libraries_resolve_from_unpacked_packages_with_their_links() {
        let dir = tempfile::tempdir().unwrap();
        let apt = Apt::new("amd64", dir.path().join("cache"), BTreeMap::new());
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("usr/bin")).unwrap();
        fs::write(tree.join("usr/bin/app"), tiny_elf(elf::abi::EM_X86_64)).unwrap();
        let lib = dir.path().join("libs");
        let t = "lib/x86_64-linux-gnu";
        fs::create_dir_all(lib.join(t)).unwrap();
        fs::create_dir_all(lib.join("lib64")).unwrap();
        fs::write(lib.join(t).join("libc.so.6"), b"not elf").unwrap();
        fs::write(lib.join(t).join("libfoo.so.1.2.3"), b"not elf").unwrap();
        std::os::unix::fs::symlink("libfoo.so.1.2.3", lib.join(t).join("libfoo.so.1")).unwrap();
        std::os::unix::fs::symlink(
            "/lib/x86_64-linux-gnu/libc.so.6",
            lib.join("lib64/ld-linux-x86-64.so.2"),
        )
        .unwrap();
        let mut s = Stager::new(&apt, Arch::X86_64, &dir.path().join("work"), &tree);
        let info = PackageInfo {
            name: "libs".into(),
            version: "1".into(),
            sha256: String::new(),
            filename: "libs_1.deb".into(),
            arch: "amd64".into(),
        };
        s.unpacked.insert(
            "libs".into(),
            Unpacked {
                info: info.clone(),
                root: lib,
            },
        );
        s.owner.insert("usr/bin/app".into(), "app".into());
        s.close_libraries().unwrap();
        assert_eq!(
            fs::read_link(tree.join(t).join("libfoo.so.1")).unwrap(),
            PathBuf::from("libfoo.so.1.2.3")
        );
        assert!(tree.join(t).join("libfoo.so.1.2.3").is_file());
        assert!(tree.join("lib64/ld-linux-x86-64.so.2").exists());
        assert_eq!(s.contents.libraries, vec![info]);
        let mut files = s.contents.library_files.clone();
        files.sort();
        assert_eq!(
            files,
            [
                "lib/x86_64-linux-gnu/libc.so.6",
                "lib/x86_64-linux-gnu/libfoo.so.1",
                "lib/x86_64-linux-gnu/libfoo.so.1.2.3",
                "lib64/ld-linux-x86-64.so.2",
            ]
        );
    }

    #[test]
    fn an_unresolvable_library_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let apt = Apt::new("amd64", dir.path().join("cache"), BTreeMap::new());
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("usr/bin")).unwrap();
        fs::write(tree.join("usr/bin/app"), tiny_elf(elf::abi::EM_X86_64)).unwrap();
        let mut s = Stager::new(&apt, Arch::X86_64, &dir.path().join("work"), &tree);
        s.owner.insert("usr/bin/app".into(), "app".into());
        let err = s.close_libraries().unwrap_err().to_string();
        assert!(
            err.contains("usr/bin/app") && err.contains("needs"),
            "{err}"
        );
    }
}
