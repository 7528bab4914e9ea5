//! Run-time hotplug: listens for the kernel's uevents
//! (`NETLINK_KOBJECT_UEVENT`) and loads the drivers of each added device by
//! its `MODALIAS`, through the same [`Drivers`] coldplug used, so that
//! hot-plugged NICs and disks get their drivers. The socket is opened
//! before the coldplug walk, so that no device added during the walk is
//! missed; a receive-buffer overflow (a burst of events) is answered with
//! another walk of `/sys/devices`.
//!
//! The message parser is pure and tested; the socket comes from
//! `netlink-sys` (close-on-exec, so it never leaks across `switch_root`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use netlink_sys::{protocols::NETLINK_KOBJECT_UEVENT, Socket, SocketAddr};

use crate::boot::coldplug::{ColdplugError, Drivers, ModuleLoader, Outcome};

/// The kernel's uevent multicast group (udev re-broadcasts on group 2).
const KERNEL_GROUP: u32 = 1;
/// Receive buffer for event bursts (a PCI bus scan, a USB hub with disks).
const RECEIVE_BUFFER: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    #[error("opening the kernel uevent socket")]
    Socket(#[source] std::io::Error),
    #[error("starting the uevent listener thread")]
    Thread(#[source] std::io::Error),
}

/// One kernel uevent, reduced to what driver loading needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    pub action: String,
    pub devpath: String,
    pub modalias: Option<String>,
}

impl Uevent {
    /// Parses a kernel uevent: `ACTION@DEVPATH\0KEY=VALUE\0...`. Anything
    /// else (udev's `libudev` messages, truncated or non-UTF-8 data) is
    /// `None`.
    pub fn parse(message: &[u8]) -> Option<Uevent> {
        let mut fields = message.split(|b| *b == 0).filter(|f| !f.is_empty());
        let header = std::str::from_utf8(fields.next()?).ok()?;
        let (header_action, header_path) = header.split_once('@')?;
        let mut event = Uevent {
            action: header_action.to_owned(),
            devpath: header_path.to_owned(),
            modalias: None,
        };
        let mut saw_action = false;
        for field in fields {
            let Ok(field) = std::str::from_utf8(field) else {
                continue;
            };
            match field.split_once('=') {
                Some(("ACTION", value)) => {
                    saw_action = true;
                    if value != event.action {
                        return None;
                    }
                }
                Some(("DEVPATH", value)) if value != event.devpath => return None,
                Some(("MODALIAS", value)) if !value.is_empty() => {
                    event.modalias = Some(value.to_owned());
                }
                _ => {}
            }
        }
        saw_action.then_some(event)
    }
}

/// An open, bound uevent socket; hand it to [`Listener::spawn`].
#[derive(Debug)]
pub struct Listener {
    socket: Socket,
}

impl Listener {
    /// Opens and binds the socket. Do this before the coldplug walk.
    pub fn open() -> Result<Self, HotplugError> {
        let mut socket = Socket::new(NETLINK_KOBJECT_UEVENT).map_err(HotplugError::Socket)?;
        // A smaller buffer than asked for only means an earlier rescan.
        let _ = socket.set_rx_buf_sz(RECEIVE_BUFFER);
        socket
            .bind(&SocketAddr::new(0, KERNEL_GROUP))
            .map_err(HotplugError::Socket)?;
        Ok(Listener { socket })
    }

    /// Loads drivers for added devices on a thread of its own, for as long
    /// as the process lives. `devices` (`/sys/devices`) is walked again
    /// when events were lost.
    pub fn spawn<L>(self, mut drivers: Drivers<L>, devices: PathBuf) -> Result<(), HotplugError>
    where
        L: ModuleLoader + Send + 'static,
    {
        std::thread::Builder::new()
            .name("hotplug".into())
            .spawn(move || loop {
                match self.socket.recv_from_full() {
                    // Only the kernel (port 0) speaks for devices.
                    Ok((message, from)) if from.port_number() == 0 => {
                        handle(&mut drivers, &message);
                    }
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => {
                        tracing::warn!("uevents lost; walking the device tree again");
                        let outcome = drivers.coldplug(&devices, Duration::from_millis(100));
                        tracing::info!(loaded = ?outcome.loaded, "drivers loaded after a rescan");
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::error!(error = %e, "uevent socket failed; hotplug stops");
                        return;
                    }
                }
            })
            .map(drop)
            .map_err(HotplugError::Thread)
    }
}

/// Where the kernel's device tree is.
pub const SYS_DEVICES: &str = "/sys/devices";
/// Pause after a coldplug round that loaded drivers, for asynchronous probes.
const COLDPLUG_SETTLE: Duration = Duration::from_millis(100);

/// Loads the drivers this machine's devices need from `dir`
/// (`/lib/modules/<kver>`: its `modules.alias` and `modules.dep`), then keeps
/// loading drivers for devices added later. Without the uevent socket the
/// coldplug still runs; without the tables nothing is loaded and the error
/// says which file is missing. `stage` (`initrd` or `runtime`) names the
/// walk in the `drivers-loaded` console event.
pub fn coldplug_and_listen(dir: &Path, stage: &str) -> Result<Outcome, ColdplugError> {
    let started = std::time::Instant::now();
    let listener = Listener::open()
        .inspect_err(|e| tracing::warn!(error = %crate::error_chain(e), "no hotplug"))
        .ok();
    let mut drivers = Drivers::for_kernel(dir)?;
    let outcome = drivers.coldplug(Path::new(SYS_DEVICES), COLDPLUG_SETTLE);
    for (module, error) in &outcome.failed {
        tracing::warn!(%module, %error, "driver not loaded");
    }
    crate::console::emit(&loaded_event(stage, &outcome, started.elapsed()));
    if let Some(listener) = listener {
        if let Err(e) = listener.spawn(drivers, SYS_DEVICES.into()) {
            tracing::warn!(error = %crate::error_chain(&e), "no hotplug");
        }
    }
    Ok(outcome)
}

