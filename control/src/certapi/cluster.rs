//! The certificate API's world on Kubernetes, served by every `bkpool controller` replica
//! (leader or not): pools and their `spec.auth` come from a watch cache, so a change to a
//! pool's rules applies to the next request without a restart; each pool signs with its own
//! client CA, read from the operator's `<pool>-client-ca` Secret (parsed once per version),
//! and clients get that Secret's trust bundle, which the gateway trusts through a rotation;
//! wakes go through the gateway's own waker ([`KubeWaker`]: `/scale` from zero, or the wake
//! Job), one at a time per pool.
//!
//! A pool whose spec does not validate admits nobody (as one with default rules would refuse
//! the caller); one whose CA Secret is missing or unreadable refuses with a 503 and never
//! falls back to another CA.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use proxy::names::PoolId;

use super::directory::{CaUnavailable, PoolDirectory, PoolEntry, WarmReason, Warmer};
use crate::auth::rules::{ClaimRules, RawPatterns};
use crate::auth::{OidcTrust, PoolAuth, ServiceAccountName, ServiceAccounts};
use crate::crd::{Auth, AuthMode, BuildKitPool, Fault, duration, validate};
use crate::gateway::upstream::{Waker, Woke};
use crate::gateway::wake::KubeWaker;
use crate::operator::Settings;
use crate::operator::objects::PoolNames;
use crate::operator::pki::CaSecret;
use crate::operator::service;
use crate::pki::Ca;

/// The rules `spec.auth` sets, or every fault in it.
pub fn pool_auth(namespace: &str, auth: &Auth) -> Result<PoolAuth, Vec<Fault>> {
    let mut faults = Vec::new();
    let mut fault = |path: String, message: String| faults.push(Fault { path, message });
    let serviceaccounts = match auth.mode {
        AuthMode::Rbac => ServiceAccounts::Rbac,
        AuthMode::ServiceAccounts => {
            let mut listed = Vec::new();
            for (i, name) in auth.service_accounts.iter().enumerate() {
                match ServiceAccountName::parse(name, namespace) {
                    Ok(sa) => listed.push(sa),
                    Err(e) => fault(format!("spec.auth.serviceAccounts[{i}]"), e),
                }
            }
            ServiceAccounts::Listed(listed)
        }
    };
    let mut issuers = Vec::new();
    for (i, issuer) in auth.oidc.iter().enumerate() {
        match claim_rules(issuer) {
            Ok(rules) => issuers.push(OidcTrust {
                issuer: issuer.issuer.clone(),
                audiences: issuer.audiences.clone(),
                rules,
                identity_claim: None,
            }),
            Err(e) => fault(format!("spec.auth.oidc[{i}].claims"), e),
        }
    }
    if faults.is_empty() {
        Ok(PoolAuth {
            serviceaccounts,
            issuers,
        })
    } else {
        Err(faults)
    }
}

/// One issuer's claim rules (every rule must hold; a rule holds when the claim matches one
/// of its values, `*` matching any run of characters).
pub fn claim_rules(issuer: &crate::crd::OidcIssuer) -> Result<ClaimRules, String> {
    let raw = issuer
        .claims
        .iter()
        .map(|rule| (rule.claim.clone(), RawPatterns::Many(rule.values.clone())))
        .collect();
    ClaimRules::from_raw(&raw).map_err(|e| e.to_string())
}

/// Pools, their rules and their CAs, read from the watch caches on every request.
pub struct ClusterDirectory {
    pools: Store<BuildKitPool>,
    secrets: Store<Secret>,
    settings: Settings,
    /// Parsed client CAs by `namespace/name`, with the resourceVersion they came from.
    parsed: Mutex<HashMap<String, (String, ParsedCa)>>,
}

type ParsedCa = Result<(Arc<Ca>, String), CaUnavailable>;

impl ClusterDirectory {
    /// `pools` and `secrets` (the operator's, `app.kubernetes.io/managed-by=bkpool`) are
    /// watch caches; `settings` say where clients reach the gateway.
    pub fn new(pools: Store<BuildKitPool>, secrets: Store<Secret>, settings: Settings) -> Self {
        Self {
            pools,
            secrets,
            settings,
            parsed: Mutex::default(),
        }
    }

    fn entry(&self, pool: &BuildKitPool) -> Option<PoolEntry> {
        let names = PoolNames::of(pool);
        let id = PoolId::new(&names.namespace, &names.pool).ok()?;
        let faults = validate(&pool.spec);
        let auth = match pool_auth(&names.namespace, &pool.spec.auth) {
            Ok(auth) if faults.is_empty() => auth,
            _ => {
                tracing::debug!(pool = %id, "pool spec invalid: it admits nobody");
                self.default_auth()
            }
        };
        let max_ttl = duration::parse(&pool.spec.tls.client_cert_max_ttl)
            .unwrap_or(Duration::from_secs(3600));
        let ca = self.ca(&names);
        let gateway_ca_pem = ca.as_ref().map(|(_, b)| b.clone()).unwrap_or_default();
        let endpoint = service::endpoint(pool, &self.settings);
        Some(PoolEntry {
            id,
            ca: ca.map(|(ca, _)| ca),
            max_ttl,
            auth,
            endpoints: vec![endpoint.trim_start_matches("tcp://").to_owned()],
            gateway_ca_pem,
        })
    }

