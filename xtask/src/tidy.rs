//! Tidy checks run by `cargo test -p xtask` (rust-analyzer's
//! `xtask/src/tidy.rs` style): the rules ARCHITECTURE.md states, made into
//! tests so they hold without anyone remembering them. Each check reads the
//! source tree only, except the dependency check, which asks `cargo
//! metadata` (offline: the lock file and the local registry cache).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace root")
        .to_owned()
}

/// Every file under `dir` ending in `ext`, skipping build output (`target`,
/// and the git-ignored `target-*` of other target directories), `build`
/// (images) and hidden directories (`.git`, `.cargo`, `.cache`).
fn files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            let build_output = name == "target" || name.starts_with("target-") || name == "build";
            if !build_output && !name.starts_with('.') {
                files(&path, ext, out);
            }
        } else if name.ends_with(ext) {
            out.push(path);
        }
    }
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

fn workspace_files(ext: &str) -> Vec<(String, String)> {
    let mut paths = Vec::new();
    files(&root(), ext, &mut paths);
    paths.sort();
    assert!(
        !paths.is_empty(),
        "no *{ext} files under {}",
        root().display()
    );
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (rel(&p), text)
        })
        .collect()
}

#[test]
fn every_rust_file_starts_with_a_module_doc() {
    let missing: Vec<String> = workspace_files(".rs")
        .into_iter()
        .filter(|(_, text)| {
            !text
                .lines()
                .find(|l| !l.trim().is_empty())
                .is_some_and(|l| l.starts_with("//!"))
        })
        .map(|(path, _)| path)
        .collect();
    assert!(
        missing.is_empty(),
        "these files do not start with a `//!` doc saying what they own:\n{}",
        missing.join("\n")
    );
}

#[test]
fn dead_code_allowances_say_why() {
    // Built at run time so this file's own text does not match.
    let lint = ["dead", "_code"].concat();
    let mut bad = Vec::new();
    for (path, text) in workspace_files(".rs") {
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            let attr = (t.starts_with("#[") || t.starts_with("#!["))
                && t.contains("allow(")
                && t.contains(&lint);
            let reason_here = t.contains("//");
            let reason_above = i > 0 && lines[i - 1].trim_start().starts_with("//");
            if attr && !reason_here && !reason_above {
                bad.push(format!("{path}:{}: {}", i + 1, t));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "allow of unused code without a reason comment (same or previous line):\n{}",
        bad.join("\n")
    );
}

/// `[text](target)` link targets outside code, with their line numbers.
fn markdown_links(text: &str) -> Vec<(usize, String)> {
    let mut links = Vec::new();
    let mut fenced = false;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Drop inline code spans: `a](b)` there is not a link.
        let prose: String = line
            .split('`')
            .enumerate()
            .filter(|(n, _)| n % 2 == 0)
            .map(|(_, s)| s)
            .collect::<Vec<_>>()
            .join(" ");
        let mut rest = prose.as_str();
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let Some(end) = rest.find(')') else { break };
            let target = rest[..end].split_whitespace().next().unwrap_or("");
            links.push((i + 1, target.trim_matches(['<', '>']).to_owned()));
            rest = &rest[end..];
        }
        // Reference definitions: `[name]: target`.
        if let Some(def) = line.trim_start().strip_prefix('[') {
            if let Some((_, target)) = def.split_once("]: ") {
                links.push((
                    i + 1,
                    target.split_whitespace().next().unwrap_or("").to_owned(),
                ));
            }
        }
    }
    links
}

