//! The world the certificate API is given: which pools exist, how each lets callers in, which
//! CA signs its client certificates and for how long at most ([`PoolDirectory`]), and what to
//! do when a build is about to start ([`Warmer`]). Local mode and the Kubernetes operator
//! provide their own; [`StaticDirectory`] is built from configuration, the cluster's is in
//! [`super::cluster`].

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
    /// Signs the pool's client certificates; never replaced by another CA when it cannot be
    /// read.
    pub ca: Result<Arc<Ca>, CaUnavailable>,
    /// Certificates never live longer than this.
    pub max_ttl: Duration,
    pub auth: PoolAuth,
    /// Where clients connect (`host:port` of the gateway).
    pub endpoints: Vec<String>,
    /// The CA bundle clients trust the gateway with, PEM (on Kubernetes, the pool's client CA
    /// bundle, which also signs the gateway's certificate for the pool).
    pub gateway_ca_pem: String,
}

/// Why a pool's client CA cannot sign.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaUnavailable {
    #[error("the client CA Secret does not exist")]
    Missing,
    #[error("the client CA Secret cannot be parsed: {0}")]
    Unreadable(String),
}

/// Pools and their auth configuration.
pub trait PoolDirectory: Send + Sync + 'static {
    fn pool(&self, id: &PoolId) -> Option<Arc<PoolEntry>>;
    /// Every pool in `namespace`.
    fn pools_in(&self, namespace: &str) -> Vec<Arc<PoolEntry>>;
    /// The rules of a pool whose auth settings were left at their defaults. A caller asking
    /// for a pool that does not exist (and who may not know which pools do) is answered as
    /// such a pool would answer it.
    fn default_auth(&self) -> PoolAuth {
        PoolAuth::default()
    }
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

impl Warmer for crate::scale::Scaler {
    /// Local mode: a sleeping pool starts its one wake, as its first connection would.
    fn warm(&self, pool: &PoolId, reason: WarmReason) {
        if self.wake_ahead(pool) {
            tracing::info!(%pool, ?reason, "waking pool ahead of its first connection");
        }
    }
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
