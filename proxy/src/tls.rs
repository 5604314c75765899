//! TLS for terminate mode: loading and checking certificate material, choosing the server
//! certificate by SNI, and verifying each client certificate against **its own pool's** CA.
//!
//! The pool is named by the client certificate (its `bkpool://` URI SAN), not by SNI: clients
//! that connect by IP send no SNI. One listener serves every pool, so the verifier reads the
//! pool from the certificate first and then verifies the chain with that pool's verifier only;
//! a certificate issued by pool A's CA that names pool B fails B's verifier.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    ServerConfig,
};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identify::{IdentifyError, identify_with_validity};
use crate::names::PoolId;
use crate::verified::Verified;

/// ALPN protocols the gateway selects from: gRPC clients need `h2`.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Faults in certificate material, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("{path}: the private key does not match the certificate")]
    KeyMismatch { path: PathBuf },
    #[error("{path}: certificate expired or not yet valid (valid {not_before} to {not_after})")]
    Validity {
        path: PathBuf,
        not_before: String,
        not_after: String,
    },
    #[error("no server certificate configured")]
    NoServerCert,
    #[error(
        "{path}: CA {subject} of pool {pool} is also in pool {other}'s client CA bundle \
         ({other_path}): a CA shared by two pools signs certificates for both, so each pool \
         needs its own"
    )]
    SharedCa {
        subject: String,
        pool: PoolId,
        path: PathBuf,
        other: PoolId,
        other_path: PathBuf,
    },
    #[error("building the TLS configuration: {0}")]
    Build(String),
}

/// A server certificate with the names it answers for.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub key: Arc<CertifiedKey>,
    /// Lowercase DNS names (`*.example.com` wildcards included) from the certificate's SANs.
    pub names: Vec<String>,
}

/// Loads a certificate chain and its key and checks them: the key matches, the leaf is valid
/// now, and each certificate is issued by the next one in the chain.
pub fn load_server_cert(cert_path: &Path, key_path: &Path) -> Result<ServerCert, TlsError> {
    server_cert_from_pem(&read(cert_path)?, cert_path, &read(key_path)?, key_path)
}

/// [`load_server_cert`] for material already in memory (a Kubernetes Secret, say); the paths
/// only name where it came from in errors.
pub fn server_cert_from_pem(
    cert_pem: &[u8],
    cert_path: &Path,
    key_pem: &[u8],
    key_path: &Path,
) -> Result<ServerCert, TlsError> {
    let chain = certs_from_pem(cert_pem, cert_path)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Invalid {
        path: key_path.into(),
        what: format!("no usable private key: {e}"),
    })?;
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Invalid {
            path: key_path.into(),
            what: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain.clone(), signer);
    certified.keys_match().map_err(|_| TlsError::KeyMismatch {
        path: key_path.into(),
    })?;
    let mut names = Vec::new();
    for (i, der) in chain.iter().enumerate() {
        let cert = parse(cert_path, der)?;
        if i == 0 {
            check_validity(cert_path, &cert)?;
            names = dns_names(&cert);
        }
        if let Some(issuer) = chain.get(i + 1) {
            let issuer = parse(cert_path, issuer)?;
            if cert.verify_signature(Some(issuer.public_key())).is_err() {
                let what = format!(
                    "certificate {i} of the chain is not signed by certificate {}",
                    i + 1
                );
                return Err(TlsError::Invalid {
                    path: cert_path.into(),
                    what,
                });
            }
        }
    }
    Ok(ServerCert {
        key: Arc::new(certified),
        names,
    })
}

/// Loads a CA bundle: every certificate a CA, the ones valid now (at least one).
pub fn load_ca_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    ca_bundle_from_pem(&read(path)?, path)
}

/// [`load_ca_bundle`] for PEM already in memory; `path` names its origin in errors.
///
/// A bundle that rotates carries the CA being replaced until it expires, and whoever prunes
/// it may be late (the operator requeues at the expiry, but may be down): an expired CA is
/// left out, not a reason to refuse the bundle and with it the pool. A CA not valid yet stays
/// (a successor published ahead; the bundle may not be read again when it becomes valid).
/// Only a bundle with no CA valid now is refused.
pub fn ca_bundle_from_pem(
    pem: &[u8],
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = certs_from_pem(pem, path)?;
    let mut kept = Vec::with_capacity(certs.len());
    let mut fault = None;
    let mut valid_now = false;
    for der in certs {
        let cert = parse(path, &der)?;
        if !cert.is_ca() {
            let what = format!("{} is not a CA certificate", cert.subject());
            return Err(TlsError::Invalid {
                path: path.into(),
                what,
            });
        }
        match check_validity(path, &cert) {
            Ok(()) => valid_now = true,
            Err(e) if cert.validity().not_after.timestamp() < unix_now() => {
                tracing::debug!(path = %path.display(), subject = %cert.subject(), "expired CA left out of the bundle");
                fault = Some(e);
                continue;
            }
            Err(e) => fault = Some(e),
        }
        kept.push(der);
    }
    match (valid_now, fault) {
        (false, Some(fault)) => Err(fault),
        _ => Ok(kept),
    }
}

