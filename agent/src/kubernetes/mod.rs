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
#[cfg(test)]
pub mod testserver;
