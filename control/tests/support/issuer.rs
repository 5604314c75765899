//! A real OIDC issuer for tests: discovery and JWKS served over HTTPS on loopback (axum behind
//! the certificate API's own TLS server) with a server certificate from a test CA the client
//! trusts. One server hosts many issuers (`https://127.0.0.1:PORT/i/<name>`), keys can be
//! rotated while it runs, and every JWKS fetch is counted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use control::https::HttpsClient;
use control::pki::Ca;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_util_shim::CancelOnDrop;

/// A signing key with its id.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    pub encoding: EncodingKey,
    pub jwk: Jwk,
    /// The public key, PEM (what an attacker would "sign" an HS256 token with).
    pub public_pem: String,
}

impl SigningKey {
    pub fn rsa(kid: &str) -> Self {
        Self::generate(kid, &rcgen::PKCS_RSA_SHA256, Algorithm::RS256)
    }

    pub fn ec(kid: &str) -> Self {
        Self::generate(kid, &rcgen::PKCS_ECDSA_P256_SHA256, Algorithm::ES256)
    }

    fn generate(kid: &str, rcgen_alg: &'static rcgen::SignatureAlgorithm, alg: Algorithm) -> Self {
        let pair = rcgen::KeyPair::generate_for(rcgen_alg).expect("generate a signing key");
        let pem = pair.serialize_pem();
        let encoding = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(pem.as_bytes()),
            _ => EncodingKey::from_ec_pem(pem.as_bytes()),
        }
        .expect("load the signing key");
        let mut jwk = Jwk::from_encoding_key(&encoding, alg).expect("JWK of the key");
        jwk.common.key_id = Some(kid.to_owned());
        Self {
            kid: kid.into(),
            alg,
            encoding,
            jwk,
            public_pem: pair.public_key_pem(),
        }
    }

    /// A token with these claims, signed by this key.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign a token")
    }
}

/// What the GitHub Actions token endpoint of an issuer hands out.
#[derive(Clone)]
struct ActionsTokens {
    key: SigningKey,
    claims: Value,
    request_token: String,
}

#[derive(Default)]
struct Issuers {
    keys: HashMap<String, Vec<Jwk>>,
    actions: HashMap<String, ActionsTokens>,
    /// Issuer names whose discovery document names another issuer.
    lying: Vec<String>,
}

/// The running issuer server.
pub struct TestIssuer {
    pub addr: SocketAddr,
    pub ca: Ca,
    state: Arc<Shared>,
    _stop: CancelOnDrop,
}

struct Shared {
    issuers: Mutex<Issuers>,
    jwks_fetches: AtomicUsize,
    addr: Mutex<Option<SocketAddr>>,
}

