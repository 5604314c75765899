//! The certificate API's configuration outside Kubernetes (`bkpool certapi --config FILE`):
//! parsed from TOML into typed values with every fault listed by field path, then assembled
//! into a running API over the local PKI directory.
//!
//! ```toml
//! listen = "127.0.0.1:8444"
//! pki_dir = "/var/lib/bkpool/pki"          # the gateway's PKI directory (required)
//! endpoints = ["127.0.0.1:8443"]           # the gateway, as clients reach it
//! static_tokens = "/etc/bkpool/tokens.toml" # optional
//! # generate_keys = false                  # true: honour {"generate_key": true} (key leaves the server)
//! # oidc_roots = "/etc/ssl/certs/ca-certificates.crt"  # CAs for OIDC issuers (default: system)
//! # audiences = ["bkpool"]                 # what ServiceAccount tokens must be issued for
//! # [kubernetes]                           # optional: ServiceAccount tokens
//! # kubeconfig = "/root/.kube/config"      # or: in_cluster = true
//!
//! [[pool]]
//! name = "ci/default"
//! max_ttl = "1h"
//! serviceaccounts = true                   # any account RBAC allows; or a list: ["builder", "tools/ci"]
//! [[pool.oidc]]
//! issuer = "https://token.actions.githubusercontent.com"
//! audiences = ["bkpool"]
//! claims = { repository_owner = "my-org", ref = ["refs/heads/main", "refs/tags/*"] }
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use proxy::names::PoolId;
use serde::Deserialize;

use super::directory::{DEFAULT_MAX_TTL, PoolEntry, StaticDirectory};
use super::{ApiMetrics, ApiState, NoWarmer, Warmer};
use crate::auth::jwks::{JwksCache, JwksLimits};
use crate::auth::rules::{ClaimRules, RawPatterns};
use crate::auth::{
    AuthMetrics, Authenticator, KubeApi, OidcTrust, PoolAuth, ServiceAccountName, ServiceAccounts,
    StaticTokens,
};
use crate::https::{HttpsClient, SYSTEM_ROOTS, is_https_url};
use crate::pki::{Ca, LocalPki};

/// No pool may hand out certificates living longer than this.
pub const MAX_TTL_CEILING: Duration = Duration::from_secs(24 * 3600);

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct CertApiConfig {
    pub listen: SocketAddr,
    /// The gateway's PKI directory; required (a caller embedding the API may fill it in after
    /// parsing).
    pub pki_dir: Option<PathBuf>,
    pub endpoints: Vec<String>,
    pub audiences: Vec<String>,
    pub static_tokens: Option<PathBuf>,
    pub oidc_roots: Option<PathBuf>,
    pub kubernetes: Option<KubeSource>,
    pub server_names: Vec<String>,
    pub pools: Vec<PoolConfig>,
    /// Whether the server may make a caller's key (`{"generate_key": true}`).
    pub generate_keys: bool,
}

/// Where the API server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeSource {
    InCluster,
    Kubeconfig(PathBuf),
}

/// One pool's settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub id: PoolId,
    pub max_ttl: Duration,
    pub auth: PoolAuth,
    pub endpoints: Option<Vec<String>>,
}

