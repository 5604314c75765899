//! Client-side TLS for the load: a rustls `ClientConfig` with client auth and
//! resumption off (every connection pays a full handshake, as in the
//! handshake scenario), and a real ClientHello rendered into a buffer for
//! the passthrough scenario.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

/// TLS options shared by every client subcommand.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// Speak TLS to the target (terminating proxies).
    #[arg(long)]
    pub tls: bool,
    /// CA bundle that signed the proxy's server certificate.
    #[arg(long, requires = "tls")]
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM).
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Server name to send and verify (also the passthrough ClientHello's SNI).
    #[arg(long, default_value = "bench.example")]
    pub sni: String,
    /// Offer ALPN h2, as BuildKit's grpc-go client does.
    #[arg(long)]
    pub alpn_h2: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("--tls needs --ca")]
    MissingCa,
    #[error("reading {path}: {source}")]
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid server name {0:?}")]
    ServerName(String),
}

/// What a TLS client needs per connection: the shared config and the name.
#[derive(Clone)]
pub struct TlsClient {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl TlsArgs {
    /// `None` when the target speaks plain TCP.
    pub fn client(&self) -> Result<Option<TlsClient>, TlsSetupError> {
        if !self.tls {
            return Ok(None);
        }
        let ca = self.ca.as_deref().ok_or(TlsSetupError::MissingCa)?;
        let mut roots = RootCertStore::empty();
        for cert in read_certs(ca)? {
            roots.add(cert)?;
        }
        let builder = ClientConfig::builder().with_root_certificates(roots);
        let mut config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                builder.with_client_auth_cert(read_certs(cert)?, read_key(key)?)?
            }
            _ => builder.with_no_client_auth(),
        };
        config.resumption = rustls::client::Resumption::disabled();
        if self.alpn_h2 {
            config.alpn_protocols = vec![b"h2".to_vec()];
        }
        Ok(Some(TlsClient {
            config: Arc::new(config),
            server_name: server_name(&self.sni)?,
        }))
    }
}

/// One TLS record holding a real ClientHello for `sni`, as a client would
/// send it first. The passthrough proxies route on it; the backend with
/// `--skip-client-hello` discards it.
pub fn client_hello(sni: &str) -> Result<Vec<u8>, TlsSetupError> {
    let config = ClientConfig::builder()
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    let mut conn = ClientConnection::new(Arc::new(config), server_name(sni)?)?;
    let mut hello = Vec::new();
    while conn.wants_write() {
        // Writing into a Vec cannot fail.
        let _ = conn.write_tls(&mut hello);
    }
    Ok(hello)
}

fn server_name(sni: &str) -> Result<ServerName<'static>, TlsSetupError> {
    ServerName::try_from(sni.to_owned()).map_err(|_| TlsSetupError::ServerName(sni.to_owned()))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect())
        .map_err(|source| pem_error(path, source))
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| pem_error(path, source))
}

fn pem_error(path: &Path, source: rustls::pki_types::pem::Error) -> TlsSetupError {
    TlsSetupError::Pem {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_hello_is_one_handshake_record() {
        let hello = client_hello("bench.example").unwrap();
        assert_eq!(hello[0], 0x16, "handshake record");
        let len = u16::from_be_bytes([hello[3], hello[4]]) as usize;
        assert_eq!(hello.len(), 5 + len, "exactly one record");
        assert!(hello.windows(13).any(|w| w == b"bench.example"));
    }
}
