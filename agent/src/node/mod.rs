//! The node's runtime services under PID 1: power actions, service
//! supervision and reaping, health checks, fail points, sysctls and the CA bundle.

pub mod failpoints;
pub mod health;
pub mod power;
pub mod supervisor;
pub mod sysctl;
pub mod trust;
