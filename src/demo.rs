//! `bkpool demo`: placeholder until the PKI lands.

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_: Args) -> anyhow::Result<()> {
    anyhow::bail!("not available yet")
}
