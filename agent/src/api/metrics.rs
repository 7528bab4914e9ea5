//! `/metrics`: renders the node's state in the Prometheus text exposition
//! format (version 0.0.4). It owns the metric names and their meaning only;
//! the values arrive as plain inputs in [`MetricsInput`], which PID 1 fills
//! from the boot information, the updater, the supervisor and the last
//! health report. Rendered by hand: the set is small and fixed, and this
//! keeps the static binary free of a metrics registry (see docs/services.md
//! for the size comparison).
//!
//! Metrics:
//! * `ballast_build_info{version,arch}` 1
//! * `ballast_boots_total`, `ballast_rollbacks_total` (counters)
//! * `ballast_update_state{state}` 1, `ballast_update_last_check_timestamp_seconds`
//! * `ballast_service_up{service}`, `ballast_service_restarts_total{service}`
//! * `ballast_health_check_ok{check}`, `ballast_health_check_duration_seconds{check}`
//! * `ballast_health_report_age_seconds` (checks run in the background; this
//!   says how old the report behind the health metrics is)
//! * `ballast_node_ready`

use std::fmt::Write;
use std::time::{Duration, SystemTime};

use crate::node::health::HealthReport;
use crate::node::supervisor::{ServiceState, ServiceStatus};

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything `/metrics` shows, filled by PID 1 at each scrape.
#[derive(Debug, Clone, Default)]
pub struct MetricsInput {
    pub version: String,
    pub arch: String,
    /// Boots of this node (from the boot counter on STATE).
    pub boots_total: u64,
    /// Times a boot fell back to the previous version.
    pub rollbacks_total: u64,
    /// The updater's state name, e.g. `idle`, `downloading`, `staged`.
    pub update_state: String,
    /// When the updater last asked its repository, if ever.
    pub last_update_check: Option<SystemTime>,
    pub services: Vec<ServiceStatus>,
    /// The last health report; the node counts as not ready without one.
    pub health: Option<HealthReport>,
    /// How long ago that report's run began.
    pub health_age: Option<Duration>,
}

