//! The signed update manifest: its JSON format, detached ed25519
//! signatures checked over the raw bytes before anything is parsed, and the
//! choice of the release that applies to a node (arch, variant, release
//! floor, rollout waves, downgrade and replay protection).
//!
//! `manifest.json` is a [`Manifest`]; `manifest.json.sig` is a JSON list of
//! [`Signature`]. Payload files live in the repository under
//! `objects/<sha256>`, so no name in a manifest ever becomes a path.

use std::collections::BTreeSet;
use std::time::SystemTime;

use ed25519_dalek::Signature as DalekSignature;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys::TrustedKeys;
use crate::payload::{Arch, PayloadError, PayloadMetadata, Version, INITRD, KERNEL, USR_IMAGE};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const SIGNATURES_FILE: &str = "manifest.json.sig";
pub const OBJECTS_DIR: &str = "objects";
/// Format version of [`Manifest`].
pub const SCHEMA: u32 = 1;
/// Manifests and signature lists larger than this are refused unread.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("the manifest has no signatures")]
    MissingSignature,
    #[error("the signature list is malformed")]
    SignatureList(#[source] serde_json::Error),
    #[error("signature by trusted key {key_id} does not match the manifest bytes")]
    BadSignature { key_id: String },
    #[error("the manifest is signed only by unknown keys {key_ids:?}; trusted: {trusted:?}")]
    UnknownKey {
        key_ids: Vec<String>,
        trusted: Vec<String>,
    },
    #[error("the manifest has {valid} valid signature(s) from trusted keys, {threshold} required")]
    Threshold { valid: usize, threshold: usize },
    #[error("the manifest is {size} bytes, more than the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
    #[error("the manifest is malformed")]
    Parse(#[source] serde_json::Error),
    #[error("manifest schema {0} is not supported (expected {SCHEMA})")]
    Schema(u32),
    #[error("manifest expiry {value:?} is not an RFC 3339 time")]
    ExpiresFormat { value: String },
    #[error("the manifest expired at {expires}")]
    Expired { expires: String },
    #[error("manifest sequence {sequence} is lower than {highest_seen}, the highest this node has seen (replayed or stale manifest)")]
    Replay { sequence: u64, highest_seen: u64 },
    #[error("release {version}: {source}")]
    Release {
        version: Version,
        #[source]
        source: PayloadError,
    },
    #[error("release {version} has invalid rollout wave {index}: {reason}")]
    Wave {
        version: Version,
        index: usize,
        reason: String,
    },
    #[error("release {version} names an artifact {name:?}; only usr.img, vmlinuz and initrd exist, and names never become paths")]
    UnsafeName { version: Version, name: String },
    #[error("release {version} ({arch}, {variant}) is listed twice")]
    Duplicate {
        version: Version,
        arch: Arch,
        variant: String,
    },
    #[error("the manifest has no release for architecture {arch}")]
    WrongArch { arch: Arch },
    #[error("the manifest has no release of variant {variant:?} for {arch} (variants offered: {offered:?})")]
    WrongVariant {
        arch: Arch,
        variant: String,
        offered: Vec<String>,
    },
    #[error("release {version} has invalid channel list {channels:?}: {reason}")]
    Channel {
        version: Version,
        channels: Vec<String>,
        reason: &'static str,
    },
    #[error("no release of {variant:?} for {arch} is in channel {channel:?} (channels offered: {offered:?})")]
    WrongChannel {
        arch: Arch,
        variant: String,
        channel: String,
        offered: Vec<String>,
    },
    #[error("release {version} is below the release floor {floor}")]
    BelowFloor { version: Version, floor: Version },
    #[error("release {version} is older than the running version {running}; pass --allow-downgrade to install it")]
    Downgrade { version: Version, running: Version },
    #[error("release {version} is not in the manifest for {arch} {variant}")]
    NoSuchRelease {
        version: Version,
        arch: Arch,
        variant: String,
    },
}

/// A rollout wave: from `start` on, nodes whose bucket (0..100) is below
/// `percent` may install the release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wave {
    /// RFC 3339.
    pub start: String,
    pub percent: u8,
}

/// One installable release: the payload metadata exactly as the image
/// build wrote it, plus its rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub payload: PayloadMetadata,
    /// Empty: every node at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waves: Vec<Wave>,
    /// Channels that offer this release; a node follows one channel.
    /// Absent means `["stable"]`, so single-channel repositories never
    /// mention channels.
    #[serde(
        default = "default_channels",
        skip_serializing_if = "is_default_channels"
    )]
    pub channels: Vec<String>,
}

