//! The operator against a real API server (skipped without `BKPOOL_TEST_KUBECONFIG`): schema
//! refusals, the objects a pool produces and their owner references, updates, no writes
//! when nothing changed, replicas left to the scaler, semantic validation, host names claimed
//! by one pool only, garbage collection, and a wake that runs the operator's pod spec (the
//! real buildkitd, through the process kubelet) until it is Ready and serves mTLS.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use control::crd::{BuildKitPool, Phase};
use control::kubelet::Kubelet;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use support::*;

const WAIT: Duration = Duration::from_secs(20);

fn pool_json(name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "bkpool.dev/v1alpha1",
        "kind": "BuildKitPool",
        "metadata": { "name": name },
        "spec": spec,
    })
}

async fn create_pool(
    client: &Client,
    ns: &str,
    name: &str,
    spec: serde_json::Value,
) -> Result<BuildKitPool, kube::Error> {
    // Untyped, so the server (not serde) judges what the schema allows.
    let resource = kube::api::ApiResource::erase::<BuildKitPool>(&());
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
    let pool: kube::api::DynamicObject = serde_json::from_value(pool_json(name, spec)).unwrap();
    let created = api.create(&PostParams::default(), &pool).await?;
    Ok(serde_json::from_value(serde_json::to_value(created).unwrap()).unwrap())
}

/// Waits for the pool's status to reach `phase` for its current generation.
async fn wait_phase(
    client: &Client,
    ns: &str,
    name: &str,
    phase: Phase,
) -> control::crd::BuildKitPoolStatus {
    eventually(&format!("{name} {phase:?}"), WAIT, || async {
        let api: Api<BuildKitPool> = Api::namespaced(client.clone(), ns);
        let pool = api.get(name).await.ok()?;
        let status = pool.status?;
        (status.phase == Some(phase) && status.observed_generation == pool.metadata.generation)
            .then_some(status)
    })
    .await
}

/// resourceVersions of everything the pool owns, by kind/name.
async fn versions(client: &Client, ns: &str) -> BTreeMap<String, String> {
    let lp = ListParams::default().labels("app.kubernetes.io/managed-by=bkpool");
    let mut all = BTreeMap::new();
    macro_rules! collect {
        ($kind:ty, $label:expr) => {
            for o in Api::<$kind>::namespaced(client.clone(), ns)
                .list(&lp)
                .await
                .unwrap()
            {
                all.insert(
                    format!("{}/{}", $label, o.name_any()),
                    o.resource_version().unwrap(),
                );
            }
        };
    }
    collect!(Secret, "Secret");
    collect!(ConfigMap, "ConfigMap");
    collect!(Deployment, "Deployment");
    collect!(Service, "Service");
    collect!(NetworkPolicy, "NetworkPolicy");
    let pool_api: Api<BuildKitPool> = Api::namespaced(client.clone(), ns);
    for p in pool_api.list(&ListParams::default()).await.unwrap() {
        all.insert(
            format!("BuildKitPool/{}", p.name_any()),
            p.resource_version().unwrap(),
        );
    }
    all
}

#[tokio::test]
async fn the_server_refuses_pools_the_schema_forbids_and_fills_defaults() {
    let Some(client) = test_client().await else {
        return;
    };
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "bkp-schema").await;
    let refused = [
        ("neg", json!({"scaling": {"minReplicas": -1}})),
        ("toomany", json!({"scaling": {"maxReplicas": 1000}})),
        ("duration", json!({"scaling": {"idleAfter": "10 minutes"}})),
        ("kind", json!({"workload": {"kind": "Pod"}})),
        ("mode", json!({"gateway": {"mode": "tunnel"}})),
        (
            "issuer",
            json!({"auth": {"oidc": [{"issuer": "http://plain", "audiences": ["a"]}]}}),
        ),
        (
            "cron",
            json!({"scaling": {"warmWindows": [{"schedule": "daily", "duration": "1h", "minReplicas": 1}]}}),
        ),
    ];
    for (name, spec) in refused {
        let err = create_pool(&client, &ns.name, name, spec.clone())
            .await
            .expect_err(name);
        match err {
            kube::Error::Api(s) => assert_eq!(s.code, 422, "{name}: {s:?}"),
            other => panic!("{name}: {other}"),
        }
    }
    let pool = create_pool(&client, &ns.name, "ok", json!({}))
        .await
        .unwrap();
    assert_eq!(pool.spec.scaling.idle_after, "10m");
    assert_eq!(pool.spec.tls.client_cert_max_ttl, "1h");
    assert_eq!(
        pool.spec.workload.kind,
        control::crd::WorkloadKind::Deployment
    );
    ns.delete().await;
}

