//! Assembles Ballast's bootable disk image and update payload from Debian
//! packages and the agent binary, reproducibly and without root or loop
//! devices.
//!
//! [`build::build`] runs the whole pipeline; the other modules are its
//! parts: [`apt`] (packages by name, hashes checked), [`kmod`] (module
//! closure and order), [`platform`] (kernel and drivers per flavour),
//! [`formats`] (qcow2, VHD, VMDK through qemu-img),
//! [`cpio`] + [`initrd`], [`fsimage`] (erofs, dm-verity,
//! FAT, ext4 through their tools), [`gpt`] (partition tables), [`profile`]
//! (what each image profile ships: packages, libraries, modules),
//! [`kubelet`] (a kubelet fetched by URL and SHA-256 at build time), and
//! [`cmd`] (running those tools with useful errors).

#![forbid(unsafe_code)]

pub mod apt;
pub mod build;
pub mod cmd;
pub mod cpio;
pub mod formats;
pub mod fsimage;
pub mod gpt;
pub mod initrd;
pub mod kmod;
pub mod kubelet;
pub mod platform;
pub mod profile;

pub use build::{build, AgentSource, BuildOptions, BuildOutput, Progress, StderrProgress};
pub use platform::Platform;
pub use profile::Profile;
