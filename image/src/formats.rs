//! Disk image formats besides raw, converted from `disk.raw` by
//! `qemu-img convert`: qcow2 (OpenStack, libvirt), VHD (Azure: fixed size,
//! whole MiB) and VMDK (VMware, stream-optimised for upload).

use std::path::{Path, PathBuf};

use crate::cmd::{Cmd, CmdError};

/// An output format of `cargo xtask image --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
    Vhd,
    Vmdk,
}

impl DiskFormat {
    /// File extension of the converted image.
    pub fn extension(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vhd => "vhd",
            DiskFormat::Vmdk => "vmdk",
        }
    }

    /// `qemu-img convert` arguments after the input: output format, options.
    fn qemu_img_args(self) -> &'static [&'static str] {
        match self {
            DiskFormat::Raw => &["-O", "raw"],
            DiskFormat::Qcow2 => &["-O", "qcow2", "-c"],
            // Azure takes fixed VHDs only, of the exact size given.
            DiskFormat::Vhd => &["-O", "vpc", "-o", "subformat=fixed,force_size=on"],
            DiskFormat::Vmdk => &["-O", "vmdk", "-o", "subformat=streamOptimized"],
        }
    }
}

impl std::str::FromStr for DiskFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(DiskFormat::Raw),
            "qcow2" => Ok(DiskFormat::Qcow2),
            "vhd" => Ok(DiskFormat::Vhd),
            "vmdk" => Ok(DiskFormat::Vmdk),
            _ => Err(format!(
                "unknown disk format {s:?}: expected raw, qcow2, vhd or vmdk"
            )),
        }
    }
}

/// Writes `raw` as `format` beside it (`disk.qcow2` ...); raw is `raw` itself.
pub fn convert(raw: &Path, format: DiskFormat) -> Result<PathBuf, CmdError> {
    if format == DiskFormat::Raw {
        return Ok(raw.to_owned());
    }
    let out = raw.with_extension(format.extension());
    Cmd::new("qemu-img")
        .args(["convert", "-f", "raw"])
        .args(format.qemu_img_args())
        .arg(raw)
        .arg(&out)
        .run()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse() {
        for f in [
            DiskFormat::Raw,
            DiskFormat::Qcow2,
            DiskFormat::Vhd,
            DiskFormat::Vmdk,
        ] {
            assert_eq!(f.extension().parse::<DiskFormat>(), Ok(f));
        }
        assert!("vdi".parse::<DiskFormat>().unwrap_err().contains("qcow2"));
    }

    #[test]
    fn qemu_img_reads_back_each_format() {
        if !crate::cmd::have("qemu-img") {
            panic!("qemu-img is missing: run `cargo xtask deps`");
        }
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.raw");
        let mut data = vec![0u8; 4 << 20];
        data[512..520].copy_from_slice(b"EFI PART");
        std::fs::write(&raw, &data).unwrap();
        for (format, name) in [
            (DiskFormat::Qcow2, "qcow2"),
            (DiskFormat::Vhd, "vpc"),
            (DiskFormat::Vmdk, "vmdk"),
        ] {
            let out = convert(&raw, format).unwrap();
            if format == DiskFormat::Vhd {
                // A fixed VHD is the raw disk plus a 512-byte footer, which
                // qemu-img's probe reads as raw: check the footer itself.
                let vhd = std::fs::read(&out).unwrap();
                assert_eq!(vhd.len(), data.len() + 512);
                assert_eq!(&vhd[data.len()..data.len() + 8], b"conectix");
                assert_eq!(&vhd[..data.len()], &data[..]);
            } else {
                let info = Cmd::new("qemu-img").arg("info").arg(&out).output().unwrap();
                assert!(info.contains(&format!("file format: {name}")), "{info}");
            }
            // and back to the same bytes
            let back = dir.path().join(format!("back-{name}.raw"));
            Cmd::new("qemu-img")
                .args(["convert", "-f", name, "-O", "raw"])
                .arg(&out)
                .arg(&back)
                .run()
                .unwrap();
            assert_eq!(std::fs::read(&back).unwrap(), data, "{name}");
        }
    }
}
