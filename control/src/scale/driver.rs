//! The seam between the scaler and whatever runs replicas (local processes, a Kubernetes
//! workload): start one, probe it, stop it, and report the ones that exit on their own.

use std::net::SocketAddr;

use proxy::names::PoolId;
use proxy::route::BoxFuture;
use tokio::sync::broadcast;

/// A replica the driver started. `name` is unique within its pool while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub name: String,
    pub addr: SocketAddr,
}

/// A replica that exited. `requested` is false for a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exited {
    pub pool: PoolId,
    pub name: String,
    pub requested: bool,
}

/// How far a starting replica has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Nothing accepts connections at its address yet.
    Down,
    /// It accepts connections but does not answer a health check yet.
    Listening,
    /// It answers: connections may be sent to it.
    Healthy,
    /// Its process (or pod) is gone: it will never answer, so the wake fails at once.
    Exited,
}

/// Why a driver could not start or stop a replica. `reason` is a fixed metric label.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct DriverError {
    reason: &'static str,
    message: String,
}

impl DriverError {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

/// Starts, probes and stops the replicas of pools.
pub trait Driver: Send + Sync + 'static {
    /// Starts one replica of `pool`. It need not be ready yet: the scaler probes it.
    fn start<'a>(&'a self, pool: &'a PoolId) -> BoxFuture<'a, Result<Started, DriverError>>;

    /// Stops `replica` and returns once it is gone.
    fn stop<'a>(
        &'a self,
        pool: &'a PoolId,
        replica: &'a Started,
    ) -> BoxFuture<'a, Result<(), DriverError>>;

    /// One readiness check, bounded in time by the driver.
    fn probe<'a>(&'a self, pool: &'a PoolId, replica: &'a Started) -> BoxFuture<'a, Readiness>;

    /// Exits from now on, crashes included.
    fn exits(&self) -> broadcast::Receiver<Exited>;
}
