//! From the cluster's pools and Secrets to what the data plane routes: which pools, in which
//! mode, under which names and limits, with which certificates. Pure but for a cache of parsed
//! Secrets: a Secret is parsed again only when its resourceVersion changes, and one that does
//! not parse keeps the pool's last good material (rotation never serves a half-written pair).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use proxy::affinity::{Balance, DEFAULT_LOAD_BOUND};
use proxy::config::{Mode, normalize_hostname};
use proxy::names::PoolId;
use proxy::route::BackendTlsClient;
use proxy::tls::{self, ServerCert};
use rustls::pki_types::{CertificateDer, ServerName};

use super::upstream::Policy;
use crate::crd::{self, BuildKitPool, GatewayMode, duration, validate_pool};
use crate::operator::hosts::{self, Claims};
use crate::operator::objects::PoolNames;
use crate::scale::policy::{DEFAULT_WAKE_TIMEOUT, DEFAULT_WAKE_TIMEOUT_ANSWERED};

/// A pool the gateway can route.
#[derive(Clone)]
pub struct Entry {
    pub pool: Arc<BuildKitPool>,
    pub id: PoolId,
    pub mode: Mode,
    /// SNI names (passthrough only).
    pub hostnames: Vec<String>,
    pub max_connections: Option<usize>,
    pub max_connections_per_identity: Option<usize>,
    pub preface_while_waking: bool,
    pub balance: Balance,
    pub policy: Policy,
    /// Terminate mode: the server certificate for the pool's names and its client CA bundle.
    pub server: Option<ServerMaterial>,
    /// The resourceVersion `server` was read from: the TLS configuration is rebuilt only when
    /// some pool's changes.
    pub server_version: Option<String>,
    /// Terminate mode: the gateway's client side of the mTLS leg to buildkitd.
    pub backend_tls: Option<BackendTlsClient>,
}

/// What the gateway's TLS server needs from a pool.
#[derive(Clone)]
pub struct ServerMaterial {
    pub cert: ServerCert,
    pub client_ca: Vec<CertificateDer<'static>>,
}

/// The whole table, and the pools left out with the reason.
#[derive(Default)]
pub struct Plan {
    pub entries: Vec<Entry>,
    pub unroutable: Vec<(String, String)>,
}

/// Parsed Secrets by namespace/name, each with the resourceVersion it was parsed from.
#[derive(Default)]
pub struct ParsedSecrets {
    server: HashMap<String, (String, Option<ServerMaterial>)>,
    backend: HashMap<String, (String, Option<BackendTlsClient>)>,
    /// Parse failures since the last call to [`ParsedSecrets::take_failures`].
    failures: usize,
}

impl ParsedSecrets {
    pub fn take_failures(&mut self) -> usize {
        std::mem::take(&mut self.failures)
    }

    /// Drops the entries of Secrets not in `keep`.
    fn retain(&mut self, keep: &HashSet<String>) {
        self.server.retain(|k, _| keep.contains(k));
        self.backend.retain(|k, _| keep.contains(k));
    }
}

/// Builds the table from every pool, reading Secrets through `secret(namespace, name)`.
pub fn plan(
    pools: &[Arc<BuildKitPool>],
    secret: impl Fn(&str, &str) -> Option<Arc<Secret>>,
    parsed: &mut ParsedSecrets,
) -> Plan {
    // Who may be reached by which name: the rule the status reconciler reports by.
    let claims = hosts::claims(pools);
    let mut pools: Vec<&Arc<BuildKitPool>> = pools
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    // A stable order across rebuilds.
    pools.sort_by_key(|p| {
        let created = p.metadata.creation_timestamp.clone().map(|t| t.0);
        (created, p.namespace(), p.name_any())
    });
    let mut plan = Plan::default();
    let mut used_secrets = HashSet::new();
    for pool in pools {
        let label = format!(
            "{}/{}",
            pool.namespace().unwrap_or_default(),
            pool.name_any()
        );
        match entry(pool, &secret, parsed, &claims, &mut used_secrets) {
            Ok(entry) => plan.entries.push(entry),
            Err(why) => plan.unroutable.push((label, why)),
        }
    }
    parsed.retain(&used_secrets);
    plan
}

