//! The leader's scaler: every gateway replica's activity in, scale-downs (after a two-phase
//! drain) and scale-ups by load or floor out. Gateways wake sleeping pools themselves; the
//! scaler never wakes a pool for a connection, so waking does not depend on the leader.
//!
//! Each round (every `--activity-interval`): poll every gateway replica's `/activity`, then
//! for each pool decide ([`decide`]) and act — apply the scaler's status part (the drain
//! mark, open connections, last activity), patch the workload's `/scale`, or delete an idle
//! Job pool's wake Jobs. Reads go through watch caches (pools, workloads, Jobs, the gateway
//! Service's Endpoints); the only writes are `/scale` patches, status applies with field
//! manager `bkpool-scaler`, Job deletes and Events.
//!
//! The drain protocol, with the gateways: the scaler sets `status.drainingSince`; each gateway,
//! seeing it in its pool watch, holds new connections for the pool and echoes the value as the
//! pool's `draining` in its report. Once every replica echoes exactly that value with nothing
//! open or held, continuously for the settle time, the workload is scaled to its floor and the
//! mark cleared. A connection (open or held) meanwhile, or a replica whose report goes missing,
//! clears the mark at once and the held connections go to the still-running backend.
//!
//! Anti-flap (`minUpAfterWake`) counts from when this scaler saw the replicas leave zero; a
//! scaler that starts (or takes over leadership) with the pool already up counts from the
//! pool's `Ready` condition's transition time, which lives in the API and survives restarts.
//! Idleness always has to be seen by this scaler itself for `idleAfter`, so a restart
//! delays a scale-down and never causes one.
//!
//! - [`reports`]: gateway discovery, polling and report freshness.
//! - [`decide`]: the pure per-pool decision.
//! - [`warm`]: warm windows (cron in UTC) and the replica floor.
//! - [`status`]: the scaler's status part and its apply.

pub mod decide;
#[cfg(test)]
mod props;
pub mod reports;
pub mod status;
pub mod warm;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v1::Scale;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Endpoints;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::task::JoinSet;

use self::decide::{Decision, Input, Policy, Track};
use self::reports::{Poller, Reports, Seen};
use self::status::ScalerStatus;
use super::context::{cached, publish};
use super::controller::pool_id;
use super::error::kube_reason;
use super::metrics::{Direction, DrainResult, Metrics};
use super::objects::{MANAGED_SELECTOR, POOL_LABEL, PoolNames};
use super::watch::{self, Scope, Watched, api};
use crate::crd::{BuildKitPool, WorkloadKind, duration, validate_pool};

/// Where the gateways are and how the scaler paces itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Namespace of the gateway Service (the controller's own).
    pub gateway_namespace: String,
    /// The gateway Service whose Endpoints list the replicas to poll.
    pub gateway_service: String,
    /// The Endpoints port (by name) serving `/activity`.
    pub admin_port_name: String,
    /// How often every gateway is polled and every pool decided.
    pub interval: Duration,
    /// How long every gateway must acknowledge a drain with nothing open or held before the
    /// scale-down; longer than the gateway's backend connect timeout window.
    pub drain_settle: Duration,
    /// Per-request timeout of a poll.
    pub request_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            gateway_namespace: "bkpool-system".into(),
            gateway_service: "bkpool-gateway".into(),
            admin_port_name: "admin".into(),
            interval: Duration::from_secs(1),
            drain_settle: Duration::from_secs(5),
            request_timeout: Duration::from_secs(1),
        }
    }
}

impl Settings {
    /// A report older than this is stale: three rounds (plus the request timeout).
    pub fn stale_after(&self) -> Duration {
        self.interval * 3 + self.request_timeout
    }
}

/// Runs the scaler until `shutdown` completes. Only the leader runs it.
pub async fn run(
    client: Client,
    scope: Scope,
    settings: Settings,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send,
) {
    let mut watches = JoinSet::new();
    let all = watcher::Config::default();
    let managed = watcher::Config::default().labels(MANAGED_SELECTOR);
    let pools = feed::<BuildKitPool>(&mut watches, api(&client, &scope), all);
    let deployments = feed::<Deployment>(&mut watches, api(&client, &scope), managed.clone());
    let stateful_sets = feed::<StatefulSet>(&mut watches, api(&client, &scope), managed.clone());
    let jobs = feed::<Job>(&mut watches, api(&client, &scope), managed);
    let gateway_api = Api::namespaced(client.clone(), &settings.gateway_namespace);
    let gateway = format!("metadata.name={}", settings.gateway_service);
    let the_gateway = watcher::Config::default().fields(&gateway);
    let endpoints = feed::<Endpoints>(&mut watches, gateway_api, the_gateway);
    let stores = Stores {
        pools,
        deployments,
        stateful_sets,
        jobs,
        endpoints,
    };
    tokio::pin!(shutdown);
    tokio::select! {
        () = &mut shutdown => return,
        () = stores.ready() => {}
    }
    tracing::info!(
        service = %settings.gateway_service,
        namespace = %settings.gateway_namespace,
        "scaler: polling gateway activity"
    );
    let mut scaler = Scaler::new(client, stores, settings, metrics);
    let mut ticker = tokio::time::interval(scaler.settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // A round is cut short by shutdown too: a replica that lost the lease writes nothing more.
        tokio::select! {
            () = &mut shutdown => break,
            () = async { ticker.tick().await; scaler.round().await } => {}
        }
    }
    watches.shutdown().await;
}

