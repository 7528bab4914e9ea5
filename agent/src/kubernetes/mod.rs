//! Kubernetes integration: the `[kubernetes]` configuration, the files the
//! agent renders for containerd and the kubelet, and the agent's own calls to
//! the API server (Node condition and annotations, the reboot Lease
//! semaphore, cordon and drain).
pub mod config;
pub mod render;
pub mod services;
pub mod validate;
