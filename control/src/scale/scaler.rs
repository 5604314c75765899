//! The [`Scaler`]: every pool of one control loop, the driver that runs their replicas, and
//! the loop that reads activity and driver events.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use prometheus_client::registry::Registry;
use proxy::activity::{Activity, PoolActivity};
use proxy::names::PoolId;
use proxy::route::Upstream;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::driver::{Driver, Exited};
use super::metrics::Metrics;
use super::policy::{Policy, Settings};
use super::pool::{Pool, State};
use super::status::{PoolStatus, ReplicaStatus};

/// Scales a set of pools through one driver. Cheap to clone.
#[derive(Clone)]
pub struct Scaler {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub driver: Arc<dyn Driver>,
    pub settings: Settings,
    pub pools: BTreeMap<PoolId, Arc<Pool>>,
    pub held_total: AtomicUsize,
    /// The gateway's activity, once it runs; until then nothing is ever scaled down.
    pub activity: OnceLock<Arc<Activity>>,
    pub shutting_down: AtomicBool,
    /// Wakes, scale-ups and stops in flight, awaited at shutdown.
    pub tasks: TaskTracker,
}

impl Scaler {
    /// A scaler for `pools`, its metrics registered in `registry`. Every pool starts asleep.
    pub fn new(
        driver: Arc<dyn Driver>,
        pools: impl IntoIterator<Item = (PoolId, Policy)>,
        settings: Settings,
        registry: &mut Registry,
    ) -> Self {
        let metrics = Metrics::register(registry);
        let pools = pools
            .into_iter()
            .map(|(id, policy)| {
                let pool = Pool::new(id.clone(), policy, metrics.clone());
                (id, Arc::new(pool))
            })
            .collect();
        let shared = Shared {
            driver,
            settings,
            pools,
            held_total: AtomicUsize::new(0),
            activity: OnceLock::new(),
            shutting_down: AtomicBool::new(false),
            tasks: TaskTracker::new(),
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    /// The gateway upstream for `pool` (None if the scaler does not know it).
    pub fn upstream(&self, pool: &PoolId) -> Option<Arc<dyn Upstream>> {
        let pool = self.shared.pools.get(pool)?.clone();
        Some(Arc::new(super::wake::PoolUpstream {
            shared: self.shared.clone(),
            pool,
        }))
    }

    /// Starts the wake of a sleeping `pool` as its first connection would, with nothing held;
    /// the pool then sleeps again after `idle_after` unless a connection comes. Returns
    /// whether a wake started (false when the pool is awake or waking, unknown, or bkpool is
    /// shutting down).
    pub fn wake_ahead(&self, pool: &PoolId) -> bool {
        let Some(pool) = self.shared.pools.get(pool) else {
            return false;
        };
        let mut s = pool.lock();
        if self.shared.shutting_down() || !matches!(s.state, State::Sleeping) {
            return false;
        }
        self.shared.begin_wake(pool, &mut s);
        true
    }

    /// Runs the control loop until `shutdown` is cancelled: reads `activity` every tick and
    /// handles replica exits. Pools with `min_replicas` are woken at once.
    pub async fn run(&self, activity: Arc<Activity>, shutdown: CancellationToken) {
        let _ = self.shared.activity.set(activity);
        let mut exits = self.shared.driver.exits();
        let mut tick = tokio::time::interval(self.shared.settings.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => self.shared.tick(),
                exit = exits.recv() => match exit {
                    Ok(exit) => self.shared.exited(&exit),
                    Err(RecvError::Lagged(n)) => tracing::warn!(missed = n, "replica exit events lost"),
                    Err(RecvError::Closed) => return,
                },
            }
        }
    }

    /// Stops waking pools (held connections are refused with `ShuttingDown`), waits for
    /// wakes in flight, then stops every replica.
    pub async fn shutdown(&self) {
        self.shared.shutting_down.store(true, Relaxed);
        for pool in self.shared.pools.values() {
            pool.notify();
        }
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
        let mut stops = JoinSet::new();
        for pool in self.shared.pools.values() {
            let replicas = {
                let mut s = pool.lock();
                let replicas = std::mem::take(&mut s.replicas);
                pool.set(&mut s, State::Sleeping);
                replicas
            };
            for replica in replicas {
                let (shared, pool) = (self.shared.clone(), pool.clone());
                stops.spawn(async move {
                    shared.stop(&pool, &replica.started, "shutdown").await;
                });
            }
        }
        stops.join_all().await;
    }

    /// Every pool's state, replicas and connections, for `/pools`.
    pub fn status(&self) -> Vec<PoolStatus> {
        self.shared
            .pools
            .values()
            .map(|pool| self.shared.status(pool))
            .collect()
    }
}

impl Shared {
    pub fn pool_activity(&self, id: &PoolId) -> Option<Arc<PoolActivity>> {
        self.activity.get().map(|a| a.pool(id))
    }

    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Relaxed)
    }

    fn status(&self, pool: &Pool) -> PoolStatus {
        let activity = self.pool_activity(&pool.id);
        let s = pool.lock();
        let replicas = s
            .replicas
            .iter()
            .map(|r| ReplicaStatus {
                name: r.started.name.clone(),
                addr: r.started.addr.to_string(),
                load: r.load.load(Relaxed),
                retiring: r.retiring_since.is_some(),
            })
            .collect();
        PoolStatus {
            pool: pool.id.to_string(),
            state: s.phase(),
            replicas,
            open: activity.as_ref().map_or(0, |a| a.open_count()),
            held: activity.as_ref().map_or(0, |a| a.held_count()),
            last_activity_ms: activity.as_ref().map_or(0, |a| a.last_activity_ms()),
            min_replicas: pool.policy.min_replicas,
            max_replicas: pool.policy.max_replicas,
            idle_after_seconds: pool.policy.idle_after.as_secs_f64(),
        }
    }

    /// A replica exited. A crash removes it at once; the next connection starts another.
    pub fn exited(&self, exit: &Exited) {
        if exit.requested {
            return;
        }
        let Some(pool) = self.pools.get(&exit.pool) else {
            return;
        };
        let mut s = pool.lock();
        let before = s.replicas.len();
        s.replicas.retain(|r| r.started.name != exit.name);
        if s.replicas.len() == before {
            return;
        }
        tracing::warn!(pool = %pool.id, replica = %exit.name, "replica exited unexpectedly; removed");
        pool.metrics.scaled(&pool.id, "down", "crashed");
        let next = match s.state {
            State::Ready | State::Draining { .. } if s.replicas.is_empty() => State::Sleeping,
            other => other,
        };
        pool.set(&mut s, next);
    }
}
