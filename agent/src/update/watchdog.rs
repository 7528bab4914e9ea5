//! The hardware watchdog during a trial boot: a hung trial must fall back
//! like one that does not boot, so `/dev/watchdog` is opened (which starts
//! it) and petted by a task; the machine resets if the agent stops making
//! progress, spending one boot try. The magic close disarms it at commit.

use std::sync::Arc;
use std::time::Duration;

/// `/dev/watchdog` kept alive by a task while a trial runs.
#[derive(Debug)]
pub struct TrialWatchdog {
    pet: tokio::task::JoinHandle<()>,
    device: Arc<std::fs::File>,
}

impl TrialWatchdog {
    pub const DEVICE: &'static str = "/dev/watchdog";
    const PET_EVERY: Duration = Duration::from_secs(5);

    /// Opens the watchdog and pets it every 5 s; `None` when the machine
    /// has none.
    pub fn arm() -> Option<Self> {
        let device = Arc::new(
            std::fs::OpenOptions::new()
                .write(true)
                .open(Self::DEVICE)
                .ok()?,
        );
        let d = device.clone();
        let pet = tokio::spawn(async move {
            loop {
                let _ = std::io::Write::write_all(&mut &*d, b"\0");
                tokio::time::sleep(Self::PET_EVERY).await;
            }
        });
        Some(TrialWatchdog { pet, device })
    }

    /// Stops it with the magic close, so it does not reset the machine.
    pub fn disarm(self) {
        self.pet.abort();
        let _ = std::io::Write::write_all(&mut &*self.device, b"V");
    }
}
