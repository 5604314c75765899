//! The Kubernetes side of end-to-end tests of the binary: `bkpool gateway --kubernetes` and
//! `bkpool controller` processes against the test cluster, the gateway Service the controller
//! polls for activity, loopback addresses apart from other runs, and a pool client's
//! `buildctl --tlsdir` from the pool's client CA Secret.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use control::pki::Ca;
use k8s_openapi::api::core::v1::{Endpoints, Secret, Service};
use kube::Client;
use kube::api::{Api, PostParams};
use proxy::names::{ClientIdentity, PoolId};
use serde_json::json;

use super::{Listening, spawn_listening};

/// Loopback address `n` of a block of five for this run, apart from other test runs (each
/// test binary picks its block from its PID; `offset` separates binaries run at once).
pub fn loopback(offset: u8, n: u8) -> IpAddr {
    let base = 20 + (std::process::id() % 40) as u8 * 5;
    IpAddr::from([127, offset, 1, base + n])
}

/// Two ports free on `ip`.
pub fn free_ports(ip: IpAddr) -> (u16, u16) {
    let a = std::net::TcpListener::bind((ip, 0)).unwrap();
    let b = std::net::TcpListener::bind((ip, 0)).unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// A kubeconfig for the test cluster acting with `token`, written to `out`.
pub fn kubeconfig_with_token(out: &Path, token: &str) -> PathBuf {
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
    std::fs::write(out, text).unwrap();
    out.to_owned()
}

/// One `bkpool gateway --kubernetes` replica serving `ns` on `ip`, reading the copies of its
/// Secrets the controller publishes in `secret_ns`.
pub fn start_gateway(
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
        .args(["--log-format", "json", "gateway", "--kubernetes"])
        .args(["--namespace", ns, "--secret-namespace", secret_ns])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--config")
        .arg(&config)
        .env("BKPOOL_LOG", "info");
    spawn_listening(command, "gateway --kubernetes")
}

/// A gateway process killed when dropped, so a failing test leaves none behind.
pub struct KillOnDrop(pub Listening);

impl std::ops::Deref for KillOnDrop {
    type Target = Listening;
    fn deref(&self) -> &Listening {
        &self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.child.kill();
        let _ = self.0.child.wait();
    }
}

/// `bkpool controller` (reconcilers and scaler) for `ns`, polling the gateways' activity
/// every 300 ms and draining after 2 s; it publishes the gateways' Secrets in `secret_ns` and
/// serves its certificate API on a free loopback port; its log (JSON) goes to `log`. Killed
/// on drop.
pub struct Controller {
    child: Child,
    log: PathBuf,
}

impl Controller {
    /// A controller whose own namespace (its Lease, the gateway Service it polls) is `ns`.
    pub fn start(ns: &str, secret_ns: &str, kubeconfig: &Path, log: &Path) -> Self {
        Self::start_in(ns, ns, secret_ns, kubeconfig, log)
    }

    /// A controller of `ns` living in namespace `system`, as deployed.
    pub fn start_in(
        ns: &str,
        system: &str,
        secret_ns: &str,
        kubeconfig: &Path,
        log: &Path,
    ) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_bkpool"))
            .args(["--log-format", "json", "controller"])
            .args(["--namespace", ns, "--lease-namespace", system])
            .args(["--gateway-secret-namespace", secret_ns])
            .args([
                "--certapi-listen",
                "127.0.0.1:0",
                "--certapi-name",
                "127.0.0.1",
            ])
            .args(["--listen", "127.0.0.1:0", "--identity", "e2e"])
            .args(["--activity-interval", "300ms", "--drain-settle", "2s"])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("start bkpool controller");
        Controller {
            child,
            log: log.to_owned(),
        }
    }

    /// The address its certificate API listens on, once it says so in its log.
    pub fn certapi(&self) -> std::net::SocketAddr {
        for _ in 0..200 {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let line = log
                .lines()
                .find(|l| l.contains("controller admin endpoint"));
            if let Some(line) = line {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                return v["fields"]["certapi"].as_str().unwrap().parse().unwrap();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "the controller's certificate API address; its log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The gateway Service without a selector, and its Endpoints naming the replicas' admin
/// addresses: what the controller polls for activity.
pub async fn publish_gateways(client: &Client, ns: &str, ips: &[IpAddr], admin_port: u16) {
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

pub fn secret_text(secret: &Secret, key: &str) -> String {
    let data = secret.data.as_ref().expect("secret data");
    String::from_utf8(data[key].0.clone()).unwrap()
}

/// What `bkpool login` writes for a client of `pool` in `ns`: a `buildctl --tlsdir`
/// (`ca.pem` trusting the gateway, `cert.pem`/`key.pem` from the pool's client CA Secret).
pub fn client_tlsdir(client_ca: &Secret, ns: &str, pool: &str, dir: &Path) -> PathBuf {
    let ca = Ca::from_pem(
        &secret_text(client_ca, "ca.crt"),
        &secret_text(client_ca, "ca.key"),
    )
    .unwrap();
    let pool = PoolId::new(ns, pool).unwrap();
    let identity = ClientIdentity::new("system:serviceaccount:ci:builder").unwrap();
    let issued = ca
        .issue_client(&pool, &identity, Duration::from_secs(600))
        .unwrap();
    let tlsdir = dir.join("tls");
    std::fs::create_dir_all(&tlsdir).unwrap();
    std::fs::write(
        tlsdir.join("ca.pem"),
        secret_text(client_ca, "ca-bundle.crt"),
    )
    .unwrap();
    std::fs::write(tlsdir.join("cert.pem"), &issued.cert_pem).unwrap();
    std::fs::write(tlsdir.join("key.pem"), issued.key_pem.unwrap()).unwrap();
    tlsdir
}

/// The admin kubeconfig of the test cluster.
pub fn admin_kubeconfig() -> PathBuf {
    std::env::var_os("BKPOOL_TEST_KUBECONFIG")
        .expect("BKPOOL_TEST_KUBECONFIG")
        .into()
}

/// Connects through `gateway` to the pool named `server_name` and starts HTTP/2 as buildctl
/// does, acknowledging every SETTINGS frame as a client must; returns the open stream once
/// buildkitd's own SETTINGS frame came back through it (so the pool, if it slept, is awake and
/// serving). The gateway's answer to a held connection's preface is an empty SETTINGS frame;
/// grpc-go's always names its maximum frame size.
pub async fn h2_hello(
    gateway: std::net::SocketAddr,
    config: &std::sync::Arc<rustls::ClientConfig>,
    server_name: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SETTINGS: u8 = 4;
    const ACK: u8 = 1;
    let tcp = tokio::net::TcpStream::connect(gateway).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .expect("handshake with the gateway");
    tls.write_all(control::standin::H2_PREFACE).await.unwrap();
    tls.write_all(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    tls.flush().await.unwrap();
    loop {
        let mut header = [0u8; 9];
        tls.read_exact(&mut header)
            .await
            .expect("a frame through the gateway");
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; length];
        tls.read_exact(&mut payload).await.unwrap();
        if header[3] == SETTINGS && header[4] & ACK == 0 {
            tls.write_all(&[0, 0, 0, SETTINGS, ACK, 0, 0, 0, 0])
                .await
                .unwrap();
            tls.flush().await.unwrap();
            if length > 0 {
                return tls;
            }
        }
    }
}

/// How long the helpers below wait for the cluster.
const CLUSTER_WAIT: Duration = Duration::from_secs(90);

/// Polls `probe` every 200 ms until it answers, for [`CLUSTER_WAIT`] at most.
async fn poll<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let began = std::time::Instant::now();
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(
            began.elapsed() < CLUSTER_WAIT,
            "{what}: not within {CLUSTER_WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates pool `name` in `ns` with `spec` and waits until the operator has put it to sleep
/// with its certificates issued.
pub async fn create_sleeping_pool(client: &Client, ns: &str, name: &str, spec: serde_json::Value) {
    use control::crd::{BuildKitPool, Phase};
    let pools: Api<BuildKitPool> = Api::namespaced(client.clone(), ns);
    let pool: BuildKitPool = serde_json::from_value(json!({
        "apiVersion": "bkpool.dev/v1alpha1", "kind": "BuildKitPool", "metadata": {"name": name},
        "spec": spec
    }))
    .unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    poll("the pool asleep with its certificates", || async {
        let status = pools.get(name).await.ok()?.status?;
        (status.phase? == Phase::Sleeping).then_some(())?;
        secrets
            .get(&format!("{name}-gateway-backend-tls"))
            .await
            .ok()
    })
    .await;
}

/// [`start_gateway`], killed on drop, once it has synced with the cluster (`/readyz`).
pub async fn start_ready_gateway(
    ip: IpAddr,
    ports: (u16, u16),
    ns: &str,
    secret_ns: &str,
    kubeconfig: &Path,
    dir: &Path,
) -> KillOnDrop {
    let gateway = KillOnDrop(start_gateway(ip, ports, ns, secret_ns, kubeconfig, dir));
    poll("gateway ready after its first sync", || async {
        (super::http_get(gateway.admin, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    gateway
}

/// One synced gateway replica serving `ns` on loopback block `n` (its Secret copies read in
/// `ns`), published as the gateway the controller living in `ns` polls.
pub async fn published_gateway(
    client: &Client,
    ns: &str,
    n: u8,
    kubeconfig: &Path,
    dir: &Path,
) -> KillOnDrop {
    let ip = loopback(n, 1);
    let ports = free_ports(ip);
    let gateway = start_ready_gateway(ip, ports, ns, ns, kubeconfig, dir).await;
    publish_gateways(client, ns, &[ip], ports.1).await;
    gateway
}

/// A script in `dir` that starts `buildkitd` with its arguments `delay` late: what the
/// process kubelet runs for a pod whose start waits for a node or an image.
pub fn slow_buildkitd(buildkitd: &Path, delay: Duration, dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("slow-buildkitd");
    let script = format!(
        "#!/bin/sh\nsleep {}\nexec {} \"$@\"\n",
        delay.as_secs(),
        buildkitd.display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}