/// Builds the terminate-mode server configuration from server certificates (the first is the
/// default) and each pool's client CA bundle.
pub fn server_config(
    server_certs: &[ServerCert],
    pool_cas: &HashMap<PoolId, Vec<CertificateDer<'static>>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let resolver = SniResolver::new(server_certs)?;
    let mut config = ServerConfig::builder_with_provider(server_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Build(e.to_string()))?
        .with_client_cert_verifier(client_verifier(pool_cas)?)
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    // Our preference, not the client's: AES-128-GCM with SHA-256 first (see server_provider).
    config.ignore_client_order = true;
    // No session is ever resumed. A resumed session skips client certificate verification
    // and restores the certificate of the session it resumes: its validity window and the
    // pool's CA at that time. A certificate's short lifetime is the only revocation bkpool
    // has, so every handshake must verify the certificate against the pool's current CAs.
    // Nothing of value is lost: BuildKit's Go clients (grpc-go, buildx) keep no TLS session
    // cache, so neither TLS 1.3 tickets nor TLS 1.2 session IDs would ever be used.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    // (The default ticketer issues no stateless tickets either; a test checks all three.)
    Ok(Arc::new(config))
}

/// The first CA found in two of `bundles`: its subject and the two bundles' indexes.
///
/// CAs are compared by public key, not by certificate: a CA re-issued with the same key (a
/// new validity, another name) is the same signer. Pools are isolated by their CAs alone, so
/// whoever holds a CA shared by pools A and B can sign a certificate naming either.
pub fn shared_ca(bundles: &[&[CertificateDer<'_>]]) -> Option<(String, usize, usize)> {
    let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
    for (i, bundle) in bundles.iter().enumerate() {
        for der in bundle.iter() {
            let Ok((_, cert)) = X509Certificate::from_der(der) else {
                continue; // refused when the bundle was loaded
            };
            let key = cert.public_key().raw.to_vec();
            match seen.get(&key) {
                Some(&first) if first != i => return Some((cert.subject().to_string(), first, i)),
                _ => {
                    seen.insert(key, i);
                }
            }
        }
    }
    None
}

/// The client-certificate verifier terminate mode uses: each certificate is checked against
/// the CA of the pool it names, and only that one.
pub fn client_verifier(
    pool_cas: &HashMap<PoolId, Vec<CertificateDer<'static>>>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    Ok(Arc::new(PoolVerifier::new(pool_cas)?))
}

/// The provider for the gateway's server side: aws-lc-rs with AES-128-GCM suites preferred.
/// They are what TLS 1.3 requires every client to support, their SHA-256 key schedule is
/// cheaper per handshake than SHA-384, and AES-128 moves bulk bytes with fewer rounds than
/// AES-256; the others stay available for clients that offer nothing else.
fn server_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.sort_by_key(|suite| {
        use rustls::CipherSuite::*;
        !matches!(
            suite.suite(),
            TLS13_AES_128_GCM_SHA256
                | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(provider)
}

/// The crypto provider everything in the gateway uses (aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Why a client certificate was refused beyond what webpki reports: the pool it names.
#[derive(Debug, thiserror::Error)]
pub enum PoolAuthError {
    #[error("{0}")]
    Identify(#[from] IdentifyError),
    #[error("certificate names pool {0}, which is not served here in terminate mode")]
    UnknownPool(PoolId),
}

impl PoolAuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Identify(_) => "cert_no_pool",
            Self::UnknownPool(_) => "cert_unknown_pool",
        }
    }
}

/// Chooses the server certificate by SNI, falling back to the first (clients that connect by
/// IP address send no SNI).
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    fn new(certs: &[ServerCert]) -> Result<Self, TlsError> {
        let default = certs.first().ok_or(TlsError::NoServerCert)?.key.clone();
        let (mut exact, mut wildcard) = (HashMap::new(), HashMap::new());
        for cert in certs {
            for name in &cert.names {
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard
                        .entry(parent.to_string())
                        .or_insert_with(|| cert.key.clone()),
                    None => exact
                        .entry(name.clone())
                        .or_insert_with(|| cert.key.clone()),
                };
            }
        }
        Ok(Self {
            exact,
            wildcard,
            default,
        })
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(sni) = hello.server_name() else {
            return Some(self.default.clone());
        };
        let sni = sni.to_ascii_lowercase();
        let by_wildcard = || {
            sni.split_once('.')
                .and_then(|(_, parent)| self.wildcard.get(parent))
        };
        Some(
            self.exact
                .get(&sni)
                .or_else(by_wildcard)
                .unwrap_or(&self.default)
                .clone(),
        )
    }
}

