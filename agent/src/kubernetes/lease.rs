//! The reboot semaphore: at most N nodes of a group reboot at once, counted
//! with coordination.k8s.io/v1 Leases named `ballast-reboot-<group>-<i>`
//! (i in 0..N) in the lease namespace (`ballast-system` by default, a
//! namespace of its own so the agent needs no rights in `kube-system`). A node
//! holds a slot when a Lease's `holderIdentity` is its name and
//! `renewTime + leaseDurationSeconds` is in the future; an expired Lease is
//! free to take, so a node that dies while holding a slot blocks the group
//! for at most one TTL. Expiry is judged by the reading node's clock, as
//! client-go's leader election does; a TTL of minutes dwarfs NTP-level skew.
//!
//! Every write carries the `resourceVersion` that was read, so two nodes
//! racing for the same Lease cannot both win: the API server answers the
//! loser 409 Conflict and the loser tries the next slot. The agent's
//! credential needs get/create/update on Leases in the lease namespace (see
//! docs/kubernetes-rbac.md); a node credential alone (NodeRestriction) may
//! only touch its own Lease in `kube-node-lease`.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};

use super::client::{
    is_dns_subdomain, system_clock, system_time, timestamp, Clock, KubeClient, KubeError,
};

// The configuration's defaults live in config.rs; tests use the same values.
#[cfg(test)]
pub const DEFAULT_NAMESPACE: &str = "ballast-system";
#[cfg(test)]
pub const DEFAULT_TTL: Duration = Duration::from_secs(15 * 60);
/// The label naming the group on every semaphore Lease.
pub const GROUP_LABEL: &str = "ballast.dev/reboot-group";

/// The `[kubernetes.reboot]` settings this module needs, plus who we are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SemaphoreConfig {
    pub group: String,
    /// Nodes of the group that may reboot at once (`max_concurrent`).
    pub slots: u32,
    pub namespace: String,
    /// Our identity in `holderIdentity`: the node name.
    pub holder: String,
    /// How long a slot stays ours without a renewal.
    pub ttl: Duration,
}

/// Another node's claim on a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotHolder {
    pub slot: u32,
    pub holder: String,
    /// When the claim lapses unless renewed.
    pub expires: Option<SystemTime>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// We hold this slot (newly taken, or renewed when `renewed`).
    Acquired { slot: u32, renewed: bool },
    /// Every slot is held by another node.
    AllHeld { holders: Vec<SlotHolder> },
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("kubernetes.reboot: {key} {value:?}: {reason}")]
    Config {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("lease {namespace}/{name}")]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: Box<KubeError>,
    },
    #[error("lease namespace {namespace} does not exist: create it (kubectl create namespace {namespace}, docs/kubernetes-rbac.md) or set kubernetes.reboot.lease_namespace")]
    NoNamespace {
        namespace: String,
        #[source]
        source: Box<KubeError>,
    },
    #[error("lease {namespace}/{name}: lost to concurrent writers {tries} times in a row")]
    Contended {
        namespace: String,
        name: String,
        tries: u32,
    },
}

/// Writes of one Lease that keep meeting 409 are given up after this many.
const MAX_CONFLICTS: u32 = 3;

#[derive(Clone)]
pub struct RebootSemaphore {
    client: KubeClient,
    config: SemaphoreConfig,
    clock: Clock,
}

impl std::fmt::Debug for RebootSemaphore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RebootSemaphore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What one attempt on one slot found.
enum Claim {
    Won,
    Held(SlotHolder),
}

