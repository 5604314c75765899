//! `bkpool certapi --config FILE`: the certificate API on its own, over the local PKI
//! directory, with `/metrics` on `--admin` (`bkpool local --certapi FILE` serves the same API
//! in-process, waking its pools).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::routing::get;
use control::certapi::config::{CertApiConfig, assemble};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(clap::Args)]
pub struct Args {
    /// Certificate API configuration (TOML).
    #[arg(long, short, env = "BKPOOL_CERTAPI_CONFIG")]
    config: PathBuf,
    /// Serve `/metrics` (plain HTTP) on this address.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Check the configuration and everything it names, then exit without binding.
    #[arg(long)]
    check: bool,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let config = CertApiConfig::load(&args.config)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
    let mut registry = Registry::default();
    let assembled =
        assemble(&config, None, &mut registry).context("assembling the certificate API")?;
    if args.check {
        println!("configuration OK: {} pool(s)", config.pools.len());
        return Ok(());
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let admin = match args.admin {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?,
        ),
        None => None,
    };
    tracing::info!(
        listen = %listener.local_addr()?,
        admin = %admin.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.to_string()).unwrap_or_default(),
        pools = config.pools.len(),
        "certificate API listening"
    );
    if let Some(admin) = admin {
        tokio::spawn(serve_metrics(admin, Arc::new(registry)));
    }
    let router = control::certapi::router(assembled.state);
    control::certapi::serve(
        listener,
        assembled.tls,
        router,
        crate::shutdown::requested(),
    )
    .await;
    Ok(())
}

async fn serve_metrics(listener: TcpListener, registry: Arc<Registry>) {
    let router = axum::Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut text = String::new();
                let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
                (
                    [(axum::http::header::CONTENT_TYPE, proxy::admin::OPENMETRICS)],
                    text,
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, router).await {
        tracing::warn!(error = %e, "metrics endpoint stopped");
    }
}
