//! The two Kubernetes API calls the certificate API makes: TokenReview
//! (`authentication.k8s.io/v1`) to authenticate a ServiceAccount token for bkpool's audiences,
//! and SubjectAccessReview (`authorization.k8s.io/v1`) to ask whether that account may
//! `create` `buildkitpools/certificates` (group `bkpool.dev`) on a pool, so plain RBAC Roles
//! grant access (or `list` `buildkitpools`, to know which pools exist). [`KubeAuth`] is the
//! seam: [`KubeApi`] (the standalone API's own small client) and the operator's
//! `kube::Client` both implement it against a real API server.
//!
//! The client is deliberately small: HTTPS to one API server with a bearer token (re-read from
//! its file on each call, as projected tokens rotate) or a client certificate, from the
//! in-cluster environment or a kubeconfig with embedded or file credentials. Exec and
//! auth-provider plugins are not supported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use futures::future::BoxFuture;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::https::HttpsClient;

/// The RBAC resource that grants certificates: `create` on `buildkitpools/certificates`.
pub const GROUP: &str = "bkpool.dev";
pub const RESOURCE: &str = "buildkitpools";
pub const SUBRESOURCE: &str = "certificates";
pub const VERB: &str = "create";

/// The reviews the certificate API asks the API server for.
pub trait KubeAuth: Send + Sync + 'static {
    /// Authenticates `token` for `audiences` (TokenReview).
    fn review_token<'a>(
        &'a self,
        token: &'a str,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<Review, KubeError>>;

    /// Whether `user` may do `access` (SubjectAccessReview).
    fn review_access<'a>(
        &'a self,
        user: &'a ReviewedUser,
        access: &'a Access,
    ) -> BoxFuture<'a, Result<bool, KubeError>>;
}

/// What a SubjectAccessReview asks about, in group `bkpool.dev`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Access {
    pub namespace: String,
    pub verb: &'static str,
    pub resource: &'static str,
    pub subresource: Option<&'static str>,
    pub name: Option<String>,
}

impl Access {
    /// `create` on `buildkitpools/certificates` of pool `name`: may have certificates for it.
    pub fn certificates(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            verb: VERB,
            resource: RESOURCE,
            subresource: Some(SUBRESOURCE),
            name: Some(name.to_owned()),
        }
    }

    /// `list` on `buildkitpools` in `namespace`: may know which pools exist there.
    pub fn list_pools(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            verb: "list",
            resource: RESOURCE,
            subresource: None,
            name: None,
        }
    }
}

const IN_CLUSTER_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// A connection to one API server.
#[derive(Debug, Clone)]
pub struct KubeApi {
    server: String,
    http: HttpsClient,
    auth: Credential,
}

#[derive(Clone)]
enum Credential {
    None,
    Token(String),
    TokenFile(PathBuf),
}

impl std::fmt::Debug for Credential {
    /// Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Token(_) => f.write_str("Token(..)"),
            Self::TokenFile(p) => write!(f, "TokenFile({})", p.display()),
        }
    }
}

/// A user TokenReview authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewedUser {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
    pub audiences: Vec<String>,
}

