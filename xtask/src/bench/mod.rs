//! `cargo xtask bench`: benchmarks, each a ratio against a baseline
//! measured in the same run, recorded in BENCHMARKS.md.

mod agent;
mod boot;
mod delta;
mod fleet;
mod install;
mod loopback;
mod update;

use anyhow::{Context as _, Result};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: Bench,
}

#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// Boot to agent-ready against a busybox initramfs floor.
    Boot(boot::BootBenchArgs),
    /// Install throughput against curl | tee >(openssl dgst) > file && sync.
    Install(install::InstallBenchArgs),
    /// The agent's idle RSS and CPU in a VM, and its binary size.
    Agent(agent::AgentBenchArgs),
    /// One update cycle in a VM, split into install, reboot and health gate.
    Update(update::UpdateBenchArgs),
    /// Delta update against full download: bytes served and time.
    Delta(delta::DeltaBenchArgs),
    /// Fleet arithmetic: N nodes polling a static repository, full against
    /// delta downloads (a simulation; no network).
    Fleet(fleet::FleetBenchArgs),
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.which {
        Bench::Boot(a) => boot::run(a),
        Bench::Install(a) => install::run(a),
        Bench::Agent(a) => agent::run(a),
        Bench::Update(a) => update::run(a),
        Bench::Delta(a) => delta::run(a),
        Bench::Fleet(a) => fleet::run(a),
    }
}

/// Where a report goes in BENCHMARKS.md.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    /// The benchmark's `## ` heading.
    pub section: &'a str,
    /// The paragraph right under that heading, rewritten on every write;
    /// `None` keeps what is there.
    pub intro: Option<&'a str>,
    /// The `### ` heading (one per arch) whose text the report replaces;
    /// `None`: the report is the section's whole text.
    pub sub: Option<&'a str>,
}

/// Writes `body` as the `### <arch>` part of `section`.
pub fn write_arch_section(
    section: &str,
    intro: Option<&str>,
    arch: impl std::fmt::Display,
    body: &str,
) -> Result<()> {
    let sub = format!("### {arch}");
    let place = Place {
        section,
        intro,
        sub: Some(&sub),
    };
    write_section(&place, body)
}

/// Writes `body` at `place` in BENCHMARKS.md, leaving every other section
/// (and every other `### ` of the same section) as it is. The one writer
/// every benchmark uses.
pub fn write_section(place: &Place<'_>, body: &str) -> Result<()> {
    let path = crate::workspace_root().join("BENCHMARKS.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_default();
    let new = splice(&doc, place, body);
    std::fs::write(&path, new).with_context(|| format!("writing {}", path.display()))?;
    let sub = place.sub.unwrap_or("");
    println!("wrote {} ({} {sub})", path.display(), place.section);
    Ok(())
}

/// A heading line and the text under it.
struct Block<'d> {
    heading: &'d str,
    text: String,
}

/// Splits `text` at lines that start with `prefix` (a heading level):
/// the text before the first heading, then one block per heading.
fn split_blocks<'d>(text: &'d str, prefix: &str) -> (String, Vec<Block<'d>>) {
    let mut head = String::new();
    let mut blocks: Vec<Block<'d>> = Vec::new();
    for line in text.split_inclusive('\n') {
        if line.starts_with(prefix) {
            blocks.push(Block {
                heading: line.trim_end(),
                text: String::new(),
            });
        } else if let Some(last) = blocks.last_mut() {
            last.text.push_str(line);
        } else {
            head.push_str(line);
        }
    }
    (head, blocks)
}

