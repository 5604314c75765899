//! Wake on connect: the gateway asks for backends of an authenticated connection; a pool with
//! a healthy replica answers at once, a sleeping one holds the connection, starts exactly one
//! wake (single flight), and every held connection waits on the same broadcast. Ready means
//! the replica answers a health check, polled often so the gateway adds little latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use proxy::activity::PoolActivity;
use proxy::route::{BoxFuture, Caller, Candidate, Held, RouteError, Upstream};
use tokio::time::{Instant, sleep, timeout_at};

use super::driver::{Readiness, Started};
use super::pool::{Pool, PoolState, Replica, State};
use super::scaler::Shared;

/// The first pause between readiness probes; it doubles up to `Settings::probe_interval`.
const FIRST_PROBE_INTERVAL: Duration = Duration::from_millis(2);

/// The replica's process ended while it was being waited for.
struct Exited;

/// The gateway's view of one pool.
pub(crate) struct PoolUpstream {
    pub shared: Arc<Shared>,
    pub pool: Arc<Pool>,
}

impl Upstream for PoolUpstream {
    fn candidates<'a>(
        &'a self,
        activity: &'a Arc<PoolActivity>,
        caller: &'a Caller,
    ) -> BoxFuture<'a, Result<Vec<Candidate>, RouteError>> {
        Box::pin(self.shared.route(&self.pool, activity, caller))
    }
}

/// A held connection's place in its pool's and the global queue, released on drop.
struct Hold<'a> {
    pool: &'a Pool,
    total: &'a AtomicUsize,
    since: Instant,
    _held: Held,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.pool.held.fetch_sub(1, Relaxed);
        self.total.fetch_sub(1, Relaxed);
        self.pool.metrics.held(&self.pool.id, -1);
        let held_for = self.since.elapsed();
        self.pool.metrics.hold_ended(&self.pool.id, held_for);
    }
}

