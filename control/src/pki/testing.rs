//! Certificates for tests, good and deliberately bad, written to a temporary directory laid
//! out exactly like a real local PKI.
//!
//! ```ignore
//! let pki = TestPki::new().pool("a").pool("b");
//! let alice = pki.client("a", "alice");
//! let config = alice.config(&[b"h2"]);               // trusts the gateway, presents alice
//! let intruder = pki.client_for_pool_signed_by("a", "b", "mallory"); // names b, signed by a
//! ```
//!
//! Pools are named as on the command line: `"a"` is `local/a`, `"ci/a"` is `ci/a`. Helpers
//! panic on failure, with a message saying what failed: a test fixture has no caller to
//! return an error to.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proxy::names::{ClientIdentity, PoolId};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tempfile::TempDir;

use super::{Ca, Eku, IssueOptions, IssuedCert, LocalPki, write_tls_dir};

/// How long test client certificates live.
pub const TEST_TTL: Duration = Duration::from_secs(3600);

/// A local PKI in a temporary directory (removed on drop).
pub struct TestPki {
    dir: TempDir,
    pki: LocalPki,
    server_names: Vec<String>,
}

/// A client certificate with its key, and the CA that the client trusts for the gateway.
#[derive(Debug, Clone)]
pub struct TestClient {
    pub cert_pem: String,
    pub key_pem: String,
    /// The gateway's server CA, which the client trusts.
    pub server_ca_pem: String,
    pub issued: IssuedCert,
}

