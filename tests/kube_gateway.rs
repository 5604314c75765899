//! End to end on a real API server (skipped without `BKPOOL_TEST_KUBECONFIG` or BuildKit):
//! two `bkpool gateway --kubernetes` processes, running as the gateway ServiceAccount with the
//! RBAC from `deploy/`, serve a pool the operator reconciled. A client connection to the
//! sleeping pool is held while the gateway scales the workload up through `/scale`; the process
//! kubelet runs the operator's pod (the real buildkitd, mTLS with the pool's backend
//! certificate), and the held connection reaches it. Then the pool goes idle, the controller
//! drains it through its status, every gateway acknowledges, and it is scaled to zero; the next
//! connection wakes it again.

#[path = "../control/tests/support/mod.rs"]
mod cluster;
mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cluster::{
    TestNamespace, deployed_namespaces, eventually, install_crd, install_rbac_in,
    service_account_token, test_client, test_config,
};
use control::crd::{BuildKitPool, Phase};
use control::kubelet::Kubelet;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::http_get;
use support::k8s::{
    Controller, client_tlsdir, free_ports, kubeconfig_with_token, loopback, publish_gateways,
    start_ready_gateway,
};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(60);
const POOL: &str = "e2e";

/// A client of the pool: a certificate from the pool's client CA, trusting that CA.
fn client_config(client_ca: &Secret, ns: &str, dir: &Path) -> Arc<rustls::ClientConfig> {
    support::local::client_config(&client_tlsdir(client_ca, ns, POOL, dir))
}

/// Connects through `gateway` as a pool client and starts HTTP/2 as buildctl does.
async fn h2_hello(
    gateway: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    ns: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let name = format!("{POOL}.{ns}.svc");
    tokio::time::timeout(WAIT, support::k8s::h2_hello(gateway, config, &name))
        .await
        .expect("an answer within the wake timeout")
}

async fn replicas(client: &Client, ns: &str) -> i32 {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let scale = deployments
        .get_scale(&format!("{POOL}-buildkitd"))
        .await
        .unwrap();
    scale.spec.and_then(|s| s.replicas).unwrap_or(0)
}

