//! Filesystem images made by external tools, each reproducibly: the usr
//! image (`mkfs.erofs` with a fixed timestamp and UUID), its dm-verity tree
//! (`veritysetup format`, fixed salt and UUID, tree appended after the data),
//! the ESP (`mkfs.fat --invariant` + mtools copying in sorted order with
//! preserved, fixed mtimes) and STATE (`mke2fs` with fixed UUID, hash seed
//! and `E2FSPROGS_FAKE_TIME`). Also the staging-tree helpers they share.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ballast_updater::payload::VerityParams;
use uuid::Uuid;

use crate::cmd::{Cmd, CmdError};

/// Data and hash block size of the usr image.
pub const BLOCK: u64 = BLOCK_U32 as u64;
/// [`BLOCK`] as dm-verity's parameters carry it.
const BLOCK_U32: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("veritysetup printed no root hash for {path}: {output}")]
    NoRootHash { path: PathBuf, output: String },
    #[error("{what} needs {need} bytes but has only {have}")]
    TooBig { what: String, need: u64, have: u64 },
    #[error("{path}: unexpected tool output {output:?}")]
    Parse { path: PathBuf, output: String },
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FsError + '_ {
    move |source| FsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Sets every entry under `root` (and `root`) to mtime `epoch`, without
/// following symlinks, and normalizes modes: directories 0755 unless
/// listed in `special`, files 0755 when executable else 0644.
pub fn normalize_tree(root: &Path, epoch: u64, special: &[(&str, u32)]) -> Result<(), FsError> {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![root.to_owned()];
    let mut all = Vec::new();
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            let path = e.path();
            let ft = e.file_type().map_err(io(&path))?;
            if ft.is_dir() {
                stack.push(path.clone());
            }
            all.push((path, ft));
        }
    }
    all.push((
        root.to_owned(),
        fs::symlink_metadata(root).map_err(io(root))?.file_type(),
    ));
    for (path, ft) in &all {
        let rel = path
            .strip_prefix(root)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned();
        if !ft.is_symlink() {
            let mode = if let Some((_, m)) = special.iter().find(|(p, _)| *p == rel) {
                *m
            } else if ft.is_dir() {
                0o755
            } else {
                let cur = fs::metadata(path).map_err(io(path))?.permissions().mode();
                if cur & 0o100 != 0 {
                    0o755
                } else {
                    0o644
                }
            };
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io(path))?;
        }
    }
    // mtimes last, deepest first, so setting a child does not touch its parent
    all.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (path, _) in &all {
        Cmd::new("touch")
            .args(["-h", "-d", &format!("@{epoch}")])
            .arg(path)
            .run()?;
    }
    Ok(())
}

/// Writes `data` to `path`, creating parent directories.
pub fn write_file(path: &Path, data: &[u8]) -> Result<(), FsError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io(parent))?;
    }
    fs::write(path, data).map_err(io(path))
}

/// Builds an erofs image of `tree` at `out` (all files root-owned, every
/// timestamp `epoch`, filesystem UUID `uuid`), padded to [`BLOCK`].
pub fn mkfs_erofs(
    tree: &Path,
    out: &Path,
    epoch: u64,
    uuid: Uuid,
    compress: Option<&str>,
) -> Result<u64, FsError> {
    let _ = fs::remove_file(out);
    let mut cmd = Cmd::new("mkfs.erofs")
        .arg("--quiet")
        .arg(format!("-T{epoch}"))
        .arg(format!("-U{}", uuid.hyphenated()))
        .arg("--all-root")
        .arg("-x-1");
    if let Some(c) = compress {
        cmd = cmd.arg(format!("-z{c}"));
    }
    cmd.arg(out).arg(tree).run()?;
    pad_to(out, BLOCK)
}

/// Pads the file with zeros to a multiple of `block`; returns the new size.
pub fn pad_to(path: &Path, block: u64) -> Result<u64, FsError> {
    let len = fs::metadata(path).map_err(io(path))?.len();
    let padded = len.div_ceil(block) * block;
    if padded != len {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io(path))?;
        f.set_len(padded).map_err(io(path))?;
    }
    Ok(padded)
}

/// The root hash in `veritysetup format` output.
pub fn parse_root_hash(output: &str) -> Option<String> {
    output.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "Root hash").then(|| v.trim().to_ascii_lowercase())
    })
}

