//! The certificate API as every `bkpool controller` replica serves it, against a real API
//! server: pools and their `spec.auth` from the cluster, each pool's own client CA from the
//! operator's Secret, HTTPS with the CA published in ConfigMap `bkpool-certapi-ca`, and every
//! refusal with its own stable reason. TokenReviews and SubjectAccessReviews go to the real
//! API server through a counting seam, so the number of API calls one request costs is
//! asserted too. Needs `BKPOOL_TEST_KUBECONFIG` (e.g. from kube-local); skipped without it.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use control::auth::kube::{KubeError, Review};
use control::auth::{Access, KubeAuth, ReviewedUser};
use control::certapi::handlers::IssueResponse;
use control::certapi::replica::{Replica, ReplicaSettings};
use control::crd::BuildKitPool;
use control::https::HttpsClient;
use control::operator::Settings;
use control::operator::watch::Scope;
use futures::future::BoxFuture;
use http::StatusCode;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use prometheus_client::registry::Registry;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};
use support::{RunningController, TestNamespace, eventually, install_crd, issuer, test_client};
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::{FromDer, X509Certificate};

const AUDIENCE: &str = "bkpool";

/// The operator's client, counting the reviews asked through it.
struct Counting {
    client: Client,
    tokens: AtomicUsize,
    access: AtomicUsize,
}

impl Counting {
    fn calls(&self) -> (usize, usize) {
        (self.tokens.load(Relaxed), self.access.load(Relaxed))
    }
}

impl KubeAuth for Counting {
    fn review_token<'a>(
        &'a self,
        token: &'a str,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<Review, KubeError>> {
        self.tokens.fetch_add(1, Relaxed);
        self.client.review_token(token, audiences)
    }

    fn review_access<'a>(
        &'a self,
        user: &'a ReviewedUser,
        access: &'a Access,
    ) -> BoxFuture<'a, Result<bool, KubeError>> {
        self.access.fetch_add(1, Relaxed);
        self.client.review_access(user, access)
    }
}

/// A bound token of ServiceAccount `ns/sa` for `audience`.
async fn token(client: &Client, ns: &str, sa: &str, audience: &str) -> String {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    sas.create_token_request(sa, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("a token for {ns}/{sa}: {e}"))
        .status
        .expect("token status")
        .token
}

async fn service_account(client: &Client, ns: &str, name: &str) {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some(name.to_owned());
    sas.create(&PostParams::default(), &sa).await.unwrap();
}

async fn pool(client: &Client, ns: &str, name: &str, spec: Value) {
    let pools: Api<BuildKitPool> = Api::namespaced(client.clone(), ns);
    let pool: BuildKitPool = serde_json::from_value(json!({
        "apiVersion": "bkpool.dev/v1alpha1", "kind": "BuildKitPool",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();
}

fn csr(names: Vec<String>) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(names)
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    csr.pem().unwrap()
}

/// The API over real HTTPS, trusting only the CA bundle the operator published.
struct Caller {
    http: HttpsClient,
    addr: SocketAddr,
}

impl Caller {
    async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        let url = format!("https://{}/v1/namespaces/{path}", self.addr);
        let response = self
            .http
            .post_json(&url, Some(token), body.to_string().into_bytes())
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}"));
        let body = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        (response.status, body)
    }

    async fn issue(&self, pool: &str, token: &str, ttl: &str) -> (StatusCode, Value) {
        let (ns, name) = pool.split_once('/').unwrap();
        let path = format!("{ns}/pools/{name}/certificates");
        self.post(&path, token, json!({"csr": csr(vec![]), "ttl": ttl}))
            .await
    }

    async fn list(&self, ns: &str, token: &str) -> (StatusCode, Value) {
        let url = format!("https://{}/v1/namespaces/{ns}/pools", self.addr);
        let response = self.http.get_authorized(&url, token).await.unwrap();
        let body = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        (response.status, body)
    }
}

