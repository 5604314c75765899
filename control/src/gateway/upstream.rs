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

use proxy::activity::PoolActivity;
use proxy::names::{BackendAddr, PoolId};
use proxy::route::{BoxFuture, Caller, Candidate, Held, RouteError, Upstream};
use tokio::sync::watch;
use tokio::time::{Instant, timeout, timeout_at};

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
        caller: &Caller,
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
                hold = Some(self.hold(activity, caller, policy.max_held)?);
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
        caller: &Caller,
        max: usize,
    ) -> Result<Hold<'a>, RouteError> {
        // The gateway's hold limits first (per source, and the small budget of connections it
        // could not authenticate): a refused caller takes no place in the pool's queue.
        let held = caller.hold(activity).inspect_err(|e| {
            tracing::info!(pool = %self.id, source = %caller.source, error = %e, "connection not held");
        })?;
        if self.held.fetch_add(1, Relaxed) >= max {
            self.held.fetch_sub(1, Relaxed);
            tracing::warn!(pool = %self.id, max, "hold queue full; connection refused");
            return Err(RouteError::HoldLimit);
        }
        Ok(Hold {
            held: &self.held,
            since: Instant::now(),
            _held: held,
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
                // Until a backend is ready or the pool drains, asking again every
                // WAKE_RETRY for as long as connections are held.
                let settled = |view: &View| !view.ready.is_empty() || view.draining.is_some();
                let _ = timeout(WAKE_RETRY, changes.wait_for(settled)).await;
                let view = pool.view();
                if !view.ready.is_empty() {
                    pool.metrics.woke(&pool.id, began.elapsed());
                    break;
                }
                if view.draining.is_some() || pool.held() == 0 {
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
        caller: &'a Caller,
    ) -> BoxFuture<'a, Result<Vec<Candidate>, RouteError>> {
        Box::pin(self.0.route(activity, caller))
    }
}

