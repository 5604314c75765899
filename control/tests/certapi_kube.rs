//! ServiceAccount callers against a real API server: TokenReview with bkpool's audience and
//! SubjectAccessReview on `create` `buildkitpools/certificates`, granted by a plain Role and
//! RoleBinding. Needs `BKPOOL_TEST_KUBECONFIG` (e.g. from kube-local); skipped without it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use control::auth::jwks::{JwksCache, JwksLimits};
use control::auth::{AuthError, Authenticator, KubeApi, Method, PoolAuth, ServiceAccounts};
use control::certapi::handlers::IssueResponse;
use control::certapi::{ApiMetrics, ApiState, NoWarmer, PoolEntry, StaticDirectory};
use control::https::HttpsClient;
use control::pki::Ca;
use http_body_util::BodyExt;
use proxy::names::PoolId;
use serde_json::{Value, json};
use tower::ServiceExt;

const AUDIENCE: &str = "bkpool";

/// The API server named by `BKPOOL_TEST_KUBECONFIG`, or `None` (a skip) without it.
fn test_kube() -> Option<KubeApi> {
    let path = control::testkit::kubeconfig()?;
    Some(KubeApi::from_kubeconfig(&path).expect("a usable kubeconfig"))
}

/// A fresh namespace with ServiceAccounts `builder` and `other`, deleted (without waiting)
/// when dropped.
struct Stage {
    kube: KubeApi,
    ns: String,
}

impl Stage {
    async fn new(kube: KubeApi) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let ns = format!("bkpool-certapi-{}-{nanos}", std::process::id());
        let stage = Self { kube, ns };
        stage
            .create(
                "/api/v1/namespaces",
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": stage.ns}}),
            )
            .await;
        for sa in ["builder", "other"] {
            let path = format!("/api/v1/namespaces/{}/serviceaccounts", stage.ns);
            stage
                .create(
                    &path,
                    json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa}}),
                )
                .await;
        }
        stage
    }

    async fn create(&self, path: &str, body: Value) -> Value {
        self.kube
            .create(path, &body)
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// A bound token for ServiceAccount `sa` with `audience` (TokenRequest).
    async fn token(&self, sa: &str, audience: &str) -> String {
        let path = format!("/api/v1/namespaces/{}/serviceaccounts/{sa}/token", self.ns);
        let answer = self
            .create(
                &path,
                json!({
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenRequest",
                    "spec": {"audiences": [audience], "expirationSeconds": 600},
                }),
            )
            .await;
        answer["status"]["token"]
            .as_str()
            .expect("a token")
            .to_owned()
    }

    /// A Role granting `create` on `buildkitpools/certificates` and its binding to `sa`.
    async fn grant(&self, sa: &str) {
        let ns = &self.ns;
        self.create(&format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles"), json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "bkpool-certificates"},
            "rules": [{"apiGroups": ["bkpool.dev"], "resources": ["buildkitpools/certificates"], "verbs": ["create"]}],
        }))
        .await;
        self.create(&format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings"), json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "bkpool-certificates"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "bkpool-certificates"},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}],
        }))
        .await;
    }

    fn pool(&self, name: &str) -> PoolId {
        PoolId::new(&self.ns, name).unwrap()
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        let (kube, ns) = (self.kube.clone(), self.ns.clone());
        // The DELETE is answered at once (nobody waits for the namespace to go). The thread is
        // joined: one still running when the test process exits aborts it.
        let deleting = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(kube.delete(&format!("/api/v1/namespaces/{ns}")))
        });
        let _ = deleting.join();
    }
}

fn authenticator(kube: KubeApi) -> Authenticator {
    let ca = Ca::generate("unused", Duration::from_secs(600)).unwrap();
    let http = HttpsClient::with_roots_pem(ca.cert_pem()).unwrap();
    let jwks = Arc::new(JwksCache::new(http, JwksLimits::default()));
    Authenticator::new(jwks, Some(kube), vec![AUDIENCE.into()])
}

fn sa_only() -> PoolAuth {
    PoolAuth {
        serviceaccounts: ServiceAccounts::Rbac,
        issuers: Vec::new(),
    }
}

