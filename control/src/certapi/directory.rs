//! The world the certificate API is given: which pools exist, how each lets callers in, which
//! CA signs its client certificates and for how long at most ([`PoolDirectory`]), and what to
//! do when a build is about to start ([`Warmer`]). Local mode and the Kubernetes operator
//! provide their own; [`StaticDirectory`] is built from configuration.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proxy::names::PoolId;

use crate::auth::PoolAuth;
use crate::pki::Ca;

/// Longest certificate lifetime unless a pool says otherwise.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(3600);

/// One pool as the certificate API sees it.
#[derive(Debug)]
pub struct PoolEntry {
    pub id: PoolId,
    /// Signs the pool's client certificates.
    pub ca: Arc<Ca>,
    /// Certificates never live longer than this.
    pub max_ttl: Duration,
    pub auth: PoolAuth,
    /// Where clients connect (`host:port` of the gateway).
    pub endpoints: Vec<String>,
    /// The CA bundle clients trust for the gateway, PEM.
    pub gateway_ca_pem: String,
}

/// Pools and their auth configuration.
pub trait PoolDirectory: Send + Sync + 'static {
    fn pool(&self, id: &PoolId) -> Option<Arc<PoolEntry>>;
    /// Every pool in `namespace`.
    fn pools_in(&self, namespace: &str) -> Vec<Arc<PoolEntry>>;
}

/// Why a pool is being warmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmReason {
    /// A certificate was issued: a build is coming.
    CertificateIssued,
    /// A caller asked explicitly.
    WakeRequested,
}

/// Starts a pool ahead of its first connection. Must return at once (spawn if needed).
pub trait Warmer: Send + Sync + 'static {
    fn warm(&self, pool: &PoolId, reason: WarmReason);
}

/// A warmer that does nothing (a standalone certificate API with nothing to wake).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoWarmer;

impl Warmer for NoWarmer {
    fn warm(&self, pool: &PoolId, reason: WarmReason) {
        tracing::debug!(%pool, ?reason, "no warmer configured");
    }
}

/// A fixed set of pools.
#[derive(Debug, Default)]
pub struct StaticDirectory {
    pools: BTreeMap<PoolId, Arc<PoolEntry>>,
}

impl StaticDirectory {
    pub fn new(pools: impl IntoIterator<Item = PoolEntry>) -> Self {
        Self {
            pools: pools
                .into_iter()
                .map(|p| (p.id.clone(), Arc::new(p)))
                .collect(),
        }
    }
}

impl PoolDirectory for StaticDirectory {
    fn pool(&self, id: &PoolId) -> Option<Arc<PoolEntry>> {
        self.pools.get(id).cloned()
    }

    fn pools_in(&self, namespace: &str) -> Vec<Arc<PoolEntry>> {
        self.pools
            .values()
            .filter(|p| p.id.namespace() == namespace)
            .cloned()
            .collect()
    }
}
