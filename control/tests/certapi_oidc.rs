//! The certificate API with OIDC callers, against a real OIDC issuer served over HTTPS on
//! loopback: good tokens get certificates for their pool and no other, every kind of bad
//! token is refused with its own reason, keys rotate, the JWKS cache stays bounded, and the
//! API's answers, limits and metrics are what a client and an operator see.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use control::auth::jwks::{JwksCache, JwksLimits};
use control::auth::ratelimit::RateLimit;
use control::auth::rules::{ClaimRules, RawPatterns};
use control::auth::{AuthMetrics, Authenticator, OidcTrust, PoolAuth, ServiceAccounts};
use control::certapi::handlers::{IssueResponse, PoolList};
use control::certapi::{
    ApiMetrics, ApiState, Limits, PoolEntry, StaticDirectory, WarmReason, Warmer,
};
use control::pki::Ca;
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use prometheus_client::registry::Registry;
use proxy::names::PoolId;
use serde_json::{Value, json};
use support::issuer::{SigningKey, TestIssuer, b64, now_plus};
use tower::ServiceExt;

const HOUR: Duration = Duration::from_secs(3600);

/// Records every warm-up.
#[derive(Default)]
struct RecordingWarmer(Mutex<Vec<(String, WarmReason)>>);

impl Warmer for RecordingWarmer {
    fn warm(&self, pool: &PoolId, reason: WarmReason) {
        self.0.lock().unwrap().push((pool.to_string(), reason));
    }
}

/// The API over three pools: `team-a/app` and `team-a/other` trust issuer `a` with different
/// rules; `team-b/app` trusts issuer `b` only.
struct Api {
    issuer: TestIssuer,
    key: SigningKey,
    router: axum::Router,
    warmer: Arc<RecordingWarmer>,
    registry: Arc<Registry>,
    jwks: Arc<JwksCache>,
}

fn trust(issuer: &str, rules: &[(&str, &str)]) -> OidcTrust {
    let raw = rules
        .iter()
        .map(|(c, p)| (c.to_string(), RawPatterns::One(p.to_string())))
        .collect();
    OidcTrust {
        issuer: issuer.into(),
        audiences: vec!["bkpool".into()],
        rules: ClaimRules::from_raw(&raw).unwrap(),
        identity_claim: None,
    }
}

fn pool(id: &str, issuers: Vec<OidcTrust>, max_ttl: Duration) -> PoolEntry {
    PoolEntry {
        id: id.parse().unwrap(),
        ca: Ok(Arc::new(
            Ca::generate(&format!("client CA {id}"), 24 * HOUR).unwrap(),
        )),
        max_ttl,
        auth: PoolAuth {
            serviceaccounts: ServiceAccounts::Closed,
            issuers,
        },
        endpoints: vec!["127.0.0.1:8443".into()],
        gateway_ca_pem: "GATEWAY CA".into(),
    }
}

impl Api {
    async fn start() -> Self {
        Self::with(Limits::default()).await
    }

    async fn with(rate_limits: Limits) -> Self {
        let issuer = TestIssuer::start().await;
        let key = SigningKey::rsa("k1");
        issuer.publish("a", &[&key]);
        issuer.publish("b", &[&key]);
        let (a, b) = (issuer.url("a"), issuer.url("b"));
        let directory = StaticDirectory::new([
            pool(
                "team-a/app",
                vec![trust(
                    &a,
                    &[("repository", "org/app"), ("ref", "refs/heads/*")],
                )],
                HOUR,
            ),
            pool(
                "team-a/other",
                vec![trust(&a, &[("repository", "org/other")])],
                HOUR,
            ),
            pool(
                "team-b/app",
                vec![trust(&b, &[("repository", "org/app")])],
                HOUR,
            ),
        ]);
        let limits = JwksLimits {
            refetch_interval: Duration::from_millis(300),
            ..JwksLimits::default()
        };
        let jwks = Arc::new(JwksCache::new(issuer.client(), limits));
        let mut registry = Registry::default();
        let auth_metrics = AuthMetrics::register(&mut registry, &jwks);
        let warmer = Arc::new(RecordingWarmer::default());
        let auth = Authenticator::new(jwks.clone(), None, vec!["bkpool".into()])
            .with_metrics(auth_metrics);
        let state = ApiState::new(
            Arc::new(directory),
            warmer.clone(),
            auth,
            ApiMetrics::register(&mut registry),
        )
        .with_limits(rate_limits)
        .generating_keys(true);
        Self {
            issuer,
            key,
            router: control::certapi::router(Arc::new(state)),
            warmer,
            registry: Arc::new(registry),
            jwks,
        }
    }

