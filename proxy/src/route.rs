//! The route table: which pools this gateway serves, how (terminate or passthrough), under
//! which limits, and where their backends are. The table is an immutable snapshot swapped as a
//! whole, so a connection sees one consistent version from start to end.
//!
//! Backends come from an [`Upstream`]: a static list for the standalone gateway, or the control
//! loop (which may hold a connection while it wakes a sleeping pool).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use crate::activity::{HeldGuard, PoolActivity};
use crate::admit::{Admission, HoldPermit, Refused};
use crate::affinity::Balance;
use crate::config::{GatewayConfig, Mode, PoolConfig};
use crate::names::{BackendAddr, PoolId};

/// All routes, as one snapshot.
#[derive(Debug, Default)]
pub struct Routes {
    pools: HashMap<PoolId, Arc<PoolRoute>>,
    /// Passthrough pools by SNI host name.
    by_sni: HashMap<String, Arc<PoolRoute>>,
}

/// How to reach one pool.
pub struct PoolRoute {
    pub id: PoolId,
    pub mode: Mode,
    /// SNI host names (lowercase); the routing key in passthrough mode.
    pub hostnames: Vec<String>,
    pub max_connections: Option<usize>,
    pub max_connections_per_identity: Option<usize>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Terminate mode: answer the HTTP/2 preface while the connection is held for a wake, so
    /// the wake may outlast the client's connect deadline (see [`crate::hold`]).
    pub preface_while_waking: bool,
    /// How connections spread over the pool's replicas.
    pub balance: Balance,
    pub upstream: Arc<dyn Upstream>,
    /// mTLS towards the backend, when configured.
    pub backend_tls: Option<BackendTlsClient>,
}

/// Client side of an mTLS backend leg.
#[derive(Clone)]
pub struct BackendTlsClient {
    pub config: Arc<rustls::ClientConfig>,
    /// Verified against the backend's certificate; the backend IP when not configured.
    pub server_name: Option<rustls::pki_types::ServerName<'static>>,
}

/// Why no backend could be had for a pool.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RouteError {
    #[error("pool has no backend")]
    NoBackend,
    #[error("pool did not become ready in time (waited {0:?})")]
    WakeTimeout(Duration),
    #[error("pool wake failed: {0}")]
    WakeFailed(String),
    #[error("too many connections are waiting for the pool to wake")]
    HoldLimit,
    #[error("{0}")]
    HoldRefused(Refused),
    #[error("the gateway is shutting down")]
    ShuttingDown,
}

impl RouteError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoBackend => "no_backend",
            Self::WakeTimeout(_) => "wake_timeout",
            Self::WakeFailed(_) => "wake_failed",
            Self::HoldLimit => "hold_limit",
            Self::HoldRefused(refused) => refused.reason(),
            Self::ShuttingDown => "shutting_down",
        }
    }
}

/// A backend offered for one connection, with its load counter.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub addr: BackendAddr,
    /// The replica's stable name (a local slot, a pod name with its StatefulSet ordinal): the
    /// key cache-affine routing hashes, since a replica's address may change across sleeps.
    pub replica: Arc<str>,
    load: Arc<AtomicUsize>,
    health: Arc<BackendHealth>,
}

/// How a backend's recent connections went, as the gateway saw them end: a run of failures
/// (refused, reset, closed before answering) with no served connection in between. An
/// upstream that keeps one per replica can stop offering a replica whose process is up and
/// passes its health check but drops every connection.
#[derive(Debug, Default)]
pub struct BackendHealth {
    failures: AtomicU32,
}

impl BackendHealth {
    /// Failures in a row since the last served connection.
    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn served(&self) {
        if self.failures() != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }
}

/// Counts a connection on the backend it went to, until dropped, and reports how the
/// connection went to the backend's [`BackendHealth`].
#[derive(Debug)]
pub struct BackendLoad {
    load: Arc<AtomicUsize>,
    health: Arc<BackendHealth>,
}

impl Candidate {
    pub fn new(addr: BackendAddr, replica: Arc<str>, load: Arc<AtomicUsize>) -> Self {
        Self {
            addr,
            replica,
            load,
            health: Arc::default(),
        }
    }

    /// Reports this connection's outcomes to `health` (by default, to a record of its own
    /// that nobody reads).
    pub fn with_health(mut self, health: Arc<BackendHealth>) -> Self {
        self.health = health;
        self
    }

    /// Marks this backend as carrying one more connection.
    pub fn engage(&self) -> BackendLoad {
        self.load.fetch_add(1, Ordering::Relaxed);
        BackendLoad {
            load: self.load.clone(),
            health: self.health.clone(),
        }
    }

    pub fn load(&self) -> usize {
        self.load.load(Ordering::Relaxed)
    }
}

impl BackendLoad {
    /// The backend refused, reset or closed the connection without serving it.
    pub fn failed(&self) {
        self.health.failed();
    }

    /// The backend answered.
    pub fn served(&self) {
        self.health.served();
    }
}

