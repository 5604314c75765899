//! The pool's status: phase, conditions, observedGeneration, replicas, endpoint. Computed by
//! a pure function from what the caches show, applied to `/status` only when it differs
//! from the cached pool's status (a condition keeps its lastTransitionTime while its status
//! holds, so an unchanged pool writes nothing). Publishes Events when the pool wakes or
//! sleeps and when its spec is invalid.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Endpoints;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kube::api::{Api, Patch};
use kube::runtime::events::EventType;
use proxy::names::PoolId;
use serde_json::json;

use super::apply::{covers, params};
use super::context::{Context, cached};
use super::error::Error;
use super::hosts::{self, HOSTS_ACCEPTED};
use super::objects::{POOL_LABEL, PoolNames};
use super::service;
use crate::crd::{BuildKitPool, BuildKitPoolStatus, Phase, WorkloadKind};

const RECONCILER: &str = "status";

/// What the status is computed from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// The summary of every validation fault, if any.
    pub invalid: Option<String>,
    /// Why the PKI is not ready, if it is not.
    pub pki_problem: Option<String>,
    pub workload: WorkloadState,
    pub draining: bool,
    pub endpoint: Option<String>,
    /// A reconciler's failure this round (the error's text).
    pub error: Option<String>,
    /// `spec.gateway.hosts` entries that route to another pool, each saying which.
    pub refused_hosts: Vec<String>,
}

/// The workload as the caches show it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadState {
    pub exists: bool,
    pub replicas: i32,
    pub ready: i32,
    /// Why it cannot make progress, if it cannot.
    pub failure: Option<String>,
}

/// The phase for what was observed.
pub fn phase(observed: &Observed) -> Phase {
    let w = &observed.workload;
    let broken = observed.invalid.is_some() || observed.pki_problem.is_some();
    if broken || observed.error.is_some() || w.failure.is_some() {
        Phase::Degraded
    } else if observed.draining {
        Phase::Draining
    } else if w.replicas == 0 {
        Phase::Sleeping
    } else if w.ready > 0 {
        Phase::Ready
    } else {
        Phase::Waking
    }
}

/// The status bkpool owns, keeping transition times of conditions that did not change.
pub fn desired(pool: &BuildKitPool, observed: &Observed, now: Time) -> BuildKitPoolStatus {
    let previous = pool.status.clone().unwrap_or_default();
    let generation = pool.metadata.generation;
    let phase = phase(observed);
    let w = &observed.workload;
    let condition_is = |type_: &str, status: &str, reason: &str, message: String| {
        let since = previous
            .condition(type_)
            .filter(|c| c.status == status)
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time: since,
        }
    };
    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        condition_is(type_, status, reason, message)
    };
    let validated = match &observed.invalid {
        None => condition("Validated", true, "Valid", "spec is valid".into()),
        Some(faults) => condition("Validated", false, "InvalidSpec", faults.clone()),
    };
    let pki = match &observed.pki_problem {
        None => condition(
            "PKIReady",
            true,
            "CertificatesIssued",
            "CAs and certificates are current".into(),
        ),
        Some(problem) => condition("PKIReady", false, "PKIError", problem.clone()),
    };
    let workload = match (&w.failure, w.replicas, w.ready) {
        (Some(why), _, _) => condition("WorkloadReady", false, "WorkloadFailed", why.clone()),
        (None, 0, _) => condition(
            "WorkloadReady",
            true,
            "ScaledToZero",
            "no replicas wanted".into(),
        ),
        (None, want, ready) if ready >= want => condition(
            "WorkloadReady",
            true,
            "AllReady",
            format!("{ready}/{want} ready"),
        ),
        (None, want, ready) => condition(
            "WorkloadReady",
            false,
            "Starting",
            format!("{ready}/{want} ready"),
        ),
    };
    let ready_message = match &observed.error {
        Some(error) => error.clone(),
        None => format!("pool is {}", phase.as_str()),
    };
    let ready = condition(
        "Ready",
        phase == Phase::Ready,
        phase.as_str(),
        ready_message,
    );
    let hosts = match (&observed.invalid, observed.refused_hosts.as_slice()) {
        (Some(_), _) => condition_is(
            HOSTS_ACCEPTED,
            "Unknown",
            "InvalidSpec",
            "host names are checked once the spec is valid".into(),
        ),
        (None, []) => condition(
            HOSTS_ACCEPTED,
            true,
            "HostsRouted",
            "every host name routes to this pool".into(),
        ),
        (None, refused) => condition(HOSTS_ACCEPTED, false, "HostConflict", refused.join("; ")),
    };
    BuildKitPoolStatus {
        phase: Some(phase),
        conditions: vec![ready, pki, workload, validated, hosts],
        observed_generation: generation,
        replicas: Some(w.replicas),
        ready_replicas: Some(w.ready),
        endpoint: observed.endpoint.clone(),
        // The scaler's fields, not applied by this manager.
        last_activity_time: None,
        open_connections: None,
        draining_since: None,
    }
}