    /// Claims a good GitHub-style token for `team-a/app` carries.
    fn claims(&self) -> Value {
        json!({
            "iss": self.issuer.url("a"),
            "aud": "bkpool",
            "sub": "repo:org/app:ref:refs/heads/main",
            "repository": "org/app",
            "ref": "refs/heads/main",
            "iat": now_plus(-10),
            "nbf": now_plus(-10),
            "exp": now_plus(300),
        })
    }

    fn token_with(&self, change: impl FnOnce(&mut Value)) -> String {
        let mut claims = self.claims();
        change(&mut claims);
        self.key.sign(&claims)
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Body,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            request = request.header("authorization", format!("Bearer {t}"));
        }
        let response = self
            .router
            .clone()
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, value)
    }

    async fn issue(&self, pool: &str, token: &str, body: Value) -> (StatusCode, Value) {
        let uri = format!(
            "/v1/namespaces/{}/certificates",
            pool.replace('/', "/pools/")
        );
        self.call("POST", &uri, Some(token), Body::from(body.to_string()))
            .await
    }

    async fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }
}

fn csr() -> (String, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    (csr.pem().unwrap(), key)
}

fn leaf_der(chain_pem: &str) -> rustls::pki_types::CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn a_good_token_and_a_csr_get_a_short_lived_certificate_for_that_pool() {
    let api = Api::start().await;
    let (csr, _key) = csr();
    let token = api.token_with(|_| {});
    let (status, body) = api
        .issue("team-a/app", &token, json!({"csr": csr, "ttl": "30m"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let answer: IssueResponse = serde_json::from_value(body).unwrap();
    assert!(answer.key.is_none(), "the key stays with the client");
    assert_eq!(answer.ca, "GATEWAY CA");
    assert_eq!(answer.endpoints, vec!["127.0.0.1:8443"]);
    let host = format!("{}", api.issuer.addr.ip());
    assert_eq!(
        answer.identity,
        format!("{host}:repo:org/app:ref:refs/heads/main")
    );
    let peer = proxy::identify::identify(&leaf_der(&answer.certificate)).unwrap();
    assert_eq!(peer.pool.as_str(), "team-a/app");
    assert_eq!(peer.identity.as_str(), answer.identity);
    let expires = time::OffsetDateTime::parse(
        &answer.expires,
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let left = expires - time::OffsetDateTime::now_utc();
    assert!(
        left <= time::Duration::minutes(30) && left > time::Duration::minutes(28),
        "{left}"
    );
    assert_eq!(
        api.warmer.0.lock().unwrap().as_slice(),
        &[("team-a/app".to_string(), WarmReason::CertificateIssued)]
    );

    let (status, body) = api
        .issue(
            "team-a/app",
            &token,
            json!({"generate_key": true, "ttl": "7d"}),
        )
        .await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (StatusCode::BAD_REQUEST, Some("ttl_above_cap")),
        "longer than the pool allows: refused, not shortened"
    );
    let (status, body) = api
        .issue("team-a/app", &token, json!({"generate_key": true}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let answer: IssueResponse = serde_json::from_value(body).unwrap();
    assert!(answer.key.unwrap().contains("PRIVATE KEY"));
    let expires = time::OffsetDateTime::parse(
        &answer.expires,
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let left = expires - time::OffsetDateTime::now_utc();
    assert!(
        left <= time::Duration::hours(1) && left > time::Duration::minutes(58),
        "the pool's maximum by default: {left}"
    );
}

#[tokio::test]
async fn every_bad_token_is_refused_with_its_own_reason() {
    let api = Api::start().await;
    let good = api.token_with(|_| {});
    let (h, p, s) = {
        let mut parts = good.split('.');
        (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        )
    };
    let tampered_payload = {
        let mut claims = api.claims();
        claims["sub"] = "repo:org/app:ref:refs/heads/evil".into();
        format!("{h}.{}.{s}", b64(claims.to_string().as_bytes()))
    };
    let tampered_signature = {
        let flipped = if s.starts_with('A') { "B" } else { "A" };
        format!("{h}.{p}.{flipped}{}", &s[1..])
    };
    let alg_none = format!("{}.{p}.{}", b64(br#"{"alg":"none","kid":"k1"}"#), b64(b"x"));
    let hs256_with_public_key = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let secret = EncodingKey::from_secret(api.key.public_pem.as_bytes());
        jsonwebtoken::encode(&header, &api.claims(), &secret).unwrap()
    };
    let es256_claiming_rsa_kid = {
        let ec = SigningKey::ec("k1");
        ec.sign(&api.claims())
    };
    let unknown_kid = SigningKey::rsa("k-unknown").sign(&api.claims());
    let forged_same_kid = SigningKey::rsa("k1").sign(&api.claims());
    let cases: Vec<(&str, String, &str, StatusCode, &str)> = vec![
        (
            "expired",
            api.token_with(|c| c["exp"] = now_plus(-3600).into()),
            "team-a/app",
            StatusCode::UNAUTHORIZED,
            "token_expired",
        ),
        (
            "not yet valid",
            api.token_with(|c| c["nbf"] = now_plus(3600).into()),
            "team-a/app",
            StatusCode::UNAUTHORIZED,
            "token_not_yet_valid",
        ),
        (
            "issued in the future",
            api.token_with(|c| c["iat"] = now_plus(3600).into()),
            "team-a/app",
            StatusCode::UNAUTHORIZED,
            "token_issued_in_future",
        ),
        (
            "wrong issuer",
            api.token_with(|c| c["iss"] = "https://accounts.example.com".into()),
            "team-a/app",
            StatusCode::UNAUTHORIZED,
            "issuer_not_trusted",
        ),
        (
            "wrong audience",
            api.token_with(|c| c["aud"] = "sts.amazonaws.com".into()),
            "team-a/app",
            StatusCode::UNAUTHORIZED,
            "audience_mismatch",
        ),
        (
            "no audience",
            api.token_with(|c| {
                c.as_object_mut().unwrap().remove("aud");
            }),
            "team-a/app",
            StatusCode::UNAUTHORIZED,
            "claim_missing",
        ),
        (
            "no expiry",
            api.token_with(|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
            "team-a/app",
            StatusCode::UNAUTHORIZED,
            "claim_missing",
        ),
        (
            "alg none",
            alg_none,
            "team-a/app",
            StatusCode::UNAUTHORIZED,
            "alg_none",
        ),
        (
            "HS256 signed with the RSA public key",
            hs256_with_public_key,
            "team-a/app",
            StatusCode::UNAUTHORIZED,
            "alg_hmac",
        ),
        (
            "ES256 naming an RSA key",
            es256_claiming_rsa_kid,
            "team-a/app",
            StatusCode::UNAUTHORIZED,
            "alg_key_mismatch",
        ),
        (
            "unknown kid",
            unknown_kid,
            "team-a/app",
            StatusCode::UNAUTHORIZED,
            "unknown_key",
        ),
        (
            "forged with the right kid",
            forged_same_kid,
            "team-a/app",
            StatusCode::UNAUTHORIZED,
            "signature_invalid",
        ),
        (
            "tampered payload",
            tampered_payload,
            "team-a/app",
            StatusCode::UNAUTHORIZED,
            "signature_invalid",
        ),
        (
            "tampered signature",
            tampered_signature,
            "team-a/app",
            StatusCode::UNAUTHORIZED,
            "signature_invalid",
        ),
        (
            "truncated",
            format!("{h}.{p}"),
            "team-a/app",
            StatusCode::UNAUTHORIZED,
            "token_malformed",
        ),
        (
            "truncated mid-payload",
            good[..h.len() + 1 + p.len() / 2].to_string(),
            "team-a/app",
            StatusCode::UNAUTHORIZED,
            "token_malformed",
        ),
        (
            "oversized",
            format!("{h}.{}.{s}", "A".repeat(17 * 1024)),
            "team-a/app",
            StatusCode::UNAUTHORIZED,
            "token_too_large",
        ),
        (
            "malformed base64",
            format!("{h}.@@@@.{s}"),
            "team-a/app",
            StatusCode::UNAUTHORIZED,
            "token_bad_encoding",
        ),
        (
            "malformed JSON",
            format!("{h}.{}.{s}", b64(b"{\"iss\":")),
            "team-a/app",
            StatusCode::UNAUTHORIZED,
            "token_bad_json",
        ),
        (
            "another namespace's pool",
            good.clone(),
            "team-b/app",
            StatusCode::UNAUTHORIZED,
            "issuer_not_trusted",
        ),
        (
            "a pool whose rules it fails",
            good.clone(),
            "team-a/other",
            StatusCode::FORBIDDEN,
            "claim_rule_mismatch",
        ),
        (
            "a branch the rules exclude",
            api.token_with(|c| c["ref"] = "refs/pull/1/merge".into()),
            "team-a/app",
            StatusCode::FORBIDDEN,
            "claim_rule_mismatch",
        ),
        (
            "a pool that does not exist",
            good.clone(),
            "team-a/nope",
            StatusCode::NOT_FOUND,
            "pool_not_found",
        ),
        (
            // Answered as a pool with default rules (no issuer) would: not a pool's name.
            "probing for pools with a bad token",
            api.token_with(|c| c["exp"] = now_plus(-3600).into()),
            "team-a/nope",
            StatusCode::UNAUTHORIZED,
            "issuer_not_trusted",
        ),
        (
            "probing another namespace for pools",
            good.clone(),
            "team-b/nope",
            StatusCode::UNAUTHORIZED,
            "issuer_not_trusted",
        ),
    ];
    let mut seen = Vec::new();
    for (what, token, pool, status, reason) in cases {
        let (got, body) = api.issue(pool, &token, json!({"generate_key": true})).await;
        assert_eq!(
            (got, body["reason"].as_str()),
            (status, Some(reason)),
            "{what}: {body}"
        );
        let message = body["message"].as_str().unwrap();
        assert!(
            !message.contains("127.0.0.1") && !message.contains('/'),
            "{what} leaks: {message}"
        );
        seen.push(reason);
    }
    assert!(
        api.warmer.0.lock().unwrap().is_empty(),
        "nothing refused warms a pool"
    );
    let (status, body) = api
        .issue("team-a/app", &good, json!({"generate_key": true}))
        .await;
    assert_eq!(status, StatusCode::OK, "the good token still works: {body}");
    let metrics = api.metrics().await;
    assert!(
        metrics.contains(
            r#"bkpool_certapi_requests_denied_total{pool="team-a/app",reason="alg_hmac"} 1"#
        ),
        "{metrics}"
    );
    // The operator sees the real reason of all three probes of missing pools.
    assert!(
        metrics
            .contains(r#"bkpool_certapi_requests_denied_total{pool="",reason="pool_not_found"} 3"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"bkpool_certapi_certificates_issued_total{pool="team-a/app",method="oidc"} 1"#
        ),
        "{metrics}"
    );
    // One good verification: the last request (the probe for team-a/nope only asks whether
    // the token opens some pool of the namespace).
    let verified =
        r#"bkpool_certapi_token_verification_duration_seconds_count{method="oidc",result="ok"} 1"#;
    assert!(metrics.contains(verified), "{metrics}");
    assert!(
        metrics.contains(r#"bkpool_certapi_jwks_fetches_total{result="ok"}"#),
        "{metrics}"
    );
    assert!(!metrics.contains("repo:org"), "no identity in metrics");
}

#[tokio::test]
async fn rotated_keys_are_picked_up_and_retired_keys_refused() {
    let api = Api::start().await;
    let old = api.token_with(|_| {});
    let (status, _) = api
        .issue("team-a/app", &old, json!({"generate_key": true}))
        .await;
    assert_eq!(status, StatusCode::OK);

    let new_key = SigningKey::ec("k2");
    api.issuer.publish("a", &[&new_key]);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let fresh = new_key.sign(&api.claims());
    let (status, body) = api
        .issue("team-a/app", &fresh, json!({"generate_key": true}))
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a new kid triggers a refetch: {body}"
    );

    let (status, body) = api
        .issue("team-a/app", &old, json!({"generate_key": true}))
        .await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unknown_key")),
        "the retired key is gone: {body}"
    );
}

#[tokio::test]
async fn a_discovery_document_naming_another_issuer_is_refused() {
    let api = Api::start().await;
    api.issuer.lie_about("a");
    let token = api.token_with(|_| {});
    let (status, body) = api
        .issue("team-a/app", &token, json!({"generate_key": true}))
        .await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("issuer_discovery_failed")
        )
    );
    assert_eq!(
        api.issuer.jwks_fetches(),
        0,
        "no keys fetched from a lying issuer"
    );
}

#[tokio::test]
async fn the_jwks_cache_stays_bounded_and_unknown_kids_refetch_once_per_interval() {
    let issuer = TestIssuer::start().await;
    let key = SigningKey::ec("seed");
    let many: Vec<_> = (0..10)
        .map(|i| {
            let mut jwk = key.jwk.clone();
            jwk.common.key_id = Some(format!("k{i}"));
            jwk
        })
        .collect();
    for i in 0..20 {
        issuer.publish_jwks(&format!("i{i}"), many.clone());
    }
    let limits = JwksLimits {
        max_issuers: 4,
        max_keys: 3,
        max_age: HOUR,
        refetch_interval: Duration::from_millis(500),
    };
    let cache = Arc::new(JwksCache::new(issuer.client(), limits));
    for i in 0..20 {
        cache
            .key(&issuer.url(&format!("i{i}")), Some("k0"))
            .await
            .unwrap();
        let err = cache.key(&issuer.url(&format!("i{i}")), Some("k9")).await;
        assert!(err.is_err(), "keys past max_keys are not kept");
        let (issuers, keys) = cache.size();
        assert!(issuers <= 4 && keys <= 12, "{issuers} issuers, {keys} keys");
    }
    assert_eq!(issuer.jwks_fetches(), 20, "one fetch per new issuer");

    let url = issuer.url("i19");
    tokio::time::sleep(Duration::from_millis(550)).await;
    let before = issuer.jwks_fetches();
    let flood: Vec<_> = (0..100)
        .map(|i| {
            let (cache, url) = (cache.clone(), url.clone());
            tokio::spawn(async move { cache.key(&url, Some(&format!("forged-{i}"))).await })
        })
        .collect();
    for task in flood {
        assert!(task.await.unwrap().is_err());
    }
    assert_eq!(issuer.jwks_fetches() - before, 1, "a flood refetches once");
    tokio::time::sleep(Duration::from_millis(550)).await;
    for i in 0..50 {
        assert!(cache.key(&url, Some(&format!("again-{i}"))).await.is_err());
    }
    assert_eq!(
        issuer.jwks_fetches() - before,
        2,
        "once more after the interval"
    );
}

#[tokio::test]
async fn malformed_requests_get_json_errors_that_leak_nothing() {
    let api = Api::start().await;
    let token = api.token_with(|_| {});
    let uri = "/v1/namespaces/team-a/pools/app/certificates";
    let cases: Vec<(Option<&str>, &str, Body, StatusCode, &str)> = vec![
        (
            None,
            uri,
            Body::from("{}"),
            StatusCode::UNAUTHORIZED,
            "token_missing",
        ),
        (
            Some(&token),
            uri,
            Body::from("not json"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Some(&token),
            uri,
            Body::from("{}"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Some(&token),
            uri,
            Body::from(r#"{"csr":"x","generate_key":true}"#),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Some(&token),
            uri,
            Body::from(r#"{"generate_key":true,"extra":1}"#),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Some(&token),
            uri,
            Body::from(
                r#"{"csr":"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}"#,
            ),
            StatusCode::BAD_REQUEST,
            "csr_invalid",
        ),
        (
            Some(&token),
            uri,
            Body::from(r#"{"generate_key":true,"ttl":"1s"}"#),
            StatusCode::BAD_REQUEST,
            "invalid_ttl",
        ),
        (
            Some(&token),
            uri,
            Body::from(vec![b' '; 100 * 1024]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            Some(&token),
            "/v1/namespaces/Team_A/pools/app/certificates",
            Body::from("{}"),
            StatusCode::BAD_REQUEST,
            "invalid_pool_name",
        ),
        (
            Some(&token),
            "/v1/elsewhere",
            Body::empty(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ];
    for (token, uri, body, status, reason) in cases {
        let (got, answer) = api.call("POST", uri, token, body).await;
        assert_eq!(
            (got, answer["reason"].as_str()),
            (status, Some(reason)),
            "{uri}: {answer}"
        );
        assert!(!answer.to_string().contains("src/"), "{answer}");
    }
}

#[tokio::test]
async fn listing_shows_only_usable_pools_and_wake_warms() {
    let api = Api::start().await;
    let token = api.token_with(|_| {});
    let (status, body) = api
        .call(
            "GET",
            "/v1/namespaces/team-a/pools",
            Some(&token),
            Body::empty(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let list: PoolList = serde_json::from_value(body).unwrap();
    let names: Vec<_> = list.pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["app"],
        "team-a/other's rules exclude this token"
    );
    let (status, body) = api
        .call(
            "GET",
            "/v1/namespaces/team-b/pools",
            Some(&token),
            Body::empty(),
        )
        .await;
    assert_eq!(
        (status, body["pools"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(0))
    );
    let expired = api.token_with(|c| c["exp"] = now_plus(-3600).into());
    let (status, body) = api
        .call(
            "GET",
            "/v1/namespaces/team-a/pools",
            Some(&expired),
            Body::empty(),
        )
        .await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("token_expired"))
    );

    let (status, body) = api
        .call(
            "POST",
            "/v1/namespaces/team-a/pools/app/wake",
            Some(&token),
            Body::empty(),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, _) = api
        .call(
            "POST",
            "/v1/namespaces/team-a/pools/other/wake",
            Some(&token),
            Body::empty(),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        api.warmer.0.lock().unwrap().as_slice(),
        &[("team-a/app".to_string(), WarmReason::WakeRequested)]
    );
}

#[tokio::test]
async fn each_identity_is_rate_limited_on_its_own() {
    let api = Api::with(Limits {
        identities: RateLimit {
            burst: 2,
            per: HOUR,
            max_identities: 100,
        },
        ..Limits::default()
    })
    .await;
    let mine = api.token_with(|_| {});
    for _ in 0..2 {
        let (status, _) = api
            .issue("team-a/app", &mine, json!({"generate_key": true}))
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, body) = api
        .issue("team-a/app", &mine, json!({"generate_key": true}))
        .await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited"))
    );
    let theirs = api.token_with(|c| c["sub"] = "repo:org/app:ref:refs/heads/other".into());
    let (status, _) = api
        .issue("team-a/app", &theirs, json!({"generate_key": true}))
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "another identity has its own bucket"
    );
    let _ = api.jwks.size();
}

#[tokio::test]
async fn keys_older_than_max_age_are_refetched_and_a_failed_refresh_keeps_them() {
    let issuer = TestIssuer::start().await;
    let key = SigningKey::ec("k1");
    issuer.publish("a", &[&key]);
    let limits = JwksLimits {
        max_age: Duration::from_millis(200),
        refetch_interval: Duration::from_millis(100),
        ..JwksLimits::default()
    };
    let cache = JwksCache::new(issuer.client(), limits);
    let url = issuer.url("a");
    cache.key(&url, Some("k1")).await.unwrap();
    cache.key(&url, Some("k1")).await.unwrap();
    assert_eq!(
        issuer.jwks_fetches(),
        1,
        "fresh keys are served from the cache"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    cache.key(&url, Some("k1")).await.unwrap();
    assert_eq!(issuer.jwks_fetches(), 2, "stale keys are refetched");

    issuer.lie_about("a");
    tokio::time::sleep(Duration::from_millis(250)).await;
    cache
        .key(&url, Some("k1"))
        .await
        .expect("a failed refresh keeps the last good keys");
    assert_eq!(issuer.jwks_fetches(), 2);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let err = cache.key(&url, Some("k1")).await.unwrap_err();
    assert_eq!(
        err.reason(),
        "issuer_discovery_failed",
        "but not past 4 × max_age"
    );
    assert_eq!(cache.size().1, 0);
}