/// Verifies a client certificate with the verifier of the pool it names, and only that one.
#[derive(Debug)]
struct PoolVerifier {
    pools: HashMap<PoolId, Arc<dyn ClientCertVerifier>>,
    /// Every pool's CA subject. Go clients (buildctl) only send a certificate whose issuer is
    /// among these names (or when the list is empty), so it must name all pools or none.
    hints: Vec<DistinguishedName>,
    provider: Arc<CryptoProvider>,
    /// Each pool's CAs' common validity window (Unix seconds): a memo never outlives it.
    ca_validity: HashMap<PoolId, (i64, i64)>,
    verified: Verified,
}

impl PoolVerifier {
    fn new(pool_cas: &HashMap<PoolId, Vec<CertificateDer<'static>>>) -> Result<Self, TlsError> {
        let provider = provider();
        let mut pools = HashMap::new();
        let mut hints = Vec::new();
        let mut ca_validity = HashMap::new();
        for (pool, cas) in pool_cas {
            let mut roots = RootCertStore::empty();
            for ca in cas {
                roots
                    .add(ca.clone())
                    .map_err(|e| TlsError::Build(format!("client CA of {pool}: {e}")))?;
            }
            hints.extend(roots.subjects());
            ca_validity.insert(pool.clone(), common_validity(cas));
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Build(format!("client CA of {pool}: {e}")))?;
            pools.insert(pool.clone(), verifier);
        }
        Ok(Self {
            pools,
            hints,
            provider,
            ca_validity,
            verified: Verified::default(),
        })
    }
}

impl ClientCertVerifier for PoolVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let refuse = |e: PoolAuthError| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        };
        if self.verified.lookup(end_entity, now).is_some() {
            return Ok(ClientCertVerified::assertion());
        }
        let (peer, (not_before, not_after)) =
            identify_with_validity(end_entity).map_err(|e| refuse(e.into()))?;
        let verifier = self
            .pools
            .get(&peer.pool)
            .ok_or_else(|| refuse(PoolAuthError::UnknownPool(peer.pool.clone())))?;
        let verified = verifier.verify_client_cert(end_entity, intermediates, now)?;
        let (ca_from, ca_until) = self
            .ca_validity
            .get(&peer.pool)
            .copied()
            .unwrap_or((i64::MAX, 0));
        let window = (not_before.max(ca_from), not_after.min(ca_until));
        if window.0 >= 0 && window.0 <= window.1 {
            self.verified
                .remember(end_entity, peer.pool, window.0 as u64, window.1 as u64);
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Maps a failed handshake to a fixed metric label.
pub fn handshake_reason(error: &std::io::Error) -> &'static str {
    use std::io::ErrorKind;
    let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return match error.kind() {
            ErrorKind::UnexpectedEof => "client_closed",
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => "client_reset",
            _ => "io_error",
        };
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "no_client_cert",
        rustls::Error::InvalidCertificate(e) => cert_reason(e),
        rustls::Error::AlertReceived(_) => "client_alert",
        rustls::Error::PeerIncompatible(_) | rustls::Error::NoApplicationProtocol => {
            "tls_incompatible"
        }
        _ => "tls_protocol",
    }
}

fn cert_reason(e: &CertificateError) -> &'static str {
    match e {
        CertificateError::Expired
        | CertificateError::ExpiredContext { .. }
        | CertificateError::NotValidYet
        | CertificateError::NotValidYetContext { .. } => "cert_expired",
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "cert_purpose"
        }
        CertificateError::Revoked => "cert_revoked",
        CertificateError::Other(OtherError(inner)) => inner
            .downcast_ref::<PoolAuthError>()
            .map_or("cert_invalid", PoolAuthError::reason),
        CertificateError::UnknownIssuer | CertificateError::BadSignature => "cert_untrusted",
        _ => "cert_invalid",
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

fn certs_from_pem(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    let certs = certs.map_err(|e| TlsError::Invalid {
        path: path.into(),
        what: format!("bad PEM: {e}"),
    })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.into() });
    }
    Ok(certs)
}