#[tokio::test]
async fn a_pool_becomes_its_objects_updates_them_and_then_writes_nothing() {
    let Some(client) = test_client().await else {
        return;
    };
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "bkp-objects").await;
    let controller = RunningController::start(&client, &ns.name);
    let spec = json!({"scaling": {"minReplicas": 1, "maxReplicas": 3}, "buildkitd": {"maxParallelism": 2}});
    let pool = create_pool(&client, &ns.name, "web", spec).await.unwrap();
    let uid = pool.uid().unwrap();

    let status = wait_phase(&client, &ns.name, "web", Phase::Waking).await;
    assert_eq!(
        status.endpoint.as_deref(),
        Some(format!("tcp://web.{}.svc:1234", ns.name).as_str())
    );
    for c in ["Validated", "PKIReady"] {
        assert_eq!(
            status.condition(c).unwrap().status,
            "True",
            "{c}: {status:?}"
        );
    }

    let owned = versions(&client, &ns.name).await;
    let expected = [
        "ConfigMap/web-buildkitd-config",
        "Deployment/web-buildkitd",
        "NetworkPolicy/web-buildkitd",
        "Secret/web-backend-ca",
        "Secret/web-buildkitd-tls",
        "Secret/web-client-ca",
        "Secret/web-gateway-backend-tls",
        "Secret/web-gateway-tls",
        "Service/web",
        "Service/web-buildkitd",
    ];
    for name in expected {
        assert!(owned.contains_key(name), "{name} missing: {owned:?}");
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let deployment = deployments.get("web-buildkitd").await.unwrap();
    let owner = &deployment.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("BuildKitPool", uid.as_str(), Some(true))
    );
    assert_eq!(
        deployment.spec.as_ref().unwrap().replicas,
        Some(1),
        "created with minReplicas"
    );
    let managers: Vec<String> = deployment
        .managed_fields()
        .iter()
        .filter(|m| m.manager.as_deref() != Some("kube-controller-manager"))
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        !managers.is_empty() && managers.iter().all(|m| m == "bkpool"),
        "one field manager besides the Deployment controller's status: {managers:?}"
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let gateway_tls = secrets.get("web-gateway-tls").await.unwrap();
    assert_eq!(gateway_tls.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = gateway_tls.data.unwrap();
    assert!(
        data.contains_key("tls.crt") && data.contains_key("tls.key") && data.contains_key("ca.crt")
    );

    // Settle, then poke the pool without changing its spec: a reconcile writes nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = versions(&client, &ns.name).await;
    let writes_before = total_writes(&controller);
    let runs_before = controller.metrics.reconciles("status");
    let pools: Api<BuildKitPool> = Api::namespaced(client.clone(), &ns.name);
    let touch = json!({"metadata": {"labels": {"touched": "yes"}}});
    pools
        .patch("web", &PatchParams::default(), &Patch::Merge(&touch))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut after = versions(&client, &ns.name).await;
    let mut before_no_pool = before.clone();
    before_no_pool.remove("BuildKitPool/web");
    after.remove("BuildKitPool/web");
    assert_eq!(after, before_no_pool, "an unchanged pool rewrote objects");
    assert_eq!(
        total_writes(&controller),
        writes_before,
        "an unchanged pool wrote"
    );
    assert!(
        controller.metrics.reconciles("status") > runs_before,
        "the touch did not reconcile"
    );

    // The scaler's replicas survive a spec change; the spec change reaches the objects.
    let scale = json!({"spec": {"replicas": 3}});
    deployments
        .patch_scale(
            "web-buildkitd",
            &PatchParams::default(),
            &Patch::Merge(&scale),
        )
        .await
        .unwrap();
    let change = json!({"spec": {"workload": {"image": "moby/buildkit:v0.18.0-rootless"}, "buildkitd": {"maxParallelism": 7}}});
    pools
        .patch("web", &PatchParams::default(), &Patch::Merge(&change))
        .await
        .unwrap();
    let configs: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    eventually("config updated", WAIT, || async {
        let cm = configs.get("web-buildkitd-config").await.ok()?;
        cm.data?
            .get("buildkitd.toml")?
            .contains("max-parallelism = 7")
            .then_some(())
    })
    .await;
    let updated = eventually("image updated", WAIT, || async {
        let d = deployments.get("web-buildkitd").await.ok()?;
        let image = d.spec.as_ref()?.template.spec.as_ref()?.containers[0]
            .image
            .clone()?;
        (image == "moby/buildkit:v0.18.0-rootless").then_some(d)
    })
    .await;
    assert_eq!(
        updated.spec.as_ref().unwrap().replicas,
        Some(3),
        "replicas belong to the scaler"
    );
    let status = wait_phase(&client, &ns.name, "web", Phase::Waking).await;
    assert_eq!(status.replicas, Some(3));
    controller.stop().await;
    ns.delete().await;
}

