//! Which pool each host name routes to, across every pool of every namespace.
//!
//! The gateway serves all pools on one listener: a passthrough pool is chosen by SNI before
//! terminate mode is tried, and a terminate pool's server certificate is chosen by SNI too.
//! So a host name must lead to exactly one pool, or one namespace could take another's
//! connections. The rules, in order:
//! - a pool's own Service names (`<pool>.<ns>`, `<pool>.<ns>.svc`,
//!   `<pool>.<ns>.svc.cluster.local`) are its own, whoever asked for them first;
//! - a name under `.svc` belongs to the namespace it names: a spec claiming another
//!   namespace's is invalid ([`crate::crd::validate_pool`]), so it never gets here;
//! - any other name in `spec.gateway.hosts` goes to the oldest pool that asks for it (by
//!   creation time, then namespace and name: stable across rebuilds).
//!
//! A claim that loses is refused, never resolved in silence: the status reconciler reports it
//! as the `HostsAccepted` condition of the pool that lost, and the gateway's route table
//! routes the name to its owner only. Both call [`claims`], so they never disagree.
//! Invalid and deleted pools claim nothing (the gateway does not route them either).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use proxy::config::normalize_hostname;
use proxy::names::PoolId;

use super::objects::PoolNames;
use crate::crd::{BuildKitPool, validate_pool};

/// Who owns each claimed name, and each pool's refused claims.
#[derive(Debug, Default)]
pub struct Claims {
    owners: HashMap<String, PoolId>,
    refused: HashMap<PoolId, Vec<Refused>>,
}

/// A `spec.gateway.hosts` entry that routes to another pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The field, as `spec.gateway.hosts[i]`.
    pub path: String,
    pub host: String,
    /// The pool the name routes to.
    pub holder: PoolId,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self { path, host, holder } = self;
        write!(f, "{path}: {host} already routes to pool {holder}")
    }
}

/// Decides every host name of `pools` (see the module's rules).
pub fn claims(pools: &[Arc<BuildKitPool>]) -> Claims {
    let mut live: Vec<(PoolId, &BuildKitPool)> = pools
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| validate_pool(p).is_empty())
        .filter_map(|p| Some((id(p)?, p.as_ref())))
        .collect();
    live.sort_by_key(|(id, p)| {
        let created = p.metadata.creation_timestamp.clone().map(|t| t.0);
        (created, id.clone())
    });
    let mut claims = Claims::default();
    for (id, pool) in &live {
        for name in service_names(pool) {
            claims.owners.insert(name, id.clone());
        }
    }
    for (id, pool) in &live {
        for (i, host) in pool.spec.gateway.hosts.iter().enumerate() {
            let Some(host) = normalize_hostname(host) else {
                continue;
            };
            let owner = claims.owners.entry(host.clone()).or_insert(id.clone());
            if owner != id {
                let refused = Refused {
                    path: format!("spec.gateway.hosts[{i}]"),
                    host,
                    holder: owner.clone(),
                };
                claims.refused.entry(id.clone()).or_default().push(refused);
            }
        }
    }
    claims
}

impl Claims {
    /// Whether `pool` may be reached by `host`: it owns the name, or nobody claims it (a bare
    /// pool name, which only means something inside the pool's own namespace).
    pub fn routes_to(&self, host: &str, pool: &PoolId) -> bool {
        self.owners.get(host).is_none_or(|owner| owner == pool)
    }

    /// The pool `host` routes to, if any pool claims it.
    pub fn owner(&self, host: &str) -> Option<&PoolId> {
        self.owners.get(host)
    }

    /// The names of `spec.gateway.hosts` that `pool` asked for and another pool holds.
    pub fn refused(&self, pool: &PoolId) -> &[Refused] {
        self.refused.get(pool).map_or(&[], Vec::as_slice)
    }
}

