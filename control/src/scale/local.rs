//! The scaler's [`Driver`] for local processes: [`LocalDriver`] starts and stops them, each
//! pool with its own [`ProcessSpec`]; readiness is a gRPC health check, over mTLS with the
//! gateway's own backend certificate for pools whose replicas serve it, else over h2c.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proxy::names::PoolId;
use proxy::route::BoxFuture;
use tokio::sync::broadcast;

use super::driver::{Driver, DriverError, Exited, Readiness, Started};
use crate::driver::{DriverEvent, LocalDriver, ProcessSpec, Replica};
use crate::health::{self, ProbeError};

/// How long one readiness probe may take; probes repeat, so this only bounds a stuck one.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// Local pools: one process spec per pool, run by a [`LocalDriver`].
pub struct LocalReplicas {
    driver: LocalDriver,
    specs: HashMap<PoolId, ProcessSpec>,
    /// The client configuration of pools probed over mTLS.
    tls: HashMap<PoolId, Arc<rustls::ClientConfig>>,
    running: Arc<Mutex<HashMap<(PoolId, String), Replica>>>,
    exits: broadcast::Sender<Exited>,
}

impl LocalReplicas {
    /// Must be called within a tokio runtime: a task forwards the driver's exit events.
    pub fn new(driver: LocalDriver, specs: HashMap<PoolId, ProcessSpec>) -> Self {
        let exits = broadcast::channel(256).0;
        let running: Arc<Mutex<HashMap<(PoolId, String), Replica>>> = Arc::default();
        let mut events = driver.subscribe();
        let (tx, table) = (exits.clone(), running.clone());
        tokio::spawn(async move {
            loop {
                let event = match events.recv().await {
                    Ok(event) => event,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let DriverEvent::Exited {
                    replica,
                    status,
                    requested,
                } = event;
                let name = replica.id.to_string();
                if !requested {
                    tracing::warn!(pool = %replica.pool, replica = %name, pid = replica.pid, ?status, log = %replica.log.display(), "replica exited");
                }
                lock(&table).remove(&(replica.pool.clone(), name.clone()));
                let _ = tx.send(Exited {
                    pool: replica.pool,
                    name,
                    requested,
                });
            }
        });
        Self {
            driver,
            specs,
            tls: HashMap::new(),
            running,
            exits,
        }
    }

    /// Probes the replicas of `pools` over mTLS with `tls` (the gateway's backend leg).
    pub fn with_tls(
        mut self,
        pools: impl IntoIterator<Item = PoolId>,
        tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        self.tls.extend(pools.into_iter().map(|p| (p, tls.clone())));
        self
    }

    /// The process driver (for a final `stop_all`).
    pub fn driver(&self) -> &LocalDriver {
        &self.driver
    }
}

impl Driver for LocalReplicas {
    fn start<'a>(&'a self, pool: &'a PoolId) -> BoxFuture<'a, Result<Started, DriverError>> {
        Box::pin(async move {
            let spec = self.specs.get(pool).ok_or_else(|| {
                DriverError::new(
                    "unknown_pool",
                    format!("no replica command for pool {pool}"),
                )
            })?;
            let replica = self
                .driver
                .start(pool, spec)
                .await
                .map_err(|e| DriverError::new(e.reason(), e.to_string()))?;
            let started = Started {
                name: replica.id.to_string(),
                addr: replica.addr,
            };
            lock(&self.running).insert((pool.clone(), started.name.clone()), replica);
            Ok(started)
        })
    }

    fn stop<'a>(
        &'a self,
        pool: &'a PoolId,
        replica: &'a Started,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            let found = lock(&self.running)
                .get(&(pool.clone(), replica.name.clone()))
                .cloned();
            let Some(found) = found else {
                return Ok(()); // already exited
            };
            self.driver
                .stop(&found)
                .await
                .map_err(|e| DriverError::new(e.reason(), e.to_string()))
        })
    }

    fn probe<'a>(&'a self, pool: &'a PoolId, replica: &'a Started) -> BoxFuture<'a, Readiness> {
        Box::pin(async move {
            let known = lock(&self.running)
                .get(&(pool.clone(), replica.name.clone()))
                .cloned();
            if !known.is_some_and(|r| self.driver.is_running(&r)) {
                return Readiness::Exited;
            }
            let probed = match self.tls.get(pool) {
                Some(tls) => {
                    let name = rustls::pki_types::ServerName::IpAddress(replica.addr.ip().into());
                    health::probe_tls(replica.addr, name, tls.clone(), PROBE_TIMEOUT).await
                }
                None => health::probe(replica.addr, PROBE_TIMEOUT).await,
            };
            match probed {
                Ok(h) if h.is_ready() => Readiness::Healthy,
                Ok(_) => Readiness::Listening,
                Err(ProbeError::Refused { .. } | ProbeError::Connect { .. }) => Readiness::Down,
                Err(_) => Readiness::Listening,
            }
        })
    }

    fn exits(&self) -> broadcast::Receiver<Exited> {
        self.exits.subscribe()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