/// What can go wrong talking to the API server or reading its configuration.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("{}: {problem}", path.display())]
    Config { path: PathBuf, problem: String },
    #[error("not running in a cluster (KUBERNETES_SERVICE_HOST is unset)")]
    NotInCluster,
    #[error("API server request failed: {0}")]
    Request(#[from] crate::https::HttpsError),
    #[error("API server answered HTTP {status} to {what}")]
    Status { what: &'static str, status: u16 },
    #[error("API server's answer to {what} is not what was expected")]
    Decode { what: &'static str },
    #[error("API server request for {what} failed: {message}")]
    Client { what: &'static str, message: String },
}

/// The result of a TokenReview.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Review {
    Authenticated(ReviewedUser),
    Rejected,
}

impl KubeApi {
    /// The in-cluster configuration: the API server from `KUBERNETES_SERVICE_HOST`/`_PORT`, the
    /// pod's ServiceAccount token and CA.
    pub fn in_cluster() -> Result<Self, KubeError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| KubeError::NotInCluster)?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let dir = Path::new(IN_CLUSTER_DIR);
        let ca = read(&dir.join("ca.crt"))?;
        let http = HttpsClient::with_roots_pem(&ca).map_err(|e| config(&dir.join("ca.crt"), e))?;
        Ok(Self {
            server: format!("https://{host}:{port}"),
            http,
            auth: Credential::TokenFile(dir.join("token")),
        })
    }

    /// The current context of a kubeconfig file.
    pub fn from_kubeconfig(path: &Path) -> Result<Self, KubeError> {
        let text = read(path)?;
        let file: Kubeconfig = serde_yaml::from_str(&text).map_err(|e| config(path, e))?;
        let context = file
            .contexts
            .iter()
            .find(|c| c.name == file.current_context)
            .ok_or_else(|| config(path, "current-context names no context"))?;
        let cluster = file
            .clusters
            .iter()
            .find(|c| c.name == context.context.cluster)
            .ok_or_else(|| config(path, "the context names no known cluster"))?;
        let user = file
            .users
            .iter()
            .find(|u| u.name == context.context.user)
            .map(|u| u.user.clone())
            .unwrap_or_default();
        let base = path.parent().unwrap_or(Path::new("."));
        let ca = pem_field(
            cluster.cluster.ca_data.as_deref(),
            cluster.cluster.ca_file.as_deref(),
            base,
            path,
        )?
        .ok_or_else(|| config(path, "the cluster has no certificate-authority"))?;
        let roots = CertificateDer::pem_slice_iter(ca.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| config(path, e))?;
        let cert = pem_field(
            user.cert_data.as_deref(),
            user.cert_file.as_deref(),
            base,
            path,
        )?;
        let key = pem_field(
            user.key_data.as_deref(),
            user.key_file.as_deref(),
            base,
            path,
        )?;
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| config(path, e))?;
                let key =
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| config(path, e))?;
                Some((chain, key))
            }
            _ => None,
        };
        let http = HttpsClient::with_roots(roots, identity).map_err(|e| config(path, e))?;
        let auth = match (user.token, user.token_file) {
            (Some(token), _) => Credential::Token(token),
            (None, Some(file)) => Credential::TokenFile(base.join(file)),
            (None, None) => Credential::None,
        };
        Ok(Self {
            server: cluster.cluster.server.trim_end_matches('/').to_owned(),
            http,
            auth,
        })
    }

    /// Authenticates `token` for `audiences` with a TokenReview. A token the API server
    /// authenticates, but for none of `audiences`, is `Rejected`.
    pub async fn review_token(
        &self,
        token: &str,
        audiences: &[String],
    ) -> Result<Review, KubeError> {
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": audiences},
        });
        let url = format!("{}/apis/authentication.k8s.io/v1/tokenreviews", self.server);
        let status = self.post(&url, &body, "TokenReview").await?;
        review_answer(status, audiences)
    }

    /// Whether `user` may do `access` (SubjectAccessReview).
    pub async fn review_access(
        &self,
        user: &ReviewedUser,
        access: &Access,
    ) -> Result<bool, KubeError> {
        let body = json!({
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": access_review_spec(user, access),
        });
        let url = format!(
            "{}/apis/authorization.k8s.io/v1/subjectaccessreviews",
            self.server
        );
        let status = self.post(&url, &body, "SubjectAccessReview").await?;
        Ok(status.get("allowed").and_then(Value::as_bool) == Some(true))
    }

    /// `GET`s `path` (e.g. `/api/v1/namespaces/x/configmaps/y`) and returns the whole answer.
    pub async fn get(&self, path: &str) -> Result<Value, KubeError> {
        let url = format!("{}{path}", self.server);
        let token = self.token()?;
        let response = self
            .http
            .send(http::Method::GET, &url, token.as_deref(), None)
            .await?;
        if !response.status.is_success() {
            return Err(KubeError::Status {
                what: "get",
                status: response.status.as_u16(),
            });
        }
        serde_json::from_slice(&response.body).map_err(|_| KubeError::Decode { what: "get" })
    }

    /// The API server's base URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// `POST`s `body` to `path` (e.g. `/api/v1/namespaces`) and returns the whole answer.
    pub async fn create(&self, path: &str, body: &Value) -> Result<Value, KubeError> {
        let url = format!("{}{path}", self.server);
        self.send(&url, body, "create").await
    }

    /// `DELETE`s `path`; success or not-found both count as done.
    pub async fn delete(&self, path: &str) -> Result<(), KubeError> {
        let url = format!("{}{path}", self.server);
        let token = self.token()?;
        let response = self
            .http
            .send(http::Method::DELETE, &url, token.as_deref(), None)
            .await?;
        match response.status.as_u16() {
            200..=299 | 404 => Ok(()),
            status => Err(KubeError::Status {
                what: "delete",
                status,
            }),
        }
    }

    fn token(&self) -> Result<Option<String>, KubeError> {
        Ok(match &self.auth {
            Credential::None => None,
            Credential::Token(t) => Some(t.clone()),
            Credential::TokenFile(p) => Some(read(p)?.trim().to_owned()),
        })
    }

    async fn post(&self, url: &str, body: &Value, what: &'static str) -> Result<Value, KubeError> {
        let mut value = self.send(url, body, what).await?;
        Ok(value
            .get_mut("status")
            .map(Value::take)
            .unwrap_or(Value::Object(Default::default())))
    }

    async fn send(&self, url: &str, body: &Value, what: &'static str) -> Result<Value, KubeError> {
        let token = self.token()?;
        let bytes = serde_json::to_vec(body).map_err(|_| KubeError::Decode { what })?;
        let response = self.http.post_json(url, token.as_deref(), bytes).await?;
        if !response.status.is_success() {
            return Err(KubeError::Status {
                what,
                status: response.status.as_u16(),
            });
        }
        serde_json::from_slice(&response.body).map_err(|_| KubeError::Decode { what })
    }
}