impl TestPki {
    /// An empty local PKI: gateway server CA and certificate, backend CA, no pools yet.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("create a temporary PKI directory");
        let pki = LocalPki::open_or_init(dir.path(), &[], &[]).expect("initialise the test PKI");
        let server_names = Vec::new();
        Self {
            dir,
            pki,
            server_names,
        }
    }

    /// Adds `pool` and its client CA.
    pub fn pool(mut self, pool: &str) -> Self {
        let pool = pool_id(pool);
        self.pki
            .add_pool(&pool)
            .expect("create the pool's client CA");
        self
    }

    /// Adds a name (DNS or IP) to the gateway server certificate.
    pub fn server_name(mut self, name: &str) -> Self {
        self.server_names.push(name.to_owned());
        let now = std::time::SystemTime::now();
        let pki = &self.pki;
        pki.ensure_server_cert(&self.server_names, now)
            .expect("reissue the server certificate");
        self
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn local(&self) -> &LocalPki {
        &self.pki
    }

    /// The CA clients trust for the gateway, PEM.
    pub fn server_ca_pem(&self) -> &str {
        self.pki.gateway_ca().cert_pem()
    }

    pub fn server_ca_path(&self) -> PathBuf {
        self.pki.gateway_ca_path()
    }

    pub fn server_cert_path(&self) -> PathBuf {
        self.pki.server_cert_path()
    }

    pub fn server_key_path(&self) -> PathBuf {
        self.pki.server_key_path()
    }

    pub fn server_cert_pem(&self) -> String {
        read(&self.server_cert_path())
    }

    pub fn server_key_pem(&self) -> String {
        read(&self.server_key_path())
    }

    /// `pool`'s client CA (the pool must have been added).
    pub fn client_ca(&self, pool: &str) -> &Ca {
        let id = pool_id(pool);
        let ca = self.pki.pool_ca(&id);
        ca.unwrap_or_else(|| panic!("pool {id} was not added to the TestPki"))
    }

    pub fn client_ca_path(&self, pool: &str) -> PathBuf {
        self.pki.pool_ca_path(&pool_id(pool))
    }

    /// A good client certificate for `identity` in `pool`.
    pub fn client(&self, pool: &str, identity: &str) -> TestClient {
        self.client_with(pool, pool, identity, IssueOptions::new())
    }

    /// Expired an hour ago; otherwise good.
    pub fn expired_client(&self, pool: &str, identity: &str) -> TestClient {
        self.client_with(pool, pool, identity, IssueOptions::new().expired())
    }

    /// Valid only from an hour from now; otherwise good.
    pub fn not_yet_valid_client(&self, pool: &str, identity: &str) -> TestClient {
        self.client_with(pool, pool, identity, IssueOptions::new().not_yet_valid())
    }

    /// Names `pool` correctly but is signed by a CA nobody trusts.
    pub fn client_from_other_ca(&self, pool: &str, identity: &str) -> TestClient {
        let stranger = Ca::generate("unrelated CA", TEST_TTL).expect("generate an unrelated CA");
        let issued = stranger
            .issue_client(&pool_id(pool), &client_identity(identity), TEST_TTL)
            .expect("issue a client certificate from an unrelated CA");
        self.test_client(issued)
    }

    /// Signed by the pool's CA but for serverAuth only.
    pub fn client_without_client_auth_eku(&self, pool: &str, identity: &str) -> TestClient {
        let options = IssueOptions::new().ekus(&[Eku::ServerAuth]);
        self.client_with(pool, pool, identity, options)
    }

    /// Names pool `named` but is signed by pool `signer`'s CA: must open neither.
    pub fn client_for_pool_signed_by(
        &self,
        signer: &str,
        named: &str,
        identity: &str,
    ) -> TestClient {
        self.client_with(signer, named, identity, IssueOptions::new())
    }

    /// Carries a second `bkpool://` URI naming `other`: a certificate naming two pools
    /// names none.
    pub fn client_naming_two_pools(&self, pool: &str, other: &str, identity: &str) -> TestClient {
        let id = client_identity(identity);
        let uri = proxy::identify::uri_san(&pool_id(other), &id);
        self.client_with(pool, pool, identity, IssueOptions::new().extra_uri(&uri))
    }

    /// The general form: signed by `signer`'s CA, naming `named`, with `options`.
    pub fn client_with(
        &self,
        signer: &str,
        named: &str,
        identity: &str,
        options: IssueOptions,
    ) -> TestClient {
        let issued = self
            .client_ca(signer)
            .issue_client_with(
                &pool_id(named),
                &client_identity(identity),
                TEST_TTL,
                &options,
            )
            .expect("issue a test client certificate");
        self.test_client(issued)
    }

    /// A buildkitd server certificate for the mTLS backend leg, from the backend CA.
    pub fn backend_server(&self, names: &[&str]) -> IssuedCert {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let ca = self.pki.backend_ca();
        ca.issue_server(&names, TEST_TTL)
            .expect("issue a backend server certificate")
    }

    /// The gateway's client certificate for the mTLS backend leg, from the backend CA.
    pub fn backend_client(&self) -> IssuedCert {
        let ca = self.pki.backend_ca();
        ca.issue_client_named("bkpool gateway", TEST_TTL)
            .expect("issue a backend client certificate")
    }

    /// A client configuration that trusts the gateway but presents no certificate.
    pub fn anonymous_config(&self, alpn: &[&[u8]]) -> ClientConfig {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("default TLS versions")
            .with_root_certificates(roots(self.server_ca_pem()))
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }

    /// A verifier accepting only `pool`'s client certificates (what the gateway enforces
    /// per pool), for tests that check a certificate without a connection.
    pub fn client_verifier(&self, pool: &str) -> Arc<dyn ClientCertVerifier> {
        client_verifier(self.client_ca(pool))
    }

    /// A server configuration with the gateway certificate, requiring `pool`'s client
    /// certificates, offering `alpn`.
    pub fn server_config(&self, pool: &str, alpn: &[&[u8]]) -> ServerConfig {
        let chain = vec![der_of(&self.server_cert_pem())];
        let key = PrivateKeyDer::from_pem_slice(self.server_key_pem().as_bytes())
            .expect("server key PEM");
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("default TLS versions")
            .with_client_cert_verifier(self.client_verifier(pool))
            .with_single_cert(chain, key)
            .expect("server certificate and key match");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }

    fn test_client(&self, issued: IssuedCert) -> TestClient {
        TestClient {
            cert_pem: issued.cert_pem.clone(),
            key_pem: issued.key_pem.clone().expect("issued with a key"),
            server_ca_pem: self.server_ca_pem().to_owned(),
            issued,
        }
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestClient {
    /// A client configuration that trusts the gateway, presents this certificate and
    /// offers `alpn` (buildctl offers `h2`).
    pub fn config(&self, alpn: &[&[u8]]) -> ClientConfig {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("default TLS versions")
            .with_root_certificates(roots(&self.server_ca_pem))
            .with_client_auth_cert(self.chain_der(), self.key_der())
            .expect("client certificate and key match");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }

    /// As [`TestClient::config`], shared.
    pub fn arc_config(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        Arc::new(self.config(alpn))
    }

    /// The certificate as the client presents it (the leaf alone).
    pub fn chain_der(&self) -> Vec<CertificateDer<'static>> {
        vec![self.issued.cert_der().clone()]
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("client key PEM")
    }

    /// Writes `ca.pem`, `cert.pem`, `key.pem` into `dir` for `buildctl --tlsdir`.
    pub fn write_tls_dir(&self, dir: &Path) {
        write_tls_dir(dir, &self.server_ca_pem, &self.cert_pem, &self.key_pem)
            .expect("write the TLS directory");
    }
}

/// A verifier accepting client certificates issued by `ca`, built as the gateway builds
/// its per-pool verifiers.
pub fn client_verifier(ca: &Ca) -> Arc<dyn ClientCertVerifier> {
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca.cert_pem())), provider())
        .build()
        .expect("build a client verifier")
}

/// A verifier for server certificates issued by `ca`.
pub fn server_verifier(ca: &Ca) -> Arc<WebPkiServerVerifier> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots(ca.cert_pem())), provider())
        .build()
        .expect("build a server verifier")
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots(ca_pem: &str) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    roots.add(der_of(ca_pem)).expect("trust anchor");
    roots
}

