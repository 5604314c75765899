//! Waking a pool from a gateway: a Deployment or StatefulSet is scaled from zero to one
//! through its `/scale` subresource (only from zero: a pool that already wants replicas is
//! starting, or was woken by another gateway replica, and the write is conditional on the
//! count read, so it never undoes a concurrent scale-up); a Job pool gets its wake Job. Both
//! are idempotent, so every gateway replica may wake the same pool at once.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v1::Scale;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use proxy::route::BoxFuture;
use serde_json::json;

use super::upstream::{Waker, Woke};
use crate::crd::{BuildKitPool, WorkloadKind};
use crate::operator::objects::PoolNames;
use crate::operator::workload::start_wake_job;

/// The field manager of the gateway's writes.
pub const FIELD_MANAGER: &str = "bkpool-gateway";

/// The name part of a Job pool's wake Job: one at a time per pool, so a wake by several
/// gateways starts one Job, and a new one only once the scaler deleted the last.
pub const JOB_WAKE: &str = "wake";

/// Wakes one pool through the API server.
pub struct KubeWaker {
    pub client: Client,
    pub pool: Arc<BuildKitPool>,
}

impl Waker for KubeWaker {
    fn wake(&self) -> BoxFuture<'_, Result<Woke, String>> {
        Box::pin(async move {
            let names = PoolNames::of(&self.pool);
            let ns = names.namespace.as_str();
            let name = names.buildkitd();
            match self.pool.spec.workload.kind {
                WorkloadKind::Deployment => {
                    scale_from_zero(
                        &Api::<Deployment>::namespaced(self.client.clone(), ns),
                        &name,
                    )
                    .await
                }
                WorkloadKind::StatefulSet => {
                    scale_from_zero(
                        &Api::<StatefulSet>::namespaced(self.client.clone(), ns),
                        &name,
                    )
                    .await
                }
                WorkloadKind::Job => start_wake_job(&self.client, &self.pool, JOB_WAKE)
                    .await
                    .map(|()| Woke::JobStarted)
                    .map_err(|e| e.to_string()),
            }
        })
    }
}

/// How often a wake reads the workload again after another writer changed it between its
/// read and its write, before it gives up for this round (the wake task asks again).
const CONFLICT_ATTEMPTS: usize = 3;

/// Scales `name` from zero to one replica, and only from zero.
///
/// The count is read, then written on condition that nothing wrote the workload in between:
/// the patch carries the resourceVersion it read, and the API server refuses it (409
/// Conflict) if that changed. Without the condition, a scale-up by the scaler between the
/// read (0) and the write (1), say to 3 for a busy pool, would be undone to 1. On a conflict
/// the count is read again, and a workload that now wants replicas is left as it is.
pub async fn scale_from_zero<K>(api: &Api<K>, name: &str) -> Result<Woke, String>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    for _ in 0..CONFLICT_ATTEMPTS {
        let scale = api
            .get_scale(name)
            .await
            .map_err(|e| format!("reading the scale of {name}: {e}"))?;
        if let Some(woke) = scale_from_zero_as_read(api, name, &scale).await? {
            return Ok(woke);
        }
    }
    Err(format!(
        "scaling {name} up: the workload changed under {CONFLICT_ATTEMPTS} attempts"
    ))
}

/// One attempt of [`scale_from_zero`] from `scale`, as read earlier: `None` when the
/// workload was written since (read it again).
pub async fn scale_from_zero_as_read<K>(
    api: &Api<K>,
    name: &str,
    scale: &Scale,
) -> Result<Option<Woke>, String>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if scale.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0) > 0 {
        return Ok(Some(Woke::AlreadyWanted));
    }
    // A merge patch without the field would write unconditionally: refuse rather than race.
    let Some(version) = scale.metadata.resource_version.as_deref() else {
        return Err(format!("the scale of {name} has no resourceVersion"));
    };
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let patch = json!({
        "metadata": { "resourceVersion": version },
        "spec": { "replicas": 1 },
    });
    match api.patch_scale(name, &params, &Patch::Merge(&patch)).await {
        Ok(_) => {
            tracing::info!(workload = %name, "scaled from zero to one replica");
            Ok(Some(Woke::ScaledUp))
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            tracing::debug!(workload = %name, "scale changed since read; reading again");
            Ok(None)
        }
        Err(e) => Err(format!("scaling {name} up: {e}")),
    }
}
