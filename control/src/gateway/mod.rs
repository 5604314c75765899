//! `bkpool gateway --kubernetes`: the data plane fed from the cluster. Watch caches of pools,
//! of the gateway's certificate Secrets (the copies the controller publishes in a namespace of
//! their own, the only Secrets the gateway may read) and of buildkitd pods become the route
//! table, the TLS configuration and each pool's ready backends; a pool with none is woken by the gateway
//! itself; the scaler's drain mark makes the gateway hold new connections and acknowledge the
//! mark in `/activity`.
//!
//! - [`table`]: pools and Secrets → routes and certificates (Secrets parsed once per version).
//! - [`pods`]: which pods serve.
//! - [`starting`]: probes of pods not yet Ready while their pool wakes.
//! - [`upstream`]: per pool: route, hold, wake single-flight, drain.
//! - [`wake`]: `/scale` from zero, or a Job pool's wake Job.
//! - [`metrics`]: `bkpool_gateway_*` metrics of this side.

pub mod metrics;
pub mod pods;
pub mod starting;
pub mod table;
pub mod upstream;
pub mod wake;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client};
use proxy::gateway::Gateway;
use proxy::names::PoolId;
use proxy::route::{BackendTlsClient, PoolRoute, Routes};
use proxy::tls;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use metrics::Metrics;
use table::{Entry, ParsedSecrets};
use upstream::{PoolState, PoolUpstream};
use wake::KubeWaker;

use crate::crd::BuildKitPool;
use crate::operator::objects::GATEWAY_SECRET_SELECTOR;
use crate::operator::publish::copy_name;
use crate::operator::watch::{self, Events, Scope, api};

/// Changes arriving within this window are applied together.
const DEBOUNCE: Duration = Duration::from_millis(20);

/// What the gateway serves and its per-connection timeouts.
#[derive(Debug, Clone)]
pub struct Settings {
    pub scope: Scope,
    /// Serve only pools matching this label selector.
    pub pool_selector: Option<String>,
    /// Where the controller publishes the gateway's Secrets.
    pub secret_namespace: String,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Keeps `gateway`'s routes, certificates and backends in step with the cluster until `stop`
/// is cancelled. The gateway reports ready (and serves `/activity`) from the first full sync.
pub async fn run(
    client: Client,
    gateway: Arc<Gateway>,
    settings: Settings,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let tables = Arc::new(Notify::new());
    let pods_changed = Arc::new(Notify::new());
    let mut pool_config = watcher::Config::default();
    if let Some(selector) = &settings.pool_selector {
        pool_config = pool_config.labels(selector);
    }
    let scope = &settings.scope;
    let (pools, pool_events) = watch::cache(api::<BuildKitPool>(&client, scope), pool_config);
    let secret_config = watcher::Config::default().labels(GATEWAY_SECRET_SELECTOR);
    let secret_api = Api::<Secret>::namespaced(client.clone(), &settings.secret_namespace);
    let (secrets, secret_events) = watch::cache(secret_api, secret_config);
    let pod_config = watcher::Config::default().labels(pods::SELECTOR);
    let (pod_store, pod_events) = watch::cache(api::<Pod>(&client, scope), pod_config);
    // A pool change can change routes and which pods count; a Secret only routes; a pod only
    // backends.
    let both = vec![tables.clone(), pods_changed.clone()];
    let watches = [
        tokio::spawn(drive("pools", pool_events, both)),
        tokio::spawn(drive("secrets", secret_events, vec![tables.clone()])),
        tokio::spawn(drive("pods", pod_events, vec![pods_changed.clone()])),
    ];
    let synced = async {
        let _ = pools.wait_until_ready().await;
        let _ = secrets.wait_until_ready().await;
        let _ = pod_store.wait_until_ready().await;
    };
    tokio::select! {
        () = stop.cancelled() => {}
        () = synced => {
            let mut feed = Feed {
                client,
                gateway,
                settings,
                metrics,
                states: HashMap::new(),
                backend_tls: HashMap::new(),
                starting: starting::Starting::new(pods_changed.clone()),
                parsed: ParsedSecrets::default(),
                tls_versions: None,
                unroutable: BTreeMap::new(),
            };
            feed.routes(&pools, &secrets);
            feed.backends(&pod_store);
            feed.gateway.set_routes_loaded(true);
            tracing::info!(pools = feed.states.len(), "routes loaded from the cluster");
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tables.notified() => {
                        tokio::time::sleep(DEBOUNCE).await;
                        feed.routes(&pools, &secrets);
                        feed.backends(&pod_store);
                    }
                    () = pods_changed.notified() => feed.backends(&pod_store),
                }
            }
        }
    }
    for watch in watches {
        watch.abort();
    }
}