fn entry(
    pool: &Arc<BuildKitPool>,
    secret: &impl Fn(&str, &str) -> Option<Arc<Secret>>,
    parsed: &mut ParsedSecrets,
    claims: &Claims,
    used_secrets: &mut HashSet<String>,
) -> Result<Entry, String> {
    let names = PoolNames::of(pool);
    let id = PoolId::new(&names.namespace, &names.pool).map_err(|e| e.to_string())?;
    let faults = validate_pool(pool);
    if !faults.is_empty() {
        return Err(format!(
            "invalid spec: {}",
            crate::crd::validate::summary(&faults)
        ));
    }
    let spec = &pool.spec;
    let mode = match spec.gateway.mode {
        GatewayMode::Terminate => Mode::Terminate,
        GatewayMode::Passthrough => Mode::Passthrough,
    };
    let preface_while_waking =
        mode == Mode::Terminate && spec.gateway.preface_while_waking != Some(false);
    let policy = Policy {
        wake_timeout: match &spec.scaling.wake_timeout {
            Some(written) => duration::parse(written).unwrap_or(DEFAULT_WAKE_TIMEOUT),
            None if preface_while_waking => DEFAULT_WAKE_TIMEOUT_ANSWERED,
            None => DEFAULT_WAKE_TIMEOUT,
        },
        max_held: spec.scaling.max_held as usize,
    };
    let balance = match (spec.gateway.balance, mode) {
        (Some(crd::Balance::LeastLoaded), _) | (None, Mode::Passthrough) => Balance::LeastLoaded,
        (Some(crd::Balance::Affine), _) | (None, Mode::Terminate) => Balance::Affine {
            load_bound: spec.gateway.load_bound.unwrap_or(DEFAULT_LOAD_BOUND),
        },
    };
    let limit = |n: u32| (n > 0).then_some(n as usize);
    let mut entry = Entry {
        pool: pool.clone(),
        id,
        mode,
        hostnames: Vec::new(),
        max_connections: limit(spec.gateway.max_connections),
        max_connections_per_identity: limit(spec.gateway.max_connections_per_identity),
        preface_while_waking,
        balance,
        policy,
        server: None,
        server_version: None,
        backend_tls: None,
    };
    match spec.gateway.mode {
        GatewayMode::Passthrough => {
            entry.hostnames = passthrough_names(pool, &names, &entry.id, claims);
        }
        GatewayMode::Terminate => {
            let server_name = names.gateway_tls();
            let backend_name = names.gateway_backend_tls();
            used_secrets.insert(format!("{}/{server_name}", names.namespace));
            used_secrets.insert(format!("{}/{backend_name}", names.namespace));
            let server = secret(&names.namespace, &server_name)
                .ok_or_else(|| format!("Secret {server_name} does not exist yet"))?;
            let backend = secret(&names.namespace, &backend_name)
                .ok_or_else(|| format!("Secret {backend_name} does not exist yet"))?;
            let mut material = parsed.server_material(&server)?;
            // The certificate answers only for the names that route to this pool: another
            // pool's name must not select this pool's certificate.
            material
                .cert
                .names
                .retain(|name| claims.routes_to(name, &entry.id));
            entry.server = Some(material);
            entry.server_version = server.resource_version();
            let buildkitd = format!("{}.{}.svc", names.buildkitd(), names.namespace);
            entry.backend_tls = Some(parsed.backend_material(&backend, &buildkitd)?);
        }
    }
    Ok(entry)
}

