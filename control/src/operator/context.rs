//! What every reconciler gets: the client, the watch caches it reads instead of the API
//! server, the operator's settings, metrics, the Event recorder and parsed certificates.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource};

use super::metrics::Metrics;
use super::pki::ParsedCache;
use super::publish;
use crate::crd::BuildKitPool;

/// Where the gateway runs, for the client-facing Service and the NetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Where the gateway's Secret copies are published: a namespace holding nothing else, as
    /// the gateway may read every Secret in it.
    pub gateway_secret_namespace: String,
    /// The gateway Service's DNS name, e.g. `bkpool-gateway.bkpool-system.svc.cluster.local`.
    pub gateway_host: String,
    /// The port clients connect to on the gateway.
    pub gateway_port: i32,
    /// Labels of the gateway's pods.
    pub gateway_pod_labels: BTreeMap<String, String>,
    /// Labels of the gateway's namespace (Kubernetes 1.20 does not label namespaces with
    /// their name, so the bkpool namespace carries `bkpool.dev/system: "true"`).
    pub gateway_namespace_labels: BTreeMap<String, String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            gateway_secret_namespace: publish::DEFAULT_NAMESPACE.into(),
            gateway_host: "bkpool-gateway.bkpool-system.svc.cluster.local".into(),
            gateway_port: 1234,
            gateway_pod_labels: BTreeMap::from([(
                "app.kubernetes.io/name".into(),
                "bkpool-gateway".into(),
            )]),
            gateway_namespace_labels: BTreeMap::from([("bkpool.dev/system".into(), "true".into())]),
        }
    }
}

/// Read-only views of the operator's watches.
#[derive(Clone)]
pub struct Stores {
    pub pools: Store<BuildKitPool>,
    pub secrets: Store<Secret>,
    pub config_maps: Store<ConfigMap>,
    pub deployments: Store<Deployment>,
    pub stateful_sets: Store<StatefulSet>,
    pub jobs: Store<Job>,
    pub services: Store<Service>,
    pub network_policies: Store<NetworkPolicy>,
    /// Endpoints of the backend Services (they carry the Service's labels): which buildkitd
    /// pods are ready, for Job pools whose Job status in 1.20 does not say.
    pub endpoints: Store<Endpoints>,
}

pub struct Context {
    pub client: Client,
    pub stores: Stores,
    pub settings: Settings,
    pub metrics: Metrics,
    pub recorder: Recorder,
    pub parsed: ParsedCache,
}

impl Context {
    pub fn new(client: Client, stores: Stores, settings: Settings, metrics: Metrics) -> Self {
        let reporter = Reporter {
            controller: "bkpool-controller".into(),
            instance: None,
        };
        let recorder = Recorder::new(client.clone(), reporter);
        let parsed = ParsedCache::default();
        Self {
            client,
            stores,
            settings,
            metrics,
            recorder,
            parsed,
        }
    }

    /// Publishes an Event on `pool`; a failure to publish is logged, never fatal.
    pub async fn event(
        &self,
        pool: &BuildKitPool,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        publish(&self.recorder, pool, type_, reason, action, note).await;
    }
}

/// Publishes an Event on `pool` through `recorder`; a failure is logged, never fatal.
pub async fn publish(
    recorder: &Recorder,
    pool: &BuildKitPool,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &pool.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "cannot publish event");
    }
}

impl Stores {
    pub fn secret(&self, ns: &str, name: &str) -> Option<std::sync::Arc<Secret>> {
        self.secrets.get(&ObjectRef::new(name).within(ns))
    }
}

/// The cached object `name` in `ns`.
pub fn cached<K>(store: &Store<K>, ns: &str, name: &str) -> Option<std::sync::Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store.get(&ObjectRef::new(name).within(ns))
}