/// What one pool adds to the TLS configuration: its id, its server Secret's version and the
/// names its certificate answers for (they change when a contested host name changes hands).
type TlsInput = (PoolId, Option<String>, Vec<String>);

/// The state carried from one change to the next.
struct Feed {
    client: Client,
    gateway: Arc<Gateway>,
    settings: Settings,
    metrics: Metrics,
    states: HashMap<PoolId, Arc<PoolState>>,
    /// Each pool's leg to buildkitd, for probing its starting pods.
    backend_tls: HashMap<PoolId, BackendTlsClient>,
    starting: starting::Starting,
    parsed: ParsedSecrets,
    /// Pools, server Secret versions and the names each certificate answers for, as the
    /// current TLS configuration was built from them.
    tls_versions: Option<Vec<TlsInput>>,
    /// Why each unroutable pool is, to log changes only.
    unroutable: BTreeMap<String, String>,
}

impl Feed {
    /// Rebuilds the route table (and the TLS configuration, if its inputs changed) and
    /// applies each pool's drain mark.
    fn routes(&mut self, pools: &Store<BuildKitPool>, secrets: &Store<Secret>) {
        let home = self.settings.secret_namespace.as_str();
        let plan = table::plan(
            &pools.state(),
            |ns, name| secrets.get(&ObjectRef::new(&copy_name(ns, name)).within(home)),
            &mut self.parsed,
        );
        for _ in 0..self.parsed.take_failures() {
            self.metrics.bad_secret();
        }
        let unroutable: BTreeMap<String, String> = plan.unroutable.into_iter().collect();
        for (pool, why) in &unroutable {
            if self.unroutable.get(pool) != Some(why) {
                tracing::info!(%pool, %why, "pool not routed");
            }
        }
        self.unroutable = unroutable;
        self.metrics
            .pools(plan.entries.len(), self.unroutable.len());

        let versions: Vec<TlsInput> = plan
            .entries
            .iter()
            .filter_map(|e| {
                let names = e.server.as_ref()?.cert.names.clone();
                Some((e.id.clone(), e.server_version.clone(), names))
            })
            .collect();
        if self.tls_versions.as_ref() != Some(&versions) {
            self.tls(&plan.entries);
            self.tls_versions = Some(versions);
        }

        let mut routes = Vec::with_capacity(plan.entries.len());
        let mut states = HashMap::with_capacity(plan.entries.len());
        for entry in &plan.entries {
            let waker = Arc::new(KubeWaker {
                client: self.client.clone(),
                pool: entry.pool.clone(),
            });
            let state = match self.states.remove(&entry.id) {
                Some(state) => {
                    state.update(entry.policy, waker);
                    state
                }
                None => PoolState::new(entry.id.clone(), entry.policy, waker, self.metrics.clone()),
            };
            routes.push(self.route(entry, &state));
            states.insert(entry.id.clone(), state);
        }
        for gone in self.states.keys() {
            self.metrics.forget(gone);
        }
        self.states = states;
        self.backend_tls = plan
            .entries
            .iter()
            .filter_map(|e| Some((e.id.clone(), e.backend_tls.clone()?)))
            .collect();
        self.gateway.set_routes(Routes::new(routes));
        for entry in &plan.entries {
            let mark = entry.pool.status.as_ref().and_then(|s| s.draining_mark());
            // Hold first, acknowledge second: once the scaler reads the mark back from this
            // gateway, no new connection reaches a backend of the pool.
            if self.states[&entry.id].set_draining(mark.as_deref()) {
                match &mark {
                    Some(mark) => {
                        tracing::info!(pool = %entry.id, %mark, "pool draining: holding new connections")
                    }
                    None => tracing::info!(pool = %entry.id, "pool no longer draining"),
                }
            }
            self.gateway
                .activity()
                .pool(&entry.id)
                .set_draining(mark.as_deref());
        }
    }

