//! The three endpoints. Each one rate-limits the source, authenticates the bearer token
//! against the target pool's own rules, writes one audit line per decision (with the
//! stable reason, the identity when known and the source address), and counts it.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::{Extension, Json};
use proxy::names::PoolId;
use serde::{Deserialize, Serialize};

use super::directory::{PoolEntry, WarmReason};
use super::error::ApiError;
use super::{ApiState, Peer};
use crate::auth::{AuthError, Bearer, Caller, PoolAuth, Refusal};
use crate::pki::{Ca, IssuedCert};

/// Shortest certificate lifetime a caller may ask for.
pub const MIN_TTL: Duration = Duration::from_secs(60);

/// `POST .../certificates` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueRequest {
    #[serde(default)]
    pub csr: Option<String>,
    #[serde(default)]
    pub generate_key: bool,
    #[serde(default)]
    pub ttl: Option<String>,
}

/// `POST .../certificates` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct IssueResponse {
    pub pool: String,
    pub identity: String,
    /// The client certificate followed by the pool's client CA, PEM.
    pub certificate: String,
    /// The CA bundle to trust the gateway with, PEM.
    pub ca: String,
    pub endpoints: Vec<String>,
    /// RFC 3339.
    pub expires: String,
    /// Only when the server generated the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// `GET .../pools` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct PoolList {
    pub pools: Vec<PoolSummary>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PoolSummary {
    pub namespace: String,
    pub name: String,
    pub endpoints: Vec<String>,
    pub max_ttl_seconds: u64,
}

/// `POST .../wake` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct WakeResponse {
    pub pool: String,
    pub waking: bool,
}

