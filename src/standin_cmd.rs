//! `bkpool standin --listen ADDR` (hidden): the built-in stand-in backend as a replica
//! process, so `bkpool local --standin` runs real processes without buildkitd.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args)]
pub struct Args {
    /// Address to serve the gRPC health check and the echo on.
    #[arg(long)]
    listen: SocketAddr,
    /// Serve mTLS with cert.pem and key.pem from this directory, to clients with a
    /// certificate of its ca.pem (as `bkpool local`'s replicas do).
    #[arg(long)]
    tls: Option<PathBuf>,
    /// If this file exists, remove it and play a broken replica: the health check passes,
    /// every other connection gets the echo of its first bytes, then a reset. Only the first
    /// replica started finds the file, so its replacement serves.
    #[arg(long, value_name = "FILE")]
    flap_once: Option<PathBuf>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let tls = match &args.tls {
        Some(dir) => Some(control::standin::tls_config(dir).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let config = control::standin::Config {
        flap: args
            .flap_once
            .is_some_and(|file| std::fs::remove_file(file).is_ok()),
        ..Default::default()
    };
    tracing::info!(listen = %args.listen, mtls = tls.is_some(), flap = config.flap, "stand-in backend serving");
    let shutdown = crate::shutdown::requested();
    match tls {
        Some(tls) => control::standin::serve_tls(listener, tls, config, shutdown).await,
        None => control::standin::serve_with(listener, config, shutdown).await,
    }
    Ok(())
}
