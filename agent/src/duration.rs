//! Durations in configuration, written as humantime text (`"30s"`,
//! `"1m 30s"`), with an upper bound. Every duration from configuration is
//! later added to an `Instant` or `SystemTime` (deadlines, intervals,
//! timeouts), and `Instant + Duration` panics on overflow: a value like
//! `"500000000y"` would panic PID 1 on every boot. So absurd values are a
//! configuration error at load time, naming the value and the limit.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// The longest duration configuration may hold: a year is longer than any
/// sensible deadline or interval and far from any clock's overflow.
pub const MAX: Duration = Duration::from_secs(366 * 24 * 3600);

/// Parses `text`, refusing anything longer than [`MAX`].
pub fn parse(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration like \"30s\": {e}"))?;
    if d > MAX {
        return Err(format!(
            "{text:?} is longer than the largest allowed duration ({})",
            humantime::format_duration(MAX)
        ));
    }
    Ok(d)
}

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse(&text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_bounded() {
        assert_eq!(parse("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("366d"), Ok(MAX));
        let err = parse("367d").unwrap_err();
        assert!(err.contains("largest allowed"), "{err}");
        assert!(parse("500000000years").is_err());
        assert!(parse("2pm").unwrap_err().contains("not a duration"));
    }
}
