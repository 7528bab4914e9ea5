//! Kubernetes integration: the `[kubernetes]` configuration, the files the
//! agent renders for containerd and the kubelet, and the agent's own calls to
//! the API server (Node condition and annotations, the reboot Lease
//! semaphore, cordon and drain).

#[allow(dead_code)] // API calls; used once the update loop wires them in
pub mod client;
pub mod config;
#[allow(dead_code)] // API calls; used once the update loop wires them in
pub mod drain;
#[allow(dead_code)] // API calls; used once the update loop wires them in
pub mod lease;
#[allow(dead_code)] // API calls; used once the update loop wires them in
pub mod node_report;
pub mod render;
pub mod services;
#[cfg(test)]
pub mod testserver;
pub mod validate;