pub async fn issue(
    State(state): State<Arc<ApiState>>,
    Path((ns, name)): Path<(String, String)>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<IssueResponse>, ApiError> {
    let source = source(peer);
    let (pool, caller) = admit(&state, &source, &ns, &name, &headers).await?;
    let label = pool.id.as_str();
    let issued = signer(&pool)
        .and_then(|ca| Ok((ca, parse_issue(body)?)))
        .and_then(|(ca, request)| sign(&state, &pool, &ca, &caller, &request))
        .inspect_err(|e| deny(&state, label, Some(&caller), &source, e))?;
    if state.limiters.wakes.try_acquire(caller.identity.as_str()) {
        state.warmer.warm(&pool.id, WarmReason::CertificateIssued);
        state.metrics.wake(label, "certificate", "started");
    } else {
        state.metrics.wake(label, "certificate", "rate_limited");
    }
    state.metrics.issued(label, caller.method.label());
    tracing::info!(
        target: "bkpool::audit",
        identity = caller.identity.as_str(),
        pool = label,
        method = caller.method.label(),
        source = %source,
        result = "issued",
        serial = %hex(&issued.serial.0),
        not_after = %rfc3339(issued.not_after),
        "certificate issued"
    );
    Ok(Json(IssueResponse {
        pool: label.to_owned(),
        identity: caller.identity.as_str().to_owned(),
        certificate: issued.chain_pem(),
        ca: pool.gateway_ca_pem.clone(),
        endpoints: pool.endpoints.clone(),
        expires: rfc3339(issued.not_after),
        key: issued.key_pem,
    }))
}

pub async fn wake(
    State(state): State<Arc<ApiState>>,
    Path((ns, name)): Path<(String, String)>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<WakeResponse>), ApiError> {
    let source = source(peer);
    let (pool, caller) = admit(&state, &source, &ns, &name, &headers).await?;
    let label = pool.id.as_str();
    if !state.limiters.wakes.try_acquire(caller.identity.as_str()) {
        state.metrics.wake(label, "requested", "rate_limited");
        let e = ApiError::WakeRateLimited;
        deny(&state, label, Some(&caller), &source, &e);
        return Err(e);
    }
    state.warmer.warm(&pool.id, WarmReason::WakeRequested);
    state.metrics.wake(label, "requested", "started");
    tracing::info!(
        target: "bkpool::audit",
        identity = caller.identity.as_str(),
        pool = label,
        method = caller.method.label(),
        source = %source,
        result = "woken",
        "pool wake requested"
    );
    let answer = WakeResponse {
        pool: pool.id.to_string(),
        waking: true,
    };
    Ok((StatusCode::ACCEPTED, Json(answer)))
}

/// Lists the pools of `ns` the caller may get certificates for. A token that authenticates
/// nowhere is refused as such; one that is merely not allowed anywhere gets an empty list.
/// The token is reviewed by the API server once, whatever the number of pools.
pub async fn list(
    State(state): State<Arc<ApiState>>,
    Path(ns): Path<String>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> Result<Json<PoolList>, ApiError> {
    let source = source(peer);
    limit_source(&state, &source)?;
    let token = bearer(&headers).inspect_err(|e| deny(&state, "", None, &source, e))?;
    proxy::names::check_label("namespace", &ns).map_err(|_| ApiError::BadPoolName)?;
    let bearer = state
        .auth
        .bearer(token)
        .map_err(ApiError::Auth)
        .inspect_err(|e| deny(&state, "", None, &source, e))?;
    let mut granted = Vec::new();
    let mut refusal: Option<AuthError> = None;
    for pool in state.directory.pools_in(&ns).into_iter().take(MAX_LISTED) {
        match state.auth.admit(&bearer, &pool.id, &pool.auth).await {
            Ok(_) => granted.push(summary(&pool)),
            Err(e) if counts_as_not_allowed(&e) => {}
            Err(e) => refusal = refusal.or(Some(e)),
        }
    }
    if let (true, Some(e)) = (granted.is_empty(), refusal) {
        let e = ApiError::Auth(e);
        deny(&state, "", None, &source, &e);
        return Err(e);
    }
    Ok(Json(PoolList { pools: granted }))
}

/// Pools looked at per list request at most (each may cost a SubjectAccessReview).
const MAX_LISTED: usize = 200;

/// Rate-limits the source, then authenticates and authorizes the caller for `ns/name`, then
/// rate-limits its identity.
async fn admit(
    state: &ApiState,
    source: &str,
    ns: &str,
    name: &str,
    headers: &HeaderMap,
) -> Result<(Arc<PoolEntry>, Caller), ApiError> {
    limit_source(state, source)?;
    let token = bearer(headers).inspect_err(|e| deny(state, "", None, source, e))?;
    let id = PoolId::new(ns, name)
        .map_err(|_| ApiError::BadPoolName)
        .inspect_err(|e| deny(state, "", None, source, e))?;
    let bearer = state
        .auth
        .bearer(token)
        .map_err(ApiError::Auth)
        .inspect_err(|e| deny(state, "", None, source, e))?;
    let Some(pool) = state.directory.pool(&id) else {
        deny(state, "", None, source, &ApiError::PoolNotFound);
        return Err(missing_pool(state, &bearer, &id).await);
    };
    let label = pool.id.as_str();
    let caller = state
        .auth
        .admit(&bearer, &pool.id, &pool.auth)
        .await
        .map_err(ApiError::Auth)
        .inspect_err(|e| deny(state, label, None, source, e))?;
    if !state
        .limiters
        .identities
        .try_acquire(caller.identity.as_str())
    {
        let e = ApiError::RateLimited;
        deny(state, label, Some(&caller), source, &e);
        return Err(e);
    }
    Ok((pool, caller))
}

/// What a caller asking for a pool that does not exist is told. "No such pool" only when it
/// may know which pools exist in that namespace (it is admitted to one of them, or RBAC lets
/// it list them); anyone else gets the answer a pool with default auth settings would give
/// it, so pool names cannot be probed. (A pool whose own rules refuse a caller for another
/// reason, such as a claim that does not match, says so: that reason is what its caller
/// needs to fix.) At most one TokenReview and one SubjectAccessReview, however many pools the
/// namespace has.
async fn missing_pool(state: &ApiState, bearer: &Bearer<'_>, id: &PoolId) -> ApiError {
    let pools: Vec<(PoolId, PoolAuth)> = state
        .directory
        .pools_in(id.namespace())
        .into_iter()
        .take(MAX_LISTED)
        .map(|p| (p.id.clone(), p.auth.clone()))
        .collect();
    if state
        .auth
        .may_know_pools(bearer, id.namespace(), &pools)
        .await
    {
        return ApiError::PoolNotFound;
    }
    match state
        .auth
        .admit(bearer, id, &state.directory.default_auth())
        .await
    {
        Err(e) => ApiError::Auth(e),
        Ok(_) => ApiError::PoolNotFound,
    }
}

fn limit_source(state: &ApiState, source: &str) -> Result<(), ApiError> {
    if state.limiters.sources.try_acquire(source) {
        return Ok(());
    }
    let e = ApiError::SourceRateLimited;
    deny(state, "", None, source, &e);
    Err(e)
}

/// The source address as the rate limiter and the audit log name it.
fn source(peer: Option<Extension<Peer>>) -> String {
    peer.map_or_else(
        || "unknown".to_owned(),
        |Extension(Peer(ip))| ip.to_string(),
    )
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let missing = || ApiError::Auth(AuthError::MissingToken);
    let value = headers.get(header::AUTHORIZATION).ok_or_else(missing)?;
    let value = value.to_str().map_err(|_| missing())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(missing());
    }
    Ok(token.trim())
}

fn parse_issue(body: Result<Bytes, BytesRejection>) -> Result<IssueRequest, ApiError> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::BodyTooLarge,
        _ => ApiError::BadRequest("the request body could not be read"),
    })?;
    let request: IssueRequest = serde_json::from_slice(&body).map_err(|_| {
        ApiError::BadRequest(
            "body must be JSON {\"csr\": PEM} or {\"generate_key\": true}, optionally with \"ttl\"",
        )
    })?;
    match (&request.csr, request.generate_key) {
        (Some(_), false) | (None, true) => Ok(request),
        (Some(_), true) => Err(ApiError::BadRequest(
            "send either csr or generate_key, not both",
        )),
        (None, false) => Err(ApiError::BadRequest(
            "send a csr (preferred) or generate_key: true",
        )),
    }
}

