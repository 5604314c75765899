//! The built-in stand-in backend, used when buildkitd is not installed and in tests. One
//! listener serves two kinds of client, told apart by their first bytes:
//! - HTTP/2 with prior knowledge (the client preface): a minimal gRPC server that answers
//!   `grpc.health.v1.Health/Check` and, like any real gRPC server, UNIMPLEMENTED to every
//!   other method;
//! - anything else: echoed byte for byte, half-close included, for byte-flow tests.
//!
//! As a replica of `bkpool local` it serves both over mTLS ([`tls_config`]), as buildkitd does
//! there: the gateway reaches it with its backend certificate, and nobody else.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
#[cfg(test)]
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::grpc;
use crate::health::Health;

/// How the stand-in behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// What the health check answers. [`Health::Unimplemented`] plays an older buildkitd
    /// without the health service.
    pub health: Health,
    /// A broken replica: its health check passes, but every other connection gets the echo
    /// of its first bytes and then a reset.
    pub flap: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            health: Health::Serving,
            flap: false,
        }
    }
}

/// What an HTTP/2 client sends first (RFC 9113, section 3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves `listener` with the default [`Config`] (health SERVING) until `shutdown` completes.
pub async fn serve(listener: TcpListener, shutdown: impl Future<Output = ()>) {
    serve_with(listener, Config::default(), shutdown).await
}

/// Serves `listener` until `shutdown` completes; open connections end with it, as they would
/// when a real backend process exits.
pub async fn serve_with(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) {
    serve_inner(listener, config, None, shutdown).await
}

/// Like [`serve`], each connection over TLS with `tls` first (see [`tls_config`]).
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    config: Config,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    serve_inner(listener, config, Some(acceptor), shutdown).await
}