#[tokio::test]
async fn a_pool_created_awake_gets_one_pod_template_with_its_real_hashes() {
    let Some(client) = test_client().await else {
        return;
    };
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "bkp-awake").await;
    let controller = RunningController::start(&client, &ns.name);
    let spec = json!({"scaling": {"minReplicas": 1}});
    create_pool(&client, &ns.name, "awake", spec).await.unwrap();
    wait_phase(&client, &ns.name, "awake", Phase::Waking).await;
    // Give a second revision, if one is coming, time to arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let deployment = deployments.get("awake-buildkitd").await.unwrap();
    let template = deployment.spec.unwrap().template.metadata.unwrap();
    let annotations = template.annotations.unwrap();
    let configs: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let config = configs.get("awake-buildkitd-config").await.unwrap();
    let toml = &config.data.unwrap()["buildkitd.toml"];
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let tls = secrets.get("awake-buildkitd-tls").await.unwrap();
    let cert = &tls.data.unwrap()["tls.crt"].0;
    use control::operator::objects::content_hash;
    assert_eq!(
        annotations["bkpool.dev/config-hash"],
        content_hash(&[toml.as_bytes()]),
        "the hash of the configuration the pod reads"
    );
    assert_eq!(annotations["bkpool.dev/tls-hash"], content_hash(&[cert]));
    // One revision of the pod template: the first pod is not replaced a moment later.
    assert_eq!(deployment.metadata.generation, Some(1), "{annotations:?}");
    let sets: Api<k8s_openapi::api::apps::v1::ReplicaSet> =
        Api::namespaced(client.clone(), &ns.name);
    let revisions = sets.list(&ListParams::default()).await.unwrap().items.len();
    assert_eq!(revisions, 1, "ReplicaSets of the Deployment");
    controller.stop().await;
    ns.delete().await;
}

