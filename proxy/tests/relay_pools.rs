//! Idle connections hold no copy buffer and no pipe. The pool counters are process-wide,
//! so this check lives in its own test binary with a single test.

use std::time::Duration;

use proxy::relay::{self, Direction, Path, Settings, Tally, pool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_hold_no_buffers_or_pipes() {
    let settings = Settings {
        idle_timeout: Duration::from_secs(60),
        ends_at: None,
    };

    // Splice: a destination that does not read keeps the relay's pipe full and lent out.
    let (mut client, gw_client) = connected().await;
    let (gw_backend, mut backend) = connected().await;
    let s = settings.clone();
    let splice =
        tokio::spawn(async move { relay::splice(gw_client, gw_backend, &s, &NoTally).await });
    let mut big = vec![7u8; 8 << 20];
    let writer = tokio::spawn(async move {
        client.write_all(&big).await.unwrap();
        big.clear();
        client
    });
    eventually(
        |s| s.pipes_outstanding == 1,
        "a blocked destination keeps its pipe",
    )
    .await;
    let mut sink = vec![0; 8 << 20];
    backend.read_exact(&mut sink).await.unwrap();
    let mut client = writer.await.unwrap();
    eventually(
        |s| s == pool::PoolStats::default(),
        "an idle spliced connection holds nothing",
    )
    .await;

    // Copy over TLS: the same, with buffers.
    let (tls_client, gw_tls) = tls_pair().await;
    let (gw_plain, mut plain_backend) = connected().await;
    let s = settings.clone();
    let copy = tokio::spawn(async move { relay::copy(gw_tls, gw_plain, &s, &NoTally).await });
    let (mut tls_rx, mut tls_tx) = tokio::io::split(tls_client);
    let writer = tokio::spawn(async move {
        tls_tx.write_all(&vec![9u8; 8 << 20]).await.unwrap();
        tls_tx.flush().await.unwrap();
        tls_tx
    });
    eventually(
        |s| s.buffers_outstanding == 1,
        "a blocked destination keeps its buffer",
    )
    .await;
    plain_backend.read_exact(&mut sink).await.unwrap();
    plain_backend.write_all(b"answer").await.unwrap();
    let mut answer = [0; 6];
    tls_rx.read_exact(&mut answer).await.unwrap();
    let tls_tx = writer.await.unwrap();
    eventually(
        |s| s == pool::PoolStats::default(),
        "idle connections hold nothing",
    )
    .await;

    // Both connections are still open and idle; closing them ends both relays cleanly.
    client.shutdown().await.unwrap();
    backend.shutdown().await.unwrap();
    let mut tls_client = tls_rx.unsplit(tls_tx);
    tls_client.shutdown().await.unwrap();
    plain_backend.shutdown().await.unwrap();
    for outcome in [splice.await.unwrap(), copy.await.unwrap()] {
        assert!(matches!(outcome.end, relay::End::Finished), "{outcome:?}");
    }
    assert_eq!(pool::stats(), pool::PoolStats::default());
}

/// Waits (a bounded while) for the pools to reach a state.
async fn eventually(want: impl Fn(pool::PoolStats) -> bool, what: &str) {
    for _ in 0..200 {
        if want(pool::stats()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: pools are {:?}", pool::stats());
}

struct NoTally;

impl Tally for NoTally {
    fn moved(&self, _: Direction, _: Path, _: u64) {}
    fn half_closed(&self, _: Direction) {}
    fn reset(&self, _: Direction) {}
}

async fn connected() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (near, far) = tokio::join!(
        TcpStream::connect(listener.local_addr().unwrap()),
        listener.accept()
    );
    (near.unwrap(), far.unwrap().0)
}

/// A TLS connection over loopback: (client side, server side), self-signed `localhost`.
async fn tls_pair() -> (
    tokio_rustls::client::TlsStream<TcpStream>,
    tokio_rustls::server::TlsStream<TcpStream>,
) {
    let (near, far) = connected().await;
    proxy::testing::LoopbackTls::new().wrap(near, far).await
}