/// What the caches say about the pool's workload.
pub fn observe_workload(pool: &BuildKitPool, ctx: &Context) -> WorkloadState {
    let names = PoolNames::of(pool);
    let (ns, name) = (names.namespace.as_str(), names.buildkitd());
    match pool.spec.workload.kind {
        WorkloadKind::Deployment => cached(&ctx.stores.deployments, ns, &name)
            .map(|d| deployment_state(&d))
            .unwrap_or_default(),
        WorkloadKind::StatefulSet => cached(&ctx.stores.stateful_sets, ns, &name)
            .map(|s| stateful_set_state(&s))
            .unwrap_or_default(),
        WorkloadKind::Job => {
            let active: i32 = ctx
                .stores
                .jobs
                .state()
                .iter()
                .filter(|j| j.namespace().as_deref() == Some(ns))
                .filter(|j| j.labels().get(POOL_LABEL) == Some(&names.pool))
                .map(|j| j.status.as_ref().and_then(|s| s.active).unwrap_or(0))
                .sum();
            let ready =
                cached(&ctx.stores.endpoints, ns, &name).map_or(0, |ep| ready_addresses(&ep));
            WorkloadState {
                exists: true,
                replicas: active,
                ready: ready.min(active),
                failure: None,
            }
        }
    }
}

/// Ready addresses in an Endpoints object (not-ready ones are listed apart).
pub fn ready_addresses(ep: &Endpoints) -> i32 {
    let count: usize = ep
        .subsets
        .iter()
        .flatten()
        .map(|s| s.addresses.as_ref().map_or(0, Vec::len))
        .sum();
    i32::try_from(count).unwrap_or(i32::MAX)
}

pub fn deployment_state(d: &Deployment) -> WorkloadState {
    let status = d.status.clone().unwrap_or_default();
    let failure = status.conditions.iter().flatten().find_map(|c| {
        let stuck = c.type_ == "Progressing" && c.status == "False";
        stuck.then(|| {
            c.message
                .clone()
                .unwrap_or_else(|| "rollout is stuck".into())
        })
    });
    WorkloadState {
        exists: true,
        replicas: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
        ready: status.ready_replicas.unwrap_or(0),
        failure,
    }
}

pub fn stateful_set_state(s: &StatefulSet) -> WorkloadState {
    WorkloadState {
        exists: true,
        replicas: s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
        ready: s
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0),
        failure: None,
    }
}