/// Turns the padded filesystem image `data` into `out` = data followed by
/// its dm-verity hash device (superblock, then tree), with a fixed salt and
/// UUID; returns the verity parameters.
pub fn verity_format(
    data: &Path,
    out: &Path,
    salt_hex: &str,
    uuid: Uuid,
) -> Result<VerityParams, FsError> {
    let data_size = pad_to(data, BLOCK)?;
    let hash = out.with_extension("hashtree");
    let _ = fs::remove_file(&hash);
    let output = Cmd::new("veritysetup")
        .arg("format")
        .arg(data)
        .arg(&hash)
        .args(["--salt", salt_hex])
        .args(["--uuid", &uuid.hyphenated().to_string()])
        .args([
            "--data-block-size",
            "4096",
            "--hash-block-size",
            "4096",
            "--hash",
            "sha256",
        ])
        .output()?;
    let root_hash = parse_root_hash(&output).ok_or_else(|| FsError::NoRootHash {
        path: data.to_owned(),
        output: output.clone(),
    })?;
    concat(&[data, &hash], out)?;
    fs::remove_file(&hash).map_err(io(&hash))?;
    Ok(VerityParams {
        root_hash,
        salt: salt_hex.to_owned(),
        data_blocks: data_size / BLOCK,
        data_block_size: BLOCK_U32,
        hash_block_size: BLOCK_U32,
        hash_offset: data_size,
        hash_algorithm: "sha256".to_owned(),
    })
}

/// Checks `img` (data + appended tree) against `params` with `veritysetup
/// verify`, reading every block in user space.
pub fn verity_verify(img: &Path, params: &VerityParams) -> Result<(), FsError> {
    Cmd::new("veritysetup")
        .arg("verify")
        .arg(img)
        .arg(img)
        .arg(&params.root_hash)
        .arg(format!("--hash-offset={}", params.hash_offset))
        .arg(format!("--data-blocks={}", params.data_blocks))
        .run()?;
    Ok(())
}

fn concat(parts: &[&Path], out: &Path) -> Result<(), FsError> {
    let mut w = fs::File::create(out).map_err(io(out))?;
    for p in parts {
        let mut r = fs::File::open(p).map_err(io(p))?;
        std::io::copy(&mut r, &mut w).map_err(io(out))?;
    }
    w.flush().map_err(io(out))
}

/// A FAT32 image of `size` bytes at `out` holding `tree`'s contents.
/// Volume ID and label are fixed; entries are created in sorted order with
/// the tree's (normalized) mtimes, so the bytes depend only on the tree.
pub fn mkfs_esp(tree: &Path, out: &Path, size: u64, volume_id: u32) -> Result<(), FsError> {
    let _ = fs::remove_file(out);
    Cmd::new("mkfs.fat")
        .args([
            "-C",
            "--invariant",
            "-F",
            "32",
            "-S",
            "512",
            "-s",
            "1",
            "-n",
            "ESP",
        ])
        .args(["-i", &format!("{volume_id:08x}")])
        .arg(out)
        .arg((size / 1024).to_string())
        .run()?;
    let mut entries = Vec::new();
    collect_sorted(tree, Path::new(""), &mut entries)?;
    let empty_root = out.with_extension("mkdir");
    for (rel, is_dir) in entries {
        let src = tree.join(&rel);
        let parent = rel
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dest = format!("::/{parent}");
        if is_dir {
            // Copy an empty directory of the same name and mtime: mtools
            // then creates it with that mtime, and its children follow in
            // sorted order (mcopy -s would use readdir order).
            let name = rel.file_name().map(PathBuf::from).unwrap_or_default();
            let _ = fs::remove_dir_all(&empty_root);
            let empty = empty_root.join(&name);
            fs::create_dir_all(&empty).map_err(io(&empty))?;
            let mtime = fs::metadata(&src)
                .map_err(io(&src))?
                .modified()
                .map_err(io(&src))?;
            let f = fs::File::open(&empty).map_err(io(&empty))?;
            f.set_modified(mtime).map_err(io(&empty))?;
            Cmd::new("mcopy")
                .env("MTOOLS_SKIP_CHECK", "1")
                .args(["-s", "-m", "-i"])
                .arg(out)
                .arg(&empty)
                .arg(&dest)
                .run()?;
        } else {
            Cmd::new("mcopy")
                .env("MTOOLS_SKIP_CHECK", "1")
                .args(["-m", "-i"])
                .arg(out)
                .arg(&src)
                .arg(format!("::/{}", rel.to_string_lossy()))
                .run()?;
        }
    }
    let _ = fs::remove_dir_all(&empty_root);
    Ok(())
}