/// SNI names of a passthrough pool: its Service names qualified by namespace (a bare pool
/// name is ambiguous across namespaces) and the `spec.gateway.hosts` it holds. A refused
/// name is reported in the pool's `HostsAccepted` condition by the status reconciler.
fn passthrough_names(
    pool: &BuildKitPool,
    names: &PoolNames,
    id: &PoolId,
    claims: &Claims,
) -> Vec<String> {
    let qualified = names.client_dns_names().into_iter().skip(1);
    let hosts = pool.spec.gateway.hosts.iter().cloned();
    let mut out = Vec::new();
    for name in qualified.chain(hosts) {
        let Some(name) = normalize_hostname(&name) else {
            continue;
        };
        if claims.routes_to(&name, id) && !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

impl ParsedSecrets {
    fn server_material(&mut self, secret: &Secret) -> Result<ServerMaterial, String> {
        let key = secret_key(secret);
        let parse = || parse_server(secret, &key);
        once_per_version(&mut self.server, &mut self.failures, secret, &key, parse)
    }

    fn backend_material(
        &mut self,
        secret: &Secret,
        server_name: &str,
    ) -> Result<BackendTlsClient, String> {
        let key = secret_key(secret);
        let parse = || parse_backend(secret, &key, server_name);
        once_per_version(&mut self.backend, &mut self.failures, secret, &key, parse)
    }
}

/// The material of `secret` from `cache`, parsed only when its resourceVersion is new; a
/// version that does not parse keeps the last good material and counts a failure.
fn once_per_version<T: Clone>(
    cache: &mut HashMap<String, (String, Option<T>)>,
    failures: &mut usize,
    secret: &Secret,
    key: &str,
    parse: impl FnOnce() -> Result<T, String>,
) -> Result<T, String> {
    let version = secret.resource_version().unwrap_or_default();
    let fresh = cache.get(key).is_some_and(|(seen, _)| *seen == version);
    let (seen, material) = cache.entry(key.to_owned()).or_insert((String::new(), None));
    if !fresh {
        match parse() {
            Ok(parsed) => *material = Some(parsed),
            Err(e) => {
                *failures += 1;
                tracing::warn!(secret = %key, error = %e, "certificate Secret refused; keeping the last good material");
            }
        }
        *seen = version;
    }
    material
        .clone()
        .ok_or_else(|| format!("Secret {key} holds no usable certificate"))
}

fn secret_key(secret: &Secret) -> String {
    format!(
        "{}/{}",
        secret.namespace().unwrap_or_default(),
        secret.name_any()
    )
}

/// A Secret's field, and the pseudo-path naming it in errors.
fn field<'a>(secret: &'a Secret, key: &str, field: &str) -> Result<(&'a [u8], PathBuf), String> {
    let origin = PathBuf::from(format!("secret {key} {field}"));
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(field))
        .map(|b| (b.0.as_slice(), origin.clone()))
        .ok_or_else(|| format!("{} is missing", origin.display()))
}

fn parse_server(secret: &Secret, key: &str) -> Result<ServerMaterial, String> {
    let (cert, cert_origin) = field(secret, key, "tls.crt")?;
    let (pem_key, key_origin) = field(secret, key, "tls.key")?;
    let (ca, ca_origin) = field(secret, key, "ca.crt")?;
    let cert = tls::server_cert_from_pem(cert, &cert_origin, pem_key, &key_origin)
        .map_err(|e| e.to_string())?;
    let client_ca = tls::ca_bundle_from_pem(ca, &ca_origin).map_err(|e| e.to_string())?;
    Ok(ServerMaterial { cert, client_ca })
}

