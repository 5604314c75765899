//! `bkpool controller`: the Kubernetes operator. Every replica contends for the leader Lease,
//! serves `/healthz`, `/readyz` and `/metrics`, and serves the certificate API
//! (`--certapi-listen`); only the leader runs the reconcilers and the scaler (side by side),
//! and it stops both the moment it loses the Lease.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use control::certapi::replica::{Replica, ReplicaSettings};
use control::operator::Settings;
use control::operator::controller;
use control::operator::leader::LeaderElection;
use control::operator::metrics;
use control::operator::scaler;
use control::operator::watch::Scope;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct Args {
    /// Serve pools in this namespace only (default: all namespaces).
    #[arg(long, env = "BKPOOL_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Namespace of the leader Lease (the controller's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "bkpool-system")]
    lease_namespace: String,
    #[arg(long, default_value = "bkpool-controller")]
    lease_name: String,
    /// This replica's name in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "15s")]
    lease_duration: Duration,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    retry_period: Duration,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:9090")]
    listen: SocketAddr,
    /// The gateway Service's DNS name; pool Services are aliases of it.
    #[arg(long, default_value = "bkpool-gateway.bkpool-system.svc.cluster.local")]
    gateway_host: String,
    #[arg(long, default_value_t = 1234)]
    gateway_port: i32,
    /// A label of the gateway's namespace, KEY=VALUE (repeatable; default
    /// bkpool.dev/system=true). Pool NetworkPolicies admit gateway pods from it.
    #[arg(long = "gateway-namespace-label", value_parser = label)]
    gateway_namespace_labels: Vec<(String, String)>,
    /// A label of the gateway's pods, KEY=VALUE (repeatable; default
    /// app.kubernetes.io/name=bkpool-gateway).
    #[arg(long = "gateway-pod-label", value_parser = label)]
    gateway_pod_labels: Vec<(String, String)>,
    /// The gateway Service (in the controller's namespace, --lease-namespace) whose
    /// Endpoints list the gateway replicas the scaler polls for activity; ready and
    /// not-ready addresses are both polled.
    #[arg(long, default_value = "bkpool-gateway")]
    gateway_service: String,
    /// Name of the gateway Service's port serving GET /activity.
    #[arg(long, default_value = "admin")]
    gateway_admin_port_name: String,
    /// How often the scaler polls every gateway replica's activity and decides every pool.
    /// A report older than three intervals counts as stale: no scale-down on it.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    activity_interval: Duration,
    /// How long every gateway replica must acknowledge a drain with no connection open or
    /// held before the scale-down. Keep it above the gateway's backend connect timeout (3 s
    /// by default): a connection routed just before the mark reached a gateway is counted
    /// as open once its backend answers, or fails within that timeout.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    drain_settle: Duration,
    /// Kubeconfig file (default: in-cluster, then $KUBECONFIG).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Where the gateway's certificates are published for it: a namespace holding nothing
    /// else, as the gateway may read every Secret there.
    #[arg(long, default_value = control::operator::publish::DEFAULT_NAMESPACE)]
    gateway_secret_namespace: String,
    /// Address of the certificate API (HTTPS), served by every replica.
    #[arg(long, default_value = "0.0.0.0:8444")]
    certapi_listen: SocketAddr,
    /// The audience ServiceAccount tokens must be issued for (repeatable).
    #[arg(long = "certapi-audience", default_value = "bkpool")]
    certapi_audiences: Vec<String>,
    /// A name clients reach the certificate API by, beyond the bkpool-certapi Service's
    /// (DNS name or IP address, repeatable): it is put on the API's certificate.
    #[arg(long = "certapi-name")]
    certapi_names: Vec<String>,
    /// CA certificates (PEM file) to trust OIDC issuers with, instead of the system's.
    #[arg(long)]
    certapi_oidc_roots: Option<PathBuf>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let client = client(args.kubeconfig.as_deref()).await?;
    let identity = args.identity.clone().unwrap_or_else(hostname);
    let election = LeaderElection::new(
        client.clone(),
        &args.lease_namespace,
        &args.lease_name,
        &identity,
    )
    .with_timings(args.lease_duration, args.retry_period);
    let mut registry = Registry::default();
    let metrics = metrics::Metrics::register(&mut registry);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let certapi_listener = tokio::net::TcpListener::bind(args.certapi_listen)
        .await
        .with_context(|| format!("binding {}", args.certapi_listen))?;
    tracing::info!(addr = %listener.local_addr()?, certapi = %certapi_listener.local_addr()?, %identity, "controller admin endpoint");
    let scope = args.namespace.clone().map_or(Scope::All, Scope::Namespace);
    let mut settings = Settings {
        gateway_secret_namespace: args.gateway_secret_namespace.clone(),
        gateway_host: args.gateway_host.clone(),
        gateway_port: args.gateway_port,
        ..Settings::default()
    };
    let oidc_roots = match &args.certapi_oidc_roots {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading --certapi-oidc-roots {}", path.display()))?;
            control::https::HttpsClient::with_roots_pem(&pem)
                .with_context(|| format!("--certapi-oidc-roots {}", path.display()))?;
            Some(pem)
        }
        None => None,
    };
    let certapi = Replica::new(
        client.clone(),
        &ReplicaSettings {
            namespace: args.lease_namespace.clone(),
            scope: scope.clone(),
            audiences: args.certapi_audiences.clone(),
            server_names: args.certapi_names.clone(),
            oidc_roots,
            operator: settings.clone(),
        },
        &mut registry,
    );
    let certapi_ready = certapi.readiness();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_certapi = CancellationToken::new();
    let certapi = tokio::spawn(certapi.run(certapi_listener, stop_certapi.clone()));
    let admin = tokio::spawn(serve_admin(
        listener,
        Arc::new(Mutex::new(registry)),
        election.clone(),
        certapi_ready,
        stopped(stop_rx.clone()),
    ));
    let (leader_tx, mut leader_rx) = watch::channel(false);
    let contender = election.clone();
    let contending = tokio::spawn({
        let stop = stopped(stop_rx.clone());
        async move { contender.run(leader_tx, stop).await }
    });
    tokio::spawn(async move {
        crate::shutdown::requested().await;
        let _ = stop_tx.send(true);
    });
    if !args.gateway_namespace_labels.is_empty() {
        settings.gateway_namespace_labels = args.gateway_namespace_labels.iter().cloned().collect();
    }
    if !args.gateway_pod_labels.is_empty() {
        settings.gateway_pod_labels = args.gateway_pod_labels.iter().cloned().collect();
    }
    let scaling = scaler::Settings {
        gateway_namespace: args.lease_namespace.clone(),
        gateway_service: args.gateway_service.clone(),
        admin_port_name: args.gateway_admin_port_name.clone(),
        interval: args.activity_interval.max(Duration::from_millis(100)),
        drain_settle: args.drain_settle,
        ..scaler::Settings::default()
    };
    loop {
        tokio::select! {
            () = stopped(stop_rx.clone()) => break,
            changed = leader_rx.wait_for(|leader| *leader) => if changed.is_err() { break },
        }
        tracing::info!(%identity, "leading: reconciling and scaling");
        metrics.set_leader(true);
        let lost = || {
            let mut rx = leader_rx.clone();
            let stop = stopped(stop_rx.clone());
            async move {
                tokio::select! {
                    () = stop => {}
                    _ = rx.wait_for(|leader| !*leader) => {}
                }
            }
        };
        tokio::join!(
            controller::run(
                client.clone(),
                scope.clone(),
                settings.clone(),
                metrics.clone(),
                lost(),
            ),
            scaler::run(
                client.clone(),
                scope.clone(),
                scaling.clone(),
                metrics.clone(),
                lost(),
            ),
        );
        metrics.set_leader(false);
        tracing::info!(%identity, "stopped reconciling and scaling");
    }
    stop_certapi.cancel();
    let _ = certapi.await;
    let _ = contending.await;
    let _ = admin.await;
    Ok(())
}

