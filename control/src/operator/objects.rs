//! Names, labels and owner references of everything a pool owns, in one place so the
//! reconcilers, the watch selectors and the tests agree on them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::crd::BuildKitPool;

/// Label on every object bkpool writes; the operator's watches select on it.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "bkpool");
/// The selector the operator's watches use for owned objects.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=bkpool";
/// Label naming the pool an object belongs to.
pub const POOL_LABEL: &str = "bkpool.dev/pool";
/// Label on the Secrets the gateway reads (its server and backend-leg certificates): the
/// gateway's watch selects on it, so CA keys never reach the gateway's memory.
pub const GATEWAY_SECRET_LABEL: &str = "bkpool.dev/gateway-secret";
pub const GATEWAY_SECRET_SELECTOR: &str = "bkpool.dev/gateway-secret=true";
/// Port buildkitd listens on for the gateway (or clients, in passthrough mode).
pub const BUILDKITD_PORT: i32 = 1234;

/// The object names of one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolNames {
    pub namespace: String,
    pub pool: String,
}

impl PoolNames {
    pub fn of(pool: &BuildKitPool) -> Self {
        Self {
            namespace: pool.namespace().unwrap_or_default(),
            pool: pool.name_any(),
        }
    }

    /// The workload, its backend Service and its NetworkPolicy.
    pub fn buildkitd(&self) -> String {
        format!("{}-buildkitd", self.pool)
    }
    pub fn config_map(&self) -> String {
        format!("{}-buildkitd-config", self.pool)
    }
    pub fn client_ca(&self) -> String {
        format!("{}-client-ca", self.pool)
    }
    pub fn backend_ca(&self) -> String {
        format!("{}-backend-ca", self.pool)
    }
    /// The gateway's server certificate for the pool's names, with the client CA bundle.
    pub fn gateway_tls(&self) -> String {
        format!("{}-gateway-tls", self.pool)
    }
    /// buildkitd's server certificate on the backend leg, with the backend CA bundle.
    pub fn buildkitd_tls(&self) -> String {
        format!("{}-buildkitd-tls", self.pool)
    }
    /// The gateway's client certificate for the backend leg.
    pub fn gateway_backend_tls(&self) -> String {
        format!("{}-gateway-backend-tls", self.pool)
    }
    /// The client-facing Service name (an alias of the gateway).
    pub fn client_service(&self) -> String {
        self.pool.clone()
    }
    /// DNS names clients may use for the pool inside the cluster.
    pub fn client_dns_names(&self) -> Vec<String> {
        let (p, ns) = (&self.pool, &self.namespace);
        vec![
            p.clone(),
            format!("{p}.{ns}"),
            format!("{p}.{ns}.svc"),
            format!("{p}.{ns}.svc.cluster.local"),
        ]
    }
}

/// Labels on every object of `pool`.
pub fn labels(pool: &BuildKitPool) -> BTreeMap<String, String> {
    let mut labels = selector(pool);
    labels.insert(MANAGED_BY.0.into(), MANAGED_BY.1.into());
    labels.insert("app.kubernetes.io/instance".into(), pool.name_any());
    labels
}

/// Labels selecting the pool's buildkitd pods (stable: a selector cannot change).
pub fn selector(pool: &BuildKitPool) -> BTreeMap<String, String> {
    BTreeMap::from([
        (POOL_LABEL.into(), pool.name_any()),
        ("app.kubernetes.io/name".into(), "buildkitd".into()),
    ])
}

/// Metadata for an owned object named `name`: namespace, labels, controller owner reference.
pub fn owned_meta(pool: &BuildKitPool, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: pool.namespace(),
        labels: Some(labels(pool)),
        owner_references: Some(vec![owner_ref(pool)]),
        ..ObjectMeta::default()
    }
}

pub fn owner_ref(pool: &BuildKitPool) -> OwnerReference {
    pool.controller_owner_ref(&())
        .unwrap_or_else(|| OwnerReference {
            api_version: BuildKitPool::api_version(&()).into_owned(),
            kind: BuildKitPool::kind(&()).into_owned(),
            name: pool.name_any(),
            uid: String::new(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        })
}

/// A stable short hash (FNV-1a, hex) for pod template annotations that roll pods on change.
pub fn content_hash(parts: &[&[u8]]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        hash ^= 0xff;
    }
    format!("{hash:016x}")
}

#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use crate::crd::BuildKitPoolSpec;

    /// A pool as the API server would hand it over: namespaced, with a uid and a generation.
    pub fn pool(name: &str, spec: BuildKitPoolSpec) -> BuildKitPool {
        let mut pool = BuildKitPool::new(name, spec);
        pool.metadata.namespace = Some("ci".into());
        pool.metadata.uid = Some("0f6a3c2e-uid".into());
        pool.metadata.generation = Some(3);
        pool
    }
}
