//! The SNTP client's pure part (RFC 4330, RFC 5905 client mode): the
//! 48-byte packet codec, the offset and delay maths, the sanity checks a
//! reply must pass before the clock is touched, the step-or-slew decision
//! and the poll interval. No sockets and no clocks here: callers pass the
//! times in (see [`crate::net::timesync`] for the I/O).

use std::time::{Duration, SystemTime};

/// Every SNTP packet without extension fields or MAC.
pub const PACKET_LEN: usize = 48;
/// Seconds from the NTP era 0 epoch (1900-01-01) to the Unix epoch.
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;
/// Mode 3 (client), mode 4 (server).
const MODE_CLIENT: u8 = 3;
const MODE_SERVER: u8 = 4;
const VERSION: u8 = 4;
/// Leap indicator 3: the server's own clock is not synchronised.
const LEAP_UNSYNCHRONISED: u8 = 3;
/// Stratum 16 and up means unsynchronised (RFC 5905 §7.3).
const MAX_STRATUM: u8 = 15;

/// Offsets at or under this are slewed; larger ones are stepped.
pub const STEP_THRESHOLD: Duration = Duration::from_secs(1);
/// Poll interval bounds once synchronised (RFC 5905's default MINPOLL 6
/// and MAXPOLL 10: 64 s and 1024 s).
pub const MIN_POLL: Duration = Duration::from_secs(64);
pub const MAX_POLL: Duration = Duration::from_secs(1024);
/// First retry before any server has answered; doubles up to [`MIN_POLL`].
pub const FIRST_RETRY: Duration = Duration::from_secs(2);
/// An offset beyond this after synchronisation means the clock wandered
/// (or was suspended): poll fast again.
const STEADY_OFFSET_MS: i64 = 128;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SntpError {
    #[error("NTP reply of {0} bytes is shorter than 48")]
    Truncated(usize),
    #[error("NTP reply has mode {0}, expected 4 (server)")]
    Mode(u8),
    #[error("NTP reply has version {0}, expected 3 or 4")]
    Version(u8),
    #[error("NTP server's clock is unsynchronised (leap indicator 3)")]
    Unsynchronised,
    #[error("NTP server sent a kiss-o'-death ({code}); not used")]
    KissOfDeath { code: String },
    #[error("NTP server stratum {0} is above 15 (unsynchronised)")]
    Stratum(u8),
    #[error("NTP reply's origin timestamp does not echo our request")]
    Origin,
    #[error("NTP reply's transmit timestamp is zero")]
    ZeroTransmit,
    #[error("NTP round trip is negative ({0} ms): the exchange is not usable")]
    NegativeDelay(i64),
}

/// A 64-bit NTP timestamp: seconds since 1900 (era-relative) and a 32-bit
/// binary fraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// `None` for times before 1970 (the Unix epoch), which no node has.
    pub fn from_system(t: SystemTime) -> Timestamp {
        let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        // Era wrap (2036) is implied: only the low 32 bits of seconds go out.
        let secs = (since.as_secs() + NTP_UNIX_OFFSET) & 0xffff_ffff;
        let frac = (u64::from(since.subsec_nanos()) << 32) / 1_000_000_000;
        Timestamp((secs << 32) | frac)
    }

    /// Nanoseconds since the Unix epoch. RFC 4330 §3: a seconds value with
    /// its top bit clear is in era 1 (from 2036-02-07), so this works until
    /// 2104.
    pub fn unix_nanos(self) -> i128 {
        let secs = self.0 >> 32;
        let frac = self.0 & 0xffff_ffff;
        let secs = if secs & 0x8000_0000 == 0 {
            secs + (1 << 32)
        } else {
            secs
        };
        let nanos = (frac * 1_000_000_000) >> 32;
        (i128::from(secs) - i128::from(NTP_UNIX_OFFSET)) * 1_000_000_000 + i128::from(nanos)
    }

    fn read(b: &[u8]) -> Timestamp {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[..8]);
        Timestamp(u64::from_be_bytes(w))
    }
}

fn unix_nanos(t: SystemTime) -> i128 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
        Err(e) => -i128::try_from(e.duration().as_nanos()).unwrap_or(i128::MAX),
    }
}

