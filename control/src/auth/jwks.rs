//! Signing keys of trusted OIDC issuers: discovery (`/.well-known/openid-configuration`, HTTPS
//! only, `issuer` equal to the configured URL), then the JWKS it names, cached per issuer.
//!
//! Bounds, so neither a hostile issuer nor a flood of forged tokens can grow memory or hammer
//! the issuer: at most `max_issuers` issuers (the least recently used one is dropped) and
//! `max_keys` keys each; keys older than `max_age` are refetched; a token naming an unknown
//! `kid` refetches at most once per `refetch_interval`, and concurrent lookups of one issuer
//! share a single fetch (the per-issuer async lock is the single flight).
//!
//! Only asymmetric signature keys are kept, each with the algorithms its type allows: RSA
//! (2048 bits or more) for RS256/384/512 and PS256/384/512, EC P-256 for ES256, P-384 for
//! ES384, Ed25519 for EdDSA. Symmetric (`oct`) keys are never loaded, so HMAC can never be
//! verified with anything a JWKS holds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Deserialize;
use tokio::time::Instant;

use crate::https::{HttpsClient, is_https_url};

/// How many times `max_age` cached keys outlive failed refreshes.
pub const STALE_FACTOR: u32 = 4;

/// Cache bounds and timings.
#[derive(Debug, Clone, Copy)]
pub struct JwksLimits {
    pub max_issuers: usize,
    pub max_keys: usize,
    pub max_age: Duration,
    pub refetch_interval: Duration,
}

impl Default for JwksLimits {
    fn default() -> Self {
        Self {
            max_issuers: 64,
            max_keys: 16,
            max_age: Duration::from_secs(3600),
            refetch_interval: Duration::from_secs(10),
        }
    }
}

/// One verification key and the algorithms it may verify.
pub struct VerifyKey {
    pub kid: Option<String>,
    pub key: DecodingKey,
    pub algorithms: &'static [Algorithm],
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// Why no key could be had for a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("issuer {0:?} is not an https:// URL")]
    NotHttps(String),
    #[error("OIDC discovery for {issuer} failed: {problem}")]
    Discovery { issuer: String, problem: String },
    #[error("JWKS of {issuer} could not be fetched: {problem}")]
    Fetch { issuer: String, problem: String },
    #[error("no key with this kid in the issuer's JWKS")]
    UnknownKey,
}

impl JwksError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotHttps(_) | Self::Discovery { .. } => "issuer_discovery_failed",
            Self::Fetch { .. } => "issuer_jwks_unavailable",
            Self::UnknownKey => "unknown_key",
        }
    }
}

/// The per-issuer key cache.
pub struct JwksCache {
    http: HttpsClient,
    limits: JwksLimits,
    issuers: Mutex<HashMap<String, Arc<IssuerSlot>>>,
    epoch: Instant,
    fetches: Family<ResultLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    result: &'static str,
}

struct IssuerSlot {
    state: tokio::sync::Mutex<IssuerKeys>,
    last_used_ms: AtomicU64,
    key_count: AtomicUsize,
}

#[derive(Default)]
struct IssuerKeys {
    keys: Vec<Arc<VerifyKey>>,
    fetched_at: Option<Instant>,
    attempted_at: Option<Instant>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

impl JwksCache {
    pub fn new(http: HttpsClient, limits: JwksLimits) -> Self {
        Self {
            http,
            limits,
            issuers: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            fetches: Family::default(),
        }
    }

    /// The `bkpool_certapi_jwks_fetches_total{result}` counter this cache increments.
    pub fn fetch_counter(&self) -> Family<ResultLabels, Counter> {
        self.fetches.clone()
    }