/// What a TokenReview's `status` says: a user only when it is authenticated for one of
/// `audiences` (the API server checks them too; this refuses a server that did not).
fn review_answer(status: Value, audiences: &[String]) -> Result<Review, KubeError> {
    let status: TokenReviewStatus =
        serde_json::from_value(status).map_err(|_| KubeError::Decode {
            what: "TokenReview",
        })?;
    if !status.authenticated {
        return Ok(Review::Rejected);
    }
    let audience_ok =
        audiences.is_empty() || status.audiences.iter().any(|a| audiences.contains(a));
    if !audience_ok {
        return Ok(Review::Rejected);
    }
    let user = status.user.unwrap_or_default();
    Ok(Review::Authenticated(ReviewedUser {
        username: user.username,
        uid: user.uid,
        groups: user.groups,
        extra: user.extra,
        audiences: status.audiences,
    }))
}

/// The SubjectAccessReview `spec` asking whether `user` may do `access`.
fn access_review_spec(user: &ReviewedUser, access: &Access) -> Value {
    json!({
        "user": user.username,
        "uid": user.uid,
        "groups": user.groups,
        "extra": user.extra,
        "resourceAttributes": {
            "namespace": access.namespace,
            "verb": access.verb,
            "group": GROUP,
            "resource": access.resource,
            "subresource": access.subresource.unwrap_or_default(),
            "name": access.name.as_deref().unwrap_or_default(),
        },
    })
}

/// The operator's client: the certificate API in `bkpool controller` reviews with the same
/// connection and credentials as the reconcilers.
impl KubeAuth for kube::Client {
    fn review_token<'a>(
        &'a self,
        token: &'a str,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<Review, KubeError>> {
        Box::pin(async move {
            let review = json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": token, "audiences": audiences},
            });
            let answer = post_review(
                self,
                "/apis/authentication.k8s.io/v1/tokenreviews",
                &review,
                "TokenReview",
            )
            .await?;
            review_answer(answer, audiences)
        })
    }

    fn review_access<'a>(
        &'a self,
        user: &'a ReviewedUser,
        access: &'a Access,
    ) -> BoxFuture<'a, Result<bool, KubeError>> {
        Box::pin(async move {
            let review = json!({
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": access_review_spec(user, access),
            });
            let path = "/apis/authorization.k8s.io/v1/subjectaccessreviews";
            let answer = post_review(self, path, &review, "SubjectAccessReview").await?;
            Ok(answer.get("allowed").and_then(Value::as_bool) == Some(true))
        })
    }
}

/// `POST`s a review through `client` and returns its `status`.
async fn post_review(
    client: &kube::Client,
    path: &str,
    review: &Value,
    what: &'static str,
) -> Result<Value, KubeError> {
    let body = serde_json::to_vec(review).map_err(|_| KubeError::Decode { what })?;
    let request = http::Request::post(path)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .map_err(|e| KubeError::Client {
            what,
            message: e.to_string(),
        })?;
    let mut answer: Value = client.request(request).await.map_err(|e| match e {
        kube::Error::Api(status) => KubeError::Status {
            what,
            status: status.code,
        },
        other => KubeError::Client {
            what,
            message: other.to_string(),
        },
    })?;
    Ok(answer
        .get_mut("status")
        .map(Value::take)
        .unwrap_or(Value::Object(Default::default())))
}