async fn metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, text) = http_get(admin, "/metrics").await;
    support::metrics::sample(&text, name, labels).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_connection_wakes_the_pool_and_an_idle_pool_drains_to_zero() {
    let Some(client) = test_client().await else {
        return;
    };
    let Some(_) = test_config().await else {
        return;
    };
    let Some(buildkit) = control::testkit::buildkit() else {
        return;
    };
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "bkp-e2e").await;
    let dir = tempfile::tempdir().unwrap();
    // The gateway's Secrets are published in a namespace of their own.
    let published = TestNamespace::create(&client, "bkp-e2e-gws").await;
    let moves = deployed_namespaces(&ns.name, &published.name);
    let gateway_role = install_rbac_in(&client, &moves, &ns.name, "rbac-gateway.yaml").await;
    let controller_role = install_rbac_in(&client, &moves, &ns.name, "rbac-controller.yaml").await;
    let gateway_kubeconfig = kubeconfig_with_token(
        &dir.path().join("gateway.kubeconfig"),
        &service_account_token(&client, &ns.name, "bkpool-gateway").await,
    );

    // The operator (reconcilers and scaler) as a real process, as its own ServiceAccount.
    let controller_kubeconfig = {
        let token = service_account_token(&client, &ns.name, "bkpool-controller").await;
        kubeconfig_with_token(&dir.path().join("controller.kubeconfig"), &token)
    };
    let controller = Controller::start(
        &ns.name,
        &published.name,
        &controller_kubeconfig,
        &dir.path().join("controller.log"),
    );

    let pools: Api<BuildKitPool> = Api::namespaced(client.clone(), &ns.name);
    let pool: BuildKitPool = serde_json::from_value(json!({
        "apiVersion": "bkpool.dev/v1alpha1", "kind": "BuildKitPool", "metadata": {"name": POOL},
        "spec": {"scaling": {"idleAfter": "2s", "minUpAfterWake": "0s", "wakeTimeout": "60s"},
                 "workload": {"security": "Privileged"}}
    }))
    .unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    eventually("the pool asleep with its certificates", WAIT, || async {
        let status = pools.get(POOL).await.ok()?.status?;
        (status.phase == Some(Phase::Sleeping)).then_some(())?;
        secrets
            .get(&format!("{POOL}-gateway-backend-tls"))
            .await
            .ok()
    })
    .await;

    // Two gateway replicas on their own loopback addresses, same ports.
    let (g1, g2) = (loopback(0, 1), loopback(0, 2));
    let ports = free_ports(g1);
    let gateways = [
        start_ready_gateway(
            g1,
            ports,
            &ns.name,
            &published.name,
            &gateway_kubeconfig,
            dir.path(),
        )
        .await,
        start_ready_gateway(
            g2,
            ports,
            &ns.name,
            &published.name,
            &gateway_kubeconfig,
            dir.path(),
        )
        .await,
    ];
    publish_gateways(&client, &ns.name, &[g1, g2], ports.1).await;

    let client_ca = secrets.get(&format!("{POOL}-client-ca")).await.unwrap();
    let config = client_config(&client_ca, &ns.name, dir.path());

    // A connection to the sleeping pool is held while the gateway wakes it.
    assert_eq!(replicas(&client, &ns.name).await, 0);
    let held = tokio::spawn({
        let (config, ns) = (config.clone(), ns.name.clone());
        async move { h2_hello(gateways_listen(g1, ports.0), &config, &ns).await }
    });
    eventually("the gateway scaled the workload up", WAIT, || async {
        (replicas(&client, &ns.name).await == 1).then_some(())
    })
    .await;
    let (_, activity) = http_get(gateways[0].admin, "/activity").await;
    assert!(activity.contains("\"held\":1"), "{activity}");
    // Only now does anything run pods: the connection was held until here.
    let kubelet = Kubelet::builder(client.clone(), &ns.name)
        .buildkit(&buildkit)
        .start();
    let first = tokio::time::timeout(WAIT, held)
        .await
        .expect("the held connection was served")
        .unwrap();
    assert_eq!(
        metric(
            gateways[0].admin,
            "bkpool_gateway_wake_requests_total",
            &[("result", "scaled_up")]
        )
        .await,
        1.0
    );
    // The other replica routes at once: its pod watch saw the same pod.
    let second = h2_hello(gateways_listen(g2, ports.0), &config, &ns.name).await;
    eventually("the pool Ready", WAIT, || async {
        let status = pools.get(POOL).await.ok()?.status?;
        (status.phase == Some(Phase::Ready)).then_some(())
    })
    .await;

    // Open connections keep it awake past idleAfter.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        replicas(&client, &ns.name).await,
        1,
        "busy pools stay up; gateway logs:\n{}\n---\n{}\ncontroller:\n{}",
        gateways[0].log.lock().unwrap().join("\n"),
        gateways[1].log.lock().unwrap().join("\n"),
        std::fs::read_to_string(dir.path().join("controller.log")).unwrap_or_default()
    );
    drop((first, second));

    // Idle: drained through the status, acknowledged by both gateways, scaled to zero.
    eventually("the pool drained and scaled to zero", WAIT, || async {
        (replicas(&client, &ns.name).await == 0).then_some(())
    })
    .await;
    eventually(
        "the pool Sleeping, its drain mark cleared",
        WAIT,
        || async {
            let status = pools.get(POOL).await.ok()?.status?;
            (status.phase == Some(Phase::Sleeping) && status.draining_since.is_none()).then_some(())
        },
    )
    .await;
    for g in &gateways {
        let (_, activity) = http_get(g.admin, "/activity").await;
        assert!(
            !activity.contains("draining"),
            "mark cleared on every gateway: {activity}"
        );
    }

    // The next connection, through the other replica, wakes it again.
    let again = tokio::spawn({
        let (config, ns) = (config.clone(), ns.name.clone());
        async move { h2_hello(gateways_listen(g2, ports.0), &config, &ns).await }
    });
    eventually("woken again", WAIT, || async {
        (replicas(&client, &ns.name).await == 1).then_some(())
    })
    .await;
    drop(
        tokio::time::timeout(WAIT, again)
            .await
            .expect("served after the second wake"),
    );

    // The gateway's ServiceAccount may do its job and nothing more.
    let sa_client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&gateway_kubeconfig).unwrap(),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    let forbidden = |r: Result<(), kube::Error>, what: &str| match r {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{what}: {s:?}"),
        other => panic!("{what}: expected 403, got {other:?}"),
    };
    let sa_deployments: Api<Deployment> = Api::namespaced(sa_client.clone(), &ns.name);
    forbidden(
        sa_deployments
            .delete(&format!("{POOL}-buildkitd"), &DeleteParams::default())
            .await
            .map(drop),
        "delete a workload",
    );
    let sa_pools: Api<BuildKitPool> = Api::namespaced(sa_client.clone(), &ns.name);
    forbidden(
        sa_pools
            .patch_status(
                POOL,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Ready"}})),
            )
            .await
            .map(drop),
        "write a pool's status",
    );
    let sa_secrets: Api<Secret> = Api::namespaced(sa_client.clone(), &ns.name);
    forbidden(
        sa_secrets.get(&format!("{POOL}-client-ca")).await.map(drop),
        "get a CA Secret",
    );
    forbidden(
        sa_secrets.list(&ListParams::default()).await.map(drop),
        "list the Secrets of a pool's namespace (CA keys)",
    );
    let sa_pods: Api<Pod> = Api::namespaced(sa_client, &ns.name);
    forbidden(
        sa_pods
            .delete("anything", &DeleteParams::default())
            .await
            .map(drop),
        "delete a pod",
    );

    drop((gateways, controller));
    let roles: Api<ClusterRole> = Api::all(client.clone());
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    for name in [gateway_role, controller_role] {
        let _ = bindings.delete(&name, &DeleteParams::default()).await;
        let _ = roles.delete(&name, &DeleteParams::default()).await;
    }
    ns.delete_after(kubelet).await;
    published.delete().await;
}

fn gateways_listen(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}
