//! `bkpool demo --out DIR`: everything needed to try the standalone gateway — a local PKI, a
//! client certificate per pool in the layout `buildctl --tlsdir` reads, and a gateway
//! configuration pointing at the given backends.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use control::pki::{LocalPki, write_tls_dir};
use proxy::names::{ClientIdentity, PoolId};

#[derive(clap::Args)]
pub struct Args {
    /// Directory to write into (created if missing; an existing PKI there is reused).
    #[arg(long)]
    out: PathBuf,
    /// Pools to configure, as NAME or NAME=BACKEND (default backend 127.0.0.1:1234).
    #[arg(long = "pool", default_value = "default")]
    pools: Vec<String>,
    /// Identity written into the client certificates.
    #[arg(long, default_value = "demo")]
    identity: String,
    /// Lifetime of the client certificates.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    ttl: Duration,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut pools = Vec::new();
    for spec in &args.pools {
        let (name, backend) = spec.split_once('=').unwrap_or((spec, "127.0.0.1:1234"));
        let id: PoolId = name.parse().with_context(|| format!("pool {name:?}"))?;
        let backend: SocketAddr = backend
            .parse()
            .with_context(|| format!("backend {backend:?} of pool {name}"))?;
        pools.push((id, backend));
    }
    let ids: Vec<PoolId> = pools.iter().map(|(id, _)| id.clone()).collect();
    // The configuration's paths are relative to the configuration file (as the gateway reads
    // them), so the directory works wherever it is, however `--out` was spelt.
    let out =
        std::path::absolute(&args.out).with_context(|| format!("--out {}", args.out.display()))?;
    let relative = |path: PathBuf| {
        path.strip_prefix(&out)
            .map(Path::to_path_buf)
            .unwrap_or(path)
    };
    let pki_dir = out.join("pki");
    let pki = LocalPki::open_or_init(&pki_dir, &ids, &[]).context("local PKI")?;
    let identity = ClientIdentity::new(&args.identity)?;

    let mut config =
        String::from("# Written by `bkpool demo`. Run: bkpool gateway --config gateway.toml\n");
    writeln!(
        config,
        "listen = \"127.0.0.1:1235\"\nadmin = \"127.0.0.1:9235\"\n"
    )?;
    writeln!(
        config,
        "[[server_cert]]\ncert = {:?}\nkey = {:?}",
        relative(pki.server_cert_path()),
        relative(pki.server_key_path())
    )?;
    for (id, backend) in &pools {
        let issued = pki
            .pool_ca(id)
            .expect("pool CA was created")
            .issue_client(id, &identity, args.ttl)?;
        let tls_dir = out.join("clients").join(id.namespace()).join(id.name());
        let key = issued.key_pem.as_deref().expect("a generated key");
        write_tls_dir(
            &tls_dir,
            pki.gateway_ca().cert_pem(),
            &issued.chain_pem(),
            key,
        )?;
        writeln!(
            config,
            "\n[[pool]]\nname = {:?}\nnamespace = {:?}",
            id.name(),
            id.namespace()
        )?;
        writeln!(
            config,
            "client_ca = {:?}\nbackends = [\"{backend}\"]",
            relative(pki.pool_ca_path(id))
        )?;
        println!(
            "pool {id}: backend {backend}, client certificate in {}",
            tls_dir.display()
        );
    }
    let path = out.join("gateway.toml");
    std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "configuration: {}\nrun: bkpool gateway --config {}",
        path.display(),
        path.display()
    );
    if let Some((id, _)) = pools.first() {
        let dir = out.join("clients").join(id.namespace()).join(id.name());
        println!(
            "then: buildctl --addr tcp://127.0.0.1:1235 --tlsdir {} debug workers",
            dir.display()
        );
    }
    Ok(())
}