/// The `drivers-loaded` console event of one coldplug walk.
pub fn loaded_event(stage: &str, outcome: &Outcome, took: Duration) -> crate::console::Event {
    crate::console::Event::DriversLoaded {
        stage: stage.to_owned(),
        devices: u64::try_from(outcome.devices).unwrap_or(u64::MAX),
        modules: outcome.loaded.clone(),
        failed: outcome.failed.iter().map(|(m, _)| m.clone()).collect(),
        took_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
    }
}

/// Loads the drivers one message asks for, if it is an added device.
pub fn handle<L: ModuleLoader>(drivers: &mut Drivers<L>, message: &[u8]) -> Vec<String> {
    let Some(event) = Uevent::parse(message) else {
        return Vec::new();
    };
    let (true, Some(modalias)) = (event.action == "add", &event.modalias) else {
        return Vec::new();
    };
    let outcome = drivers.device_added(modalias);
    if !outcome.loaded.is_empty() {
        tracing::info!(devpath = %event.devpath, %modalias, modules = ?outcome.loaded, "hot-plugged device: driver loaded");
    }
    outcome.loaded
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::coldplug::AliasTable;
    use crate::boot::modules::ModuleError;

    const ALIAS: &str = include_str!("../../tests/fixtures/coldplug/modules.alias");

    fn message(fields: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in fields {
            out.extend_from_slice(f.as_bytes());
            out.push(0);
        }
        out
    }

    const E1000E_ADD: &[&str] = &[
        "add@/devices/pci0000:00/0000:00:05.0",
        "ACTION=add",
        "DEVPATH=/devices/pci0000:00/0000:00:05.0",
        "SUBSYSTEM=pci",
        "PCI_CLASS=20000",
        "MODALIAS=pci:v00008086d000010D3sv00008086sd00000000bc02sc00i00",
        "SEQNUM=1234",
    ];

    #[test]
    fn kernel_messages_parse() {
        let event = Uevent::parse(&message(E1000E_ADD)).unwrap();
        assert_eq!(event.action, "add");
        assert_eq!(event.devpath, "/devices/pci0000:00/0000:00:05.0");
        assert_eq!(
            event.modalias.as_deref(),
            Some("pci:v00008086d000010D3sv00008086sd00000000bc02sc00i00")
        );
        let block = message(&[
            "add@/devices/virtual/block/loop0",
            "ACTION=add",
            "DEVPATH=/devices/virtual/block/loop0",
            "SUBSYSTEM=block",
        ]);
        assert_eq!(Uevent::parse(&block).unwrap().modalias, None);
    }

    #[test]
    fn other_messages_are_ignored() {
        // udev's own re-broadcast
        assert_eq!(Uevent::parse(b"libudev\0\xfe\xed\xca\xfe"), None);
        // header and body disagree, or the body is missing
        let mut forged = E1000E_ADD.to_vec();
        forged[1] = "ACTION=remove";
        assert_eq!(Uevent::parse(&message(&forged)), None);
        assert_eq!(Uevent::parse(b"add@/devices/x"), None);
        assert_eq!(Uevent::parse(b""), None);
        assert_eq!(Uevent::parse(b"\xff\xfe@\0ACTION=add\0"), None);
    }

    #[derive(Default)]
    struct Recorder(Vec<String>);

    impl ModuleLoader for &mut Recorder {
        fn load(&mut self, module: &str) -> Result<(), ModuleError> {
            self.0.push(module.to_owned());
            Ok(())
        }
    }

    #[test]
    fn added_devices_get_their_driver_once() {
        let mut loaded = Recorder::default();
        let mut drivers = Drivers::new(AliasTable::parse(ALIAS), &mut loaded);
        assert_eq!(handle(&mut drivers, &message(E1000E_ADD)), ["e1000e"]);
        // the same device again (a rebind), a removal, a bind: nothing
        assert!(handle(&mut drivers, &message(E1000E_ADD)).is_empty());
        let mut removed = E1000E_ADD.to_vec();
        removed[0] = "remove@/devices/pci0000:00/0000:00:05.0";
        removed[1] = "ACTION=remove";
        assert!(handle(&mut drivers, &message(&removed)).is_empty());
        let nvme = [
            "add@/devices/pci0000:00/0000:00:06.0",
            "ACTION=add",
            "DEVPATH=/devices/pci0000:00/0000:00:06.0",
            "MODALIAS=pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02",
        ];
        assert_eq!(handle(&mut drivers, &message(&nvme)), ["nvme"]);
        drop(drivers);
        assert_eq!(loaded.0, ["e1000e", "nvme"]);
    }

    #[test]
    fn the_console_event_names_loaded_and_failed_modules() {
        let outcome = Outcome {
            devices: 9,
            loaded: vec!["nvme".into(), "e1000e".into()],
            failed: vec![("i6300esb".into(), "No such device".into())],
            rounds: 2,
        };
        let line = crate::console::render(
            &loaded_event("runtime", &outcome, Duration::from_micros(41_700)),
            7,
        );
        let json = line.strip_prefix(crate::console::EVENT_PREFIX).unwrap();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["event"], "drivers-loaded");
        assert_eq!(v["stage"], "runtime");
        assert_eq!(v["devices"], 9);
        assert_eq!(v["modules"], serde_json::json!(["nvme", "e1000e"]));
        assert_eq!(v["failed"], serde_json::json!(["i6300esb"]));
        assert_eq!(v["took_ms"], 41);
    }
}
