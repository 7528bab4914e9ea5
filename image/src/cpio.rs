//! A reproducible cpio "newc" archive (the initramfs format): entries in
//! sorted path order, parents created implicitly, owner root, one fixed
//! mtime, inode numbers assigned in order.

use std::collections::BTreeMap;
use std::io::Write;

use cpio::newc::{Builder, ModeFileType};

#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("cpio path {0:?} must be relative, without `.`/`..` or empty parts")]
    Path(String),
    #[error("cpio entry {0:?} is larger than newc's 4 GiB limit")]
    TooLarge(String),
    #[error("{path:?} is both a directory and a non-directory in the archive")]
    Conflict { path: String },
    #[error("writing cpio entry {path:?}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What an archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDev { mode: u32, major: u32, minor: u32 },
}

/// An archive under construction; paths are relative (`init`, `dev/console`).
#[derive(Debug, Clone, Default)]
pub struct Archive {
    entries: BTreeMap<String, Node>,
}

fn check_path(path: &str) -> Result<(), CpioError> {
    if path.is_empty()
        || path.starts_with('/')
        || path
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
    {
        return Err(CpioError::Path(path.to_owned()));
    }
    Ok(())
}

impl Archive {
    pub fn new() -> Self {
        Archive::default()
    }

    /// Adds `node` at `path`, creating missing parent directories (0755).
    pub fn add(&mut self, path: &str, node: Node) -> Result<(), CpioError> {
        check_path(path)?;
        let mut parent = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            match self.entries.get(&parent) {
                None => {
                    self.entries
                        .insert(parent.clone(), Node::Dir { mode: 0o755 });
                }
                Some(Node::Dir { .. }) => {}
                Some(_) => return Err(CpioError::Conflict { path: parent }),
            }
        }
        if let Some(existing) = self.entries.get(path) {
            let both_dirs =
                matches!(existing, Node::Dir { .. }) && matches!(node, Node::Dir { .. });
            if !both_dirs
                && (matches!(existing, Node::Dir { .. }) || matches!(node, Node::Dir { .. }))
            {
                return Err(CpioError::Conflict {
                    path: path.to_owned(),
                });
            }
        }
        self.entries.insert(path.to_owned(), node);
        Ok(())
    }

    pub fn dir(&mut self, path: &str) -> Result<(), CpioError> {
        self.add(path, Node::Dir { mode: 0o755 })
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> Result<(), CpioError> {
        self.add(path, Node::File { mode, data })
    }

    pub fn get(&self, path: &str) -> Option<&Node> {
        self.entries.get(path)
    }

    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The archive bytes: every entry with uid/gid 0 and `mtime`, in sorted
    /// order (so each directory precedes its contents), then the trailer.
    pub fn to_bytes(&self, mtime: u32) -> Result<Vec<u8>, CpioError> {
        let mut out = Vec::new();
        for (ino, (path, node)) in (1u32..).zip(&self.entries) {
            let werr = |source| CpioError::Write {
                path: path.clone(),
                source,
            };
            let b = Builder::new(path).ino(ino).uid(0).gid(0).mtime(mtime);
            let (b, data): (Builder, &[u8]) = match node {
                Node::Dir { mode } => (
                    b.mode(*mode)
                        .nlink(2)
                        .set_mode_file_type(ModeFileType::Directory),
                    &[],
                ),
                Node::File { mode, data } => (
                    b.mode(*mode).set_mode_file_type(ModeFileType::Regular),
                    data,
                ),
                Node::Symlink { target } => (
                    b.mode(0o777).set_mode_file_type(ModeFileType::Symlink),
                    target.as_bytes(),
                ),
                Node::CharDev { mode, major, minor } => (
                    b.mode(*mode)
                        .rdev_major(*major)
                        .rdev_minor(*minor)
                        .set_mode_file_type(ModeFileType::Char),
                    &[],
                ),
            };
            let size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge(path.clone()))?;
            let mut w = b.write(&mut out, size);
            w.write_all(data).map_err(werr)?;
            w.finish().map_err(werr)?;
        }
        cpio::newc::trailer(&mut out).map_err(|source| CpioError::Write {
            path: "TRAILER!!!".to_owned(),
            source,
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_device_and_file_headers_are_exact() {
        let mut a = Archive::new();
        a.add(
            "dev/console",
            Node::CharDev {
                mode: 0o600,
                major: 5,
                minor: 1,
            },
        )
        .unwrap();
        a.file("init", 0o755, b"hi".to_vec()).unwrap();
        let bytes = a.to_bytes(0x5f5e1000).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        // dev (implicit dir), dev/console, init, trailer
        // magic ino mode uid gid nlink mtime size devmaj devmin rdevmaj rdevmin namesize check
        let hdr = |ino: u32, mode: u32, nlink: u32, size: u32, rdev: (u32, u32), name: &str| {
            format!(
                "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{name}\0",
                0, 0, 0x5f5e1000u32, 0, 0, rdev.0, rdev.1, name.len() + 1, 0
            )
        };
        assert!(
            text.starts_with(&hdr(1, 0o40755, 2, 0, (0, 0), "dev")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "{}\0\0",
                hdr(2, 0o20600, 1, 0, (5, 1), "dev/console")
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "{}\0hi\0\0",
                hdr(3, 0o100755, 1, 2, (0, 0), "init")
            )),
            "{text}"
        );
        assert!(text.contains("TRAILER!!!"));
        assert_eq!(bytes.len() % 4, 0);
        // read back with the crate's reader
        let mut r = std::io::Cursor::new(bytes);
        let mut names = Vec::new();
        loop {
            let reader = cpio::NewcReader::new(r).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            names.push((reader.entry().name().to_owned(), reader.entry().mode()));
            r = reader.finish().unwrap();
        }
        assert_eq!(
            names,
            vec![
                ("dev".to_owned(), 0o40755),
                ("dev/console".to_owned(), 0o20600),
                ("init".to_owned(), 0o100755)
            ]
        );
    }

    #[test]
    fn same_content_in_any_insertion_order_gives_same_bytes() {
        let mut a = Archive::new();
        a.file("lib/modules/k/b.ko", 0o644, vec![1; 5]).unwrap();
        a.file("lib/modules/k/a.ko", 0o644, vec![2; 7]).unwrap();
        a.dir("proc").unwrap();
        let mut b = Archive::new();
        b.dir("proc").unwrap();
        b.file("lib/modules/k/a.ko", 0o644, vec![2; 7]).unwrap();
        b.file("lib/modules/k/b.ko", 0o644, vec![1; 5]).unwrap();
        assert_eq!(a.to_bytes(7).unwrap(), b.to_bytes(7).unwrap());
    }

    #[test]
    fn bad_paths_and_conflicts_are_refused() {
        let mut a = Archive::new();
        for bad in ["", "/init", "a//b", "../x", "a/./b"] {
            assert!(a.dir(bad).is_err(), "{bad}");
        }
        a.file("x", 0o644, vec![]).unwrap();
        assert!(a.file("x/y", 0o644, vec![]).is_err());
        assert!(a.dir("x").is_err());
    }
}
