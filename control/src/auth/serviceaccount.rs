//! Kubernetes ServiceAccount callers: which accounts a pool lets in ([`ServiceAccounts`]),
//! and the [`Reviewer`] that authenticates their tokens with TokenReview and asks RBAC with
//! SubjectAccessReview, remembering both answers briefly ([`super::review`]).
//!
//! A token's own claims are looked at first, unverified, only to refuse early: one that has
//! expired, or is not meant for bkpool's audiences (the pod's default token, a legacy Secret
//! token without `aud`), would be refused by the API server too, so it costs no API call and
//! gets a precise reason. Nothing is ever granted on unverified claims.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::AuthError;
use super::jwt::UnverifiedJwt;
use super::kube::{Access, KubeAuth, KubeError, Review, ReviewedUser};
use super::oidc::LEEWAY;
use super::review::{self, CacheLimits, ReviewCache};

/// The username prefix of every ServiceAccount.
pub const USERNAME_PREFIX: &str = "system:serviceaccount:";

/// One ServiceAccount a pool lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccountName {
    pub namespace: String,
    pub name: String,
}

/// Which ServiceAccounts a pool lets in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ServiceAccounts {
    /// ServiceAccount tokens are not accepted at all.
    #[default]
    Closed,
    /// These accounts, and no other (TokenReview, then the list).
    Listed(Vec<ServiceAccountName>),
    /// Any account RBAC allows `create` on `buildkitpools/certificates` for the pool
    /// (TokenReview, then SubjectAccessReview).
    Rbac,
}

impl ServiceAccountName {
    /// `NAME` (in `namespace`) or `NAMESPACE/NAME`.
    pub fn parse(text: &str, namespace: &str) -> Result<Self, String> {
        let (ns, name) = text.split_once('/').unwrap_or((namespace, text));
        for (what, label) in [("namespace", ns), ("name", name)] {
            proxy::names::check_label(what, label).map_err(|e| format!("{text:?}: {e}"))?;
        }
        Ok(Self {
            namespace: ns.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The account's Kubernetes username, `system:serviceaccount:NS:NAME`.
    pub fn username(&self) -> String {
        format!("{USERNAME_PREFIX}{}:{}", self.namespace, self.name)
    }
}

impl ServiceAccounts {
    /// Whether ServiceAccount tokens are looked at at all.
    pub fn accepts_any(&self) -> bool {
        !matches!(self, Self::Closed)
    }
}

/// TokenReview and SubjectAccessReview, each answer remembered briefly.
pub struct Reviewer {
    kube: Arc<dyn KubeAuth>,
    audiences: Vec<String>,
    limits: CacheLimits,
    tokens: ReviewCache<Result<ReviewedUser, AuthError>>,
    access: ReviewCache<bool>,
}

impl std::fmt::Debug for Reviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reviewer")
            .field("audiences", &self.audiences)
            .field("tokens", &self.tokens.len())
            .field("access", &self.access.len())
            .finish_non_exhaustive()
    }
}

impl Reviewer {
    /// `audiences` are what tokens must be issued for.
    pub fn new(kube: Arc<dyn KubeAuth>, audiences: Vec<String>, limits: CacheLimits) -> Self {
        Self {
            kube,
            audiences,
            tokens: ReviewCache::new(limits.capacity),
            access: ReviewCache::new(limits.capacity),
            limits,
        }
    }

    pub fn audiences(&self) -> &[String] {
        &self.audiences
    }

    /// The API server this reviewer asks.
    pub fn kube(&self) -> Arc<dyn KubeAuth> {
        self.kube.clone()
    }

    /// The ServiceAccount holding `jwt`, authenticated by the API server for bkpool's
    /// audiences.
    pub async fn user(&self, jwt: &UnverifiedJwt<'_>) -> Result<ReviewedUser, AuthError> {
        let expires_in = precheck(jwt, &self.audiences)?;
        let key = review::key(&[b"token", jwt.raw.as_bytes()]);
        if let Some(known) = self.tokens.get(&key) {
            return known;
        }
        let review = self
            .kube
            .review_token(jwt.raw, &self.audiences)
            .await
            .map_err(unavailable)?;
        let answer = match review {
            Review::Authenticated(user) if user.username.starts_with(USERNAME_PREFIX) => Ok(user),
            Review::Authenticated(_) => Err(AuthError::NotServiceAccount),
            Review::Rejected => Err(AuthError::TokenRejected),
        };
        let ttl = self
            .limits
            .token_ttl
            .min(expires_in.unwrap_or(Duration::MAX));
        self.tokens.insert(key, answer.clone(), ttl);
        answer
    }

