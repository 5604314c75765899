//! The connect step: dial a backend, falling back to the next candidate when one is down or
//! slow, and (when the pool asks for it) wrap the backend leg in mTLS.

use std::io;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::names::BackendAddr;
use crate::relay;
use crate::route::{BackendLoad, BackendTlsClient, Candidate};

/// Why no backend could be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no backend of {tried} answered; last: {addr}: {source}")]
    Unreachable {
        tried: usize,
        addr: BackendAddr,
        source: io::Error,
    },
    #[error("no backend of {tried} answered within {timeout:?}")]
    Timeout { tried: usize, timeout: Duration },
    #[error("TLS to backend {addr}: {source}")]
    Tls {
        addr: BackendAddr,
        source: io::Error,
    },
}

impl ConnectError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "backend_unreachable",
            Self::Timeout { .. } => "backend_timeout",
            Self::Tls { .. } => "backend_tls",
        }
    }
}

/// A connected backend leg and the load mark of the backend it reached.
#[derive(Debug)]
pub struct Connected {
    pub tcp: TcpStream,
    pub addr: BackendAddr,
    pub load: BackendLoad,
}

/// Tries each candidate in order, each within `timeout`.
pub async fn dial(candidates: &[Candidate], timeout: Duration) -> Result<Connected, ConnectError> {
    let mut last = None;
    for candidate in candidates {
        let load = candidate.engage();
        match tokio::time::timeout(timeout, TcpStream::connect(candidate.addr.0)).await {
            Ok(Ok(tcp)) => {
                if let Err(e) = relay::tune(&tcp) {
                    tracing::debug!(error = %e, "socket options not set");
                }
                return Ok(Connected {
                    tcp,
                    addr: candidate.addr,
                    load,
                });
            }
            Ok(Err(source)) => {
                load.failed();
                tracing::debug!(backend = %candidate.addr, error = %source, "backend refused; trying the next");
                last = Some((candidate.addr, Some(source)));
            }
            Err(_) => {
                load.failed();
                tracing::debug!(backend = %candidate.addr, ?timeout, "backend connect timed out; trying the next");
                last = Some((candidate.addr, None));
            }
        }
    }
    let tried = candidates.len();
    Err(match last {
        Some((addr, Some(source))) => ConnectError::Unreachable {
            tried,
            addr,
            source,
        },
        _ => ConnectError::Timeout { tried, timeout },
    })
}

/// Wraps a connected backend leg in TLS with the pool's backend client certificate.
pub async fn secure(
    tcp: TcpStream,
    addr: BackendAddr,
    tls: &BackendTlsClient,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, ConnectError> {
    let name = tls
        .server_name
        .clone()
        .unwrap_or_else(|| ServerName::IpAddress(addr.0.ip().into()));
    let handshake = TlsConnector::from(tls.config.clone()).connect(name, tcp);
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(ConnectError::Tls { addr, source }),
        Err(_) => Err(ConnectError::Tls {
            addr,
            source: io::ErrorKind::TimedOut.into(),
        }),
    }
}