#[derive(Clone)]
struct Stores {
    pools: Store<BuildKitPool>,
    deployments: Store<Deployment>,
    stateful_sets: Store<StatefulSet>,
    jobs: Store<Job>,
    endpoints: Store<Endpoints>,
}

impl Stores {
    async fn ready(&self) {
        let _ = futures::join!(
            self.pools.wait_until_ready(),
            self.deployments.wait_until_ready(),
            self.stateful_sets.wait_until_ready(),
            self.jobs.wait_until_ready(),
            self.endpoints.wait_until_ready(),
        );
    }
}

struct Scaler {
    client: Client,
    stores: Stores,
    settings: Settings,
    metrics: Metrics,
    recorder: Recorder,
    poller: Poller,
    reports: Reports,
    /// By pool uid.
    tracks: HashMap<String, PoolTrack>,
}

/// What the scaler remembers of one pool.
#[derive(Debug, Default)]
struct PoolTrack {
    id: String,
    decide: Track,
    /// The scaler's status part as last written, and when (Unix ms).
    written: Option<(ScalerStatus, u64)>,
    /// The last scale-up requested, and when (Unix ms): not repeated while the cache lags.
    scaled_up: Option<(i32, u64)>,
}

/// A requested scale-up is not repeated for this long while the cache still shows less.
const SCALE_UP_PATIENCE_MS: u64 = 10_000;

impl Scaler {
    fn new(client: Client, stores: Stores, settings: Settings, metrics: Metrics) -> Self {
        let reporter = Reporter {
            controller: "bkpool-controller".into(),
            instance: None,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            poller: Poller::new(settings.request_timeout),
            client,
            stores,
            settings,
            metrics,
            reports: Reports::default(),
            tracks: HashMap::new(),
        }
    }