    /// The pool's current client CA and trust bundle.
    fn ca(&self, names: &PoolNames) -> ParsedCa {
        let name = names.client_ca();
        let secret = self
            .secrets
            .get(&ObjectRef::new(&name).within(&names.namespace))
            .ok_or(CaUnavailable::Missing)?;
        let key = format!("{}/{name}", names.namespace);
        let version = secret.resource_version().unwrap_or_default();
        let mut parsed = self.parsed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seen, ca)) = parsed.get(&key)
            && *seen == version
        {
            return ca.clone();
        }
        let ca = CaSecret::parse(&secret)
            .and_then(|s| {
                Ok((
                    Arc::new(Ca::from_pem(s.current.cert_pem(), s.current.key_pem())?),
                    s.bundle(),
                ))
            })
            .map_err(|e| CaUnavailable::Unreadable(e.to_string()));
        parsed.insert(key, (version, ca.clone()));
        ca
    }
}

impl PoolDirectory for ClusterDirectory {
    fn pool(&self, id: &PoolId) -> Option<Arc<PoolEntry>> {
        let pool = self
            .pools
            .get(&ObjectRef::new(id.name()).within(id.namespace()))?;
        if pool.metadata.deletion_timestamp.is_some() {
            return None;
        }
        self.entry(&pool).map(Arc::new)
    }

    fn pools_in(&self, namespace: &str) -> Vec<Arc<PoolEntry>> {
        let mut pools: Vec<Arc<BuildKitPool>> = self
            .pools
            .state()
            .into_iter()
            .filter(|p| p.namespace().as_deref() == Some(namespace))
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        pools.sort_by_key(|p| p.name_any());
        pools
            .iter()
            .filter_map(|p| self.entry(p).map(Arc::new))
            .collect()
    }

    /// `mode: ServiceAccounts` listing nobody, no issuer: the CRD's defaults.
    fn default_auth(&self) -> PoolAuth {
        PoolAuth {
            serviceaccounts: ServiceAccounts::Listed(Vec::new()),
            issuers: Vec::new(),
        }
    }
}

/// Wakes pools through the API server, as a gateway holding a connection would.
#[derive(Clone)]
pub struct ClusterWarmer {
    client: Client,
    pools: Store<BuildKitPool>,
    waking: Arc<Mutex<HashSet<PoolId>>>,
    results: Family<WakeResultLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WakeResultLabels {
    pool: String,
    result: &'static str,
}

impl ClusterWarmer {
    /// Registers `bkpool_certapi_wake_results_total{pool,result}` in `registry`.
    pub fn new(client: Client, pools: Store<BuildKitPool>, registry: &mut Registry) -> Self {
        let results = Family::default();
        registry.sub_registry_with_prefix("bkpool_certapi").register(
            "wake_results",
            "Wakes started by the certificate API, by pool and what the waker did (scaled_up, already_wanted, job_started, failed)",
            results.clone(),
        );
        Self {
            client,
            pools,
            waking: Arc::default(),
            results,
        }
    }
}

impl Warmer for ClusterWarmer {
    fn warm(&self, id: &PoolId, reason: WarmReason) {
        let Some(pool) = self
            .pools
            .get(&ObjectRef::new(id.name()).within(id.namespace()))
        else {
            return;
        };
        if !lock(&self.waking).insert(id.clone()) {
            return;
        }
        let (warmer, id) = (self.clone(), id.clone());
        tokio::spawn(async move {
            let waker = KubeWaker {
                client: warmer.client.clone(),
                pool,
            };
            let result = match waker.wake().await {
                Ok(woke) => {
                    if woke != Woke::AlreadyWanted {
                        tracing::info!(pool = %id, ?reason, ?woke, "waking pool ahead of its first connection");
                    }
                    match woke {
                        Woke::AlreadyWanted => "already_wanted",
                        Woke::ScaledUp => "scaled_up",
                        Woke::JobStarted => "job_started",
                    }
                }
                Err(e) => {
                    tracing::warn!(pool = %id, ?reason, error = %e, "cannot wake pool");
                    "failed"
                }
            };
            let labels = WakeResultLabels {
                pool: id.to_string(),
                result,
            };
            warmer.results.get_or_create(&labels).inc();
            lock(&warmer.waking).remove(&id);
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ClaimRule, OidcIssuer};

    #[test]
    fn spec_auth_becomes_the_pool_rules() {
        let mut auth = Auth {
            service_accounts: vec!["builder".into(), "tools/ci".into()],
            ..Auth::default()
        };
        let rules = pool_auth("ci", &auth).unwrap();
        let ServiceAccounts::Listed(listed) = &rules.serviceaccounts else {
            panic!("{rules:?}");
        };
        let names: Vec<String> = listed.iter().map(ServiceAccountName::username).collect();
        assert_eq!(
            names,
            [
                "system:serviceaccount:ci:builder",
                "system:serviceaccount:tools:ci"
            ]
        );
        auth.mode = AuthMode::Rbac;
        auth.service_accounts.clear();
        auth.oidc = vec![OidcIssuer {
            issuer: "https://token.actions.githubusercontent.com".into(),
            audiences: vec!["bkpool".into()],
            claims: vec![ClaimRule {
                claim: "repository".into(),
                values: vec!["org/app".into(), "org/lib-*".into()],
            }],
        }];
        let rules = pool_auth("ci", &auth).unwrap();
        assert_eq!(rules.serviceaccounts, ServiceAccounts::Rbac);
        assert_eq!(rules.issuers[0].rules.rules()[0].patterns.len(), 2);

        auth.oidc[0].claims.clear();
        let faults = pool_auth("ci", &auth).unwrap_err();
        assert_eq!(faults[0].path, "spec.auth.oidc[0].claims", "{faults:?}");
    }
}
