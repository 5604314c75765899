//! Test fixtures for the control crate's integration tests ([`issuer`]), and helpers for
//! tests against a real API server (kube-local, kind, a real cluster): a client
//! from `BKPOOL_TEST_KUBECONFIG`, one fresh namespace per test, the CRD installed, the
//! controller running in the background, and polling with a deadline.

#![allow(dead_code)]

pub mod issuer;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use control::crd::BuildKitPool;
use control::operator::Settings;
use control::operator::controller;
use control::operator::metrics::Metrics;
use control::operator::watch::Scope;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::oneshot;

/// A client for the test cluster, or None (a skip, a failure in CI) when
/// BKPOOL_TEST_KUBECONFIG is unset.
pub async fn test_client() -> Option<Client> {
    let config = test_config().await?;
    Some(Client::try_from(config).expect("client"))
}

pub async fn test_config() -> Option<kube::Config> {
    let path = control::testkit::kubeconfig()?;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let kubeconfig = kube::config::Kubeconfig::read_from(path).expect("kubeconfig");
    let options = kube::config::KubeConfigOptions::default();
    Some(
        kube::Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .expect("config"),
    )
}

/// A client acting with `token` (e.g. a ServiceAccount's) against the same server.
pub fn client_with_token(mut config: kube::Config, token: &str) -> Client {
    config.auth_info = serde_json::from_value(serde_json::json!({ "token": token })).unwrap();
    Client::try_from(config).expect("client")
}

/// A token of ServiceAccount `name` in `ns` (for the API server's audience), valid 1 hour.
pub async fn service_account_token(client: &Client, ns: &str, name: &str) -> String {
    service_account_token_for(client, ns, name, &[]).await
}

/// A token of ServiceAccount `name` in `ns` for `audiences` (a projected token's), valid 1
/// hour; no audience means the API server's.
pub async fn service_account_token_for(
    client: &Client,
    ns: &str,
    name: &str,
    audiences: &[&str],
) -> String {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let token = sas
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("a token for ServiceAccount {name}: {e}"));
    token.status.expect("token status").token
}

/// A unique lowercase name starting with `prefix`.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!(
        "{prefix}-{:x}{:x}{n}",
        std::process::id() % 4096,
        nanos % 65_536
    )
}

/// A fresh namespace; tests delete it at the end (one left by a failed test shows what happened).
pub struct TestNamespace {
    pub name: String,
    client: Client,
}

impl TestNamespace {
    pub async fn create(client: &Client, prefix: &str) -> Self {
        let name = unique(prefix);
        let api: Api<Namespace> = Api::all(client.clone());
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.clone());
        api.create(&PostParams::default(), &ns)
            .await
            .expect("namespace");
        Self {
            name,
            client: client.clone(),
        }
    }
}

impl TestNamespace {
    /// Deletes the namespace without waiting (deletion takes at least 5 s).
    pub async fn delete(self) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let _ = api.delete(&self.name, &DeleteParams::default()).await;
    }

    /// Stops `kubelet` (its processes killed, its pods deleted at once, so the namespace
    /// can go), then deletes the namespace.
    pub async fn delete_after(self, kubelet: control::kubelet::Kubelet) {
        kubelet.shutdown().await;
        self.delete().await;
    }
}

/// Installs (or updates) the CRD and waits until it is Established.
pub async fn install_crd(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    // Create or replace: Kubernetes 1.20 mangles a server-side apply of an
    // apiextensions/v1 CRD (it loses subresources and columns), as kubectl never does.
    let mut crd = control::crd::yaml::crd();
    match api.create(&PostParams::default(), &crd).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let current = api.get(&crd.name_any()).await.expect("get CRD");
            crd.metadata.resource_version = current.resource_version();
            match api
                .replace(&crd.name_any(), &PostParams::default(), &crd)
                .await
            {
                Ok(_) => {}
                // Another test replaced it first with the same content.
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => panic!("replace CRD: {e}"),
            }
        }
        Err(e) => panic!("create CRD: {e}"),
    }
    eventually("CRD established", Duration::from_secs(20), || {
        let api = api.clone();
        async move {
            let crd = api.get("buildkitpools.bkpool.dev").await.ok()?;
            let conditions = crd.status?.conditions?;
            conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        }
    })
    .await;
    // Discovery of a new CRD lags Established by a moment; wait until the kind is served.
    eventually("CRD served", Duration::from_secs(20), || {
        let api: Api<BuildKitPool> = Api::all(client.clone());
        async move { api.list(&Default::default()).await.ok().map(drop) }
    })
    .await;
}

/// Polls `probe` every 100 ms until it returns Some, panicking with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An operator loop (the reconcilers, or the scaler) running in the background until stopped.
pub struct RunningController {
    pub metrics: Metrics,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// Completes when the test stops a loop.
pub type Stopped = std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

impl RunningController {
    /// The reconcilers, for one namespace that is the controller's own too.
    pub fn start(client: &Client, namespace: &str) -> Self {
        Self::start_in(client, namespace, namespace)
    }