    async fn round(&mut self) {
        let endpoints = cached(
            &self.stores.endpoints,
            &self.settings.gateway_namespace,
            &self.settings.gateway_service,
        );
        let replicas = reports::replicas(endpoints.as_deref(), &self.settings.admin_port_name);
        self.poller.poll_all(&mut self.reports, &replicas).await;
        let now = tokio::time::Instant::now();
        let stale_after = self.settings.stale_after();
        for (state, count) in self.reports.counts(now, stale_after) {
            self.metrics.set_gateway_reports(state.as_str(), count);
        }
        let view = self.reports.view(now, stale_after);
        let mut alive = HashSet::new();
        for pool in self.stores.pools.state() {
            let Some(uid) = pool.uid() else { continue };
            if pool.meta().deletion_timestamp.is_some() || pool.namespace().is_none() {
                continue;
            }
            alive.insert(uid.clone());
            let mut track = self.tracks.remove(&uid).unwrap_or_default();
            track.id = pool_id(&pool);
            self.pool_round(&pool, view.pool(&track.id), &mut track)
                .await;
            self.tracks.insert(uid, track);
        }
        let gone: Vec<String> = (self.tracks.keys())
            .filter(|uid| !alive.contains(*uid))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(track) = self.tracks.remove(&uid) {
                self.metrics.forget_pool(&track.id);
            }
        }
    }

    async fn pool_round(&self, pool: &BuildKitPool, seen: Option<Seen>, track: &mut PoolTrack) {
        if !validate_pool(pool).is_empty() {
            return; // the status reconciler reports why; nothing to scale
        }
        let now = Timestamp::now();
        let now_ms = unix_ms(now);
        let Some(policy) = self.policy(pool, now) else {
            return;
        };
        let Some((replicas, running)) = self.replicas(pool) else {
            return; // no workload yet: the reconciler creates it
        };
        let cached_status = pool.status.clone().unwrap_or_default();
        let ready_since = cached_status
            .condition("Ready")
            .filter(|c| c.status == "True")
            .map(|c| unix_ms(c.last_transition_time.0));
        track.decide.observe_replicas(replicas, ready_since, now_ms);
        let cached_part = ScalerStatus::cached(&cached_status);
        let mark = track.decide.mark(cached_part.draining_since.as_deref());
        let input = Input {
            now_ms,
            seen: seen.clone(),
            replicas,
            running,
            mark: mark.clone(),
        };
        let decision = decide::decide(&policy, &input, &mut track.decide);
        let base = match &track.written {
            Some((written, _)) => written.clone(),
            None => cached_part,
        };
        let write = |draining: Option<String>| ScalerStatus::wanted(&base, seen.as_ref(), draining);
        match decision {
            Decision::Nothing => {}
            Decision::StartDrain => {
                let Some(new) = status::new_mark(now) else {
                    return;
                };
                if self
                    .write(pool, track, &write(Some(new.clone())), now_ms)
                    .await
                {
                    track.decide.set_mark = Some(new.clone());
                    track.decide.cleared_mark = None;
                    tracing::info!(pool = %track.id, mark = %new, "idle: draining");
                    let note = format!(
                        "idle for {}: draining before a scale-down",
                        duration::format(policy.idle_after)
                    );
                    self.event(pool, "Draining", "Drain", note).await;
                }
                return;
            }
            Decision::CancelDrain(why) => {
                if self.write(pool, track, &write(None), now_ms).await {
                    self.cleared(track, mark);
                    self.metrics.drained(&track.id, DrainResult::Cancelled);
                    tracing::info!(pool = %track.id, why = why.as_str(), "drain cancelled");
                    self.event(
                        pool,
                        "DrainCancelled",
                        "Drain",
                        format!("drain cancelled: {}", why.as_str()),
                    )
                    .await;
                }
                return;
            }
            Decision::ConfirmDrain { to } => {
                if !self.scale_down(pool, replicas, to, &track.id).await {
                    // Confirmed again next round.
                    track.decide.stopping = false;
                    return;
                }
                self.metrics.drained(&track.id, DrainResult::Confirmed);
                return;
            }
            Decision::Stopped => {
                if self.write(pool, track, &write(None), now_ms).await {
                    self.cleared(track, mark);
                    tracing::info!(pool = %track.id, "scale-down done: drain mark cleared");
                }
                return;
            }
            Decision::ScaleUp { to, reason } => {
                let patient = track.scaled_up.is_some_and(|(asked, at)| {
                    asked == to && now_ms.saturating_sub(at) < SCALE_UP_PATIENCE_MS
                });
                if !patient && self.patch_scale(pool, to).await {
                    track.scaled_up = Some((to, now_ms));
                    self.metrics
                        .scaled(&track.id, Direction::Up, reason.as_str());
                    tracing::info!(pool = %track.id, from = replicas, to, reason = reason.as_str(), "scaled up");
                }
            }
        }
        let wanted = write(mark);
        let since_write = track
            .written
            .as_ref()
            .map(|(_, at)| Duration::from_millis(now_ms.saturating_sub(*at)));
        if wanted.due(&base, since_write) {
            self.write(pool, track, &wanted, now_ms).await;
        }
    }

    fn cleared(&self, track: &mut PoolTrack, mark: Option<String>) {
        track.decide.cleared_mark = mark;
        track.decide.set_mark = None;
    }

    /// Applies the scaler's status part; false (and logged) on failure.
    async fn write(
        &self,
        pool: &BuildKitPool,
        track: &mut PoolTrack,
        wanted: &ScalerStatus,
        now_ms: u64,
    ) -> bool {
        let api: Api<BuildKitPool> =
            Api::namespaced(self.client.clone(), &pool.namespace().unwrap_or_default());
        match status::apply(&api, &pool.name_any(), wanted).await {
            Ok(()) => {
                self.metrics.wrote("scaler");
                track.written = Some((wanted.clone(), now_ms));
                true
            }
            Err(error) => {
                tracing::warn!(pool = %track.id, %error, "scaler: cannot apply status");
                self.metrics.failed("scaler", kube_reason(&error));
                false
            }
        }
    }

    /// Scales to `to` after a confirmed drain: `/scale`, or deleting a Job pool's wake Jobs.
    async fn scale_down(&self, pool: &BuildKitPool, replicas: i32, to: i32, id: &str) -> bool {
        if replicas <= to {
            return true; // already there (a previous round scaled, then failed to clear)
        }
        let done = if pool.spec.workload.kind == WorkloadKind::Job {
            match super::workload::delete_wake_jobs(&self.client, pool).await {
                Ok(_) => true,
                Err(error) => {
                    tracing::warn!(pool = %id, %error, "scaler: cannot delete wake Jobs");
                    self.metrics.failed("scaler", error.reason());
                    false
                }
            }
        } else {
            self.patch_scale(pool, to).await
        };
        if done {
            self.metrics.scaled(id, Direction::Down, "idle");
            tracing::info!(pool = %id, from = replicas, to, "drain confirmed: scaled down");
        }
        done
    }

    /// Patches the workload's `/scale` to `replicas`; false (and logged) on failure.
    ///
    /// Unconditional, unlike a gateway's wake: gateways write only a count of zero, and only
    /// on condition that it is still what they read, so a wake never undoes this write; and
    /// a scale-down comes after a confirmed drain, when the count is above zero and no
    /// gateway writes it.
    async fn patch_scale(&self, pool: &BuildKitPool, replicas: i32) -> bool {
        let names = PoolNames::of(pool);
        let patch = Patch::Merge(json!({ "spec": { "replicas": replicas } }));
        let params = PatchParams {
            field_manager: Some(status::FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        let (ns, name) = (&names.namespace, names.buildkitd());
        let result: Result<Scale, kube::Error> = match pool.spec.workload.kind {
            WorkloadKind::Deployment => {
                let api: Api<Deployment> = Api::namespaced(self.client.clone(), ns);
                api.patch_scale(&name, &params, &patch).await
            }
            WorkloadKind::StatefulSet => {
                let api: Api<StatefulSet> = Api::namespaced(self.client.clone(), ns);
                api.patch_scale(&name, &params, &patch).await
            }
            WorkloadKind::Job => return false,
        };
        match result {
            Ok(_) => {
                self.metrics.wrote("scaler");
                true
            }
            Err(error) => {
                tracing::warn!(pool = %pool_id(pool), %error, replicas, "scaler: cannot patch /scale");
                self.metrics.failed("scaler", kube_reason(&error));
                false
            }
        }
    }

    /// The pool's policy for this round; None if a duration does not parse.
    fn policy(&self, pool: &BuildKitPool, now: Timestamp) -> Option<Policy> {
        let s = &pool.spec.scaling;
        let jobs = pool.spec.workload.kind == WorkloadKind::Job;
        Some(Policy {
            floor: if jobs { 0 } else { warm::floor(s, now) },
            max: s.max_replicas,
            idle_after: duration::parse(&s.idle_after).ok()?,
            min_up_after_wake: duration::parse(&s.min_up_after_wake).ok()?,
            target_per_replica: s.target_connections_per_replica,
            scales_by_load: !jobs,
            settle: self.settings.drain_settle,
        })
    }

    /// The replicas the workload asks for and those it still runs (pods not terminating;
    /// Job pools: their wake Jobs, for both); None without a workload.
    fn replicas(&self, pool: &BuildKitPool) -> Option<(i32, i32)> {
        let names = PoolNames::of(pool);
        let (ns, name) = (names.namespace.as_str(), names.buildkitd());
        match pool.spec.workload.kind {
            WorkloadKind::Deployment => cached(&self.stores.deployments, ns, &name).map(|d| {
                let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                let running = d.status.as_ref().and_then(|s| s.replicas).unwrap_or(0);
                (wanted, running)
            }),
            WorkloadKind::StatefulSet => cached(&self.stores.stateful_sets, ns, &name).map(|s| {
                let wanted = s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                let running = s.status.as_ref().map_or(0, |s| s.replicas);
                (wanted, running)
            }),
            WorkloadKind::Job => {
                let count = (self.stores.jobs.state().iter())
                    .filter(|j| j.namespace().as_deref() == Some(ns))
                    .filter(|j| j.labels().get(POOL_LABEL) == Some(&names.pool))
                    .filter(|j| j.meta().deletion_timestamp.is_none())
                    .count();
                let count = i32::try_from(count).unwrap_or(i32::MAX);
                Some((count, count))
            }
        }
    }

    async fn event(&self, pool: &BuildKitPool, reason: &str, action: &str, note: String) {
        publish(
            &self.recorder,
            pool,
            EventType::Normal,
            reason,
            action,
            note,
        )
        .await;
    }
}

fn unix_ms(t: Timestamp) -> u64 {
    u64::try_from(t.as_millisecond()).unwrap_or(0)
}

/// A watch cache of what `api` and `config` select, fed by a task in `tasks`.
fn feed<K: Watched>(tasks: &mut JoinSet<()>, api: Api<K>, config: watcher::Config) -> Store<K> {
    let (store, events) = watch::cache(api, config);
    tasks.spawn(events.for_each(|event| {
        if let Err(error) = event {
            tracing::debug!(%error, kind = %K::kind(&()), "scaler watch error");
        }
        std::future::ready(())
    }));
    store
}
