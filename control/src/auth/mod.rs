//! Who is asking for a certificate, and whether they may have one for this pool.
//!
//! - [`jwt`]: splitting and decoding a token before any key is involved (fuzzed).
//! - [`rules`]: per-pool claim rules for OIDC callers, exact or `*` globs (fuzzed).
//! - [`jwks`]: discovery and the bounded, single-flight JWKS cache of trusted issuers.
//! - [`oidc`]: signature and registered-claim checks for one trusted issuer.
//! - [`kube`]: TokenReview and SubjectAccessReview against the API server.
//! - [`serviceaccount`]: which ServiceAccounts a pool lets in, and their reviews.
//! - [`review`]: the short-lived, bounded memory of review answers.
//! - [`bearer`]: a token read once per request.
//! - [`static_tokens`]: local mode's token file.
//! - [`ratelimit`]: the token buckets (per identity, per source).
//!
//! [`Authenticator::admit`] is the one entry point: it takes a request's [`Bearer`] and the
//! target pool's [`PoolAuth`], and only that pool's rules are consulted, so an issuer trusted
//! by a pool in namespace A grants nothing in namespace B. However many pools one request
//! looks at, its token is reviewed by the API server at most once.

pub mod bearer;
pub mod jwks;
pub mod jwt;
pub mod kube;
pub mod oidc;
pub mod ratelimit;
pub mod review;
pub mod rules;
pub mod serviceaccount;
pub mod static_tokens;

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use proxy::names::{ClientIdentity, PoolId};

pub use bearer::Bearer;
pub use jwks::{JwksCache, JwksLimits};
pub use kube::{Access, KubeApi, KubeAuth, ReviewedUser};
pub use review::CacheLimits;
pub use rules::ClaimRules;
pub use serviceaccount::{ServiceAccountName, ServiceAccounts};
pub use static_tokens::StaticTokens;

use bearer::Presented;
use serviceaccount::Reviewer;

/// How a pool lets callers in.
#[derive(Debug, Clone, Default)]
pub struct PoolAuth {
    /// Kubernetes ServiceAccounts: none, a list, or whoever RBAC allows.
    pub serviceaccounts: ServiceAccounts,
    /// External OIDC issuers this pool trusts, each with its audiences and claim rules.
    pub issuers: Vec<OidcTrust>,
}

/// One OIDC issuer a pool trusts.
#[derive(Debug, Clone)]
pub struct OidcTrust {
    /// The issuer URL, exactly as tokens carry it in `iss` (HTTPS).
    pub issuer: String,
    /// Accepted `aud` values (at least one).
    pub audiences: Vec<String>,
    pub rules: ClaimRules,
    /// The claim naming the caller (default `sub`).
    pub identity_claim: Option<String>,
}

/// How a caller authenticated (the `method` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    ServiceAccount,
    Oidc,
    StaticToken,
}

/// An authenticated caller allowed to use the pool it asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub identity: ClientIdentity,
    pub method: Method,
}

/// Why a caller was refused. Each variant has a stable [`reason`](AuthError::reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    MissingToken,
    #[error(transparent)]
    Jwt(#[from] jwt::JwtError),
    #[error("the token's issuer is not trusted by this pool")]
    IssuerNotTrusted,
    #[error("unsigned tokens (alg none) are never accepted")]
    AlgNone,
    #[error("HMAC-signed tokens are never accepted")]
    AlgHmac,
    #[error("the token's signature algorithm is not supported")]
    AlgUnsupported,
    #[error("the token's algorithm does not match its key's type")]
    AlgKeyMismatch,
    #[error(transparent)]
    Jwks(#[from] jwks::JwksError),
    #[error("the token's signature is invalid")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token claims to be issued in the future")]
    IssuedInFuture,
    #[error("the token is not meant for this audience")]
    WrongAudience,
    #[error("the token lacks a required claim, or a claim has the wrong type")]
    MissingClaim,
    #[error("the token's claims do not satisfy this pool's rule on {0:?}")]
    ClaimRuleMismatch(String),
    #[error("the caller's identity is not usable in a certificate")]
    BadIdentity,
    #[error("this token does not grant this pool")]
    PoolNotAllowed,
    #[error("the API server did not authenticate this token for bkpool's audiences")]
    TokenRejected,
    #[error("only ServiceAccount tokens are accepted from the API server")]
    NotServiceAccount,
    #[error("this pool does not list the caller's ServiceAccount")]
    ServiceAccountNotListed,
    #[error("RBAC does not allow create on buildkitpools/certificates for this pool")]
    AccessDenied,
    #[error("the Kubernetes API server is unavailable")]
    KubeUnavailable,
}

/// How a refusal should be answered: who failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The caller is not who it says (401).
    Unauthenticated,
    /// The caller is known but may not do this (403).
    Forbidden,
    /// Something bkpool depends on failed; try again (503).
    Unavailable,
}