impl TestIssuer {
    pub async fn start() -> Self {
        let ca = Ca::generate("test OIDC issuer CA", Duration::from_secs(3600)).unwrap();
        let server = ca
            .issue_server(&["127.0.0.1".into()], Duration::from_secs(3600))
            .unwrap();
        let tls =
            control::certapi::server_config(&server.cert_pem, server.key_pem.as_deref().unwrap())
                .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Shared {
            issuers: Mutex::default(),
            jwks_fetches: AtomicUsize::new(0),
            addr: Mutex::new(Some(addr)),
        });
        let router = Router::new()
            .route("/i/{name}/.well-known/openid-configuration", get(discovery))
            .route("/i/{name}/jwks", get(jwks))
            .route("/i/{name}/actions-token", get(actions_token))
            .with_state(state.clone());
        let (stop, stopped) = CancelOnDrop::new();
        tokio::spawn(control::certapi::serve(listener, tls, router, stopped));
        Self {
            addr,
            ca,
            state,
            _stop: stop,
        }
    }

    /// The issuer URL of `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("https://{}/i/{name}", self.addr)
    }

    /// Publishes exactly `keys` for `name` (replacing what it had: a rotation).
    pub fn publish(&self, name: &str, keys: &[&SigningKey]) {
        let jwks = keys.iter().map(|k| k.jwk.clone()).collect();
        self.state
            .issuers
            .lock()
            .unwrap()
            .keys
            .insert(name.into(), jwks);
    }

    /// Publishes raw JWKs for `name`.
    pub fn publish_jwks(&self, name: &str, jwks: Vec<Jwk>) {
        self.state
            .issuers
            .lock()
            .unwrap()
            .keys
            .insert(name.into(), jwks);
    }

    /// Makes `name`'s discovery document claim another issuer.
    pub fn lie_about(&self, name: &str) {
        self.state.issuers.lock().unwrap().lying.push(name.into());
    }

    /// Serves a GitHub Actions-style token endpoint for `name` at
    /// `{url}/actions-token?api-version=2.0`: with `Authorization: bearer <request_token>` it
    /// answers `{"value": token}`, the token signed by `key` with `claims`, `iss` and the
    /// `audience` query parameter as `aud`.
    pub fn serve_actions_tokens(
        &self,
        name: &str,
        key: &SigningKey,
        claims: Value,
        request_token: &str,
    ) {
        let tokens = ActionsTokens {
            key: key.clone(),
            claims,
            request_token: request_token.into(),
        };
        self.state
            .issuers
            .lock()
            .unwrap()
            .actions
            .insert(name.into(), tokens);
    }

    pub fn jwks_fetches(&self) -> usize {
        self.state.jwks_fetches.load(Ordering::SeqCst)
    }

    /// An HTTPS client trusting this server.
    pub fn client(&self) -> HttpsClient {
        HttpsClient::with_roots_pem(self.ca.cert_pem()).unwrap()
    }
}

async fn discovery(
    State(state): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, StatusCode> {
    let addr = state.addr.lock().unwrap().expect("address");
    let issuers = state.issuers.lock().unwrap();
    if !issuers.keys.contains_key(&name) {
        return Err(StatusCode::NOT_FOUND);
    }
    let base = format!("https://{addr}/i/{name}");
    let claimed = if issuers.lying.contains(&name) {
        format!("https://{addr}/i/someone-else")
    } else {
        base.clone()
    };
    Ok(Json(json!({
        "issuer": claimed,
        "jwks_uri": format!("{base}/jwks"),
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
    })))
}

async fn jwks(
    State(state): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Json<JwkSet>, StatusCode> {
    state.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    let issuers = state.issuers.lock().unwrap();
    let keys = issuers.keys.get(&name).ok_or(StatusCode::NOT_FOUND)?;
    Ok(Json(JwkSet { keys: keys.clone() }))
}

async fn actions_token(
    State(state): State<Arc<Shared>>,
    Path(name): Path<String>,
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
    headers: axum::http::HeaderMap,
) -> Result<Json<Value>, StatusCode> {
    let addr = state.addr.lock().unwrap().expect("address");
    let tokens = state.issuers.lock().unwrap().actions.get(&name).cloned();
    let tokens = tokens.ok_or(StatusCode::NOT_FOUND)?;
    let expected = format!("bearer {}", tokens.request_token);
    let given = headers.get("authorization").and_then(|v| v.to_str().ok());
    if given.map(str::to_ascii_lowercase) != Some(expected.to_ascii_lowercase()) {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let mut claims = tokens.claims.clone();
    claims["iss"] = format!("https://{addr}/i/{name}").into();
    claims["aud"] = query.get("audience").cloned().unwrap_or_default().into();
    Ok(Json(json!({ "value": tokens.key.sign(&claims) })))
}

/// Seconds since the epoch, shifted by `offset` seconds.
pub fn now_plus(offset: i64) -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    now + offset
}

/// base64url without padding.
pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

mod tokio_util_shim {
    //! A shutdown future completed when its handle is dropped (the server stops with the test).
    use tokio::sync::oneshot;

    pub struct CancelOnDrop(#[allow(dead_code)] oneshot::Sender<()>);

    impl CancelOnDrop {
        pub fn new() -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
            let (tx, rx) = oneshot::channel();
            (Self(tx), async move {
                let _ = rx.await;
            })
        }
    }
}