#[tokio::test]
async fn an_invalid_pool_is_reported_and_creates_nothing() {
    let Some(client) = test_client().await else {
        return;
    };
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "bkp-invalid").await;
    let controller = RunningController::start(&client, &ns.name);
    let spec =
        json!({"scaling": {"minReplicas": 3, "maxReplicas": 2}, "tls": {"rotateBefore": "60d"}});
    create_pool(&client, &ns.name, "bad", spec).await.unwrap();
    let status = wait_phase(&client, &ns.name, "bad", Phase::Degraded).await;
    let validated = status.condition("Validated").unwrap();
    assert_eq!(
        (validated.status.as_str(), validated.reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert!(
        validated
            .message
            .contains("spec.scaling.minReplicas: 3 exceeds maxReplicas 2"),
        "{}",
        validated.message
    );
    assert!(
        validated.message.contains("spec.tls.rotateBefore"),
        "{}",
        validated.message
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let event = eventually("InvalidSpec event", WAIT, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("InvalidSpec"))
    })
    .await;
    assert!(event.note.unwrap().contains("minReplicas"));
    let owned = versions(&client, &ns.name).await;
    assert_eq!(
        owned.keys().collect::<Vec<_>>(),
        ["BuildKitPool/bad"],
        "nothing made for an invalid pool"
    );

    // Fixing the spec makes the pool.
    let pools: Api<BuildKitPool> = Api::namespaced(client.clone(), &ns.name);
    let fix = json!({"spec": {"scaling": {"minReplicas": 0}, "tls": {"rotateBefore": "7d"}}});
    pools
        .patch("bad", &PatchParams::default(), &Patch::Merge(&fix))
        .await
        .unwrap();
    wait_phase(&client, &ns.name, "bad", Phase::Sleeping).await;
    controller.stop().await;
    ns.delete().await;
}

/// The `HostsAccepted` condition of `name` once it has status `want`.
async fn wait_hosts(
    client: &Client,
    ns: &str,
    name: &str,
    want: &str,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    eventually(&format!("{name} HostsAccepted {want}"), WAIT, || async {
        let api: Api<BuildKitPool> = Api::namespaced(client.clone(), ns);
        let status = api.get(name).await.ok()?.status?;
        status
            .condition("HostsAccepted")
            .filter(|c| c.status == want)
            .cloned()
    })
    .await
}

#[tokio::test]
async fn a_host_name_routes_to_one_pool_and_a_refused_claim_is_reported() {
    let Some(client) = test_client().await else {
        return;
    };
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "bkp-hosts").await;
    let controller = RunningController::start(&client, &ns.name);
    let hosts = |names: &[&str]| json!({"gateway": {"mode": "passthrough", "hosts": names}});
    create_pool(&client, &ns.name, "first", hosts(&["build.example.com"]))
        .await
        .unwrap();
    wait_phase(&client, &ns.name, "first", Phase::Sleeping).await;
    create_pool(
        &client,
        &ns.name,
        "second",
        hosts(&["build.example.com", "second.example.com"]),
    )
    .await
    .unwrap();
    let refused = wait_hosts(&client, &ns.name, "second", "False").await;
    assert_eq!(refused.reason, "HostConflict");
    let holder = format!(
        "spec.gateway.hosts[0]: build.example.com already routes to pool {}/first",
        ns.name
    );
    assert_eq!(refused.message, holder);
    // The rest of the pool is served: only the contested name is refused.
    wait_phase(&client, &ns.name, "second", Phase::Sleeping).await;
    assert_eq!(
        wait_hosts(&client, &ns.name, "first", "True").await.reason,
        "HostsRouted"
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    eventually("HostConflict event", WAIT, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("HostConflict"))
    })
    .await;

    // Another namespace's Service name is not this namespace's to claim.
    create_pool(&client, &ns.name, "takeover", hosts(&["ci.default.svc"]))
        .await
        .unwrap();
    let status = wait_phase(&client, &ns.name, "takeover", Phase::Degraded).await;
    let validated = status.condition("Validated").unwrap();
    assert!(
        validated.message.contains("spec.gateway.hosts[0]")
            && validated.message.contains("namespace \"default\""),
        "{}",
        validated.message
    );

    // The holder goes: the name passes to the pool that asked next, without waiting for a
    // periodic resync.
    let pools: Api<BuildKitPool> = Api::namespaced(client.clone(), &ns.name);
    pools
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    wait_hosts(&client, &ns.name, "second", "True").await;
    controller.stop().await;
    ns.delete().await;
}

