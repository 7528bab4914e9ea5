//! The `[update]` table: where releases come from, how often to look, and
//! which strategy decides when a node reboots into an installed update.
//! Values are parsed into their types when the file loads (a window's
//! start is a time of day, its days are weekdays), so a bad value is a
//! configuration error naming the key, never a surprise at reboot time.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use ballast_updater::payload::Version;
use serde::{Deserialize, Serialize};

/// The `[update]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateConfig {
    /// Repository URL; automatic updates are off without one.
    pub repository: Option<String>,
    /// Time between checks, like `"30s"` or `"1h"`; up to a tenth more is
    /// added at random so a fleet does not poll in step.
    #[serde(default = "default_interval", with = "crate::duration")]
    pub interval: Duration,
    #[serde(default)]
    pub strategy: Strategy,
    /// How long a new version has to pass its health checks.
    #[serde(default = "default_deadline", with = "crate::duration")]
    pub health_deadline: Duration,
    /// Trusted keys (files or directories of `*.pub`); default: the keys
    /// built into the image.
    #[serde(default)]
    pub trust: Vec<PathBuf>,
    /// Release channel to follow (`stable`, `beta`, ...): the node
    /// installs only releases the manifest lists in it.
    #[serde(default = "default_channel", deserialize_with = "channel_name")]
    pub channel: String,
    /// Install exactly this version and nothing newer.
    pub version_lock: Option<Version>,
    /// FleetLock server for `strategy = "fleetlock"`.
    pub fleetlock: Option<FleetLockConfig>,
    /// Maintenance window for `strategy = "window"`.
    pub window: Option<WindowConfig>,
    /// Not a key: `[proxy]` and `[trust] ca` for the update and FleetLock
    /// clients, filled in by `config::merge` from the merged document.
    #[serde(skip)]
    pub outbound: ballast_updater::http::Outbound,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        UpdateConfig {
            repository: None,
            interval: default_interval(),
            strategy: Strategy::default(),
            health_deadline: default_deadline(),
            trust: Vec::new(),
            channel: default_channel(),
            version_lock: None,
            fleetlock: None,
            window: None,
            outbound: ballast_updater::http::Outbound::default(),
        }
    }
}

impl UpdateConfig {
    /// What a table must hold as a whole: a strategy's own table.
    pub fn validate(&self) -> Result<(), String> {
        match self.strategy {
            Strategy::Window if self.window.is_none() => {
                Err("update.strategy = \"window\" needs an [update.window] table".into())
            }
            Strategy::Fleetlock if self.fleetlock.is_none() => {
                Err("update.strategy = \"fleetlock\" needs an [update.fleetlock] table".into())
            }
            _ => Ok(()),
        }
    }
}

fn default_channel() -> String {
    ballast_updater::manifest::DEFAULT_CHANNEL.to_owned()
}

fn channel_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    if ballast_updater::manifest::valid_channel(&name) {
        Ok(name)
    } else {
        Err(serde::de::Error::custom(format!(
            "channel {name:?}: names are 1-32 of a-z, 0-9 and '-', not starting with '-'"
        )))
    }
}

fn default_interval() -> Duration {
    Duration::from_secs(3600)
}

fn default_deadline() -> Duration {
    Duration::from_secs(300)
}

/// The strategy when `update.strategy` is not set anywhere: `kubernetes`
/// on a cluster node whose agent has a credential (a fleet must not reboot
/// all at once without a drain), else `immediate`. The second value is a
/// warning for a Kubernetes node that gets `immediate`.
pub fn default_strategy(
    kubernetes: Option<&super::kubernetes::KubernetesConfig>,
) -> (Strategy, Option<&'static str>) {
    match kubernetes {
        Some(k) if !k.standalone && k.agent.is_some() => (Strategy::Kubernetes, None),
        Some(k) if !k.standalone => (
            Strategy::Immediate,
            Some("[kubernetes] without [kubernetes.agent]: update.strategy defaults to immediate, so nodes reboot without a drain or a Lease; set [kubernetes.agent] or update.strategy"),
        ),
        _ => (Strategy::Immediate, None),
    }
}