/// The channel a node follows, and a release is in, when nobody says.
pub const DEFAULT_CHANNEL: &str = "stable";

pub fn default_channels() -> Vec<String> {
    vec![DEFAULT_CHANNEL.to_owned()]
}

fn is_default_channels(channels: &[String]) -> bool {
    channels == [DEFAULT_CHANNEL]
}

/// Channel names are short lowercase words (`stable`, `beta`, `canary-eu`):
/// they appear in config files, CLI flags and logs.
pub fn valid_channel(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

impl Release {
    pub fn version(&self) -> Version {
        self.payload.version
    }

    /// Repository-relative path of an artifact: content addressed, so it
    /// is derived from a hash that was checked to be hex, never from a name.
    pub fn object_path(sha256: &str) -> String {
        format!("{OBJECTS_DIR}/{sha256}")
    }

    /// True when a node in `bucket` (0..100) may install this release at `now`.
    pub fn rolled_out_to(&self, bucket: u8, now: SystemTime) -> bool {
        if self.waves.is_empty() {
            return true;
        }
        self.waves.iter().any(|w| {
            humantime::parse_rfc3339(&w.start).is_ok_and(|start| start <= now) && bucket < w.percent
        })
    }
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema: u32,
    /// Raised by every signing; nodes refuse a lower one than they saw.
    pub sequence: u64,
    /// RFC 3339; nodes refuse the manifest after it.
    pub expires: String,
    /// Anti-rollback: nothing below this version is installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<Version>,
    pub releases: Vec<Release>,
}

impl Manifest {
    pub fn new(expires: SystemTime) -> Self {
        Manifest {
            schema: SCHEMA,
            sequence: 0,
            expires: humantime::format_rfc3339_seconds(expires).to_string(),
            floor: None,
            releases: Vec::new(),
        }
    }

    /// Parses and checks the manifest's own consistency (not its signature
    /// and not its expiry; see [`verify`]).
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge {
                size: bytes.len(),
                max: MAX_MANIFEST_BYTES,
            });
        }
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(ManifestError::Parse)?;
        manifest.validate()?;
        Ok(manifest)
    }

    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.schema != SCHEMA {
            return Err(ManifestError::Schema(self.schema));
        }
        self.expires_at()?;
        let mut seen = BTreeSet::new();
        for r in &self.releases {
            let version = r.version();
            // Names first: an escaping name is its own, clearer refusal.
            if let Some(a) = r
                .payload
                .artifacts
                .iter()
                .find(|a| ![USR_IMAGE, KERNEL, INITRD].contains(&a.name.as_str()))
            {
                return Err(ManifestError::UnsafeName {
                    version,
                    name: a.name.clone(),
                });
            }
            r.payload
                .validate()
                .map_err(|source| ManifestError::Release { version, source })?;
            for a in &r.payload.artifacts {
                if a.sha256.len() != 64 {
                    return Err(ManifestError::Release {
                        version,
                        source: PayloadError::Hex {
                            what: "artifact sha256",
                            value: a.sha256.clone(),
                        },
                    });
                }
            }
            for (index, w) in r.waves.iter().enumerate() {
                let reason = if humantime::parse_rfc3339(&w.start).is_err() {
                    Some(format!("start {:?} is not RFC 3339", w.start))
                } else if w.percent == 0 || w.percent > 100 {
                    Some(format!("percent {} is not in 1..=100", w.percent))
                } else {
                    None
                };
                if let Some(reason) = reason {
                    return Err(ManifestError::Wave {
                        version,
                        index,
                        reason,
                    });
                }
            }
            let channel_problem = if r.channels.is_empty() {
                Some("a release must be in at least one channel")
            } else if !r.channels.iter().all(|c| valid_channel(c)) {
                Some("names are 1-32 of a-z, 0-9 and '-', not starting with '-'")
            } else if r.channels.iter().collect::<BTreeSet<_>>().len() != r.channels.len() {
                Some("a channel is listed twice")
            } else {
                None
            };
            if let Some(reason) = channel_problem {
                return Err(ManifestError::Channel {
                    version,
                    channels: r.channels.clone(),
                    reason,
                });
            }
            if !seen.insert((version, r.payload.arch.as_str(), r.payload.variant.as_str())) {
                return Err(ManifestError::Duplicate {
                    version,
                    arch: r.payload.arch,
                    variant: r.payload.variant.clone(),
                });
            }
        }
        Ok(())
    }

    pub fn expires_at(&self) -> Result<SystemTime, ManifestError> {
        humantime::parse_rfc3339(&self.expires).map_err(|_| ManifestError::ExpiresFormat {
            value: self.expires.clone(),
        })
    }

    /// Canonical bytes as the repository tools write them.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