    fn route(&self, entry: &Entry, state: &Arc<PoolState>) -> PoolRoute {
        PoolRoute {
            id: entry.id.clone(),
            mode: entry.mode,
            hostnames: entry.hostnames.clone(),
            max_connections: entry.max_connections,
            max_connections_per_identity: entry.max_connections_per_identity,
            connect_timeout: self.settings.connect_timeout,
            idle_timeout: self.settings.idle_timeout,
            preface_while_waking: entry.preface_while_waking,
            balance: entry.balance,
            upstream: Arc::new(PoolUpstream(state.clone())),
            backend_tls: entry.backend_tls.clone(),
        }
    }

    fn tls(&mut self, entries: &[Entry]) {
        let servers: Vec<_> = entries
            .iter()
            .filter_map(|e| Some((&e.id, e.server.as_ref()?)))
            .collect();
        if servers.is_empty() {
            self.gateway.set_tls(None);
            return;
        }
        let certs: Vec<_> = servers.iter().map(|(_, s)| s.cert.clone()).collect();
        let cas = servers
            .iter()
            .map(|(id, s)| ((*id).clone(), s.client_ca.clone()))
            .collect();
        match tls::server_config(&certs, &cas) {
            Ok(config) => {
                self.gateway.set_tls(Some(config));
                self.gateway.metrics().reload("tls_config", true);
                tracing::info!(pools = certs.len(), "TLS configuration loaded");
            }
            Err(e) => {
                self.gateway.metrics().reload("tls_config", false);
                tracing::error!(error = %e, "certificates do not build a TLS configuration; keeping the last one");
            }
        }
    }

    /// Gives every pool its ready pods; a pool with none, its starting pods that answered the
    /// gateway's own probe.
    fn backends(&mut self, pods: &Store<Pod>) {
        let pods = pods.state();
        let ready = pods::ready_by_pool(&pods);
        let starting = pods::starting_by_pool(&pods)
            .into_iter()
            .filter(|(pool, _)| !ready.contains_key(pool))
            .filter_map(|(pool, pods)| {
                let id = self.states.keys().find(|id| id.as_str() == pool)?;
                let tls = self.backend_tls.get(id)?;
                let pods = pods.into_iter().map(|p| (p, tls.clone())).collect();
                Some((pool, pods))
            })
            .collect();
        let answered = self.starting.update(starting);
        for (id, state) in &self.states {
            let addrs = ready
                .get(id.as_str())
                .or_else(|| answered.get(id.as_str()))
                .cloned()
                .unwrap_or_default();
            self.metrics.ready_backends(id, addrs.len());
            if state.set_ready(addrs.clone()) {
                tracing::info!(pool = %id, ready = ?addrs, "ready backends changed");
            }
        }
    }
}

/// Runs a watch, waking `notify` on every event. Errors are retried with backoff by the
/// stream itself; they are only logged here.
async fn drive<K>(what: &'static str, mut events: Events<K>, notify: Vec<Arc<Notify>>) {
    while let Some(event) = events.next().await {
        match event {
            Ok(_) => notify.iter().for_each(|n| n.notify_one()),
            Err(e) => tracing::warn!(watch = what, error = %e, "watch failed; retrying"),
        }
    }
}