/// A client request: version 4, mode 3, our send time as transmit
/// timestamp (the server echoes it as origin).
pub fn request(transmit: Timestamp) -> [u8; PACKET_LEN] {
    let mut b = [0u8; PACKET_LEN];
    b[0] = (VERSION << 3) | MODE_CLIENT;
    b[40..48].copy_from_slice(&transmit.0.to_be_bytes());
    b
}

/// The fields of a server's reply that the client looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub leap: u8,
    pub version: u8,
    pub mode: u8,
    pub stratum: u8,
    /// Reference ID: the kiss code when stratum is 0.
    pub reference_id: [u8; 4],
    pub origin: Timestamp,
    pub receive: Timestamp,
    pub transmit: Timestamp,
}

impl Reply {
    pub fn decode(b: &[u8]) -> Result<Reply, SntpError> {
        if b.len() < PACKET_LEN {
            return Err(SntpError::Truncated(b.len()));
        }
        let mut reference_id = [0u8; 4];
        reference_id.copy_from_slice(&b[12..16]);
        Ok(Reply {
            leap: b[0] >> 6,
            version: (b[0] >> 3) & 7,
            mode: b[0] & 7,
            stratum: b[1],
            reference_id,
            origin: Timestamp::read(&b[24..32]),
            receive: Timestamp::read(&b[32..40]),
            transmit: Timestamp::read(&b[40..48]),
        })
    }
}

/// One checked exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// How far the local clock is behind the server (positive: ours is
    /// slow), in nanoseconds.
    pub offset_ns: i128,
    /// Round-trip delay, in nanoseconds.
    pub delay_ns: i128,
    pub stratum: u8,
}

impl Sample {
    pub fn offset_ms(&self) -> i64 {
        i64::try_from(self.offset_ns / 1_000_000).unwrap_or(if self.offset_ns < 0 {
            i64::MIN
        } else {
            i64::MAX
        })
    }
}

/// Checks a reply to the request sent with transmit timestamp `sent` at
/// local time `t1`, received at local time `t4`, and computes offset and
/// delay (RFC 5905 §8: offset = ((T2 - T1) + (T3 - T4)) / 2, delay =
/// (T4 - T1) - (T3 - T2)).
pub fn evaluate(
    bytes: &[u8],
    sent: Timestamp,
    t1: SystemTime,
    t4: SystemTime,
) -> Result<Sample, SntpError> {
    let r = Reply::decode(bytes)?;
    if r.mode != MODE_SERVER {
        return Err(SntpError::Mode(r.mode));
    }
    if !(3..=4).contains(&r.version) {
        return Err(SntpError::Version(r.version));
    }
    if r.stratum == 0 {
        let code = String::from_utf8_lossy(&r.reference_id)
            .trim_end_matches('\0')
            .to_owned();
        return Err(SntpError::KissOfDeath { code });
    }
    if r.leap == LEAP_UNSYNCHRONISED {
        return Err(SntpError::Unsynchronised);
    }
    if r.stratum > MAX_STRATUM {
        return Err(SntpError::Stratum(r.stratum));
    }
    if r.origin != sent {
        return Err(SntpError::Origin);
    }
    if r.transmit.0 == 0 {
        return Err(SntpError::ZeroTransmit);
    }
    let (t1, t4) = (unix_nanos(t1), unix_nanos(t4));
    let (t2, t3) = (r.receive.unix_nanos(), r.transmit.unix_nanos());
    let offset_ns = ((t2 - t1) + (t3 - t4)) / 2;
    let delay_ns = (t4 - t1) - (t3 - t2);
    if delay_ns < 0 {
        let ms = i64::try_from(delay_ns / 1_000_000).unwrap_or(i64::MIN);
        return Err(SntpError::NegativeDelay(ms));
    }
    Ok(Sample {
        offset_ns,
        delay_ns,
        stratum: r.stratum,
    })
}

/// What to do with the clock for one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Correction {
    /// Set the clock (and then the RTC): the offset is over [`STEP_THRESHOLD`].
    Step { offset_ns: i128 },
    /// Let the kernel skew the clock gradually (adjtimex, at most 500 ppm).
    Slew { offset_ns: i128 },
}

