//! Replica readiness: a backend is ready when it *answers* a gRPC health check, not when its
//! process exists or its port accepts. [`probe`] speaks HTTP/2 with prior knowledge (h2c, as
//! buildkitd serves on plaintext TCP); [`probe_tls`] does the same over (m)TLS with ALPN `h2`.
//! Every failure says which step of talking to the backend failed, with a fixed metric label.

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use crate::grpc;

/// What a backend said about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// `grpc-status: 0` and `status: SERVING`.
    Serving,
    /// `grpc-status: 0` and any other status (UNKNOWN, NOT_SERVING, SERVICE_UNKNOWN).
    NotServing,
    /// `grpc-status: 12`: an older buildkitd without the health service. It answered over
    /// gRPC, which is what readiness means, so it counts as ready.
    Unimplemented,
}

impl Health {
    /// Whether connections may be sent to the backend.
    pub fn is_ready(self) -> bool {
        !matches!(self, Health::NotServing)
    }
}

/// Why a probe could not tell whether the backend is serving. All of them mean "not ready".
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("backend {addr} refused the connection")]
    Refused { addr: SocketAddr },
    #[error("could not connect to backend {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("backend {addr} did not answer the health check within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("TLS with backend {addr} failed: {source}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("backend {addr} does not speak HTTP/2: {evidence}")]
    NotHttp2 { addr: SocketAddr, evidence: String },
    #[error("backend {addr} closed the connection without answering")]
    Closed { addr: SocketAddr },
    #[error("backend {addr} broke the HTTP/2 or gRPC protocol: {detail}")]
    Protocol { addr: SocketAddr, detail: String },
    #[error("backend {addr} answered the health check with grpc-status {code}: {message}")]
    Status {
        addr: SocketAddr,
        code: u32,
        message: String,
    },
}

impl ProbeError {
    /// A fixed label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ProbeError::Refused { .. } => "refused",
            ProbeError::Connect { .. } => "connect",
            ProbeError::Timeout { .. } => "timeout",
            ProbeError::Tls { .. } => "tls",
            ProbeError::NotHttp2 { .. } => "not_http2",
            ProbeError::Closed { .. } => "closed",
            ProbeError::Protocol { .. } => "protocol",
            ProbeError::Status { .. } => "grpc_status",
        }
    }
}

/// Asks the backend at `addr`, over plaintext HTTP/2, whether it is serving. `timeout` bounds
/// the whole exchange, connect included.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> Result<Health, ProbeError> {
    within(addr, timeout, async {
        let tcp = connect(addr).await?;
        check(addr, Transport::H2c, tcp).await
    })
    .await
}

/// Like [`probe`], over TLS with `tls` (which carries the client certificate when the backend
/// requires mTLS). ALPN is set to `h2` whatever `tls` offers.
pub async fn probe_tls(
    addr: SocketAddr,
    server_name: ServerName<'static>,
    tls: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<Health, ProbeError> {
    let connector = TlsConnector::from(with_h2_alpn(tls));
    within(addr, timeout, async {
        let tcp = connect(addr).await?;
        let stream = connector
            .connect(server_name, tcp)
            .await
            .map_err(|source| ProbeError::Tls { addr, source })?;
        if let Some(alpn) = stream.get_ref().1.alpn_protocol().filter(|p| *p != b"h2") {
            let evidence = format!("it chose ALPN \"{}\"", alpn.escape_ascii());
            return Err(ProbeError::NotHttp2 { addr, evidence });
        }
        check(addr, Transport::Tls, stream).await
    })
    .await
}

/// What carries the HTTP/2 connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    H2c,
    Tls,
}

/// Responses larger than this are not health check responses.
const MAX_RESPONSE: usize = 64 * 1024;

async fn within(
    addr: SocketAddr,
    timeout: Duration,
    exchange: impl Future<Output = Result<Health, ProbeError>>,
) -> Result<Health, ProbeError> {
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(ProbeError::Timeout { addr, timeout }))
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, ProbeError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::ConnectionRefused => ProbeError::Refused { addr },
            _ => ProbeError::Connect { addr, source },
        })?;
    // Best effort: a probe is a handful of small frames; Nagle only adds latency.
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

