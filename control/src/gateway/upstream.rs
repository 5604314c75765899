//! One pool as a Kubernetes gateway sees it, and the [`Upstream`] the data plane asks for
//! backends: ready pods are served at once; otherwise the connection is held, and the pool is
//! woken by this gateway itself (no leader involved), one wake in flight per pool. While the
//! scaler drains the pool, new connections are held too (never sent to a backend that may be
//! going away) and nothing is woken: the held connection shows in this gateway's activity,
//! which cancels the drain, or the drain completes and the mark is cleared, and then the pool
//! is woken.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proxy::activity::{HeldGuard, PoolActivity};
use proxy::names::{BackendAddr, PoolId};
use proxy::route::{BoxFuture, Candidate, RouteError, Upstream};
use tokio::sync::watch;
use tokio::time::{Instant, timeout_at};

use super::metrics::Metrics;

/// How often a wake is retried while connections are held and no backend is ready: a failed
/// API call, or a Job pool's previous Job still being deleted.
const WAKE_RETRY: Duration = Duration::from_secs(2);

/// What routing needs to know right now.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Ready backends, with their load counters.
    pub ready: Vec<Candidate>,
    /// The drain mark from the pool's status, while the scaler drains it.
    pub draining: Option<Arc<str>>,
}

/// Per-pool settings from the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub wake_timeout: Duration,
    pub max_held: usize,
}

/// Brings a pool up: scales its workload from zero or starts its wake Job. Idempotent.
pub trait Waker: Send + Sync + 'static {
    fn wake(&self) -> BoxFuture<'_, Result<Woke, String>>;
}

/// What a wake call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woke {
    /// The workload already wants replicas (another gateway woke it, or it is starting).
    AlreadyWanted,
    ScaledUp,
    JobStarted,
}

/// One pool's routing state, kept across route-table rebuilds.
pub struct PoolState {
    pub id: PoolId,
    view: watch::Sender<View>,
    /// Load counters by backend address, so a pod keeps its count across updates.
    loads: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>,
    policy: Mutex<Policy>,
    waker: Mutex<Arc<dyn Waker>>,
    held: AtomicUsize,
    waking: AtomicBool,
    metrics: Metrics,
}