/// A client from `kubeconfig`, or in-cluster configuration, or `$KUBECONFIG`.
pub(crate) async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let options = kube::config::KubeConfigOptions::default();
            kube::Config::from_custom_kubeconfig(file, &options).await?
        }
        None => kube::Config::infer().await.context("finding the cluster")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// Completes once `stop` turns true.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[derive(Clone)]
struct Admin {
    registry: Arc<Mutex<Registry>>,
    election: LeaderElection,
    certapi_ready: Arc<AtomicBool>,
}

async fn serve_admin(
    listener: tokio::net::TcpListener,
    registry: Arc<Mutex<Registry>>,
    election: LeaderElection,
    certapi_ready: Arc<AtomicBool>,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Admin {
            registry,
            election,
            certapi_ready,
        });
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(error = %e, "admin endpoint failed");
    }
}

/// Ready while the API server answers and the certificate API serves: a standby is ready too
/// (it serves certificates, and takes over reconciling on its own).
async fn readyz(State(admin): State<Admin>) -> (StatusCode, &'static str) {
    if !admin.election.api_reachable() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the API server is not reachable",
        )
    } else if !admin.certapi_ready.load(Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the certificate API is not serving yet",
        )
    } else {
        (StatusCode::OK, "ok")
    }
}

async fn metrics_text(
    State(admin): State<Admin>,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    let mut text = String::new();
    let registry = admin.registry.lock().unwrap_or_else(|p| p.into_inner());
    let status = match prometheus_client::encoding::text::encode(&mut text, &registry) {
        Ok(()) => StatusCode::OK,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    (status, [("content-type", content_type)], text)
}

fn label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| format!("bkpool-controller-{}", std::process::id()))
}