async fn check<T>(addr: SocketAddr, transport: Transport, io: T) -> Result<Health, ProbeError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let seen = FirstBytes::default();
    let io = Sniff {
        inner: io,
        seen: seen.clone(),
    };
    let fail = |error: hyper::Error| classify(addr, transport, &seen, &error);
    let (mut send, connection) = http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(io))
        .await
        .map_err(fail)?;
    let _connection = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    send.ready().await.map_err(fail)?;
    let response = send
        .send_request(health_request(addr, transport))
        .await
        .map_err(fail)?;
    read_health(addr, response, fail).await
}

fn health_request(addr: SocketAddr, transport: Transport) -> Request<Full<Bytes>> {
    let scheme = match transport {
        Transport::H2c => "http",
        Transport::Tls => "https",
    };
    // An empty HealthCheckRequest (service "") asks about the server as a whole.
    Request::post(format!("{scheme}://{addr}{}", grpc::HEALTH_CHECK_PATH))
        .header(header::CONTENT_TYPE, grpc::CONTENT_TYPE)
        .header(header::TE, "trailers")
        .header(header::USER_AGENT, "bkpool-probe")
        .body(Full::new(grpc::frame(&[])))
        .expect("static request parts are valid")
}

async fn read_health(
    addr: SocketAddr,
    response: Response<Incoming>,
    fail: impl Fn(hyper::Error) -> ProbeError,
) -> Result<Health, ProbeError> {
    let protocol = |detail: String| ProbeError::Protocol { addr, detail };
    let (head, body) = response.into_parts();
    if head.status != StatusCode::OK {
        return Err(protocol(format!("HTTP status {}", head.status)));
    }
    if !is_grpc(&head.headers) {
        return Err(protocol("response is not application/grpc".into()));
    }
    // Trailers-only: the status arrives with the headers and there is no body.
    if let Some(code) = grpc_status(&head.headers).map_err(protocol)? {
        return health_from(addr, code, &head.headers, &[]);
    }
    let collected = Limited::new(body, MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| match e.downcast::<hyper::Error>() {
            Ok(error) => fail(*error),
            Err(other) => protocol(other.to_string()),
        })?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let code = grpc_status(&trailers)
        .map_err(protocol)?
        .ok_or_else(|| protocol("response has no grpc-status".into()))?;
    health_from(addr, code, &trailers, &collected.to_bytes())
}

fn health_from(
    addr: SocketAddr,
    code: u32,
    meta: &http::HeaderMap,
    body: &[u8],
) -> Result<Health, ProbeError> {
    match code {
        grpc::STATUS_OK => {
            let status = grpc::unframe(body)
                .and_then(grpc::decode_health_response)
                .map_err(|e| ProbeError::Protocol {
                    addr,
                    detail: e.to_string(),
                })?;
            Ok(if status == grpc::SERVING {
                Health::Serving
            } else {
                Health::NotServing
            })
        }
        grpc::STATUS_UNIMPLEMENTED => Ok(Health::Unimplemented),
        code => {
            let message = meta
                .get("grpc-message")
                .map(|v| v.as_bytes().escape_ascii().to_string());
            Err(ProbeError::Status {
                addr,
                code,
                message: message.unwrap_or_default(),
            })
        }
    }
}

fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(grpc::CONTENT_TYPE.as_bytes()))
}

fn grpc_status(headers: &http::HeaderMap) -> Result<Option<u32>, String> {
    let Some(value) = headers.get("grpc-status") else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .ok()
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()));
    text.and_then(|t| t.parse().ok())
        .map(Some)
        .ok_or_else(|| format!("grpc-status {:?} is not a number", value))
}

/// Turns a failed HTTP/2 exchange into the step that failed, using what the peer sent first:
/// an HTTP/2 server's first frame is SETTINGS on stream 0.
fn classify(
    addr: SocketAddr,
    transport: Transport,
    seen: &FirstBytes,
    error: &hyper::Error,
) -> ProbeError {
    let chain = || error_chain(error);
    // Over TLS, rustls reports alerts and bad records as InvalidData I/O errors (with the
    // rustls error flattened to text); plaintext TCP never produces that kind.
    let tls_error = chain()
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .find(|io| transport == Transport::Tls && io.kind() == std::io::ErrorKind::InvalidData);
    if let Some(io) = tls_error {
        let source = std::io::Error::new(io.kind(), io.to_string());
        return ProbeError::Tls { addr, source };
    }
    let first = seen.0.lock().expect("first bytes lock").clone();
    if first.is_empty() {
        return ProbeError::Closed { addr };
    }
    if !starts_like_settings(&first) {
        let evidence = format!("it sent b\"{}\"", first.escape_ascii());
        return ProbeError::NotHttp2 { addr, evidence };
    }
    let detail = chain()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ");
    ProbeError::Protocol { addr, detail }
}

