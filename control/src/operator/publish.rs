//! What gateways need, published where they may read it: a copy of each pool's gateway
//! Secrets (the gateway's server certificate with the pool's client CA bundle, and its
//! client certificate for the backend leg) in one namespace of their own
//! ([`DEFAULT_NAMESPACE`]), named `<pool namespace>.<secret>`. The gateway then lists
//! Secrets in that one namespace only, instead of every Secret in the cluster.
//!
//! That namespace holds nothing else: RBAC cannot narrow a list to some Secrets, so a
//! gateway allowed to list Secrets in the controller's namespace could read the certificate
//! API's CA key there, and on clusters that still create ServiceAccount token Secrets, the
//! controller's own token.
//!
//! Copies cannot have an owner reference (those do not cross namespaces), so [`sweep`]
//! deletes the copies of pools that no longer exist, at start and every [`SWEEP_EVERY`].

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};

use super::apply::{self, Outcome};
use super::context::Context;
use super::error::Error;
use super::objects::{GATEWAY_SECRET_LABEL, MANAGED_BY, POOL_LABEL};
use super::watch::Scope;
use crate::crd::BuildKitPool;

const RECONCILER: &str = "publish";

/// Where copies go unless configured otherwise (`bkpool controller
/// --gateway-secret-namespace`, `bkpool gateway --secret-namespace`).
pub const DEFAULT_NAMESPACE: &str = "bkpool-gateway-secrets";

/// Label on every copy, naming what it is.
pub const COPY_LABEL: &str = "bkpool.dev/gateway-copy";
/// The namespace of the pool a copy belongs to (its name is in [`POOL_LABEL`]).
pub const POOL_NAMESPACE_LABEL: &str = "bkpool.dev/pool-namespace";
/// How often copies of deleted pools are looked for.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The name of the copy of Secret `name` of a pool in `namespace` (namespaces hold no dot, so
/// no two copies collide).
pub fn copy_name(namespace: &str, name: &str) -> String {
    format!("{namespace}.{name}")
}

/// Writes (when it changed) the copy of `secret`, a gateway Secret of `pool`, into the
/// gateway Secret namespace.
pub async fn copy(ctx: &Context, pool: &BuildKitPool, secret: &Secret) -> Result<(), Error> {
    let pool_ns = pool.namespace().unwrap_or_default();
    let ns = ctx.settings.gateway_secret_namespace.as_str();
    let name = copy_name(&pool_ns, &secret.name_any());
    let labels = BTreeMap::from([
        (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
        (GATEWAY_SECRET_LABEL.to_owned(), "true".to_owned()),
        (COPY_LABEL.to_owned(), "true".to_owned()),
        (POOL_LABEL.to_owned(), pool.name_any()),
        (POOL_NAMESPACE_LABEL.to_owned(), pool_ns),
    ]);
    let mut desired = Secret {
        type_: secret.type_.clone(),
        data: secret.data.clone(),
        ..Secret::default()
    };
    desired.metadata.name = Some(name.clone());
    desired.metadata.namespace = Some(ns.to_owned());
    desired.metadata.labels = Some(labels);
    let cached = ctx.stores.secret(ns, &name);
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    if apply::apply(&api, RECONCILER, &desired, cached.as_deref()).await? == Outcome::Applied {
        ctx.metrics.wrote(RECONCILER);
    }
    Ok(())
}

/// Deletes the copies in `namespace` whose pool (within `scope`) is not in `pools`. Returns
/// how many went.
pub async fn sweep(
    client: &Client,
    pools: &Store<BuildKitPool>,
    namespace: &str,
    scope: &Scope,
) -> Result<usize, kube::Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let copies = api
        .list(&ListParams::default().labels(&format!("{COPY_LABEL}=true")))
        .await?;
    let mut deleted = 0;
    for copy in copies {
        let labels = copy.labels();
        let (Some(pool_ns), Some(pool)) =
            (labels.get(POOL_NAMESPACE_LABEL), labels.get(POOL_LABEL))
        else {
            continue;
        };
        let ours = match scope {
            Scope::All => true,
            Scope::Namespace(ns) => ns == pool_ns,
        };
        if !ours || pools.get(&ObjectRef::new(pool).within(pool_ns)).is_some() {
            continue;
        }
        match api.delete(&copy.name_any(), &DeleteParams::default()).await {
            Ok(_) => deleted += 1,
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
        tracing::info!(secret = %copy.name_any(), pool = %format!("{pool_ns}/{pool}"), "deleted the gateway copy of a deleted pool");
    }
    Ok(deleted)
}

/// Sweeps every [`SWEEP_EVERY`] once `pools` has synced, until dropped.
pub async fn sweep_forever(
    client: Client,
    pools: Store<BuildKitPool>,
    namespace: String,
    scope: Scope,
) {
    super::watch::until_ready(&pools).await;
    loop {
        if let Err(e) = sweep(&client, &pools, &namespace, &scope).await {
            tracing::warn!(error = %e, "cannot sweep gateway Secret copies; retrying");
        }
        tokio::time::sleep(SWEEP_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_named_after_their_namespace() {
        assert_eq!(copy_name("ci", "app-gateway-tls"), "ci.app-gateway-tls");
        assert_ne!(
            copy_name("ci", "a-gateway-tls"),
            copy_name("ci-a", "gateway-tls")
        );
    }
}
