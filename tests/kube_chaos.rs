//! The API server goes away (skipped without `BKPOOL_TEST_KUBECONFIG` or BuildKit). The
//! controller and the gateway reach the API server through a TCP relay the test can cut: every
//! connection reset, new ones refused, for 10 s; the process kubelet, standing for the nodes,
//! keeps its own connection. Whatever happens meanwhile:
//! - a connection that arrives for a sleeping pool is held, not failed, and served once the
//!   server is back;
//! - a pool that was draining is not scaled down while a gateway holds a connection for it,
//!   even if the drain's settle time passes during the outage; the drain is cancelled, the
//!   connection served, and the pool converges to zero once idle again.

#[path = "../control/tests/support/mod.rs"]
mod cluster;
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::{TestNamespace, eventually, install_crd, test_client};
use control::crd::{BuildKitPool, Phase};
use control::kubelet::Kubelet;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use support::buildkit;
use support::k8s::{
    KillOnDrop, client_tlsdir, free_ports, loopback, publish_gateways, start_gateway,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(90);
const OUTAGE: Duration = Duration::from_secs(10);
const POOL: &str = "chaos";

/// A TCP relay to the API server that the test can cut: `cut(true)` resets every relayed
/// connection and refuses new ones until `cut(false)`.
struct ApiRelay {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
}

impl ApiRelay {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, _) = watch::channel(false);
        let cuts = cut.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if *cuts.borrow() {
                    let _ = client.set_zero_linger();
                    continue; // dropped: reset
                }
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|c| *c) => {
                            let _ = client.set_zero_linger();
                            let _ = server.set_zero_linger();
                        }
                    }
                });
            }
        });
        ApiRelay { addr, cut }
    }

    fn cut(&self, down: bool) {
        self.cut.send_replace(down);
    }
}

/// The admin kubeconfig with its server moved to `relay`, written to `out`.
fn relayed_kubeconfig(relay: &ApiRelay, out: &Path) {
    let admin = std::env::var("BKPOOL_TEST_KUBECONFIG").unwrap();
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(admin).unwrap()).unwrap();
    config["clusters"][0]["cluster"]["server"] = format!("https://{}", relay.addr).into();
    std::fs::write(out, serde_yaml::to_string(&config).unwrap()).unwrap();
}

/// The API server's address, from the admin kubeconfig.
fn api_server() -> SocketAddr {
    let admin = std::env::var("BKPOOL_TEST_KUBECONFIG").unwrap();
    let config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(admin).unwrap()).unwrap();
    let server = config["clusters"][0]["cluster"]["server"].as_str().unwrap();
    server
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .parse()
        .expect("the API server's address")
}

fn start_controller(ns: &str, kubeconfig: &Path, log: &Path) -> KillOnDropChild {
    let child = Command::new(env!("CARGO_BIN_EXE_bkpool"))
        .args(["controller", "--namespace", ns, "--lease-namespace", ns])
        .args(["--gateway-secret-namespace", ns])
        .args(["--certapi-listen", "127.0.0.1:0"])
        .args(["--listen", "127.0.0.1:0", "--identity", "chaos"])
        // The settle time is longer than the gap between seeing the drain and the cut.
        .args(["--activity-interval", "300ms", "--drain-settle", "5s"])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start bkpool controller");
    KillOnDropChild(child)
}

struct KillOnDropChild(std::process::Child);

impl Drop for KillOnDropChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn replicas(client: &Client, ns: &str) -> i32 {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let scale = deployments
        .get_scale(&format!("{POOL}-buildkitd"))
        .await
        .unwrap();
    scale.spec.and_then(|s| s.replicas).unwrap_or(0)
}

async fn phase(client: &Client, ns: &str) -> Option<Phase> {
    let pools: Api<BuildKitPool> = Api::namespaced(client.clone(), ns);
    pools.get(POOL).await.ok()?.status?.phase
}

