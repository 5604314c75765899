//! The leader's scaler against a real API server (skipped without `BKPOOL_TEST_KUBECONFIG`),
//! with the reconcilers running and a fake gateway on loopback behind a selector-less
//! `bkpool-gateway` Service: a gateway that cannot report blocks every drain; an idle pool is
//! marked draining and not scaled until the gateway acknowledges the exact mark; a held
//! connection cancels the drain; an acknowledged drain scales the Deployment to zero and
//! clears the mark. The reconcilers' status (phase Draining) and the scaler's part coexist.
//! A gateway's wake never undoes a scale-up written between its read and its write.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use control::crd::BuildKitPool;
use control::gateway::upstream::Woke;
use control::gateway::wake;
use control::operator::scaler::{self, Settings};
use control::operator::watch::Scope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use proxy::activity::{PoolSnapshot, Snapshot};
use serde_json::json;
use support::*;

const WAIT: Duration = Duration::from_secs(60);

/// What the fake gateway reports.
#[derive(Debug, Clone, Default)]
struct Fake {
    /// Answer 503, as a gateway that has not synced its watches does.
    unavailable: bool,
    pools: BTreeMap<String, (u64, u64, Option<String>)>,
}

type Shared = Arc<Mutex<Fake>>;

async fn activity(State(fake): State<Shared>) -> Response {
    let fake = fake.lock().unwrap().clone();
    if fake.unavailable {
        return (StatusCode::SERVICE_UNAVAILABLE, "syncing").into_response();
    }
    let pools = (fake.pools.into_iter())
        .map(|(pool, (open, held, draining))| PoolSnapshot {
            pool,
            open,
            held,
            draining,
            ..PoolSnapshot::default()
        })
        .collect();
    let taken_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    Json(Snapshot { taken_at_ms, pools }).into_response()
}