fn collect_sorted(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, bool)>) -> Result<(), FsError> {
    let dir = root.join(rel);
    let mut names: Vec<(String, bool)> = Vec::new();
    for e in fs::read_dir(&dir).map_err(io(&dir))? {
        let e = e.map_err(io(&dir))?;
        let is_dir = e.file_type().map_err(io(&e.path()))?.is_dir();
        names.push((e.file_name().to_string_lossy().into_owned(), is_dir));
    }
    names.sort();
    for (name, is_dir) in names {
        let r = rel.join(&name);
        out.push((r.clone(), is_dir));
        if is_dir {
            collect_sorted(root, &r, out)?;
        }
    }
    Ok(())
}

/// An empty ext4 filesystem labelled STATE, reproducible.
pub fn mkfs_state(
    out: &Path,
    size: u64,
    uuid: Uuid,
    hash_seed: Uuid,
    epoch: u64,
) -> Result<(), FsError> {
    let _ = fs::remove_file(out);
    let f = fs::File::create(out).map_err(io(out))?;
    f.set_len(size).map_err(io(out))?;
    drop(f);
    Cmd::new("mke2fs")
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
        .args([
            "-q", "-F", "-t", "ext4", "-L", "STATE", "-b", "4096", "-I", "256",
        ])
        .args(["-U", &uuid.hyphenated().to_string()])
        .arg(format!(
            "-Eroot_owner=0:0,hash_seed={},nodiscard,lazy_itable_init=0,lazy_journal_init=0",
            hash_seed.hyphenated()
        ))
        .arg(out)
        .run()?;
    Ok(())
}

/// Used bytes of an ext4 image (`dumpe2fs -h`).
pub fn ext4_used(img: &Path) -> Result<u64, FsError> {
    let out = Cmd::new("dumpe2fs").arg("-h").arg(img).output()?;
    let field = |name: &str| -> Option<u64> {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_start_matches(':').trim().parse().ok())
    };
    match (
        field("Block count"),
        field("Free blocks"),
        field("Block size"),
    ) {
        (Some(total), Some(free), Some(bs)) => Ok((total - free) * bs),
        _ => Err(FsError::Parse {
            path: img.to_owned(),
            output: out,
        }),
    }
}

/// Copies `src` into `dst` at `offset`, skipping all-zero 64 KiB chunks so
/// the target stays sparse. Fails when `src` is larger than `limit`.
pub fn copy_into(
    src: &Path,
    dst: &fs::File,
    dst_path: &Path,
    offset: u64,
    limit: u64,
    what: &str,
) -> Result<u64, FsError> {
    use std::os::unix::fs::FileExt;
    let len = fs::metadata(src).map_err(io(src))?.len();
    if len > limit {
        return Err(FsError::TooBig {
            what: what.to_owned(),
            need: len,
            have: limit,
        });
    }
    let mut r = fs::File::open(src).map_err(io(src))?;
    let mut buf = vec![0u8; 1 << 16];
    let mut pos = 0u64;
    loop {
        let n = read_full(&mut r, &mut buf).map_err(io(src))?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], offset + pos)
                .map_err(io(dst_path))?;
        }
        pos += n as u64;
    }
    Ok(len)
}

fn read_full(r: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_hash_is_found_in_veritysetup_output() {
        let out = "VERITY header information for x\nUUID:            \t1\nSalt:            \t00ff\nRoot hash:      \tB6690F037152773ff7c05eef384ab7c1c228070eb05fd243f173bd675d9ab42f\n";
        assert_eq!(
            parse_root_hash(out).as_deref(),
            Some("b6690f037152773ff7c05eef384ab7c1c228070eb05fd243f173bd675d9ab42f")
        );
        assert_eq!(parse_root_hash("nothing"), None);
    }
}