fn parse<'a>(path: &Path, der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, TlsError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| TlsError::Invalid {
            path: path.into(),
            what: format!("not an X.509 certificate: {e}"),
        })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn check_validity(path: &Path, cert: &X509Certificate<'_>) -> Result<(), TlsError> {
    let now = unix_now();
    let v = cert.validity();
    if now < v.not_before.timestamp() || now > v.not_after.timestamp() {
        return Err(TlsError::Validity {
            path: path.into(),
            not_before: v.not_before.to_string(),
            not_after: v.not_after.to_string(),
        });
    }
    Ok(())
}

/// The window in which every certificate of a CA bundle is valid, in Unix seconds.
fn common_validity(cas: &[CertificateDer<'_>]) -> (i64, i64) {
    cas.iter().fold(
        (i64::MIN, i64::MAX),
        |(from, until), der| match X509Certificate::from_der(der) {
            Ok((_, ca)) => (
                from.max(ca.validity().not_before.timestamp()),
                until.min(ca.validity().not_after.timestamp()),
            ),
            Err(_) => (i64::MAX, i64::MIN),
        },
    )
}

fn dns_names(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// A client configuration for the backend leg: trusts `ca` and presents `cert`/`key`; offers
/// `h2` (buildkitd serves gRPC).
pub fn backend_client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    backend_client_config_from_pem((&read(ca)?, ca), (&read(cert)?, cert), (&read(key)?, key))
}

/// [`backend_client_config`] for PEM already in memory, each with the path naming its origin.
pub fn backend_client_config_from_pem(
    (ca_pem, ca): (&[u8], &Path),
    (cert_pem, cert): (&[u8], &Path),
    (key_pem, key): (&[u8], &Path),
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for der in ca_bundle_from_pem(ca_pem, ca)? {
        roots.add(der).map_err(|e| TlsError::Invalid {
            path: ca.into(),
            what: e.to_string(),
        })?;
    }
    let pair = server_cert_from_pem(cert_pem, cert, key_pem, key)?;
    let chain = pair.key.cert.clone();
    let key_der = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Invalid {
        path: key.into(),
        what: format!("no usable private key: {e}"),
    })?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Build(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key_der)
        .map_err(|e| TlsError::Build(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    use super::*;

    /// A self-signed CA valid from `from` until `until` (relative to now), as PEM, and its
    /// issuer.
    fn ca(name: &str, from: i64, until: i64) -> (String, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let now = SystemTime::now();
        let at = |secs: i64| match secs {
            s if s < 0 => now - Duration::from_secs(s.unsigned_abs()),
            s => now + Duration::from_secs(s as u64),
        };
        params.not_before = at(from).into();
        params.not_after = at(until).into();
        let pem = params.self_signed(&key).unwrap().pem();
        (pem, Issuer::new(params, key))
    }

    fn server_cert(issuer: &Issuer<'static, KeyPair>) -> ServerCert {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, issuer)
            .unwrap();
        let path = Path::new("server");
        server_cert_from_pem(
            cert.pem().as_bytes(),
            path,
            key.serialize_pem().as_bytes(),
            path,
        )
        .unwrap()
    }

    #[test]
    fn a_bundle_leaves_out_expired_cas_and_is_refused_only_without_a_valid_one() {
        let (expired, _) = ca("predecessor", -7200, -3600);
        let (current, _) = ca("current", -60, 3600);
        let (successor, _) = ca("successor", 600, 7200);
        let path = Path::new("ca.crt");
        let bundle = format!("{current}{expired}{successor}");
        let cas = ca_bundle_from_pem(bundle.as_bytes(), path).unwrap();
        let names: Vec<String> = cas
            .iter()
            .map(|der| {
                X509Certificate::from_der(der)
                    .unwrap()
                    .1
                    .subject()
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            ["CN=current", "CN=successor"],
            "the expired CA is left out"
        );
        for alone in [expired, successor] {
            let err = ca_bundle_from_pem(alone.as_bytes(), path).unwrap_err();
            assert!(matches!(err, TlsError::Validity { .. }), "{err}");
        }
    }

    #[test]
    fn the_terminate_configuration_never_resumes_a_session() {
        let (_, issuer) = ca("server CA", -60, 3600);
        let (client_ca, _) = ca("client CA", -60, 3600);
        let cas = HashMap::from([(
            "a".parse().unwrap(),
            ca_bundle_from_pem(client_ca.as_bytes(), Path::new("ca")).unwrap(),
        )]);
        let config = server_config(&[server_cert(&issuer)], &cas).unwrap();
        assert!(
            !config.session_storage.can_cache(),
            "TLS 1.2 session IDs and TLS 1.3 stateful tickets"
        );
        assert!(!config.ticketer.enabled(), "stateless tickets");
        assert_eq!(config.send_tls13_tickets, 0);
    }
}
