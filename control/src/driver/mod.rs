//! Drivers apply a pool's desired replicas by starting and stopping backends. The scaler
//! decides how many; a driver only knows how.
//!
//! - [`local`]: replicas as local processes (`bkpool local`).
//! - `slots`: the slots and ports replicas hold, freed by a reaper when they exit.
//! - `spawn`: the one place processes are forked, so that none outlives bkpool.
//! - `sandbox`: a PID and mount namespace per replica under a tiny init, so that nothing a
//!   replica starts outlives it.

pub mod local;
mod sandbox;
mod slots;
pub(crate) mod spawn;

pub use local::{DriverError, DriverEvent, LocalDriver, ProcessSpec, Replica, ReplicaId};