async fn start_fake(fake: Shared) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/activity", axum::routing::get(activity))
        .with_state(fake);
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// The selector-less gateway Service and its hand-written Endpoints naming the fake.
async fn publish_gateway(client: &Client, ns: &str, fake: SocketAddr) {
    let service: Service = serde_json::from_value(json!({
        "metadata": { "name": "bkpool-gateway" },
        "spec": { "ports": [{ "name": "admin", "port": 9235 }] },
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &service)
        .await
        .expect("gateway Service");
    let endpoints: Endpoints = serde_json::from_value(json!({
        "metadata": { "name": "bkpool-gateway" },
        "subsets": [{
            "addresses": [{ "ip": fake.ip().to_string() }],
            "ports": [{ "name": "admin", "port": fake.port() }],
        }],
    }))
    .unwrap();
    Api::<Endpoints>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &endpoints)
        .await
        .expect("gateway Endpoints (loopback address)");
}

/// The scaler alone, polling often, with a short settle time.
fn start_scaler(client: &Client, ns: &str) -> RunningController {
    let settings = Settings {
        gateway_namespace: ns.into(),
        interval: Duration::from_millis(250),
        drain_settle: Duration::from_secs(1),
        ..Settings::default()
    };
    let (client, scope) = (client.clone(), Scope::Namespace(ns.into()));
    RunningController::spawn(|metrics, stopped| {
        scaler::run(client, scope, settings, metrics, stopped)
    })
}

async fn pool(client: &Client, ns: &str, name: &str) -> BuildKitPool {
    Api::<BuildKitPool>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap()
}

/// The drain mark as the gateway echoes it: the serialized `drainingSince`.
async fn mark(client: &Client, ns: &str, name: &str) -> Option<String> {
    let status = pool(client, ns, name).await.status?;
    let value = serde_json::to_value(status.draining_since?).unwrap();
    value.as_str().map(str::to_owned)
}

async fn replicas(client: &Client, ns: &str, name: &str) -> i32 {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let scale = api.get_scale(&format!("{name}-buildkitd")).await.unwrap();
    scale.spec.and_then(|s| s.replicas).unwrap_or(0)
}

#[tokio::test]
async fn an_idle_pool_drains_and_scales_to_zero_only_when_every_gateway_acknowledges() {
    let Some(client) = test_client().await else {
        return;
    };
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "scaler").await;
    let fake: Shared = Arc::new(Mutex::new(Fake {
        unavailable: true,
        ..Fake::default()
    }));
    let gateway = start_fake(fake.clone()).await;
    publish_gateway(&client, &ns.name, gateway).await;
    let controller = RunningController::start(&client, &ns.name);
    let pools: Api<BuildKitPool> = Api::namespaced(client.clone(), &ns.name);
    let spec = json!({
        "workload": { "kind": "Deployment" },
        "scaling": { "minReplicas": 0, "idleAfter": "1s", "minUpAfterWake": "0s" },
    });
    let new: BuildKitPool = serde_json::from_value(json!({
        "apiVersion": "bkpool.dev/v1alpha1",
        "kind": "BuildKitPool",
        "metadata": { "name": "a" },
        "spec": spec,
    }))
    .unwrap();
    pools.create(&PostParams::default(), &new).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    eventually("the Deployment", WAIT, || async {
        deployments.get_opt("a-buildkitd").await.ok().flatten()
    })
    .await;
    // Woken, as a gateway wakes a pool.
    let wake = Patch::Merge(json!({ "spec": { "replicas": 1 } }));
    deployments
        .patch_scale("a-buildkitd", &PatchParams::default(), &wake)
        .await
        .unwrap();
    let scaler = start_scaler(&client, &ns.name);
    let id = format!("{}/a", ns.name);

    // The gateway cannot report (503): no drain, however long the pool is idle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(mark(&client, &ns.name, "a").await, None);
    assert_eq!(replicas(&client, &ns.name, "a").await, 1);

    // It reports the pool idle but does not acknowledge the drain: marked, not scaled.
    {
        let mut f = fake.lock().unwrap();
        f.unavailable = false;
        f.pools.insert(id.clone(), (0, 0, None));
    }
    let first = eventually("drainingSince set", WAIT, || async {
        mark(&client, &ns.name, "a").await
    })
    .await;
    // The status reconciler derives the phase from the mark.
    eventually("phase Draining", WAIT, || async {
        let status = pool(&client, &ns.name, "a").await.status?;
        (status.phase == Some(control::crd::Phase::Draining)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(replicas(&client, &ns.name, "a").await, 1);
    assert_eq!(mark(&client, &ns.name, "a").await, Some(first.clone()));

    // A connection held during the drain cancels it; nothing is scaled.
    fake.lock()
        .unwrap()
        .pools
        .insert(id.clone(), (0, 1, Some(first.clone())));
    eventually(
        "drainingSince cleared by a held connection",
        WAIT,
        || async { mark(&client, &ns.name, "a").await.is_none().then_some(()) },
    )
    .await;
    assert_eq!(replicas(&client, &ns.name, "a").await, 1);

    // Idle again; the gateway acknowledges the new mark with nothing open or held.
    fake.lock().unwrap().pools.insert(id.clone(), (0, 0, None));
    let second = eventually("drainingSince set again", WAIT, || async {
        mark(&client, &ns.name, "a").await
    })
    .await;
    fake.lock()
        .unwrap()
        .pools
        .insert(id.clone(), (0, 0, Some(second)));
    eventually("scaled to zero", WAIT, || async {
        (replicas(&client, &ns.name, "a").await == 0).then_some(())
    })
    .await;
    eventually(
        "drainingSince cleared after the scale-down",
        WAIT,
        || async { mark(&client, &ns.name, "a").await.is_none().then_some(()) },
    )
    .await;
    assert_eq!(scaler.metrics.scale_events(&id, "down", "idle"), 1);
    // The reconciler's status apply and the scaler's coexist: both managers' fields stay.
    let status = pool(&client, &ns.name, "a").await.status.unwrap();
    assert_eq!(status.open_connections, Some(0));
    assert!(status.phase.is_some());
    let managers: Vec<String> = pool(&client, &ns.name, "a")
        .await
        .managed_fields()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.iter().any(|m| m == "bkpool-scaler"),
        "{managers:?}"
    );

    scaler.stop().await;
    controller.stop().await;
    ns.delete().await;
}

/// A gateway's wake reads the count, then writes one replica: a scale-up by the scaler in
/// between (to 3, say, for a busy pool) must survive it, not be undone to 1.
#[tokio::test]
async fn a_wake_never_undoes_a_scale_up_made_after_it_read_the_count() {
    let Some(client) = test_client().await else {
        return;
    };
    let ns = TestNamespace::create(&client, "wake-race").await;
    let api: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": { "name": "w-buildkitd" },
        "spec": {
            "replicas": 0,
            "selector": { "matchLabels": { "app": "w" } },
            "template": {
                "metadata": { "labels": { "app": "w" } },
                "spec": { "containers": [{ "name": "buildkitd", "image": "moby/buildkit" }] },
            },
        },
    }))
    .unwrap();
    api.create(&PostParams::default(), &deployment)
        .await
        .expect("Deployment");
    let set = |n: i32| {
        let api = api.clone();
        async move {
            let patch = Patch::Merge(json!({ "spec": { "replicas": n } }));
            api.patch_scale("w-buildkitd", &PatchParams::default(), &patch)
                .await
                .expect("scale");
        }
    };

    // The wake reads 0; the scaler then scales up to 3; the wake's write comes last.
    let read = api.get_scale("w-buildkitd").await.unwrap();
    set(3).await;
    let attempt = wake::scale_from_zero_as_read(&api, "w-buildkitd", &read).await;
    assert_eq!(attempt, Ok(None), "the write from a stale read is refused");
    assert_eq!(replicas(&client, &ns.name, "w").await, 3);
    // Read again, the workload already wants replicas and is left alone.
    let woke = wake::scale_from_zero(&api, "w-buildkitd").await;
    assert_eq!(woke, Ok(Woke::AlreadyWanted));
    assert_eq!(replicas(&client, &ns.name, "w").await, 3);

    // From zero, with nothing in between, a wake scales to one.
    set(0).await;
    let woke = wake::scale_from_zero(&api, "w-buildkitd").await;
    assert_eq!(woke, Ok(Woke::ScaledUp));
    assert_eq!(replicas(&client, &ns.name, "w").await, 1);
    ns.delete().await;
}
