//! Waking a pool from a gateway: a Deployment or StatefulSet is scaled from zero to one
//! through its `/scale` subresource (only from zero: a pool that already wants replicas is
//! starting, or was woken by another gateway replica); a Job pool gets its wake Job. Both are
//! idempotent, so every gateway replica may wake the same pool at once.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
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
                        Api::<Deployment>::namespaced(self.client.clone(), ns),
                        &name,
                    )
                    .await
                }
                WorkloadKind::StatefulSet => {
                    scale_from_zero(
                        Api::<StatefulSet>::namespaced(self.client.clone(), ns),
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

async fn scale_from_zero<K>(api: Api<K>, name: &str) -> Result<Woke, String>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let scale = api
        .get_scale(name)
        .await
        .map_err(|e| format!("reading the scale of {name}: {e}"))?;
    if scale.spec.and_then(|s| s.replicas).unwrap_or(0) > 0 {
        return Ok(Woke::AlreadyWanted);
    }
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let patch = json!({ "spec": { "replicas": 1 } });
    api.patch_scale(name, &params, &Patch::Merge(&patch))
        .await
        .map_err(|e| {
            format!(
                "scaling {} up: {e}",
                scale.metadata.name.unwrap_or_else(|| name.into())
            )
        })?;
    tracing::info!(workload = %name, "scaled from zero to one replica");
    Ok(Woke::ScaledUp)
}
