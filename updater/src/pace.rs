//! Slow-retrieval defence for downloads: a reader that fails when a
//! server delivers too little for too long (TUF's "slow retrieval"
//! attack: a hostile or broken mirror that keeps a connection alive with a
//! byte now and then, so an update never finishes and never fails).
//!
//! Two bounds, both on injected time so they are tested without waiting:
//! every [`Pace::window`] must bring at least [`Pace::min_bytes_per_window`]
//! (until the stream ends), and the whole stream must end within
//! [`Pace::deadline`]. A failed stream is an I/O error of kind `TimedOut`;
//! the install treats it like a dropped connection (it resumes with a
//! Range request within its retry budget).

use std::io::{self, Read};
use std::time::{Duration, Instant};

/// The bounds of one download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    pub window: Duration,
    pub min_bytes_per_window: u64,
    pub deadline: Duration,
}

impl Default for Pace {
    /// 64 KiB per 30 s (about 2 KiB/s, far below any working link) and one
    /// hour for one object (a 1 GiB payload at 300 KiB/s).
    fn default() -> Self {
        Pace {
            window: Duration::from_secs(30),
            min_bytes_per_window: 64 * 1024,
            deadline: Duration::from_secs(3600),
        }
    }
}

/// A [`Read`] that enforces a [`Pace`] on `inner`, reading the time from
/// `now`.
pub struct Paced<R, C> {
    inner: R,
    pace: Pace,
    now: C,
    started: Instant,
    window_start: Instant,
    window_bytes: u64,
}

impl<R, C> std::fmt::Debug for Paced<R, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Paced")
            .field("pace", &self.pace)
            .field("window_bytes", &self.window_bytes)
            .finish_non_exhaustive()
    }
}

impl<R: Read> Paced<R, fn() -> Instant> {
    /// Paced by the monotonic clock.
    pub fn new(inner: R, pace: Pace) -> Self {
        Paced::with_clock(inner, pace, Instant::now)
    }
}

impl<R: Read, C: Fn() -> Instant> Paced<R, C> {
    pub fn with_clock(inner: R, pace: Pace, now: C) -> Self {
        let t = now();
        Paced {
            inner,
            pace,
            now,
            started: t,
            window_start: t,
            window_bytes: 0,
        }
    }

    fn too_slow(&self, what: String) -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, what)
    }
}

impl<R: Read, C: Fn() -> Instant> Read for Paced<R, C> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let t = (self.now)();
        if n == 0 {
            return Ok(0);
        }
        if t.duration_since(self.started) > self.pace.deadline {
            return Err(self.too_slow(format!(
                "the download did not finish within {} s",
                self.pace.deadline.as_secs()
            )));
        }
        self.window_bytes = self.window_bytes.saturating_add(n as u64);
        if t.duration_since(self.window_start) >= self.pace.window {
            if self.window_bytes < self.pace.min_bytes_per_window {
                return Err(self.too_slow(format!(
                    "the server sent {} bytes in {} s, below the minimum of {} per window",
                    self.window_bytes,
                    t.duration_since(self.window_start).as_secs(),
                    self.pace.min_bytes_per_window
                )));
            }
            self.window_start = t;
            self.window_bytes = 0;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// A source giving `chunk` bytes per read, `total` in all, and moving a
    /// shared fake clock by `step` per read.
    struct Trickle {
        chunk: usize,
        left: usize,
        clock: Rc<Cell<Instant>>,
        step: Duration,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.clock.set(self.clock.get() + self.step);
            let n = self.chunk.min(self.left).min(buf.len());
            self.left -= n;
            Ok(n)
        }
    }

    fn run(chunk: usize, total: usize, step: Duration) -> io::Result<u64> {
        let clock = Rc::new(Cell::new(Instant::now()));
        let source = Trickle {
            chunk,
            left: total,
            clock: clock.clone(),
            step,
        };
        let reader = Paced::with_clock(source, Pace::default(), move || clock.get());
        io::copy(&mut { reader }, &mut io::sink())
    }

    #[test]
    fn a_steady_download_passes() {
        // 16 KiB a second: 480 KiB per window.
        assert_eq!(
            run(16 * 1024, 4 << 20, Duration::from_secs(1)).unwrap(),
            4 << 20
        );
    }

    #[test]
    fn a_trickle_is_cut_off_in_the_first_window() {
        // One byte every 10 s keeps a connection alive and never finishes.
        let err = run(1, 1 << 20, Duration::from_secs(10)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("below the minimum"), "{err}");
    }

    #[test]
    fn a_slow_but_steady_download_meets_the_deadline_or_stops() {
        // 3 KiB/s passes each window (90 KiB) but 1 GiB would take four
        // days: the deadline stops it after an hour.
        let err = run(3 * 1024, 1 << 30, Duration::from_secs(1)).unwrap_err();
        assert!(
            err.to_string().contains("did not finish within 3600 s"),
            "{err}"
        );
    }
}