/// Steps when the offset is over one second, slews otherwise. Before the
/// first sync that is the boot-time step; afterwards a slew of more than
/// a second would take over half an hour at 500 ppm with the wrong time
/// meanwhile (a resumed VM), so that steps too.
pub fn correction(sample: &Sample) -> Correction {
    let threshold = i128::try_from(STEP_THRESHOLD.as_nanos()).unwrap_or(i128::MAX);
    if sample.offset_ns.abs() > threshold {
        Correction::Step {
            offset_ns: sample.offset_ns,
        }
    } else {
        Correction::Slew {
            offset_ns: sample.offset_ns,
        }
    }
}

/// The wait before the next poll. Unsynchronised: 2 s doubling up to
/// 64 s, so a booting node syncs soon after its network is up. Synced:
/// 64 s doubling up to 1024 s while offsets stay small; a large offset or
/// a failed poll goes back to 64 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollInterval {
    current: Duration,
    synced: bool,
}

impl Default for PollInterval {
    fn default() -> Self {
        PollInterval {
            current: FIRST_RETRY,
            synced: false,
        }
    }
}

impl PollInterval {
    pub fn current(&self) -> Duration {
        self.current
    }

    /// A poll gave `sample`.
    pub fn on_sample(&mut self, sample: &Sample) -> Duration {
        if !self.synced || sample.offset_ms().abs() > STEADY_OFFSET_MS {
            self.current = MIN_POLL;
        } else {
            self.current = (self.current * 2).min(MAX_POLL);
        }
        self.synced = true;
        self.current
    }

    /// No server gave a usable answer.
    pub fn on_failure(&mut self) -> Duration {
        self.current = if self.synced {
            MIN_POLL
        } else {
            (self.current * 2).min(MIN_POLL)
        };
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(unix_secs: u64, nanos: u32) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::new(unix_secs, nanos)
    }

