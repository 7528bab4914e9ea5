//! The node's runtime services under PID 1: power actions, service
//! supervision and reaping, what a service may do (confine), health checks,
//! fail points, sysctls and the CA bundle.

pub mod confine;
pub mod failpoints;
pub mod health;
pub mod power;
pub mod supervisor;
pub mod sysctl;
pub mod trust;