impl AuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingToken => "token_missing",
            Self::Jwt(e) => e.reason(),
            Self::IssuerNotTrusted => "issuer_not_trusted",
            Self::AlgNone => "alg_none",
            Self::AlgHmac => "alg_hmac",
            Self::AlgUnsupported => "alg_unsupported",
            Self::AlgKeyMismatch => "alg_key_mismatch",
            Self::Jwks(e) => e.reason(),
            Self::BadSignature => "signature_invalid",
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::IssuedInFuture => "token_issued_in_future",
            Self::WrongAudience => "audience_mismatch",
            Self::MissingClaim => "claim_missing",
            Self::ClaimRuleMismatch(_) => "claim_rule_mismatch",
            Self::BadIdentity => "identity_invalid",
            Self::PoolNotAllowed => "pool_not_allowed",
            Self::TokenRejected => "token_rejected",
            Self::NotServiceAccount => "not_serviceaccount",
            Self::ServiceAccountNotListed => "serviceaccount_not_listed",
            Self::AccessDenied => "access_denied",
            Self::KubeUnavailable => "kube_unavailable",
        }
    }

    pub fn refusal(&self) -> Refusal {
        match self {
            Self::ClaimRuleMismatch(_)
            | Self::PoolNotAllowed
            | Self::AccessDenied
            | Self::ServiceAccountNotListed => Refusal::Forbidden,
            Self::KubeUnavailable => Refusal::Unavailable,
            Self::Jwks(e) if !matches!(e, jwks::JwksError::UnknownKey) => Refusal::Unavailable,
            _ => Refusal::Unauthenticated,
        }
    }
}

/// Verification latency, by method and result.
#[derive(Debug, Clone)]
pub struct AuthMetrics {
    verify_seconds: Family<VerifyLabels, Histogram>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerifyLabels {
    method: &'static str,
    result: &'static str,
}

impl AuthMetrics {
    /// Registers `bkpool_certapi_token_verification_duration_seconds` and the JWKS fetch
    /// counter of `jwks`.
    pub fn register(registry: &mut Registry, jwks: &JwksCache) -> Self {
        let sub = registry.sub_registry_with_prefix("bkpool_certapi");
        let verify_seconds = Family::<VerifyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_1, 2.5, 14))
        });
        sub.register_with_unit(
            "token_verification_duration",
            "Time to authenticate and authorize a token, by method and result",
            Unit::Seconds,
            verify_seconds.clone(),
        );
        sub.register(
            "jwks_fetches",
            "OIDC discovery and JWKS fetches, by result",
            jwks.fetch_counter(),
        );
        Self { verify_seconds }
    }

    fn observe(&self, method: &'static str, ok: bool, started: Instant) {
        let result = if ok { "ok" } else { "denied" };
        self.verify_seconds
            .get_or_create(&VerifyLabels { method, result })
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Authenticates bearer tokens and authorizes them for one pool.
#[derive(Debug)]
pub struct Authenticator {
    jwks: Arc<JwksCache>,
    reviewer: Option<Reviewer>,
    audiences: Vec<String>,
    limits: CacheLimits,
    static_tokens: StaticTokens,
    metrics: Option<AuthMetrics>,
}

impl Method {
    pub fn label(self) -> &'static str {
        match self {
            Self::ServiceAccount => "serviceaccount",
            Self::Oidc => "oidc",
            Self::StaticToken => "static",
        }
    }
}

/// How far [`Authenticator::admit`] may go to decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Depth {
    /// Every check, SubjectAccessReviews included.
    Full,
    /// Only what needs no question to RBAC (a pool in RBAC mode admits nobody here).
    WithoutRbac,
}

impl Authenticator {
    /// `audiences` are what ServiceAccount tokens must be issued for (TokenReview).
    pub fn new(jwks: Arc<JwksCache>, kube: Option<KubeApi>, audiences: Vec<String>) -> Self {
        let limits = CacheLimits::default();
        let reviewer = kube
            .map(|k| Reviewer::new(Arc::new(k) as Arc<dyn KubeAuth>, audiences.clone(), limits));
        Self {
            jwks,
            reviewer,
            audiences,
            limits,
            static_tokens: StaticTokens::default(),
            metrics: None,
        }
    }

    /// Asks `kube` for reviews instead (for example a client of another API server).
    pub fn with_kube(mut self, kube: Arc<dyn KubeAuth>) -> Self {
        self.reviewer = Some(Reviewer::new(kube, self.audiences.clone(), self.limits));
        self
    }

    /// How long review answers are remembered.
    pub fn with_cache_limits(mut self, limits: CacheLimits) -> Self {
        self.limits = limits;
        if let Some(reviewer) = self.reviewer.take() {
            let kube = reviewer.kube();
            self.reviewer = Some(Reviewer::new(kube, self.audiences.clone(), limits));
        }
        self
    }

