//! VM test harness for Ballast images: QEMU command lines for both
//! architectures, serial capture parsed into console events, scenarios.