impl PoolState {
    pub fn new(id: PoolId, policy: Policy, waker: Arc<dyn Waker>, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            id,
            view: watch::channel(View::default()).0,
            loads: Mutex::default(),
            policy: Mutex::new(policy),
            waker: Mutex::new(waker),
            held: AtomicUsize::new(0),
            waking: AtomicBool::new(false),
            metrics,
        })
    }

    /// Takes a new spec's settings and waker (the pool object changed).
    pub fn update(&self, policy: Policy, waker: Arc<dyn Waker>) {
        *lock(&self.policy) = policy;
        *lock(&self.waker) = waker;
    }

    /// Sets the ready backends. Returns whether they changed.
    pub fn set_ready(&self, mut addrs: Vec<SocketAddr>) -> bool {
        addrs.sort();
        addrs.dedup();
        let candidates: Vec<Candidate> = {
            let mut loads = lock(&self.loads);
            loads.retain(|addr, _| addrs.contains(addr));
            addrs
                .iter()
                .map(|a| Candidate::new(BackendAddr(*a), loads.entry(*a).or_default().clone()))
                .collect()
        };
        self.view.send_if_modified(|view| {
            let same = view.ready.len() == candidates.len()
                && view
                    .ready
                    .iter()
                    .zip(&candidates)
                    .all(|(a, b)| a.addr == b.addr);
            if !same {
                view.ready = candidates;
            }
            !same
        })
    }

    /// Sets (or clears) the drain mark. Held connections see the change at once.
    pub fn set_draining(&self, mark: Option<&str>) -> bool {
        self.view.send_if_modified(|view| {
            if view.draining.as_deref() == mark {
                return false;
            }
            view.draining = mark.map(Arc::from);
            true
        })
    }

    pub fn view(&self) -> View {
        self.view.borrow().clone()
    }

    pub fn held(&self) -> usize {
        self.held.load(Relaxed)
    }

    async fn route(
        self: &Arc<Self>,
        activity: &Arc<PoolActivity>,
    ) -> Result<Vec<Candidate>, RouteError> {
        let policy = *lock(&self.policy);
        let mut changes = self.view.subscribe();
        let mut hold: Option<Hold<'_>> = None;
        let deadline = Instant::now() + policy.wake_timeout;
        loop {
            let draining = {
                let view = changes.borrow_and_update();
                if view.draining.is_none() && !view.ready.is_empty() {
                    let mut list = view.ready.clone();
                    list.sort_by_key(Candidate::load);
                    if let Some(hold) = &hold {
                        self.metrics.held_for(&self.id, hold.since.elapsed());
                    }
                    return Ok(list);
                }
                view.draining.is_some()
            };
            if hold.is_none() {
                hold = Some(self.hold(activity, policy.max_held)?);
            }
            if !draining {
                self.ensure_waking();
            }
            match timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(RouteError::ShuttingDown),
                Err(_) => {
                    tracing::warn!(pool = %self.id, wait = ?policy.wake_timeout, draining, "held connection timed out waiting for a ready backend");
                    self.metrics.wake_timed_out(&self.id);
                    return Err(RouteError::WakeTimeout(policy.wake_timeout));
                }
            }
        }
    }

    fn hold<'a>(
        &'a self,
        activity: &Arc<PoolActivity>,
        max: usize,
    ) -> Result<Hold<'a>, RouteError> {
        if self.held.fetch_add(1, Relaxed) >= max {
            self.held.fetch_sub(1, Relaxed);
            tracing::warn!(pool = %self.id, max, "hold queue full; connection refused");
            return Err(RouteError::HoldLimit);
        }
        Ok(Hold {
            held: &self.held,
            since: Instant::now(),
            _activity: activity.hold(),
        })
    }

    /// Starts the one wake of this pool on this gateway, unless it is running. It retries
    /// while connections are held and no backend is ready, and ends when one is.
    fn ensure_waking(self: &Arc<Self>) {
        if self.waking.swap(true, Relaxed) {
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            let began = Instant::now();
            let mut changes = pool.view.subscribe();
            loop {
                let waker = lock(&pool.waker).clone();
                match waker.wake().await {
                    Ok(woke) => {
                        if woke != Woke::AlreadyWanted {
                            tracing::info!(pool = %pool.id, ?woke, "waking pool");
                        }
                        pool.metrics.wake_requested(&pool.id, woke);
                    }
                    Err(e) => {
                        tracing::warn!(pool = %pool.id, error = %e, "cannot wake pool; retrying");
                        pool.metrics.wake_failed(&pool.id);
                    }
                }
                let deadline = Instant::now() + WAKE_RETRY;
                let ready = loop {
                    let view = pool.view();
                    if !view.ready.is_empty() || view.draining.is_some() || pool.held() == 0 {
                        break !view.ready.is_empty();
                    }
                    if timeout_at(deadline, changes.changed()).await.is_err() {
                        break false;
                    }
                };
                let view = pool.view();
                if ready || view.draining.is_some() || pool.held() == 0 {
                    if ready {
                        pool.metrics.woke(&pool.id, began.elapsed());
                    }
                    break;
                }
            }
            pool.waking.store(false, Relaxed);
        });
    }
}

/// The data plane's handle on a pool (the wake task needs the `Arc`).
pub struct PoolUpstream(pub Arc<PoolState>);

impl Upstream for PoolUpstream {
    fn candidates<'a>(
        &'a self,
        activity: &'a Arc<PoolActivity>,
    ) -> BoxFuture<'a, Result<Vec<Candidate>, RouteError>> {
        Box::pin(self.0.route(activity))
    }
}

/// A held connection's place in the pool's hold queue (and in its activity), released on drop.
struct Hold<'a> {
    held: &'a AtomicUsize,
    since: Instant,
    _activity: HeldGuard,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.held.fetch_sub(1, Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
