//! The `BuildKitPool` custom resource (`bkpool.dev/v1alpha1`, short name `bkp`).
//!
//! - [`spec`]: what a user asks for: workload, buildkitd configuration, scaling, gateway,
//!   TLS and auth, with schema validation the API server enforces (enums, ranges, patterns,
//!   defaults; Kubernetes 1.20 has no CEL, so nothing beyond OpenAPI v3 structural schemas).
//! - [`status`]: what the operator reports: phase, conditions, replicas, endpoint, activity.
//! - [`validate`]: semantic checks the schema cannot express, reported as the `Validated`
//!   condition with every fault and its field path.
//! - [`duration`]: `10m`-style durations.
//! - [`yaml`]: the CRD manifest generated from these types (`bkpool crd`).

pub mod duration;
pub mod spec;
pub mod status;
pub mod validate;
pub mod yaml;

pub use spec::*;
pub use status::{BuildKitPoolStatus, Phase};
pub use validate::{Fault, validate, validate_pool};

/// The API group of every bkpool resource.
pub const GROUP: &str = "bkpool.dev";