/// A server configuration from a `buildctl --tlsdir`-shaped directory: `cert.pem` and
/// `key.pem` to serve, and clients required to present a certificate of `ca.pem`. ALPN `h2`.
pub fn tls_config(dir: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let file = |name: &str| dir.join(name);
    let read_certs = |path: PathBuf| {
        CertificateDer::pem_file_iter(&path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs(file("ca.pem"))? {
        roots
            .add(ca)
            .map_err(|e| format!("{}: {e}", file("ca.pem").display()))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| format!("{}: {e}", file("ca.pem").display()))?;
    let key = PrivateKeyDer::from_pem_file(file("key.pem"))
        .map_err(|e| format!("{}: {e}", file("key.pem").display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(file("cert.pem"))?, key)
        .map_err(|e| format!("{}: {e}", file("cert.pem").display()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

async fn serve_inner(
    listener: TcpListener,
    config: Config,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    if config.flap {
                        // Closing then resets the connection instead of ending it cleanly.
                        let _ = stream.set_zero_linger();
                    }
                    let tls = tls.clone();
                    connections.spawn(async move {
                        match tls {
                            None => handle(stream, config).await,
                            Some(tls) => {
                                let handshake = tokio::time::timeout(HANDSHAKE, tls.accept(stream));
                                if let Ok(Ok(stream)) = handshake.await {
                                    handle(stream, config).await;
                                }
                            }
                        }
                    });
                }
                Err(error) => {
                    // Usually EMFILE: back off instead of spinning on the same error.
                    tracing::warn!(%error, "stand-in backend could not accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// A connection the stand-in serves: plain TCP or TLS over it.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for S {}

/// How long a client has for its TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

async fn handle<S: Stream>(mut stream: S, config: Config) {
    let Ok(first) = read_until_decided(&mut stream).await else {
        return;
    };
    let result = if first == H2_PREFACE {
        serve_grpc(
            Replay {
                first,
                at: 0,
                inner: stream,
            },
            config,
        )
        .await
    } else if config.flap {
        // Dies mid-stream: the client sees its first bytes come back, then a reset.
        stream.write_all(&first).await
    } else {
        echo(first, stream).await
    };
    if let Err(error) = result {
        tracing::debug!(%error, "stand-in connection ended with an error");
    }
}

/// Reads until the bytes are the whole preface, stop matching it, or the client half-closes.
/// A client that sends a few bytes and waits for their echo is answered as soon as they
/// differ from the preface.
async fn read_until_decided<S: Stream>(stream: &mut S) -> std::io::Result<Vec<u8>> {
    let mut first = Vec::with_capacity(H2_PREFACE.len());
    let mut chunk = [0; H2_PREFACE.len()];
    while first.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&first) {
        let n = stream
            .read(&mut chunk[..H2_PREFACE.len() - first.len()])
            .await?;
        if n == 0 {
            break;
        }
        first.extend_from_slice(&chunk[..n]);
    }
    Ok(first)
}

async fn echo<S: Stream>(first: Vec<u8>, stream: S) -> std::io::Result<()> {
    let (mut from, mut to) = tokio::io::split(stream);
    to.write_all(&first).await?;
    tokio::io::copy(&mut from, &mut to).await?;
    // The client half-closed and everything it sent went back: pass the FIN on.
    to.shutdown().await
}

async fn serve_grpc<S: Stream>(io: Replay<S>, config: Config) -> std::io::Result<()> {
    let service = service_fn(move |request| answer(request, config));
    http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), service)
        .await
        .map_err(std::io::Error::other)
}

type Body = BoxBody<Bytes, Infallible>;

async fn answer(request: Request<Incoming>, config: Config) -> Result<Response<Body>, Infallible> {
    let is_grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(grpc::CONTENT_TYPE.as_bytes()));
    if !is_grpc {
        return Ok(plain(StatusCode::UNSUPPORTED_MEDIA_TYPE));
    }
    if request.uri().path() != grpc::HEALTH_CHECK_PATH {
        return Ok(unimplemented());
    }
    // Read the (empty) request before answering, as a unary gRPC handler does.
    let _ = Limited::new(request.into_body(), 64 * 1024).collect().await;
    Ok(match config.health {
        Health::Serving => health(grpc::SERVING),
        Health::NotServing => health(grpc::NOT_SERVING),
        Health::Unimplemented => unimplemented(),
    })
}

fn health(status: u64) -> Response<Body> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(grpc::STATUS_OK));
    let message = grpc::frame(&grpc::encode_health_response(status));
    let body = Full::new(message).with_trailers(async { Some(Ok(trailers)) });
    grpc_response(body.boxed())
}

/// Trailers-only: the status rides on the headers and the stream ends with them.
fn unimplemented() -> Response<Body> {
    let mut response = grpc_response(Empty::new().boxed());
    let headers = response.headers_mut();
    headers.insert("grpc-status", HeaderValue::from(grpc::STATUS_UNIMPLEMENTED));
    headers.insert(
        "grpc-message",
        HeaderValue::from_static("method not implemented"),
    );
    response
}

fn grpc_response(body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    let content_type = HeaderValue::from_static(grpc::CONTENT_TYPE);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    response
}

fn plain(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Empty::new().boxed());
    *response.status_mut() = status;
    response
}

/// The connection with the bytes already read put back in front.
struct Replay<S> {
    first: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S: Stream> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.first.len() {
            let n = buf.remaining().min(self.first.len() - self.at);
            buf.put_slice(&self.first[self.at..self.at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: Stream> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::probe;
    use http_body_util::BodyExt;
    use hyper::client::conn::http2 as client;
    use std::net::SocketAddr;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    const QUICK: Duration = Duration::from_secs(5);

    struct Running {
        addr: SocketAddr,
        stop: oneshot::Sender<()>,
        task: JoinHandle<()>,
    }

    async fn start() -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, async { drop(stopped.await) }));
        Running { addr, stop, task }
    }

    #[tokio::test]
    async fn echo_returns_a_mebibyte_intact_and_honours_half_close() {
        let standin = start().await;
        let stream = TcpStream::connect(standin.addr).await.unwrap();
        let (mut from, mut to) = stream.into_split();
        let sent: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 + i / 251) as u8).collect();
        let payload = sent.clone();
        let writer = tokio::spawn(async move {
            to.write_all(&payload).await.unwrap();
            to.shutdown().await.unwrap(); // SHUT_WR: the stand-in must finish and close.
            to
        });
        let mut echoed = Vec::new();
        let read = tokio::time::timeout(QUICK, from.read_to_end(&mut echoed)).await;
        read.expect("the stand-in closes after echoing everything")
            .unwrap();
        let _to = writer.await.unwrap();
        assert_eq!(echoed.len(), sent.len());
        assert!(echoed == sent, "echoed bytes differ from the bytes sent");
    }

    #[tokio::test]
    async fn a_short_message_is_echoed_without_waiting_for_more() {
        let standin = start().await;
        // "PRX" follows the preface for two bytes, then leaves it: echo at once.
        for message in [&b"hi"[..], b"PRX", b"\0"] {
            let mut stream = TcpStream::connect(standin.addr).await.unwrap();
            stream.write_all(message).await.unwrap();
            let mut back = vec![0; message.len()];
            let read = tokio::time::timeout(QUICK, stream.read_exact(&mut back)).await;
            read.expect("echo without more input").unwrap();
            assert_eq!(back, message);
        }
    }

    #[tokio::test]
    async fn a_preface_fragment_then_half_close_is_echoed() {
        let standin = start().await;
        let mut stream = TcpStream::connect(standin.addr).await.unwrap();
        stream.write_all(b"PRI * HT").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(QUICK, stream.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, b"PRI * HT");
    }

    #[tokio::test]
    async fn health_and_echo_share_one_port() {
        let standin = start().await;
        assert_eq!(probe(standin.addr, QUICK).await.unwrap(), Health::Serving);
        let mut stream = TcpStream::connect(standin.addr).await.unwrap();
        stream.write_all(b"ping").await.unwrap();
        let mut back = [0; 4];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");
    }

    #[tokio::test]
    async fn other_grpc_methods_are_unimplemented_trailers_only() {
        let standin = start().await;
        let tcp = TcpStream::connect(standin.addr).await.unwrap();
        let (mut send, connection) = client::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(connection);
        let request = Request::post("http://backend/moby.buildkit.v1.Control/ListWorkers")
            .header(header::CONTENT_TYPE, grpc::CONTENT_TYPE)
            .header(header::TE, "trailers")
            .body(Full::new(grpc::frame(&[])))
            .unwrap();
        let response = send.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "12");
        assert_eq!(response.headers()[header::CONTENT_TYPE], grpc::CONTENT_TYPE);
        let body = response.into_body().collect().await.unwrap();
        assert!(
            body.trailers().is_none(),
            "trailers-only: no separate trailers"
        );
        assert!(body.to_bytes().is_empty());
    }

    #[tokio::test]
    async fn shutdown_stops_accepting_and_ends_connections() {
        let standin = start().await;
        let mut open = TcpStream::connect(standin.addr).await.unwrap();
        open.write_all(b"x").await.unwrap();
        open.read_exact(&mut [0; 1]).await.unwrap();
        standin.stop.send(()).unwrap();
        tokio::time::timeout(QUICK, standin.task)
            .await
            .unwrap()
            .unwrap();
        let refused = TcpStream::connect(standin.addr).await.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(QUICK, open.read_to_end(&mut rest))
            .await
            .unwrap();
        assert!(
            ended.is_ok() && rest.is_empty(),
            "open connection closed: {ended:?}"
        );
    }
}