    /// The reconcilers for pools in `namespace`, the gateway's Secret copies going to
    /// `published`.
    pub fn start_in(client: &Client, namespace: &str, published: &str) -> Self {
        let (client, scope) = (client.clone(), Scope::Namespace(namespace.to_owned()));
        let settings = Settings {
            gateway_secret_namespace: published.to_owned(),
            ..Settings::default()
        };
        Self::spawn(|metrics, stopped| controller::run(client, scope, settings, metrics, stopped))
    }

    /// Any loop that takes its metrics and a future that completes when it should stop.
    pub fn spawn<Fut>(run: impl FnOnce(Metrics, Stopped) -> Fut) -> Self
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::register(&mut registry);
        let (stop, stopped) = oneshot::channel();
        let stopped: Stopped = Box::pin(async move {
            let _ = stopped.await;
        });
        let task = tokio::spawn(run(metrics.clone(), stopped));
        Self {
            metrics,
            stop: Some(stop),
            task,
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

impl Drop for RunningController {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Creates the RBAC of `deploy/kustomize/<file>`, moved into `ns` (cluster-wide names get
/// `-<ns>`). Returns the ClusterRole's (and ClusterRoleBinding's) name.
pub async fn install_rbac(client: &Client, ns: &str, file: &str) -> String {
    install_rbac_in(client, &[("bkpool-system", ns)], ns, file).await
}

/// The namespace a deployed namespace stands for in a test: `bkpool-system` is `system` and
/// `bkpool-gateway-secrets` is `published`.
pub fn deployed_namespaces<'a>(
    system: &'a str,
    published: &'a str,
) -> [(&'static str, &'a str); 2] {
    [
        ("bkpool-system", system),
        ("bkpool-gateway-secrets", published),
    ]
}

/// [`install_rbac`] with each namespace of the file moved to its counterpart in `moves`
/// (one not listed goes to the first one's); cluster-wide names get `-<suffix>`.
pub async fn install_rbac_in(
    client: &Client,
    moves: &[(&str, &str)],
    suffix: &str,
    file: &str,
) -> String {
    let moved = |from: &str| -> String {
        moves
            .iter()
            .find(|(deployed, _)| *deployed == from)
            .unwrap_or(&moves[0])
            .1
            .to_owned()
    };
    let ns = suffix;
    // Included by the control crate's tests and by the workspace root's.
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = [manifest, manifest.parent().unwrap()]
        .iter()
        .map(|dir| dir.join("deploy/kustomize").join(file))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("deploy/kustomize/{file} not found"));
    let path = path.display();
    let text = std::fs::read_to_string(path.to_string()).unwrap();
    let mut cluster_name = String::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let mut value: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
        let kind = value["kind"].as_str().unwrap().to_owned();
        let meta = &mut value["metadata"];
        let target = moved(meta["namespace"].as_str().unwrap_or_default());
        if meta.get("namespace").is_some() {
            meta["namespace"] = json!(target);
        }
        if kind.starts_with("Cluster") {
            let name = format!("{}-{ns}", meta["name"].as_str().unwrap());
            meta["name"] = json!(name);
            cluster_name = name;
        }
        if let Some(subjects) = value.get_mut("subjects").and_then(|s| s.as_array_mut()) {
            for s in subjects
                .iter_mut()
                .filter(|s| s["kind"] == "ServiceAccount")
            {
                s["namespace"] = json!(moved(s["namespace"].as_str().unwrap_or_default()));
            }
        }
        if kind == "ClusterRoleBinding" {
            let role = format!("{}-{ns}", value["roleRef"]["name"].as_str().unwrap());
            value["roleRef"]["name"] = json!(role);
        }
        let pp = PostParams::default();
        match kind.as_str() {
            "ServiceAccount" => {
                let o: ServiceAccount = serde_json::from_value(value).unwrap();
                Api::namespaced(client.clone(), &target)
                    .create(&pp, &o)
                    .await
                    .map(drop)
            }
            "ClusterRole" => {
                let o: ClusterRole = serde_json::from_value(value).unwrap();
                Api::<ClusterRole>::all(client.clone())
                    .create(&pp, &o)
                    .await
                    .map(drop)
            }
            "ClusterRoleBinding" => {
                let o: ClusterRoleBinding = serde_json::from_value(value).unwrap();
                Api::<ClusterRoleBinding>::all(client.clone())
                    .create(&pp, &o)
                    .await
                    .map(drop)
            }
            "Role" => {
                let o: Role = serde_json::from_value(value).unwrap();
                Api::namespaced(client.clone(), &target)
                    .create(&pp, &o)
                    .await
                    .map(drop)
            }
            "RoleBinding" => {
                let o: RoleBinding = serde_json::from_value(value).unwrap();
                Api::namespaced(client.clone(), &target)
                    .create(&pp, &o)
                    .await
                    .map(drop)
            }
            other => panic!("unexpected kind {other} in {path}"),
        }
        .unwrap_or_else(|e| panic!("creating {kind}: {e}"));
    }
    cluster_name
}