#[test]
fn relative_markdown_links_point_at_files_that_exist() {
    let mut broken = Vec::new();
    for (path, text) in workspace_files(".md") {
        let dir = root().join(&path);
        let dir = dir.parent().unwrap();
        for (line, target) in markdown_links(&text) {
            let local = !target.is_empty()
                && !target.contains("://")
                && !target.starts_with('#')
                && !target.starts_with("mailto:");
            if !local {
                continue;
            }
            let file = target.split('#').next().unwrap_or("");
            if !dir.join(file).exists() {
                broken.push(format!("{path}:{line}: {target}"));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "relative links to files that do not exist:\n{}",
        broken.join("\n")
    );
}

#[test]
fn markdown_links_are_found_outside_code_only() {
    let text = "see [a](docs/a.md#x) and `[b](no.md)`\n```\n[c](no.md)\n```\n[d]: e.md \"t\"\n";
    assert_eq!(
        markdown_links(text),
        vec![(1, "docs/a.md#x".to_owned()), (5, "e.md".to_owned())]
    );
}

/// The agent's layers (lib.rs's doc): a module may import only from its
/// own layer or below.
fn layer(top: &str) -> Option<u8> {
    Some(match top {
        "sys" | "console" | "atomic" | "duration" => 0,
        // Each subsystem owns its table's types (ServiceSpec, HealthConfig,
        // the boot-time user-data sources); config composes them, so it
        // sits above node and boot and below everything that reads it.
        "node" | "boot" => 1,
        "config" => 2,
        "net" => 3,
        "update" | "kubernetes" => 4,
        "api" => 5,
        "init" | "cli" => 6,
        _ => return None,
    })
}

/// Upward imports being removed by work in flight, as (file, imported
/// top-level module). The test fails when one disappears too, so this list
/// stays exact: delete an entry when its import goes.
const LAYER_ALLOWLIST: &[(&str, &str)] = &[];

/// A `crate::<top>` path in the agent: file, line, `<top>`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Import {
    file: String,
    line: usize,
    top: String,
}

fn ident_at(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// The top-level modules named by `crate::x` and `crate::{x, y::z}` paths,
/// comments left out.
fn crate_imports(file: &str, text: &str) -> Vec<Import> {
    // Comments out, line structure kept.
    let code: String = text
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("//") {
                ""
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let mut out = Vec::new();
    let mut push = |at: usize, top: &str| {
        if !top.is_empty() && top != "self" {
            out.push(Import {
                file: file.to_owned(),
                line: line_of(at),
                top: top.to_owned(),
            });
        }
    };
    let mut from = 0;
    while let Some(found) = code[from..].find("crate::") {
        let at = from + found;
        from = at + "crate::".len();
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$' || c == ':') {
            continue;
        }
        let rest = &code[from..];
        if let Some(group) = rest.strip_prefix('{') {
            // The first name of each item at depth one.
            let mut depth = 1;
            let mut expect = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => expect = true,
                    c if expect && depth == 1 && (c.is_alphabetic() || c == '_') => {
                        expect = false;
                        push(from + 1 + i, ident_at(&group[i..]));
                    }
                    _ => {}
                }
            }
        } else {
            push(from, ident_at(rest));
        }
    }
    out
}

/// The agent's upward imports: (import, the importing file's top module).
fn layer_violations() -> Vec<Import> {
    let mut paths = Vec::new();
    files(&root().join("agent/src"), ".rs", &mut paths);
    paths.sort();
    let mut found = Vec::new();
    for path in paths {
        let file = rel(&path);
        let inside = path.strip_prefix(root().join("agent/src")).unwrap();
        let first = inside.components().next().unwrap().as_os_str();
        let own = first.to_string_lossy();
        let own = own.trim_end_matches(".rs");
        let Some(own_layer) = layer(own) else {
            continue; // lib.rs and main.rs sit above every layer
        };
        let text = std::fs::read_to_string(&path).unwrap();
        for import in crate_imports(&file, &text) {
            let Some(to) = layer(&import.top) else {
                continue; // crate-root items (error_chain, reopen_console)
            };
            // Nothing but the CLI itself imports the CLI.
            let upward = to > own_layer || (import.top == "cli" && own != "cli");
            if upward {
                found.push(import);
            }
        }
    }
    found
}

