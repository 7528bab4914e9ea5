//! Kubernetes integration: the `[kubernetes]` configuration, the files the
//! agent renders for containerd and the kubelet, and the agent's own calls to
//! the API server (Node condition and annotations, the reboot Lease
//! semaphore, cordon and drain).

pub mod client;
pub mod coordinator;
pub mod drain;
pub mod identity;
pub mod kubeconfig;
pub mod lease;
pub mod node_report;
pub mod registries;
pub mod render;
#[cfg(test)]
pub mod schema_check;
pub mod services;
// Tests, and qemu-tests through the `test-apiserver` feature (never the
// agent binary: only qemu-tests' dependency turns it on).
#[cfg(any(test, feature = "test-apiserver"))]
pub mod testserver;