/// Applies the status for `observed` unless the cached one already says it.
pub async fn reconcile(
    pool: &BuildKitPool,
    ctx: &Context,
    mut observed: Observed,
) -> Result<Phase, Error> {
    if observed.invalid.is_none() {
        observed.workload = observe_workload(pool, ctx);
        observed.endpoint = Some(service::endpoint(pool, &ctx.settings));
        observed.refused_hosts = refused_hosts(pool, ctx);
    }
    observed.draining = pool
        .status
        .as_ref()
        .is_some_and(|s| s.draining_since.is_some());
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let status = desired(pool, &observed, now);
    let phase = status.phase.unwrap_or(Phase::Degraded);
    count_phases(pool, ctx, phase);
    let previous = pool.status.clone().unwrap_or_default();
    let (Ok(actual), Ok(wanted)) = (
        serde_json::to_value(&previous),
        serde_json::to_value(&status),
    ) else {
        return Ok(phase);
    };
    if covers(&actual, &wanted) {
        return Ok(phase);
    }
    let ns = pool.namespace().unwrap_or_default();
    let api: Api<BuildKitPool> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = json!({
        "apiVersion": "bkpool.dev/v1alpha1",
        "kind": "BuildKitPool",
        "status": wanted,
    });
    api.patch_status(&pool.name_any(), &params(), &Patch::Apply(&patch))
        .await
        .map_err(|source| Error::Write {
            reconciler: RECONCILER,
            kind: "BuildKitPool",
            namespace: ns,
            name: pool.name_any(),
            source,
        })?;
    ctx.metrics.wrote(RECONCILER);
    events(pool, ctx, &previous, &status).await;
    Ok(phase)
}

/// The pool's host names that route to another pool, as the gateway's route table decides.
fn refused_hosts(pool: &BuildKitPool, ctx: &Context) -> Vec<String> {
    let names = PoolNames::of(pool);
    let Ok(id) = PoolId::new(&names.namespace, &names.pool) else {
        return Vec::new();
    };
    let claims = hosts::claims(&ctx.stores.pools.state());
    claims
        .refused(&id)
        .iter()
        .map(ToString::to_string)
        .collect()
}

async fn events(
    pool: &BuildKitPool,
    ctx: &Context,
    before: &BuildKitPoolStatus,
    after: &BuildKitPoolStatus,
) {
    if let (Some(was), Some(now)) = (before.replicas, after.replicas) {
        if was == 0 && now > 0 {
            let note = format!("waking: {now} replica(s) requested");
            ctx.event(pool, EventType::Normal, "Waking", "Wake", note)
                .await;
        } else if was > 0 && now == 0 {
            ctx.event(
                pool,
                EventType::Normal,
                "Sleeping",
                "Sleep",
                "scaled to zero".into(),
            )
            .await;
        }
    }
    let invalid = |s: &BuildKitPoolStatus| {
        s.condition("Validated")
            .filter(|c| c.status == "False")
            .map(|c| c.message.clone())
    };
    if let Some(message) = invalid(after)
        && invalid(before) != Some(message.clone())
    {
        ctx.event(pool, EventType::Warning, "InvalidSpec", "Validate", message)
            .await;
    }
    let refused = |s: &BuildKitPoolStatus| {
        s.condition(HOSTS_ACCEPTED)
            .filter(|c| c.status == "False")
            .map(|c| c.message.clone())
    };
    if let Some(message) = refused(after)
        && refused(before) != Some(message.clone())
    {
        ctx.event(pool, EventType::Warning, "HostConflict", "Route", message)
            .await;
    }
}

