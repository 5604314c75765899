//! The plain-TCP backends every proxy forwards to: `sink` reads and drops
//! (bulk upload), `echo` writes back what it reads (round trips, full-duplex
//! bulk). With `skip_client_hello` each connection first discards one TLS
//! record, the ClientHello the passthrough load sends before raw bytes.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a backend does with each connection's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    Sink,
    Echo,
}

#[derive(Debug, Clone, Copy)]
pub struct Backend {
    pub behaviour: Behaviour,
    pub skip_client_hello: bool,
}

const BUF: usize = 256 * 1024;

impl Backend {
    /// Serves until `lifetime` passes, so a forgotten backend stops by itself.
    pub async fn run(self, listener: TcpListener, lifetime: Duration) -> io::Result<()> {
        let serve = async {
            loop {
                let (stream, _) = listener.accept().await?;
                tokio::spawn(async move {
                    // A peer that resets mid-stream is normal at the end of a run.
                    let _ = self.serve(stream).await;
                });
            }
        };
        match tokio::time::timeout(lifetime, serve).await {
            Ok(result) => result,
            Err(_) => Ok(()),
        }
    }

    async fn serve(self, mut stream: TcpStream) -> io::Result<()> {
        stream.set_nodelay(true)?;
        if self.skip_client_hello {
            skip_record(&mut stream).await?;
        }
        match self.behaviour {
            Behaviour::Sink => sink(&mut stream).await,
            Behaviour::Echo => echo(&mut stream).await,
        }
    }
}

/// Reads one TLS record (5-byte header, then its length) and drops it.
async fn skip_record(stream: &mut TcpStream) -> io::Result<()> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await?;
    if header[0] != 0x16 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a TLS handshake record",
        ));
    }
    let len = u16::from_be_bytes([header[3], header[4]]) as usize;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.map(drop)
}

async fn sink(stream: &mut TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; BUF];
    while stream.read(&mut buf).await? > 0 {}
    stream.shutdown().await
}

async fn echo(stream: &mut TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; BUF];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        stream.write_all(&buf[..n]).await?;
    }
}
