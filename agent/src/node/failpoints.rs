//! Fault injection for the VM tests, through the `fail` crate.
//!
//! Fail points are configured only by `/usr/lib/ballast/failpoints`, a
//! file inside the running version's usr image: that image is covered by
//! dm-verity and its root hash by the signed manifest, so no one can arm a
//! fail point on a node without signing a release that carries the file.
//! Release images never do; the VM tests build a test release with one to
//! make a new version hang in its trial boot (the hardware watchdog must
//! then reset it). Lines are `NAME=ACTIONS` in the `fail` crate's syntax
//! (for example `trial-gate=pause`); `#` starts a comment.
//!
//! Fail points in the agent:
//! - `trial-gate`: at the start of a trial boot's health gate, after the
//!   watchdog is armed. `pause` there blocks the agent's only runtime
//!   thread, so the watchdog is no longer petted.

use std::path::Path;

use crate::console::{self, Event};

/// The fail-point file in the usr image.
pub const FAILPOINTS_FILE: &str = "/usr/lib/ballast/failpoints";

#[derive(Debug, thiserror::Error)]
pub enum FailpointError {
    #[error("{path}:{line}: expected NAME=ACTIONS, found {text:?}")]
    Syntax {
        path: String,
        line: usize,
        text: String,
    },
    #[error("{path}:{line}: fail point {name}: {reason}")]
    Actions {
        path: String,
        line: usize,
        name: String,
        reason: String,
    },
}

/// `(name, actions)` pairs of a fail-point file.
fn parse(text: &str, path: &str) -> Result<Vec<(String, String)>, FailpointError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let Some((name, actions)) = line
            .split_once('=')
            .map(|(n, a)| (n.trim(), a.trim()))
            .filter(|(n, a)| !n.is_empty() && !a.is_empty())
        else {
            return Err(FailpointError::Syntax {
                path: path.to_owned(),
                line: i + 1,
                text: raw.to_owned(),
            });
        };
        out.push((name.to_owned(), actions.to_owned()));
    }
    Ok(out)
}

/// Arms the fail points of `path` when it exists; each armed one is
/// reported as a console event so a test image is never mistaken for a
/// release. Errors change nothing: no fail point of the file is armed.
pub fn load(path: &Path) -> Result<usize, FailpointError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(0);
    };
    let shown = path.display().to_string();
    let points = parse(&text, &shown)?;
    for (line, (name, actions)) in points.iter().enumerate() {
        // Checked first so a bad line arms nothing.
        if let Err(reason) = fail::cfg(name.clone(), actions) {
            fail::cfg(name.clone(), "off").ok();
            for (n, _) in &points[..line] {
                fail::remove(n);
            }
            return Err(FailpointError::Actions {
                path: shown,
                line: line + 1,
                name: name.clone(),
                reason,
            });
        }
    }
    for (name, actions) in &points {
        tracing::warn!(name, actions, "fail point armed (test image)");
        console::emit(&Event::FailpointArmed {
            name: name.clone(),
            actions: actions.clone(),
        });
    }
    Ok(points.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_lines_are_parsed_and_bad_ones_named() {
        let ok = parse("# test\ntrial-gate = pause\n\nother=return # why\n", "f").unwrap();
        assert_eq!(
            ok,
            [
                ("trial-gate".to_owned(), "pause".to_owned()),
                ("other".to_owned(), "return".to_owned())
            ]
        );
        for bad in ["trial-gate", "=pause", "name="] {
            match parse(&format!("# c\n{bad}\n"), "f") {
                Err(FailpointError::Syntax { line: 2, text, .. }) => assert_eq!(text, bad),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_bad_action_arms_nothing_and_a_missing_file_is_no_fail_points() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(&dir.path().join("absent")).unwrap(), 0);
        let f = dir.path().join("failpoints");
        std::fs::write(&f, "test-a=return\ntest-b=frobnicate(3)\n").unwrap();
        match load(&f) {
            Err(FailpointError::Actions { line: 2, name, .. }) => assert_eq!(name, "test-b"),
            other => panic!("{other:?}"),
        }
        assert!(!fail::list().iter().any(|(n, _)| n == "test-a"));
        std::fs::write(&f, "test-c=return\n").unwrap();
        assert_eq!(load(&f).unwrap(), 1);
        assert!(fail::list()
            .iter()
            .any(|(n, a)| n == "test-c" && a == "return"));
        fail::remove("test-c");
    }
}