/// Why the configuration (or what it names) is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error(transparent)]
    StaticTokens(#[from] crate::auth::static_tokens::StaticTokensError),
    #[error(transparent)]
    Kube(#[from] crate::auth::kube::KubeError),
    #[error("OIDC trust anchors: {0}")]
    Roots(String),
    #[error("server certificate: {0}")]
    Tls(#[from] rustls::Error),
    #[error("pki_dir: required (the gateway's PKI directory)")]
    NoPkiDir,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: String,
    #[serde(default)]
    pki_dir: Option<PathBuf>,
    #[serde(default)]
    endpoints: Vec<String>,
    #[serde(default)]
    audiences: Option<Vec<String>>,
    #[serde(default)]
    static_tokens: Option<PathBuf>,
    #[serde(default)]
    oidc_roots: Option<PathBuf>,
    #[serde(default)]
    kubernetes: Option<RawKube>,
    #[serde(default)]
    server_names: Vec<String>,
    #[serde(default, rename = "pool")]
    pools: Vec<RawPool>,
    #[serde(default)]
    generate_keys: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKube {
    #[serde(default)]
    kubeconfig: Option<PathBuf>,
    #[serde(default)]
    in_cluster: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: String,
    #[serde(default)]
    max_ttl: Option<String>,
    #[serde(default)]
    serviceaccounts: RawServiceAccounts,
    #[serde(default)]
    endpoints: Option<Vec<String>>,
    #[serde(default)]
    oidc: Vec<RawOidc>,
}

/// `serviceaccounts = true` (whoever RBAC allows) or a list of `NAME` / `NAMESPACE/NAME`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawServiceAccounts {
    Rbac(bool),
    Listed(Vec<String>),
}

impl Default for RawServiceAccounts {
    fn default() -> Self {
        Self::Rbac(false)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOidc {
    issuer: String,
    audiences: Vec<String>,
    #[serde(default)]
    identity_claim: Option<String>,
    #[serde(default)]
    claims: BTreeMap<String, RawPatterns>,
}

impl CertApiConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = Self::parse(&text)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        Ok(config)
    }

    /// Parses and checks `text`, listing every fault with its field path.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Invalid(vec![e.to_string()]))?;
        let mut faults = Vec::new();
        let listen = raw
            .listen
            .parse()
            .map_err(|_| faults.push(format!("listen: {:?} is not host:port", raw.listen)));
        let kubernetes = match raw.kubernetes {
            None => None,
            Some(RawKube {
                kubeconfig: Some(p),
                in_cluster: false,
            }) => Some(KubeSource::Kubeconfig(p)),
            Some(RawKube {
                kubeconfig: None,
                in_cluster: true,
            }) => Some(KubeSource::InCluster),
            Some(_) => {
                faults.push("kubernetes: set exactly one of kubeconfig or in_cluster".into());
                None
            }
        };
        let uses_kube = raw
            .pools
            .iter()
            .any(|p| !matches!(p.serviceaccounts, RawServiceAccounts::Rbac(false)));
        let mut pools = Vec::new();
        for (i, p) in raw.pools.into_iter().enumerate() {
            if let Some(pool) = pool_config(i, p, &mut faults) {
                pools.push(pool);
            }
        }
        if uses_kube && kubernetes.is_none() {
            faults.push("pool: serviceaccounts needs a [kubernetes] section".into());
        }
        if raw.static_tokens.is_none() {
            for p in pools
                .iter()
                .filter(|p| !p.auth.serviceaccounts.accepts_any() && p.auth.issuers.is_empty())
            {
                faults.push(format!(
                    "pool {}: no way in (set serviceaccounts = true, add [[pool.oidc]], or name it in static_tokens)",
                    p.id
                ));
            }
        }
        let audiences = raw.audiences.unwrap_or_else(|| vec!["bkpool".into()]);
        if audiences.is_empty() || audiences.iter().any(String::is_empty) {
            faults.push("audiences: must list at least one non-empty audience".into());
        }
        match (listen, faults.is_empty()) {
            (Ok(listen), true) => Ok(Self {
                listen,
                pki_dir: raw.pki_dir,
                endpoints: raw.endpoints,
                audiences,
                static_tokens: raw.static_tokens,
                oidc_roots: raw.oidc_roots,
                kubernetes,
                server_names: raw.server_names,
                pools,
                generate_keys: raw.generate_keys,
            }),
            _ => Err(ConfigError::Invalid(faults)),
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        let join = |p: &mut PathBuf| *p = base.join(&*p);
        self.pki_dir.iter_mut().for_each(join);
        self.static_tokens.iter_mut().for_each(join);
        self.oidc_roots.iter_mut().for_each(join);
        if let Some(KubeSource::Kubeconfig(p)) = &mut self.kubernetes {
            join(p);
        }
    }
}

/// A certificate API assembled from configuration, ready to serve.
pub struct Assembled {
    pub state: Arc<ApiState>,
    pub tls: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for Assembled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assembled").finish_non_exhaustive()
    }
}

/// Opens the PKI (creating pool CAs that do not exist yet), loads tokens and trust anchors,
/// and builds the API state, with metrics registered in `registry`.
pub fn assemble(
    config: &CertApiConfig,
    warmer: Option<Arc<dyn Warmer>>,
    registry: &mut Registry,
) -> Result<Assembled, ConfigError> {
    let ids: Vec<PoolId> = config.pools.iter().map(|p| p.id.clone()).collect();
    let pki_dir = config.pki_dir.as_ref().ok_or(ConfigError::NoPkiDir)?;
    let pki = LocalPki::open_or_init(pki_dir, &ids, &config.server_names)?;
    let gateway_ca_pem = pki.gateway_ca().cert_pem().to_owned();
    let mut entries = Vec::new();
    for pool in &config.pools {
        let ca = Ca::load(&pki.pool_ca_path(&pool.id), &pki.pool_ca_key_path(&pool.id))?;
        entries.push(PoolEntry {
            id: pool.id.clone(),
            ca: Ok(Arc::new(ca)),
            max_ttl: pool.max_ttl,
            auth: pool.auth.clone(),
            endpoints: pool
                .endpoints
                .clone()
                .unwrap_or_else(|| config.endpoints.clone()),
            gateway_ca_pem: gateway_ca_pem.clone(),
        });
    }
    let jwks = Arc::new(JwksCache::new(oidc_client(config)?, JwksLimits::default()));
    let kube = match &config.kubernetes {
        None => None,
        Some(KubeSource::InCluster) => Some(KubeApi::in_cluster()?),
        Some(KubeSource::Kubeconfig(path)) => Some(KubeApi::from_kubeconfig(path)?),
    };
    let tokens = match &config.static_tokens {
        Some(path) => StaticTokens::load(path)?,
        None => StaticTokens::default(),
    };
    let auth_metrics = AuthMetrics::register(registry, &jwks);
    let auth = Authenticator::new(jwks, kube, config.audiences.clone())
        .with_static_tokens(tokens)
        .with_metrics(auth_metrics);
    let read = |p: PathBuf| crate::pki::files::read_text(&p);
    let tls = super::server_config(
        &read(pki.server_cert_path())?,
        &read(pki.server_key_path())?,
    )?;
    let state = ApiState::new(
        Arc::new(StaticDirectory::new(entries)),
        warmer.unwrap_or_else(|| Arc::new(NoWarmer)),
        auth,
        ApiMetrics::register(registry),
    )
    .generating_keys(config.generate_keys);
    Ok(Assembled {
        state: Arc::new(state),
        tls,
    })
}

fn oidc_client(config: &CertApiConfig) -> Result<HttpsClient, ConfigError> {
    let path = match &config.oidc_roots {
        Some(p) => p.clone(),
        None => match SYSTEM_ROOTS.iter().map(PathBuf::from).find(|p| p.exists()) {
            Some(p) => p,
            None if config.pools.iter().all(|p| p.auth.issuers.is_empty()) => {
                // No OIDC issuer to reach: trust the local gateway CA only, never used.
                pki_dir(config)?.join("gateway").join("ca.pem")
            }
            None => {
                return Err(ConfigError::Roots(
                    "no system CA bundle; set oidc_roots".into(),
                ));
            }
        },
    };
    let pem = crate::pki::files::read_text(&path)?;
    HttpsClient::with_roots_pem(&pem)
        .map(|c| c.max_body(256 * 1024).timeout(Duration::from_secs(5)))
        .map_err(|e| ConfigError::Roots(format!("{}: {e}", path.display())))
}

fn pki_dir(config: &CertApiConfig) -> Result<&Path, ConfigError> {
    config.pki_dir.as_deref().ok_or(ConfigError::NoPkiDir)
}

fn pool_config(i: usize, raw: RawPool, faults: &mut Vec<String>) -> Option<PoolConfig> {
    let at = format!("pool[{i}]");
    let id = raw
        .name
        .parse::<PoolId>()
        .map_err(|e| faults.push(format!("{at}.name: {e}")))
        .ok();
    let max_ttl = match raw.max_ttl.as_deref().map(humantime::parse_duration) {
        None => Some(DEFAULT_MAX_TTL),
        Some(Ok(d)) if d >= Duration::from_secs(60) && d <= MAX_TTL_CEILING => Some(d),
        Some(_) => {
            faults.push(format!("{at}.max_ttl: must be a duration from 1m to 24h"));
            None
        }
    };
    let mut issuers = Vec::new();
    for (j, o) in raw.oidc.into_iter().enumerate() {
        let at = format!("{at}.oidc[{j}]");
        if !is_https_url(&o.issuer) {
            faults.push(format!(
                "{at}.issuer: {:?} is not an https:// URL",
                o.issuer
            ));
        }
        if o.audiences.is_empty() || o.audiences.iter().any(String::is_empty) {
            faults.push(format!("{at}.audiences: list at least one audience"));
        }
        match ClaimRules::from_raw(&o.claims) {
            Ok(rules) => issuers.push(OidcTrust {
                issuer: o.issuer,
                audiences: o.audiences,
                rules,
                identity_claim: o.identity_claim,
            }),
            Err(e) => faults.push(format!("{at}.claims: {e}")),
        }
    }
    let id = id?;
    let serviceaccounts = match raw.serviceaccounts {
        RawServiceAccounts::Rbac(false) => ServiceAccounts::Closed,
        RawServiceAccounts::Rbac(true) => ServiceAccounts::Rbac,
        RawServiceAccounts::Listed(names) => {
            let mut listed = Vec::new();
            for (j, name) in names.iter().enumerate() {
                match ServiceAccountName::parse(name, id.namespace()) {
                    Ok(sa) => listed.push(sa),
                    Err(e) => faults.push(format!("{at}.serviceaccounts[{j}]: {e}")),
                }
            }
            ServiceAccounts::Listed(listed)
        }
    };
    Some(PoolConfig {
        id,
        max_ttl: max_ttl?,
        auth: PoolAuth {
            serviceaccounts,
            issuers,
        },
        endpoints: raw.endpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_configuration_parses_into_typed_values() {
        let config = CertApiConfig::parse(
            r#"
            listen = "127.0.0.1:8444"
            pki_dir = "pki"
            endpoints = ["127.0.0.1:8443"]
            [kubernetes]
            in_cluster = true
            [[pool]]
            name = "ci/default"
            max_ttl = "30m"
            serviceaccounts = true
            [[pool.oidc]]
            issuer = "https://token.actions.githubusercontent.com"
            audiences = ["bkpool"]
            claims = { repository_owner = "org", ref = ["refs/heads/main"] }
            "#,
        )
        .unwrap();
        assert_eq!(config.kubernetes, Some(KubeSource::InCluster));
        assert_eq!(config.audiences, vec!["bkpool"]);
        let pool = &config.pools[0];
        assert_eq!(pool.id.as_str(), "ci/default");
        assert_eq!(pool.max_ttl, Duration::from_secs(1800));
        assert_eq!(pool.auth.issuers[0].rules.rules().len(), 2);
    }

    #[test]
    fn every_fault_is_listed_with_its_path() {
        let err = CertApiConfig::parse(
            r#"
            listen = "nowhere"
            pki_dir = "pki"
            [[pool]]
            name = "Bad_Name"
            max_ttl = "365d"
            serviceaccounts = true
            [[pool.oidc]]
            issuer = "http://insecure.example"
            audiences = []
            claims = { sub = "*" }
            "#,
        )
        .unwrap_err();
        let text = err.to_string();
        for part in [
            "listen:",
            "pool[0].name",
            "pool[0].max_ttl",
            "pool[0].oidc[0].issuer",
            "pool[0].oidc[0].audiences",
            "pool[0].oidc[0].claims",
            "[kubernetes]",
        ] {
            assert!(text.contains(part), "{part} missing from:\n{text}");
        }
    }
}