fn parse_backend(
    secret: &Secret,
    key: &str,
    server_name: &str,
) -> Result<BackendTlsClient, String> {
    let ca = field(secret, key, "ca.crt")?;
    let cert = field(secret, key, "tls.crt")?;
    let pem_key = field(secret, key, "tls.key")?;
    let config = tls::backend_client_config_from_pem(
        (ca.0, &ca.1),
        (cert.0, &cert.1),
        (pem_key.0, &pem_key.1),
    )
    .map_err(|e| e.to_string())?;
    let server_name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| format!("{server_name:?} is not a valid server name"))?;
    Ok(BackendTlsClient {
        config,
        server_name: Some(server_name),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use k8s_openapi::ByteString;
    use serde_json::json;

    use super::*;
    use crate::pki::Ca;

    fn pool(ns: &str, name: &str, spec: serde_json::Value, created: i64) -> Arc<BuildKitPool> {
        let mut pool: BuildKitPool = serde_json::from_value(json!({
            "apiVersion": "bkpool.dev/v1alpha1", "kind": "BuildKitPool",
            "metadata": {"name": name, "namespace": ns}, "spec": spec,
        }))
        .unwrap();
        let at = k8s_openapi::jiff::Timestamp::from_second(created).unwrap();
        pool.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at));
        Arc::new(pool)
    }

    fn secret(ns: &str, name: &str, version: &str, data: &[(&str, &str)]) -> Arc<Secret> {
        let mut secret = Secret::default();
        secret.metadata.namespace = Some(ns.into());
        secret.metadata.name = Some(name.into());
        secret.metadata.resource_version = Some(version.into());
        let data: BTreeMap<String, ByteString> = data
            .iter()
            .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
            .collect();
        secret.data = Some(data);
        Arc::new(secret)
    }

    /// The two Secrets the operator writes for the gateway of `ns/name`.
    fn gateway_secrets(ns: &str, name: &str, version: &str) -> Vec<Arc<Secret>> {
        gateway_secrets_for(ns, name, version, &[])
    }

    /// As [`gateway_secrets`], with `hosts` on the server certificate too.
    fn gateway_secrets_for(
        ns: &str,
        name: &str,
        version: &str,
        hosts: &[&str],
    ) -> Vec<Arc<Secret>> {
        let day = Duration::from_secs(86_400);
        let client = Ca::generate("client", day).unwrap();
        let backend = Ca::generate("backend", day).unwrap();
        let mut names = vec![format!("{name}.{ns}.svc")];
        names.extend(hosts.iter().map(|h| h.to_string()));
        let server = client.issue_server(&names, day).unwrap();
        let leg = backend.issue_client_named("gateway", day).unwrap();
        vec![
            secret(
                ns,
                &format!("{name}-gateway-tls"),
                version,
                &[
                    ("tls.crt", &server.cert_pem),
                    ("tls.key", server.key_pem.as_deref().unwrap()),
                    ("ca.crt", client.cert_pem()),
                ],
            ),
            secret(
                ns,
                &format!("{name}-gateway-backend-tls"),
                version,
                &[
                    ("tls.crt", &leg.cert_pem),
                    ("tls.key", leg.key_pem.as_deref().unwrap()),
                    ("ca.crt", backend.cert_pem()),
                ],
            ),
        ]
    }

    fn lookup(secrets: &[Arc<Secret>]) -> impl Fn(&str, &str) -> Option<Arc<Secret>> + '_ {
        move |ns, name| {
            secrets
                .iter()
                .find(|s| s.namespace().as_deref() == Some(ns) && s.name_any() == name)
                .cloned()
        }
    }

    #[test]
    fn a_terminate_pool_is_routed_once_its_certificates_exist() {
        let pools = [pool(
            "ci",
            "a",
            json!({"gateway": {"maxConnections": 5}}),
            1,
        )];
        let mut parsed = ParsedSecrets::default();
        let before = plan(&pools, lookup(&[]), &mut parsed);
        assert!(before.entries.is_empty());
        assert!(
            before.unroutable[0].1.contains("a-gateway-tls"),
            "{:?}",
            before.unroutable
        );

        let secrets = gateway_secrets("ci", "a", "1");
        let after = plan(&pools, lookup(&secrets), &mut parsed);
        let entry = &after.entries[0];
        assert_eq!((entry.id.as_str(), entry.mode), ("ci/a", Mode::Terminate));
        assert_eq!(entry.max_connections, Some(5));
        assert_eq!(entry.server_version.as_deref(), Some("1"));
        assert!(entry.server.is_some() && entry.backend_tls.is_some());
        let name = entry.backend_tls.as_ref().unwrap().server_name.clone();
        assert_eq!(
            name,
            Some(ServerName::try_from("a-buildkitd.ci.svc").unwrap())
        );
    }

    #[test]
    fn wake_timeout_and_balance_follow_what_the_mode_can_do() {
        let pools = [
            pool("ci", "a", json!({}), 1),
            pool(
                "ci",
                "b",
                json!({"gateway": {"prefaceWhileWaking": false,
                "balance": "LeastLoaded"}}),
                2,
            ),
            pool("ci", "c", json!({"gateway": {"mode": "passthrough"}}), 3),
            pool(
                "ci",
                "d",
                json!({"gateway": {"loadBound": 2.0},
                "scaling": {"wakeTimeout": "45s"}}),
                4,
            ),
        ];
        let mut secrets = gateway_secrets("ci", "a", "1");
        for name in ["b", "d"] {
            secrets.extend(gateway_secrets("ci", name, "1"));
        }
        let plan = plan(&pools, lookup(&secrets), &mut ParsedSecrets::default());
        let by_id: BTreeMap<&str, &Entry> =
            plan.entries.iter().map(|e| (e.id.as_str(), e)).collect();
        let seen = |id: &str| {
            let e = by_id[id];
            (e.preface_while_waking, e.policy.wake_timeout, e.balance)
        };
        let affine = |load_bound| Balance::Affine { load_bound };
        // Answered while held: the wake may take minutes.
        assert_eq!(
            seen("ci/a"),
            (
                true,
                DEFAULT_WAKE_TIMEOUT_ANSWERED,
                affine(DEFAULT_LOAD_BOUND)
            )
        );
        // Nobody answers the client: the wake must end inside its 20 s.
        assert_eq!(
            seen("ci/b"),
            (false, DEFAULT_WAKE_TIMEOUT, Balance::LeastLoaded)
        );
        assert_eq!(
            seen("ci/c"),
            (false, DEFAULT_WAKE_TIMEOUT, Balance::LeastLoaded)
        );
        assert!(DEFAULT_WAKE_TIMEOUT < Duration::from_secs(20));
        assert_eq!(seen("ci/d"), (true, Duration::from_secs(45), affine(2.0)));
    }

    #[test]
    fn a_broken_secret_keeps_the_last_good_material_and_is_counted() {
        let pools = [pool("ci", "a", json!({}), 1)];
        let mut parsed = ParsedSecrets::default();
        let good = gateway_secrets("ci", "a", "1");
        assert_eq!(plan(&pools, lookup(&good), &mut parsed).entries.len(), 1);
        let broken = vec![
            secret(
                "ci",
                "a-gateway-tls",
                "2",
                &[("tls.crt", "garbage"), ("tls.key", "x"), ("ca.crt", "y")],
            ),
            good[1].clone(),
        ];
        let again = plan(&pools, lookup(&broken), &mut parsed);
        assert_eq!(
            again.entries.len(),
            1,
            "still routed with the old certificate"
        );
        assert_eq!(parsed.take_failures(), 1);
        // Parsed once per version: the same broken Secret is not parsed (or counted) again.
        let _ = plan(&pools, lookup(&broken), &mut parsed);
        assert_eq!(parsed.take_failures(), 0);
    }

    #[test]
    fn passthrough_names_are_qualified_and_the_older_pool_keeps_a_contested_host() {
        let spec = |host: &str| json!({"gateway": {"mode": "passthrough", "hosts": [host]}});
        let pools = [
            pool("dev", "b", spec("build.example.com"), 2),
            pool("ci", "a", spec("build.example.com"), 1),
            pool(
                "ci",
                "bad",
                json!({"scaling": {"minReplicas": 3, "maxReplicas": 1}}),
                3,
            ),
        ];
        let plan = plan(&pools, lookup(&[]), &mut ParsedSecrets::default());
        let hosts: BTreeMap<&str, &Vec<String>> = plan
            .entries
            .iter()
            .map(|e| (e.id.as_str(), &e.hostnames))
            .collect();
        assert_eq!(
            hosts["ci/a"],
            &[
                "a.ci",
                "a.ci.svc",
                "a.ci.svc.cluster.local",
                "build.example.com"
            ]
        );
        assert!(!hosts["dev/b"].contains(&"build.example.com".to_owned()));
        assert!(hosts["dev/b"].contains(&"b.dev.svc".to_owned()));
        assert_eq!(plan.unroutable.len(), 1);
        assert!(
            plan.unroutable[0].1.starts_with("invalid spec"),
            "{:?}",
            plan.unroutable
        );
    }

    #[test]
    fn another_namespace_cannot_take_a_pools_names() {
        let squat =
            json!({"gateway": {"mode": "passthrough", "hosts": ["a.ci", "build.example.com"]}});
        let takeover = json!({"gateway": {"mode": "passthrough", "hosts": ["a.ci.svc"]}});
        let pools = [
            // Older than the pools whose names they want.
            pool("evil", "squat", squat, 1),
            pool("evil", "takeover", takeover, 1),
            pool(
                "ci",
                "a",
                json!({"gateway": {"hosts": ["build.example.com"]}}),
                2,
            ),
        ];
        let secrets = gateway_secrets_for("ci", "a", "1", &["build.example.com"]);
        let plan = plan(&pools, lookup(&secrets), &mut ParsedSecrets::default());
        let entry = |id: &str| plan.entries.iter().find(|e| e.id.as_str() == id);
        assert_eq!(
            entry("evil/squat").unwrap().hostnames,
            [
                "squat.evil",
                "squat.evil.svc",
                "squat.evil.svc.cluster.local",
                "build.example.com"
            ],
            "ci/a's Service name is not routed to another namespace's pool"
        );
        // A name under `.svc` of another namespace makes the pool invalid: not routed at all.
        assert!(entry("evil/takeover").is_none());
        assert!(
            plan.unroutable
                .iter()
                .any(|(p, why)| p == "evil/takeover" && why.contains("namespace \"ci\"")),
            "{:?}",
            plan.unroutable
        );
        // The terminate pool's certificate answers for its own names, not for the host the
        // older pool holds.
        let names = &entry("ci/a").unwrap().server.as_ref().unwrap().cert.names;
        assert_eq!(names, &["a.ci.svc"]);
    }

    #[test]
    fn a_bundle_still_carrying_an_expired_predecessor_is_routed() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.not_before = (std::time::SystemTime::now() - Duration::from_secs(7200)).into();
        params.not_after = (std::time::SystemTime::now() - Duration::from_secs(60)).into();
        let predecessor = params.self_signed(&key).unwrap().pem();
        let mut secrets = gateway_secrets("ci", "a", "1");
        let mut server = (*secrets[0]).clone();
        let data = server.data.as_mut().unwrap();
        let mut bundle = data["ca.crt"].0.clone();
        bundle.extend_from_slice(predecessor.as_bytes());
        data.insert("ca.crt".into(), ByteString(bundle));
        secrets[0] = Arc::new(server);
        let pools = [pool("ci", "a", json!({}), 1)];
        let plan = plan(&pools, lookup(&secrets), &mut ParsedSecrets::default());
        assert_eq!(plan.unroutable, vec![]);
        let material = plan.entries[0].server.as_ref().unwrap();
        assert_eq!(material.client_ca.len(), 1, "the expired CA is left out");
    }
}
