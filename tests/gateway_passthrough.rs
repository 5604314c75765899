//! End-to-end: passthrough mode routes by the ClientHello's SNI without terminating TLS, then
//! splices raw bytes; the backend terminates mTLS itself.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use control::pki::testing::TestPki;
use rustls::pki_types::ServerName;
use support::{Pattern, backends, gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A real ClientHello naming `sni`, as the first bytes a TLS client sends.
fn client_hello(pki: &TestPki, sni: &str) -> Vec<u8> {
    let config = Arc::new(pki.client("a", "alice").config(&[b"h2"]));
    let mut conn =
        rustls::ClientConnection::new(config, ServerName::try_from(sni.to_string()).unwrap())
            .unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// Reads and discards one TLS record-framed ClientHello, then sinks and checks `total`
/// pattern bytes, answering with "ok" once all arrived.
async fn raw_sink_after_hello(total: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut header = [0u8; 5];
        tcp.read_exact(&mut header).await.unwrap();
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        let mut hello = vec![0u8; len];
        tcp.read_exact(&mut hello).await.unwrap();
        let mut expected = Pattern::new(9);
        let (mut want, mut got) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        let mut received = 0;
        while received < total {
            let n = (1 << 20).min(total - received);
            tcp.read_exact(&mut got[..n]).await.unwrap();
            expected.fill(&mut want[..n]);
            assert!(
                got[..n] == want[..n],
                "splice corrupted bytes at offset {received}"
            );
            received += n;
        }
        tcp.write_all(b"ok").await.unwrap();
        tcp.shutdown().await.unwrap();
    });
    addr
}

#[tokio::test]
async fn tls_flows_end_to_end_through_passthrough_with_the_backend_verifying_the_client() {
    let pki = Arc::new(TestPki::new().pool("a").server_name("builds.example"));
    let backend = backends::tls_echo(&pki, "a").await;
    let gw = gateway(&pki)
        .passthrough("a", "builds.example", backend)
        .start();
    let tcp = TcpStream::connect(gw.listen).await.unwrap();
    let config = pki.client("a", "alice").arc_config(&[b"h2"]);
    let name = ServerName::try_from("builds.example").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "negotiated with the backend itself"
    );
    tls.write_all(b"through the tunnel").await.unwrap();
    let mut back = [0u8; 18];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"through the tunnel");
    gw.wait_metric(
        "bkpool_gateway_connections_open",
        &[("pool", "local/a")],
        1.0,
    )
    .await;
    assert!(
        gw.metric("bkpool_gateway_relay_bytes_total", &[("path", "splice")])
            .await
            > 0.0,
        "passthrough splices"
    );
}

#[tokio::test]
async fn an_sni_split_across_segments_is_still_routed() {
    let pki = Arc::new(TestPki::new().pool("a").server_name("builds.example"));
    let backend = backends::tls_echo(&pki, "a").await;
    let gw = gateway(&pki)
        .passthrough("a", "builds.example", backend)
        .start();
    let hello = client_hello(&pki, "builds.example");
    let mut tcp = TcpStream::connect(gw.listen).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    // A byte per segment, paced so the whole ClientHello still arrives well within the
    // ClientHello deadline (3 s by default): tokio's timer sleeps at least a millisecond.
    for (i, byte) in hello.iter().enumerate() {
        tcp.write_all(&[*byte]).await.unwrap();
        if i % 4 == 3 {
            tokio::time::sleep(Duration::from_micros(300)).await;
        }
    }
    // The backend answers a whole ClientHello with a ServerHello: the bytes were replayed intact.
    let mut record = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut record))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record[0], 0x16, "a handshake record from the backend");
}

#[tokio::test]
async fn unknown_sni_and_garbage_are_refused_and_counted() {
    let pki = Arc::new(TestPki::new().pool("a").server_name("builds.example"));
    let backend = backends::echo().await;
    let gw = gateway(&pki)
        .passthrough("a", "builds.example", backend.addr)
        .start();
    for (bytes, reason) in [
        (client_hello(&pki, "other.example"), "no_route"),
        (b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(), "not_tls"),
        (
            vec![0x16, 0x03, 0x01, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00],
            "bad_client_hello",
        ),
    ] {
        let mut tcp = TcpStream::connect(gw.listen).await.unwrap();
        tcp.write_all(&bytes).await.unwrap();
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink)).await;
        assert!(
            closed.is_ok(),
            "{reason}: not closed; log:\n{}",
            gw.log_text()
        );
        gw.wait_metric(
            "bkpool_gateway_connections_rejected_total",
            &[("pool", ""), ("reason", reason)],
            1.0,
        )
        .await;
    }
    assert_eq!(backend.accepted(), 0, "nothing reached the backend");
}

#[tokio::test]
async fn a_gibibyte_through_the_splice_path_arrives_intact() {
    const TOTAL: usize = 1 << 30;
    let pki = Arc::new(TestPki::new().pool("a").server_name("builds.example"));
    let backend = raw_sink_after_hello(TOTAL).await;
    let gw = gateway(&pki)
        .passthrough("a", "builds.example", backend)
        .start();
    let mut tcp = TcpStream::connect(gw.listen).await.unwrap();
    tcp.write_all(&client_hello(&pki, "builds.example"))
        .await
        .unwrap();
    let started = Instant::now();
    let (mut r, mut w) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let mut pattern = Pattern::new(9);
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..TOTAL >> 20 {
            pattern.fill(&mut buf);
            w.write_all(&buf).await.unwrap();
        }
        w
    });
    let mut answer = Vec::new();
    r.read_to_end(&mut answer).await.unwrap();
    let _w = writer.await.unwrap();
    assert_eq!(answer, b"ok");
    eprintln!("1 GiB through passthrough in {:?}", started.elapsed());
    gw.wait_metric(
        "bkpool_gateway_bytes_total",
        &[("pool", "local/a"), ("direction", "in")],
        (TOTAL + client_hello(&pki, "builds.example").len()) as f64,
    )
    .await;
    // Bytes that arrived with the ClientHello are replayed by a copy; the rest is spliced.
    let spliced = gw
        .metric("bkpool_gateway_relay_bytes_total", &[("path", "splice")])
        .await;
    assert!(
        spliced >= (TOTAL - (64 << 10)) as f64,
        "only {spliced} bytes spliced"
    );
}

#[tokio::test]
async fn buffered_client_hellos_are_bounded_by_their_memory_budget() {
    let pki = Arc::new(TestPki::new().pool("a").server_name("builds.example"));
    // A backend whose dial hangs: each ClientHello stays buffered until the dial gives up.
    let backend = backends::unanswered();
    let gw = gateway(&pki)
        .top("[limits]\nmax_client_hello_bytes = 17408\n[timeouts]\nconnect = \"3s\"")
        .passthrough("a", "builds.example", backend.addr)
        .start();
    let hello = client_hello(&pki, "builds.example");
    let fits = 17408 / hello.len();
    let mut clients = Vec::new();
    for _ in 0..fits + 3 {
        let mut tcp = TcpStream::connect(gw.listen).await.unwrap();
        tcp.write_all(&hello).await.unwrap();
        clients.push(tcp);
    }
    let refused = [("pool", "local/a"), ("reason", "client_hello_memory")];
    gw.wait_metric("bkpool_gateway_connections_rejected_total", &refused, 3.0)
        .await;
    let buffered = gw.metric("bkpool_gateway_client_hello_bytes", &[]).await;
    assert_eq!(buffered, (fits * hello.len()) as f64);
    // Given back when the connections end.
    gw.wait_metric("bkpool_gateway_client_hello_bytes", &[], 0.0)
        .await;
}