impl RebootSemaphore {
    pub fn new(client: KubeClient, config: SemaphoreConfig) -> Result<Self, LeaseError> {
        let bad = |key, value: String, reason| Err(LeaseError::Config { key, value, reason });
        if config.slots == 0 || config.slots > 1000 {
            return bad(
                "max_concurrent",
                config.slots.to_string(),
                "must be between 1 and 1000",
            );
        }
        let group_ok = !config.group.is_empty()
            && config.group.len() <= 40
            && config
                .group
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !config.group.starts_with('-')
            && !config.group.ends_with('-');
        if !group_ok {
            return bad(
                "group",
                config.group.clone(),
                "must be 1-40 lower-case letters, digits and '-', not starting or ending with '-'",
            );
        }
        if !is_dns_subdomain(&config.namespace) || config.namespace.contains('.') {
            return bad(
                "lease_namespace",
                config.namespace.clone(),
                "must be a Kubernetes namespace name (lower-case letters, digits and '-')",
            );
        }
        if config.holder.is_empty() || config.holder.len() > 253 {
            return bad(
                "holder",
                config.holder.clone(),
                "must be the node name (1-253 characters)",
            );
        }
        if config.ttl < Duration::from_secs(1) || config.ttl.as_secs() > i32::MAX as u64 {
            return bad(
                "lease_ttl",
                humantime::format_duration(config.ttl).to_string(),
                "must be at least 1s",
            );
        }
        Ok(RebootSemaphore {
            client,
            config,
            clock: system_clock(),
        })
    }

    /// Use this clock instead of the system's (tests).
    #[cfg(test)]
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    pub fn lease_name(&self, slot: u32) -> String {
        format!("ballast-reboot-{}-{slot}", self.config.group)
    }

    fn path(&self, slot: u32) -> String {
        format!(
            "/apis/coordination.k8s.io/v1/namespaces/{}/leases/{}",
            self.config.namespace,
            self.lease_name(slot)
        )
    }

    fn api_error(&self, slot: u32, source: KubeError) -> LeaseError {
        LeaseError::Api {
            namespace: self.config.namespace.clone(),
            name: self.lease_name(slot),
            source: Box::new(source),
        }
    }

    async fn read(&self, slot: u32) -> Result<Option<Lease>, LeaseError> {
        self.client
            .get_opt(&self.path(slot))
            .await
            .map_err(|e| self.api_error(slot, e))
    }

    fn holder_of(lease: &Lease) -> Option<&str> {
        lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            .filter(|h| !h.is_empty())
    }

    /// When the current claim lapses; `None` when the Lease has no renew or
    /// acquire time (a claim nobody keeps alive).
    fn expiry(&self, lease: &Lease) -> Option<SystemTime> {
        let spec = lease.spec.as_ref()?;
        let last = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?;
        let secs = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(self.config.ttl.as_secs());
        system_time(last.0)?.checked_add(Duration::from_secs(secs))
    }

    fn is_ours(&self, lease: &Lease) -> bool {
        Self::holder_of(lease) == Some(self.config.holder.as_str())
    }

    /// Free: nobody holds it, or the holder let it expire.
    fn is_free(&self, lease: &Lease, now: SystemTime) -> bool {
        Self::holder_of(lease).is_none() || self.expiry(lease).is_none_or(|e| e < now)
    }