    /// A server reply with the given fields (stratum 2, version 4, leap 0).
    fn reply(origin: Timestamp, receive: Timestamp, transmit: Timestamp) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[0] = (4 << 3) | 4;
        b[1] = 2;
        b[12..16].copy_from_slice(&[127, 0, 0, 1]);
        b[24..32].copy_from_slice(&origin.0.to_be_bytes());
        b[32..40].copy_from_slice(&receive.0.to_be_bytes());
        b[40..48].copy_from_slice(&transmit.0.to_be_bytes());
        b
    }

    #[test]
    fn timestamps_convert_both_ways_across_the_2036_era_wrap() {
        // 2026-12-02T06:00:00Z and half a second.
        let t = at(1_796_191_200, 500_000_000);
        let ts = Timestamp::from_system(t);
        assert_eq!(ts.0 >> 32, 1_796_191_200 + NTP_UNIX_OFFSET);
        assert_eq!(ts.0 & 0xffff_ffff, 1 << 31);
        assert_eq!(ts.unix_nanos(), 1_796_191_200_500_000_000);
        // 2040 is in era 1: the seconds field wraps past 2^32.
        let later = at(2_208_988_800, 0);
        let ts = Timestamp::from_system(later);
        assert!(ts.0 >> 32 < 0x8000_0000);
        assert_eq!(ts.unix_nanos(), 2_208_988_800_000_000_000);
    }

    #[test]
    fn a_request_is_version_4_client_mode_with_our_transmit_time() {
        let ts = Timestamp(0x0102_0304_0506_0708);
        let b = request(ts);
        assert_eq!(b.len(), 48);
        assert_eq!(b[0], 0x23);
        assert!(b[1..40].iter().all(|x| *x == 0));
        assert_eq!(&b[40..], &[1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn offset_and_delay_follow_rfc_5905() {
        // Local clock is 10 s behind; 20 ms each way; server takes 1 ms.
        let t1 = at(1_433_116_800, 0); // 2015-06-01
        let sent = Timestamp::from_system(t1);
        let t2 = at(1_433_116_810, 20_000_000);
        let t3 = at(1_433_116_810, 21_000_000);
        let t4 = at(1_433_116_800, 41_000_000);
        let b = reply(sent, Timestamp::from_system(t2), Timestamp::from_system(t3));
        let s = evaluate(&b, sent, t1, t4).unwrap();
        assert_eq!(s.stratum, 2);
        // Fractions round down by under a nanosecond each way.
        assert!((s.offset_ns - 10_000_000_000).abs() < 4, "{}", s.offset_ns);
        assert!((s.delay_ns - 40_000_000).abs() < 4, "{}", s.delay_ns);
        assert_eq!(s.offset_ms(), 9_999);
        assert_eq!(
            correction(&s),
            Correction::Step {
                offset_ns: s.offset_ns
            }
        );
    }

    #[test]
    fn a_small_offset_is_slewed_and_a_large_one_either_way_stepped() {
        let s = |ms: i128| Sample {
            offset_ns: ms * 1_000_000,
            delay_ns: 0,
            stratum: 3,
        };
        assert!(matches!(correction(&s(999)), Correction::Slew { .. }));
        assert!(matches!(correction(&s(-1000)), Correction::Slew { .. }));
        assert!(matches!(correction(&s(1001)), Correction::Step { .. }));
        assert!(matches!(
            correction(&s(-86_400_000)),
            Correction::Step { .. }
        ));
    }

    #[test]
    fn bad_replies_are_refused_with_the_reason() {
        let t1 = at(1_700_000_000, 0);
        let sent = Timestamp::from_system(t1);
        let good = reply(sent, sent, sent);
        let t4 = t1 + Duration::from_millis(1);
        assert!(evaluate(&good, sent, t1, t4).is_ok());

        assert_eq!(
            evaluate(&good[..47], sent, t1, t4),
            Err(SntpError::Truncated(47))
        );
        let mut b = good;
        b[0] = (4 << 3) | 3;
        assert_eq!(evaluate(&b, sent, t1, t4), Err(SntpError::Mode(3)));
        let mut b = good;
        b[0] = (2 << 3) | 4;
        assert_eq!(evaluate(&b, sent, t1, t4), Err(SntpError::Version(2)));
        let mut b = good;
        b[0] |= 3 << 6;
        assert_eq!(evaluate(&b, sent, t1, t4), Err(SntpError::Unsynchronised));
        let mut b = good;
        b[1] = 0;
        b[12..16].copy_from_slice(b"RATE");
        assert_eq!(
            evaluate(&b, sent, t1, t4),
            Err(SntpError::KissOfDeath {
                code: "RATE".into()
            })
        );
        let mut b = good;
        b[1] = 16;
        assert_eq!(evaluate(&b, sent, t1, t4), Err(SntpError::Stratum(16)));
        let other = Timestamp(sent.0 ^ 1);
        assert_eq!(evaluate(&good, other, t1, t4), Err(SntpError::Origin));
        let b = reply(sent, sent, Timestamp(0));
        assert_eq!(evaluate(&b, sent, t1, t4), Err(SntpError::ZeroTransmit));
        // The server claims it held the request longer than the round trip.
        let late = Timestamp::from_system(t1 + Duration::from_secs(5));
        let b = reply(sent, sent, late);
        assert_eq!(
            evaluate(&b, sent, t1, t4),
            Err(SntpError::NegativeDelay(-4999))
        );
    }

    #[test]
    fn the_poll_interval_backs_off_within_its_bounds() {
        let mut p = PollInterval::default();
        assert_eq!(p.current(), FIRST_RETRY);
        let waits: Vec<u64> = (0..7).map(|_| p.on_failure().as_secs()).collect();
        assert_eq!(waits, [4, 8, 16, 32, 64, 64, 64]);
        let small = Sample {
            offset_ns: 5_000_000,
            delay_ns: 1,
            stratum: 2,
        };
        let large = Sample {
            offset_ns: 500_000_000,
            ..small
        };
        let waits: Vec<u64> = (0..6).map(|_| p.on_sample(&small).as_secs()).collect();
        assert_eq!(waits, [64, 128, 256, 512, 1024, 1024]);
        assert_eq!(p.on_sample(&large), MIN_POLL);
        assert_eq!(p.on_sample(&small).as_secs(), 128);
        assert_eq!(p.on_failure(), MIN_POLL);
    }
}