impl Drop for BackendLoad {
    fn drop(&mut self) {
        self.load.fetch_sub(1, Ordering::Relaxed);
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a pool's backends come from.
pub trait Upstream: Send + Sync + 'static {
    /// Backends to try for one routed connection, least loaded first. May wait — a sleeping
    /// pool is woken and the connection held, through [`Caller::hold`] — while `activity`
    /// counts it as held.
    fn candidates<'a>(
        &'a self,
        activity: &'a Arc<PoolActivity>,
        caller: &'a Caller,
    ) -> BoxFuture<'a, Result<Vec<Candidate>, RouteError>>;
}

/// Who asks for a backend: where from, and whether the gateway authenticated them
/// (terminate mode) or cannot (passthrough: the backend authenticates, inside TLS). An
/// upstream that holds the connection while its pool wakes asks [`Caller::hold`] first.
#[derive(Debug, Clone)]
pub struct Caller {
    pub source: IpAddr,
    pub authenticated: bool,
    pool: PoolId,
    admission: Arc<Admission>,
}

/// A held connection: counted in the pool's activity and under the gateway's hold limits
/// until dropped.
#[derive(Debug)]
pub struct Held {
    _limits: HoldPermit,
    _activity: HeldGuard,
}

impl Caller {
    pub fn new(
        source: IpAddr,
        authenticated: bool,
        pool: PoolId,
        admission: Arc<Admission>,
    ) -> Self {
        Self {
            source,
            authenticated,
            pool,
            admission,
        }
    }

    /// Holds the connection while its pool wakes, if the gateway's hold limits allow.
    pub fn hold(&self, activity: &Arc<PoolActivity>) -> Result<Held, RouteError> {
        let limits = self
            .admission
            .hold(&self.pool, self.source, self.authenticated)
            .map_err(RouteError::HoldRefused)?;
        Ok(Held {
            _limits: limits,
            _activity: activity.hold(),
        })
    }
}

/// A fixed list of backends (the standalone gateway).
#[derive(Debug)]
pub struct StaticUpstream {
    backends: Vec<Candidate>,
}

impl StaticUpstream {
    pub fn new(addrs: &[BackendAddr]) -> Self {
        Self {
            backends: addrs
                .iter()
                .map(|a| Candidate::new(*a, a.to_string().into(), Arc::default()))
                .collect(),
        }
    }
}

impl Upstream for StaticUpstream {
    fn candidates<'a>(
        &'a self,
        _: &'a Arc<PoolActivity>,
        _: &'a Caller,
    ) -> BoxFuture<'a, Result<Vec<Candidate>, RouteError>> {
        let mut list = self.backends.clone();
        // Stable sort: equal loads keep configuration order, so the first backend is preferred.
        list.sort_by_key(Candidate::load);
        Box::pin(async move {
            if list.is_empty() {
                Err(RouteError::NoBackend)
            } else {
                Ok(list)
            }
        })
    }
}

impl Routes {
    pub fn new(routes: impl IntoIterator<Item = PoolRoute>) -> Self {
        let mut table = Self::default();
        for route in routes {
            let route = Arc::new(route);
            if route.mode == Mode::Passthrough {
                // Host names are unique across pools: config validation guarantees it.
                for name in &route.hostnames {
                    table.by_sni.insert(name.clone(), route.clone());
                }
            }
            table.pools.insert(route.id.clone(), route);
        }
        table
    }

    pub fn pool(&self, id: &PoolId) -> Option<&Arc<PoolRoute>> {
        self.pools.get(id)
    }

    /// The passthrough pool serving `sni`, if any.
    pub fn passthrough(&self, sni: &str) -> Option<&Arc<PoolRoute>> {
        self.by_sni.get(sni)
    }

    pub fn has_passthrough(&self) -> bool {
        !self.by_sni.is_empty()
    }

    pub fn ids(&self) -> impl Iterator<Item = &PoolId> {
        self.pools.keys()
    }
}

impl PoolRoute {
    /// A route from configuration, with the given upstream.
    pub fn from_config(
        pool: &PoolConfig,
        upstream: Arc<dyn Upstream>,
        backend_tls: Option<BackendTlsClient>,
    ) -> Self {
        Self {
            id: pool.id.clone(),
            mode: pool.mode,
            hostnames: pool.hostnames.clone(),
            max_connections: pool.max_connections,
            max_connections_per_identity: pool.max_connections_per_identity,
            connect_timeout: pool.connect_timeout,
            idle_timeout: pool.idle_timeout,
            preface_while_waking: pool.preface_while_waking,
            balance: pool.balance,
            upstream,
            backend_tls,
        }
    }
}

/// Static routes for every pool of a configuration (the standalone gateway).
pub fn static_routes(
    config: &GatewayConfig,
    backend_tls: &HashMap<PoolId, BackendTlsClient>,
) -> Routes {
    Routes::new(config.pools.iter().map(|p| {
        PoolRoute::from_config(
            p,
            Arc::new(StaticUpstream::new(&p.backends)),
            backend_tls.get(&p.id).cloned(),
        )
    }))
}

impl fmt::Debug for PoolRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolRoute")
            .field("id", &self.id)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for BackendTlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendTlsClient")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}