impl KubeAuth for KubeApi {
    fn review_token<'a>(
        &'a self,
        token: &'a str,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<Review, KubeError>> {
        Box::pin(KubeApi::review_token(self, token, audiences))
    }

    fn review_access<'a>(
        &'a self,
        user: &'a ReviewedUser,
        access: &'a Access,
    ) -> BoxFuture<'a, Result<bool, KubeError>> {
        Box::pin(KubeApi::review_access(self, user, access))
    }
}

#[derive(Deserialize, Default)]
struct TokenReviewStatus {
    #[serde(default)]
    authenticated: bool,
    #[serde(default)]
    user: Option<UserInfo>,
    #[serde(default)]
    audiences: Vec<String>,
}

#[derive(Deserialize, Default)]
struct UserInfo {
    #[serde(default)]
    username: String,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    extra: BTreeMap<String, Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Kubeconfig {
    #[serde(default)]
    current_context: String,
    #[serde(default)]
    contexts: Vec<Named<Context>>,
    #[serde(default)]
    clusters: Vec<NamedCluster>,
    #[serde(default)]
    users: Vec<NamedUser>,
}

#[derive(Deserialize)]
struct Named<T> {
    name: String,
    context: T,
}

#[derive(Deserialize)]
struct Context {
    cluster: String,
    #[serde(default)]
    user: String,
}

#[derive(Deserialize)]
struct NamedCluster {
    name: String,
    cluster: Cluster,
}

#[derive(Deserialize)]
struct Cluster {
    server: String,
    #[serde(rename = "certificate-authority-data")]
    ca_data: Option<String>,
    #[serde(rename = "certificate-authority")]
    ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
struct NamedUser {
    name: String,
    #[serde(default)]
    user: User,
}

#[derive(Deserialize, Default, Clone)]
struct User {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<PathBuf>,
    #[serde(rename = "client-certificate-data")]
    cert_data: Option<String>,
    #[serde(rename = "client-certificate")]
    cert_file: Option<PathBuf>,
    #[serde(rename = "client-key-data")]
    key_data: Option<String>,
    #[serde(rename = "client-key")]
    key_file: Option<PathBuf>,
}

/// A PEM field given inline (base64 of the PEM, as kubeconfig does) or as a file.
fn pem_field(
    data: Option<&str>,
    file: Option<&Path>,
    base: &Path,
    kubeconfig: &Path,
) -> Result<Option<String>, KubeError> {
    use base64::Engine;
    if let Some(data) = data {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| config(kubeconfig, e))?;
        return String::from_utf8(bytes)
            .map(Some)
            .map_err(|e| config(kubeconfig, e));
    }
    file.map(|f| read(&base.join(f))).transpose()
}

fn read(path: &Path) -> Result<String, KubeError> {
    std::fs::read_to_string(path).map_err(|e| config(path, e))
}

fn config(path: &Path, problem: impl std::fmt::Display) -> KubeError {
    KubeError::Config {
        path: path.to_path_buf(),
        problem: problem.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        let ca = crate::pki::Ca::generate("k", std::time::Duration::from_secs(60)).unwrap();
        use base64::Engine;
        let ca_data = base64::engine::general_purpose::STANDARD.encode(ca.cert_pem());
        let text = format!(
            "current-context: c\ncontexts:\n- name: c\n  context: {{cluster: k, user: u}}\n\
             clusters:\n- name: k\n  cluster: {{server: 'https://127.0.0.1:6443/', certificate-authority-data: {ca_data}}}\n\
             users:\n- name: u\n  user: {{token: very-secret-token}}\n"
        );
        std::fs::write(&path, text).unwrap();
        let api = KubeApi::from_kubeconfig(&path).unwrap();
        assert_eq!(api.server(), "https://127.0.0.1:6443");
        let shown = format!("{api:?}");
        assert!(!shown.contains("very-secret"), "{shown}");
    }

    #[test]
    fn a_kubeconfig_without_its_context_is_a_config_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(&path, "apiVersion: v1\nkind: Config\ncurrent-context: x\n").unwrap();
        let err = KubeApi::from_kubeconfig(&path).unwrap_err();
        assert!(
            err.to_string().contains("kubeconfig: current-context"),
            "{err}"
        );
        let err = KubeApi::from_kubeconfig(&dir.path().join("absent")).unwrap_err();
        assert!(matches!(err, KubeError::Config { .. }), "{err}");
    }
}
