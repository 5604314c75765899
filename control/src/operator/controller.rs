//! The operator's Controller: one watch cache per kind (owned kinds filtered by the
//! `app.kubernetes.io/managed-by=bkpool` label, so the caches hold bkpool's objects only),
//! and the reconcilers run in dependency order for each pool: PKI, buildkitd config,
//! workload, Services, NetworkPolicy, status. A failure stops the round, is reported in the
//! pool's status, and retries with exponential backoff per pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::controller::{Action, Config};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};

use super::context::{Context, Settings, Stores};
use super::error::Error;
use super::metrics::Metrics;
use super::objects::{MANAGED_SELECTOR, POOL_LABEL};
use super::status::Observed;
use super::watch::{self, Scope, Watched};
use super::{buildkitd, hosts, netpol, pki, service, status, workload};
use crate::crd::{BuildKitPool, validate_pool};

/// Pools are reconciled at least this often even when nothing changes (a missed watch event
/// costs at most this long; an unchanged pool costs no write).
const RESYNC: Duration = Duration::from_secs(300);

/// Runs the operator until `shutdown` completes (or the watches end).
pub async fn run(
    client: Client,
    scope: Scope,
    settings: Settings,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (pools, pool_events) = watch::cache(
        watch::api::<BuildKitPool>(&client, &scope),
        watcher::Config::default(),
    );
    let pool_stream = pool_events.touched_objects();
    // A pool's host names decide other pools' `HostsAccepted`: a change reconciles the pools
    // it may have taken a name from or released one to (a second watch, mapped to those).
    let peers = pools.clone();
    let host_changes = watcher(
        watch::api::<BuildKitPool>(&client, &scope),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects();
    let (secrets, secret_stream) = owned::<Secret>(&client, &scope);
    let (config_maps, cm_stream) = owned::<ConfigMap>(&client, &scope);
    let (deployments, deploy_stream) = owned::<Deployment>(&client, &scope);
    let (stateful_sets, sts_stream) = owned::<StatefulSet>(&client, &scope);
    let (jobs, job_stream) = owned::<Job>(&client, &scope);
    let (services, svc_stream) = owned::<Service>(&client, &scope);
    let (network_policies, np_stream) = owned::<NetworkPolicy>(&client, &scope);
    let (endpoints, ep_stream) = owned::<Endpoints>(&client, &scope);
    let stores = Stores {
        pools: pools.clone(),
        secrets,
        config_maps,
        deployments,
        stateful_sets,
        jobs,
        services,
        network_policies,
        endpoints,
    };
    let sweeper = tokio::spawn(super::publish::sweep_forever(
        client.clone(),
        pools.clone(),
        settings.gateway_secret_namespace.clone(),
        scope.clone(),
    ));
    let ctx = Arc::new(Context::new(client, stores, settings, metrics));
    let backoff = Arc::new(Backoff::default());
    let config = Config::default()
        .concurrency(4)
        .debounce(Duration::from_millis(250));
    let (rb, eb) = (backoff.clone(), backoff);
    Controller::for_stream(pool_stream, pools)
        .with_config(config)
        .owns_stream(secret_stream)
        .owns_stream(cm_stream)
        .owns_stream(deploy_stream)
        .owns_stream(sts_stream)
        .owns_stream(job_stream)
        .owns_stream(svc_stream)
        .owns_stream(np_stream)
        // Endpoints have no owner; their pool label names the pool whose readiness changed.
        .watches_stream(ep_stream, |ep| {
            let pool = ep.labels().get(POOL_LABEL).cloned();
            let ns = ep.namespace();
            pool.zip(ns)
                .map(|(pool, ns)| ObjectRef::new(&pool).within(&ns))
        })
        .watches_stream(host_changes, move |changed| {
            hosts::affected_by(&changed, &peers.state())
        })
        .graceful_shutdown_on(shutdown)
        .run(
            move |pool, ctx| {
                let backoff = rb.clone();
                async move {
                    let result = reconcile(pool.clone(), ctx).await;
                    if result.is_ok() {
                        backoff.reset(&pool);
                    }
                    result
                }
            },
            move |pool, error, ctx| error_policy(pool, error, ctx, &eb),
            ctx,
        )
        .for_each(|_| std::future::ready(()))
        .await;
    sweeper.abort();
}

/// One round for one pool.
pub async fn reconcile(pool: Arc<BuildKitPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    if pool.meta().deletion_timestamp.is_some() {
        // Owner references let the garbage collector remove everything.
        ctx.metrics.forget_pool(&pool_id(&pool));
        return Ok(Action::await_change());
    }
    if pool.namespace().is_none() {
        return Err(Error::NoNamespace(pool.name_any()));
    }
    let faults = validate_pool(&pool);
    if !faults.is_empty() {
        let invalid = Some(crate::crd::validate::summary(&faults));
        let observed = Observed {
            invalid,
            ..Observed::default()
        };
        timed(&ctx, "status", status::reconcile(&pool, &ctx, observed)).await?;
        return Ok(Action::await_change());
    }
    let rotate_in = match timed(&ctx, "pki", pki::reconcile(&pool, &ctx)).await {
        Ok(due) => due,
        Err(e) => {
            let observed = Observed {
                pki_problem: Some(e.to_string()),
                ..Observed::default()
            };
            return report(&pool, &ctx, observed, e).await;
        }
    };
    let steps = async {
        timed(&ctx, "buildkitd", buildkitd::reconcile(&pool, &ctx)).await?;
        timed(&ctx, "workload", workload::reconcile(&pool, &ctx)).await?;
        timed(&ctx, "service", service::reconcile(&pool, &ctx)).await?;
        timed(&ctx, "netpol", netpol::reconcile(&pool, &ctx)).await
    };
    if let Err(e) = steps.await {
        let observed = Observed {
            error: Some(e.to_string()),
            ..Observed::default()
        };
        return report(&pool, &ctx, observed, e).await;
    }
    timed(
        &ctx,
        "status",
        status::reconcile(&pool, &ctx, Observed::default()),
    )
    .await?;
    Ok(Action::requeue(rotate_in.min(RESYNC)))
}

/// Requeues a failed pool after 1 s, 2 s, 4 s … up to 5 minutes.
pub fn error_policy(
    pool: Arc<BuildKitPool>,
    error: &Error,
    _: Arc<Context>,
    backoff: &Backoff,
) -> Action {
    let delay = backoff.next(&pool);
    tracing::warn!(pool = %pool_id(&pool), %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Per-pool exponential backoff.
#[derive(Default)]
pub struct Backoff(Mutex<HashMap<String, u32>>);

impl Backoff {
    pub fn next(&self, pool: &BuildKitPool) -> Duration {
        let mut failures = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(pool.uid().unwrap_or_default()).or_default();
        *n = n.saturating_add(1);
        Duration::from_secs(1u64 << (*n - 1).min(8)).min(Duration::from_secs(300))
    }

    pub fn reset(&self, pool: &BuildKitPool) {
        let mut failures = self.0.lock().unwrap_or_else(|p| p.into_inner());
        failures.remove(&pool.uid().unwrap_or_default());
    }
}

/// `namespace/name`, the `pool` label.
pub fn pool_id(pool: &BuildKitPool) -> String {
    format!(
        "{}/{}",
        pool.namespace().unwrap_or_default(),
        pool.name_any()
    )
}

async fn report(
    pool: &BuildKitPool,
    ctx: &Context,
    observed: Observed,
    error: Error,
) -> Result<Action, Error> {
    if let Err(e) = status::reconcile(pool, ctx, observed).await {
        tracing::warn!(pool = %pool_id(pool), error = %e, "cannot report a failure in status");
    }
    Err(error)
}

async fn timed<T>(
    ctx: &Context,
    reconciler: &'static str,
    step: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    let started = Instant::now();
    let result = step.await;
    ctx.metrics.reconciled(reconciler, started.elapsed());
    if let Err(e) = &result {
        ctx.metrics.failed(reconciler, e.reason());
    }
    result
}

type Touched<K> = futures::stream::BoxStream<'static, Result<K, watcher::Error>>;

/// A watch cache of bkpool's objects of kind `K`, and the stream that feeds it.
fn owned<K>(client: &Client, scope: &Scope) -> (Store<K>, Touched<K>)
where
    K: Watched + Resource<Scope = k8s_openapi::NamespaceResourceScope>,
{
    let config = watcher::Config::default().labels(MANAGED_SELECTOR);
    let (store, events) = watch::cache(watch::api::<K>(client, scope), config);
    (store, events.touched_objects().boxed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::BuildKitPoolSpec;
    use crate::operator::objects::fixtures;

    #[test]
    fn backoff_doubles_per_pool_and_resets_on_success() {
        let backoff = Backoff::default();
        let a = fixtures::pool("a", BuildKitPoolSpec::default());
        let mut b = fixtures::pool("b", BuildKitPoolSpec::default());
        b.metadata.uid = Some("other".into());
        let delays: Vec<u64> = (0..4).map(|_| backoff.next(&a).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8]);
        assert_eq!(backoff.next(&b), Duration::from_secs(1));
        for _ in 0..20 {
            backoff.next(&a);
        }
        assert_eq!(backoff.next(&a), Duration::from_secs(256));
        backoff.reset(&a);
        assert_eq!(backoff.next(&a), Duration::from_secs(1));
    }
}