/// A held connection's place in the pool's hold queue (and in its activity), released on drop.
struct Hold<'a> {
    held: &'a AtomicUsize,
    since: Instant,
    _held: Held,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.held.fetch_sub(1, Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use prometheus_client::registry::Registry;
    use proxy::admit::{Admission, HoldLimits};

    use super::*;

    /// Counts wake calls; the test decides when backends become ready.
    #[derive(Default)]
    struct CountingWaker(AtomicU32);

    impl Waker for CountingWaker {
        fn wake(&self) -> BoxFuture<'_, Result<Woke, String>> {
            self.0.fetch_add(1, Relaxed);
            Box::pin(async { Ok(Woke::ScaledUp) })
        }
    }

    fn pool(max_held: usize, wake_timeout: Duration) -> (Arc<PoolState>, Arc<CountingWaker>) {
        let waker = Arc::new(CountingWaker::default());
        let policy = Policy {
            wake_timeout,
            max_held,
        };
        let metrics = Metrics::register(&mut Registry::default());
        let id: PoolId = "ci/a".parse().unwrap();
        (PoolState::new(id, policy, waker.clone(), metrics), waker)
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 1234))
    }

    /// An authenticated caller from one address, under a gateway's default hold limits.
    fn caller() -> Caller {
        from(
            1,
            true,
            &gateway(HoldLimits {
                per_source: 64,
                unauthenticated_per_pool: 16,
            }),
        )
    }

    fn gateway(limits: HoldLimits) -> Arc<Admission> {
        let admission = Admission::new(1_000, 100);
        admission.set_hold_limits(limits);
        admission
    }

    /// A caller from 192.0.2.`n` to pool ci/a, authenticated (terminate) or not (passthrough).
    fn from(n: u8, authenticated: bool, admission: &Arc<Admission>) -> Caller {
        let source = std::net::IpAddr::from([192, 0, 2, n]);
        Caller::new(
            source,
            authenticated,
            "ci/a".parse().unwrap(),
            admission.clone(),
        )
    }

    #[tokio::test]
    async fn a_ready_pool_serves_at_once_least_loaded_first() {
        let (state, waker) = pool(4, Duration::from_secs(1));
        state.set_ready(vec![addr(2), addr(1)]);
        let activity = Arc::new(PoolActivity::default());
        let upstream = PoolUpstream(state.clone());
        let first = upstream.candidates(&activity, &caller()).await.unwrap();
        let _busy = first[0].engage();
        let second = upstream.candidates(&activity, &caller()).await.unwrap();
        assert_ne!(first[0].addr, second[0].addr);
        assert_eq!(waker.0.load(Relaxed), 0);
        // Counters survive an update that keeps the pod.
        state.set_ready(vec![addr(1), addr(2), addr(3)]);
        let loaded: Vec<usize> = state.view().ready.iter().map(Candidate::load).collect();
        assert_eq!(loaded.iter().sum::<usize>(), 1);
    }

    #[tokio::test]
    async fn held_connections_share_one_wake_and_go_when_a_pod_is_ready() {
        let (state, waker) = pool(8, Duration::from_secs(5));
        let activity = Arc::new(PoolActivity::default());
        let held: Vec<_> = (0..3)
            .map(|_| {
                let (state, activity) = (state.clone(), activity.clone());
                tokio::spawn(
                    async move { PoolUpstream(state).candidates(&activity, &caller()).await },
                )
            })
            .collect();
        while activity.held_count() < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            waker.0.load(Relaxed),
            1,
            "one wake for every held connection"
        );
        state.set_ready(vec![addr(1)]);
        for h in held {
            assert_eq!(h.await.unwrap().unwrap()[0].addr.0, addr(1));
        }
        assert_eq!((activity.held_count(), state.held()), (0, 0));
    }

    #[tokio::test]
    async fn draining_holds_without_waking_until_the_mark_is_cleared() {
        let (state, waker) = pool(8, Duration::from_secs(5));
        state.set_ready(vec![addr(1)]);
        state.set_draining(Some("2026-11-26T09:00:00Z"));
        let activity = Arc::new(PoolActivity::default());
        let held = tokio::spawn({
            let (state, activity) = (state.clone(), activity.clone());
            async move { PoolUpstream(state).candidates(&activity, &caller()).await }
        });
        while activity.held_count() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!held.is_finished(), "no backend while draining");
        assert_eq!(waker.0.load(Relaxed), 0, "a draining pool is not woken");
        // The drain was cancelled: the pod is still there.
        state.set_draining(None);
        assert_eq!(held.await.unwrap().unwrap()[0].addr.0, addr(1));
    }

    #[tokio::test]
    async fn a_full_hold_queue_refuses_and_a_deadline_ends_the_wait() {
        let (state, _) = pool(1, Duration::from_millis(200));
        let activity = Arc::new(PoolActivity::default());
        let first = tokio::spawn({
            let (state, activity) = (state.clone(), activity.clone());
            async move { PoolUpstream(state).candidates(&activity, &caller()).await }
        });
        while state.held() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let second = PoolUpstream(state.clone())
            .candidates(&activity, &caller())
            .await;
        assert!(matches!(second, Err(RouteError::HoldLimit)), "{second:?}");
        let first = first.await.unwrap();
        assert!(
            matches!(first, Err(RouteError::WakeTimeout(_))),
            "{first:?}"
        );
        assert_eq!(state.held(), 0);
    }

    #[tokio::test]
    async fn unauthenticated_holds_have_a_small_budget_and_each_source_a_cap() {
        let (state, waker) = pool(100, Duration::from_secs(5));
        let activity = Arc::new(PoolActivity::default());
        let admission = gateway(HoldLimits {
            per_source: 3,
            unauthenticated_per_pool: 2,
        });
        let hold = |caller: Caller| {
            let (state, activity) = (state.clone(), activity.clone());
            tokio::spawn(async move { PoolUpstream(state).candidates(&activity, &caller).await })
        };
        // Bare ClientHellos (passthrough) from two sources: two are held, the third refused.
        let anonymous = [
            hold(from(1, false, &admission)),
            hold(from(2, false, &admission)),
        ];
        while state.held() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let refused = PoolUpstream(state.clone())
            .candidates(&activity, &from(3, false, &admission))
            .await;
        assert_eq!(refused.unwrap_err().reason(), "hold_unauthenticated_limit");
        // Authenticated callers still get the hold queue, up to three per source.
        let mine = [
            hold(from(1, true, &admission)),
            hold(from(1, true, &admission)),
        ];
        while state.held() < 4 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let over = PoolUpstream(state.clone())
            .candidates(&activity, &from(1, true, &admission))
            .await;
        assert_eq!(over.unwrap_err().reason(), "hold_source_limit");
        assert_eq!(
            (state.held(), activity.held_count()),
            (4, 4),
            "refusals hold nothing"
        );
        assert_eq!(waker.0.load(Relaxed), 1);
        state.set_ready(vec![addr(1)]);
        for held in anonymous.into_iter().chain(mine) {
            assert_eq!(held.await.unwrap().unwrap()[0].addr.0, addr(1));
        }
        assert_eq!(state.held(), 0);
    }
}
