//! What the API asks of the update driver: reboots through the configured
//! strategy and update check, apply and rollback. The API owns the channel
//! ([`channel`]); init.rs hands the receiver to whoever drives updates,
//! which answers each request on its `reply` (a dropped reply or a closed
//! channel is 503 "not available"). Forced reboots never come here: the
//! API sends them to PID 1's power channel itself.

use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// How long the API waits for the driver to accept or refuse.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A reboot asked for through the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebootRequest {
    /// Skip the strategy (admins only; the API handles these itself).
    pub force: bool,
    /// The client, as in the audit log.
    pub who: String,
}

/// The driver took the reboot: it happens when `via` allows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RebootAccepted {
    /// The strategy the reboot goes through (`immediate`, `window`,
    /// `fleetlock`, `kubernetes`).
    pub via: String,
}

/// The driver's answer to an update request: shown to the client as is.
pub type UpdateAnswer = serde_json::Value;

/// The driver could not do it; `status` is the HTTP status to answer
/// (409 busy, 422 nothing to roll back to, 503 unavailable, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub message: String,
}

#[derive(Debug)]
pub enum ApiRequest {
    Reboot {
        request: RebootRequest,
        reply: oneshot::Sender<Result<RebootAccepted, Refused>>,
    },
    /// Check the repository now; answer what is available.
    UpdateCheck {
        who: String,
        reply: oneshot::Sender<Result<UpdateAnswer, Refused>>,
    },
    /// Install the newest applicable release now (then reboot per strategy).
    UpdateApply {
        who: String,
        reply: oneshot::Sender<Result<UpdateAnswer, Refused>>,
    },
    /// Make the previous version the default and reboot per strategy.
    UpdateRollback {
        who: String,
        reply: oneshot::Sender<Result<UpdateAnswer, Refused>>,
    },
}

/// The API's end and the driver's end.
pub fn channel() -> (mpsc::Sender<ApiRequest>, mpsc::Receiver<ApiRequest>) {
    // Requests are rare; a short queue makes a flood answer 503.
    mpsc::channel(8)
}

/// Sends one request and waits for the answer.
pub async fn ask<T>(
    to: &mpsc::Sender<ApiRequest>,
    make: impl FnOnce(oneshot::Sender<Result<T, Refused>>) -> ApiRequest,
) -> Result<T, Refused> {
    let unavailable = |message: &str| Refused {
        status: 503,
        message: message.into(),
    };
    let (reply, answer) = oneshot::channel();
    to.try_send(make(reply)).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => unavailable("the update driver is busy; try again"),
        mpsc::error::TrySendError::Closed(_) => {
            unavailable("the update driver is not running on this node")
        }
    })?;
    match tokio::time::timeout(REPLY_TIMEOUT, answer).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(unavailable("the update driver dropped the request")),
        Err(_) => Err(unavailable("the update driver did not answer in time")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn answers_and_absent_drivers() {
        let (tx, mut rx) = channel();
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                if let ApiRequest::Reboot { request, reply } = r {
                    let _ = reply.send(Ok(RebootAccepted {
                        via: format!("window for {}", request.who),
                    }));
                }
            }
        });
        let got = ask(&tx, |reply| ApiRequest::Reboot {
            request: RebootRequest {
                force: false,
                who: "alice".into(),
            },
            reply,
        })
        .await
        .unwrap();
        assert_eq!(got.via, "window for alice");
        // A request the driver drops is 503, not a hang.
        let dropped = ask(&tx, |reply| ApiRequest::UpdateCheck {
            who: "a".into(),
            reply,
        })
        .await
        .unwrap_err();
        assert_eq!(dropped.status, 503);
        let (closed, rx) = channel();
        drop(rx);
        let err = ask(&closed, |reply| ApiRequest::UpdateApply {
            who: "a".into(),
            reply,
        })
        .await
        .unwrap_err();
        assert!(err.message.contains("not running"), "{err:?}");
    }
}