    /// Whether `user` may do `access`.
    pub async fn allowed(&self, user: &ReviewedUser, access: &Access) -> Result<bool, AuthError> {
        let key = access_key(user, access);
        if let Some(known) = self.access.get(&key) {
            return Ok(known);
        }
        let allowed = self
            .kube
            .review_access(user, access)
            .await
            .map_err(unavailable)?;
        self.access.insert(key, allowed, self.limits.access_ttl);
        Ok(allowed)
    }
}

/// Refuses, from its own claims, a token the API server would refuse for bkpool anyway.
/// Returns how long the token claims to live.
fn precheck(jwt: &UnverifiedJwt<'_>, audiences: &[String]) -> Result<Option<Duration>, AuthError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let expires_in = match jwt.claims.get("exp") {
        None => None,
        Some(exp) => {
            let exp = exp.as_f64().ok_or(AuthError::MissingClaim)?;
            if exp + LEEWAY.as_secs_f64() < now {
                return Err(AuthError::Expired);
            }
            Some(Duration::from_secs_f64((exp - now).max(0.0)))
        }
    };
    let meant_for_us = match jwt.claims.get("aud") {
        Some(Value::String(aud)) => audiences.contains(aud),
        Some(Value::Array(auds)) => auds
            .iter()
            .filter_map(Value::as_str)
            .any(|aud| audiences.iter().any(|a| a == aud)),
        _ => false,
    };
    if !meant_for_us {
        return Err(AuthError::WrongAudience);
    }
    Ok(expires_in)
}

fn access_key(user: &ReviewedUser, access: &Access) -> review::Key {
    let mut parts: Vec<&[u8]> = vec![
        b"access",
        user.username.as_bytes(),
        user.uid.as_bytes(),
        access.namespace.as_bytes(),
        access.verb.as_bytes(),
        access.resource.as_bytes(),
        access.subresource.unwrap_or_default().as_bytes(),
        access.name.as_deref().unwrap_or_default().as_bytes(),
    ];
    parts.extend(user.groups.iter().map(|g| g.as_bytes()));
    let extra: Vec<String> = user
        .extra
        .iter()
        .map(|(k, v)| format!("{k}={}", v.join(",")))
        .collect();
    parts.extend(extra.iter().map(|e| e.as_bytes()));
    review::key(&parts)
}

fn unavailable(e: KubeError) -> AuthError {
    tracing::warn!(error = %e, "Kubernetes API call failed");
    AuthError::KubeUnavailable
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use futures::future::BoxFuture;

    use super::*;
    use crate::auth::jwt;

    #[test]
    fn listed_names_default_to_the_pool_namespace() {
        let sa = ServiceAccountName::parse("builder", "ci").unwrap();
        assert_eq!(sa.username(), "system:serviceaccount:ci:builder");
        let other = ServiceAccountName::parse("tools/builder", "ci").unwrap();
        assert_eq!(other.username(), "system:serviceaccount:tools:builder");
        for bad in ["", "a/b/c", "Builder", "system:serviceaccount:ci:x", "/x"] {
            assert!(ServiceAccountName::parse(bad, "ci").is_err(), "{bad}");
        }
    }

    /// Counts reviews; authenticates every token as one account.
    #[derive(Debug, Default)]
    struct Counting {
        tokens: AtomicUsize,
        access: AtomicUsize,
    }

    impl KubeAuth for Counting {
        fn review_token<'a>(
            &'a self,
            _: &'a str,
            _: &'a [String],
        ) -> BoxFuture<'a, Result<Review, KubeError>> {
            self.tokens.fetch_add(1, Relaxed);
            Box::pin(async {
                Ok(Review::Authenticated(ReviewedUser {
                    username: "system:serviceaccount:ci:builder".into(),
                    uid: "u".into(),
                    groups: vec![],
                    extra: Default::default(),
                    audiences: vec!["bkpool".into()],
                }))
            })
        }

        fn review_access<'a>(
            &'a self,
            _: &'a ReviewedUser,
            _: &'a Access,
        ) -> BoxFuture<'a, Result<bool, KubeError>> {
            self.access.fetch_add(1, Relaxed);
            Box::pin(async { Ok(true) })
        }
    }

    fn token(claims: Value) -> String {
        let enc = |s: &str| URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.{}",
            enc(r#"{"alg":"RS256"}"#),
            enc(&claims.to_string()),
            enc("sig")
        )
    }

    fn now() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[tokio::test]
    async fn obviously_bad_tokens_cost_no_review_and_answers_are_remembered() {
        let kube = Arc::new(Counting::default());
        let reviewer = Reviewer::new(kube.clone(), vec!["bkpool".into()], CacheLimits::default());
        let cases = [
            (
                serde_json::json!({"aud": ["bkpool"], "exp": now() - 3600}),
                AuthError::Expired,
            ),
            (
                serde_json::json!({"aud": ["https://kubernetes.default.svc"], "exp": now() + 600}),
                AuthError::WrongAudience,
            ),
            (
                serde_json::json!({"iss": "kubernetes/serviceaccount"}),
                AuthError::WrongAudience,
            ),
        ];
        for (claims, expected) in cases {
            let text = token(claims);
            let jwt = jwt::parse(&text).unwrap();
            assert_eq!(reviewer.user(&jwt).await.unwrap_err(), expected);
        }
        assert_eq!(kube.tokens.load(Relaxed), 0);

        let text = token(serde_json::json!({"aud": "bkpool", "exp": now() + 600}));
        let jwt = jwt::parse(&text).unwrap();
        for _ in 0..5 {
            let user = reviewer.user(&jwt).await.unwrap();
            let access = Access::certificates("ci", "a");
            assert!(reviewer.allowed(&user, &access).await.unwrap());
        }
        assert_eq!(
            (kube.tokens.load(Relaxed), kube.access.load(Relaxed)),
            (1, 1)
        );
    }
}
