//! `bkpool gateway --config FILE`: the standalone gateway with static backends.

use std::path::PathBuf;

use anyhow::Context;
use proxy::config::GatewayConfig;
use proxy::server::{self, Options};

#[derive(clap::Args)]
pub struct Args {
    /// Gateway configuration (TOML).
    #[arg(long, short, env = "BKPOOL_CONFIG")]
    config: PathBuf,
    /// Check the configuration and every file it names, then exit without binding.
    #[arg(long)]
    check: bool,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let config = GatewayConfig::load(&args.config)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
    let empty: Vec<String> = config
        .pools
        .iter()
        .filter(|p| p.backends.is_empty())
        .map(|p| p.id.to_string())
        .collect();
    if !empty.is_empty() {
        anyhow::bail!(
            "{}: pools without backends: {} (the standalone gateway needs static backends)",
            args.config.display(),
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
