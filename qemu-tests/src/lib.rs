//! VM test harness for Ballast images: QEMU command lines for both
//! architectures ([`vm`]), serial capture parsed into console events
//! ([`events`]), disk overlays and GPT reading ([`disk`]), the busybox
//! boot-time floor ([`floor`]), the built image under test ([`image`]), a
//! tiny HTTP client ([`http`]) and its pinned TLS form for the agent's
//! HTTPS API ([`tls`]), the operator with the host's `ballast` client and
//! CA ([`operator`]), and the scenarios `cargo xtask vm-test` runs
//! ([`scenarios`], the automatic-update ones in [`update`], the
//! k8s-profile one in [`k8s`], the remote-operations one in [`remote`],
//! and the time-sync one in [`timelab`] inside the network lab
//! [`netlab`]; the metal-flavour ones, NVMe and SATA boot disks, in [`metal`]).
//!
//! Nothing here runs under a plain `cargo test` except the pure parts'
//! unit tests: booting VMs takes minutes under TCG.

#![forbid(unsafe_code)]

pub mod bond;
pub mod cloud;
pub mod disk;
pub mod events;
pub mod floor;
pub mod hostile;
pub mod http;
pub mod image;
pub mod k8s;
pub mod k8s_strategy;
pub mod metal;
pub mod netlab;
pub mod operator;
pub mod remote;
pub mod runtime;
pub mod scenarios;
pub mod timelab;
pub mod tls;
pub mod update;
pub mod vm;

pub use events::Event;
pub use vm::{Accel, Boot, Console, GuestFwd, Storage, Vm, VmBuilder, VmError};
