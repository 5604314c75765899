//! The Kubernetes operator: `BuildKitPool` in, workloads, Services, Secrets, ConfigMaps and
//! NetworkPolicies out. One reconciler per concern, each `reconcile(pool, ctx)` building its
//! desired objects with pure functions and writing them only when the cached object differs.
//!
//! - [`controller`]: the kube-runtime Controller, its watch caches, and the order the
//!   reconcilers run in.
//! - [`context`]: what every reconciler gets: client, caches, settings, metrics, events.
//! - [`objects`]: names, labels and owner references shared by the reconcilers.
//! - [`hosts`]: which pool each host name routes to, across namespaces (status and gateway).
//! - [`apply`]: server-side apply with field manager `bkpool`, skipped when nothing changed.
//! - [`pki`]: per-pool client and backend CAs, the gateway and buildkitd certificates,
//!   rotation with overlapping trust bundles.
//! - [`buildkitd`]: the `buildkitd.toml` ConfigMap.
//! - [`workload`]: Deployment, StatefulSet (cache claims kept while asleep) or Job.
//! - [`service`]: the backend Service (headless for StatefulSet) and the client-facing name.
//! - [`netpol`]: the NetworkPolicy letting only gateway pods reach buildkitd.
//! - [`publish`]: copies of the gateway's Secrets in a namespace of their own, the only
//!   Secrets the gateway may read.
//! - [`status`]: phase, conditions, replicas, endpoint; wake and sleep Events.
//! - [`scaler`]: the leader's scaler: gateway activity in, two-phase drains and scale-downs,
//!   scale-ups by load and warm windows out.
//! - [`watch`]: watch caches and the namespaces a loop serves, shared by every loop.
//! - [`leader`]: leader election with a coordination.k8s.io/v1 Lease.
//! - [`metrics`]: `bkpool_controller_*` metrics.
//! - [`error`]: the operator's errors and their metric reasons.

pub mod apply;
pub mod buildkitd;
pub mod context;
pub mod controller;
pub mod error;
pub mod hosts;
pub mod leader;
pub mod metrics;
pub mod netpol;
pub mod objects;
pub mod pki;
pub mod publish;
pub mod scaler;
pub mod service;
pub mod status;
pub mod watch;
pub mod workload;

pub use context::{Context, Settings};
pub use error::Error;

/// The one field manager every bkpool write uses.
pub const FIELD_MANAGER: &str = "bkpool";
