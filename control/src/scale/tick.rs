//! The periodic side of the scaler: every tick, each pool's activity decides whether it is
//! idle. An idle pool drains in two phases — marked draining first, then, after a settle
//! time with still no connection, open or held, and no load on any replica, its replicas are
//! stopped — and any connection in between cancels the drain. Extra replicas are retired the
//! same way, one at a time, and only when they carry no connection.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::time::Instant;

use super::pool::{Pool, PoolState, State};
use super::scaler::Shared;

impl Shared {
    pub fn tick(self: &Arc<Self>) {
        if self.shutting_down() {
            return;
        }
        let now = Instant::now();
        for pool in self.pools.values() {
            self.tick_pool(pool, now);
        }
    }

    fn tick_pool(self: &Arc<Self>, pool: &Arc<Pool>, now: Instant) {
        // Without the gateway's figures the pool counts as busy: never scale down on
        // partial data.
        let Some(activity) = self.pool_activity(&pool.id) else {
            return;
        };
        let mut s = pool.lock();
        let busy = activity.open_count() > 0
            || activity.held_count() > 0
            || pool.held_count() > 0
            || s.load() > 0;
        if busy {
            s.idle_since = None;
        } else if s.idle_since.is_none() {
            s.idle_since = Some(now);
        }
        match s.state {
            State::Sleeping if pool.policy.min_replicas > 0 => self.begin_wake(pool, &mut s),
            State::Ready => {
                self.mark_unhealthy(pool, &mut s);
                self.stop_unhealthy(pool, &mut s);
                if s.serving().count() < pool.policy.min_replicas && s.starting == 0 {
                    self.scale_up(pool, &mut s, "min_replicas");
                }
                self.retire_extra(pool, &mut s, now);
                if self.idle_long_enough(pool, &s, now) {
                    tracing::info!(pool = %pool.id, idle_after = ?pool.policy.idle_after, "pool idle; draining");
                    pool.set(
                        &mut s,
                        State::Draining {
                            since: now,
                            stopping: false,
                        },
                    );
                }
            }
            State::Draining {
                since,
                stopping: false,
            } => {
                if busy {
                    tracing::info!(pool = %pool.id, "connection during drain: staying awake");
                    pool.metrics.drain_cancelled(&pool.id);
                    pool.set(&mut s, State::Ready);
                } else if now.duration_since(since) >= self.settings.drain_settle && s.starting == 0
                {
                    self.stop_all_replicas(pool, &mut s, since);
                }
            }
            _ => {}
        }
    }

    /// Idle for `idle_after` (counting from the last routed connection too) and up for at
    /// least `min_up_after_wake`.
    fn idle_long_enough(&self, pool: &Pool, s: &PoolState, now: Instant) -> bool {
        let policy = &pool.policy;
        let Some(idle_since) = s.idle_since else {
            return false;
        };
        let quiet_since = s.last_routed.map_or(idle_since, |r| r.max(idle_since));
        let up_long_enough = s
            .woke_at
            .is_none_or(|w| now.duration_since(w) >= policy.min_up_after_wake);
        policy.min_replicas == 0
            && now.duration_since(quiet_since) >= policy.idle_after
            && up_long_enough
    }

    /// The drain is confirmed: the replicas leave the pool under the lock (no connection can
    /// be routed to them any more) and are stopped in the background; then the pool sleeps,
    /// or wakes again at once if connections were held meanwhile.
    fn stop_all_replicas(self: &Arc<Self>, pool: &Arc<Pool>, s: &mut PoolState, since: Instant) {
        let replicas = std::mem::take(&mut s.replicas);
        tracing::info!(pool = %pool.id, replicas = replicas.len(), "drain confirmed: no connections; stopping replicas");
        pool.set(
            s,
            State::Draining {
                since,
                stopping: true,
            },
        );
        let (shared, pool) = (self.clone(), pool.clone());
        self.tasks.spawn(async move {
            for replica in &replicas {
                shared.stop(&pool, &replica.started, "idle").await;
            }
            let mut s = pool.lock();
            s.idle_since = None;
            pool.set(&mut s, State::Sleeping);
            tracing::info!(pool = %pool.id, "pool asleep");
        });
    }

    /// Stops the replicas marked unhealthy once they carry no connection (a stuck one ends
    /// by the relay's idle timeout). With none left and no replacement starting, the pool
    /// sleeps and the next connection wakes a fresh replica.
    fn stop_unhealthy(self: &Arc<Self>, pool: &Arc<Pool>, s: &mut PoolState) {
        while let Some(i) = s
            .replicas
            .iter()
            .position(|r| r.unhealthy && r.load.load(Relaxed) == 0)
        {
            let replica = s.replicas.remove(i);
            let next = if s.replicas.is_empty() && s.starting == 0 {
                State::Sleeping
            } else {
                s.state
            };
            pool.set(s, next);
            let (shared, pool) = (self.clone(), pool.clone());
            self.tasks
                .spawn(async move { shared.stop(&pool, &replica.started, "unhealthy").await });
        }
    }

    /// Retires replicas beyond what the load needs, one at a time: marked first (no new
    /// connections), stopped once it has carried none for the settle time. Replicas marked
    /// unhealthy neither count nor are retired: they leave by `stop_unhealthy`.
    fn retire_extra(self: &Arc<Self>, pool: &Arc<Pool>, s: &mut PoolState, now: Instant) {
        let policy = &pool.policy;
        let needed = s
            .load()
            .div_ceil(policy.target_connections_per_replica.max(1))
            .max(policy.min_replicas)
            .max(1);
        if s.serving().count() <= needed {
            s.replicas.iter_mut().for_each(|r| r.retiring_since = None);
            return;
        }
        let settle = self.settings.drain_settle;
        let done = s.replicas.iter().position(|r| {
            !r.unhealthy
                && r.load.load(Relaxed) == 0
                && r.retiring_since
                    .is_some_and(|t| now.duration_since(t) >= settle)
        });
        if let Some(i) = done {
            let replica = s.replicas.remove(i);
            let state = s.state;
            pool.set(s, state);
            let (shared, pool) = (self.clone(), pool.clone());
            self.tasks
                .spawn(async move { shared.stop(&pool, &replica.started, "load").await });
            return;
        }
        if s.serving().any(|r| r.retiring_since.is_some()) {
            return;
        }
        // The newest idle replica goes first: the oldest keeps the warmest cache.
        if let Some(r) = s
            .replicas
            .iter_mut()
            .rev()
            .find(|r| !r.unhealthy && r.load.load(Relaxed) == 0)
        {
            tracing::info!(pool = %pool.id, replica = %r.started.name, "retiring an extra replica");
            r.retiring_since = Some(now);
        }
    }
}
