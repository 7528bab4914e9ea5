//! Ballast's update machinery: the payload metadata produced by the image
//! build, the kernel command line that names a slot, systemd-boot entries with
//! boot counting, and (see the other modules) signed manifests and the
//! verified, power-loss-safe install into the inactive slot.
//!
//! The core logic has no async runtime and does all I/O through small traits
//! so every step runs on plain files in tests.

#![forbid(unsafe_code)]

pub mod bootentry;
pub mod bootmodel;
pub mod chunks;
pub mod cmdline;
pub mod control;
pub mod delta;
pub mod digest;
pub mod esp;
pub mod fetch;
#[cfg(feature = "http")]
pub mod http;
pub mod install;
pub mod keys;
pub mod manifest;
pub mod pace;
pub mod payload;
pub mod repo;
pub mod state;
pub mod storage;
