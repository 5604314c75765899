//! Scaling pools to zero and back: the [`Scaler`] turns gateway activity into replicas and
//! holds connections while a sleeping pool wakes. It knows nothing about processes or pods:
//! a [`Driver`] starts, probes and stops replicas.
//!
//! - [`driver`]: the seam to whatever runs replicas.
//! - [`policy`]: per-pool scaling parameters and scaler-wide settings.
//! - `pool`: one pool's state machine (Sleeping → Waking → Ready → Draining), under one lock.
//! - `wake`: the [`proxy::route::Upstream`] side: hold, single-flight wake, readiness broadcast.
//! - `tick`: the periodic side: idle detection, two-phase drain, scale up and down, crashes.
//! - [`metrics`]: `bkpool_controller_*` metrics.
//! - [`status`]: what `/pools` serves.
//! - [`local`]: the [`Driver`] for local processes.

pub mod driver;
pub mod local;
pub mod metrics;
pub mod policy;
mod pool;
mod scaler;
pub mod status;
mod tick;
mod wake;

pub use driver::{Driver, DriverError, Exited, Readiness, Started};
pub use policy::{Policy, Settings};
pub use pool::Phase;
pub use scaler::Scaler;

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
