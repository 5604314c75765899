//! End to end on a real API server (skipped without `BKPOOL_TEST_KUBECONFIG`): two
//! `bkpool gateway --kubernetes` processes, running as the gateway ServiceAccount with the RBAC
//! from `deploy/`, serve a pool the operator reconciled. A client connection to the sleeping
//! pool is held while the gateway scales the workload up through `/scale`; the test plays the
//! scheduler and kubelet (binds the pod, marks it Ready with a loopback IP behind which a
//! buildkitd stand-in speaks mTLS with the pool's backend certificate), and the held
//! connection is relayed. Then the pool goes idle, the controller drains it through its
//! status, every gateway acknowledges, and it is scaled to zero; the next connection wakes it
//! again.

#[path = "../control/tests/support/mod.rs"]
mod cluster;
mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use cluster::{
    TestNamespace, deployed_namespaces, eventually, install_crd, install_rbac_in,
    service_account_token, test_client, test_config,
};
use control::crd::{BuildKitPool, Phase};
use control::pki::Ca;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Endpoints, Pod, Secret, Service};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use proxy::names::{ClientIdentity, PoolId};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::json;
use support::{Listening, http_get, spawn_listening};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const WAIT: Duration = Duration::from_secs(60);
const POOL: &str = "e2e";

/// Loopback addresses for this run (two gateways and the pod), apart from other test runs.
fn loopback(n: u8) -> IpAddr {
    let base = 20 + (std::process::id() % 40) as u8 * 5;
    IpAddr::from([127, 0, 1, base + n])
}

/// A kubeconfig for the same server acting with `token`.
fn kubeconfig_with_token(dir: &Path, token: &str) -> std::path::PathBuf {
    let path = std::env::var("BKPOOL_TEST_KUBECONFIG").unwrap();
    let admin: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).expect("kubeconfig YAML");
    let cluster = &admin["clusters"][0]["cluster"];
    let text = serde_json::to_string(&json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {
            "server": cluster["server"].as_str().unwrap(),
            "certificate-authority-data": cluster["certificate-authority-data"].as_str().unwrap(),
        }}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }))
    .unwrap();
    let out = dir.join("gateway.kubeconfig");
    std::fs::write(&out, text).unwrap();
    out
}

/// One `bkpool gateway --kubernetes` replica on `ip`.
fn start_gateway(
    ip: IpAddr,
    ports: (u16, u16),
    ns: &str,
    secret_ns: &str,
    kubeconfig: &Path,
    dir: &Path,
) -> Listening {
    let config = dir.join(format!("gateway-{ip}.toml"));
    std::fs::write(
        &config,
        format!(
            "listen = \"{ip}:{}\"\nadmin = \"{ip}:{}\"\n[timeouts]\nconnect = \"1s\"\n",
            ports.0, ports.1
        ),
    )
    .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_bkpool"));
    command
        .args([
            "--log-format",
            "json",
            "gateway",
            "--kubernetes",
            "--namespace",
            ns,
            "--secret-namespace",
            secret_ns,
        ])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--config")
        .arg(&config)
        .env("BKPOOL_LOG", "info");
    spawn_listening(command, "gateway --kubernetes")
}

/// The gateway Service without a selector, and its Endpoints naming the replicas' admin
/// addresses: what the controller polls for activity.
async fn publish_gateways(client: &Client, ns: &str, ips: &[IpAddr], admin_port: u16) {
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "bkpool-gateway"},
        "spec": {"ports": [{"name": "admin", "port": 9235}]}
    }))
    .unwrap();
    services.create(&PostParams::default(), &svc).await.unwrap();
    let endpoints: Api<Endpoints> = Api::namespaced(client.clone(), ns);
    let addresses: Vec<_> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
    let ep: Endpoints = serde_json::from_value(json!({
        "metadata": {"name": "bkpool-gateway"},
        "subsets": [{"addresses": addresses, "ports": [{"name": "admin", "port": admin_port}]}]
    }))
    .unwrap();
    endpoints.create(&PostParams::default(), &ep).await.unwrap();
}

fn secret_text(secret: &Secret, key: &str) -> String {
    let data = secret.data.as_ref().expect("secret data");
    String::from_utf8(data[key].0.clone()).unwrap()
}

/// buildkitd's stand-in: mTLS with the pool's backend certificate (clients must present a
/// certificate of the backend CA: the gateway's), then echo.
async fn backend(secret: &Secret, addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let chain: Vec<_> = CertificateDer::pem_slice_iter(secret_text(secret, "tls.crt").as_bytes())
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_slice(secret_text(secret, "tls.key").as_bytes()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(secret_text(secret, "ca.crt").as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .unwrap();
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(addr).await.expect("bind the pod address");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    let _ = tls.flush().await;
                }
            });
        }
    })
}