#[tokio::test]
async fn deleting_a_pool_collects_everything_it_owned() {
    let Some(client) = test_client().await else {
        return;
    };
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "bkp-gc").await;
    let controller = RunningController::start(&client, &ns.name);
    create_pool(
        &client,
        &ns.name,
        "gone",
        json!({"workload": {"kind": "StatefulSet", "cache": {"size": "1Gi"}}}),
    )
    .await
    .unwrap();
    wait_phase(&client, &ns.name, "gone", Phase::Sleeping).await;
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let backend = services.get("gone-buildkitd").await.unwrap();
    assert_eq!(
        backend.spec.unwrap().cluster_ip.as_deref(),
        Some("None"),
        "headless for a StatefulSet"
    );
    assert!(versions(&client, &ns.name).await.len() > 5);
    let pools: Api<BuildKitPool> = Api::namespaced(client.clone(), &ns.name);
    pools
        .delete("gone", &DeleteParams::background())
        .await
        .unwrap();
    eventually("garbage collection", Duration::from_secs(60), || async {
        let left = versions(&client, &ns.name).await;
        left.is_empty().then_some(())
    })
    .await;
    controller.stop().await;
    ns.delete().await;
}

#[tokio::test]
async fn a_woken_pool_runs_a_real_buildkitd_with_its_tls_and_config_and_becomes_ready() {
    let Some(client) = test_client().await else {
        return;
    };
    let Some(buildkit) = control::testkit::buildkit() else {
        return;
    };
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "bkp-wake").await;
    let controller = RunningController::start(&client, &ns.name);
    let kubelet = Kubelet::builder(client.clone(), &ns.name)
        .buildkit(&buildkit)
        .start();
    // Privileged: the process kubelet runs every container as root.
    let spec = json!({"workload": {"security": "Privileged"}, "buildkitd": {"maxParallelism": 3}});
    create_pool(&client, &ns.name, "w", spec).await.unwrap();
    wait_phase(&client, &ns.name, "w", Phase::Sleeping).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let scale = |n: i32| json!({"spec": {"replicas": n}});
    deployments
        .patch_scale(
            "w-buildkitd",
            &PatchParams::default(),
            &Patch::Merge(&scale(1)),
        )
        .await
        .unwrap();

    // The operator's pod spec, run as it is: buildkitd answers its readiness probe.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let diagnose = async || {
        let listed = pods.list(&ListParams::default()).await.unwrap();
        let statuses: Vec<_> = listed.items.iter().map(|p| &p.status).collect();
        format!("pods: {statuses:#?}\nlogs:\n{}", kubelet.logs())
    };
    let ready = tokio::time::timeout(
        WAIT * 3,
        eventually("the pool Ready", WAIT * 4, || async {
            let pool = Api::<BuildKitPool>::namespaced(client.clone(), &ns.name)
                .get("w")
                .await
                .ok()?;
            let status = pool.status?;
            (status.phase == Some(Phase::Ready)).then_some(status)
        }),
    )
    .await;
    let Ok(status) = ready else {
        panic!("the pool not Ready: {}", diagnose().await);
    };
    assert_eq!((status.replicas, status.ready_replicas), (Some(1), Some(1)));
    assert_eq!(status.condition("Ready").unwrap().status, "True");
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    eventually("Waking event", WAIT, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("Waking"))
            .then_some(())
    })
    .await;

    // It serves mTLS with the pool's backend certificate, to the gateway's backend
    // certificate only, with the configuration the operator rendered.
    let pod = pods
        .list(&ListParams::default().labels("bkpool.dev/pool=w"))
        .await
        .unwrap();
    let ip = pod.items[0]
        .status
        .as_ref()
        .unwrap()
        .pod_ip
        .clone()
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let tls = tempfile::tempdir().unwrap();
    let backend = secrets.get("w-gateway-backend-tls").await.unwrap();
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        let data = &backend.data.as_ref().unwrap()[key].0;
        std::fs::write(tls.path().join(key), data).unwrap();
    }
    let workers = |with_cert: bool| {
        let mut command = tokio::process::Command::new(&buildkit.buildctl);
        command
            .arg("--addr")
            .arg(format!("tcp://{ip}:1234"))
            .arg("--tlsservername")
            .arg(format!("w-buildkitd.{}.svc", ns.name))
            .arg("--tlscacert")
            .arg(tls.path().join("ca.crt"));
        if with_cert {
            command
                .arg("--tlscert")
                .arg(tls.path().join("tls.crt"))
                .arg("--tlskey")
                .arg(tls.path().join("tls.key"));
        }
        command.args(["debug", "workers", "--verbose"]).output()
    };
    let served = workers(true).await.unwrap();
    let listing = String::from_utf8_lossy(&served.stdout);
    assert!(
        served.status.success() && listing.contains("ID:"),
        "{listing}{}\n{}",
        String::from_utf8_lossy(&served.stderr),
        kubelet.logs()
    );
    let refused = workers(false).await.unwrap();
    assert!(
        !refused.status.success(),
        "no client certificate, no service"
    );
    let config = kubelet.logs();
    assert!(!config.contains("level=error"), "{config}");

    // Scaled to zero, the kubelet stops buildkitd and the pool sleeps.
    deployments
        .patch_scale(
            "w-buildkitd",
            &PatchParams::default(),
            &Patch::Merge(&scale(0)),
        )
        .await
        .unwrap();
    wait_phase(&client, &ns.name, "w", Phase::Sleeping).await;
    eventually("the pod gone", WAIT, || async {
        let left = pods
            .list(&ListParams::default().labels("bkpool.dev/pool=w"))
            .await
            .ok()?;
        left.items.is_empty().then_some(())
    })
    .await;
    controller.stop().await;
    ns.delete_after(kubelet).await;
}

