//! Opening one client connection to the target: TCP (no delay), then either
//! a TLS handshake or, for passthrough, a raw ClientHello record.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::tls::TlsClient;

/// A connected byte stream, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

pub type Stream = Pin<Box<dyn Io>>;

/// How the client opens its stream once TCP is up.
#[derive(Clone)]
pub enum Opening {
    Plain,
    /// Send this ClientHello record, then speak raw bytes (passthrough).
    Hello(Vec<u8>),
    Tls(TlsClient),
}

/// Which step of opening failed, so runs can count failures by kind.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect: {0}")]
    Tcp(io::Error),
    #[error("tls handshake: {0}")]
    Handshake(io::Error),
}

pub async fn open(target: SocketAddr, opening: &Opening) -> Result<Stream, ConnectError> {
    let tcp = TcpStream::connect(target)
        .await
        .map_err(ConnectError::Tcp)?;
    tcp.set_nodelay(true).map_err(ConnectError::Tcp)?;
    match opening {
        Opening::Plain => Ok(Box::pin(tcp)),
        Opening::Hello(hello) => {
            let mut tcp = tcp;
            tcp.write_all(hello).await.map_err(ConnectError::Tcp)?;
            Ok(Box::pin(tcp))
        }
        Opening::Tls(client) => {
            let connector = TlsConnector::from(client.config.clone());
            let tls = connector
                .connect(client.server_name.clone(), tcp)
                .await
                .map_err(ConnectError::Handshake)?;
            Ok(Box::pin(tls))
        }
    }
}