    /// The key `kid` of `issuer` (the only key when `kid` is `None` and there is exactly one),
    /// fetching discovery and JWKS when the cache is cold, stale, or lacks the kid and was not
    /// refreshed within the refetch interval.
    pub async fn key(&self, issuer: &str, kid: Option<&str>) -> Result<Arc<VerifyKey>, JwksError> {
        let slot = self.slot(issuer);
        let mut keys = slot.state.lock().await;
        let now = Instant::now();
        let stale = keys
            .fetched_at
            .is_none_or(|t| now.duration_since(t) >= self.limits.max_age);
        let may_retry = keys
            .attempted_at
            .is_none_or(|t| now.duration_since(t) >= self.limits.refetch_interval);
        let missing = find(&keys.keys, kid).is_none();
        if (stale || missing) && may_retry {
            keys.attempted_at = Some(now);
            match self.fetch(issuer).await {
                Ok(fresh) => {
                    self.count("ok");
                    keys.keys = fresh;
                    keys.fetched_at = Some(now);
                    slot.key_count.store(keys.keys.len(), Relaxed);
                }
                // A failed refresh keeps the keys we had for a while (an issuer outage should
                // not stop builds), but not forever: a key the issuer withdrew must not live on
                // because its JWKS stayed unreachable. A cold cache has nothing to offer.
                Err(e) if keys.keys.is_empty() || self.too_stale(&keys, now) => {
                    self.count("error");
                    keys.keys.clear();
                    slot.key_count.store(0, Relaxed);
                    return Err(e);
                }
                Err(e) => {
                    self.count("error");
                    tracing::warn!(issuer, error = %e, "JWKS refresh failed; keeping cached keys");
                }
            }
        }
        find(&keys.keys, kid).ok_or(JwksError::UnknownKey)
    }

    /// How many issuers and keys the cache holds now.
    pub fn size(&self) -> (usize, usize) {
        let issuers = self.issuers.lock().expect("JWKS cache lock");
        let keys = issuers.values().map(|s| s.key_count.load(Relaxed)).sum();
        (issuers.len(), keys)
    }

    fn slot(&self, issuer: &str) -> Arc<IssuerSlot> {
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        let mut issuers = self.issuers.lock().expect("JWKS cache lock");
        if let Some(slot) = issuers.get(issuer) {
            slot.last_used_ms.store(now_ms, Relaxed);
            return slot.clone();
        }
        while issuers.len() >= self.limits.max_issuers.max(1) {
            let oldest = issuers
                .iter()
                .min_by_key(|(_, s)| s.last_used_ms.load(Relaxed))
                .map(|(k, _)| k.clone());
            let Some(oldest) = oldest else { break };
            issuers.remove(&oldest);
        }
        let slot = Arc::new(IssuerSlot {
            state: tokio::sync::Mutex::new(IssuerKeys::default()),
            last_used_ms: AtomicU64::new(now_ms),
            key_count: AtomicUsize::new(0),
        });
        issuers.insert(issuer.to_owned(), slot.clone());
        slot
    }

    async fn fetch(&self, issuer: &str) -> Result<Vec<Arc<VerifyKey>>, JwksError> {
        if !is_https_url(issuer) {
            return Err(JwksError::NotHttps(issuer.into()));
        }
        let discovery_failed = |problem: String| JwksError::Discovery {
            issuer: issuer.into(),
            problem,
        };
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let doc: Discovery = self.get_json(&url).await.map_err(discovery_failed)?;
        if doc.issuer != issuer {
            return Err(discovery_failed(format!(
                "discovery names issuer {:?}",
                doc.issuer
            )));
        }
        if !is_https_url(&doc.jwks_uri) {
            return Err(discovery_failed("jwks_uri is not https".into()));
        }
        let set: JwkSet =
            self.get_json(&doc.jwks_uri)
                .await
                .map_err(|problem| JwksError::Fetch {
                    issuer: issuer.into(),
                    problem,
                })?;
        Ok(set
            .keys
            .iter()
            .filter_map(verify_key)
            .take(self.limits.max_keys)
            .map(Arc::new)
            .collect())
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let response = self.http.get(url).await.map_err(|e| e.to_string())?;
        if !response.status.is_success() {
            return Err(format!("HTTP {}", response.status.as_u16()));
        }
        serde_json::from_slice(&response.body).map_err(|e| format!("bad JSON: {e}"))
    }

