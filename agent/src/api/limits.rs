//! What keeps the API from being a way to stop the node: timeouts, a cap
//! on connections (new ones push out the oldest idle one, so a crowd of
//! silent connections cannot lock out the probes), body size limits and
//! backing off when `accept` fails (EMFILE must not spin a core).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// Limits of one listener; tests shorten them.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Whole request head, and the wait for the next one on a kept-alive
    /// connection (hyper runs the same timer for both).
    pub header_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_connections: usize,
    /// The longest `follow=true` log stream.
    pub max_follow: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 64,
            max_follow: Duration::from_secs(3600),
        }
    }
}

/// PUT /v1/user-data bodies; every other request has none.
pub const MAX_USER_DATA: usize = 1024 * 1024;
/// `tail=N` above this is cut to it.
pub const MAX_TAIL_LINES: usize = 10_000;
/// PID 1's descriptor limit (soft and hard), raised at start.
pub const NOFILE_LIMIT: u64 = 65_536;

/// One connection in the table: closed on request, evictable while no
/// request is in flight.
#[derive(Debug, Default)]
pub struct ConnectionSlot {
    close: Notify,
    in_flight: AtomicUsize,
}

impl ConnectionSlot {
    /// Resolves when the table wants this connection gone.
    pub async fn closed(&self) {
        self.close.notified().await
    }

    /// Marks a request in flight until the guard drops.
    pub fn busy(self: &Arc<Self>) -> BusyGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        BusyGuard(self.clone())
    }

    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
    }
}

/// See [`ConnectionSlot::busy`].
#[derive(Debug)]
pub struct BusyGuard(Arc<ConnectionSlot>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The open connections of one listener, oldest first.
#[derive(Debug, Clone)]
pub struct ConnectionTable {
    max: usize,
    open: Arc<Mutex<VecDeque<Arc<ConnectionSlot>>>>,
}

/// Holds a place in the table; dropping it frees the place.
#[derive(Debug)]
pub struct Admitted {
    pub slot: Arc<ConnectionSlot>,
    table: ConnectionTable,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Ok(mut open) = self.table.open.lock() {
            open.retain(|s| !Arc::ptr_eq(s, &self.slot));
        }
    }
}

impl ConnectionTable {
    pub fn new(max: usize) -> Self {
        ConnectionTable {
            max: max.max(1),
            open: Arc::default(),
        }
    }

    /// A place for a new connection. When the table is full the oldest
    /// idle connection (handshaking, or between requests) is told to
    /// close and loses its place at once; when every one is busy the new
    /// one is refused (`None`: the caller closes it).
    pub fn admit(&self) -> Option<Admitted> {
        let mut open = self.open.lock().ok()?;
        if open.len() >= self.max {
            let oldest_idle = open.iter().position(|s| s.idle())?;
            if let Some(evicted) = open.remove(oldest_idle) {
                // notify_one keeps the wake-up if the task is not waiting yet.
                evicted.close.notify_one();
            }
        }
        let slot = Arc::new(ConnectionSlot::default());
        open.push_back(slot.clone());
        Some(Admitted {
            slot,
            table: self.clone(),
        })
    }

    pub fn len(&self) -> usize {
        self.open.lock().map(|o| o.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Pauses after failed `accept`s: 10 ms doubling to 1 s, reset by a
/// success. Descriptor exhaustion then costs a wake-up a second, not a core.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    pub fn success(&mut self) {
        self.failures = 0;
    }

    /// The pause after one more failure.
    pub fn failure(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let ms = 10u64.saturating_mul(1 << self.failures.min(8).saturating_sub(1));
        Duration::from_millis(ms.min(1000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_pushes_out_the_oldest_idle_connection() {
        let table = ConnectionTable::new(2);
        let a = table.admit().unwrap();
        let b = table.admit().unwrap();
        let _busy = a.slot.busy();
        let c = table.admit().expect("b is idle and goes");
        assert_eq!(table.len(), 2);
        // b was told to close: its notification is stored.
        let closed = b.slot.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), closed.closed())
                .await
                .expect("evicted connection notified")
        });
        drop(b); // its place is already gone
        assert_eq!(table.len(), 2);
        let _busy_c = c.slot.busy();
        assert!(table.admit().is_none(), "every connection busy: refused");
        drop(_busy_c);
        assert!(table.admit().is_some());
        drop(a);
        drop(c);
    }

    #[test]
    fn accept_backoff_grows_to_a_second_and_resets() {
        let mut b = AcceptBackoff::default();
        let pauses: Vec<_> = (0..10).map(|_| b.failure()).collect();
        assert_eq!(pauses[0], Duration::from_millis(10));
        assert_eq!(pauses[1], Duration::from_millis(20));
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(pauses[9], Duration::from_secs(1));
        b.success();
        assert_eq!(b.failure(), Duration::from_millis(10));
    }
}