    pub fn with_static_tokens(mut self, tokens: StaticTokens) -> Self {
        self.static_tokens = tokens;
        self
    }

    pub fn with_metrics(mut self, metrics: AuthMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn jwks(&self) -> &JwksCache {
        &self.jwks
    }

    /// Reads `token` once for the whole request: a static token, or a JWT (not yet verified).
    pub fn bearer<'t>(&self, token: &'t str) -> Result<Bearer<'t>, AuthError> {
        if token.is_empty() {
            return Err(AuthError::MissingToken);
        }
        if let Some(grant) = self.static_tokens.lookup(token) {
            return Ok(Bearer::new(Presented::Static(grant)));
        }
        Ok(Bearer::new(Presented::Jwt(jwt::parse(token)?)))
    }

    /// Who holds `token`, if they may have certificates for `pool` under `auth` (one request,
    /// one pool).
    pub async fn authorize(
        &self,
        token: &str,
        pool: &PoolId,
        auth: &PoolAuth,
    ) -> Result<Caller, AuthError> {
        let bearer = self.bearer(token)?;
        self.admit(&bearer, pool, auth).await
    }

    /// Who holds `bearer`, if they may have certificates for `pool` under `auth`. Only that
    /// pool's rules are consulted. The API server reviews the token at most once per
    /// `bearer`, however many pools are asked about.
    pub async fn admit(
        &self,
        bearer: &Bearer<'_>,
        pool: &PoolId,
        auth: &PoolAuth,
    ) -> Result<Caller, AuthError> {
        let started = Instant::now();
        let (method, result) = self.admit_at(bearer, pool, auth, Depth::Full).await;
        if let Some(m) = &self.metrics {
            m.observe(method, result.is_ok(), started);
        }
        result
    }

    /// Whether the caller may know which pools exist in `namespace`: it is admitted to one
    /// of `pools` without asking RBAC (its token, its ServiceAccount or its claims name one),
    /// or RBAC lets its ServiceAccount `list` `buildkitpools` there. Costs at most one
    /// TokenReview and one SubjectAccessReview, whatever the number of pools.
    pub async fn may_know_pools(
        &self,
        bearer: &Bearer<'_>,
        namespace: &str,
        pools: &[(PoolId, PoolAuth)],
    ) -> bool {
        for (id, auth) in pools {
            let (_, result) = self.admit_at(bearer, id, auth, Depth::WithoutRbac).await;
            if result.is_ok() {
                return true;
            }
        }
        let (Some(reviewer), Some(jwt)) = (&self.reviewer, bearer.jwt()) else {
            return false;
        };
        match self.reviewed(reviewer, bearer, jwt).await {
            Ok(user) => reviewer
                .allowed(&user, &Access::list_pools(namespace))
                .await
                .unwrap_or(false),
            Err(_) => false,
        }
    }

    async fn admit_at(
        &self,
        bearer: &Bearer<'_>,
        pool: &PoolId,
        auth: &PoolAuth,
        depth: Depth,
    ) -> (&'static str, Result<Caller, AuthError>) {
        let jwt = match &bearer.presented {
            Presented::Static(grant) => {
                let result = if grant.allows(pool) {
                    Ok(Caller {
                        identity: grant.identity.clone(),
                        method: Method::StaticToken,
                    })
                } else {
                    Err(AuthError::PoolNotAllowed)
                };
                return (Method::StaticToken.label(), result);
            }
            Presented::Jwt(jwt) => jwt,
        };
        let trusted: Vec<&OidcTrust> = auth
            .issuers
            .iter()
            .filter(|t| jwt.issuer() == Some(t.issuer.as_str()))
            .collect();
        match (trusted.is_empty(), &self.reviewer) {
            (false, _) => (Method::Oidc.label(), self.oidc_any(jwt, &trusted).await),
            (true, Some(reviewer)) if auth.serviceaccounts.accepts_any() => {
                let result = self
                    .serviceaccount(reviewer, bearer, jwt, pool, &auth.serviceaccounts, depth)
                    .await;
                (Method::ServiceAccount.label(), result)
            }
            _ => ("none", Err(AuthError::IssuerNotTrusted)),
        }
    }

    /// The first of the pool's entries for this issuer the token satisfies (a pool may list
    /// one issuer twice, e.g. with rules for two repositories), else the last refusal.
    async fn oidc_any(
        &self,
        jwt: &jwt::UnverifiedJwt<'_>,
        trusted: &[&OidcTrust],
    ) -> Result<Caller, AuthError> {
        let mut last = Err(AuthError::IssuerNotTrusted);
        for trust in trusted {
            last = self.oidc(jwt, trust).await;
            if last.is_ok() {
                break;
            }
        }
        last
    }

    async fn oidc(
        &self,
        jwt: &jwt::UnverifiedJwt<'_>,
        trust: &OidcTrust,
    ) -> Result<Caller, AuthError> {
        let claims = oidc::verify(&self.jwks, jwt, trust).await?;
        if let Some(claim) = trust.rules.first_mismatch(&claims) {
            return Err(AuthError::ClaimRuleMismatch(claim.to_owned()));
        }
        let identity = oidc::identity(trust, &claims)?;
        Ok(Caller {
            identity: ClientIdentity::new(&identity).map_err(|_| AuthError::BadIdentity)?,
            method: Method::Oidc,
        })
    }

    async fn serviceaccount(
        &self,
        reviewer: &Reviewer,
        bearer: &Bearer<'_>,
        jwt: &jwt::UnverifiedJwt<'_>,
        pool: &PoolId,
        accounts: &ServiceAccounts,
        depth: Depth,
    ) -> Result<Caller, AuthError> {
        let user = self.reviewed(reviewer, bearer, jwt).await?;
        let admitted = match (accounts, depth) {
            (ServiceAccounts::Listed(list), _) => {
                list.iter().any(|sa| sa.username() == user.username)
            }
            (ServiceAccounts::Rbac, Depth::Full) => {
                let access = Access::certificates(pool.namespace(), pool.name());
                reviewer.allowed(&user, &access).await?
            }
            (ServiceAccounts::Rbac, Depth::WithoutRbac) | (ServiceAccounts::Closed, _) => false,
        };
        if !admitted {
            return Err(match accounts {
                ServiceAccounts::Listed(_) => AuthError::ServiceAccountNotListed,
                _ => AuthError::AccessDenied,
            });
        }
        Ok(Caller {
            identity: ClientIdentity::new(&user.username).map_err(|_| AuthError::BadIdentity)?,
            method: Method::ServiceAccount,
        })
    }

    /// The TokenReview's answer for `bearer`, asked for once.
    async fn reviewed(
        &self,
        reviewer: &Reviewer,
        bearer: &Bearer<'_>,
        jwt: &jwt::UnverifiedJwt<'_>,
    ) -> Result<ReviewedUser, AuthError> {
        bearer
            .reviewed
            .get_or_init(|| reviewer.user(jwt))
            .await
            .clone()
    }
}

