//! `bkpool local`: the gateway, the control loop and the local process driver in one
//! process. Pools sleep when idle and wake on the first authenticated connection; the PKI
//! lives in the state directory so clients keep trusting the gateway across restarts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use control::backend_leg::BackendLeg;
use control::certapi::Warmer;
use control::certapi::config::{Assembled, CertApiConfig, assemble};
use control::driver::{LocalDriver, ProcessSpec};
use control::local_config::{LocalConfig, ReplicaCommand};
use control::scale::local::LocalReplicas;
use control::scale::{Scaler, status};
use prometheus_client::registry::Registry;
use proxy::config::CertFiles;
use proxy::names::PoolId;
use proxy::server::{self, Options};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct Args {
    /// Local configuration (TOML); without it, one pool `default` running buildkitd.
    #[arg(long, short, env = "BKPOOL_CONFIG")]
    config: Option<PathBuf>,
    /// Where the PKI, replica roots and logs live [default: $XDG_STATE_HOME/bkpool or
    /// ~/.local/state/bkpool].
    #[arg(long, env = "BKPOOL_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Run the built-in stand-in backend instead of buildkitd, to try the gateway without it.
    #[arg(long)]
    standin: bool,
    /// Also serve the certificate API, configured as `bkpool certapi`'s (TOML), over this
    /// instance's PKI: `pki_dir` and `endpoints` default to this instance's, and its pools
    /// (`local/NAME`) must be pools of this configuration. Issuing a certificate for a
    /// sleeping pool, or `POST .../wake`, wakes it through the same scaler as a connection.
    #[arg(long, env = "BKPOOL_LOCAL_CERTAPI")]
    certapi: Option<PathBuf>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut config = load_config(args.config.as_deref())?;
    if args.standin {
        config.use_standin();
    }
    let state_dir = state_dir(args.state_dir)?;
    let pki = crate::cert_cmd::open_pki(&state_dir, &config)?;
    let leg = BackendLeg::issue(&pki).context("issuing the backend leg's certificates")?;
    let specs = process_specs(&config, leg.replica_dir())?;
    let server_cert = CertFiles {
        cert: pki.server_cert_path(),
        key: pki.server_key_path(),
    };
    let gateway_config = config.gateway(server_cert, |id| pki.pool_ca_path(id), &leg.gateway_tls());

    let driver = LocalDriver::new(state_dir.clone(), config.ports.clone());
    let mtls_pools = config
        .pools
        .iter()
        .filter(|p| p.replica.mtls())
        .map(|p| p.id.clone());
    let probe_tls = leg
        .client_config()
        .context("loading the backend leg's client certificate")?;
    let replicas =
        Arc::new(LocalReplicas::new(driver.clone(), specs).with_tls(mtls_pools, probe_tls));
    let mut registry = Registry::default();
    let policies = config
        .pools
        .iter()
        .map(|p| (p.id.clone(), p.scaling.clone()));
    let scaler = Scaler::new(replicas, policies, config.scaler.clone(), &mut registry);
    // Before the gateway starts: the API may add names to the server certificate both share.
    let certapi = match &args.certapi {
        Some(path) => Some(certapi(path, &config, &pki, &scaler, &mut registry).await?),
        None => None,
    };
    let upstreams = scaler.clone();
    let options = Options {
        upstream: Box::new(move |pool| {
            upstreams
                .upstream(&pool.id)
                .expect("every gateway pool is a scaler pool")
        }),
        admin_routes: status::router(scaler.clone()),
        registry,
        routes_later: false,
    };
    let running = server::start(&gateway_config, options).await?;
    let stop_loop = CancellationToken::new();
    let control_loop = tokio::spawn({
        let (scaler, stop) = (scaler.clone(), stop_loop.clone());
        let activity = running.gateway.activity().clone();
        async move { scaler.run(activity, stop).await }
    });
    let stop_api = CancellationToken::new();
    let certapi = certapi.map(|(listener, assembled)| {
        let router = control::certapi::router(assembled.state);
        let stop = stop_api.clone();
        tokio::spawn(async move {
            control::certapi::serve(listener, assembled.tls, router, stop.cancelled_owned()).await
        })
    });
    tracing::info!(state_dir = %state_dir.display(), pki = %pki.dir().display(), pools = config.pools.len(), "bkpool local ready");
    // So that `bkpool cert issue` finds this state directory (and PKI) without being told.
    let _registration = crate::instances::register(&state_dir, args.config.as_deref());

    let stop = running.shutdown_token();
    tokio::select! {
        () = crate::shutdown::requested() => {}
        () = stop.cancelled() => {}
    }
    // Connections first (they may still need their replicas), then the replicas.
    running.shutdown().await;
    stop_api.cancel();
    if let Some(api) = certapi {
        let _ = api.await;
    }
    stop_loop.cancel();
    let _ = control_loop.await;
    scaler.shutdown().await;
    driver.stop_all().await.context("stopping replicas")?;
    tracing::info!("bkpool local stopped");
    Ok(())
}

