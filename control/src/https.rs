//! A small HTTPS client for the few outbound calls the control plane makes (OIDC discovery and
//! JWKS, TokenReview and SubjectAccessReview, `bkpool login`): HTTPS only, rustls, one request
//! per connection, a deadline on the whole exchange and a cap on the response body, so a slow
//! or hostile server costs a bounded amount of time and memory.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Where the system's CA bundle usually is (Debian, Fedora, Alpine/macOS).
pub const SYSTEM_ROOTS: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Default deadline for one request, connection included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on a response body.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;

/// An HTTPS client trusting a fixed set of roots.
#[derive(Clone)]
pub struct HttpsClient {
    tls: TlsConnector,
    timeout: Duration,
    max_body: usize,
}

/// A response: status and the whole (bounded) body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub body: Vec<u8>,
}

/// Why an outbound request failed. Messages never include the response body.
#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    #[error("{0:?} is not an https:// URL with a host")]
    NotHttps(String),
    #[error("no usable trust anchors: {0}")]
    Roots(String),
    #[error("cannot connect to {host}: {source}")]
    Connect {
        host: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {host} failed: {source}")]
    Tls {
        host: String,
        source: std::io::Error,
    },
    #[error("HTTP exchange with {host} failed: {message}")]
    Http { host: String, message: String },
    #[error("response from {host} is larger than {limit} bytes")]
    TooLarge { host: String, limit: usize },
    #[error("request to {host} timed out after {timeout:?}")]
    Timeout { host: String, timeout: Duration },
}

impl HttpsClient {
    /// A client trusting the PEM certificates in `roots_pem` (and nothing else).
    pub fn with_roots_pem(roots_pem: &str) -> Result<Self, HttpsError> {
        use rustls::pki_types::pem::PemObject;
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(roots_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| HttpsError::Roots(e.to_string()))?;
        Self::with_roots(certs, None)
    }

    /// A client trusting the system's CA bundle: `$SSL_CERT_FILE` when set, else the first of
    /// [`SYSTEM_ROOTS`] that exists.
    pub fn system() -> Result<Self, HttpsError> {
        let path = std::env::var_os("SSL_CERT_FILE")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                SYSTEM_ROOTS
                    .iter()
                    .map(std::path::PathBuf::from)
                    .find(|p| p.exists())
            })
            .ok_or_else(|| HttpsError::Roots("no system CA bundle found".into()))?;
        let pem = std::fs::read_to_string(&path)
            .map_err(|e| HttpsError::Roots(format!("{}: {e}", path.display())))?;
        Self::with_roots_pem(&pem)
    }

    /// A client trusting `roots`, presenting `identity` (chain and key) when one is given.
    pub fn with_roots(
        roots: Vec<CertificateDer<'static>>,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<Self, HttpsError> {
        let mut store = RootCertStore::empty();
        for cert in roots {
            store
                .add(cert)
                .map_err(|e| HttpsError::Roots(e.to_string()))?;
        }
        if store.is_empty() {
            return Err(HttpsError::Roots("no certificates".into()));
        }
        let builder = ClientConfig::builder().with_root_certificates(store);
        let config = match identity {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| HttpsError::Roots(e.to_string()))?,
            None => builder.with_no_client_auth(),
        };
        Ok(Self::from_config(Arc::new(config)))
    }

    /// A client on a ready-made rustls configuration.
    pub fn from_config(config: Arc<ClientConfig>) -> Self {
        Self {
            tls: TlsConnector::from(config),
            timeout: DEFAULT_TIMEOUT,
            max_body: DEFAULT_MAX_BODY,
        }
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn max_body(mut self, max_body: usize) -> Self {
        self.max_body = max_body;
        self
    }

    /// `GET url`.
    pub async fn get(&self, url: &str) -> Result<Response, HttpsError> {
        self.send(Method::GET, url, None, None).await
    }

    /// `GET url` with a bearer token.
    pub async fn get_authorized(&self, url: &str, bearer: &str) -> Result<Response, HttpsError> {
        self.send(Method::GET, url, Some(bearer), None).await
    }

    /// `POST url` with a JSON body and an optional bearer token.
    pub async fn post_json(
        &self,
        url: &str,
        bearer: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Response, HttpsError> {
        self.send(Method::POST, url, bearer, Some(body)).await
    }

    /// Any request, for the calls the helpers above do not cover.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        bearer: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Response, HttpsError> {
        let target = Target::parse(url)?;
        let host = target.host.clone();
        let exchange = self.exchange(method, target, bearer, body);
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(HttpsError::Timeout {
                host,
                timeout: self.timeout,
            }),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        target: Target,
        bearer: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Response, HttpsError> {
        let host = target.host.clone();
        let http_err = |e: &dyn std::fmt::Display| HttpsError::Http {
            host: host.clone(),
            message: e.to_string(),
        };
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|source| HttpsError::Connect {
                host: host.clone(),
                source,
            })?;
        let name = ServerName::try_from(target.host.clone()).map_err(|e| http_err(&e))?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|source| HttpsError::Tls {
                host: host.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| http_err(&e))?;
        let driver = tokio::spawn(conn);
        let request = target
            .request(method, bearer, body)
            .map_err(|e| http_err(&e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| http_err(&e))?;
        let status = response.status();
        let limited = Limited::new(response.into_body(), self.max_body);
        let collected = http_body_util::BodyExt::collect(limited).await;
        driver.abort();
        let body = collected.map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                HttpsError::TooLarge {
                    host: host.clone(),
                    limit: self.max_body,
                }
            } else {
                http_err(&e)
            }
        })?;
        Ok(Response {
            status,
            body: body.to_bytes().to_vec(),
        })
    }
}

