//! `bkpool gateway`: the standalone gateway with static backends (`--config FILE`), or, with
//! `--kubernetes`, the gateway of a cluster: routes, certificates and backends from the
//! cluster's pools, Secrets and pods.

use std::path::{Path, PathBuf};

use anyhow::Context;
use control::gateway::{self as kube_gateway, Metrics};
use control::operator::watch::Scope;
use prometheus_client::registry::Registry;
use proxy::config::GatewayConfig;
use proxy::server::{self, Options};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct Args {
    /// Gateway configuration (TOML). With --kubernetes it sets listeners, limits and timeouts
    /// only (pools come from the cluster) and may be left out.
    #[arg(
        long,
        short,
        env = "BKPOOL_CONFIG",
        required_unless_present = "kubernetes"
    )]
    config: Option<PathBuf>,
    /// Check the configuration and every file it names, then exit without binding.
    #[arg(long, conflicts_with = "kubernetes")]
    check: bool,
    /// Serve the cluster's BuildKitPools.
    #[arg(long)]
    kubernetes: bool,
    /// With --kubernetes: serve pools in this namespace only (default: all namespaces).
    #[arg(long, env = "BKPOOL_WATCH_NAMESPACE", requires = "kubernetes")]
    namespace: Option<String>,
    /// With --kubernetes: serve only pools matching this label selector.
    #[arg(long, requires = "kubernetes")]
    pool_selector: Option<String>,
    /// Kubeconfig file (default: in-cluster, then $KUBECONFIG).
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// With --kubernetes: the namespace the controller publishes the gateway's certificates
    /// in (its --gateway-secret-namespace); the only one whose Secrets the gateway reads.
    #[arg(
        long,
        default_value = control::operator::publish::DEFAULT_NAMESPACE,
        requires = "kubernetes"
    )]
    secret_namespace: String,
}

/// Listeners of a Kubernetes gateway run without a configuration file.
const KUBERNETES_DEFAULTS: &str = "listen = \"0.0.0.0:1234\"\nadmin = \"0.0.0.0:9235\"\n";

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.kubernetes {
        return run_kubernetes(args).await;
    }
    let path = args.config.as_deref().context("--config is required")?;
    let config = load(path)?;
    let empty: Vec<String> = config
        .pools
        .iter()
        .filter(|p| p.backends.is_empty())
        .map(|p| p.id.to_string())
        .collect();
    if !empty.is_empty() {
        anyhow::bail!(
            "{}: pools without backends: {} (the standalone gateway needs static backends)",
            path.display(),
            empty.join(", ")
        );
    }
    if args.check {
        server::check(&config).context("checking certificates")?;
        println!("configuration OK: {} pool(s)", config.pools.len());
        return Ok(());
    }
    let running = server::start(&config, Options::default()).await?;
    let stop = running.shutdown_token();
    tokio::select! {
        () = crate::shutdown::requested() => {}
        () = stop.cancelled() => {}
    }
    running.shutdown().await;
    Ok(())
}

async fn run_kubernetes(args: Args) -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let config = match &args.config {
        Some(path) => load(path)?,
        None => GatewayConfig::parse(KUBERNETES_DEFAULTS, Path::new("."))
            .map_err(|e| anyhow::anyhow!("built-in defaults: {e}"))?,
    };
    if !config.pools.is_empty() {
        anyhow::bail!("with --kubernetes, pools come from the cluster: remove the [[pool]] tables");
    }
    let client = crate::controller_cmd::client(args.kubeconfig.as_deref()).await?;
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let options = Options {
        registry,
        routes_later: true,
        ..Options::default()
    };
    let running = server::start(&config, options).await?;
    let settings = kube_gateway::Settings {
        scope: args.namespace.clone().map_or(Scope::All, Scope::Namespace),
        pool_selector: args.pool_selector.clone(),
        secret_namespace: args.secret_namespace.clone(),
        connect_timeout: config.timeouts.connect,
        idle_timeout: config.timeouts.idle,
    };
    let stop_feed = CancellationToken::new();
    let feed = tokio::spawn(kube_gateway::run(
        client,
        running.gateway.clone(),
        settings,
        metrics,
        stop_feed.clone(),
    ));
    let stop = running.shutdown_token();
    tokio::select! {
        () = crate::shutdown::requested() => {}
        () = stop.cancelled() => {}
    }
    // Drain with the routes as they are: held connections keep waiting for their pools.
    running.shutdown().await;
    stop_feed.cancel();
    let _ = feed.await;
    Ok(())
}

fn load(path: &Path) -> anyhow::Result<GatewayConfig> {
    GatewayConfig::load(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}