fn reason(answer: &(StatusCode, Value)) -> (StatusCode, &str) {
    (answer.0, answer.1["reason"].as_str().unwrap_or(""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pool_admits_by_its_own_spec_auth_and_refuses_with_a_stable_reason() {
    let Some(client) = test_client().await else {
        return;
    };
    install_crd(&client).await;
    let system = TestNamespace::create(&client, "bkp-capi-sys").await;
    let a = TestNamespace::create(&client, "bkp-capi-a").await;
    let b = TestNamespace::create(&client, "bkp-capi-b").await;
    for ns in [&a.name, &b.name] {
        for sa in ["builder", "other"] {
            service_account(&client, ns, sa).await;
        }
    }
    let listed = json!({"auth": {"mode": "ServiceAccounts", "serviceAccounts": ["builder"]},
                        "tls": {"clientCertMaxTTL": "30m"}});
    pool(&client, &a.name, "listed", listed.clone()).await;
    pool(&client, &a.name, "rbac", json!({"auth": {"mode": "RBAC"}})).await;
    pool(&client, &b.name, "listed", listed).await;
    // OIDC: a/gha trusts issuer "a" for one repository; b/gha trusts issuer "b" only.
    let oidc = issuer::TestIssuer::start().await;
    let key = issuer::SigningKey::rsa("k1");
    oidc.publish("a", &[&key]);
    oidc.publish("b", &[&key]);
    let trusting = |name: &str| {
        json!({"auth": {"oidc": [{"issuer": oidc.url(name), "audiences": ["bkpool"],
               "claims": [{"claim": "repository", "values": ["org/app"]}]}]}})
    };
    pool(&client, &a.name, "gha", trusting("a")).await;
    pool(&client, &b.name, "gha", trusting("b")).await;
    // A pool no controller serves: it never gets a client CA.
    let orphan = TestNamespace::create(&client, "bkp-capi-c").await;
    pool(
        &client,
        &orphan.name,
        "noca",
        json!({"auth": {"serviceAccounts": ["builder"]}}),
    )
    .await;
    service_account(&client, &orphan.name, "builder").await;

    let controllers = [
        RunningController::start_in(&client, &a.name, &system.name),
        RunningController::start_in(&client, &b.name, &system.name),
    ];
    for (ns, name) in [
        (&a.name, "listed"),
        (&a.name, "rbac"),
        (&b.name, "listed"),
        (&a.name, "gha"),
        (&b.name, "gha"),
    ] {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        let ca = format!("{name}-client-ca");
        eventually(&ca, Duration::from_secs(30), || async {
            secrets.get(&ca).await.ok()
        })
        .await;
    }

    let counting = Arc::new(Counting {
        client: client.clone(),
        tokens: AtomicUsize::new(0),
        access: AtomicUsize::new(0),
    });
    let settings = ReplicaSettings {
        namespace: system.name.clone(),
        scope: Scope::All,
        audiences: vec![AUDIENCE.to_owned()],
        server_names: vec!["127.0.0.1".to_owned()],
        operator: Settings::default(),
        oidc_roots: Some(oidc.ca.cert_pem().to_owned()),
    };
    let mut registry = Registry::default();
    let replica = Replica::with_reviews(client.clone(), counting.clone(), &settings, &mut registry);
    let ready = replica.readiness();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let serving = tokio::spawn(replica.run(listener, stop.clone()));
    eventually("the API serving", Duration::from_secs(30), || async {
        ready.load(Relaxed).then_some(())
    })
    .await;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &system.name);
    let published = configmaps.get("bkpool-certapi-ca").await.unwrap();
    let ca_pem = published.data.unwrap()["ca.crt"].clone();
    let api = Caller {
        http: HttpsClient::with_roots_pem(&ca_pem).unwrap(),
        addr,
    };

    let builder = token(&client, &a.name, "builder", AUDIENCE).await;
    let other = token(&client, &a.name, "other", AUDIENCE).await;
    let wrong_audience = token(&client, &a.name, "builder", "someone-else").await;
    let a_listed = format!("{}/listed", a.name);
    let a_rbac = format!("{}/rbac", a.name);
    let b_listed = format!("{}/listed", b.name);

    // A listed ServiceAccount gets a certificate naming it, from its pool's own CA.
    let (status, body) = api.issue(&a_listed, &builder, "20m").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let answer: IssueResponse = serde_json::from_value(body).unwrap();
    let identity = format!("system:serviceaccount:{}:builder", a.name);
    assert_eq!(answer.identity, identity);
    let leaf = CertificateDer::pem_slice_iter(answer.certificate.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let peer = proxy::identify::identify(&leaf).unwrap();
    assert_eq!(peer.pool.as_str(), a_listed);
    assert_eq!(peer.identity.as_str(), identity);
    let (_, cert) = X509Certificate::from_der(&leaf).unwrap();
    let uris: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(
        uris,
        [format!("URI(bkpool://{a_listed}/{identity})")],
        "the only name is the verified identity's"
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &a.name);
    let client_ca = secrets.get("listed-client-ca").await.unwrap();
    let ca_crt = String::from_utf8(client_ca.data.unwrap()["ca.crt"].0.clone()).unwrap();
    let ca_der = CertificateDer::from_pem_slice(ca_crt.as_bytes()).unwrap();
    let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
    cert.verify_signature(Some(ca_cert.public_key()))
        .expect("signed by the pool's own client CA");
    assert!(
        answer.ca.contains(ca_crt.trim()),
        "the trust bundle includes it"
    );

    // Issuing woke the sleeping pool through the gateway's waker: its workload's /scale.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &a.name);
    eventually(
        "a/listed scaled from zero",
        Duration::from_secs(20),
        || async {
            let scale = deployments.get_scale("listed-buildkitd").await.ok()?;
            (scale.spec?.replicas? == 1).then_some(())
        },
    )
    .await;
    // The wake task records its result after its /scale write is visible: wait for it.
    let woke =
        format!("bkpool_certapi_wake_results_total{{pool=\"{a_listed}\",result=\"scaled_up\"}} 1");
    eventually(
        "the wake's result counted",
        Duration::from_secs(5),
        || async {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
            text.contains(&woke).then_some(())
        },
    )
    .await;
    // So does POST .../wake, for a caller the pool admits.
    let (status, body) = api
        .post(
            &format!("{}/pools/listed/wake", b.name),
            &builder,
            json!({}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "not b's pool to wake: {body}"
    );
    let b_builder = token(&client, &b.name, "builder", AUDIENCE).await;
    let (status, body) = api
        .post(
            &format!("{}/pools/listed/wake", b.name),
            &b_builder,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let b_deployments: Api<Deployment> = Api::namespaced(client.clone(), &b.name);
    eventually(
        "b/listed scaled from zero",
        Duration::from_secs(20),
        || async {
            let scale = b_deployments.get_scale("listed-buildkitd").await.ok()?;
            (scale.spec?.replicas? == 1).then_some(())
        },
    )
    .await;

    // Every refusal has its own reason, and nothing is issued.
    let cases = [
        (
            "a token for another audience",
            api.issue(&a_listed, &wrong_audience, "20m").await,
            (StatusCode::UNAUTHORIZED, "audience_mismatch"),
        ),
        (
            "a ServiceAccount the pool does not list",
            api.issue(&a_listed, &other, "20m").await,
            (StatusCode::FORBIDDEN, "serviceaccount_not_listed"),
        ),
        (
            "the same name in another namespace",
            api.issue(&b_listed, &builder, "20m").await,
            (StatusCode::FORBIDDEN, "serviceaccount_not_listed"),
        ),
        (
            "RBAC without a Role",
            api.issue(&a_rbac, &builder, "20m").await,
            (StatusCode::FORBIDDEN, "access_denied"),
        ),
        (
            "longer than clientCertMaxTTL",
            api.issue(&a_listed, &builder, "31m").await,
            (StatusCode::BAD_REQUEST, "ttl_above_cap"),
        ),
        (
            "a CSR asking for a DNS name",
            api.post(
                &format!("{}/pools/listed/certificates", a.name),
                &builder,
                json!({"csr": csr(vec!["evil.example".into()])}),
            )
            .await,
            (StatusCode::BAD_REQUEST, "csr_asks_for_names"),
        ),
        (
            "server-side key generation (off on the cluster)",
            api.post(
                &format!("{}/pools/listed/certificates", a.name),
                &builder,
                json!({"generate_key": true}),
            )
            .await,
            (StatusCode::BAD_REQUEST, "key_generation_disabled"),
        ),
        (
            "a pool whose client CA Secret is missing",
            api.issue(
                &format!("{}/noca", orphan.name),
                &token(&client, &orphan.name, "builder", AUDIENCE).await,
                "20m",
            )
            .await,
            (StatusCode::SERVICE_UNAVAILABLE, "pool_ca_unavailable"),
        ),
    ];
    for (what, got, expected) in &cases {
        assert_eq!(reason(got), *expected, "{what}: {}", got.1);
    }

    // OIDC, per pool: issuer "a" opens a/gha for org/app only, and grants nothing in b.
    let oidc_token = |repository: &str| {
        key.sign(&json!({
            "iss": oidc.url("a"), "aud": "bkpool", "sub": format!("repo:{repository}"),
            "repository": repository,
            "iat": issuer::now_plus(-10), "nbf": issuer::now_plus(-10),
            "exp": issuer::now_plus(300),
        }))
    };
    let got = api
        .issue(&format!("{}/gha", a.name), &oidc_token("org/app"), "20m")
        .await;
    assert_eq!(got.0, StatusCode::OK, "issuer a on a/gha: {}", got.1);
    let got = api
        .issue(&format!("{}/gha", a.name), &oidc_token("org/other"), "20m")
        .await;
    assert_eq!(
        reason(&got),
        (StatusCode::FORBIDDEN, "claim_rule_mismatch"),
        "another repository"
    );
    // b/gha trusts issuer "b" only, and takes ServiceAccounts it does not list: the token
    // goes to the API server, which does not know it.
    let got = api
        .issue(&format!("{}/gha", b.name), &oidc_token("org/app"), "20m")
        .await;
    assert_eq!(
        reason(&got),
        (StatusCode::UNAUTHORIZED, "token_rejected"),
        "issuer a on a pool of namespace b: {}",
        got.1
    );

    let mut forged = builder.clone();
    forged.truncate(builder.len() - 4);
    forged.push_str("AAAA");
    let got = api.issue(&a_listed, &forged, "20m").await;
    assert_eq!(
        reason(&got),
        (StatusCode::UNAUTHORIZED, "token_rejected"),
        "forged"
    );

    // A pool that does not exist: "no such pool" only to a caller admitted to some pool of
    // the namespace; anyone else gets the answer a pool with default rules would give.
    let missing = format!("{}/missing", a.name);
    let got = api.issue(&missing, &builder, "20m").await;
    assert_eq!(reason(&got), (StatusCode::NOT_FOUND, "pool_not_found"));
    let got = api.issue(&missing, &other, "20m").await;
    assert_eq!(
        reason(&got),
        (StatusCode::FORBIDDEN, "serviceaccount_not_listed"),
        "a caller admitted nowhere cannot tell a missing pool from a closed one"
    );

    // RBAC mode: a plain Role on buildkitpools/certificates, verb create, opens the pool
    // (denials are remembered for a few seconds, so this may take that long).
    grant(&client, &a.name, "builder").await;
    let caller = &api;
    let builder_ref = &builder;
    let a_rbac_ref = &a_rbac;
    eventually(
        "RBAC grants the pool",
        Duration::from_secs(30),
        || async move {
            let got = caller.issue(a_rbac_ref, builder_ref, "20m").await;
            pace(got.0).await
        },
    )
    .await;

    // A change to spec.auth applies to the next request, without a restart.
    let pools: Api<BuildKitPool> = Api::namespaced(client.clone(), &a.name);
    let patch = json!({"spec": {"auth": {"serviceAccounts": ["builder", "other"]}}});
    pools
        .patch("listed", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let other_ref = &other;
    let a_listed_ref = &a_listed;
    eventually("other listed", Duration::from_secs(30), || async move {
        let got = caller.issue(a_listed_ref, other_ref, "20m").await;
        pace(got.0).await
    })
    .await;

    // One request costs at most one TokenReview and one SubjectAccessReview, however many
    // pools it looks at, and a token seen a moment ago costs none.
    for i in 0..5 {
        pool(
            &client,
            &a.name,
            &format!("more{i}"),
            json!({"auth": {"mode": "RBAC"}}),
        )
        .await;
    }
    eventually("the pools cached", Duration::from_secs(30), || async {
        let got = api.list(&a.name, &builder).await;
        let seen = got.1["pools"].as_array().map_or(0, Vec::len);
        if seen < 7 {
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        (seen >= 7).then_some(())
    })
    .await;
    let stranger = token(&client, &b.name, "other", AUDIENCE).await;
    let before = counting.calls();
    let got = api.list(&a.name, &stranger).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1["pools"], json!([]), "a stranger sees no pool");
    let listed = counting.calls();
    assert_eq!(
        (listed.0 - before.0, listed.1 - before.1),
        (1, 6),
        "one TokenReview for the whole listing, one SubjectAccessReview per pool deferring to RBAC"
    );
    let got = api.list(&a.name, &stranger).await;
    assert_eq!(got.1["pools"], json!([]));
    assert_eq!(
        counting.calls(),
        listed,
        "answers are remembered: no API call"
    );
    let got = api.issue(&missing, &stranger, "20m").await;
    assert_eq!(
        reason(&got),
        (StatusCode::FORBIDDEN, "serviceaccount_not_listed")
    );
    let probed = counting.calls();
    assert_eq!(
        probed.0, listed.0,
        "no TokenReview for a token just reviewed"
    );
    assert_eq!(
        probed.1 - listed.1,
        1,
        "one SubjectAccessReview (may it list pools?) for a missing pool"
    );

    stop.cancel();
    let _ = serving.await;
    for controller in controllers {
        controller.stop().await;
    }
    for ns in [a, b, orphan, system] {
        ns.delete().await;
    }
}

/// `None` (after a pause, to stay within the per-source rate limit) until `status` is 200.
async fn pace(status: StatusCode) -> Option<()> {
    if status == StatusCode::OK {
        return Some(());
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    None
}

/// A Role granting `create` on `buildkitpools/certificates` and its binding to `sa`.
async fn grant(client: &Client, ns: &str, sa: &str) {
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "bkpool-certificates"},
        "rules": [{"apiGroups": ["bkpool.dev"], "resources": ["buildkitpools/certificates"],
                   "verbs": ["create"]}],
    }))
    .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "bkpool-certificates"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": "bkpool-certificates"},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}],
    }))
    .unwrap();
    let roles: Api<Role> = Api::namespaced(client.clone(), ns);
    roles.create(&PostParams::default(), &role).await.unwrap();
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), ns);
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
}
