//! Kubernetes end to end with the real BuildKit (skipped without `BKPOOL_TEST_KUBECONFIG`,
//! BuildKit or a static busybox), once per workload kind: the operator (`bkpool controller`)
//! reconciles a sleeping pool; the process kubelet runs the pod spec it generates, so a real
//! buildkitd starts with the operator's TLS Secret and `buildkitd.toml`; a real `buildctl
//! build`, with a certificate signed by the pool's client CA Secret, goes through `bkpool
//! gateway --kubernetes`, which wakes the pool from zero while it holds the connection. Then
//! the pool goes idle, is drained and scaled to zero (every pod gone), and the next build
//! wakes it again. A StatefulSet keeps its cache on its claim across sleep (the second build
//! is `CACHED`); a Deployment's cache is an `emptyDir` and goes with its pod. The wake does
//! not wait for Kubernetes to mark the pod Ready: the gateway probes a Running pod itself.

#[path = "../control/tests/support/mod.rs"]
mod cluster;
mod support;

use std::time::Duration;

use cluster::{TestNamespace, eventually, install_crd, test_client};
use control::crd::{BuildKitPool, Phase};
use control::kubelet::Kubelet;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Client;
use kube::api::{Api, ListParams};
use serde_json::json;
use support::buildkit::{self, Context, Endpoint};
use support::k8s::{
    Controller, admin_kubeconfig, client_tlsdir, create_sleeping_pool, published_gateway,
    slow_buildkitd,
};

const WAIT: Duration = Duration::from_secs(90);
const POOL: &str = "bk";

async fn phase(client: &Client, ns: &str) -> Option<Phase> {
    let pools: Api<BuildKitPool> = Api::namespaced(client.clone(), ns);
    pools.get(POOL).await.ok()?.status?.phase
}

async fn pods(client: &Client, ns: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.list(&ListParams::default()).await.unwrap().items
}

