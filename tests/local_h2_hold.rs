//! End-to-end: while `bkpool local` holds an HTTP/2 connection for a wake, the gateway answers
//! the client's preface itself, so the client's transport is up long before the replica is;
//! the client's frames then reach the replica intact (a strict HTTP/2 server, which refuses a
//! stray SETTINGS ACK). With `preface_while_waking = false` the first byte waits for the replica.

mod support;

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::local::local;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How long the replica takes to start: far longer than the gateway needs to answer.
const START_DELAY: &str = "3";

fn delayed_pool(preface_while_waking: bool) -> String {
    let bkpool = env!("CARGO_BIN_EXE_bkpool");
    format!(
        "[[pool]]\nname = \"default\"\npreface_while_waking = {preface_while_waking}\n\
         [pool.replica]\ncommand = [\"sh\", \"-c\", \"sleep {START_DELAY}; exec {bkpool} standin --listen {{addr}} --tls {{tls}}\"]\n"
    )
}

/// A stream that notes when its first byte arrived.
struct FirstByte<S> {
    inner: S,
    at: Arc<OnceLock<Instant>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstByte<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let _ = self.at.set(Instant::now());
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstByte<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Two gRPC health checks on one connection through the gateway to a sleeping pool, the
/// second a moment after the first (a strict HTTP/2 server ends the connection when it sees an
/// acknowledgement it did not ask for). Returns the time between the client's first byte from
/// the gateway and the first answer.
async fn health_through_a_wake(bk: &support::local::Local) -> Duration {
    let tls = bk.issue("default");
    let stream = bk.connect(&tls).await.expect("TLS through the gateway");
    let at = Arc::new(OnceLock::new());
    let io = FirstByte {
        inner: stream,
        at: at.clone(),
    };
    let (mut send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(io))
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let mut answered = None;
    for _ in 0..2 {
        send.ready().await.expect("connection ready");
        let check = send.send_request(health_check(bk.listen));
        let response = tokio::time::timeout(Duration::from_secs(20), check)
            .await
            .expect("answered within 20 s")
            .expect("the health check goes through the wake");
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.expect("whole answer");
        let status = body.trailers().and_then(|t| t.get("grpc-status")).cloned();
        assert_eq!(status.as_ref().map(|s| s.as_bytes()), Some(&b"0"[..]));
        answered.get_or_insert_with(Instant::now);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    answered.unwrap() - *at.get().expect("bytes arrived")
}

fn health_check(addr: std::net::SocketAddr) -> http::Request<Full<Bytes>> {
    // An empty HealthCheckRequest: one gRPC frame of length 0.
    http::Request::post(format!("https://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap()
}

#[tokio::test]
async fn the_gateway_answers_http2_while_the_pool_wakes_and_the_replica_gets_the_rest() {
    let bk = local("31200-31209", &delayed_pool(true));
    let gap = health_through_a_wake(&bk).await;
    assert!(
        gap >= Duration::from_secs(2),
        "the gateway's SETTINGS came {gap:?} before the replica's answer, not during the wake"
    );
    let answered = bk
        .metric("bkpool_gateway_held_prefaces_answered_total", &[])
        .await;
    assert_eq!(answered, 1.0);
    let malformed = bk
        .metric(
            "bkpool_gateway_held_preface_fallbacks_total",
            &[("reason", "bad_magic")],
        )
        .await;
    assert_eq!(malformed, 0.0);
}

#[tokio::test]
async fn with_the_switch_off_the_first_byte_waits_for_the_replica() {
    let bk = local("31210-31219", &delayed_pool(false));
    let gap = health_through_a_wake(&bk).await;
    assert!(
        gap < Duration::from_secs(1),
        "the first byte came {gap:?} before the answer: the gateway answered while off"
    );
    let answered = bk
        .metric("bkpool_gateway_held_prefaces_answered_total", &[])
        .await;
    assert_eq!(answered, 0.0);
}

/// Once the pool is awake, a client whose preface the gateway answered still owes it the
/// acknowledgement of its SETTINGS (at most 5 s). Meanwhile its connection is open: one
/// neither held nor open would let the pool be stopped under it. A client that never
/// acknowledges is refused with its own reason.
#[tokio::test]
async fn a_connection_awaiting_its_acknowledgement_counts_as_open() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bk = local("31230-31239", &delayed_pool(true));
    let tls = bk.issue("default");
    let mut stream = bk.connect(&tls).await.expect("TLS through the gateway");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    stream
        .write_all(control::standin::H2_PREFACE)
        .await
        .unwrap();
    stream
        .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    stream.flush().await.unwrap();
    let mut settings = [0u8; 9];
    stream.read_exact(&mut settings).await.unwrap();
    assert_eq!(
        settings,
        [0, 0, 0, 4, 0, 0, 0, 0, 0],
        "the gateway's own SETTINGS"
    );

    bk.wait_phase(
        "default",
        control::scale::Phase::Ready,
        Duration::from_secs(20),
    )
    .await;
    // The hold ends as the replica answers; the acknowledgement is due within 5 s.
    let counted = async {
        loop {
            let pool = bk.pool("default").await;
            if (pool.open, pool.held) == (1, 0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(3), counted)
        .await
        .expect("open while its acknowledgement is awaited");

    let refused = async {
        loop {
            let labels = [("pool", "local/default"), ("reason", "h2_no_ack")];
            if bk
                .metric("bkpool_gateway_connections_rejected_total", &labels)
                .await
                == 1.0
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), refused)
        .await
        .expect("refused for want of an acknowledgement");
    assert_eq!(bk.pool("default").await.open, 0);
}