/// The certificate API of `path` over this instance's PKI, waking pools through `scaler`:
/// its listener, bound, and its state.
async fn certapi(
    path: &Path,
    config: &LocalConfig,
    pki: &control::pki::LocalPki,
    scaler: &Scaler,
    registry: &mut Registry,
) -> anyhow::Result<(TcpListener, Assembled)> {
    let mut api =
        CertApiConfig::load(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    api.pki_dir.get_or_insert_with(|| pki.dir().to_owned());
    if api.endpoints.is_empty() {
        api.endpoints = vec![config.listen.to_string()];
    }
    let ours: Vec<&PoolId> = config.pools.iter().map(|p| &p.id).collect();
    if let Some(stranger) = api.pools.iter().find(|p| !ours.contains(&&p.id)) {
        let ours: Vec<String> = ours.iter().map(|id| id.to_string()).collect();
        anyhow::bail!(
            "{}: pool {} is not a pool of this instance ({})",
            path.display(),
            stranger.id,
            ours.join(", ")
        );
    }
    let warmer: Arc<dyn Warmer> = Arc::new(scaler.clone());
    let assembled = assemble(&api, Some(warmer), registry)
        .with_context(|| format!("{}: assembling the certificate API", path.display()))?;
    let listener = TcpListener::bind(api.listen)
        .await
        .with_context(|| format!("binding the certificate API on {}", api.listen))?;
    tracing::info!(listen = %listener.local_addr()?, pools = api.pools.len(), "certificate API listening");
    Ok((listener, assembled))
}

/// The configuration file, or the embedded default.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<LocalConfig> {
    match path {
        None => Ok(LocalConfig::embedded()),
        Some(path) => {
            LocalConfig::load(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
        }
    }
}

/// `--state-dir`, else `$XDG_STATE_HOME/bkpool`, else `~/.local/state/bkpool`.
pub fn state_dir(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = given {
        return Ok(dir);
    }
    if let Some(xdg) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("bkpool"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .context("neither --state-dir, XDG_STATE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".local/state/bkpool"))
}

/// What each pool's replicas run, `{tls}` naming `tls` (the replicas' side of the backend
/// leg); refuses (before anything starts) a program not found.
fn process_specs(config: &LocalConfig, tls: &Path) -> anyhow::Result<HashMap<PoolId, ProcessSpec>> {
    let tls = tls.to_string_lossy();
    let fill = |s: &String| s.replace("{tls}", &tls);
    let mut specs = HashMap::new();
    for pool in &config.pools {
        let spec = match &pool.replica {
            ReplicaCommand::Standin { stop_grace } => ProcessSpec {
                program: std::env::current_exe().context("locating the bkpool binary")?,
                args: ["standin", "--listen", "{addr}", "--tls", &tls]
                    .map(String::from)
                    .to_vec(),
                env: Vec::new(),
                grace: *stop_grace,
            },
            ReplicaCommand::Command {
                program,
                args,
                env,
                stop_grace,
                ..
            } => ProcessSpec {
                program: find_program(program).with_context(|| not_found(program, &pool.id))?,
                args: args.iter().map(fill).collect(),
                env: env.iter().map(|(k, v)| (k.clone(), fill(v))).collect(),
                grace: *stop_grace,
            },
        };
        specs.insert(pool.id.clone(), spec);
    }
    Ok(specs)
}

fn not_found(program: &str, pool: &PoolId) -> String {
    format!(
        "{program} (the replica command of pool {pool}) is not on PATH. Install BuildKit \
         (https://github.com/moby/buildkit/releases) or set [pool.replica] command in a --config \
         file; to try the gateway without it, run `bkpool local --standin`, which starts the \
         built-in stand-in backend instead"
    )
}

/// `program` itself if it names a path, else the first executable of that name on PATH.
fn find_program(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = PathBuf::from(program);
        return executable(&path).then_some(path);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_on_path_or_refused_with_the_standin_option() {
        assert!(find_program("sh").is_some());
        assert_eq!(find_program("/bin/sh"), Some(PathBuf::from("/bin/sh")));
        let mut config = LocalConfig::parse(
            "[[pool]]\nname = \"a\"\n[pool.replica]\ncommand = [\"bkpool-no-such-program\", \"{tls}\"]\n",
            Path::new("."),
        )
        .unwrap();
        let tls = Path::new("/state/pki/backend/replica");
        let e = process_specs(&config, tls).unwrap_err().to_string();
        assert!(e.contains("not on PATH") && e.contains("--standin"), "{e}");
        config.use_standin();
        let specs = process_specs(&config, tls).unwrap();
        let spec = &specs[&"a".parse().unwrap()];
        assert_eq!(
            spec.args,
            [
                "standin",
                "--listen",
                "{addr}",
                "--tls",
                "/state/pki/backend/replica"
            ]
        );
        let buildkitd = LocalConfig::parse("[[pool]]\nname = \"a\"\n[pool.replica]\ncommand = [\"sh\", \"--tlscert={tls}/cert.pem\"]\n", Path::new(".")).unwrap();
        let specs = process_specs(&buildkitd, tls).unwrap();
        assert_eq!(
            specs[&"a".parse().unwrap()].args,
            ["--tlscert=/state/pki/backend/replica/cert.pem"]
        );
    }

    #[test]
    fn the_state_dir_defaults_under_the_home_directory() {
        assert_eq!(state_dir(Some("/x".into())).unwrap(), Path::new("/x"));
    }
}