#[test]
fn agent_modules_import_only_their_layer_or_below() {
    let found = layer_violations();
    assert!(!found.is_empty() || LAYER_ALLOWLIST.is_empty());
    let allowed: BTreeSet<(&str, &str)> = LAYER_ALLOWLIST.iter().copied().collect();
    let new: Vec<String> = found
        .iter()
        .filter(|i| !allowed.contains(&(i.file.as_str(), i.top.as_str())))
        .map(|i| format!("{}:{}: imports crate::{}", i.file, i.line, i.top))
        .collect();
    let seen: BTreeSet<(&str, &str)> = found
        .iter()
        .map(|i| (i.file.as_str(), i.top.as_str()))
        .collect();
    let gone: Vec<String> = allowed
        .difference(&seen)
        .map(|(f, t)| format!("{f} -> {t}"))
        .collect();
    let mut report = String::new();
    if !new.is_empty() {
        report += &format!(
            "upward imports (layers: sys, console, atomic, duration < node, boot < config \
             < net < update, kubernetes < api < init, cli; only main.rs uses cli):\n{}\n",
            new.join("\n")
        );
    }
    if !gone.is_empty() {
        report += &format!(
            "fixed, so delete from LAYER_ALLOWLIST in xtask/src/tidy.rs:\n{}\n",
            gone.join("\n")
        );
    }
    assert!(report.is_empty(), "{report}");
}

#[test]
fn crate_imports_reads_paths_and_groups() {
    let text = "//! doc crate::cli\nuse crate::{api, console::{self, Event}};\nfn f() { crate::node::x(); $crate::no(); }\n// crate::update\n";
    let tops: Vec<(usize, String)> = crate_imports("f.rs", text)
        .into_iter()
        .map(|i| (i.line, i.top))
        .collect();
    assert_eq!(
        tops,
        vec![
            (2, "api".to_owned()),
            (2, "console".to_owned()),
            (3, "node".to_owned())
        ]
    );
}

/// Licenses every dependency must be available under (Firecracker's
/// deny.toml, plus the ones our tree needs, each with its reason).
const LICENSES: &[&str] = &[
    "Apache-2.0",
    "MIT",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "ISC",
    "Unicode-3.0",
    "Zlib",
    "CC0-1.0",
    // ring's BoringSSL-derived parts.
    "OpenSSL",
    // webpki-roots: Mozilla's CA list as data.
    "CDLA-Permissive-2.0",
];

/// Crates present in two versions, each with who pulls the old one. The
/// test fails when one is resolved too, so the list stays exact.
const DUPLICATES: &[(&str, &str)] = &[
    (
        "base64",
        "hyper-util 0.1.21 moved to 0.23; reqwest and k8s-openapi use 0.22",
    ),
    (
        "getrandom",
        "0.2 for ring, ours and the updater; tempfile and uuid use 0.4",
    ),
    ("nix", "rtnetlink 0.14 pins 0.27; the agent uses 0.29"),
    (
        "rand",
        "fail 0.5 uses 0.8; 0.10 is quinn-proto's (reqwest's HTTP/3, resolved, not built)",
    ),
    (
        "rand_core",
        "0.6 under rand 0.8; 0.10 under getrandom 0.4 and quinn's chacha20",
    ),
    (
        "syn",
        "proc macros on syn 2 (thiserror 1, tracing) next to syn 3",
    ),
    ("thiserror", "netlink-packet-utils and rtnetlink are on 1"),
    ("thiserror-impl", "as thiserror"),
    (
        "cpufeatures",
        "sha2 0.10 uses 0.2; 0.3 is quinn's chacha20 (not built)",
    ),
];

/// Whether an SPDX expression is satisfied by `allowed`: `OR` needs one
/// side, `AND` both, `X WITH exception` counts as `X`; `/` is the old
/// spelling of `OR`.
fn license_ok(expr: &str, allowed: &[&str]) -> bool {
    let spaced = expr
        .replace('(', " ( ")
        .replace(')', " ) ")
        .replace('/', " OR ");
    let tokens: Vec<&str> = spaced.split_whitespace().collect();
    let mut pos = 0;
    let ok = or_expr(&tokens, &mut pos, allowed);
    ok == Some(true) && pos == tokens.len()
}

