//! The certificate API's own certificate on Kubernetes, from the operator's PKI.
//!
//! One CA serves every replica. It lives in Secret `bkpool-certapi-ca` of the controller's
//! namespace: the first replica to find it missing creates it (one that loses that race reads
//! the winner's), and any replica rotates it when due, like a pool's CA (a successor joins the
//! trust bundle `2 × rotateBefore` ahead and takes over `rotateBefore` ahead; a predecessor
//! stays until it expires), writing with a resourceVersion precondition so two replicas never
//! both do. The bundle is published in ConfigMap `bkpool-certapi-ca`, key `ca.crt`, which
//! every authenticated user may read: that is what clients pin (`bkpool login` reads it, or
//! takes it as a file).
//!
//! Each replica issues its own serving certificate from the current CA, in memory (no leaf
//! key is ever stored), and swaps it in well before it is due or as soon as the CA rotated:
//! connections in flight keep theirs, new handshakes get the new one, nothing restarts.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::{Value, json};

use crate::operator::FIELD_MANAGER;
use crate::operator::pki::{CaChange, CaSecret, Lifetimes, plan_ca};
use crate::pki::{Ca, PkiError};

/// The Secret holding the API's CA (and its successor and predecessors).
pub const CA_SECRET: &str = "bkpool-certapi-ca";
/// The ConfigMap publishing the CA bundle clients trust the API with.
pub const CA_CONFIGMAP: &str = "bkpool-certapi-ca";
/// The ConfigMap's key.
pub const CA_CONFIGMAP_KEY: &str = "ca.crt";
/// The Service in front of every controller replica's certificate API.
pub const SERVICE: &str = "bkpool-certapi";

/// The CA lives three years, is succeeded 180 days ahead and replaced 90 days ahead; each
/// replica's certificate lives 30 days.
pub const LIFETIMES: Lifetimes = Lifetimes {
    ca: Duration::from_secs(3 * 365 * 86_400),
    server: Duration::from_secs(30 * 86_400),
    rotate_before: Duration::from_secs(90 * 86_400),
};

/// How often each replica checks the CA and its certificate.
pub const REFRESH: Duration = Duration::from_secs(60);