    fn claimed_spec(&self, previous: Option<&LeaseSpec>, now: SystemTime) -> LeaseSpec {
        let now = MicroTime(timestamp(now));
        let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
        let holder_changes = previous
            .and_then(|s| s.holder_identity.as_deref())
            .is_some_and(|h| !h.is_empty() && h != self.config.holder);
        LeaseSpec {
            holder_identity: Some(self.config.holder.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.config.ttl.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(transitions + i32::from(holder_changes)),
            ..LeaseSpec::default()
        }
    }

    /// Take (or renew) a reboot slot. A slot we already hold (e.g. from
    /// before a reboot) is renewed rather than a second one taken; call
    /// this again while draining and rebooting to keep the slot alive.
    pub async fn acquire(&self) -> Result<Acquire, LeaseError> {
        let now = (self.clock)();
        let mut observed = Vec::with_capacity(self.config.slots as usize);
        for slot in 0..self.config.slots {
            observed.push(self.read(slot).await?);
        }
        if let Some(slot) = (0..self.config.slots).find(|&s| {
            observed[s as usize]
                .as_ref()
                .is_some_and(|l| self.is_ours(l))
        }) {
            if self
                .renew(slot, observed[slot as usize].take(), now)
                .await?
            {
                tracing::debug!(lease = %self.lease_name(slot), "reboot slot renewed");
                return Ok(Acquire::Acquired {
                    slot,
                    renewed: true,
                });
            }
            // Someone took it from us (it had expired): look for another.
            observed[slot as usize] = self.read(slot).await?;
        }
        let mut holders = Vec::new();
        for slot in 0..self.config.slots {
            match self
                .claim(slot, observed[slot as usize].take(), now)
                .await?
            {
                Claim::Won => {
                    tracing::info!(lease = %self.lease_name(slot), holder = %self.config.holder, "reboot slot acquired");
                    return Ok(Acquire::Acquired {
                        slot,
                        renewed: false,
                    });
                }
                Claim::Held(h) => holders.push(h),
            }
        }
        tracing::info!(group = %self.config.group, held = holders.len(), "all reboot slots are held");
        Ok(Acquire::AllHeld { holders })
    }

    /// Renew a Lease we hold; false when it turned out not to be ours.
    async fn renew(
        &self,
        slot: u32,
        mut lease: Option<Lease>,
        now: SystemTime,
    ) -> Result<bool, LeaseError> {
        for _ in 0..MAX_CONFLICTS {
            let Some(mut current) = lease.take().filter(|l| self.is_ours(l)) else {
                return Ok(false);
            };
            let spec = current.spec.get_or_insert_with(LeaseSpec::default);
            spec.renew_time = Some(MicroTime(timestamp(now)));
            spec.lease_duration_seconds =
                Some(i32::try_from(self.config.ttl.as_secs()).unwrap_or(i32::MAX));
            match self
                .client
                .put::<_, Lease>(&self.path(slot), &current)
                .await
            {
                Ok(_) => return Ok(true),
                Err(e) if e.is_conflict() => lease = self.read(slot).await?,
                Err(e) => return Err(self.api_error(slot, e)),
            }
        }
        Err(LeaseError::Contended {
            namespace: self.config.namespace.clone(),
            name: self.lease_name(slot),
            tries: MAX_CONFLICTS,
        })
    }

    /// One attempt on one slot, given what was read of it.
    async fn claim(
        &self,
        slot: u32,
        observed: Option<Lease>,
        now: SystemTime,
    ) -> Result<Claim, LeaseError> {
        let result = match &observed {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.lease_name(slot)),
                        namespace: Some(self.config.namespace.clone()),
                        labels: Some(
                            [
                                (
                                    "app.kubernetes.io/managed-by".to_string(),
                                    "ballast".to_string(),
                                ),
                                (GROUP_LABEL.to_string(), self.config.group.clone()),
                            ]
                            .into(),
                        ),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.claimed_spec(None, now)),
                };
                let path = format!(
                    "/apis/coordination.k8s.io/v1/namespaces/{}/leases",
                    self.config.namespace
                );
                match self.client.post::<_, Lease>(&path, &lease).await {
                    // A create answered 404 means the namespace is missing.
                    Err(e) if e.is_not_found() => {
                        return Err(LeaseError::NoNamespace {
                            namespace: self.config.namespace.clone(),
                            source: Box::new(e),
                        })
                    }
                    r => r,
                }
            }
            Some(lease) if self.is_free(lease, now) => {
                let mut taken = lease.clone();
                taken.spec = Some(self.claimed_spec(lease.spec.as_ref(), now));
                self.client.put::<_, Lease>(&self.path(slot), &taken).await
            }
            Some(lease) => return Ok(Claim::Held(self.holder(slot, lease))),
        };
        match result {
            Ok(_) => Ok(Claim::Won),
            Err(e) if e.is_conflict() => {
                // Lost the race (409 on create or on the versioned update).
                // A create that was retried after a lost answer also lands
                // here, so read back who holds it.
                tracing::debug!(lease = %self.lease_name(slot), "lost the race for a reboot slot");
                match self.read(slot).await? {
                    Some(l) if self.is_ours(&l) => Ok(Claim::Won),
                    Some(l) => Ok(Claim::Held(self.holder(slot, &l))),
                    None => Ok(Claim::Held(SlotHolder {
                        slot,
                        holder: String::new(),
                        expires: None,
                    })),
                }
            }
            Err(e) => Err(self.api_error(slot, e)),
        }
    }

    fn holder(&self, slot: u32, lease: &Lease) -> SlotHolder {
        SlotHolder {
            slot,
            holder: Self::holder_of(lease).unwrap_or_default().to_string(),
            expires: self.expiry(lease),
        }
    }

    /// Give back every slot of the group we hold; returns their numbers.
    pub async fn release(&self) -> Result<Vec<u32>, LeaseError> {
        let mut released = Vec::new();
        for slot in 0..self.config.slots {
            let mut lease = self.read(slot).await?;
            let mut conflicts = 0;
            while let Some(mut current) = lease.take().filter(|l| self.is_ours(l)) {
                let spec = current.spec.get_or_insert_with(LeaseSpec::default);
                spec.holder_identity = None;
                spec.acquire_time = None;
                spec.renew_time = Some(MicroTime(timestamp((self.clock)())));
                match self
                    .client
                    .put::<_, Lease>(&self.path(slot), &current)
                    .await
                {
                    Ok(_) => {
                        tracing::info!(lease = %self.lease_name(slot), "reboot slot released");
                        released.push(slot);
                    }
                    Err(e) if e.is_conflict() && conflicts + 1 < MAX_CONFLICTS => {
                        // Changed under us: release it only if still ours.
                        conflicts += 1;
                        lease = self.read(slot).await?;
                    }
                    Err(e) if e.is_conflict() => {
                        return Err(LeaseError::Contended {
                            namespace: self.config.namespace.clone(),
                            name: self.lease_name(slot),
                            tries: MAX_CONFLICTS,
                        })
                    }
                    Err(e) => return Err(self.api_error(slot, e)),
                }
            }
        }
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::testserver::TestServer;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::UNIX_EPOCH;

    /// A clock the test moves by hand.
    struct FakeTime(Arc<AtomicU64>);

    impl FakeTime {
        fn new(secs: u64) -> Self {
            FakeTime(Arc::new(AtomicU64::new(secs)))
        }
        fn clock(&self) -> Clock {
            let t = self.0.clone();
            Arc::new(move || UNIX_EPOCH + Duration::from_secs(t.load(Ordering::SeqCst)))
        }
        fn advance(&self, d: Duration) {
            self.0.fetch_add(d.as_secs(), Ordering::SeqCst);
        }
    }

    fn semaphore(
        server: &TestServer,
        holder: &str,
        slots: u32,
        time: &FakeTime,
    ) -> RebootSemaphore {
        RebootSemaphore::new(
            server.client(),
            SemaphoreConfig {
                group: "workers".into(),
                slots,
                namespace: DEFAULT_NAMESPACE.into(),
                holder: holder.into(),
                ttl: Duration::from_secs(900),
            },
        )
        .unwrap()
        .with_clock(time.clock())
    }

    #[tokio::test]
    async fn a_missing_lease_namespace_is_named_with_the_fix() {
        let server = TestServer::start().await;
        server.without_namespace(DEFAULT_NAMESPACE);
        let time = FakeTime::new(1_000_000);
        let err = semaphore(&server, "n1", 1, &time)
            .acquire()
            .await
            .unwrap_err();
        assert!(matches!(err, LeaseError::NoNamespace { .. }), "{err:?}");
        let shown = err.to_string();
        assert!(
            shown.starts_with("lease namespace ballast-system does not exist")
                && shown.contains("kubernetes.reboot.lease_namespace"),
            "{shown}"
        );
    }

    fn holder(server: &TestServer, slot: u32) -> Option<String> {
        server
            .lease(DEFAULT_NAMESPACE, &format!("ballast-reboot-workers-{slot}"))
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
    }

    #[tokio::test]
    async fn one_slot_two_nodes_only_one_wins_until_release() {
        let server = TestServer::start().await;
        let time = FakeTime::new(1_790_000_000);
        let a = semaphore(&server, "node-a", 1, &time);
        let b = semaphore(&server, "node-b", 1, &time);

        assert_eq!(
            a.acquire().await.unwrap(),
            Acquire::Acquired {
                slot: 0,
                renewed: false
            }
        );
        let lease = server
            .lease(DEFAULT_NAMESPACE, "ballast-reboot-workers-0")
            .unwrap();
        let spec = lease.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("node-a"));
        assert_eq!(spec.lease_duration_seconds, Some(900));
        assert_eq!(lease.metadata.labels.unwrap()[GROUP_LABEL], "workers");

        match b.acquire().await.unwrap() {
            Acquire::AllHeld { holders } => {
                assert_eq!(holders.len(), 1);
                assert_eq!(holders[0].holder, "node-a");
                assert_eq!(
                    holders[0].expires,
                    Some(UNIX_EPOCH + Duration::from_secs(1_790_000_000 + 900))
                );
            }
            other => panic!("node-b should wait, got {other:?}"),
        }
        // a asking again renews, it does not take a second slot.
        assert_eq!(
            a.acquire().await.unwrap(),
            Acquire::Acquired {
                slot: 0,
                renewed: true
            }
        );

        assert_eq!(a.release().await.unwrap(), vec![0]);
        assert_eq!(holder(&server, 0), None);
        // Releasing twice is a no-op.
        assert!(a.release().await.unwrap().is_empty());
        assert_eq!(
            b.acquire().await.unwrap(),
            Acquire::Acquired {
                slot: 0,
                renewed: false
            }
        );
        assert_eq!(holder(&server, 0).as_deref(), Some("node-b"));
        // b's release does not touch a slot a holds, and vice versa.
        assert!(a.release().await.unwrap().is_empty());
        assert_eq!(holder(&server, 0).as_deref(), Some("node-b"));
    }

    #[tokio::test]
    async fn an_expired_slot_is_taken_over_and_renewal_keeps_it() {
        let server = TestServer::start().await;
        let time = FakeTime::new(1_790_000_000);
        let a = semaphore(&server, "node-a", 1, &time);
        let b = semaphore(&server, "node-b", 1, &time);
        a.acquire().await.unwrap();

        // Renewed at +10 min: still held at +20 min (10 min after renewal).
        time.advance(Duration::from_secs(600));
        assert!(matches!(
            a.acquire().await.unwrap(),
            Acquire::Acquired { renewed: true, .. }
        ));
        time.advance(Duration::from_secs(600));
        assert!(matches!(
            b.acquire().await.unwrap(),
            Acquire::AllHeld { .. }
        ));

        // a went silent: one TTL after its last renewal the slot is b's.
        time.advance(Duration::from_secs(301));
        assert_eq!(
            b.acquire().await.unwrap(),
            Acquire::Acquired {
                slot: 0,
                renewed: false
            }
        );
        let spec = server
            .lease(DEFAULT_NAMESPACE, "ballast-reboot-workers-0")
            .unwrap()
            .spec
            .unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("node-b"));
        assert_eq!(spec.lease_transitions, Some(1));
        // a comes back: it no longer holds anything and must wait.
        assert!(matches!(
            a.acquire().await.unwrap(),
            Acquire::AllHeld { .. }
        ));
        assert!(a.release().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn n_slots_admit_n_nodes() {
        let server = TestServer::start().await;
        let time = FakeTime::new(1_790_000_000);
        let nodes: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|n| semaphore(&server, n, 2, &time))
            .collect();
        assert_eq!(
            nodes[0].acquire().await.unwrap(),
            Acquire::Acquired {
                slot: 0,
                renewed: false
            }
        );
        assert_eq!(
            nodes[1].acquire().await.unwrap(),
            Acquire::Acquired {
                slot: 1,
                renewed: false
            }
        );
        match nodes[2].acquire().await.unwrap() {
            Acquire::AllHeld { holders } => {
                let names: Vec<_> = holders.iter().map(|h| h.holder.as_str()).collect();
                assert_eq!(names, ["a", "b"]);
            }
            other => panic!("c should wait, got {other:?}"),
        }
        nodes[0].release().await.unwrap();
        assert_eq!(
            nodes[2].acquire().await.unwrap(),
            Acquire::Acquired {
                slot: 0,
                renewed: false
            }
        );
    }

    #[tokio::test]
    async fn a_conflicting_write_loses_the_slot_and_tries_the_next() {
        let server = TestServer::start().await;
        let time = FakeTime::new(1_790_000_000);
        let old = semaphore(&server, "node-old", 2, &time);
        let a = semaphore(&server, "node-a", 2, &time);
        assert!(matches!(
            old.acquire().await.unwrap(),
            Acquire::Acquired { slot: 0, .. }
        ));

        // Slot 0 expires; someone else writes it between a's read and put.
        time.advance(Duration::from_secs(1000));
        server.conflict_next_puts(1);
        assert_eq!(
            a.acquire().await.unwrap(),
            Acquire::Acquired {
                slot: 1,
                renewed: false
            }
        );
        assert_eq!(holder(&server, 0).as_deref(), Some("node-old"));
        assert_eq!(holder(&server, 1).as_deref(), Some("node-a"));
        assert_eq!(
            server.requests_matching(
                "PUT",
                "/apis/coordination.k8s.io/v1/namespaces/ballast-system/leases/ballast-reboot-workers-0"
            ),
            1
        );

        // A stale copy can never overwrite a newer one.
        let stale = server
            .lease(DEFAULT_NAMESPACE, "ballast-reboot-workers-1")
            .unwrap();
        assert!(matches!(
            a.acquire().await.unwrap(),
            Acquire::Acquired {
                slot: 1,
                renewed: true
            }
        ));
        let err = server
            .client()
            .put::<_, Lease>(&a.path(1), &stale)
            .await
            .unwrap_err();
        assert!(err.is_conflict(), "{err:?}");

        // Release meets a conflict, re-reads, sees it is still ours, retries.
        server.conflict_next_puts(1);
        assert_eq!(a.release().await.unwrap(), vec![1]);
        assert_eq!(holder(&server, 1), None);
    }

    #[tokio::test]
    async fn server_errors_surface_with_the_lease_name() {
        let server = TestServer::start().await;
        let time = FakeTime::new(1_790_000_000);
        let a = semaphore(&server, "node-a", 1, &time);
        server.fail_next(10);
        let err = a.acquire().await.unwrap_err();
        assert!(
            err.to_string()
                .contains("ballast-system/ballast-reboot-workers-0"),
            "{err}"
        );
    }

    #[test]
    fn bad_settings_are_refused_naming_the_key() {
        let client = KubeClient::new(crate::kubernetes::client::ClientConfig::new(
            "http://127.0.0.1:1",
            None,
            crate::kubernetes::client::Auth::None,
        ))
        .unwrap();
        let good = SemaphoreConfig {
            group: "workers".into(),
            slots: 1,
            namespace: "ballast-system".into(),
            holder: "n1".into(),
            ttl: DEFAULT_TTL,
        };
        assert!(RebootSemaphore::new(client.clone(), good.clone()).is_ok());
        for (config, key) in [
            (
                SemaphoreConfig {
                    slots: 0,
                    ..good.clone()
                },
                "max_concurrent",
            ),
            (
                SemaphoreConfig {
                    group: "Workers".into(),
                    ..good.clone()
                },
                "group",
            ),
            (
                SemaphoreConfig {
                    group: String::new(),
                    ..good.clone()
                },
                "group",
            ),
            (
                SemaphoreConfig {
                    namespace: "a/b".into(),
                    ..good.clone()
                },
                "lease_namespace",
            ),
            (
                SemaphoreConfig {
                    ttl: Duration::ZERO,
                    ..good.clone()
                },
                "lease_ttl",
            ),
            (
                SemaphoreConfig {
                    holder: String::new(),
                    ..good.clone()
                },
                "holder",
            ),
        ] {
            let err = RebootSemaphore::new(client.clone(), config).unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
    }
}