/// A client of the pool: a certificate from the pool's client CA, trusting that CA.
fn client_config(client_ca: &Secret, ns: &str, dir: &Path) -> Arc<rustls::ClientConfig> {
    let ca = Ca::from_pem(
        &secret_text(client_ca, "ca.crt"),
        &secret_text(client_ca, "ca.key"),
    )
    .unwrap();
    let pool = PoolId::new(ns, POOL).unwrap();
    let identity = ClientIdentity::new("system:serviceaccount:ci:builder").unwrap();
    let issued = ca
        .issue_client(&pool, &identity, Duration::from_secs(600))
        .unwrap();
    // What `bkpool login` writes: a buildctl --tlsdir.
    let tlsdir = dir.join("tls");
    std::fs::create_dir_all(&tlsdir).unwrap();
    std::fs::write(
        tlsdir.join("ca.pem"),
        secret_text(client_ca, "ca-bundle.crt"),
    )
    .unwrap();
    std::fs::write(tlsdir.join("cert.pem"), &issued.cert_pem).unwrap();
    std::fs::write(tlsdir.join("key.pem"), issued.key_pem.unwrap()).unwrap();
    support::local::client_config(&tlsdir)
}

/// Connects through `gateway` as a pool client and checks an echo round trip; returns the
/// open stream.
async fn round_trip(
    gateway: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    ns: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(gateway).await.unwrap();
    let name = ServerName::try_from(format!("{POOL}.{ns}.svc")).unwrap();
    let mut tls = TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .expect("handshake with the gateway");
    tls.write_all(b"ping").await.unwrap();
    tls.flush().await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(WAIT, tls.read_exact(&mut buf))
        .await
        .expect("echo within the wake timeout")
        .expect("echo through the gateway");
    assert_eq!(&buf, b"ping");
    tls
}

/// Plays the scheduler and the kubelet for the pool's newest pending pod: binds it to the
/// node and marks it Running and Ready at `ip`.
async fn start_pod(client: &Client, ns: &str, ip: IpAddr) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = eventually("a pod of the woken workload", WAIT, || async {
        let lp = ListParams::default().labels(&format!("bkpool.dev/pool={POOL}"));
        pods.list(&lp).await.ok()?.items.into_iter().find(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.spec.as_ref().is_some_and(|s| s.node_name.is_none())
        })
    })
    .await;
    let node = std::env::var("KUBE_LOCAL_NODE").unwrap_or_else(|_| "kube-local-node".into());
    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod.name_any()},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
    let url = format!("/api/v1/namespaces/{ns}/pods/{}/binding", pod.name_any());
    let request = http::Request::post(url)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&binding).unwrap())
        .unwrap();
    client
        .request::<serde_json::Value>(request)
        .await
        .expect("bind the pod");
    let ready = json!({"status": {"phase": "Running", "hostIP": "127.0.0.1", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
        "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"},
                       {"type": "PodScheduled", "status": "True"}, {"type": "Initialized", "status": "True"}]}});
    pods.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&ready),
    )
    .await
    .expect("mark the pod ready");
    pod.name_any()
}

/// Plays the kubelet for pods being deleted: without one they would stay Terminating.
async fn finish_deleted_pods(client: &Client, ns: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("bkpool.dev/pool={POOL}"));
    for pod in pods.list(&lp).await.map(|l| l.items).unwrap_or_default() {
        if pod.metadata.deletion_timestamp.is_some() {
            let now = DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            };
            let _ = pods.delete(&pod.name_any(), &now).await;
        }
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

async fn metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, text) = http_get(admin, "/metrics").await;
    support::metrics::sample(&text, name, labels).unwrap_or(0.0)
}

