//! `bkpool cert issue`: a short-lived client certificate for one local pool, written as the
//! directory `buildctl --tlsdir` reads, with the commands that use it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use control::local_config::LocalConfig;
use control::pki::{LocalPki, write_tls_dir};
use proxy::names::{ClientIdentity, PoolId};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Issue a client certificate for a pool and write ca.pem, cert.pem and key.pem.
    Issue(IssueArgs),
}

#[derive(clap::Args)]
pub struct IssueArgs {
    /// The pool (`name`, or `namespace/name`).
    #[arg(long)]
    pool: String,
    /// Who the certificate is for; defaults to $USER@hostname.
    #[arg(long)]
    identity: Option<String>,
    /// Lifetime, at most the pool's `max_cert_ttl`.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Directory to write ca.pem, cert.pem and key.pem (0600) into.
    #[arg(long)]
    out: PathBuf,
    /// State directory of `bkpool local` (holds the PKI).
    #[arg(long, env = "BKPOOL_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// The `bkpool local` configuration (the embedded default when absent).
    #[arg(long, short, env = "BKPOOL_CONFIG")]
    config: Option<PathBuf>,
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Issue(args) => issue(args),
    }
}

fn issue(args: IssueArgs) -> anyhow::Result<()> {
    let config = crate::local_cmd::load_config(args.config.as_deref())?;
    let id: PoolId = args.pool.parse().context("--pool")?;
    let Some(pool) = config.pool(&id) else {
        let known: Vec<&str> = config.pools.iter().map(|p| p.id.as_str()).collect();
        bail!(
            "no pool {id} in the configuration (pools: {})",
            known.join(", ")
        );
    };
    if args.ttl > pool.max_cert_ttl || args.ttl.is_zero() {
        bail!(
            "--ttl {} is not allowed for pool {id}: it must be above zero and at most its max_cert_ttl ({})",
            humantime::format_duration(args.ttl),
            humantime::format_duration(pool.max_cert_ttl)
        );
    }
    let identity = match args.identity {
        Some(id) => id,
        None => default_identity(),
    };
    let identity = ClientIdentity::new(&identity).context("--identity")?;
    let state_dir = pki_state_dir(args.state_dir, args.config.as_deref())?;
    let pki_dir = state_dir.join("pki");
    let ids = [id.clone()];
    let Some(pki) = LocalPki::open_existing(&pki_dir, &ids)? else {
        bail!(
            "no PKI in {}: start `bkpool local` with this state directory first (it creates \
             the PKI), or name the state directory of the one that runs with --state-dir",
            state_dir.display()
        );
    };
    let Some(ca) = pki.pool_ca(&id) else {
        bail!(
            "pool {id} has no client CA in {}: restart `bkpool local` with this configuration \
             (it creates the CAs of new pools)",
            pki_dir.display()
        );
    };
    let issued = ca.issue_client(&id, &identity, args.ttl)?;
    let key = issued.key_pem.as_deref().context("a generated key")?;
    write_tls_dir(
        &args.out,
        pki.gateway_ca().cert_pem(),
        &issued.cert_pem,
        key,
    )?;
    print!(
        "{}",
        instructions(&args.out, &config, &id, &identity, args.ttl)
    );
    Ok(())
}

/// Where the PKI to issue from is: the `--state-dir` given, else that of the `bkpool local`
/// running with the same configuration, else the default. A certificate from any PKI but the
/// running instance's would be refused by its gateway, so a `--state-dir` naming another one
/// is refused, naming both.
fn pki_state_dir(given: Option<PathBuf>, config: Option<&Path>) -> anyhow::Result<PathBuf> {
    let running = crate::instances::running_with(config);
    let Some(given) = given else {
        return match running.as_slice() {
            [] => crate::local_cmd::state_dir(None),
            [one] => Ok(one.state_dir.clone()),
            several => {
                let list: Vec<String> = several
                    .iter()
                    .map(|i| format!("{} (pid {})", i.state_dir.display(), i.pid))
                    .collect();
                bail!(
                    "{} `bkpool local` instances run with this configuration, with state \
                     directories {}: name one with --state-dir",
                    several.len(),
                    list.join(", ")
                )
            }
        };
    };
    if let [one] = running.as_slice() {
        let same = std::fs::canonicalize(&given).ok() == std::fs::canonicalize(&one.state_dir).ok();
        if !same {
            bail!(
                "the `bkpool local` running with this configuration (pid {}) uses the state \
                 directory {}, not {}: its gateway would refuse a certificate issued from {}",
                one.pid,
                one.state_dir.display(),
                given.display(),
                given.display()
            );
        }
    }
    Ok(given)
}

/// The local PKI with a client CA for every configured pool.
pub fn open_pki(state_dir: &Path, config: &LocalConfig) -> anyhow::Result<LocalPki> {
    let ids: Vec<PoolId> = config.pools.iter().map(|p| p.id.clone()).collect();
    let dir = state_dir.join("pki");
    LocalPki::open_or_init(&dir, &ids, &[])
        .with_context(|| format!("opening the PKI in {}", dir.display()))
}

fn instructions(
    out: &Path,
    config: &LocalConfig,
    pool: &PoolId,
    identity: &ClientIdentity,
    ttl: Duration,
) -> String {
    let dir = out.display();
    let addr = config.listen;
    format!(
        "Wrote {dir}/ca.pem, {dir}/cert.pem and {dir}/key.pem for {} in pool {pool}, valid {}.\n\n\
         Build through the gateway:\n  \
         buildctl --addr tcp://{addr} --tlsdir {dir} build --frontend dockerfile.v0 --local context=. --local dockerfile=.\n\
         (or --tlscacert {dir}/ca.pem --tlscert {dir}/cert.pem --tlskey {dir}/key.pem; the gateway's certificate names 127.0.0.1, ::1, localhost and this host)\n\n\
         Or with docker buildx:\n  \
         docker buildx create --name bkpool --driver remote --driver-opt cacert={dir}/ca.pem,cert={dir}/cert.pem,key={dir}/key.pem tcp://{addr}\n  \
         docker buildx build --builder bkpool .\n",
        identity.as_str(),
        humantime::format_duration(ttl),
    )
}

/// `$USER@hostname`, as far as they are known.
fn default_identity() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "user".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{user}@{host}")
}
