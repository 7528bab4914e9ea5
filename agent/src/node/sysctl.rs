//! Writing sysctls: each setting is a path under /proc/sys and a value,
//! written through [`ProcSys`] so the logic runs in tests without root.
//! Names are validated by the configuration (`config::kernel`); this module
//! still refuses a path that would leave /proc/sys.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

pub const PROC_SYS: &str = "/proc/sys";

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("sysctl {name}: not a path under {PROC_SYS}")]
    BadName { name: String },
    #[error("sysctl {name}: writing {value:?}")]
    Write {
        name: String,
        value: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a sysctl write goes through.
pub trait ProcSys {
    /// Writes `value` to the file `relative` (under /proc/sys); the file
    /// must exist (an unknown sysctl is an error, never a new file).
    fn write(&self, relative: &Path, value: &str) -> std::io::Result<()>;
}

/// The files of a directory: `/proc/sys` on a node, a temporary one in tests.
#[derive(Debug, Clone)]
pub struct Dir(pub PathBuf);

impl Default for Dir {
    fn default() -> Self {
        Dir(PathBuf::from(PROC_SYS))
    }
}

impl ProcSys for Dir {
    fn write(&self, relative: &Path, value: &str) -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(self.0.join(relative))?;
        // One write: the kernel parses each write(2) as the whole value.
        file.write_all(format!("{value}\n").as_bytes())
    }
}

/// Writes every `(path under /proc/sys, value)`, in order. One failure
/// (a sysctl this kernel lacks, a value it refuses) does not stop the rest;
/// the failures are returned (and logged) so the caller can report them.
pub fn apply(sys: &dyn ProcSys, settings: &[(String, String)]) -> Vec<SysctlError> {
    let mut failures = Vec::new();
    for (name, value) in settings {
        let relative = Path::new(name);
        let inside = !name.is_empty()
            && relative
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        let result = if inside {
            sys.write(relative, value)
                .map_err(|source| SysctlError::Write {
                    name: name.clone(),
                    value: value.clone(),
                    source,
                })
        } else {
            Err(SysctlError::BadName { name: name.clone() })
        };
        match result {
            Ok(()) => tracing::info!(sysctl = %name, %value, "sysctl set"),
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "sysctl not set");
                failures.push(e);
            }
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn writes_existing_files_and_reports_each_failure() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("net/ipv4")).unwrap();
        std::fs::write(dir.path().join("net/ipv4/ip_forward"), "0\n").unwrap();
        std::fs::create_dir_all(dir.path().join("fs/inotify")).unwrap();
        std::fs::write(dir.path().join("fs/inotify/max_user_watches"), "8192\n").unwrap();
        let failures = apply(
            &Dir(dir.path().to_owned()),
            &settings(&[
                ("net/ipv4/ip_forward", "1"),
                ("net/bridge/bridge-nf-call-iptables", "1"),
                ("../escape", "1"),
                ("/abs", "1"),
                ("fs/inotify/max_user_watches", "524288"),
            ]),
        );
        let read = |p: &str| std::fs::read_to_string(dir.path().join(p)).unwrap();
        assert_eq!(read("net/ipv4/ip_forward"), "1\n");
        assert_eq!(read("fs/inotify/max_user_watches"), "524288\n");
        let messages: Vec<String> = failures.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            messages,
            [
                "sysctl net/bridge/bridge-nf-call-iptables: writing \"1\"",
                "sysctl ../escape: not a path under /proc/sys",
                "sysctl /abs: not a path under /proc/sys",
            ]
        );
        // Nothing was created, inside or outside the directory.
        assert!(!dir.path().join("net/bridge").exists());
        assert!(!dir.path().join("abs").exists());
        assert!(!dir.path().parent().unwrap().join("escape").exists());
    }

    /// A kernel that refuses a value (EINVAL) is reported the same way.
    struct Refusing;

    impl ProcSys for Refusing {
        fn write(&self, _: &Path, _: &str) -> std::io::Result<()> {
            Err(std::io::Error::from_raw_os_error(22))
        }
    }

    #[test]
    fn a_refused_value_is_a_failure_naming_the_sysctl() {
        let failures = apply(&Refusing, &settings(&[("vm/swappiness", "x")]));
        assert_eq!(failures.len(), 1);
        let chain = crate::error_chain(&failures[0]);
        assert!(
            chain.contains("vm/swappiness") && chain.contains("os error 22"),
            "{chain}"
        );
    }
}
