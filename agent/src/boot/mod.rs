//! Early boot: the initramfs `/init` stage and what it (and PID 1 later)
//! needs of the machine: block devices and GPT, the boot facts handed from
//! the initramfs to PID 1, kernel modules and the drivers the hardware
//! needs, mounts, STATE growth, the disk identity and the CIDATA and
//! config-2 user-data volumes.

pub mod bootinfo;
pub mod cidata;
pub mod coldplug;
pub mod configdrive;
pub mod disk_identity;
pub mod disks;
pub mod gpt;
pub mod hotplug;
pub mod initramfs;
pub mod modules;
pub mod mounts;
pub mod state_grow;
