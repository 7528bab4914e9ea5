//! What the update lifecycle shows outside: its state for `/status`,
//! `/metrics` and the Node report, shared behind a mutex the driver alone
//! writes (from [`Machine::status`](super::machine::Machine::status)).

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use ballast_updater::payload::Version;
use serde::Serialize;

/// Where the lifecycle is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum UpdateState {
    Disabled,
    Trial { version: Version },
    Idle,
    Checking,
    Installing { version: Version },
    RebootPending { version: Version },
    Rebooting { version: Version },
    RollingBack { version: Version, reason: String },
}

impl UpdateState {
    /// Short name for metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            UpdateState::Disabled => "disabled",
            UpdateState::Trial { .. } => "trial",
            UpdateState::Idle => "idle",
            UpdateState::Checking => "checking",
            UpdateState::Installing { .. } => "installing",
            UpdateState::RebootPending { .. } => "reboot-pending",
            UpdateState::Rebooting { .. } => "rebooting",
            UpdateState::RollingBack { .. } => "rolling-back",
        }
    }
}

/// Shared view of the lifecycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpdateStatus {
    pub state: UpdateState,
    /// The last successful check; RFC 3339 (seconds) in JSON.
    #[serde(serialize_with = "rfc3339")]
    pub last_check: Option<SystemTime>,
    pub last_error: Option<String>,
    pub rollbacks: u64,
}

fn rfc3339<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.collect_str(&humantime::format_rfc3339_seconds(*t)),
        None => s.serialize_none(),
    }
}

pub type SharedUpdateStatus = Arc<Mutex<UpdateStatus>>;

pub fn new_status() -> SharedUpdateStatus {
    Arc::new(Mutex::new(UpdateStatus {
        state: UpdateState::Disabled,
        last_check: None,
        last_error: None,
        rollbacks: 0,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_check_is_rfc3339_in_json() {
        let mut status = UpdateStatus {
            state: UpdateState::Idle,
            last_check: Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(86_400)),
            last_error: None,
            rollbacks: 0,
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["last_check"], "1970-01-02T00:00:00Z");
        assert_eq!(json["state"]["state"], "idle");
        status.last_check = None;
        assert!(serde_json::to_value(&status).unwrap()["last_check"].is_null());
    }
}