/// When a node that installed an update may reboot into it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    #[default]
    Immediate,
    Window,
    Fleetlock,
    /// A Lease semaphore in the cluster, with cordon and drain
    /// (`[kubernetes.reboot]`).
    Kubernetes,
    Off,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetLockConfig {
    /// Base URL of the lock server, e.g. `http://10.0.2.100:8080/`.
    pub url: String,
    #[serde(default = "default_group")]
    pub group: String,
}

fn default_group() -> String {
    "default".into()
}

/// Days and a daily start time in UTC, with a length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// Every day when empty.
    #[serde(default)]
    pub days: Vec<Weekday>,
    /// UTC.
    pub start: TimeOfDay,
    #[serde(with = "crate::duration")]
    pub length: Duration,
}

impl WindowConfig {
    /// Whether `now` falls in the window. A window that starts late one
    /// day may still be open early the next.
    pub fn contains(&self, now: SystemTime) -> bool {
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let today = secs / 86_400;
        [today, today.saturating_sub(1)].into_iter().any(|day| {
            let allowed = self.days.is_empty() || self.days.contains(&Weekday::of_epoch_day(day));
            let start = day * 86_400 + self.start.seconds();
            allowed && secs >= start && secs < start + self.length.as_secs()
        })
    }
}

/// A day of the week; written as its name or any word starting with its
/// first three letters, in any case (`mon`, `Monday`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Weekday {
    const ALL: [Weekday; 7] = [
        Weekday::Mon,
        Weekday::Tue,
        Weekday::Wed,
        Weekday::Thu,
        Weekday::Fri,
        Weekday::Sat,
        Weekday::Sun,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Weekday::Mon => "mon",
            Weekday::Tue => "tue",
            Weekday::Wed => "wed",
            Weekday::Thu => "thu",
            Weekday::Fri => "fri",
            Weekday::Sat => "sat",
            Weekday::Sun => "sun",
        }
    }

    /// The weekday of a day counted from 1970-01-01, a Thursday.
    fn of_epoch_day(day: u64) -> Weekday {
        Weekday::ALL[((day + 3) % 7) as usize]
    }
}

impl std::str::FromStr for Weekday {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        Weekday::ALL
            .into_iter()
            .find(|d| lower.starts_with(d.name()))
            .ok_or_else(|| format!("day {s:?}: expected one of mon, tue, wed, thu, fri, sat, sun"))
    }
}

impl Serialize for Weekday {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Weekday {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// `HH:MM`, 00:00 to 23:59.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeOfDay {
    hour: u8,
    minute: u8,
}

impl TimeOfDay {
    pub fn new(hour: u8, minute: u8) -> Option<Self> {
        (hour < 24 && minute < 60).then_some(TimeOfDay { hour, minute })
    }

    /// Seconds after midnight.
    pub fn seconds(self) -> u64 {
        u64::from(self.hour) * 3600 + u64::from(self.minute) * 60
    }
}

impl std::str::FromStr for TimeOfDay {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("time {s:?}: expected HH:MM between 00:00 and 23:59");
        let (h, m) = s.split_once(':').ok_or_else(bad)?;
        let (Ok(h), Ok(m)) = (h.parse::<u8>(), m.parse::<u8>()) else {
            return Err(bad());
        };
        TimeOfDay::new(h, m).ok_or_else(bad)
    }
}

impl std::fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02}:{:02}", self.hour, self.minute)
    }
}

impl Serialize for TimeOfDay {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TimeOfDay {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc3339: &str) -> SystemTime {
        humantime::parse_rfc3339(rfc3339).unwrap()
    }