/// Retries while RBAC catches up with a new binding (well under a second on kube-local).
async fn authorize_eventually(
    auth: &Authenticator,
    token: &str,
    pool: &PoolId,
) -> Result<control::auth::Caller, AuthError> {
    let mut last = Err(AuthError::AccessDenied);
    for _ in 0..50 {
        last = auth.authorize(token, pool, &sa_only()).await;
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

#[tokio::test]
async fn serviceaccounts_are_reviewed_for_the_audience_and_authorized_by_rbac() {
    let Some(kube) = test_kube() else { return };
    let stage = Stage::new(kube.clone()).await;
    let auth = authenticator(kube);
    let pool = stage.pool("app");
    let good = stage.token("builder", AUDIENCE).await;
    let wrong_audience = stage.token("builder", "someone-else").await;
    let other = stage.token("other", AUDIENCE).await;

    let before = auth.authorize(&good, &pool, &sa_only()).await;
    assert_eq!(before, Err(AuthError::AccessDenied), "no RBAC yet");

    stage.grant("builder").await;
    let caller = authorize_eventually(&auth, &good, &pool).await.unwrap();
    assert_eq!(caller.method, Method::ServiceAccount);
    assert_eq!(
        caller.identity.as_str(),
        format!("system:serviceaccount:{}:builder", stage.ns)
    );

    let cases = [
        (
            "token for another audience",
            &wrong_audience,
            pool.clone(),
            AuthError::WrongAudience,
        ),
        (
            "account without a binding",
            &other,
            pool.clone(),
            AuthError::AccessDenied,
        ),
        (
            "another namespace",
            &good,
            "default/app".parse().unwrap(),
            AuthError::AccessDenied,
        ),
    ];
    for (what, token, pool, expected) in cases {
        let got = auth.authorize(token, &pool, &sa_only()).await;
        assert_eq!(got, Err(expected), "{what}");
    }
    let mut forged = good.clone();
    forged.truncate(good.len() - 4);
    forged.push_str("AAAA");
    let got = auth.authorize(&forged, &pool, &sa_only()).await;
    assert_eq!(got, Err(AuthError::TokenRejected), "a forged signature");
    let closed = PoolAuth::default();
    let got = auth.authorize(&good, &pool, &closed).await;
    assert_eq!(
        got,
        Err(AuthError::IssuerNotTrusted),
        "a pool that takes no ServiceAccounts"
    );
}

#[tokio::test]
async fn a_serviceaccount_gets_a_certificate_naming_it_through_the_api() {
    let Some(kube) = test_kube() else { return };
    let stage = Stage::new(kube.clone()).await;
    stage.grant("builder").await;
    let pool = stage.pool("app");
    let token = stage.token("builder", AUDIENCE).await;
    let entry = PoolEntry {
        id: pool.clone(),
        ca: Ok(Arc::new(
            Ca::generate("client CA", Duration::from_secs(3600)).unwrap(),
        )),
        max_ttl: Duration::from_secs(3600),
        auth: sa_only(),
        endpoints: vec!["127.0.0.1:8443".into()],
        gateway_ca_pem: "GATEWAY CA".into(),
    };
    let state = ApiState::new(
        Arc::new(StaticDirectory::new([entry])),
        Arc::new(NoWarmer),
        authenticator(kube),
        ApiMetrics::unregistered(),
    )
    .generating_keys(true);
    let router = control::certapi::router(Arc::new(state));
    let uri = format!("/v1/namespaces/{}/pools/app/certificates", stage.ns);
    let mut last = (StatusCode::IM_A_TEAPOT, Value::Null);
    for _ in 0..50 {
        let request = Request::post(&uri)
            .header("authorization", format!("Bearer {token}"))
            .body(Body::from(r#"{"generate_key": true, "ttl": "20m"}"#))
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        last = (status, serde_json::from_slice(&bytes).unwrap());
        if status != StatusCode::FORBIDDEN {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last.0, StatusCode::OK, "{}", last.1);
    let answer: IssueResponse = serde_json::from_value(last.1).unwrap();
    assert_eq!(
        answer.identity,
        format!("system:serviceaccount:{}:builder", stage.ns)
    );
    assert!(answer.key.is_some());
}
