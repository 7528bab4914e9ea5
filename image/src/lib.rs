//! Assembles Ballast's bootable disk image and update payload from Debian
//! packages and the agent binary.