/// Joins non-empty parts with one blank line between them.
fn paragraphs<'p>(parts: impl IntoIterator<Item = &'p str>) -> String {
    parts
        .into_iter()
        .map(|p| p.trim_matches('\n'))
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// Pure part of [`write_section`].
fn splice(doc: &str, place: &Place<'_>, body: &str) -> String {
    let doc = if doc.trim().is_empty() {
        "# Benchmarks\n"
    } else {
        doc
    };
    let (title, mut sections) = split_blocks(doc, "## ");
    let section = match sections.iter().position(|b| b.heading == place.section) {
        Some(i) => i,
        None => {
            sections.push(Block {
                heading: place.section,
                text: String::new(),
            });
            sections.len() - 1
        }
    };
    let old = std::mem::take(&mut sections[section].text);
    let new = match place.sub {
        None => paragraphs([place.intro.unwrap_or(""), body]),
        Some(sub) => {
            let (intro, mut subs) = split_blocks(&old, "### ");
            match subs.iter_mut().find(|b| b.heading == sub) {
                Some(b) => b.text = body.to_owned(),
                None => subs.push(Block {
                    heading: sub,
                    text: body.to_owned(),
                }),
            }
            let subs: Vec<String> = subs
                .iter()
                .map(|b| paragraphs([b.heading, b.text.as_str()]))
                .collect();
            let intro = place.intro.unwrap_or(&intro);
            paragraphs(std::iter::once(intro).chain(subs.iter().map(String::as_str)))
        }
    };
    sections[section].text = new;
    let rendered: Vec<String> = sections
        .iter()
        .map(|b| paragraphs([b.heading, b.text.as_str()]))
        .collect();
    let all =
        paragraphs(std::iter::once(title.as_str()).chain(rendered.iter().map(String::as_str)));
    format!("{all}\n")
}

#[cfg(test)]
mod tests {
    use super::{splice, Place};

    fn arch<'a>(section: &'a str, sub: &'a str) -> Place<'a> {
        Place {
            section,
            intro: None,
            sub: Some(sub),
        }
    }

    #[test]
    fn subsections_are_added_then_replaced_in_place() {
        let doc = "# Benchmarks\n\n## Boot\n\nold boot\n";
        let once = splice(doc, &arch("## Agent", "### x86_64"), "first");
        assert_eq!(
            once,
            "# Benchmarks\n\n## Boot\n\nold boot\n\n## Agent\n\n### x86_64\n\nfirst\n"
        );
        let twice = splice(&once, &arch("## Agent", "### x86_64"), "second");
        assert!(twice.contains("second") && !twice.contains("first"));
        let both = splice(&twice, &arch("## Agent", "### aarch64"), "arm\n");
        assert!(both.ends_with("### x86_64\n\nsecond\n\n### aarch64\n\narm\n"));
        let again = splice(&both, &arch("## Agent", "### x86_64"), "third");
        assert!(
            again.contains("### x86_64\n\nthird\n\n### aarch64\n\narm"),
            "{again}"
        );
        assert!(again.starts_with("# Benchmarks\n\n## Boot\n\nold boot\n\n## Agent"));
        // Writing the same thing twice changes nothing.
        assert_eq!(
            splice(&again, &arch("## Agent", "### x86_64"), "third"),
            again
        );
    }

    #[test]
    fn an_intro_is_written_under_the_section_heading() {
        let place = Place {
            section: "## Boot to ready",
            intro: Some("How it is measured."),
            sub: Some("### x86_64"),
        };
        let fresh = splice("", &place, "x");
        assert_eq!(
            fresh,
            "# Benchmarks\n\n## Boot to ready\n\nHow it is measured.\n\n### x86_64\n\nx\n"
        );
        // A later section survives; the intro is rewritten, not repeated.
        let doc = format!("{fresh}\n## Agent RSS\n\nsmall\n");
        let place = Place {
            intro: Some("Measured better."),
            sub: Some("### aarch64"),
            ..place
        };
        let e = splice(&doc, &place, "arm");
        assert_eq!(
            e,
            "# Benchmarks\n\n## Boot to ready\n\nMeasured better.\n\n### x86_64\n\nx\n\n\
             ### aarch64\n\narm\n\n## Agent RSS\n\nsmall\n"
        );
        // Without an intro, the one there stays.
        let kept = splice(&e, &arch("## Boot to ready", "### x86_64"), "y");
        assert!(kept.contains("## Boot to ready\n\nMeasured better.\n\n### x86_64\n\ny\n"));
    }

    #[test]
    fn a_whole_section_is_replaced_in_place() {
        let place = Place {
            section: "## Install throughput",
            intro: None,
            sub: None,
        };
        let old = "# B\n\n## Boot to ready\nx\n\n## Install throughput\nold\n\n## Other\ny\n";
        assert_eq!(
            splice(old, &place, "new\n"),
            "# B\n\n## Boot to ready\n\nx\n\n## Install throughput\n\nnew\n\n## Other\n\ny\n"
        );
        assert_eq!(
            splice("# B\n", &place, "n"),
            "# B\n\n## Install throughput\n\nn\n"
        );
    }
}
