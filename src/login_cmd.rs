//! `bkpool login --server URL --pool NS/NAME`: trade a CI token for a short-lived client
//! certificate. The key and CSR are made here and the key never leaves this machine; the
//! answer is written as `ca.pem`, `cert.pem` and `key.pem` (0600), the layout
//! `buildctl --tlsdir` reads. With `--exec -- CMD...` the command runs with the certificates
//! in place and `BUILDKIT_HOST` set, and its exit status becomes ours.
//!
//! The certificate API's own CA is pinned with `--ca FILE`, or read with `--ca-configmap`
//! from the ConfigMap the operator publishes (`bkpool-system/bkpool-certapi-ca`, key
//! `ca.crt`), through the API server, whose identity the pod's (or the kubeconfig's) cluster
//! CA vouches for.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use control::certapi::handlers::IssueResponse;
use control::https::HttpsClient;
use proxy::names::PoolId;
use serde::Deserialize;

/// Where Kubernetes mounts a pod's ServiceAccount token.
pub const SERVICEACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// Where the operator publishes the certificate API's CA bundle.
pub const DEFAULT_CA_CONFIGMAP: &str = "bkpool-system/bkpool-certapi-ca";

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true)
    .args(["token_file", "github_actions", "serviceaccount"])))]
pub struct Args {
    /// The certificate API, e.g. https://bkpool-certapi.bkpool-system.svc:8444.
    #[arg(long, env = "BKPOOL_SERVER")]
    server: String,
    /// The pool, NAMESPACE/NAME.
    #[arg(long, env = "BKPOOL_POOL")]
    pool: String,
    /// Read the bearer token from this file.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Ask GitHub Actions for an OIDC token (needs `permissions: id-token: write`).
    #[arg(long)]
    github_actions: bool,
    /// Use the pod's ServiceAccount token (a projected token file; default path if none given).
    #[arg(long, num_args = 0..=1, default_missing_value = SERVICEACCOUNT_TOKEN)]
    serviceaccount: Option<PathBuf>,
    /// Audience to request from GitHub Actions.
    #[arg(long, default_value = "bkpool")]
    audience: String,
    /// CA certificate(s) to trust the certificate API with (default: the system's).
    #[arg(long, conflicts_with = "ca_configmap")]
    ca: Option<PathBuf>,
    /// Read the certificate API's CA from this ConfigMap (NAMESPACE/NAME, key ca.crt) through
    /// the API server: in a pod with its own credentials, elsewhere with --kubeconfig.
    #[arg(long, num_args = 0..=1, default_missing_value = DEFAULT_CA_CONFIGMAP, value_name = "NAMESPACE/NAME")]
    ca_configmap: Option<String>,
    /// Kubeconfig for --ca-configmap (default: the pod's in-cluster credentials).
    #[arg(long, requires = "ca_configmap")]
    kubeconfig: Option<PathBuf>,
    /// Certificate lifetime to ask for (capped by the pool), e.g. 30m.
    #[arg(long)]
    ttl: Option<String>,
    /// Directory to write ca.pem, cert.pem and key.pem to.
    #[arg(long, default_value = ".bkpool/tls")]
    out: PathBuf,
    /// Run the command after `--` with the certificates in place and exit with its status.
    #[arg(long, requires = "command")]
    exec: bool,
    /// The command `--exec` runs (BUILDKIT_HOST, BKPOOL_TLS_DIR, BKPOOL_TLS_CA/_CERT/_KEY set).
    #[arg(last = true, value_name = "COMMAND", requires = "exec")]
    command: Vec<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    reason: String,
    message: String,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let pool: PoolId = args
        .pool
        .parse()
        .with_context(|| format!("--pool {:?}", args.pool))?;
    if !args.pool.contains('/') {
        bail!("--pool must be NAMESPACE/NAME");
    }
    let token = token(&args).await?;
    let (csr_pem, key_pem) = make_csr()?;
    let answer = request(&args, &pool, &token, &csr_pem).await?;
    control::pki::write_tls_dir(&args.out, &answer.ca, &answer.certificate, &key_pem)
        .context("writing the certificates")?;
    let endpoint = answer.endpoints.first().cloned().unwrap_or_default();
    eprintln!(
        "bkpool: certificate for {} as {} written to {} (expires {})",
        answer.pool,
        answer.identity,
        args.out.display(),
        answer.expires
    );
    if args.exec {
        return exec(&args.command, &args.out, &endpoint);
    }
    print_usage(&args.out, &endpoint);
    Ok(ExitCode::SUCCESS)
}

async fn token(args: &Args) -> anyhow::Result<String> {
    let text = if let Some(path) = &args.token_file {
        read_token(path)?
    } else if let Some(path) = &args.serviceaccount {
        read_token(path)?
    } else {
        github_actions_token(&args.audience).await?
    };
    if text.is_empty() {
        bail!("the token is empty");
    }
    Ok(text)
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.trim().to_owned())
}

