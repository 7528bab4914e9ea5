//! Debian packages by name for a target architecture: resolves the version
//! (candidate or pinned) and its SHA-256 from apt's signed indexes
//! (`apt-cache show`), downloads with `apt-get download` into a cache,
//! checks every .deb against that hash (cached files too), and unpacks with
//! `dpkg-deb -x`. Also resolves the kernel ABI package from its metapackage.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::cmd::{Cmd, CmdError};

#[derive(Debug, thiserror::Error)]
pub enum AptError {
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error("apt knows no package {spec} (run `cargo xtask deps`, which adds the architecture and runs apt-get update)")]
    NotFound { spec: String },
    #[error("apt's record of {spec} lacks the field {field}")]
    MissingField { spec: String, field: &'static str },
    #[error("{package}: downloaded {path} has SHA-256 {actual}, apt's index says {expected}")]
    HashMismatch {
        package: String,
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{package}: apt-get download left no single .deb in {dir}")]
    NoDownload { package: String, dir: PathBuf },
    #[error("metapackage {meta}={version} depends on no linux-image package")]
    NoKernel { meta: String, version: String },
    #[error("{package}: candidate {version} comes from backports; pin a bookworm version with --pin {package}=VERSION")]
    Backports { package: String, version: String },
    #[error("invalid pin {0:?}: expected NAME=VERSION")]
    Pin(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AptError + '_ {
    move |source| AptError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One stanza of `apt-cache show`: field name to value (continuation lines
/// joined with newlines).
pub type Stanza = BTreeMap<String, String>;

/// Parses Debian control-file syntax (what `apt-cache show` prints).
pub fn parse_stanzas(text: &str) -> Vec<Stanza> {
    let mut out = Vec::new();
    let mut cur = Stanza::new();
    let mut last: Option<String> = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            last = None;
        } else if line.starts_with([' ', '\t']) {
            if let Some(v) = last.as_ref().and_then(|k| cur.get_mut(k)) {
                v.push('\n');
                v.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            cur.insert(k.to_owned(), v.trim().to_owned());
            last = Some(k.to_owned());
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The `Depends:` package names of `apt-cache depends` output, without
/// `:arch` suffixes, alternatives included, virtual packages (`<name>`)
/// skipped.
pub fn parse_depends(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim().trim_start_matches('|');
            l.strip_prefix("Depends:")
                .or_else(|| l.strip_prefix("PreDepends:"))
        })
        .map(str::trim)
        .filter(|n| !n.starts_with('<'))
        .map(|n| n.split(':').next().unwrap_or(n).to_owned())
        .collect()
}

/// Parses `NAME=VERSION` pins.
pub fn parse_pins<S: AsRef<str>>(pins: &[S]) -> Result<BTreeMap<String, String>, AptError> {
    pins.iter()
        .map(|p| {
            let p = p.as_ref();
            match p.split_once('=') {
                Some((n, v)) if !n.is_empty() && !v.is_empty() => Ok((n.to_owned(), v.to_owned())),
                _ => Err(AptError::Pin(p.to_owned())),
            }
        })
        .collect()
}

/// A package version as apt's index describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageInfo {
    pub name: String,
    pub version: String,
    pub sha256: String,
    /// Pool path of the .deb (its basename names the cache file).
    pub filename: String,
    /// The .deb's architecture: the target's, or `all` for
    /// architecture-independent packages (ca-certificates).
    pub arch: String,
}

impl PackageInfo {
    /// `name=version`, as recorded in metadata and `packages.txt`.
    pub fn spec(&self) -> String {
        format!("{}={}", self.name, self.version)
    }

    fn from_stanza(spec: &str, s: &Stanza) -> Result<Self, AptError> {
        let get = |field: &'static str| {
            s.get(field).cloned().ok_or_else(|| AptError::MissingField {
                spec: spec.to_owned(),
                field,
            })
        };
        Ok(PackageInfo {
            name: get("Package")?,
            version: get("Version")?,
            sha256: get("SHA256")?.to_ascii_lowercase(),
            filename: get("Filename")?,
            arch: get("Architecture")?,
        })
    }

    /// `name:arch=version`, what apt-get and apt-cache are asked for.
    fn qualified(&self) -> String {
        format!("{}:{}={}", self.name, self.arch, self.version)
    }
}

/// Kernel flavour of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFlavor {
    /// `linux-image-cloud-<arch>`: small, VM drivers only.
    Cloud,
    /// `linux-image-<arch>`: bare-metal drivers and hardware watchdogs.
    Generic,
}

impl KernelFlavor {
    pub fn metapackage(self, debarch: &str) -> String {
        match self {
            KernelFlavor::Cloud => format!("linux-image-cloud-{debarch}"),
            KernelFlavor::Generic => format!("linux-image-{debarch}"),
        }
    }
}

impl std::str::FromStr for KernelFlavor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cloud" => Ok(KernelFlavor::Cloud),
            "generic" => Ok(KernelFlavor::Generic),
            _ => Err(format!(
                "unknown kernel flavour {s:?}: expected cloud or generic"
            )),
        }
    }
}

