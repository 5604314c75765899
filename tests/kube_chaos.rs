//! The API server goes away (skipped without `BKPOOL_TEST_KUBECONFIG` or BuildKit). The
//! controller and the gateway reach the API server through a TCP relay the test can cut: every
//! connection reset, new ones refused, for 10 s; the process kubelet, standing for the nodes,
//! keeps its own connection. Whatever happens meanwhile:
//! - a connection that arrives for a sleeping pool is held, not failed, and served once the
//!   server is back;
//! - a pool that was draining is not scaled down while a connection for it is held or open,
//!   even if the drain's settle time passes during the outage (and the controller loses its
//!   lease); the connection is served, the drain cancelled, and the pool converges to zero
//!   once idle again;
//! - and when the leader dies mid-drain, the new one scales down only on acknowledgements it
//!   saw itself for a whole settle time.

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
use kube::api::{Api, ListParams};
use serde_json::json;
use support::buildkit;
use support::k8s::{
    KillOnDrop, client_tlsdir, create_sleeping_pool, free_ports, loopback, publish_gateways,
    published_gateway, slow_buildkitd, start_ready_gateway,
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

/// A controller of `ns` named `identity`, draining after `settle`, whose lease lasts 4 s.
fn start_controller(
    ns: &str,
    identity: &str,
    settle: &str,
    kubeconfig: &Path,
    log: &Path,
) -> KillOnDropChild {
    let child = Command::new(env!("CARGO_BIN_EXE_bkpool"))
        .args(["controller", "--namespace", ns, "--lease-namespace", ns])
        .args(["--gateway-secret-namespace", ns])
        .args(["--certapi-listen", "127.0.0.1:0"])
        .args(["--listen", "127.0.0.1:0", "--identity", identity])
        .args(["--activity-interval", "300ms", "--drain-settle", settle])
        .args(["--lease-duration", "4s", "--retry-period", "1s"])
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

/// A Deployment pool idle after 2 s.
fn pool_spec() -> serde_json::Value {
    json!({"scaling": {"idleAfter": "2s", "minUpAfterWake": "0s", "wakeTimeout": "90s"},
           "workload": {"security": "Privileged"}})
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

/// A sleeping Deployment pool in `ns` (idle after 2 s), the process kubelet for its pods, and
/// one gateway (acting with `kubeconfig`) on loopback block `n`, published for the controller;
/// a client's TLS configuration and the pool's name.
async fn serve_a_pool(
    client: &Client,
    ns: &str,
    buildkit: &control::testkit::BuildKit,
    n: u8,
    kubeconfig: &Path,
    dir: &Path,
) -> (Kubelet, KillOnDrop, Arc<rustls::ClientConfig>, String) {
    create_sleeping_pool(client, ns, POOL, pool_spec()).await;
    let kubelet = Kubelet::builder(client.clone(), ns)
        .buildkit(buildkit)
        .start();
    let gateway = published_gateway(client, ns, n, kubeconfig, dir).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let client_ca = secrets.get(&format!("{POOL}-client-ca")).await.unwrap();
    let tls = support::local::client_config(&client_tlsdir(&client_ca, ns, POOL, dir));
    let name = format!("{POOL}.{ns}.svc");
    (kubelet, gateway, tls, name)
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

    // The settle time is longer than the gap between seeing the drain and the cut.
    let log = dir.path().join("controller.log");
    let controller = start_controller(&ns.name, "chaos", "5s", &relayed, &log);
    let (kubelet, gateway, tls, name) =
        serve_a_pool(&client, &ns.name, &tools.0, 17, &relayed, dir.path()).await;
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
    // With it open, the drain must end without a scale-down, whenever the controller (which
    // lost its lease in the outage) and the gateway's watches are back.
    eventually("the drain cancelled, the connection open", WAIT, || async {
        assert!(
            replicas(&client, &ns.name).await >= 1,
            "scaled down under it"
        );
        (phase(&client, &ns.name).await? == Phase::Ready).then_some(())
    })
    .await;
    let controller_log = std::fs::read_to_string(dir.path().join("controller.log")).unwrap();
    assert!(
        controller_log.contains("drain cancelled"),
        "the drain was cancelled by the open connection\n{}",
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

/// The log line a controller writes when it becomes the leader.
const LEADING: &str = "leading: reconciling and scaling";

/// `kill -9` of the leader while a pool drains: the other replica takes the lease and
/// finishes the drain, but only on acknowledgements it saw itself for a whole settle time,
/// never on the old leader's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_leader_finishes_a_drain_only_on_its_own_acknowledgements() {
    let Some(client) = test_client().await else {
        return;
    };
    let Some(tools) = buildkit::tools() else {
        return;
    };
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "bkp-leader").await;
    let dir = tempfile::tempdir().unwrap();
    let admin = support::k8s::admin_kubeconfig();
    const SETTLE: Duration = Duration::from_secs(6);
    let logs = [dir.path().join("a.log"), dir.path().join("b.log")];
    let mut controllers = [
        Some(start_controller(&ns.name, "a", "6s", &admin, &logs[0])),
        Some(start_controller(&ns.name, "b", "6s", &admin, &logs[1])),
    ];
    let (kubelet, gateway, tls, name) =
        serve_a_pool(&client, &ns.name, &tools.0, 18, &admin, dir.path()).await;
    let log = |i: usize| std::fs::read_to_string(&logs[i]).unwrap_or_default();

    // Woken by a connection, then idle: a drain starts.
    let first = tokio::time::timeout(WAIT, support::k8s::h2_hello(gateway.listen, &tls, &name))
        .await
        .expect("served");
    drop(first);
    eventually("the idle pool draining", WAIT, || async {
        (phase(&client, &ns.name).await? == Phase::Draining).then_some(())
    })
    .await;

    // The leader dies before its settle time is up; the other takes over.
    let leader = (0..2)
        .find(|&i| log(i).contains(LEADING))
        .expect("a leader");
    let follower = 1 - leader;
    assert!(!log(follower).contains(LEADING), "one leader at a time");
    controllers[leader].take(); // SIGKILL
    assert_eq!(replicas(&client, &ns.name).await, 1, "not scaled down yet");
    let took_over = eventually("the other replica leading", WAIT, || async {
        log(follower).contains(LEADING).then(Instant::now)
    })
    .await;

    // It finishes the drain, a whole settle time after it started to lead at the earliest.
    let scaled_down = eventually("scaled to zero by the new leader", WAIT, || async {
        (replicas(&client, &ns.name).await == 0).then(Instant::now)
    })
    .await;
    assert!(
        scaled_down.duration_since(took_over) >= SETTLE - Duration::from_millis(500),
        "scaled down {:?} after taking over, within its settle time of {SETTLE:?}\n{}",
        scaled_down.duration_since(took_over),
        log(follower)
    );
    assert!(log(follower).contains("drain confirmed: scaled down"));

    drop((controllers, gateway));
    ns.delete_after(kubelet).await;
}

/// `kill -9` of a gateway replica holding a connection while a slow pod starts: its client
/// fails at once (a reset, not a hang), the other replica serves the retry, and the pool is
/// kept up while the dead replica is still listed (its report is missing: no scale-down on
/// partial data), then drains to zero once Kubernetes drops the dead address.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_gateway_fails_its_clients_fast_and_the_other_serves_their_retries() {
    let Some(client) = test_client().await else {
        return;
    };
    let Some(tools) = buildkit::tools() else {
        return;
    };
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "bkp-gwkill").await;
    let dir = tempfile::tempdir().unwrap();
    let admin = support::k8s::admin_kubeconfig();
    let log = dir.path().join("controller.log");
    let controller = start_controller(&ns.name, "gwkill", "2s", &admin, &log);
    create_sleeping_pool(&client, &ns.name, POOL, pool_spec()).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);

    // Pods whose buildkitd starts 8 s late, so that a connection stays held.
    let slow = slow_buildkitd(&tools.0.buildkitd, Duration::from_secs(8), dir.path());
    let kubelet = Kubelet::builder(client.clone(), &ns.name)
        .image("moby/buildkit", &slow)
        .programs(tools.0.bin_dir())
        .start();
    let (g1, g2) = (loopback(19, 1), loopback(19, 2));
    let ports = free_ports(g1);
    let mut gateways = [
        start_ready_gateway(g1, ports, &ns.name, &ns.name, &admin, dir.path()).await,
        start_ready_gateway(g2, ports, &ns.name, &ns.name, &admin, dir.path()).await,
    ];
    publish_gateways(&client, &ns.name, &[g1, g2], ports.1).await;
    let client_ca = secrets.get(&format!("{POOL}-client-ca")).await.unwrap();
    let tls = support::local::client_config(&client_tlsdir(&client_ca, &ns.name, POOL, dir.path()));
    let name = format!("{POOL}.{}.svc", ns.name);
    let pool_label = format!("{}/{POOL}", ns.name);

    // Held on the first replica while the pod starts; then that replica dies.
    let held = {
        let (listen, tls, name) = (gateways[0].listen, tls.clone(), name.clone());
        tokio::spawn(async move { support::k8s::h2_hello(listen, &tls, &name).await })
    };
    let admin_one = gateways[0].admin;
    eventually("a connection held on the first replica", WAIT, || async {
        let metrics = support::http_get(admin_one, "/metrics").await.1;
        let labels = [("pool", pool_label.as_str())];
        let held = support::metrics::sample(&metrics, "bkpool_gateway_connections_held", &labels);
        (held == Some(1.0)).then_some(())
    })
    .await;
    let _ = gateways[0].0.child.kill(); // SIGKILL
    let failed = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("its client fails at once, not after the wake");
    assert!(failed.is_err(), "the held connection could not be served");

    // The retry on the other replica is served once the pod is up.
    let retry = tokio::time::timeout(
        WAIT,
        support::k8s::h2_hello(gateways[1].listen, &tls, &name),
    )
    .await
    .expect("the other replica serves the retry");
    drop(retry);

    // While the dead replica is listed, its missing report keeps the pool up.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        replicas(&client, &ns.name).await,
        1,
        "no scale-down on partial data"
    );

    // Kubernetes drops the dead pod's address: the pool drains to zero.
    let endpoints: Api<k8s_openapi::api::core::v1::Endpoints> =
        Api::namespaced(client.clone(), &ns.name);
    let patch = json!({"subsets": [{"addresses": [{"ip": g2.to_string()}],
                                    "ports": [{"name": "admin", "port": ports.1}]}]});
    endpoints
        .patch(
            "bkpool-gateway",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    eventually("asleep, no pod left", WAIT, || async {
        (phase(&client, &ns.name).await? == Phase::Sleeping).then_some(())?;
        let left = pods.list(&ListParams::default()).await.ok()?.items;
        left.is_empty().then_some(())
    })
    .await;

    gateways[0].0.child.wait().ok();
    drop((controller, gateways));
    ns.delete_after(kubelet).await;
}