fn total_writes(controller: &RunningController) -> u64 {
    [
        "pki",
        "buildkitd",
        "workload",
        "service",
        "netpol",
        "status",
    ]
    .iter()
    .map(|r| controller.metrics.writes(r))
    .sum()
}

#[tokio::test]
async fn certificates_rotate_with_an_overlapping_trust_bundle() {
    let Some(client) = test_client().await else {
        return;
    };
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "bkp-rotate").await;
    let controller = RunningController::start(&client, &ns.name);
    // A 12 s CA: its successor is published at 8 s left and takes over at 4 s left.
    let tls = json!({"caLifetime": "12s", "serverCertLifetime": "6s", "rotateBefore": "4s", "clientCertMaxTTL": "5s"});
    create_pool(&client, &ns.name, "r", json!({ "tls": tls }))
        .await
        .unwrap();
    wait_phase(&client, &ns.name, "r", Phase::Sleeping).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let text =
        |s: &Secret, key: &str| String::from_utf8(s.data.as_ref().unwrap()[key].0.clone()).unwrap();
    let first = secrets.get("r-client-ca").await.unwrap();
    let first_ca = text(&first, "ca.crt");

    // The successor appears in the bundle while the first CA still issues.
    let published = eventually("successor published", WAIT, || async {
        let s = secrets.get("r-client-ca").await.ok()?;
        s.data.as_ref()?.contains_key("next.crt").then_some(s)
    })
    .await;
    assert_eq!(text(&published, "ca.crt"), first_ca);
    let next_ca = text(&published, "next.crt");
    assert!(text(&published, "ca-bundle.crt").contains(&next_ca));
    // The same round writes the leaves' bundles just after the CA Secret.
    let gateway = eventually("peers trust the successor", WAIT, || async {
        let s = secrets.get("r-gateway-tls").await.ok()?;
        text(&s, "ca.crt").contains(&next_ca).then_some(s)
    })
    .await;
    let issuer =
        control::pki::inspect::CertInfo::from_pem(&first_ca, std::path::Path::new("ca")).unwrap();
    let leaf = control::pki::inspect::CertInfo::from_pem(
        &text(&gateway, "tls.crt"),
        std::path::Path::new("tls"),
    )
    .unwrap();
    let (a, b) = (std::path::Path::new("a"), std::path::Path::new("b"));
    // The CA Secret is written before the leaves: while it still names the first CA,
    // every leaf read before it was issued by that CA.
    let still_first = text(&secrets.get("r-client-ca").await.unwrap(), "ca.crt") == first_ca;
    if still_first {
        assert!(
            leaf.check_issued_by(&issuer.der, a, b).is_ok(),
            "the successor issued before taking over"
        );
    }

    // Then it takes over, and the old CA stays trusted until it expires.
    let rotated = eventually("successor issuing", WAIT, || async {
        let s = secrets.get("r-client-ca").await.ok()?;
        (text(&s, "ca.crt") == next_ca).then_some(s)
    })
    .await;
    assert!(
        text(&rotated, "ca-bundle.crt").contains(&first_ca),
        "old CA dropped too early"
    );
    let reissued = eventually("gateway certificate from the new CA", WAIT, || async {
        let s = secrets.get("r-gateway-tls").await.ok()?;
        let cert = text(&s, "tls.crt");
        let info =
            control::pki::inspect::CertInfo::from_pem(&cert, std::path::Path::new("tls.crt"))
                .ok()?;
        let ca =
            control::pki::inspect::CertInfo::from_pem(&next_ca, std::path::Path::new("ca.crt"))
                .ok()?;
        info.check_issued_by(
            &ca.der,
            std::path::Path::new("a"),
            std::path::Path::new("b"),
        )
        .ok()
        .map(|()| s)
    })
    .await;
    assert!(text(&reissued, "ca.crt").contains(&next_ca));
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let rotations = events.list(&ListParams::default()).await.unwrap().items;
    let rotations: Vec<_> = rotations
        .iter()
        .filter(|e| e.reason.as_deref() == Some("CertificateRotated"))
        .collect();
    assert!(!rotations.is_empty(), "no CertificateRotated event");
    controller.stop().await;
    ns.delete().await;
}

