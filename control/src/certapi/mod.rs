//! The certificate API: CI jobs trade a bearer token (Kubernetes ServiceAccount, OIDC, or a
//! local static token) for a short-lived client certificate for one pool.
//!
//! - `POST /v1/namespaces/{ns}/pools/{pool}/certificates` `{"csr": PEM}` (or
//!   `{"generate_key": true}` where key generation is enabled: local mode, off by default),
//!   optional `"ttl"`: the certificate chain, the gateway CA bundle, the endpoints and the
//!   expiry (and the key, only when generated). Issuing pre-warms the pool.
//! - `GET /v1/namespaces/{ns}/pools`: the pools of `ns` the caller may use.
//! - `POST /v1/namespaces/{ns}/pools/{pool}/wake`: wake a pool ahead of a build.
//!
//! Modules: [`directory`] (the injected world), [`cluster`] (that world on Kubernetes: pools,
//! their `spec.auth` and client CAs from watch caches, wakes through the gateway's waker),
//! [`serving`] (the API's own certificate on Kubernetes), [`replica`] (all of it in one
//! controller replica), [`handlers`], [`error`] (JSON
//! errors), [`metrics`], [`config`] (the standalone and local-mode configuration), and here
//! the router (testable with `oneshot`, no socket) and the HTTPS server.
//!
//! Every request is rate-limited by its source address before its token is looked at, and by
//! its identity after. The API is stateless beyond those buckets and short-lived review
//! answers: every request carries its token, and everything it needs is in the directory, so
//! replicas need no coordination.

pub mod cluster;
pub mod config;
pub mod directory;
pub mod error;
pub mod handlers;
pub mod metrics;
pub mod replica;
pub mod serving;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::auth::Authenticator;
use crate::auth::ratelimit::{RateLimit, RateLimiter};
pub use directory::{
    CaUnavailable, NoWarmer, PoolDirectory, PoolEntry, StaticDirectory, WarmReason, Warmer,
};
pub use error::ApiError;
pub use metrics::ApiMetrics;

/// Largest request body accepted (a CSR is well under 2 KiB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Deadline for handling one request, token verification included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Request line and headers at most (a bearer token is at most 16 KiB).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Deadline for a TLS handshake and for reading request headers.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 1024;

/// Everything the handlers share.
pub struct ApiState {
    pub directory: Arc<dyn PoolDirectory>,
    pub warmer: Arc<dyn Warmer>,
    pub auth: Authenticator,
    pub limiters: Limiters,
    pub metrics: ApiMetrics,
    /// Whether `{"generate_key": true}` is honoured. Off unless local mode's configuration
    /// turns it on: the key should stay on the client.
    pub generate_keys: bool,
}

/// The request rate limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Per source address, before the token is looked at.
    pub sources: RateLimit,
    /// Per authenticated identity.
    pub identities: RateLimit,
    /// Wakes (explicit or on issue) per identity.
    pub wakes: RateLimit,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            sources: RateLimit {
                burst: 60,
                per: Duration::from_millis(250),
                max_identities: 10_000,
            },
            identities: RateLimit::default(),
            wakes: RateLimit {
                burst: 3,
                per: Duration::from_secs(20),
                max_identities: 10_000,
            },
        }
    }
}

/// The buckets of [`Limits`].
#[derive(Debug)]
pub struct Limiters {
    pub sources: RateLimiter,
    pub identities: RateLimiter,
    pub wakes: RateLimiter,
}

impl Limiters {
    pub fn new(limits: Limits) -> Self {
        Self {
            sources: RateLimiter::new(limits.sources),
            identities: RateLimiter::new(limits.identities),
            wakes: RateLimiter::new(limits.wakes),
        }
    }
}

impl ApiState {
    /// The state with default limits and key generation off.
    pub fn new(
        directory: Arc<dyn PoolDirectory>,
        warmer: Arc<dyn Warmer>,
        auth: Authenticator,
        metrics: ApiMetrics,
    ) -> Self {
        Self {
            directory,
            warmer,
            auth,
            limiters: Limiters::new(Limits::default()),
            metrics,
            generate_keys: false,
        }
    }

    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limiters = Limiters::new(limits);
        self
    }

    /// Lets callers ask the server to make their key (local mode only).
    pub fn generating_keys(mut self, on: bool) -> Self {
        self.generate_keys = on;
        self
    }
}

/// The address a request came from (set by [`serve`]; absent in tests without a socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub IpAddr);

/// The API's routes over `state`.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/namespaces/{ns}/pools", get(handlers::list))
        .route(
            "/v1/namespaces/{ns}/pools/{pool}/certificates",
            post(handlers::issue),
        )
        .route(
            "/v1/namespaces/{ns}/pools/{pool}/wake",
            post(handlers::wake),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(|| async { ApiError::NotFound })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(deadline_and_headers))
        .with_state(state)
}

/// Serves `router` over TLS on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let acceptor = TlsAcceptor::from(tls);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => return,
            permit = permits.clone().acquire_owned() => permit.expect("semaphore never closes"),
        };
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "certificate API accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let router = router.clone().layer(Extension(Peer(peer.ip())));
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES)
                .serve_connection(TokioIo::new(tls), TowerToHyperService::new(router))
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "certificate API connection ended with an error");
            }
        });
    }
}

/// A rustls server configuration from a PEM certificate chain and key (HTTP/1.1).
pub fn server_config(cert_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>, rustls::Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str| rustls::Error::General(format!("cannot parse {what} PEM"));
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad("certificate"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| bad("key"))?;
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Bounds every request's time and marks every answer uncacheable (answers carry keys).
async fn deadline_and_headers(request: Request, next: Next) -> Response {
    let mut response = match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    };
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}