/// GitHub Actions' OIDC token for `audience`, from the runner's token endpoint.
async fn github_actions_token(audience: &str) -> anyhow::Result<String> {
    let (Ok(url), Ok(bearer)) = (
        std::env::var("ACTIONS_ID_TOKEN_REQUEST_URL"),
        std::env::var("ACTIONS_ID_TOKEN_REQUEST_TOKEN"),
    ) else {
        bail!(
            "ACTIONS_ID_TOKEN_REQUEST_URL/_TOKEN are not set: run inside GitHub Actions with `permissions: id-token: write`"
        );
    };
    let separator = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{separator}audience={}", encode_query(audience));
    let client = HttpsClient::system().context("trust anchors for the GitHub token endpoint")?;
    let response = client
        .get_authorized(&url, &bearer)
        .await
        .context("requesting the GitHub Actions OIDC token")?;
    if !response.status.is_success() {
        bail!(
            "the GitHub Actions token endpoint answered HTTP {}",
            response.status
        );
    }
    #[derive(Deserialize)]
    struct Answer {
        value: String,
    }
    let answer: Answer = serde_json::from_slice(&response.body)
        .context("the GitHub Actions token endpoint's answer has no token")?;
    Ok(answer.value)
}

/// A fresh P-256 key and a CSR for it (the API names the pool and identity itself).
fn make_csr() -> anyhow::Result<(String, String)> {
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating a key")?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)
        .context("making the CSR")?;
    Ok((csr.pem()?, key.serialize_pem()))
}

async fn request(
    args: &Args,
    pool: &PoolId,
    token: &str,
    csr_pem: &str,
) -> anyhow::Result<IssueResponse> {
    let client = match (&args.ca, &args.ca_configmap) {
        (Some(path), _) => {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading --ca {}", path.display()))?;
            HttpsClient::with_roots_pem(&pem)
        }
        (None, Some(configmap)) => {
            let pem = ca_from_configmap(configmap, args.kubeconfig.as_deref()).await?;
            HttpsClient::with_roots_pem(&pem)
        }
        (None, None) => HttpsClient::system(),
    }
    .context("trust anchors for the certificate API")?;
    let url = format!(
        "{}/v1/namespaces/{}/pools/{}/certificates",
        args.server.trim_end_matches('/'),
        pool.namespace(),
        pool.name()
    );
    let mut body = serde_json::json!({ "csr": csr_pem });
    if let Some(ttl) = &args.ttl {
        body["ttl"] = ttl.clone().into();
    }
    let response = client
        .post_json(&url, Some(token), serde_json::to_vec(&body)?)
        .await
        .context("contacting the certificate API")?;
    if !response.status.is_success() {
        let refusal: Option<ErrorBody> = serde_json::from_slice(&response.body).ok();
        match refusal {
            Some(e) => bail!(
                "certificate refused (HTTP {}, {}): {}",
                response.status.as_u16(),
                e.reason,
                e.message
            ),
            None => bail!("certificate API answered HTTP {}", response.status.as_u16()),
        }
    }
    serde_json::from_slice(&response.body).context("the certificate API's answer is not understood")
}

/// The `ca.crt` of ConfigMap `NAMESPACE/NAME`, read through the API server.
async fn ca_from_configmap(configmap: &str, kubeconfig: Option<&Path>) -> anyhow::Result<String> {
    let Some((namespace, name)) = configmap.split_once('/') else {
        bail!("--ca-configmap must be NAMESPACE/NAME, not {configmap:?}");
    };
    let kube = match kubeconfig {
        Some(path) => control::auth::KubeApi::from_kubeconfig(path),
        None => control::auth::KubeApi::in_cluster(),
    }
    .context("reaching the API server for --ca-configmap")?;
    let path = format!("/api/v1/namespaces/{namespace}/configmaps/{name}");
    let answer = kube
        .get(&path)
        .await
        .with_context(|| format!("reading ConfigMap {configmap}"))?;
    let key = control::certapi::serving::CA_CONFIGMAP_KEY;
    match answer["data"][key].as_str() {
        Some(pem) if pem.contains("BEGIN CERTIFICATE") => Ok(pem.to_owned()),
        _ => bail!("ConfigMap {configmap} has no certificate under {key}"),
    }
}

fn print_usage(dir: &Path, endpoint: &str) {
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let d = dir.display();
    println!("buildctl --addr tcp://{endpoint} --tlsdir {d} build ...");
    println!(
        "docker buildx create --name bkpool --driver remote --driver-opt cacert={d}/ca.pem,cert={d}/cert.pem,key={d}/key.pem tcp://{endpoint}"
    );
}

fn exec(command: &[String], dir: &Path, endpoint: &str) -> anyhow::Result<ExitCode> {
    let (program, rest) = command
        .split_first()
        .context("--exec needs a command after --")?;
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let status = std::process::Command::new(program)
        .args(rest)
        .env("BUILDKIT_HOST", format!("tcp://{endpoint}"))
        .env("BKPOOL_TLS_DIR", &dir)
        .env("BKPOOL_TLS_CA", dir.join("ca.pem"))
        .env("BKPOOL_TLS_CERT", dir.join("cert.pem"))
        .env("BKPOOL_TLS_KEY", dir.join("key.pem"))
        .status()
        .with_context(|| format!("running {program}"))?;
    let code = status.code().unwrap_or(128);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

fn encode_query(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