/// Two ports free on `ip` (both gateways use the same pair, each on its own address).
fn free_ports(ip: IpAddr) -> (u16, u16) {
    let a = std::net::TcpListener::bind((ip, 0)).unwrap();
    let b = std::net::TcpListener::bind((ip, 0)).unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_connection_wakes_the_pool_and_an_idle_pool_drains_to_zero() {
    let Some(client) = test_client().await else {
        return;
    };
    let Some(_) = test_config().await else {
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
        dir.path(),
        &service_account_token(&client, &ns.name, "bkpool-gateway").await,
    );

    // The operator (reconcilers and scaler) as a real process, as its own ServiceAccount.
    let controller_kubeconfig = {
        let token = service_account_token(&client, &ns.name, "bkpool-controller").await;
        let sub = dir.path().join("controller");
        std::fs::create_dir(&sub).unwrap();
        kubeconfig_with_token(&sub, &token)
    };
    let mut controller = Command::new(env!("CARGO_BIN_EXE_bkpool"))
        .args([
            "controller",
            "--namespace",
            &ns.name,
            "--lease-namespace",
            &ns.name,
            "--gateway-secret-namespace",
            &published.name,
            "--certapi-listen",
            "127.0.0.1:0",
        ])
        .args(["--listen", "127.0.0.1:0", "--identity", "e2e"])
        .args(["--activity-interval", "300ms", "--drain-settle", "2s"])
        .arg("--kubeconfig")
        .arg(&controller_kubeconfig)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("controller.log")).unwrap())
        .spawn()
        .expect("start bkpool controller");

    let pools: Api<BuildKitPool> = Api::namespaced(client.clone(), &ns.name);
    let pool: BuildKitPool = serde_json::from_value(json!({
        "apiVersion": "bkpool.dev/v1alpha1", "kind": "BuildKitPool", "metadata": {"name": POOL},
        "spec": {"scaling": {"idleAfter": "2s", "minUpAfterWake": "0s", "wakeTimeout": "60s"}}
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
    let (g1, g2, pod_ip) = (loopback(1), loopback(2), loopback(3));
    let ports = free_ports(g1);
    let gateways = [
        start_gateway(
            g1,
            ports,
            &ns.name,
            &published.name,
            &gateway_kubeconfig,
            dir.path(),
        ),
        start_gateway(
            g2,
            ports,
            &ns.name,
            &published.name,
            &gateway_kubeconfig,
            dir.path(),
        ),
    ];
    for g in &gateways {
        eventually("gateway ready after its first sync", WAIT, || async {
            (http_get(g.admin, "/readyz").await.0 == 200).then_some(())
        })
        .await;
    }
    publish_gateways(&client, &ns.name, &[g1, g2], ports.1).await;

    let client_ca = secrets.get(&format!("{POOL}-client-ca")).await.unwrap();
    let config = client_config(&client_ca, &ns.name, dir.path());
    let buildkitd_tls = secrets.get(&format!("{POOL}-buildkitd-tls")).await.unwrap();
    let pod_addr = SocketAddr::new(pod_ip, 1234);
    let stand_in = backend(&buildkitd_tls, pod_addr).await;

    // A connection to the sleeping pool is held while the gateway wakes it.
    assert_eq!(replicas(&client, &ns.name).await, 0);
    let held = tokio::spawn({
        let (config, ns) = (config.clone(), ns.name.clone());
        async move { round_trip(gateways_listen(g1, ports.0), &config, &ns).await }
    });
    eventually("the gateway scaled the workload up", WAIT, || async {
        (replicas(&client, &ns.name).await == 1).then_some(())
    })
    .await;
    let (_, activity) = http_get(gateways[0].admin, "/activity").await;
    assert!(activity.contains("\"held\":1"), "{activity}");
    start_pod(&client, &ns.name, pod_ip).await;
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
    let second = round_trip(gateways_listen(g2, ports.0), &config, &ns.name).await;
    eventually("the pool Ready", WAIT, || async {
        let status = pools.get(POOL).await.ok()?.status?;
        (status.phase == Some(Phase::Ready)).then_some(())
    })
    .await;

    // Open connections keep it awake past idleAfter.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(replicas(&client, &ns.name).await, 1, "busy pools stay up");
    drop((first, second));

    // Idle: drained through the status, acknowledged by both gateways, scaled to zero.
    eventually("the pool drained and scaled to zero", WAIT, || async {
        finish_deleted_pods(&client, &ns.name).await;
        (replicas(&client, &ns.name).await == 0).then_some(())
    })
    .await;
    eventually(
        "the pool Sleeping, its drain mark cleared",
        WAIT,
        || async {
            finish_deleted_pods(&client, &ns.name).await;
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
        async move { round_trip(gateways_listen(g2, ports.0), &config, &ns).await }
    });
    eventually("woken again", WAIT, || async {
        (replicas(&client, &ns.name).await == 1).then_some(())
    })
    .await;
    start_pod(&client, &ns.name, pod_ip).await;
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

    stand_in.abort();
    for mut g in gateways {
        let _ = g.child.kill();
        let _ = g.child.wait();
    }
    let _ = controller.kill();
    let _ = controller.wait();
    let roles: Api<ClusterRole> = Api::all(client.clone());
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    for name in [gateway_role, controller_role] {
        let _ = bindings.delete(&name, &DeleteParams::default()).await;
        let _ = roles.delete(&name, &DeleteParams::default()).await;
    }
    ns.delete().await;
    published.delete().await;
}

fn gateways_listen(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}