/// A build through the gateway must succeed; on failure, say what the cluster saw.
async fn build(
    tools: &(control::testkit::BuildKit, std::path::PathBuf),
    endpoint: &Endpoint,
    context: &Context,
    greeting: &str,
    kubelet: &Kubelet,
    gateway: &support::Listening,
) -> String {
    let (output, out) = context.build(&tools.0, endpoint).await;
    let built = std::fs::read_to_string(out.path().join("out.txt")).unwrap_or_default();
    assert!(
        output.status.success() && built == Context::expected(greeting),
        "build through the gateway: {}\nout.txt: {built:?}\ngateway log:\n{}\nkubelet:\n{}",
        buildkit::describe(&output),
        gateway.log.lock().unwrap().join("\n"),
        kubelet.logs()
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Builds through a pool of `kind` woken from zero, lets it sleep, builds again; returns the
/// second build's progress output. With `ready_never`, the kubelet never passes a readiness
/// probe: the pods serve without ever being Ready.
async fn build_sleep_build(
    kind: &str,
    n: u8,
    workload: serde_json::Value,
    ready_never: bool,
) -> Option<String> {
    let client = test_client().await?;
    let tools = buildkit::tools()?;
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, &format!("bkp-bk-{}", kind.to_lowercase())).await;
    let dir = tempfile::tempdir().unwrap();
    // Admin needs no separate namespace for the gateway's Secret copies: the pool's will do.
    let controller = Controller::start(
        &ns.name,
        &ns.name,
        &admin_kubeconfig(),
        &dir.path().join("controller.log"),
    );

    let mut workload = workload;
    workload["kind"] = json!(kind);
    workload["security"] = json!("Privileged");
    let spec = json!({"scaling": {"idleAfter": "2s", "minUpAfterWake": "0s", "wakeTimeout": "60s"},
                      "workload": workload});
    create_sleeping_pool(&client, &ns.name, POOL, spec).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);

    let mut kubelet = Kubelet::builder(client.clone(), &ns.name).buildkit(&tools.0);
    if ready_never {
        kubelet = kubelet.readiness_never_passes();
    }
    let kubelet = kubelet.start();
    let gateway = published_gateway(&client, &ns.name, n, &admin_kubeconfig(), dir.path()).await;

    let client_ca = secrets.get(&format!("{POOL}-client-ca")).await.unwrap();
    let endpoint = Endpoint {
        server_name: Some(format!("{POOL}.{}.svc", ns.name)),
        ..Endpoint::tls(
            gateway.listen,
            &client_tlsdir(&client_ca, &ns.name, POOL, dir.path()),
        )
    };
    let context = Context::new(&tools.1, kind, "");

    // Cold: nothing runs until the gateway, holding buildctl's connection, wakes the pool.
    assert!(pods(&client, &ns.name).await.is_empty(), "asleep: no pod");
    build(&tools, &endpoint, &context, kind, &kubelet, &gateway).await;
    if ready_never {
        let ready = pods(&client, &ns.name).await.iter().any(|p| {
            let conditions = p.status.as_ref().and_then(|s| s.conditions.as_ref());
            conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        });
        assert!(!ready, "served by a pod that was never Ready");
    }

    // Idle: drained, scaled to zero, every pod gone (its processes stopped by the kubelet).
    eventually("the pool asleep again, no pod left", WAIT, || async {
        (phase(&client, &ns.name).await? == Phase::Sleeping).then_some(())?;
        pods(&client, &ns.name).await.is_empty().then_some(())
    })
    .await;

    // And woken again by the next build.
    let second = build(&tools, &endpoint, &context, kind, &kubelet, &gateway).await;

    drop((controller, gateway));
    ns.delete_after(kubelet).await;
    Some(second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deployment_pool_builds_from_zero_sleeps_and_builds_again() {
    let Some(second) = build_sleep_build("Deployment", 10, json!({}), false).await else {
        return;
    };
    // Its cache is an emptyDir: gone with the pod that slept.
    assert!(!second.contains("CACHED"), "{second}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_statefulset_pool_keeps_its_cache_across_sleep() {
    let workload = json!({"cache": {"size": "1Gi"}});
    let Some(second) = build_sleep_build("StatefulSet", 11, workload, false).await else {
        return;
    };
    assert!(
        second.contains("CACHED"),
        "a cache hit after sleep: {second}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_pool_builds_from_zero_sleeps_and_builds_again() {
    build_sleep_build("Job", 12, json!({}), false).await;
}

/// Kubernetes' readiness probe (at best once a second, the operator's 2 s after start) is not
/// on the wake path: the gateway probes a Running pod itself, so a pod whose probe never
/// passed still serves the build that woke it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wake_does_not_wait_for_kubernetes_readiness() {
    build_sleep_build("Deployment", 13, json!({}), true).await;
}

/// How long a slow pod's buildkitd takes to start: a node being added or an image pulled.
const SLOW_START: Duration = Duration::from_secs(30);

/// A first build through a Deployment pool at zero whose container starts buildkitd only
/// after [`SLOW_START`] (the kubelet runs a wrapper for the image), with the gateway answering
/// the held HTTP/2 preface or not. Returns the build's output and how long it took.
async fn slow_wake(n: u8, preface: bool) -> Option<(std::process::Output, Duration)> {
    let client = test_client().await?;
    let tools = buildkit::tools()?;
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, &format!("bkp-slow-{preface}")).await;
    let dir = tempfile::tempdir().unwrap();
    let controller = Controller::start(
        &ns.name,
        &ns.name,
        &admin_kubeconfig(),
        &dir.path().join("controller.log"),
    );
    let spec = json!({"scaling": {"wakeTimeout": "90s"},
                      "gateway": {"prefaceWhileWaking": preface},
                      "workload": {"security": "Privileged"}});
    create_sleeping_pool(&client, &ns.name, POOL, spec).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);

    let slow = slow_buildkitd(&tools.0.buildkitd, SLOW_START, dir.path());
    let kubelet = Kubelet::builder(client.clone(), &ns.name)
        .image("moby/buildkit", &slow)
        .programs(tools.0.bin_dir())
        .start();
    let gateway = published_gateway(&client, &ns.name, n, &admin_kubeconfig(), dir.path()).await;
    let client_ca = secrets.get(&format!("{POOL}-client-ca")).await.unwrap();
    let endpoint = Endpoint {
        server_name: Some(format!("{POOL}.{}.svc", ns.name)),
        ..Endpoint::tls(
            gateway.listen,
            &client_tlsdir(&client_ca, &ns.name, POOL, dir.path()),
        )
    };
    let context = Context::new(&tools.1, "after a slow wake", "");
    let began = std::time::Instant::now();
    let (output, _) = context.build(&tools.0, &endpoint).await;
    let took = began.elapsed();
    if preface && !output.status.success() {
        panic!(
            "build through the gateway: {}\ngateway log:\n{}\nkubelet:\n{}",
            buildkit::describe(&output),
            gateway.log.lock().unwrap().join("\n"),
            kubelet.logs()
        );
    }
    drop((controller, gateway));
    ns.delete_after(kubelet).await;
    Some((output, took))
}

/// A wake of 30 s, past the 20 s BuildKit's client waits for the server's preface: the gateway
/// answers it while holding the connection, so the first build succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_build_outlasts_a_thirty_second_wake() {
    let Some((output, took)) = slow_wake(14, true).await else {
        return;
    };
    assert!(output.status.success());
    assert!(took >= SLOW_START, "it waited for buildkitd ({took:?})");
}

/// The same wake with `prefaceWhileWaking: false`: the client's own deadline ends the build
/// before buildkitd is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_answered_preface_the_same_first_build_fails() {
    let Some((output, took)) = slow_wake(15, false).await else {
        return;
    };
    assert!(!output.status.success(), "{}", buildkit::describe(&output));
    assert!(took < SLOW_START, "the client gave up first ({took:?})");
}