/// Builds the text one family at a time.
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (label, text)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{label}=\"{}\"", escape_label_value(text));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label_value(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn flag(value: bool) -> u8 {
    u8::from(value)
}

/// The whole exposition.
pub fn render(input: &MetricsInput) -> String {
    let mut e = Exposition { out: String::new() };

    e.family(
        "ballast_build_info",
        "gauge",
        "Version and architecture of the running agent.",
    );
    e.sample(
        "ballast_build_info",
        &[("version", &input.version), ("arch", &input.arch)],
        1,
    );

    e.family("ballast_boots_total", "counter", "Boots of this node.");
    e.sample("ballast_boots_total", &[], input.boots_total);
    e.family(
        "ballast_rollbacks_total",
        "counter",
        "Boots that fell back to the previous version.",
    );
    e.sample("ballast_rollbacks_total", &[], input.rollbacks_total);

    e.family(
        "ballast_update_state",
        "gauge",
        "The updater's current state (1 for the state it is in).",
    );
    e.sample("ballast_update_state", &[("state", &input.update_state)], 1);
    if let Some(at) = input.last_update_check {
        let seconds = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        e.family(
            "ballast_update_last_check_timestamp_seconds",
            "gauge",
            "When the updater last checked for an update, in Unix time.",
        );
        e.sample("ballast_update_last_check_timestamp_seconds", &[], seconds);
    }

    if !input.services.is_empty() {
        e.family(
            "ballast_service_up",
            "gauge",
            "1 when the service is running.",
        );
        for s in &input.services {
            let up = flag(s.state == ServiceState::Running);
            e.sample("ballast_service_up", &[("service", &s.name)], up);
        }
        e.family(
            "ballast_service_restarts_total",
            "counter",
            "Times the supervisor restarted the service.",
        );
        for s in &input.services {
            e.sample(
                "ballast_service_restarts_total",
                &[("service", &s.name)],
                s.restarts,
            );
        }
    }

    if let Some(report) = input.health.as_ref().filter(|r| !r.checks.is_empty()) {
        e.family(
            "ballast_health_check_ok",
            "gauge",
            "1 when the health check passed.",
        );
        for c in &report.checks {
            e.sample("ballast_health_check_ok", &[("check", &c.name)], flag(c.ok));
        }
        e.family(
            "ballast_health_check_duration_seconds",
            "gauge",
            "How long the health check took.",
        );
        for c in &report.checks {
            let seconds = c.duration_ms as f64 / 1000.0;
            e.sample(
                "ballast_health_check_duration_seconds",
                &[("check", &c.name)],
                seconds,
            );
        }
    }

    if let Some(age) = input.health_age {
        e.family(
            "ballast_health_report_age_seconds",
            "gauge",
            "Seconds since the health checks behind this report began.",
        );
        e.sample("ballast_health_report_age_seconds", &[], age.as_secs_f64());
    }

    e.family(
        "ballast_node_ready",
        "gauge",
        "1 when every health check passed.",
    );
    let ready = input.health.as_ref().is_some_and(|r| r.ready);
    e.sample("ballast_node_ready", &[], flag(ready));
    e.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::health::CheckResult;
    use crate::node::supervisor::ExitInfo;

    fn input() -> MetricsInput {
        let service = |name: &str, state, restarts| ServiceStatus {
            name: name.into(),
            state,
            pid: None,
            restarts,
            last_exit: Some(ExitInfo {
                code: Some(1),
                signal: None,
            }),
            last_error: None,
            since: 0,
        };
        let check = |name: &str, ok, duration_ms| CheckResult {
            name: name.into(),
            ok,
            message: "m".into(),
            duration_ms,
        };
        MetricsInput {
            version: "1.2.3".into(),
            arch: "x86_64".into(),
            boots_total: 7,
            rollbacks_total: 1,
            update_state: "idle".into(),
            last_update_check: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000)),
            services: vec![
                service("web", ServiceState::Running, 0),
                service("flaky", ServiceState::Backoff, 4),
            ],
            health: Some(HealthReport {
                ready: false,
                checks: vec![
                    check("clock", true, 0),
                    check("quote\"back\\slash\nnewline", false, 1500),
                ],
            }),
            health_age: Some(Duration::from_millis(4250)),
        }
    }

    fn parse(text: &str) -> prometheus_parse::Scrape {
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        prometheus_parse::Scrape::parse(lines).expect("exposition parses")
    }

    fn value(scrape: &prometheus_parse::Scrape, metric: &str, label: Option<(&str, &str)>) -> f64 {
        let sample = scrape
            .samples
            .iter()
            .find(|s| s.metric == metric && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("no sample {metric} {label:?}"));
        match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{metric}: unexpected {other:?}"),
        }
    }

    #[test]
    fn a_prometheus_parser_reads_every_metric() {
        let text = render(&input());
        let scrape = parse(&text);
        assert_eq!(
            value(&scrape, "ballast_build_info", Some(("version", "1.2.3"))),
            1.0
        );
        assert_eq!(
            value(&scrape, "ballast_build_info", Some(("arch", "x86_64"))),
            1.0
        );
        assert_eq!(value(&scrape, "ballast_boots_total", None), 7.0);
        assert_eq!(value(&scrape, "ballast_rollbacks_total", None), 1.0);
        assert_eq!(
            value(&scrape, "ballast_update_state", Some(("state", "idle"))),
            1.0
        );
        assert_eq!(
            value(&scrape, "ballast_update_last_check_timestamp_seconds", None),
            1_780_000_000.0
        );
        assert_eq!(
            value(&scrape, "ballast_service_up", Some(("service", "web"))),
            1.0
        );
        assert_eq!(
            value(&scrape, "ballast_service_up", Some(("service", "flaky"))),
            0.0
        );
        assert_eq!(
            value(
                &scrape,
                "ballast_service_restarts_total",
                Some(("service", "flaky"))
            ),
            4.0
        );
        assert_eq!(
            value(&scrape, "ballast_health_check_ok", Some(("check", "clock"))),
            1.0
        );
        assert_eq!(
            value(
                &scrape,
                "ballast_health_check_duration_seconds",
                Some(("check", "clock"))
            ),
            0.0
        );
        assert_eq!(
            value(&scrape, "ballast_health_report_age_seconds", None),
            4.25
        );
        assert_eq!(value(&scrape, "ballast_node_ready", None), 0.0);
        // Types and help are declared for the parser.
        let docs = &scrape.docs;
        assert_eq!(
            docs["ballast_node_ready"],
            "1 when every health check passed."
        );
        assert!(matches!(
            scrape
                .samples
                .iter()
                .find(|s| s.metric == "ballast_boots_total")
                .unwrap()
                .value,
            prometheus_parse::Value::Counter(_)
        ));
        // The awkward label value is escaped, not breaking the line.
        assert!(
            text.contains(r#"check="quote\"back\\slash\nnewline""#),
            "{text}"
        );
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 15);
    }

    #[test]
    fn optional_parts_are_left_out() {
        let text = render(&MetricsInput::default());
        let scrape = parse(&text);
        assert_eq!(value(&scrape, "ballast_node_ready", None), 0.0);
        assert!(!text.contains("ballast_service_up"));
        assert!(!text.contains("last_check"));
        assert!(!text.contains("ballast_health_check_ok"));
        assert!(!text.contains("ballast_health_report_age_seconds"));
    }

    /// `promtool check metrics` (Debian's `prometheus` package) is the
    /// reference parser and linter; the test says so when it is missing.
    #[test]
    #[ignore = "needs promtool (Debian package prometheus, too large for `cargo xtask deps`); run with --ignored where it is installed"]
    fn promtool_accepts_the_exposition_when_installed() {
        use std::io::Write as _;
        let Ok(mut child) = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        else {
            panic!("promtool is not installed (Debian package prometheus)");
        };
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(render(&input()).as_bytes()).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && report.trim().is_empty(),
            "promtool: {report}"
        );
    }
}
