//! One `bkpool controller` replica's certificate API, leader or not: its own watch caches of
//! pools and of the operator's Secrets, its serving certificate ([`super::serving`]), the
//! state the handlers share, and the HTTPS server, which accepts connections only once the
//! caches have synced and a certificate is served (until then it would refuse everyone).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::cluster::{ClusterDirectory, ClusterWarmer};
use super::serving::Serving;
use super::{ApiMetrics, ApiState, router, serve};
use crate::auth::jwks::{JwksCache, JwksLimits};
use crate::auth::{AuthMetrics, Authenticator, KubeAuth};
use crate::crd::BuildKitPool;
use crate::https::HttpsClient;
use crate::operator::Settings;
use crate::operator::objects::MANAGED_SELECTOR;
use crate::operator::watch::{self, Events, Scope, api};

/// What one replica's API serves and how it names itself.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    /// The controller's namespace: the API's CA Secret and ConfigMap live there.
    pub namespace: String,
    /// The namespaces whose pools it serves.
    pub scope: Scope,
    /// What ServiceAccount tokens must be issued for.
    pub audiences: Vec<String>,
    /// Names clients reach the API by, beyond its Service's (DNS names or IP addresses).
    pub server_names: Vec<String>,
    /// Where clients reach the gateway (for the endpoints in each answer).
    pub operator: Settings,
    /// The CAs OIDC issuers are trusted with, PEM (default: the system's trust anchors), for
    /// an issuer such as a self-hosted GitLab behind a private CA.
    pub oidc_roots: Option<String>,
}

/// The certificate API of one replica, ready to run.
pub struct Replica {
    state: Arc<ApiState>,
    serving: Arc<Serving>,
    pools: Store<BuildKitPool>,
    secrets: Store<Secret>,
    feeds: Vec<Feed>,
    ready: Arc<AtomicBool>,
}

enum Feed {
    Pools(Events<BuildKitPool>),
    Secrets(Events<Secret>),
}

impl Replica {
    /// Sets up the caches and the state, its metrics registered in `registry`. Reviews go to
    /// the API server through `client`.
    pub fn new(client: Client, settings: &ReplicaSettings, registry: &mut Registry) -> Self {
        let kube: Arc<dyn KubeAuth> = Arc::new(client.clone());
        Self::with_reviews(client, kube, settings, registry)
    }

    /// As [`Replica::new`], with reviews asked of `kube` (a test counts them there).
    pub fn with_reviews(
        client: Client,
        kube: Arc<dyn KubeAuth>,
        settings: &ReplicaSettings,
        registry: &mut Registry,
    ) -> Self {
        let (pools, pool_events) = watch::cache(
            api::<BuildKitPool>(&client, &settings.scope),
            watcher::Config::default(),
        );
        let (secrets, secret_events) = watch::cache(
            api::<Secret>(&client, &settings.scope),
            watcher::Config::default().labels(MANAGED_SELECTOR),
        );
        let directory =
            ClusterDirectory::new(pools.clone(), secrets.clone(), settings.operator.clone());
        let warmer = ClusterWarmer::new(client.clone(), pools.clone(), registry);
        let oidc = match &settings.oidc_roots {
            Some(pem) => HttpsClient::with_roots_pem(pem)
                .map(|c| c.max_body(256 * 1024).timeout(Duration::from_secs(5)))
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "OIDC roots unusable: pools trusting OIDC issuers cannot verify tokens");
                    oidc_client()
                }),
            None => oidc_client(),
        };
        let jwks = Arc::new(JwksCache::new(oidc, JwksLimits::default()));
        let auth_metrics = AuthMetrics::register(registry, &jwks);
        let auth = Authenticator::new(jwks, None, settings.audiences.clone())
            .with_kube(kube)
            .with_metrics(auth_metrics);
        let state = ApiState::new(
            Arc::new(directory),
            Arc::new(warmer),
            auth,
            ApiMetrics::register(registry),
        );
        let serving = Serving::new(client, &settings.namespace, &settings.server_names);
        Self {
            state: Arc::new(state),
            serving: Arc::new(serving),
            pools,
            secrets,
            feeds: vec![Feed::Pools(pool_events), Feed::Secrets(secret_events)],
            ready: Arc::default(),
        }
    }

    /// True once the API accepts connections.
    pub fn readiness(&self) -> Arc<AtomicBool> {
        self.ready.clone()
    }

    /// Feeds the caches, keeps the certificate current, and serves on `listener` once both
    /// are ready, until `stop` is cancelled.
    pub async fn run(self, listener: TcpListener, stop: CancellationToken) {
        let feeds: Vec<_> = self
            .feeds
            .into_iter()
            .map(|f| tokio::spawn(drive(f)))
            .collect();
        let refresh = tokio::spawn({
            let (serving, stop) = (self.serving.clone(), stop.clone());
            async move { serving.run(stop.cancelled()).await }
        });
        let synced = async {
            let _ = self.pools.wait_until_ready().await;
            let _ = self.secrets.wait_until_ready().await;
            while !self.serving.ready() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            () = stop.cancelled() => {}
            () = synced => {
                self.ready.store(true, Relaxed);
                tracing::info!(addr = ?listener.local_addr().ok(), "certificate API serving");
                let tls = self.serving.server_config();
                serve(listener, tls, router(self.state), stop.cancelled_owned()).await;
            }
        }
        self.ready.store(false, Relaxed);
        refresh.abort();
        for feed in feeds {
            feed.abort();
        }
    }
}

/// Keeps one cache moving; watch errors are retried by the stream itself.
async fn drive(feed: Feed) {
    async fn each<K>(what: &str, mut events: Events<K>) {
        while let Some(event) = events.next().await {
            if let Err(e) = event {
                tracing::warn!(watch = what, error = %e, "certificate API watch failed; retrying");
            }
        }
    }
    match feed {
        Feed::Pools(events) => each("pools", events).await,
        Feed::Secrets(events) => each("secrets", events).await,
    }
}

/// The client OIDC discovery and JWKS are fetched with: the system's trust anchors
/// (`SSL_CERT_FILE` when set). An image without any reaches no issuer, and says so when a
/// pool names one.
fn oidc_client() -> HttpsClient {
    match HttpsClient::system() {
        Ok(client) => client.max_body(256 * 1024).timeout(Duration::from_secs(5)),
        Err(_) => {
            tracing::warn!("no system CA bundle: pools trusting OIDC issuers cannot verify tokens");
            // Trusts nothing usable: every issuer's discovery fails, and says so.
            let ca = crate::pki::Ca::generate("bkpool no OIDC roots", Duration::from_secs(60))
                .expect("a throwaway CA");
            HttpsClient::with_roots_pem(ca.cert_pem()).expect("one root")
        }
    }
}