impl Shared {
    /// Backends for one connection, holding it while the pool wakes.
    async fn route(
        self: &Arc<Self>,
        pool: &Arc<Pool>,
        activity: &Arc<PoolActivity>,
        caller: &Caller,
    ) -> Result<Vec<Candidate>, RouteError> {
        let deadline = Instant::now() + pool.policy.wake_timeout;
        let mut changed = pool.subscribe();
        let mut hold: Option<Hold<'_>> = None;
        // The wake attempt this connection waits for; its failure is this connection's.
        let mut waits_for: Option<u64> = None;
        loop {
            {
                let mut s = pool.lock();
                if self.shutting_down() {
                    return Err(RouteError::ShuttingDown);
                }
                s.last_routed = Some(Instant::now());
                if let Some(list) = self.serve_now(pool, &mut s) {
                    return Ok(list);
                }
                if let (Some(attempt), Some((failed, e))) = (waits_for, &s.failure)
                    && *failed >= attempt
                {
                    return Err(e.clone());
                }
                if hold.is_none() {
                    hold = Some(self.hold(pool, activity, caller)?);
                }
                if matches!(s.state, State::Sleeping) {
                    self.begin_wake(pool, &mut s);
                }
                waits_for.get_or_insert(s.attempt);
            }
            match timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(RouteError::ShuttingDown),
                Err(_) => {
                    tracing::warn!(pool = %pool.id, wait = ?pool.policy.wake_timeout, "held connection timed out waiting for the pool to wake");
                    return Err(RouteError::WakeTimeout(pool.policy.wake_timeout));
                }
            }
        }
    }

    /// The candidates, if the pool can serve right now. A connection during a drain that is
    /// not yet confirmed cancels it: the replica is still there, so it serves.
    fn serve_now(self: &Arc<Self>, pool: &Arc<Pool>, s: &mut PoolState) -> Option<Vec<Candidate>> {
        match s.state {
            State::Ready => {}
            State::Draining {
                stopping: false, ..
            } if !s.replicas.is_empty() => {
                tracing::info!(pool = %pool.id, "connection during drain: staying awake");
                pool.metrics.drain_cancelled(&pool.id);
                s.idle_since = None;
                pool.set(s, State::Ready);
            }
            _ => return None,
        }
        self.mark_unhealthy(pool, s);
        if s.serving().next().is_none() {
            // Every replica drops its connections, or the last one is stopping for that:
            // hold this one for a replacement.
            if s.starting == 0 {
                self.scale_up(pool, s, "replace");
            }
            return None;
        }
        self.maybe_scale_up(pool, s);
        Some(s.candidates())
    }

    /// Takes a place in the hold queues, or refuses when one is full (the pool's, the
    /// gateway's, or the caller's under the gateway's hold limits).
    fn hold<'p>(
        &'p self,
        pool: &'p Pool,
        activity: &Arc<PoolActivity>,
        caller: &Caller,
    ) -> Result<Hold<'p>, RouteError> {
        let held = caller.hold(activity)?;
        let here = pool.held.fetch_add(1, Relaxed);
        let total = self.held_total.fetch_add(1, Relaxed);
        if here >= pool.policy.max_held || total >= self.settings.max_held_total {
            pool.held.fetch_sub(1, Relaxed);
            self.held_total.fetch_sub(1, Relaxed);
            tracing::warn!(pool = %pool.id, held = here, "hold queue full; connection refused");
            return Err(RouteError::HoldLimit);
        }
        pool.metrics.held(&pool.id, 1);
        Ok(Hold {
            pool,
            total: &self.held_total,
            since: Instant::now(),
            _held: held,
        })
    }

    /// Starts the one wake of a sleeping pool. Call with the lock, in `Sleeping`.
    pub fn begin_wake(self: &Arc<Self>, pool: &Arc<Pool>, s: &mut PoolState) {
        s.attempt += 1;
        let attempt = s.attempt;
        tracing::info!(pool = %pool.id, attempt, "waking pool");
        pool.set(s, State::Waking);
        let (shared, pool) = (self.clone(), pool.clone());
        self.tasks
            .spawn(async move { shared.wake(&pool, attempt).await });
    }

    async fn wake(&self, pool: &Arc<Pool>, attempt: u64) {
        let began = Instant::now();
        let result = self.bring_up(pool, Some(began)).await;
        let mut s = pool.lock();
        match result {
            Ok(replica) => {
                tracing::info!(pool = %pool.id, replica = %replica.started.name, addr = %replica.started.addr, took = ?began.elapsed(), "pool awake");
                pool.metrics.wake(&pool.id, "ok");
                pool.metrics.scaled(&pool.id, "up", "wake");
                s.replicas.push(replica);
                s.woke_at = Some(Instant::now());
                s.idle_since = None;
                pool.set(&mut s, State::Ready);
            }
            Err(e) => {
                tracing::warn!(pool = %pool.id, error = %e, "wake failed");
                let result = match e {
                    RouteError::WakeTimeout(_) => "timeout",
                    _ => "failed",
                };
                pool.metrics.wake(&pool.id, result);
                s.failure = Some((attempt, e));
                let next = if s.replicas.is_empty() {
                    State::Sleeping
                } else {
                    State::Ready
                };
                pool.set(&mut s, next);
            }
        }
    }

    /// Marks the replicas whose connections failed `unhealthy_after` times in a row: they
    /// pass their health check (else they would never have been added) but drop what the
    /// gateway sends them. Call with the lock.
    pub fn mark_unhealthy(&self, pool: &Pool, s: &mut PoolState) {
        let limit = self.settings.unhealthy_after;
        for r in s.replicas.iter_mut().filter(|r| !r.unhealthy) {
            let failures = r.health.failures();
            if failures >= limit {
                tracing::warn!(pool = %pool.id, replica = %r.started.name, failures, "replica drops every connection; replacing it");
                r.unhealthy = true;
            }
        }
    }

    /// Adds a replica when connections per replica exceed the target. Call with the lock.
    fn maybe_scale_up(self: &Arc<Self>, pool: &Arc<Pool>, s: &mut PoolState) {
        let policy = &pool.policy;
        let replicas = s.serving().count();
        let wanted = (s.load() + 1).div_ceil(policy.target_connections_per_replica.max(1));
        if wanted > replicas && replicas + s.starting < policy.max_replicas && s.starting == 0 {
            self.scale_up(pool, s, "load");
        }
    }

    /// Starts one more replica in the background. Call with the lock.
    pub fn scale_up(self: &Arc<Self>, pool: &Arc<Pool>, s: &mut PoolState, reason: &'static str) {
        s.starting += 1;
        tracing::info!(pool = %pool.id, replicas = s.replicas.len(), reason, "adding a replica");
        let (shared, pool) = (self.clone(), pool.clone());
        self.tasks.spawn(async move {
            let result = shared.bring_up(&pool, None).await;
            let mut s = pool.lock();
            s.starting -= 1;
            match result {
                Ok(replica) => {
                    pool.metrics.scaled(&pool.id, "up", reason);
                    if s.serving().next().is_none() {
                        // The only replica that serves (the others crashed or were replaced
                        // meanwhile): the pool woke, and stays up `min_up_after_wake`.
                        s.woke_at = Some(Instant::now());
                        s.idle_since = None;
                    }
                    s.replicas.push(replica);
                    let state = match s.state {
                        // Its replicas crashed while this one started: it serves now, and
                        // the pool sleeps again through a drain, never with it running.
                        State::Sleeping => State::Ready,
                        other => other,
                    };
                    pool.set(&mut s, state);
                }
                Err(e) => {
                    tracing::warn!(pool = %pool.id, error = %e, "extra replica did not start");
                    if s.replicas.is_empty() && matches!(s.state, State::Ready) {
                        // It was to replace the last one: held connections wake the pool.
                        pool.set(&mut s, State::Sleeping);
                    }
                }
            }
        });
    }

    /// Starts a replica and waits until it is healthy, within the wake timeout. A replica
    /// that does not get there is stopped. With `wake`, each phase is recorded from that
    /// instant (spawned, listening, healthy).
    async fn bring_up(&self, pool: &Pool, wake: Option<Instant>) -> Result<Replica, RouteError> {
        let began = Instant::now();
        let deadline = began + pool.policy.wake_timeout;
        let phase = |name: &'static str| {
            if let Some(at) = wake {
                pool.metrics.wake_phase(&pool.id, name, at.elapsed());
            }
        };
        let started = match timeout_at(deadline, self.driver.start(&pool.id)).await {
            Ok(Ok(started)) => started,
            Ok(Err(e)) => return Err(RouteError::WakeFailed(e.to_string())),
            Err(_) => return Err(RouteError::WakeTimeout(pool.policy.wake_timeout)),
        };
        phase("spawned");
        match timeout_at(deadline, self.until_healthy(pool, &started, &phase)).await {
            Ok(Ok(())) => Ok(Replica::new(started)),
            Ok(Err(Exited)) => Err(RouteError::WakeFailed(format!(
                "replica {} exited before it became healthy",
                started.name
            ))),
            Err(_) => {
                tracing::warn!(pool = %pool.id, replica = %started.name, addr = %started.addr, "replica did not become healthy in time; stopping it");
                self.stop(pool, &started, "unhealthy").await;
                Err(RouteError::WakeTimeout(pool.policy.wake_timeout))
            }
        }
    }

    async fn until_healthy(
        &self,
        pool: &Pool,
        replica: &Started,
        phase: &impl Fn(&'static str),
    ) -> Result<(), Exited> {
        let mut listening = false;
        // Fast at first (a stand-in or a warm buildkitd answers within milliseconds), then
        // backing off to the configured interval: the gateway's share of wake latency stays
        // a few milliseconds without probing a slow starter hundreds of times.
        let mut interval = FIRST_PROBE_INTERVAL.min(self.settings.probe_interval);
        loop {
            match self.driver.probe(&pool.id, replica).await {
                Readiness::Healthy => {
                    if !listening {
                        phase("listening");
                    }
                    phase("healthy");
                    return Ok(());
                }
                Readiness::Exited => return Err(Exited),
                Readiness::Listening if !listening => {
                    listening = true;
                    phase("listening");
                }
                _ => {}
            }
            sleep(interval).await;
            interval = (interval * 2).min(self.settings.probe_interval);
        }
    }

    /// Stops one replica, logging (not returning) a failure: the driver has done what it can.
    pub async fn stop(&self, pool: &Pool, replica: &Started, reason: &'static str) {
        match self.driver.stop(&pool.id, replica).await {
            Ok(()) => {
                tracing::info!(pool = %pool.id, replica = %replica.name, reason, "replica stopped");
                pool.metrics.scaled(&pool.id, "down", reason);
            }
            Err(e) => {
                tracing::error!(pool = %pool.id, replica = %replica.name, error = %e, reason = e.reason(), "replica did not stop")
            }
        }
    }
}
