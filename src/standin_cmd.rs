//! `bkpool standin --listen ADDR` (hidden): the built-in stand-in backend as a replica
//! process, so `bkpool local --standin` runs real processes without buildkitd.

use std::net::SocketAddr;

use anyhow::Context;

#[derive(clap::Args)]
pub struct Args {
    /// Address to serve the gRPC health check and the echo on.
    #[arg(long)]
    listen: SocketAddr,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(listen = %args.listen, "stand-in backend serving");
    control::standin::serve(listener, crate::shutdown::requested()).await;
    Ok(())
}