/// What stopped a round.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("API server: {0}")]
    Kube(#[from] kube::Error),
    #[error("certificate API CA Secret {CA_SECRET}: {0}")]
    Pki(#[from] PkiError),
    #[error("serving certificate: {0}")]
    Tls(#[from] rustls::Error),
}

/// One replica's serving side.
pub struct Serving {
    client: Client,
    namespace: String,
    names: Vec<String>,
    resolver: Arc<Resolver>,
    /// The bundle this replica last published, so an unchanged one is not written again.
    published: Mutex<Option<String>>,
    /// The issuer (DER) and expiry of the certificate being served.
    leaf: Mutex<Option<(Vec<u8>, SystemTime)>>,
}

impl Serving {
    /// The API in `namespace` (the controller's), its certificate naming Service
    /// [`SERVICE`]'s DNS names and `extra_names` (DNS names or IP addresses clients use).
    pub fn new(client: Client, namespace: &str, extra_names: &[String]) -> Self {
        let mut names = vec![
            SERVICE.to_owned(),
            format!("{SERVICE}.{namespace}"),
            format!("{SERVICE}.{namespace}.svc"),
            format!("{SERVICE}.{namespace}.svc.cluster.local"),
        ];
        for name in extra_names {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        Self {
            client,
            namespace: namespace.to_owned(),
            names,
            resolver: Arc::new(Resolver(RwLock::new(None))),
            published: Mutex::new(None),
            leaf: Mutex::new(None),
        }
    }

    /// A TLS configuration (HTTP/1.1) serving whatever certificate is current.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(self.resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// Whether a certificate is being served.
    pub fn ready(&self) -> bool {
        self.resolver.0.read().is_ok_and(|k| k.is_some())
    }

    /// Refreshes every [`REFRESH`] until `stop` completes (the first round at once).
    pub async fn run(&self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "certificate API: cannot refresh its certificate; retrying");
            }
            let wait = if self.ready() {
                REFRESH
            } else {
                Duration::from_secs(2)
            };
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One round: the CA (created, or rotated when due), the published bundle, this
    /// replica's certificate.
    pub async fn refresh(&self) -> Result<(), ServingError> {
        let ca = self.ca().await?;
        self.publish(&ca.bundle()).await?;
        self.serve_from(&ca.current)
    }

    /// The current CA Secret, created or rotated first when needed.
    async fn ca(&self) -> Result<CaSecret, ServingError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let now = SystemTime::now();
        let listed = api
            .list(&ListParams::default().fields(&format!("metadata.name={CA_SECRET}")))
            .await?;
        let Some(existing) = listed.items.into_iter().next() else {
            let (created, _) = plan_ca(None, LIFETIMES, now)?;
            let secret = Secret {
                metadata: meta(CA_SECRET),
                type_: Some("Opaque".into()),
                data: Some(created.data()),
                ..Secret::default()
            };
            return match api.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    tracing::info!(secret = CA_SECRET, "certificate API CA created");
                    Ok(created)
                }
                // Another replica created it first: use theirs.
                Err(kube::Error::Api(s)) if s.code == 409 => Box::pin(self.ca()).await,
                Err(e) => Err(e.into()),
            };
        };
        let parsed = CaSecret::parse(&existing)?;
        let (planned, change) = plan_ca(Some(&parsed), LIFETIMES, now)?;
        let pruned = planned.previous.len() != parsed.previous.len();
        if change == CaChange::Kept && !pruned {
            return Ok(parsed);
        }
        // Keys the new data drops are removed (null in a merge patch); the resourceVersion
        // makes the write fail if another replica rotated meanwhile.
        let new_data = planned.data();
        let mut data = serde_json::Map::new();
        for key in existing.data.iter().flat_map(BTreeMap::keys) {
            if !new_data.contains_key(key) {
                data.insert(key.clone(), Value::Null);
            }
        }
        for (key, value) in &new_data {
            data.insert(
                key.clone(),
                serde_json::to_value(value).unwrap_or(Value::Null),
            );
        }
        let patch = json!({
            "metadata": {"resourceVersion": existing.resource_version()},
            "data": data,
        });
        match api
            .patch(CA_SECRET, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(secret = CA_SECRET, ?change, "certificate API CA rotated");
                Ok(planned)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Box::pin(self.ca()).await,
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the bundle to the ConfigMap unless this replica already did.
    async fn publish(&self, bundle: &str) -> Result<(), ServingError> {
        if lock(&self.published).as_deref() == Some(bundle) {
            return Ok(());
        }
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let config_map = ConfigMap {
            metadata: meta(CA_CONFIGMAP),
            data: Some(BTreeMap::from([(
                CA_CONFIGMAP_KEY.to_owned(),
                bundle.to_owned(),
            )])),
            ..ConfigMap::default()
        };
        let mut value = serde_json::to_value(&config_map).unwrap_or(Value::Null);
        value["apiVersion"] = "v1".into();
        value["kind"] = "ConfigMap".into();
        let params = PatchParams::apply(FIELD_MANAGER).force();
        api.patch(CA_CONFIGMAP, &params, &Patch::Apply(&value))
            .await?;
        *lock(&self.published) = Some(bundle.to_owned());
        Ok(())
    }

    /// Issues this replica a new certificate when it has none, its issuer is no longer the
    /// current CA, or a third of its life is left.
    fn serve_from(&self, ca: &Ca) -> Result<(), ServingError> {
        let now = SystemTime::now();
        let due = match &*lock(&self.leaf) {
            None => true,
            Some((issuer, not_after)) => {
                let left = not_after.duration_since(now).unwrap_or_default();
                issuer.as_slice() != ca.cert_der().as_ref() || left < LIFETIMES.server / 3
            }
        };
        if !due {
            return Ok(());
        }
        let issued = ca.issue_server(&self.names, LIFETIMES.server)?;
        let key_pem = issued.key_pem.clone().unwrap_or_default();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)?;
        let chain: Vec<CertificateDer<'static>> = vec![issued.cert_der().clone()];
        let certified = Arc::new(CertifiedKey::new(chain, signing));
        *self.resolver.0.write().unwrap_or_else(|p| p.into_inner()) = Some(certified);
        *lock(&self.leaf) = Some((ca.cert_der().to_vec(), issued.not_after));
        tracing::info!(names = ?self.names, not_after = ?issued.not_after, "certificate API serving a new certificate");
        Ok(())
    }
}

/// Hands every handshake the current certificate.
#[derive(Debug)]
struct Resolver(RwLock<Option<Arc<CertifiedKey>>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok()?.clone()
    }
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        labels: Some(BTreeMap::from([(
            "app.kubernetes.io/part-of".to_owned(),
            "bkpool".to_owned(),
        )])),
        ..ObjectMeta::default()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