impl std::fmt::Debug for HttpsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsClient")
            .field("timeout", &self.timeout)
            .field("max_body", &self.max_body)
            .finish_non_exhaustive()
    }
}

/// Whether `url` is an absolute `https://` URL with a host.
pub fn is_https_url(url: &str) -> bool {
    Target::parse(url).is_ok()
}

/// Where a request goes, parsed from an `https://` URL.
struct Target {
    host: String,
    port: u16,
    authority: String,
    path_and_query: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, HttpsError> {
        let not_https = || HttpsError::NotHttps(url.chars().take(200).collect());
        let uri: Uri = url.parse().map_err(|_| not_https())?;
        if uri.scheme_str() != Some("https") {
            return Err(not_https());
        }
        let authority = uri.authority().ok_or_else(not_https)?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() || authority.as_str().contains('@') {
            return Err(not_https());
        }
        Ok(Self {
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(443),
            authority: authority.as_str().to_owned(),
            path_and_query: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        })
    }

    fn request(
        &self,
        method: Method,
        bearer: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Request<Full<bytes::Bytes>>, http::Error> {
        let mut builder = Request::builder()
            .method(method)
            .uri(&self.path_and_query)
            .header(header::HOST, &self.authority)
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "bkpool");
        if let Some(token) = bearer {
            let mut value = HeaderValue::try_from(format!("Bearer {token}"))?;
            value.set_sensitive(true);
            builder = builder.header(header::AUTHORIZATION, value);
        }
        if body.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        builder.body(Full::new(body.unwrap_or_default().into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_urls_with_a_host_are_accepted() {
        assert!(is_https_url("https://token.actions.githubusercontent.com"));
        assert!(is_https_url("https://127.0.0.1:8443/x?y=1"));
        assert!(!is_https_url("http://example.com"));
        assert!(!is_https_url("https://user@example.com/"));
        assert!(!is_https_url("example.com"));
        assert!(!is_https_url(""));
    }

    #[test]
    fn a_target_keeps_port_path_and_query() {
        let t = Target::parse("https://[::1]:9443/a/b?c=d").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9443));
        assert_eq!(t.path_and_query, "/a/b?c=d");
        assert_eq!(Target::parse("https://x.example").unwrap().port, 443);
    }
}