/// Picks the kernel ABI package among a metapackage's dependencies.
pub fn pick_kernel_package(meta: &str, deps: &[String]) -> Option<String> {
    deps.iter()
        .find(|d| d.starts_with("linux-image-") && *d != meta)
        .cloned()
}

/// apt for one Debian architecture, with pins and a download cache.
#[derive(Debug, Clone)]
pub struct Apt {
    pub debarch: String,
    pub cache_dir: PathBuf,
    pub pins: BTreeMap<String, String>,
}

impl Apt {
    pub fn new(debarch: &str, cache_dir: PathBuf, pins: BTreeMap<String, String>) -> Self {
        Apt {
            debarch: debarch.to_owned(),
            cache_dir,
            pins,
        }
    }

    fn spec(&self, name: &str, version: Option<&str>) -> String {
        match version {
            Some(v) => format!("{name}:{}={v}", self.debarch),
            None => format!("{name}:{}", self.debarch),
        }
    }

    /// The pinned version of `name`, else apt's candidate: for the target
    /// architecture, else architecture-independent (`name:all`, which apt
    /// does not find under a foreign architecture's name).
    pub fn resolve(&self, name: &str) -> Result<PackageInfo, AptError> {
        let pin = self.pins.get(name).map(String::as_str);
        let spec = self.spec(name, pin);
        match self.show(&spec) {
            Err(AptError::NotFound { .. }) => {
                let all = match pin {
                    Some(v) => format!("{name}:all={v}"),
                    None => format!("{name}:all"),
                };
                self.show(&all)
                    .map_err(|_| AptError::NotFound { spec: spec.clone() })
            }
            other => other,
        }
    }

    fn show(&self, spec: &str) -> Result<PackageInfo, AptError> {
        let spec = spec.to_owned();
        let out = Cmd::new("apt-cache")
            .args(["show", "--no-all-versions", &spec])
            .output()
            .map_err(|e| match e {
                CmdError::Failed { .. } => AptError::NotFound { spec: spec.clone() },
                other => AptError::Cmd(other),
            })?;
        let stanzas = parse_stanzas(&out);
        let stanza = stanzas
            .first()
            .ok_or_else(|| AptError::NotFound { spec: spec.clone() })?;
        PackageInfo::from_stanza(&spec, stanza)
    }

    /// Like [`Apt::resolve`] but refuses a backports candidate unless pinned.
    pub fn resolve_stable(&self, name: &str) -> Result<PackageInfo, AptError> {
        let info = self.resolve(name)?;
        if info.version.contains("~bpo") && !self.pins.contains_key(name) {
            return Err(AptError::Backports {
                package: info.name,
                version: info.version,
            });
        }
        Ok(info)
    }

    /// Dependencies of one package version.
    pub fn depends(&self, info: &PackageInfo) -> Result<Vec<String>, AptError> {
        let out = Cmd::new("apt-cache")
            .args(["depends", &info.qualified()])
            .output()?;
        Ok(parse_depends(&out))
    }

    /// Resolves the kernel metapackage and then the ABI package it names.
    /// Returns `(metapackage, kernel package)`.
    pub fn resolve_kernel(
        &self,
        flavor: KernelFlavor,
    ) -> Result<(PackageInfo, PackageInfo), AptError> {
        let meta_name = flavor.metapackage(&self.debarch);
        let meta = self.resolve(&meta_name)?;
        let deps = self.depends(&meta)?;
        let kernel = pick_kernel_package(&meta_name, &deps).ok_or_else(|| AptError::NoKernel {
            meta: meta_name.clone(),
            version: meta.version.clone(),
        })?;
        let kernel = self.resolve(&kernel)?;
        Ok((meta, kernel))
    }

