//! Cloud provisioning once the network is up: whether this boot asks the
//! instance metadata service ([`imds_wanted`]), asking it ([`ask_imds`]),
//! and the host name metadata gives ([`node_hostname`]): validated as an
//! RFC 1123 name and kept on STATE, so a provisioned node keeps its name
//! on boots where no metadata source answers (a config drive is read only
//! at first provisioning).

use std::path::Path;

use super::imds;
use super::resolv::dns_name;
use crate::config::user_data::{Gathered, ImdsAnswer};

/// The last host name a metadata source gave, on STATE.
pub const SAVED_HOSTNAME: &str = "/var/lib/ballast/metadata-hostname";
/// The kernel's limit for a host name (HOST_NAME_MAX).
const HOST_NAME_MAX: usize = 64;

/// Whether to ask the instance metadata service this boot: on EC2 (see
/// [`imds::wanted`]) and only when fw_cfg does not carry user-data (fw_cfg
/// wins over it anyway; asking would only cost time).
pub fn imds_wanted(gathered: &Gathered) -> bool {
    let cmdline = std::fs::read_to_string(crate::config::CMDLINE).unwrap_or_default();
    !gathered.has_fw_cfg() && imds::wanted(&cmdline, &imds::read_dmi())
}

/// Asks the metadata service at [`imds::ENDPOINT`]; a failure is logged
/// and the boot goes on with the local sources.
pub async fn ask_imds() -> Option<ImdsAnswer> {
    match imds::fetch(imds::ENDPOINT).await {
        Ok(m) => {
            tracing::info!(
                instance_id = ?m.instance_id,
                local_hostname = ?m.local_hostname,
                user_data_bytes = m.user_data.as_ref().map_or(0, String::len),
                "instance metadata read (IMDSv2)"
            );
            Some(ImdsAnswer {
                user_data: m.user_data,
                hostname: m.local_hostname,
            })
        }
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "no instance metadata; using local user-data sources");
            None
        }
    }
}

/// The host name a metadata source gave, as the kernel takes it: a valid
/// RFC 1123 name in lower case; a name longer than the kernel allows is
/// cut to its first label (as `ip-10-0-0-7` of a long EC2 name).
pub fn valid_hostname(raw: &str) -> Option<String> {
    let name = dns_name(raw.trim())?;
    if name.len() <= HOST_NAME_MAX {
        return Some(name);
    }
    name.split('.').next().map(str::to_owned)
}

/// The node's metadata host name: `fresh` (from this boot's source) when
/// valid, kept on STATE for later boots; else the one kept earlier.
pub fn node_hostname(fresh: Option<&str>) -> Option<String> {
    node_hostname_at(Path::new(SAVED_HOSTNAME), fresh)
}

fn node_hostname_at(saved: &Path, fresh: Option<&str>) -> Option<String> {
    let kept = std::fs::read_to_string(saved)
        .ok()
        .and_then(|t| valid_hostname(&t));
    let Some(raw) = fresh else {
        return kept;
    };
    let Some(name) = valid_hostname(raw) else {
        tracing::warn!(hostname = ?raw, "metadata host name is not a valid RFC 1123 name; ignored");
        return kept;
    };
    if kept.as_deref() != Some(name.as_str()) {
        if let Err(e) =
            crate::atomic::write(saved, format!("{name}\n").as_bytes(), crate::atomic::PUBLIC)
        {
            tracing::warn!(error = %crate::error_chain(&e), "metadata host name not kept on STATE");
        }
    }
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_names_are_checked_and_fit_the_kernel() {
        assert_eq!(
            valid_hostname("ip-10-0-0-7.ec2.internal\n").as_deref(),
            Some("ip-10-0-0-7.ec2.internal")
        );
        assert_eq!(valid_hostname("Web-1").as_deref(), Some("web-1"));
        assert_eq!(valid_hostname("a b"), None);
        assert_eq!(valid_hostname("x;reboot"), None);
        let long = format!("ip-10-0-0-7.{}.example", "a".repeat(60));
        assert_eq!(valid_hostname(&long).as_deref(), Some("ip-10-0-0-7"));
    }

    #[test]
    fn a_fresh_name_is_kept_and_a_later_boot_without_one_reuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let saved = dir.path().join("metadata-hostname");
        assert_eq!(node_hostname_at(&saved, None), None);
        assert_eq!(
            node_hostname_at(&saved, Some("web-1.novalocal")).as_deref(),
            Some("web-1.novalocal")
        );
        assert_eq!(
            std::fs::read_to_string(&saved).unwrap(),
            "web-1.novalocal\n"
        );
        assert_eq!(
            node_hostname_at(&saved, None).as_deref(),
            Some("web-1.novalocal")
        );
        // An invalid fresh name changes nothing.
        assert_eq!(
            node_hostname_at(&saved, Some("bad name")).as_deref(),
            Some("web-1.novalocal")
        );
        assert_eq!(
            node_hostname_at(&saved, Some("web-2")).as_deref(),
            Some("web-2")
        );
    }
}