    #[test]
    fn the_documented_update_table_parses() {
        let c: UpdateConfig = toml::from_str(
            "repository = \"http://10.0.2.100/\"\ninterval = \"30s\"\nstrategy = \"immediate\"\nhealth_deadline = \"2m\"\n",
        )
        .unwrap();
        assert_eq!(c.interval, Duration::from_secs(30));
        assert_eq!(c.strategy, Strategy::Immediate);
        assert_eq!(c.health_deadline, Duration::from_secs(120));
        assert!(toml::from_str::<UpdateConfig>("strategy = \"sometimes\"\n").is_err());
        assert!(toml::from_str::<UpdateConfig>("interval = \"soon\"\n").is_err());
        assert_eq!(c.channel, "stable");
        let beta: UpdateConfig = toml::from_str("channel = \"beta\"\n").unwrap();
        assert_eq!(beta.channel, "beta");
        let err = toml::from_str::<UpdateConfig>("channel = \"Beta 2\"\n").unwrap_err();
        assert!(err.to_string().contains("channel \"Beta 2\""), "{err}");
    }

    #[test]
    fn a_window_parses_into_weekdays_and_a_time_of_day() {
        let c: UpdateConfig = toml::from_str(
            "strategy = \"window\"\n[window]\ndays = [\"mon\", \"Thursday\"]\nstart = \"02:30\"\nlength = \"1h\"\n",
        )
        .unwrap();
        let w = c.window.unwrap();
        assert_eq!(w.days, [Weekday::Mon, Weekday::Thu]);
        assert_eq!(w.start, TimeOfDay::new(2, 30).unwrap());
        // It writes back as it was read (config show, merge).
        let text = toml::to_string(&w).unwrap();
        assert!(text.contains("start = \"02:30\""), "{text}");
        assert!(text.contains("days = [\"mon\", \"thu\"]"), "{text}");
    }

    #[test]
    fn bad_window_values_are_errors_naming_them() {
        for (start, needle) in [("25:00", "25:00"), ("2pm", "2pm"), ("12:60", "12:60")] {
            let text = format!("[window]\nstart = \"{start}\"\nlength = \"1h\"\n");
            let err = toml::from_str::<UpdateConfig>(&text).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
        let err = toml::from_str::<UpdateConfig>(
            "[window]\ndays = [\"someday\"]\nstart = \"01:00\"\nlength = \"1h\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("someday"), "{err}");
    }

    #[test]
    fn a_strategy_without_its_table_is_invalid() {
        let window: UpdateConfig = toml::from_str("strategy = \"window\"\n").unwrap();
        assert!(window.validate().unwrap_err().contains("[update.window]"));
        let fleetlock: UpdateConfig = toml::from_str("strategy = \"fleetlock\"\n").unwrap();
        assert!(fleetlock
            .validate()
            .unwrap_err()
            .contains("[update.fleetlock]"));
        let ok: UpdateConfig =
            toml::from_str("strategy = \"fleetlock\"\n[fleetlock]\nurl = \"http://x/\"\n").unwrap();
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(UpdateConfig::default().validate(), Ok(()));
    }

    #[test]
    fn windows_open_on_their_days_and_hours_only() {
        // 2026-11-26 is a Thursday.
        let w = WindowConfig {
            days: vec![Weekday::Thu],
            start: TimeOfDay::new(2, 0).unwrap(),
            length: Duration::from_secs(3600),
        };
        assert!(w.contains(at("2026-11-26T02:30:00Z")));
        assert!(!w.contains(at("2026-11-26T01:59:59Z")));
        assert!(!w.contains(at("2026-11-26T03:00:00Z")));
        assert!(!w.contains(at("2026-11-27T02:30:00Z")));
        let overnight = WindowConfig {
            days: vec![Weekday::Thu],
            start: TimeOfDay::new(23, 0).unwrap(),
            length: Duration::from_secs(4 * 3600),
        };
        assert!(overnight.contains(at("2026-11-27T01:00:00Z")));
        assert!(!overnight.contains(at("2026-11-27T03:00:00Z")));
        let daily = WindowConfig { days: vec![], ..w };
        assert!(daily.contains(at("2026-11-29T02:10:00Z")));
    }
}