fn der_of(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("certificate PEM")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn pool_id(pool: &str) -> PoolId {
    pool.parse()
        .unwrap_or_else(|e| panic!("pool {pool:?}: {e}"))
}

fn client_identity(identity: &str) -> ClientIdentity {
    ClientIdentity::new(identity).unwrap_or_else(|e| panic!("identity {identity:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use rustls::{ClientConnection, ServerConnection};

    use super::*;

    /// Runs a TLS handshake between the two configurations over memory; returns the ALPN
    /// protocol the server chose, or the first error either side hit.
    fn handshake(
        client: ClientConfig,
        server: ServerConfig,
    ) -> Result<Option<Vec<u8>>, rustls::Error> {
        let name = "localhost".try_into().expect("server name");
        let mut client = ClientConnection::new(Arc::new(client), name)?;
        let mut server = ServerConnection::new(Arc::new(server))?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).expect("memory write");
            server.read_tls(&mut buf.as_slice()).expect("memory read");
            server.process_new_packets()?;
            buf.clear();
            server.write_tls(&mut buf).expect("memory write");
            client.read_tls(&mut buf.as_slice()).expect("memory read");
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(server.alpn_protocol().map(<[u8]>::to_vec));
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn a_good_client_completes_an_mtls_handshake_with_h2() {
        let pki = TestPki::new().pool("a");
        let alpn = handshake(
            pki.client("a", "alice").config(&[b"h2"]),
            pki.server_config("a", &[b"h2"]),
        );
        assert_eq!(alpn.unwrap().as_deref(), Some(&b"h2"[..]));
    }

    #[test]
    fn bad_clients_are_refused_by_the_pool_they_target() {
        let pki = TestPki::new().pool("a").pool("b");
        let refused = [
            ("expired", pki.expired_client("a", "alice")),
            ("not yet valid", pki.not_yet_valid_client("a", "alice")),
            ("other CA", pki.client_from_other_ca("a", "alice")),
            (
                "no clientAuth",
                pki.client_without_client_auth_eku("a", "alice"),
            ),
            ("pool b's CA", pki.client("b", "alice")),
        ];
        for (what, client) in refused {
            let result = handshake(client.config(&[b"h2"]), pki.server_config("a", &[b"h2"]));
            assert!(result.is_err(), "{what}: accepted");
        }
        let anonymous = handshake(
            pki.anonymous_config(&[b"h2"]),
            pki.server_config("a", &[b"h2"]),
        );
        assert!(
            anonymous.is_err(),
            "a client without a certificate was accepted"
        );
    }

    #[test]
    fn a_cert_naming_pool_b_signed_by_pool_a_names_b_but_chains_to_a() {
        let pki = TestPki::new().pool("a").pool("b");
        let client = pki.client_for_pool_signed_by("a", "b", "mallory");
        let peer = proxy::identify::identify(client.issued.cert_der()).unwrap();
        assert_eq!(peer.pool.as_str(), "local/b");
        let now = rustls::pki_types::UnixTime::now();
        let (cert, verifier_b) = (client.issued.cert_der(), pki.client_verifier("b"));
        assert!(verifier_b.verify_client_cert(cert, &[], now).is_err());
    }

    #[test]
    fn two_pool_uris_name_no_pool() {
        let pki = TestPki::new().pool("a").pool("b");
        let client = pki.client_naming_two_pools("a", "b", "alice");
        let err = proxy::identify::identify(client.issued.cert_der()).unwrap_err();
        assert_eq!(err, proxy::identify::IdentifyError::SeveralPoolUris);
    }

    #[test]
    fn backend_certs_chain_to_the_backend_ca_and_not_to_client_cas() {
        let pki = TestPki::new().pool("a");
        let now = rustls::pki_types::UnixTime::now();
        let gateway = pki.backend_client();
        let backend_verifier = client_verifier(pki.local().backend_ca());
        backend_verifier
            .verify_client_cert(gateway.cert_der(), &[], now)
            .unwrap();
        // A pool's client certificate cannot reach buildkitd directly.
        let alice = pki.client("a", "alice");
        assert!(
            backend_verifier
                .verify_client_cert(alice.issued.cert_der(), &[], now)
                .is_err()
        );
        let server = pki.backend_server(&["127.0.0.1"]);
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let verifier = server_verifier(pki.local().backend_ca());
        use rustls::client::danger::ServerCertVerifier;
        verifier
            .verify_server_cert(server.cert_der(), &[], &name, &[], now)
            .unwrap();
    }

    #[test]
    fn clients_write_a_buildctl_tls_dir() {
        let pki = TestPki::new().pool("a");
        let out = pki.dir().join("tls/alice");
        let client = pki.client("a", "alice");
        client.write_tls_dir(&out);
        let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap();
        assert_eq!(read("ca.pem"), pki.server_ca_pem());
        assert_eq!(read("cert.pem"), client.cert_pem);
        assert_eq!(read("key.pem"), client.key_pem);
    }
}