fn error_chain<'a>(
    error: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(error), |&e| e.source())
}

/// Whether `b` can be the start of a SETTINGS frame header (length multiple of 6, type 4,
/// no flags, stream 0), judging only the bytes present.
fn starts_like_settings(b: &[u8]) -> bool {
    let length_ok = b.len() < 3 || {
        let len = u32::from_be_bytes([0, b[0], b[1], b[2]]);
        len.is_multiple_of(6) && len <= 16_384
    };
    let type_ok = b.get(3).is_none_or(|&t| t == 4);
    let flags_ok = b.get(4).is_none_or(|&f| f == 0);
    let stream_ok = b.iter().skip(5).take(4).all(|&s| s == 0);
    length_ok && type_ok && flags_ok && stream_ok
}

/// The first bytes the peer sent, kept for [`classify`].
#[derive(Clone, Default)]
struct FirstBytes(Arc<Mutex<Vec<u8>>>);

const FIRST_BYTES: usize = 16;

/// Passes I/O through, recording the first [`FIRST_BYTES`] bytes read.
struct Sniff<T> {
    inner: T,
    seen: FirstBytes,
}

impl<T: AsyncRead + Unpin> AsyncRead for Sniff<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let mut seen = self.seen.0.lock().expect("first bytes lock");
        let room = FIRST_BYTES - seen.len();
        let fresh = &buf.filled()[before..];
        seen.extend_from_slice(&fresh[..fresh.len().min(room)]);
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Sniff<T> {
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

/// The HTTP/2 connection task lives exactly as long as the probe.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn with_h2_alpn(tls: Arc<ClientConfig>) -> Arc<ClientConfig> {
    if tls.alpn_protocols == [b"h2".to_vec()] {
        return tls;
    }
    let mut config = (*tls).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::standin::{self, Config};
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::{RootCertStore, ServerConfig, server::WebPkiClientVerifier};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    const QUICK: Duration = Duration::from_secs(5);

    /// A running stand-in; it stops when the returned sender is dropped.
    async fn standin(health: Health) -> (SocketAddr, oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async { drop(stopped.await) };
        tokio::spawn(standin::serve_with(
            listener,
            Config {
                health,
                ..Config::default()
            },
            shutdown,
        ));
        (addr, stop)
    }

    /// A server that answers every connection with `f`.
    async fn server<F, Fut>(f: F) -> SocketAddr
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(f(stream));
            }
        });
        addr
    }

    #[tokio::test]
    async fn the_standin_is_serving() {
        let (addr, _stop) = standin(Health::Serving).await;
        assert_eq!(probe(addr, QUICK).await.unwrap(), Health::Serving);
    }

    #[tokio::test]
    async fn not_serving_and_unimplemented_are_told_apart() {
        let (addr, _stop) = standin(Health::NotServing).await;
        let health = probe(addr, QUICK).await.unwrap();
        assert_eq!(health, Health::NotServing);
        assert!(!health.is_ready());
        let (addr, _stop) = standin(Health::Unimplemented).await;
        let health = probe(addr, QUICK).await.unwrap();
        assert_eq!(health, Health::Unimplemented);
        assert!(
            health.is_ready(),
            "an older buildkitd that answers is ready"
        );
    }

    #[tokio::test]
    async fn a_plain_echo_server_is_not_http2() {
        let addr = server(|mut s| async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        })
        .await;
        let error = probe(addr, QUICK).await.unwrap_err();
        assert_eq!(error.reason(), "not_http2", "{error}");
        assert!(error.to_string().contains("PRI * HTTP/2.0"), "{error}");
    }

    #[tokio::test]
    async fn an_http1_server_is_not_http2() {
        let addr = server(|mut s| async move {
            let _ = s.read(&mut [0; 64]).await;
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            drain(&mut s).await;
        })
        .await;
        let error = probe(addr, QUICK).await.unwrap_err();
        assert_eq!(error.reason(), "not_http2", "{error}");
        assert!(error.to_string().contains("HTTP/1.1 400"), "{error}");
    }

    #[tokio::test]
    async fn a_server_that_hangs_up_is_closed() {
        let addr = server(|s| async move { drop(s) }).await;
        let error = probe(addr, QUICK).await.unwrap_err();
        assert_eq!(error.reason(), "closed", "{error}");
    }

    #[tokio::test]
    async fn a_closed_port_refuses() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let error = probe(addr, QUICK).await.unwrap_err();
        assert!(
            matches!(error, ProbeError::Refused { addr: a } if a == addr),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_listener_that_never_answers_times_out() {
        // Bound but never accepted: the kernel completes the handshake, nobody speaks.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let started = std::time::Instant::now();
        let error = probe(addr, Duration::from_millis(300)).await.unwrap_err();
        assert_eq!(error.reason(), "timeout", "{error}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn mtls_backends_are_probed_with_the_client_certificate() {
        let pki = Pki::new();
        let (backend, _stop) = standin(Health::Serving).await;
        let addr = tls_terminator(pki.server_config(), backend).await;
        let name = ServerName::try_from("localhost").unwrap();
        let health = probe_tls(addr, name.clone(), pki.client_config(true), QUICK).await;
        assert_eq!(health.unwrap(), Health::Serving);

        let error = probe_tls(addr, name, pki.client_config(false), QUICK)
            .await
            .unwrap_err();
        assert_eq!(error.reason(), "tls", "{error}");
    }

    /// Terminates mTLS and forwards the plaintext to `backend`.
    async fn tls_terminator(config: Arc<ServerConfig>, backend: SocketAddr) -> SocketAddr {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        server(move |tcp| {
            let acceptor = acceptor.clone();
            async move {
                let mut tcp = tcp;
                match acceptor.accept(&mut tcp).await {
                    Ok(mut tls) => {
                        let mut plain = TcpStream::connect(backend).await.unwrap();
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    }
                    // Read what the client sent before closing, so the kernel delivers the
                    // alert instead of resetting the connection over unread bytes.
                    Err(_) => drain(&mut tcp).await,
                }
            }
        })
        .await
    }

    /// Reads until the client closes (or a second passes), so closing sends FIN, not RST.
    async fn drain(stream: &mut TcpStream) {
        let mut sink = [0; 4096];
        let until_eof = async { while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {} };
        let _ = tokio::time::timeout(Duration::from_secs(1), until_eof).await;
    }

    struct Pki {
        ca: CertificateDer<'static>,
        server: (CertificateDer<'static>, Vec<u8>),
        client: (CertificateDer<'static>, Vec<u8>),
    }

    impl Pki {
        fn new() -> Self {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
            let leaf = |name: &str| {
                let key = KeyPair::generate().unwrap();
                let params = CertificateParams::new(vec![name.to_string()]).unwrap();
                (
                    params.signed_by(&key, &ca).unwrap().der().clone(),
                    key.serialize_der(),
                )
            };
            Pki {
                ca: ca.der().clone(),
                server: leaf("localhost"),
                client: leaf("client"),
            }
        }

        fn roots(&self) -> Arc<RootCertStore> {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca.clone()).unwrap();
            Arc::new(roots)
        }

        fn server_config(&self) -> Arc<ServerConfig> {
            let verifier = WebPkiClientVerifier::builder(self.roots()).build().unwrap();
            let mut config = ServerConfig::builder()
                .with_client_cert_verifier(verifier)
                .with_single_cert(vec![self.server.0.clone()], key(&self.server.1))
                .unwrap();
            config.alpn_protocols = vec![b"h2".to_vec()];
            Arc::new(config)
        }

        fn client_config(&self, with_cert: bool) -> Arc<ClientConfig> {
            let builder = ClientConfig::builder().with_root_certificates(self.roots());
            Arc::new(match with_cert {
                true => builder
                    .with_client_auth_cert(vec![self.client.0.clone()], key(&self.client.1))
                    .unwrap(),
                false => builder.with_no_client_auth(),
            })
        }
    }

    fn key(der: &[u8]) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.to_vec()))
    }
}
