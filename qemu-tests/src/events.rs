//! Console events as the agent prints them on the serial console:
//! `BALLAST-EVENT {"event":"ready","ms":1234,...}` (see ARCHITECTURE.md and
//! docs/console-events.md). This module owns finding and parsing those
//! lines; it does no I/O. The agent's events parse into its own type,
//! [`ballast::console::Event`]; the few lines test programs print (the
//! floor's `/init`, the k8s test container) are listed in [`TEST_EVENTS`].

use std::time::Duration;

pub use ballast::console::{Event as AgentEvent, EVENT_PREFIX};
use serde_json::{Map, Value};

use crate::floor::FLOOR_EVENT;
use crate::k8s::CONTAINER_EVENT;

/// Events printed by test programs rather than the agent.
pub const TEST_EVENTS: &[&str] = &[FLOOR_EVENT, CONTAINER_EVENT];

/// Whether `name` is an event anyone prints: the agent's or a test
/// program's. Waiting for anything else is a typo.
pub fn is_known(name: &str) -> bool {
    AgentEvent::NAMES.contains(&name) || TEST_EVENTS.contains(&name)
}

/// Errors parsing an event line that carries the prefix.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("event line is not JSON: {line:?}")]
    Json {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("event line is not a JSON object: {0:?}")]
    NotObject(String),
    #[error("event line lacks a string \"event\" field: {0:?}")]
    NoName(String),
    #[error("event line does not match the agent's events (agent/src/console.rs): {line:?}")]
    Agent {
        line: String,
        #[source]
        source: serde_json::Error,
    },
}

/// One lifecycle event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The `event` field: `early-boot`, `ready`, `boot-failed`, `shutdown`, ...
    pub name: String,
    /// All fields of the JSON object, `event` included.
    pub fields: Map<String, Value>,
    /// The agent's event, typed; `None` for [`TEST_EVENTS`].
    pub agent: Option<AgentEvent>,
    /// Time since the VM's QEMU process started when the harness read the
    /// line (`None` for events parsed outside a VM).
    pub host_elapsed: Option<Duration>,
}

impl Event {
    /// The `ms` field: milliseconds since the kernel started.
    pub fn ms(&self) -> Option<u64> {
        self.fields.get("ms").and_then(Value::as_u64)
    }

    /// A string field, e.g. `version`, `arch`, `slot`, `boot_id`, `reason`.
    pub fn str_field(&self, key: &str) -> Option<&str> {
        self.fields.get(key).and_then(Value::as_str)
    }

    /// The event as one JSON line (without the prefix), for messages.
    pub fn json(&self) -> String {
        Value::Object(self.fields.clone()).to_string()
    }
}

/// Finds an event in one console line. Returns `None` for lines without the
/// prefix. The prefix is looked for anywhere in the line, not only at its
/// start: kernel messages and firmware escape sequences can share a line
/// with it on a serial console.
pub fn parse_line(line: &str) -> Option<Result<Event, EventError>> {
    let start = line.find(EVENT_PREFIX)?;
    let json = line[start + EVENT_PREFIX.len()..].trim();
    Some(parse_json(json))
}

fn parse_json(json: &str) -> Result<Event, EventError> {
    let value: Value = serde_json::from_str(json).map_err(|source| EventError::Json {
        line: json.to_owned(),
        source,
    })?;
    let Value::Object(fields) = value else {
        return Err(EventError::NotObject(json.to_owned()));
    };
    let name = fields
        .get("event")
        .and_then(Value::as_str)
        .ok_or_else(|| EventError::NoName(json.to_owned()))?
        .to_owned();
    let agent = if TEST_EVENTS.contains(&name.as_str()) {
        None
    } else {
        let typed = serde_json::from_value(Value::Object(fields.clone())).map_err(|source| {
            EventError::Agent {
                line: json.to_owned(),
                source,
            }
        })?;
        Some(typed)
    };
    Ok(Event {
        name,
        fields,
        agent,
        host_elapsed: None,
    })
}