/// One detached signature in `manifest.json.sig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    pub key_id: String,
    /// 128 hex digits: ed25519 over the raw bytes of `manifest.json`.
    pub signature: String,
}

pub fn parse_signatures(bytes: &[u8]) -> Result<Vec<Signature>, ManifestError> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge {
            size: bytes.len(),
            max: MAX_MANIFEST_BYTES,
        });
    }
    serde_json::from_slice(bytes).map_err(ManifestError::SignatureList)
}

/// Checks the signatures over the raw manifest bytes against the trusted
/// keys; only then parses the manifest. Returns the key ids that signed.
///
/// As in TUF, the quorum counts distinct trusted keys with a valid
/// signature and ignores invalid ones: a signature that does not verify
/// (a key being rotated, a corrupted entry, one planted by whoever can
/// write the repository) can neither veto a release the threshold signed
/// nor count toward it. Without a quorum, an invalid signature is named.
pub fn verify_signatures(
    manifest_bytes: &[u8],
    signatures_bytes: Option<&[u8]>,
    trust: &TrustedKeys,
) -> Result<Vec<String>, ManifestError> {
    let sigs = match signatures_bytes {
        None => return Err(ManifestError::MissingSignature),
        Some(b) => parse_signatures(b)?,
    };
    if sigs.is_empty() {
        return Err(ManifestError::MissingSignature);
    }
    let mut valid = BTreeSet::new();
    let mut unknown = Vec::new();
    let mut invalid = Vec::new();
    for sig in &sigs {
        let Some(key) = trust.get(&sig.key_id) else {
            unknown.push(sig.key_id.clone());
            continue;
        };
        let mut raw = [0u8; 64];
        let verifies = hex::decode_to_slice(&sig.signature, &mut raw).is_ok()
            && key
                .verify_strict(manifest_bytes, &DalekSignature::from_bytes(&raw))
                .is_ok();
        if verifies {
            valid.insert(sig.key_id.clone());
        } else {
            invalid.push(sig.key_id.clone());
        }
    }
    if valid.len() < trust.threshold() {
        if let Some(key_id) = invalid.into_iter().next() {
            return Err(ManifestError::BadSignature { key_id });
        }
    }
    if valid.is_empty() && !unknown.is_empty() {
        return Err(ManifestError::UnknownKey {
            key_ids: unknown,
            trusted: trust.key_ids().map(str::to_owned).collect(),
        });
    }
    if valid.len() < trust.threshold() {
        return Err(ManifestError::Threshold {
            valid: valid.len(),
            threshold: trust.threshold(),
        });
    }
    Ok(valid.into_iter().collect())
}

/// A manifest that passed signature, expiry and replay checks.
#[derive(Debug, Clone)]
pub struct VerifiedManifest {
    pub manifest: Manifest,
    pub signed_by: Vec<String>,
    /// SHA-256 of the manifest bytes, to name what was verified.
    pub digest: String,
}

/// Signature first, then parse, then expiry and sequence.
pub fn verify(
    manifest_bytes: &[u8],
    signatures_bytes: Option<&[u8]>,
    trust: &TrustedKeys,
    now: SystemTime,
    highest_seen_sequence: Option<u64>,
) -> Result<VerifiedManifest, ManifestError> {
    if manifest_bytes.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge {
            size: manifest_bytes.len(),
            max: MAX_MANIFEST_BYTES,
        });
    }
    let signed_by = verify_signatures(manifest_bytes, signatures_bytes, trust)?;
    let manifest = Manifest::parse(manifest_bytes)?;
    if manifest.expires_at()? <= now {
        return Err(ManifestError::Expired {
            expires: manifest.expires.clone(),
        });
    }
    if let Some(highest_seen) = highest_seen_sequence {
        if manifest.sequence < highest_seen {
            return Err(ManifestError::Replay {
                sequence: manifest.sequence,
                highest_seen,
            });
        }
    }
    Ok(VerifiedManifest {
        manifest,
        signed_by,
        digest: hex::encode(Sha256::digest(manifest_bytes)),
    })
}

