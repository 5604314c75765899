//! The shape of the operator's requests, checked against a loopback HTTP server standing in
//! for the API server: server-side apply (content type, field manager, force), the
//! `/status` path, and a create (not an apply) for a new workload's replicas.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use control::crd::BuildKitPool;
use control::operator::context::{Context, Settings, Stores};
use control::operator::metrics::Metrics;
use control::operator::status::Observed;
use control::operator::{buildkitd, status, workload};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    uri: String,
    content_type: String,
    body: Value,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// A server that records each request and answers with its body plus a resourceVersion.
async fn mock_api() -> (kube::Client, Log) {
    let log: Log = Arc::default();
    let app = Router::new().fallback(record).with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    (kube::Client::try_from(config).unwrap(), log)
}

async fn record(
    State(log): State<Log>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::Json<Value> {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    log.lock().unwrap().push(Seen {
        method,
        uri: uri.to_string(),
        content_type,
        body: body.clone(),
    });
    if let Some(object) = body.as_object_mut() {
        // A status apply sends no metadata or spec; answer with a whole object all the same.
        object
            .entry("metadata")
            .or_insert_with(|| json!({"name": "a", "namespace": "ci"}));
        object.entry("spec").or_insert_with(|| json!({}));
        object["metadata"]["resourceVersion"] = json!("1");
    }
    axum::Json(body)
}

/// The operator's context with empty caches but for `deployments` and the pool's buildkitd
/// certificate Secret (the workload waits for it).
fn context(client: kube::Client, deployments: Option<Deployment>) -> Context {
    context_with(client, deployments, true)
}

fn context_with(
    client: kube::Client,
    deployments: Option<Deployment>,
    certificate_cached: bool,
) -> Context {
    let (pools, _) = reflector::store();
    let (secrets, mut secret_writer): (_, Writer<Secret>) = reflector::store();
    if certificate_cached {
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "a-buildkitd-tls", "namespace": "ci"},
            "data": {"tls.crt": "Y2VydA=="}
        }))
        .unwrap();
        secret_writer.apply_watcher_event(&watcher::Event::Apply(secret));
    }
    let (config_maps, _) = reflector::store();
    let (deployment_store, mut writer): (_, Writer<Deployment>) = reflector::store();
    if let Some(d) = deployments {
        writer.apply_watcher_event(&watcher::Event::Apply(d));
    }
    let (stateful_sets, _) = reflector::store();
    let (jobs, _) = reflector::store();
    let (services, _) = reflector::store();
    let (network_policies, _) = reflector::store();
    let (endpoints, _) = reflector::store();
    let stores = Stores {
        pools,
        secrets,
        config_maps,
        deployments: deployment_store,
        stateful_sets,
        jobs,
        services,
        network_policies,
        endpoints,
    };
    let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
    Context::new(client, stores, Settings::default(), metrics)
}

fn pool() -> BuildKitPool {
    let mut pool: BuildKitPool = serde_json::from_value(json!({
        "apiVersion": "bkpool.dev/v1alpha1", "kind": "BuildKitPool",
        "metadata": {"name": "a", "namespace": "ci", "uid": "u-1", "generation": 2},
        "spec": {"scaling": {"minReplicas": 1, "maxReplicas": 2}}
    }))
    .unwrap();
    pool.status = None;
    pool
}

#[tokio::test]
async fn writes_are_forced_server_side_applies_by_bkpool() {
    let (client, log) = mock_api().await;
    let ctx = context(client, None);
    buildkitd::reconcile(&pool(), &ctx).await.unwrap();
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let r = &seen[0];
    assert_eq!(r.method, Method::PATCH);
    assert_eq!(r.content_type, "application/apply-patch+yaml");
    assert!(
        r.uri
            .starts_with("/api/v1/namespaces/ci/configmaps/a-buildkitd-config?"),
        "{}",
        r.uri
    );
    assert!(
        r.uri.contains("fieldManager=bkpool") && r.uri.contains("force=true"),
        "{}",
        r.uri
    );
    assert_eq!(r.body["kind"], "ConfigMap");
    assert_eq!(r.body["metadata"]["ownerReferences"][0]["uid"], "u-1");
}

#[tokio::test]
async fn status_goes_to_the_status_subresource_and_omits_the_scalers_fields() {
    let (client, log) = mock_api().await;
    let ctx = context(client, None);
    status::reconcile(&pool(), &ctx, Observed::default())
        .await
        .unwrap();
    let seen = log.lock().unwrap().clone();
    let r = seen
        .iter()
        .find(|r| r.method == Method::PATCH)
        .expect("a status patch");
    assert!(
        r.uri
            .starts_with("/apis/bkpool.dev/v1alpha1/namespaces/ci/buildkitpools/a/status?"),
        "{}",
        r.uri
    );
    assert!(
        r.uri.contains("fieldManager=bkpool") && r.uri.contains("force=true"),
        "{}",
        r.uri
    );
    assert_eq!(r.content_type, "application/apply-patch+yaml");
    assert_eq!(r.body["apiVersion"], "bkpool.dev/v1alpha1");
    assert_eq!(r.body["status"]["observedGeneration"], 2);
    assert!(r.body["status"].get("lastActivityTime").is_none());
    assert!(
        r.body.get("spec").is_none(),
        "a status apply carries no spec"
    );
}

#[tokio::test]
async fn a_new_workload_is_created_with_replicas_and_later_applied_without() {
    let (client, log) = mock_api().await;
    // Not before its certificate's Secret is cached: the pod template would carry the hash
    // of nothing and be replaced the moment the Secret arrived.
    let ctx = context_with(client.clone(), None, false);
    workload::reconcile(&pool(), &ctx).await.unwrap();
    assert!(log.lock().unwrap().is_empty(), "{:?}", log.lock().unwrap());
    let ctx = context(client.clone(), None);
    workload::reconcile(&pool(), &ctx).await.unwrap();
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, Method::POST);
    assert!(
        seen[0]
            .uri
            .starts_with("/apis/apps/v1/namespaces/ci/deployments?"),
        "{}",
        seen[0].uri
    );
    assert!(
        seen[0].uri.contains("fieldManager=bkpool"),
        "{}",
        seen[0].uri
    );
    assert_eq!(seen[0].body["spec"]["replicas"], 1);

    // Once cached, a changed spec is applied without replicas.
    let mut existing: Deployment = serde_json::from_value(seen[0].body.clone()).unwrap();
    existing.metadata.resource_version = Some("1".into());
    let mut changed = pool();
    changed.spec.workload.image = "moby/buildkit:v0.18.0".into();
    log.lock().unwrap().clear();
    let ctx = context(client.clone(), Some(existing.clone()));
    workload::reconcile(&changed, &ctx).await.unwrap();
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        (seen[0].method.clone(), seen[0].content_type.as_str()),
        (Method::PATCH, "application/apply-patch+yaml")
    );
    assert!(
        seen[0].body["spec"].get("replicas").is_none(),
        "{}",
        seen[0].body
    );

    // And an unchanged one is not written at all.
    log.lock().unwrap().clear();
    let ctx = context(client, Some(existing));
    workload::reconcile(&pool(), &ctx).await.unwrap();
    assert!(log.lock().unwrap().is_empty());
}
