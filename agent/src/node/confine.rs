//! What a service may do: the `[services.NAME]` keys `user`, `group`,
//! `capabilities`, `no_new_privs`, `nofile` and `oom_score_adj`, checked
//! at load time and turned into a [`sys::Confinement`] the supervisor
//! applies between fork and exec. Also PID 1's own OOM score.

use crate::node::supervisor::ServiceSpec;
use crate::sys::Confinement;

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("service {service}: capabilities: {name:?} is not a Linux capability (write CAP_NET_ADMIN or net_admin)")]
    UnknownCapability { service: String, name: String },
    #[error("service {service}: oom_score_adj {value} is outside -1000..=1000")]
    OomScore { service: String, value: i32 },
    #[error(
        "service {service}: nofile must be 1..=1048576 (the kernel's nr_open default), not {value}"
    )]
    Nofile { service: String, value: u64 },
    #[error("service {service}: group is set without user; give both, or neither")]
    GroupWithoutUser { service: String },
    #[error("writing PID 1's oom_score_adj")]
    OwnScore(#[source] std::io::Error),
}

/// The kernel's default `fs.nr_open`: RLIMIT_NOFILE cannot go above it.
const NR_OPEN: u64 = 1 << 20;

/// PID 1's score: the OOM killer never picks the agent.
pub const AGENT_OOM_SCORE_ADJ: i32 = -1000;

/// One capability name, `CAP_SYS_ADMIN` or `sys_admin` in any case, as its
/// bit.
fn capability_bit(name: &str) -> Option<u64> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    rustix::thread::CapabilitySet::from_name(bare).map(|c| c.bits())
}

/// The confinement `spec` asks for, or the first key that is wrong.
pub fn confinement(service: &str, spec: &ServiceSpec) -> Result<Confinement, ConfineError> {
    if spec.group.is_some() && spec.user.is_none() {
        return Err(ConfineError::GroupWithoutUser {
            service: service.to_owned(),
        });
    }
    let capabilities = match &spec.capabilities {
        None => None,
        Some(names) => {
            let mut bits = 0u64;
            for name in names {
                bits |= capability_bit(name).ok_or_else(|| ConfineError::UnknownCapability {
                    service: service.to_owned(),
                    name: name.clone(),
                })?;
            }
            Some(bits)
        }
    };
    if let Some(value) = spec.oom_score_adj {
        if !(-1000..=1000).contains(&value) {
            return Err(ConfineError::OomScore {
                service: service.to_owned(),
                value,
            });
        }
    }
    if let Some(value) = spec.nofile {
        if !(1..=NR_OPEN).contains(&value) {
            return Err(ConfineError::Nofile {
                service: service.to_owned(),
                value,
            });
        }
    }
    Ok(Confinement {
        uid: spec.user,
        // A user alone runs with the group of the same number, as
        // containers do, never with root's group.
        gid: spec.group.or(spec.user),
        capabilities,
        no_new_privs: spec.no_new_privs,
        nofile: spec.nofile,
        oom_score_adj: spec.oom_score_adj,
    })
}

/// Sets PID 1's own OOM score to [`AGENT_OOM_SCORE_ADJ`].
pub fn protect_agent_from_oom() -> Result<(), ConfineError> {
    std::fs::write("/proc/self/oom_score_adj", AGENT_OOM_SCORE_ADJ.to_string())
        .map_err(ConfineError::OwnScore)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn spec(toml_text: &str) -> ServiceSpec {
        toml::from_str(&format!("command = [\"x\"]\n{toml_text}")).unwrap()
    }

    #[test]
    fn keys_are_checked_and_named() {
        let err = |t: &str| confinement("web", &spec(t)).unwrap_err().to_string();
        assert!(
            err("capabilities = [\"CAP_FLY\"]").contains("\"CAP_FLY\" is not a Linux capability")
        );
        assert!(err("oom_score_adj = -1001").contains("service web: oom_score_adj -1001"));
        assert!(err("nofile = 0").contains("nofile must be"));
        assert!(err("group = 5").contains("group is set without user"));
        let c = confinement(
            "web",
            &spec("user = 1000\ncapabilities = [\"net_bind_service\", \"CAP_NET_RAW\"]\nno_new_privs = true"),
        )
        .unwrap();
        assert_eq!(c.uid, Some(1000));
        assert_eq!(
            c.gid,
            Some(1000),
            "a user alone gets its own group, not root's"
        );
        assert_eq!(c.capabilities, Some((1 << 10) | (1 << 13)));
        assert!(c.no_new_privs);
        assert!(confinement("web", &spec("")).unwrap().is_empty());
    }

    /// `/proc/self/status` of a child started with `c`.
    fn status_of_child(c: Confinement) -> String {
        let mut command = Command::new("cat");
        command.arg("/proc/self/status");
        crate::sys::confine(&mut command, c);
        let out = command.output().expect("running cat");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn field<'a>(status: &'a str, name: &str) -> &'a str {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("{name} missing in {status}"))
    }

    /// A real child confined by the real syscalls. It needs root (CI runs
    /// as root), like the rest of PID 1's work.
    #[test]
    fn a_child_runs_confined() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test changes user and capabilities: run it as root"
        );
        let status = status_of_child(Confinement {
            uid: Some(65534),
            gid: Some(65534),
            capabilities: Some(1 << 10), // CAP_NET_BIND_SERVICE
            no_new_privs: true,
            nofile: Some(4096),
            oom_score_adj: Some(500),
        });
        assert!(field(&status, "Uid:").starts_with("65534"), "{status}");
        assert!(field(&status, "Gid:").starts_with("65534"), "{status}");
        assert_eq!(field(&status, "Groups:"), "");
        assert_eq!(field(&status, "NoNewPrivs:"), "1");
        assert_eq!(field(&status, "CapBnd:"), "0000000000000400");
        assert_eq!(field(&status, "CapAmb:"), "0000000000000400");
        assert_eq!(field(&status, "CapEff:"), "0000000000000400");

        // Raised, not lowered: lowering needs CAP_SYS_RESOURCE, which
        // container-based test machines withhold even from root (the node's
        // PID 1 has it).
        let mut command = Command::new("sh");
        command.args(["-c", "ulimit -n; cat /proc/self/oom_score_adj"]);
        crate::sys::confine(
            &mut command,
            Confinement {
                nofile: Some(4096),
                oom_score_adj: Some(300),
                ..Confinement::default()
            },
        );
        let out = command.output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "4096\n300\n");
    }
}
