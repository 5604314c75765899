//! The handshake step: turn an accepted TCP connection into either a terminated TLS stream
//! with an authenticated peer, or a passthrough connection routed by its SNI.
//!
//! When no pool is in passthrough mode, rustls reads the ClientHello itself. Otherwise the
//! ClientHello is read (and kept) first: an SNI naming a passthrough pool sends the raw bytes
//! on; anything else is fed to rustls as if it had read them from the socket.
//!
//! Either way the ClientHello must arrive whole within its own short deadline: a client sends
//! it as soon as it connects, and a socket that trickles bytes would otherwise hold its
//! handshake slot for the whole handshake timeout.

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::ServerConfig;
use rustls::server::Acceptor;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{LazyConfigAcceptor, StartHandshake};

use crate::clienthello::{self, ClientHelloError};
use crate::identify::{IdentifyError, Peer, identify_with_validity};
use crate::route::{PoolRoute, Routes};
use crate::tls::handshake_reason;

/// A connection past its handshake.
pub enum Accepted {
    /// TLS terminated here; the peer is authenticated by its pool's CA until `expires`, its
    /// certificate's notAfter.
    Terminated {
        stream: Box<TlsStream<TcpStream>>,
        peer: Peer,
        expires: SystemTime,
    },
    /// Routed by SNI; `hello` holds every byte read so far, to be replayed to the backend.
    Passthrough {
        tcp: TcpStream,
        route: Arc<PoolRoute>,
        hello: Vec<u8>,
    },
}

/// Why a handshake failed. Nothing here is authenticated, so nothing names a pool.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("reading the ClientHello: {0}")]
    ClientHello(#[from] ClientHelloError),
    #[error("no complete ClientHello within {0:?}")]
    ClientHelloTimeout(Duration),
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    #[error("no pool is served for this connection (SNI {0:?}, and no terminate-mode pool)")]
    NoRoute(Option<String>),
    #[error("client certificate: {0}")]
    Identify(#[from] IdentifyError),
}

impl HandshakeError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ClientHello(e) => match e {
                ClientHelloError::NotTls { .. } => "not_tls",
                ClientHelloError::Eof => "client_closed",
                _ => "bad_client_hello",
            },
            Self::ClientHelloTimeout(_) => "client_hello_timeout",
            Self::Tls(e) => handshake_reason(e),
            Self::NoRoute(_) => "no_route",
            Self::Identify(_) => "cert_no_pool",
        }
    }
}

/// Runs the handshake. `tls` is the terminate-mode configuration, absent when no pool
/// terminates TLS; `client_hello` bounds the wait for a complete ClientHello (the caller
/// bounds the whole handshake).
pub async fn accept(
    mut tcp: TcpStream,
    routes: &Routes,
    tls: Option<Arc<ServerConfig>>,
    client_hello: Duration,
) -> Result<Accepted, HandshakeError> {
    let late = |_| HandshakeError::ClientHelloTimeout(client_hello);
    if !routes.has_passthrough() {
        let config = tls.ok_or(HandshakeError::NoRoute(None))?;
        let start = timeout(
            client_hello,
            LazyConfigAcceptor::new(Acceptor::default(), tcp),
        )
        .await
        .map_err(late)?
        .map_err(HandshakeError::Tls)?;
        let stream = start
            .into_stream(config)
            .await
            .map_err(HandshakeError::Tls)?;
        return terminated(stream);
    }
    let mut hello_bytes = Vec::new();
    let hello = timeout(client_hello, clienthello::read(&mut tcp, &mut hello_bytes))
        .await
        .map_err(late)??;
    if let Some(route) = hello.sni.as_deref().and_then(|sni| routes.passthrough(sni)) {
        return Ok(Accepted::Passthrough {
            tcp,
            route: route.clone(),
            hello: hello_bytes,
        });
    }
    let config = tls.ok_or(HandshakeError::NoRoute(hello.sni))?;
    let stream = terminate_after_peek(tcp, &hello_bytes, config).await?;
    terminated(stream)
}

/// Hands bytes already read from the socket to rustls, then lets it finish the handshake.
async fn terminate_after_peek(
    mut tcp: TcpStream,
    mut read: &[u8],
    config: Arc<ServerConfig>,
) -> Result<TlsStream<TcpStream>, HandshakeError> {
    let mut acceptor = rustls::server::Acceptor::default();
    while !read.is_empty() {
        acceptor.read_tls(&mut read).map_err(HandshakeError::Tls)?;
    }
    let accepted = match acceptor.accept() {
        Ok(Some(accepted)) => accepted,
        Ok(None) => {
            let e = io::Error::new(io::ErrorKind::InvalidData, "incomplete ClientHello");
            return Err(HandshakeError::Tls(e));
        }
        Err((error, mut alert)) => {
            let mut out = Vec::new();
            let _ = alert.write(&mut out);
            let _ = tcp.write_all(&out).await;
            return Err(HandshakeError::Tls(io::Error::new(
                io::ErrorKind::InvalidData,
                error,
            )));
        }
    };
    StartHandshake::from_parts(accepted, tcp)
        .into_stream(config)
        .await
        .map_err(HandshakeError::Tls)
}

fn terminated(stream: TlsStream<TcpStream>) -> Result<Accepted, HandshakeError> {
    let (_, conn) = stream.get_ref();
    // The verifier required a certificate and checked it names a pool, so both hold here.
    let cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(IdentifyError::NoPoolUri)?;
    let (peer, (_, not_after)) = identify_with_validity(cert)?;
    let expires = UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64);
    Ok(Accepted::Terminated {
        stream: Box::new(stream),
        peer,
        expires,
    })
}