/// For `outage`, checks every 250 ms that the workload asks for `at_least` replicas.
async fn replicas_stay(client: &Client, ns: &str, at_least: i32, outage: Duration, what: &str) {
    let began = Instant::now();
    while began.elapsed() < outage {
        let now = replicas(client, ns).await;
        assert!(now >= at_least, "{what}: scaled to {now} during the outage");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_server_away_during_a_wake_and_a_drain_loses_no_connection() {
    let Some(client) = test_client().await else {
        return;
    };
    let Some(tools) = buildkit::tools() else {
        return;
    };
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "bkp-chaos").await;
    let dir = tempfile::tempdir().unwrap();
    let relay = ApiRelay::start(api_server()).await;
    let relayed: PathBuf = dir.path().join("relayed.kubeconfig");
    relayed_kubeconfig(&relay, &relayed);

    let controller = start_controller(&ns.name, &relayed, &dir.path().join("controller.log"));
    let pools: Api<BuildKitPool> = Api::namespaced(client.clone(), &ns.name);
    let pool: BuildKitPool = serde_json::from_value(json!({
        "apiVersion": "bkpool.dev/v1alpha1", "kind": "BuildKitPool", "metadata": {"name": POOL},
        "spec": {"scaling": {"idleAfter": "2s", "minUpAfterWake": "0s", "wakeTimeout": "90s"},
                 "workload": {"security": "Privileged"}}
    }))
    .unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    eventually("the pool asleep with its certificates", WAIT, || async {
        (phase(&client, &ns.name).await? == Phase::Sleeping).then_some(())?;
        secrets
            .get(&format!("{POOL}-gateway-backend-tls"))
            .await
            .ok()
    })
    .await;

    let kubelet = Kubelet::builder(client.clone(), &ns.name)
        .buildkit(&tools.0)
        .start();
    let ip = loopback(17, 1);
    let ports = free_ports(ip);
    let gateway = KillOnDrop(start_gateway(
        ip,
        ports,
        &ns.name,
        &ns.name,
        &relayed,
        dir.path(),
    ));
    eventually("gateway ready after its first sync", WAIT, || async {
        (support::http_get(gateway.admin, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    publish_gateways(&client, &ns.name, &[ip], ports.1).await;
    let client_ca = secrets.get(&format!("{POOL}-client-ca")).await.unwrap();
    let tls = support::local::client_config(&client_tlsdir(&client_ca, &ns.name, POOL, dir.path()));
    let name = format!("{POOL}.{}.svc", ns.name);
    let hello = |tls: Arc<rustls::ClientConfig>, name: String| {
        let listen = gateway.listen;
        tokio::spawn(async move { support::k8s::h2_hello(listen, &tls, &name).await })
    };
    let logs = || {
        format!(
            "gateway:\n{}\ncontroller:\n{}",
            gateway.log.lock().unwrap().join("\n"),
            std::fs::read_to_string(dir.path().join("controller.log")).unwrap_or_default()
        )
    };

    // 1. A wake while the API server is away: the connection is held, not failed.
    assert_eq!(replicas(&client, &ns.name).await, 0);
    relay.cut(true);
    let first = hello(tls.clone(), name.clone());
    replicas_stay(&client, &ns.name, 0, OUTAGE, "asleep").await;
    assert!(!first.is_finished(), "held while nothing can wake the pool");
    let pool_label = format!("{}/{POOL}", ns.name);
    let metrics = support::http_get(gateway.admin, "/metrics").await.1;
    let failed = support::metrics::sample(
        &metrics,
        "bkpool_gateway_wake_requests_total",
        &[("pool", &pool_label), ("result", "failed")],
    )
    .unwrap_or(0.0);
    assert!(
        failed >= 1.0,
        "the gateway tried to wake it, and could not\n{}",
        logs()
    );
    relay.cut(false);
    let first = tokio::time::timeout(WAIT, first)
        .await
        .unwrap_or_else(|_| panic!("served once the API server is back\n{}", logs()))
        .unwrap();
    drop(first);

    // 2. A drain while the API server is away, and a connection meanwhile: never scaled
    // down under it.
    eventually("the idle pool draining", WAIT, || async {
        (phase(&client, &ns.name).await? == Phase::Draining).then_some(())
    })
    .await;
    relay.cut(true);
    let second = hello(tls.clone(), name.clone());
    replicas_stay(&client, &ns.name, 1, OUTAGE, "draining").await;
    relay.cut(false);
    let second = tokio::time::timeout(WAIT, second)
        .await
        .unwrap_or_else(|_| panic!("served once the API server is back\n{}", logs()))
        .unwrap();
    assert!(replicas(&client, &ns.name).await >= 1);
    let controller_log = std::fs::read_to_string(dir.path().join("controller.log")).unwrap();
    assert!(
        controller_log.contains("drain cancelled"),
        "the drain was cancelled by the held connection\n{}",
        logs()
    );
    drop(second);

    // 3. And idle again, it converges to zero.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    eventually("asleep again, no pod left", WAIT, || async {
        (phase(&client, &ns.name).await? == Phase::Sleeping).then_some(())?;
        let left = pods.list(&ListParams::default()).await.ok()?.items;
        left.is_empty().then_some(())
    })
    .await;

    drop((controller, gateway));
    ns.delete_after(kubelet).await;
}