#[tokio::test]
async fn a_job_pool_runs_one_job_per_wake_and_sleeps_when_they_are_deleted() {
    let Some(client) = test_client().await else {
        return;
    };
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "bkp-job").await;
    let controller = RunningController::start(&client, &ns.name);
    let pool = create_pool(&client, &ns.name, "j", json!({"workload": {"kind": "Job"}}))
        .await
        .unwrap();
    wait_phase(&client, &ns.name, "j", Phase::Sleeping).await;
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client.clone(), &ns.name);
    assert!(
        jobs.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "a sleeping Job pool runs nothing"
    );

    control::operator::workload::start_wake_job(&client, &pool, "w1")
        .await
        .unwrap();
    control::operator::workload::start_wake_job(&client, &pool, "w1")
        .await
        .unwrap();
    let job = jobs.get("j-buildkitd-w1").await.unwrap();
    assert_eq!(job.owner_references()[0].kind, "BuildKitPool");
    // The Job controller starts its pod (Pending, but active): the pool is waking.
    let status = wait_phase(&client, &ns.name, "j", Phase::Waking).await;
    assert_eq!(status.replicas, Some(1));

    let deleted = control::operator::workload::delete_wake_jobs(&client, &pool)
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    wait_phase(&client, &ns.name, "j", Phase::Sleeping).await;
    controller.stop().await;
    ns.delete().await;
}
