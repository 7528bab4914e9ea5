//! Lifecycle events on the serial console: one line per event,
//! `BALLAST-EVENT {json}`, so VM tests and users' tooling find them among
//! kernel messages. The format is documented in docs/console-events.md.

use std::io::Write;

use serde_json::{Map, Value};

/// Every event line starts with this.
pub const EVENT_PREFIX: &str = "BALLAST-EVENT ";

/// Milliseconds since the kernel started (CLOCK_BOOTTIME includes suspend,
/// which a booting node never does, and starts with the kernel).
pub fn ms_since_boot() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// Renders one event line (without the newline).
pub fn render(event: &str, fields: &[(&str, Value)]) -> String {
    let mut map = Map::new();
    map.insert("event".into(), Value::from(event));
    map.insert("ms".into(), Value::from(ms_since_boot()));
    for (k, v) in fields {
        map.insert((*k).to_owned(), v.clone());
    }
    format!("{EVENT_PREFIX}{}", Value::Object(map))
}

/// Prints an event on the console. Best effort: a console that cannot be
/// written must never stop a boot.
pub fn emit(event: &str, fields: &[(&str, Value)]) {
    let line = render(event, fields);
    tracing::info!(event, "console event");
    // /dev/console reaches the kernel console (serial) even when stdout was
    // redirected; fall back to stdout off a node (tests, CLI).
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/console")
        .and_then(|mut c| writeln!(c, "{line}"));
    if written.is_err() {
        println!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines_are_prefixed_single_line_json() {
        let line = render(
            "ready",
            &[
                ("version", Value::from("1.0.0")),
                ("reason", Value::from("a\nb")),
            ],
        );
        let json = line.strip_prefix(EVENT_PREFIX).unwrap();
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["event"], "ready");
        assert_eq!(v["version"], "1.0.0");
        assert!(v["ms"].is_u64());
    }
}