/// What the node is and runs, for choosing a release.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub arch: Arch,
    pub variant: String,
    /// The channel the node follows.
    pub channel: String,
    pub running: Version,
    /// 0..100, stable per node; places the node in rollout waves.
    pub bucket: u8,
    /// Releases that failed their health gate on this node.
    pub rejected: Vec<Version>,
}

/// The outcome of choosing a release.
#[derive(Debug, Clone)]
pub enum Selection {
    Install(Box<Release>),
    UpToDate {
        running: Version,
    },
    /// Newer releases exist but this node's wave has not started.
    Waiting {
        version: Version,
    },
}

/// Chooses the release for `node`: `wanted` names one explicitly (in any
/// channel: pinning a version is the operator's explicit choice);
/// otherwise the newest release for the node's arch, variant and channel
/// that is rolled out to it and was not rejected on it.
pub fn select(
    manifest: &Manifest,
    node: &NodeFacts,
    wanted: Option<Version>,
    allow_downgrade: bool,
    now: SystemTime,
) -> Result<Selection, ManifestError> {
    let for_arch: Vec<&Release> = manifest
        .releases
        .iter()
        .filter(|r| r.payload.arch == node.arch)
        .collect();
    if for_arch.is_empty() {
        return Err(ManifestError::WrongArch { arch: node.arch });
    }
    let candidates: Vec<&Release> = for_arch
        .iter()
        .copied()
        .filter(|r| r.payload.variant == node.variant)
        .collect();
    if candidates.is_empty() {
        let mut offered: Vec<String> = for_arch.iter().map(|r| r.payload.variant.clone()).collect();
        offered.sort();
        offered.dedup();
        return Err(ManifestError::WrongVariant {
            arch: node.arch,
            variant: node.variant.clone(),
            offered,
        });
    }
    let chosen = match wanted {
        Some(version) => *candidates
            .iter()
            .find(|r| r.version() == version)
            .ok_or_else(|| ManifestError::NoSuchRelease {
                version,
                arch: node.arch,
                variant: node.variant.clone(),
            })?,
        None => {
            let in_channel: Vec<&Release> = candidates
                .iter()
                .copied()
                .filter(|r| r.channels.contains(&node.channel))
                .collect();
            if in_channel.is_empty() {
                let mut offered: Vec<String> =
                    candidates.iter().flat_map(|r| r.channels.clone()).collect();
                offered.sort();
                offered.dedup();
                return Err(ManifestError::WrongChannel {
                    arch: node.arch,
                    variant: node.variant.clone(),
                    channel: node.channel.clone(),
                    offered,
                });
            }
            let mut usable: Vec<&Release> = in_channel
                .into_iter()
                .filter(|r| !node.rejected.contains(&r.version()))
                .collect();
            usable.sort_by_key(|r| r.version());
            let Some(newest) = usable.last().copied() else {
                return Ok(Selection::UpToDate {
                    running: node.running,
                });
            };
            if newest.version() == node.running {
                return Ok(Selection::UpToDate {
                    running: node.running,
                });
            }
            if newest.version() > node.running && !newest.rolled_out_to(node.bucket, now) {
                return Ok(Selection::Waiting {
                    version: newest.version(),
                });
            }
            newest
        }
    };
    let version = chosen.version();
    if let Some(floor) = manifest.floor {
        if version < floor {
            return Err(ManifestError::BelowFloor { version, floor });
        }
    }
    if version < node.running && !allow_downgrade {
        return Err(ManifestError::Downgrade {
            version,
            running: node.running,
        });
    }
    if version == node.running {
        // Reinstalling the running version would overwrite its own kernel
        // directory, the one it falls back to.
        return Ok(Selection::UpToDate {
            running: node.running,
        });
    }
    Ok(Selection::Install(Box::new(chosen.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;
    use crate::payload::{Artifact, VerityParams};
    use std::time::Duration;

    pub(crate) fn release(version: &str, arch: Arch, variant: &str) -> Release {
        let h = "0".repeat(64);
        Release {
            payload: PayloadMetadata {
                version: version.parse().unwrap(),
                arch,
                variant: variant.into(),
                kernel_release: "6.1.0-1-cloud-amd64".into(),
                usr_fstype: "erofs".into(),
                verity: VerityParams {
                    root_hash: "a".repeat(64),
                    salt: "00".into(),
                    data_blocks: 1,
                    data_block_size: 4096,
                    hash_block_size: 4096,
                    hash_offset: 4096,
                    hash_algorithm: "sha256".into(),
                },
                artifacts: ["usr.img", "vmlinuz", "initrd"]
                    .into_iter()
                    .map(|n| Artifact {
                        name: n.into(),
                        size: 1,
                        sha256: h.clone(),
                    })
                    .collect(),
                packages: vec![],
            },
            waves: vec![],
            channels: default_channels(),
        }
    }

    fn node(running: &str) -> NodeFacts {
        NodeFacts {
            arch: Arch::X86_64,
            variant: "base".into(),
            channel: DEFAULT_CHANNEL.into(),
            running: running.parse().unwrap(),
            bucket: 50,
            rejected: vec![],
        }
    }

    fn sign(bytes: &[u8], keys: &[&SecretKey]) -> Vec<u8> {
        let sigs: Vec<Signature> = keys
            .iter()
            .map(|k| Signature {
                key_id: k.key_id(),
                signature: hex::encode(k.sign(bytes)),
            })
            .collect();
        serde_json::to_vec(&sigs).unwrap()
    }

    #[test]
    fn threshold_counts_distinct_trusted_keys() {
        let (k1, k2, k3) = (
            SecretKey::from_seed([1; 32]),
            SecretKey::from_seed([2; 32]),
            SecretKey::from_seed([3; 32]),
        );
        let trust = TrustedKeys::new([k1.public(), k2.public()], 2).unwrap();
        let now = SystemTime::now();
        let mut m = Manifest::new(now + Duration::from_secs(60));
        m.releases.push(release("1.0.0", Arch::X86_64, "base"));
        let bytes = m.to_bytes();
        assert!(verify(&bytes, Some(&sign(&bytes, &[&k1, &k2])), &trust, now, None).is_ok());
        assert!(matches!(
            verify(&bytes, Some(&sign(&bytes, &[&k1, &k1])), &trust, now, None),
            Err(ManifestError::Threshold {
                valid: 1,
                threshold: 2
            })
        ));
        assert!(matches!(
            verify(&bytes, Some(&sign(&bytes, &[&k3])), &trust, now, None),
            Err(ManifestError::UnknownKey { .. })
        ));
        assert!(matches!(
            verify(&bytes, None, &trust, now, None),
            Err(ManifestError::MissingSignature)
        ));
        let mut tampered = bytes.clone();
        tampered[10] ^= 1;
        assert!(matches!(
            verify(
                &tampered,
                Some(&sign(&bytes, &[&k1, &k2])),
                &trust,
                now,
                None
            ),
            Err(ManifestError::BadSignature { .. })
        ));
        // An invalid signature beside a quorum of valid ones is ignored,
        // and does not count.
        let mut sigs: Vec<Signature> = serde_json::from_slice(&sign(&bytes, &[&k1, &k2])).unwrap();
        let mut forged = sigs[0].clone();
        forged.signature = hex::encode([7u8; 64]);
        sigs.push(forged);
        let with_forged = serde_json::to_vec(&sigs).unwrap();
        assert!(verify(&bytes, Some(&with_forged), &trust, now, None).is_ok());
        let sigs_one_valid = vec![sigs[0].clone(), sigs[2].clone()];
        let one_valid = serde_json::to_vec(&sigs_one_valid).unwrap();
        assert!(matches!(
            verify(&bytes, Some(&one_valid), &trust, now, None),
            Err(ManifestError::BadSignature { .. })
        ));
    }

    #[test]
    fn expiry_and_replay_are_refused() {
        let k = SecretKey::from_seed([1; 32]);
        let trust = TrustedKeys::new([k.public()], 1).unwrap();
        let now = SystemTime::now();
        let mut m = Manifest::new(now - Duration::from_secs(1));
        m.sequence = 5;
        let bytes = m.to_bytes();
        let sig = sign(&bytes, &[&k]);
        assert!(matches!(
            verify(&bytes, Some(&sig), &trust, now, None),
            Err(ManifestError::Expired { .. })
        ));
        let later = now - Duration::from_secs(10);
        assert!(matches!(
            verify(&bytes, Some(&sig), &trust, later, Some(6)),
            Err(ManifestError::Replay {
                sequence: 5,
                highest_seen: 6
            })
        ));
        assert!(verify(&bytes, Some(&sig), &trust, later, Some(5)).is_ok());
    }

    #[test]
    fn channels_select_and_validate() {
        let now = SystemTime::now();
        let mut m = Manifest::new(now + Duration::from_secs(3600));
        m.releases.push(release("1.1.0", Arch::X86_64, "base"));
        let mut beta = release("1.2.0", Arch::X86_64, "base");
        beta.channels = vec!["beta".into()];
        m.releases.push(beta);
        let pick = |m: &Manifest, channel: &str, want: Option<&str>| {
            let mut n = node("1.0.0");
            n.channel = channel.into();
            select(m, &n, want.map(|v| v.parse().unwrap()), false, now)
        };
        let installs = |s: Selection| match s {
            Selection::Install(r) => r.version().to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(installs(pick(&m, "stable", None).unwrap()), "1.1.0");
        assert_eq!(installs(pick(&m, "beta", None).unwrap()), "1.2.0");
        // A pinned version is taken from any channel.
        assert_eq!(
            installs(pick(&m, "stable", Some("1.2.0")).unwrap()),
            "1.2.0"
        );
        match pick(&m, "edge", None) {
            Err(ManifestError::WrongChannel {
                channel, offered, ..
            }) => {
                assert_eq!(channel, "edge");
                assert_eq!(offered, ["beta", "stable"]);
            }
            other => panic!("{other:?}"),
        }
        // The default channel list is not written, so old manifests and
        // single-channel repositories read the same.
        let text = String::from_utf8(m.to_bytes()).unwrap();
        assert_eq!(text.matches("\"channels\"").count(), 1, "{text}");
        let back = Manifest::parse(&m.to_bytes()).unwrap();
        assert_eq!(back.releases[0].channels, ["stable"]);

        for (channels, reason) in [
            (vec![], "at least one"),
            (vec!["Beta".to_owned()], "names are"),
            (vec!["-x".to_owned()], "names are"),
            (vec!["beta".to_owned(), "beta".to_owned()], "twice"),
        ] {
            let mut bad = m.clone();
            bad.releases[1].channels = channels.clone();
            match bad.validate() {
                Err(ManifestError::Channel {
                    reason: r,
                    channels: c,
                    ..
                }) => {
                    assert!(r.contains(reason), "{r}");
                    assert_eq!(c, channels);
                }
                other => panic!("{channels:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn selection_follows_arch_variant_floor_waves_and_downgrade_rules() {
        let now = SystemTime::now();
        let mut m = Manifest::new(now);
        m.releases.push(release("1.0.0", Arch::X86_64, "base"));
        m.releases.push(release("1.2.0", Arch::X86_64, "base"));
        m.releases.push(release("2.0.0", Arch::Aarch64, "base"));
        let pick = |m: &Manifest, n: &NodeFacts, want: Option<&str>, down: bool| {
            select(m, n, want.map(|v| v.parse().unwrap()), down, now)
        };
        match pick(&m, &node("1.1.0"), None, false).unwrap() {
            Selection::Install(r) => assert_eq!(r.version().to_string(), "1.2.0"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            pick(&m, &node("1.2.0"), None, false).unwrap(),
            Selection::UpToDate { .. }
        ));
        assert!(matches!(
            pick(&m, &node("1.1.0"), Some("1.0.0"), false),
            Err(ManifestError::Downgrade { .. })
        ));
        assert!(pick(&m, &node("1.1.0"), Some("1.0.0"), true).is_ok());
        m.floor = Some("1.1.0".parse().unwrap());
        assert!(matches!(
            pick(&m, &node("1.1.0"), Some("1.0.0"), true),
            Err(ManifestError::BelowFloor { .. })
        ));
        let mut n = node("1.1.0");
        n.variant = "k8s".into();
        assert!(matches!(
            pick(&m, &n, None, false),
            Err(ManifestError::WrongVariant { .. })
        ));
        m.releases.retain(|r| r.payload.arch == Arch::Aarch64);
        assert!(matches!(
            pick(&m, &node("1.1.0"), None, false),
            Err(ManifestError::WrongArch { .. })
        ));
    }

    #[test]
    fn waves_gate_by_bucket_and_time() {
        let now = SystemTime::now();
        let mut r = release("1.0.0", Arch::X86_64, "base");
        let at = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        r.waves = vec![
            Wave {
                start: at(now - Duration::from_secs(10)),
                percent: 10,
            },
            Wave {
                start: at(now + Duration::from_secs(3600)),
                percent: 100,
            },
        ];
        assert!(r.rolled_out_to(5, now));
        assert!(!r.rolled_out_to(50, now));
        assert!(r.rolled_out_to(50, now + Duration::from_secs(7200)));
    }
}