    /// The .deb of `info` in the cache, downloading it when missing or bad.
    /// Its SHA-256 is always checked against apt's index.
    pub fn fetch(&self, info: &PackageInfo) -> Result<PathBuf, AptError> {
        fs::create_dir_all(&self.cache_dir).map_err(io(&self.cache_dir))?;
        let base = info
            .filename
            .rsplit('/')
            .next()
            .unwrap_or(&info.filename)
            .to_owned();
        let path = self.cache_dir.join(&base);
        if path.exists() && sha256_file(&path)? == info.sha256 {
            return Ok(path);
        }
        let tmp = self.cache_dir.join(format!(".download-{}", info.name));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        Cmd::new("apt-get")
            .args(["download", "-q", &info.qualified()])
            .current_dir(&tmp)
            .run()?;
        let debs: Vec<PathBuf> = fs::read_dir(&tmp)
            .map_err(io(&tmp))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "deb"))
            .collect();
        let [deb] = debs.as_slice() else {
            return Err(AptError::NoDownload {
                package: info.spec(),
                dir: tmp,
            });
        };
        let actual = sha256_file(deb)?;
        if actual != info.sha256 {
            return Err(AptError::HashMismatch {
                package: info.spec(),
                path: deb.clone(),
                expected: info.sha256.clone(),
                actual,
            });
        }
        fs::rename(deb, &path).map_err(io(&path))?;
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        Ok(path)
    }
}

/// Unpacks a .deb's data into `dest` (created if needed).
pub fn unpack(deb: &Path, dest: &Path) -> Result<(), AptError> {
    fs::create_dir_all(dest).map_err(io(dest))?;
    Cmd::new("dpkg-deb").arg("-x").arg(deb).arg(dest).run()?;
    Ok(())
}

/// Lowercase hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, AptError> {
    let mut f = fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOW: &str = include_str!("../tests/fixtures/apt-cache-show.txt");
    const DEPENDS: &str = include_str!("../tests/fixtures/apt-cache-depends.txt");

    #[test]
    fn show_output_gives_version_and_hash() {
        let stanzas = parse_stanzas(SHOW);
        assert_eq!(stanzas.len(), 1);
        let info = PackageInfo::from_stanza("x", &stanzas[0]).unwrap();
        assert_eq!(info.name, "systemd-boot-efi");
        assert_eq!(info.version, "252.39-1~deb12u2");
        assert_eq!(
            info.sha256,
            "d75fbbfa90d37d409e7e65f1149afd770bc17daa3f15f49ef651f608fe7e1dbc"
        );
        assert!(info
            .filename
            .ends_with("systemd-boot-efi_252.39-1~deb12u2_arm64.deb"));
        let cont = parse_stanzas("A: 1\nB: x\n y\n\nA: 2\n");
        assert_eq!(cont.len(), 2);
        assert_eq!(cont[0]["B"], "x\ny");
        assert_eq!(info.spec(), "systemd-boot-efi=252.39-1~deb12u2");
        assert_eq!(info.qualified(), "systemd-boot-efi:arm64=252.39-1~deb12u2");
    }

    #[test]
    fn depends_output_names_the_abi_package() {
        let deps = parse_depends(DEPENDS);
        assert_eq!(deps, vec!["linux-image-6.1.0-56-cloud-arm64".to_owned()]);
        assert_eq!(
            pick_kernel_package("linux-image-cloud-arm64", &deps).as_deref(),
            Some("linux-image-6.1.0-56-cloud-arm64")
        );
        let generic =
            "linux-image-arm64\n  Depends: linux-image-6.1.0-56-arm64\n |Depends: <virtual>\n";
        assert_eq!(
            pick_kernel_package("linux-image-arm64", &parse_depends(generic)).as_deref(),
            Some("linux-image-6.1.0-56-arm64")
        );
    }

    #[test]
    fn pins_parse_and_reject_garbage() {
        let p = parse_pins(&["a=1", "b=2:3-4"]).unwrap();
        assert_eq!(p["b"], "2:3-4");
        assert!(parse_pins(&["a"]).is_err());
        assert!(parse_pins(&["=1"]).is_err());
    }

    #[test]
    fn kernel_metapackages() {
        assert_eq!(
            KernelFlavor::Cloud.metapackage("amd64"),
            "linux-image-cloud-amd64"
        );
        assert_eq!(
            KernelFlavor::Generic.metapackage("arm64"),
            "linux-image-arm64"
        );
    }
}