/// The pool's CA, or a 503: never a certificate from another CA.
fn signer(pool: &PoolEntry) -> Result<Arc<Ca>, ApiError> {
    pool.ca.clone().map_err(|e| {
        tracing::error!(pool = %pool.id, error = %e, "cannot issue: the pool's client CA is unavailable");
        ApiError::PoolCaUnavailable
    })
}

fn sign(
    state: &ApiState,
    pool: &PoolEntry,
    ca: &Ca,
    caller: &Caller,
    request: &IssueRequest,
) -> Result<IssuedCert, ApiError> {
    let ttl = ttl(request.ttl.as_deref(), pool.max_ttl)?;
    let result = match &request.csr {
        Some(csr) => ca.sign_client_csr(csr, &pool.id, &caller.identity, ttl),
        None if state.generate_keys => ca.issue_client(&pool.id, &caller.identity, ttl),
        None => return Err(ApiError::KeyGenerationDisabled),
    };
    result.map_err(|e| match e {
        crate::pki::PkiError::Csr(e) => ApiError::Csr(e),
        other => {
            tracing::error!(pool = %pool.id, error = %other, "cannot issue certificate");
            ApiError::Internal
        }
    })
}

/// The lifetime asked for, at most the pool's maximum (which is also the default). Asking
/// for more is refused rather than quietly shortened: a job planning on a lifetime learns at
/// once that it will not get it.
pub fn ttl(requested: Option<&str>, max: Duration) -> Result<Duration, ApiError> {
    let Some(text) = requested else {
        return Ok(max);
    };
    let asked = humantime::parse_duration(text).map_err(|_| ApiError::BadTtl)?;
    if asked < MIN_TTL {
        return Err(ApiError::BadTtl);
    }
    if asked > max {
        return Err(ApiError::TtlAboveCap(max));
    }
    Ok(asked)
}

/// Not being allowed on one pool while listing is not an error; failing to authenticate is.
fn counts_as_not_allowed(e: &AuthError) -> bool {
    e.refusal() == Refusal::Forbidden || *e == AuthError::IssuerNotTrusted
}

fn summary(pool: &PoolEntry) -> PoolSummary {
    PoolSummary {
        namespace: pool.id.namespace().to_owned(),
        name: pool.id.name().to_owned(),
        endpoints: pool.endpoints.clone(),
        max_ttl_seconds: pool.max_ttl.as_secs(),
    }
}

fn deny(state: &ApiState, pool: &str, caller: Option<&Caller>, source: &str, error: &ApiError) {
    state.metrics.denied(pool, error.reason());
    tracing::info!(
        target: "bkpool::audit",
        identity = caller.map_or("", |c| c.identity.as_str()),
        pool,
        source,
        result = "denied",
        reason = error.reason(),
        "certificate API request denied"
    );
}

fn rfc3339(t: std::time::SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_defaults_to_the_pool_maximum_and_more_is_refused() {
        let hour = Duration::from_secs(3600);
        assert_eq!(ttl(None, hour).unwrap(), hour);
        assert_eq!(ttl(Some("30m"), hour).unwrap(), hour / 2);
        assert_eq!(ttl(Some("1h"), hour).unwrap(), hour);
        let refused = ttl(Some("61m"), hour).unwrap_err();
        assert_eq!(refused.reason(), "ttl_above_cap");
        assert!(refused.to_string().contains("3600s"), "{refused}");
        assert!(matches!(ttl(Some("10s"), hour), Err(ApiError::BadTtl)));
        assert!(matches!(ttl(Some("soon"), hour), Err(ApiError::BadTtl)));
    }
}
