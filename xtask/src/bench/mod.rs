//! `cargo xtask bench`: benchmarks, each a ratio against a baseline
//! measured in the same run, recorded in BENCHMARKS.md.

mod agent;
mod boot;
mod install;
mod update;

use anyhow::Result;

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
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.which {
        Bench::Boot(a) => boot::run(a),
        Bench::Install(a) => install::run(a),
        Bench::Agent(a) => agent::run(a),
        Bench::Update(a) => update::run(a),
    }
}

/// Replaces (or adds) the `sub` heading's text inside the `section`
/// heading of BENCHMARKS.md, leaving every other section as it is.
pub fn write_section(section: &str, sub: &str, body: &str) -> Result<()> {
    let path = crate::workspace_root().join("BENCHMARKS.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".to_owned());
    let new = splice(&doc, section, sub, body);
    std::fs::write(&path, new)?;
    println!("wrote {} ({section} / {sub})", path.display());
    Ok(())
}

/// Pure part of [`write_section`].
fn splice(doc: &str, section: &str, sub: &str, body: &str) -> String {
    let block = format!("{sub}\n\n{}\n", body.trim_end());
    let heading_at = |text: &str, heading: &str, from: usize| {
        text[from..]
            .match_indices(heading)
            .map(|(i, _)| from + i)
            .find(|&i| {
                (i == 0 || text.as_bytes()[i - 1] == b'\n')
                    && text[i + heading.len()..].starts_with('\n')
            })
    };
    let Some(sec) = heading_at(doc, section, 0) else {
        return format!("{}\n\n{section}\n\n{block}", doc.trim_end());
    };
    let sec_body = sec + section.len();
    let sec_end = doc[sec_body..]
        .find("\n## ")
        .map_or(doc.len(), |i| sec_body + i + 1);
    match heading_at(doc, sub, sec_body).filter(|&i| i < sec_end) {
        Some(start) => {
            let after = start + sub.len();
            let end = doc[after..sec_end]
                .find("\n### ")
                .map_or(sec_end, |i| after + i + 1);
            format!(
                "{}{block}{}{}",
                &doc[..start],
                if end < doc.len() { "\n" } else { "" },
                doc[end..].trim_start_matches('\n')
            )
        }
        None => {
            let (head, tail) = doc.split_at(sec_end);
            format!("{}\n\n{block}\n{}", head.trim_end(), tail)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::splice;

    #[test]
    fn sections_are_added_then_replaced_in_place() {
        let doc = "# Benchmarks\n\n## Boot\n\nold boot\n";
        let once = splice(doc, "## Agent", "### x86_64", "first");
        assert!(
            once.contains("## Boot\n\nold boot")
                && once.contains("## Agent\n\n### x86_64\n\nfirst\n")
        );
        let twice = splice(&once, "## Agent", "### x86_64", "second");
        assert!(twice.contains("second") && !twice.contains("first"));
        let both = splice(&twice, "## Agent", "### aarch64", "arm");
        assert!(both.contains("### x86_64\n\nsecond") && both.contains("### aarch64\n\narm"));
        let again = splice(&both, "## Agent", "### x86_64", "third");
        assert!(
            again.contains("### x86_64\n\nthird") && again.contains("### aarch64\n\narm"),
            "{again}"
        );
        assert!(again.contains("## Boot\n\nold boot"));
    }
}