/// The `token` fuzz target's body: `data` is a claim-rule pattern, a newline, and a token.
/// Parsing never panics and never accepts more than [`jwt::MAX_TOKEN_BYTES`]; any parsed
/// claims can be checked against any rule; a pattern without `*` matches itself and `*`
/// matches everything.
#[doc(hidden)]
pub fn fuzz_token(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (pattern, token) = text.split_once('\n').unwrap_or(("sub-*", text));
    if !pattern.contains('*') {
        assert!(rules::glob_match(pattern, pattern), "{pattern:?}");
    }
    assert!(rules::glob_match("*", token));
    let Ok(jwt) = jwt::parse(token) else {
        return;
    };
    assert!(token.len() <= jwt::MAX_TOKEN_BYTES);
    let _ = oidc::allowed_algorithm(&jwt.header.alg);
    for claim in jwt.claims.keys().take(8) {
        if let Ok(rule) = rules::ClaimRule::new(claim, vec![pattern.to_owned()]) {
            let raw = [(claim.clone(), rules::RawPatterns::One(pattern.to_owned()))].into();
            if let Ok(set) = ClaimRules::from_raw(&raw) {
                let _ = set.first_mismatch(&jwt.claims);
            }
            drop(rule);
        }
    }
}

#[cfg(test)]
impl OidcTrust {
    pub(crate) fn for_tests(issuer: &str, identity_claim: &str) -> Self {
        let raw = [("sub".to_owned(), rules::RawPatterns::One("x*".into()))].into();
        Self {
            issuer: issuer.into(),
            audiences: vec!["bkpool".into()],
            rules: ClaimRules::from_raw(&raw).unwrap(),
            identity_claim: Some(identity_claim.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    #[test]
    fn the_fuzz_hook_survives_its_seeds() {
        let enc = |s: &str| URL_SAFE_NO_PAD.encode(s);
        let token = format!(
            "{}.{}.{}",
            enc(r#"{"alg":"RS256","kid":"k"}"#),
            enc(r#"{"sub":"repo:org/app","repository":"org/app","n":5}"#),
            enc("sig")
        );
        for input in [
            format!("repo:*\n{token}"),
            format!("org/app\n{token}"),
            token.clone(),
            "\n".into(),
            "*\n..".into(),
            String::new(),
        ] {
            super::fuzz_token(input.as_bytes());
        }
        super::fuzz_token(&[0xff, 0xfe]);
    }
}