/// Turns raw serial bytes (one line, without the newline) into text: lossy
/// UTF-8, carriage returns and other control characters except tab removed.
pub fn clean_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .filter(|c| !c.is_control() || *c == '\t')
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_parses_with_fields() {
        let line = r#"BALLAST-EVENT {"event":"ready","ms":1234,"version":"1.0.0","arch":"x86_64","slot":"a","boot_id":"b1","hostname":"node-1"}"#;
        let ev = parse_line(line).unwrap().unwrap();
        assert_eq!(ev.name, "ready");
        assert_eq!(ev.ms(), Some(1234));
        assert_eq!(ev.str_field("version"), Some("1.0.0"));
        assert_eq!(ev.str_field("slot"), Some("a"));
        assert_eq!(ev.str_field("boot_id"), Some("b1"));
        assert_eq!(ev.str_field("missing"), None);
        assert_eq!(
            ev.agent,
            Some(AgentEvent::Ready {
                version: "1.0.0".into(),
                arch: "x86_64".into(),
                slot: "a".into(),
                boot_id: "b1".into(),
                hostname: "node-1".into(),
            })
        );
    }

    #[test]
    fn agent_events_must_match_the_agent_enum() {
        // Unknown names and wrong field types are caught, not ignored.
        assert!(matches!(
            parse_line(r#"BALLAST-EVENT {"event":"redy","ms":1}"#),
            Some(Err(EventError::Agent { .. }))
        ));
        assert!(matches!(
            parse_line(
                r#"BALLAST-EVENT {"event":"trial-boot","ms":1,"version":"1.1.0","deadline_s":"5"}"#
            ),
            Some(Err(EventError::Agent { .. }))
        ));
        // Test programs' own events stay untyped.
        let floor = format!(r#"BALLAST-EVENT {{"event":"{FLOOR_EVENT}","ms":3}}"#);
        let ev = parse_line(&floor).unwrap().unwrap();
        assert_eq!(ev.agent, None);
        assert_eq!(ev.ms(), Some(3));
        assert!(is_known(FLOOR_EVENT) && is_known("rolled-back"));
        assert!(!is_known("redy"));
    }

    #[test]
    fn lines_the_agent_renders_parse_back() {
        let event = AgentEvent::Rebooting {
            version: "1.1.0".into(),
            reason: Some("rollback".into()),
        };
        let ev = parse_line(&ballast::console::render(&event, 9))
            .unwrap()
            .unwrap();
        assert_eq!(ev.name, "rebooting");
        assert_eq!(ev.ms(), Some(9));
        assert_eq!(ev.agent, Some(event));
    }

    #[test]
    fn lines_without_prefix_are_not_events() {
        assert!(parse_line("[    1.234] virtio_blk virtio1: [vda] 4194304 512-byte").is_none());
        assert!(parse_line("").is_none());
        assert!(parse_line("BALLAST-EVENT-like text").is_none());
    }

    #[test]
    fn prefix_after_other_output_still_counts() {
        let raw =
            b"\x1b[2J\x1b[01;01H[  2.0] x BALLAST-EVENT {\"event\":\"early-boot\",\"ms\":5}\r";
        let line = clean_line(raw);
        let ev = parse_line(&line).unwrap().unwrap();
        assert_eq!(ev.name, "early-boot");
        assert_eq!(ev.ms(), Some(5));
    }

    #[test]
    fn malformed_events_are_errors_not_silence() {
        assert!(matches!(
            parse_line("BALLAST-EVENT {\"event\":"),
            Some(Err(EventError::Json { .. }))
        ));
        assert!(matches!(
            parse_line("BALLAST-EVENT [1,2]"),
            Some(Err(EventError::NotObject(_)))
        ));
        assert!(matches!(
            parse_line("BALLAST-EVENT {\"ms\":1}"),
            Some(Err(EventError::NoName(_)))
        ));
    }

    #[test]
    fn boot_failed_reason_is_readable() {
        let ev = parse_line(
            r#"BALLAST-EVENT {"event":"boot-failed","ms":900,"reason":"reading USR-A through dm-verity: Input/output error"}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(ev.name, "boot-failed");
        assert!(ev.str_field("reason").unwrap().contains("dm-verity"));
        assert!(ev.json().contains("\"boot-failed\""));
    }
}