/// The pools whose claims may change with `changed` (created, updated or deleted): those
/// sharing a name with it, and those with a refused claim now (which `changed` may have
/// released by dropping a name). Their `HostsAccepted` condition is computed again.
pub fn affected_by(
    changed: &BuildKitPool,
    pools: &[Arc<BuildKitPool>],
) -> Vec<ObjectRef<BuildKitPool>> {
    let names = all_names(changed);
    let refusing = |p: &BuildKitPool| {
        p.status
            .as_ref()
            .and_then(|s| s.condition(HOSTS_ACCEPTED))
            .is_some_and(|c| c.status == "False")
    };
    pools
        .iter()
        .filter(|p| (p.namespace(), p.name_any()) != (changed.namespace(), changed.name_any()))
        .filter(|p| refusing(p) || !all_names(p).is_disjoint(&names))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// The condition reporting a pool's refused host names.
pub const HOSTS_ACCEPTED: &str = "HostsAccepted";

/// The qualified Service names of a pool (the bare name is left out: every namespace may
/// have a pool of that name).
fn service_names(pool: &BuildKitPool) -> impl Iterator<Item = String> {
    PoolNames::of(pool).client_dns_names().into_iter().skip(1)
}

fn all_names(pool: &BuildKitPool) -> BTreeSet<String> {
    let hosts = pool.spec.gateway.hosts.iter();
    service_names(pool)
        .chain(hosts.filter_map(|h| normalize_hostname(h)))
        .collect()
}

fn id(pool: &BuildKitPool) -> Option<PoolId> {
    PoolId::new(&pool.namespace()?, &pool.name_any()).ok()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pool(ns: &str, name: &str, hosts: &[&str], created: i64) -> Arc<BuildKitPool> {
        let mut pool: BuildKitPool = serde_json::from_value(json!({
            "apiVersion": "bkpool.dev/v1alpha1", "kind": "BuildKitPool",
            "metadata": {"name": name, "namespace": ns, "uid": format!("{ns}-{name}")},
            "spec": {"gateway": {"mode": "passthrough", "hosts": hosts}},
        }))
        .unwrap();
        let at = k8s_openapi::jiff::Timestamp::from_second(created).unwrap();
        pool.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at));
        Arc::new(pool)
    }

    fn id(s: &str) -> PoolId {
        s.parse().unwrap()
    }

    #[test]
    fn the_oldest_pool_keeps_a_contested_name_and_the_later_is_told() {
        let pools = [
            pool("dev", "b", &["build.example.com", "b.example.com"], 2),
            pool("ci", "a", &["build.example.com"], 1),
        ];
        let claims = claims(&pools);
        assert!(claims.routes_to("build.example.com", &id("ci/a")));
        assert!(!claims.routes_to("build.example.com", &id("dev/b")));
        assert!(claims.routes_to("b.example.com", &id("dev/b")));
        assert_eq!(claims.refused(&id("ci/a")), []);
        let refused = claims.refused(&id("dev/b"));
        assert_eq!(
            refused.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["spec.gateway.hosts[0]: build.example.com already routes to pool ci/a"]
        );
    }

    #[test]
    fn a_pools_own_service_names_beat_an_older_claim() {
        // An older pool in another namespace asked for `ci.default` (the short Service name
        // of pool default/ci) before that pool existed: the name is default/ci's anyway.
        let pools = [
            pool("evil", "squat", &["ci.default", "other.example.com"], 1),
            pool("default", "ci", &[], 2),
        ];
        let claims = claims(&pools);
        for name in [
            "ci.default",
            "ci.default.svc",
            "ci.default.svc.cluster.local",
        ] {
            assert!(claims.routes_to(name, &id("default/ci")), "{name}");
            assert!(!claims.routes_to(name, &id("evil/squat")), "{name}");
        }
        assert_eq!(claims.refused(&id("evil/squat"))[0].host, "ci.default");
        assert_eq!(claims.refused(&id("default/ci")), []);
        // A bare pool name belongs to every namespace's pool of that name.
        assert!(claims.routes_to("ci", &id("default/ci")));
        assert!(claims.routes_to("ci", &id("other/ci")));
    }

    #[test]
    fn invalid_and_deleted_pools_claim_nothing() {
        let takeover = pool("evil", "x", &["a.ci.svc", "build.example.com"], 1);
        let mut deleted = (*pool("gone", "y", &["y.example.com"], 1)).clone();
        deleted.metadata.deletion_timestamp = deleted.metadata.creation_timestamp.clone();
        let pools = [
            takeover,
            Arc::new(deleted),
            pool("dev", "b", &["build.example.com", "y.example.com"], 3),
        ];
        let claims = claims(&pools);
        assert_eq!(claims.owner("a.ci.svc"), None);
        assert_eq!(claims.owner("build.example.com"), Some(&id("dev/b")));
        assert_eq!(claims.refused(&id("dev/b")), []);
    }

    #[test]
    fn a_change_reaches_the_pools_sharing_a_name_and_those_refused() {
        let a = pool("ci", "a", &["build.example.com"], 1);
        let b = pool("dev", "b", &["build.example.com"], 2);
        let c = pool("dev", "c", &[], 3);
        let mut refused = (*pool("qa", "d", &["elsewhere.example.com"], 4)).clone();
        refused.status = serde_json::from_value(json!({"conditions": [{
            "type": HOSTS_ACCEPTED, "status": "False", "reason": "HostConflict",
            "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}))
        .unwrap();
        let pools = [a.clone(), b, c, Arc::new(refused)];
        let names: Vec<String> = affected_by(&a, &pools)
            .into_iter()
            .map(|r| format!("{}/{}", r.namespace.unwrap(), r.name))
            .collect();
        assert_eq!(names, ["dev/b", "qa/d"]);
    }
}
