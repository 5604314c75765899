//! Fixtures for the data plane's tests, examples and benches: a CA, a `localhost` server
//! certificate signed by it, and client and server configurations over loopback.

use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

/// TLS on both ends of a loopback pair, trusting one throwaway CA.
#[derive(Clone)]
pub struct LoopbackTls {
    pub acceptor: TlsAcceptor,
    pub connector: TlsConnector,
}

impl LoopbackTls {
    pub fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let ca = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().expect("server key");
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .expect("server params")
            .signed_by(&key, &ca)
            .expect("server certificate");
        let key_der =
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key DER");
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key_der)
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).expect("CA as root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self {
            acceptor: Arc::new(server).into(),
            connector: Arc::new(client).into(),
        }
    }

    /// Runs the handshake over a connected pair: `near` is the TLS client.
    pub async fn wrap(
        &self,
        near: TcpStream,
        far: TcpStream,
    ) -> (client::TlsStream<TcpStream>, server::TlsStream<TcpStream>) {
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let (near, far) = tokio::join!(
            self.connector.connect(name, near),
            self.acceptor.accept(far)
        );
        (
            near.expect("client handshake"),
            far.expect("server handshake"),
        )
    }
}

impl Default for LoopbackTls {
    fn default() -> Self {
        Self::new()
    }
}