fn or_expr(t: &[&str], pos: &mut usize, allowed: &[&str]) -> Option<bool> {
    let mut value = and_expr(t, pos, allowed)?;
    while t.get(*pos) == Some(&"OR") {
        *pos += 1;
        value |= and_expr(t, pos, allowed)?;
    }
    Some(value)
}

fn and_expr(t: &[&str], pos: &mut usize, allowed: &[&str]) -> Option<bool> {
    let mut value = atom(t, pos, allowed)?;
    while t.get(*pos) == Some(&"AND") {
        *pos += 1;
        value &= atom(t, pos, allowed)?;
    }
    Some(value)
}

fn atom(t: &[&str], pos: &mut usize, allowed: &[&str]) -> Option<bool> {
    let token = *t.get(*pos)?;
    *pos += 1;
    let value = if token == "(" {
        let inner = or_expr(t, pos, allowed)?;
        (t.get(*pos) == Some(&")")).then_some(())?;
        *pos += 1;
        inner
    } else if ["AND", "OR", "WITH", ")"].contains(&token) {
        return None;
    } else {
        allowed.contains(&token)
    };
    if t.get(*pos) == Some(&"WITH") {
        *pos += 2; // the exception only widens the grant
    }
    Some(value)
}

#[test]
fn spdx_expressions_are_evaluated() {
    let allowed = &["MIT", "Apache-2.0", "ISC"];
    assert!(license_ok("MIT OR Apache-2.0", allowed));
    assert!(license_ok("MIT/Apache-2.0", allowed));
    assert!(license_ok("Apache-2.0 AND ISC", allowed));
    assert!(license_ok("(MIT OR GPL-3.0) AND ISC", allowed));
    assert!(license_ok(
        "Apache-2.0 WITH LLVM-exception OR GPL-2.0",
        allowed
    ));
    assert!(!license_ok("GPL-3.0", allowed));
    assert!(!license_ok("MIT AND GPL-3.0", allowed));
    assert!(!license_ok("MIT OR", allowed));
    assert!(!license_ok("(MIT", allowed));
}

/// The host and the two image targets: what any crate here is built for.
const BUILT_PLATFORMS: [&str; 3] = [
    "x86_64-unknown-linux-gnu",
    "x86_64-unknown-linux-musl",
    "aarch64-unknown-linux-musl",
];

#[test]
fn dependencies_have_allowed_licenses_and_known_duplicates() {
    let out = std::process::Command::new(env!("CARGO"))
        // Only the platforms we build for: other platforms' crates (for
        // example Android's) are never downloaded, so `--offline` would
        // fail on a fresh machine.
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(
            BUILT_PLATFORMS
                .iter()
                .flat_map(|t| ["--filter-platform", t]),
        )
        .current_dir(root())
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut refused = Vec::new();
    let mut versions: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for p in meta["packages"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let version = p["version"].as_str().unwrap();
        versions.entry(name).or_default().insert(version);
        match p["license"].as_str() {
            Some(l) if license_ok(l, LICENSES) => {}
            other => refused.push(format!("{name} {version}: {other:?}")),
        }
    }
    assert!(
        refused.is_empty(),
        "dependencies under licenses outside LICENSES (xtask/src/tidy.rs):\n{}",
        refused.join("\n")
    );
    let dups: BTreeSet<&str> = versions
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(n, _)| *n)
        .collect();
    let known: BTreeSet<&str> = DUPLICATES.iter().map(|(n, _)| *n).collect();
    let new: Vec<String> = dups
        .difference(&known)
        .map(|n| format!("{n}: {:?}", versions[n]))
        .collect();
    let gone: Vec<&&str> = known.difference(&dups).collect();
    assert!(
        new.is_empty(),
        "crates now in two versions (unify them, or add to DUPLICATES with the reason):\n{}",
        new.join("\n")
    );
    assert!(
        gone.is_empty(),
        "no longer duplicated, delete from DUPLICATES: {gone:?}"
    );
}