fn count_phases(pool: &BuildKitPool, ctx: &Context, this: Phase) {
    let mut counts: Vec<(Phase, i64)> = Phase::ALL.iter().map(|p| (*p, 0)).collect();
    let uid = pool.uid();
    for other in ctx.stores.pools.state() {
        let phase = if other.uid() == uid {
            Some(this)
        } else {
            other.status.as_ref().and_then(|s| s.phase)
        };
        if let Some(slot) = counts.iter_mut().find(|(p, _)| Some(*p) == phase) {
            slot.1 += 1;
        }
    }
    ctx.metrics.set_pools(&counts);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::BuildKitPoolSpec;
    use crate::operator::objects::fixtures;

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn running(replicas: i32, ready: i32) -> Observed {
        Observed {
            workload: WorkloadState {
                exists: true,
                replicas,
                ready,
                failure: None,
            },
            endpoint: Some("tcp://a.ci.svc:1234".into()),
            ..Observed::default()
        }
    }

    #[test]
    fn phases_follow_the_workload() {
        assert_eq!(phase(&running(0, 0)), Phase::Sleeping);
        assert_eq!(phase(&running(2, 0)), Phase::Waking);
        assert_eq!(phase(&running(2, 1)), Phase::Ready);
        let draining = Observed {
            draining: true,
            ..running(1, 1)
        };
        assert_eq!(phase(&draining), Phase::Draining);
        let invalid = Observed {
            invalid: Some("x".into()),
            ..running(1, 1)
        };
        assert_eq!(phase(&invalid), Phase::Degraded);
    }

    #[test]
    fn an_unchanged_status_keeps_its_transition_times_and_is_covered() {
        let mut pool = fixtures::pool("a", BuildKitPoolSpec::default());
        let first = desired(&pool, &running(1, 1), at(100));
        pool.status = Some(first.clone());
        let again = desired(&pool, &running(1, 1), at(200));
        assert_eq!(again, first);
        let (a, w) = (
            serde_json::to_value(&first).unwrap(),
            serde_json::to_value(&again).unwrap(),
        );
        assert!(covers(&a, &w));
        // A change moves only the conditions that changed.
        let waking = desired(&pool, &running(2, 1), at(300));
        let t =
            |s: &BuildKitPoolStatus, c: &str| s.condition(c).unwrap().last_transition_time.clone();
        assert_eq!(t(&waking, "WorkloadReady"), at(300));
        assert_eq!(t(&waking, "Validated"), at(100));
    }

    #[test]
    fn an_invalid_spec_says_why_and_which_generation() {
        let pool = fixtures::pool("a", BuildKitPoolSpec::default());
        let observed = Observed {
            invalid: Some("spec.scaling.minReplicas: 3 exceeds maxReplicas 2".into()),
            ..Observed::default()
        };
        let status = desired(&pool, &observed, at(1));
        let validated = status.condition("Validated").unwrap();
        assert_eq!(
            (validated.status.as_str(), validated.reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert!(validated.message.contains("minReplicas"));
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.phase, Some(Phase::Degraded));
    }

    #[test]
    fn a_refused_host_name_is_a_condition_naming_its_holder() {
        let pool = fixtures::pool("a", BuildKitPoolSpec::default());
        let status = desired(&pool, &running(1, 1), at(1));
        let hosts = status.condition(HOSTS_ACCEPTED).unwrap();
        assert_eq!(
            (hosts.status.as_str(), hosts.reason.as_str()),
            ("True", "HostsRouted")
        );
        let refused = Observed {
            refused_hosts: vec![
                "spec.gateway.hosts[0]: build.example.com already routes to pool ci/b".into(),
            ],
            ..running(1, 1)
        };
        let status = desired(&pool, &refused, at(2));
        let hosts = status.condition(HOSTS_ACCEPTED).unwrap();
        assert_eq!(
            (hosts.status.as_str(), hosts.reason.as_str()),
            ("False", "HostConflict")
        );
        assert!(hosts.message.contains("pool ci/b"), "{}", hosts.message);
        // The pool still serves by its own names.
        assert_eq!(status.phase, Some(Phase::Ready));
        let invalid = Observed {
            invalid: Some("x".into()),
            ..Observed::default()
        };
        let status = desired(&pool, &invalid, at(3));
        assert_eq!(status.condition(HOSTS_ACCEPTED).unwrap().status, "Unknown");
    }

    #[test]
    fn the_scalers_fields_are_never_sent() {
        let pool = fixtures::pool("a", BuildKitPoolSpec::default());
        let status = serde_json::to_value(desired(&pool, &running(0, 0), at(1))).unwrap();
        for field in ["lastActivityTime", "openConnections", "drainingSince"] {
            assert!(status.get(field).is_none(), "{field} in {status}");
        }
    }
}