    /// Keys are served past a failed refresh for at most [`STALE_FACTOR`] times `max_age`.
    fn too_stale(&self, keys: &IssuerKeys, now: Instant) -> bool {
        keys.fetched_at
            .is_none_or(|t| now.duration_since(t) >= self.limits.max_age * STALE_FACTOR)
    }

    fn count(&self, result: &'static str) {
        self.fetches.get_or_create(&ResultLabels { result }).inc();
    }
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksCache")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// The algorithms a JWK's type allows, or `None` for keys bkpool never verifies with
/// (symmetric, unknown curves, short RSA moduli, encryption keys).
pub fn algorithms_for(jwk: &Jwk) -> Option<&'static [Algorithm]> {
    if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    let allowed: &'static [Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) => {
            let bits = URL_SAFE_NO_PAD
                .decode(rsa.n.trim_end_matches('='))
                .map(|n| n.iter().skip_while(|b| **b == 0).count() * 8)
                .unwrap_or(0);
            if bits < 2048 {
                return None;
            }
            &[
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ]
        }
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            &[Algorithm::EdDSA]
        }
        _ => return None,
    };
    // A key that names its algorithm allows that one only.
    match jwk.common.key_algorithm.map(Algorithm::try_from) {
        None => Some(allowed),
        Some(Ok(alg)) => allowed
            .iter()
            .position(|a| *a == alg)
            .map(|i| &allowed[i..=i]),
        Some(Err(_)) => None,
    }
}

fn verify_key(jwk: &Jwk) -> Option<VerifyKey> {
    let algorithms = algorithms_for(jwk)?;
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(VerifyKey {
        kid: jwk.common.key_id.clone(),
        key,
        algorithms,
    })
}

fn find(keys: &[Arc<VerifyKey>], kid: Option<&str>) -> Option<Arc<VerifyKey>> {
    match kid {
        Some(kid) => keys.iter().find(|k| k.kid.as_deref() == Some(kid)).cloned(),
        None if keys.len() == 1 => keys.first().cloned(),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn jwk(v: serde_json::Value) -> Jwk {
        serde_json::from_value(v).unwrap()
    }

    fn rsa_n(bytes: usize) -> String {
        URL_SAFE_NO_PAD.encode(vec![0xc5u8; bytes])
    }

    #[test]
    fn key_types_allow_only_their_algorithms() {
        let rsa = jwk(json!({"kty":"RSA","n": rsa_n(256),"e":"AQAB","kid":"r"}));
        assert_eq!(algorithms_for(&rsa).unwrap().len(), 6);
        let rsa_named = jwk(json!({"kty":"RSA","n": rsa_n(256),"e":"AQAB","alg":"PS384"}));
        assert_eq!(algorithms_for(&rsa_named).unwrap(), &[Algorithm::PS384]);
        let p256 = jwk(json!({"kty":"EC","crv":"P-256","x":"AA","y":"AA"}));
        assert_eq!(algorithms_for(&p256).unwrap(), &[Algorithm::ES256]);
        let ed = jwk(json!({"kty":"OKP","crv":"Ed25519","x":"AA"}));
        assert_eq!(algorithms_for(&ed).unwrap(), &[Algorithm::EdDSA]);
    }

    #[test]
    fn symmetric_short_mismatched_and_encryption_keys_are_never_loaded() {
        let oct = jwk(json!({"kty":"oct","k":"c2VjcmV0"}));
        assert!(algorithms_for(&oct).is_none());
        let short = jwk(json!({"kty":"RSA","n": rsa_n(128),"e":"AQAB"}));
        assert!(algorithms_for(&short).is_none());
        let enc = jwk(json!({"kty":"RSA","n": rsa_n(256),"e":"AQAB","use":"enc"}));
        assert!(algorithms_for(&enc).is_none());
        let ec_as_rs = jwk(json!({"kty":"EC","crv":"P-256","x":"AA","y":"AA","alg":"RS256"}));
        assert!(algorithms_for(&ec_as_rs).is_none());
    }
}
