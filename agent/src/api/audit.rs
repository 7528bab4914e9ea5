//! The record of what was asked of the API: every mutating request and
//! every refused one, with who asked (certificate CN or `local`), method,
//! path and status, as an `api-request` console event and a log line.
//! Refusals come from anyone who reaches the port, so their console
//! events are rate limited (the console is a slow serial line written by
//! PID 1); what is dropped is counted in the next event's `suppressed`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Console events for refusals per window.
const REFUSALS_PER_WINDOW: u32 = 20;
const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Budget {
    window_start: Instant,
    used: u32,
    suppressed: u64,
}

static BUDGET: Mutex<Option<Budget>> = Mutex::new(None);

/// One finished request that must be recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub who: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
}

/// Whether a request with this outcome is recorded at all.
pub fn wanted(mutating: bool, status: u16) -> bool {
    mutating || matches!(status, 401 | 403 | 413)
}

/// Records `entry`; `refused` entries share a rate-limited budget.
pub fn record(entry: &Entry<'_>, refused: bool) {
    let suppressed = if refused {
        match take_budget(Instant::now()) {
            Some(s) => s,
            None => {
                tracing::debug!(
                    who = entry.who,
                    method = entry.method,
                    path = entry.path,
                    status = entry.status,
                    "API request refused (console record suppressed)"
                );
                return;
            }
        }
    } else {
        0
    };
    tracing::info!(
        who = entry.who,
        method = entry.method,
        path = entry.path,
        status = entry.status,
        "API request"
    );
    crate::console::emit(&crate::console::Event::ApiRequest {
        who: entry.who.to_owned(),
        method: entry.method.to_owned(),
        path: entry.path.to_owned(),
        status: entry.status,
        suppressed: (suppressed > 0).then_some(suppressed),
    });
}

/// `Some(refusals dropped since the last one recorded)` when the budget
/// allows one more now.
fn take_budget(now: Instant) -> Option<u64> {
    let mut guard = BUDGET.lock().ok()?;
    let budget = guard.get_or_insert(Budget {
        window_start: now,
        used: 0,
        suppressed: 0,
    });
    take(budget, now)
}

fn take(budget: &mut Budget, now: Instant) -> Option<u64> {
    if now.duration_since(budget.window_start) >= WINDOW {
        budget.window_start = now;
        budget.used = 0;
    }
    if budget.used >= REFUSALS_PER_WINDOW {
        budget.suppressed += 1;
        return None;
    }
    budget.used += 1;
    Some(std::mem::take(&mut budget.suppressed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_rate_limited_and_counted() {
        let start = Instant::now();
        let mut b = Budget {
            window_start: start,
            used: 0,
            suppressed: 0,
        };
        for _ in 0..REFUSALS_PER_WINDOW {
            assert_eq!(take(&mut b, start), Some(0));
        }
        assert_eq!(take(&mut b, start), None);
        assert_eq!(take(&mut b, start + Duration::from_secs(1)), None);
        assert_eq!(take(&mut b, start + WINDOW), Some(2));
        assert_eq!(take(&mut b, start + WINDOW), Some(0));
    }

    #[test]
    fn what_is_recorded() {
        assert!(wanted(true, 202));
        assert!(wanted(false, 401) && wanted(false, 403));
        assert!(!wanted(false, 200) && !wanted(false, 404));
    }
}
