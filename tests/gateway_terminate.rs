//! End-to-end: `bkpool gateway` terminating mTLS for real rustls clients in front of real
//! backends.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use control::pki::testing::TestPki;
use support::{Pattern, backends, gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1024 * 1024;

fn pki() -> Arc<TestPki> {
    Arc::new(TestPki::new().pool("a").pool("b"))
}

/// Writes `total` pattern bytes on one half while checking the echo on the other.
async fn echo_roundtrip<S>(stream: S, total: usize, chunk: usize) -> usize
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        let mut pattern = Pattern::new(42);
        let mut buf = vec![0u8; chunk];
        let mut sent = 0;
        while sent < total {
            let n = chunk.min(total - sent);
            pattern.fill(&mut buf[..n]);
            w.write_all(&buf[..n]).await.unwrap();
            sent += n;
        }
        w.shutdown().await.unwrap();
    });
    let mut expected = Pattern::new(42);
    let mut want = vec![0u8; chunk];
    let mut got = vec![0u8; chunk];
    let mut received = 0;
    while received < total {
        let n = chunk.min(total - received);
        r.read_exact(&mut got[..n]).await.unwrap();
        expected.fill(&mut want[..n]);
        assert!(
            got[..n] == want[..n],
            "bytes differ in the chunk at offset {received}"
        );
        received += n;
    }
    writer.await.unwrap();
    assert_eq!(
        r.read(&mut got).await.unwrap(),
        0,
        "nothing after the echoed bytes"
    );
    received
}

#[tokio::test]
async fn a_hundred_mebibytes_each_way_arrive_intact() {
    let pki = pki();
    let backend = backends::echo().await;
    let gw = gateway(&pki).pool("a", backend.addr).start();
    let tls = gw.connect(&pki.client("a", "alice")).await.unwrap();
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "h2 is selected when offered"
    );
    let started = Instant::now();
    let moved = echo_roundtrip(tls, 100 * MIB, 64 * 1024).await;
    eprintln!(
        "100 MiB each way through the gateway in {:?}",
        started.elapsed()
    );
    assert_eq!(moved, 100 * MIB);
    gw.wait_metric(
        "bkpool_gateway_bytes_total",
        &[("pool", "local/a"), ("direction", "in")],
        (100 * MIB) as f64,
    )
    .await;
    gw.wait_metric(
        "bkpool_gateway_bytes_total",
        &[("pool", "local/a"), ("direction", "out")],
        (100 * MIB) as f64,
    )
    .await;
    gw.wait_metric(
        "bkpool_gateway_connections_open",
        &[("pool", "local/a")],
        0.0,
    )
    .await;
}

#[tokio::test]
async fn tiny_writes_arrive_in_order() {
    let pki = pki();
    let backend = backends::echo().await;
    let gw = gateway(&pki).pool("a", backend.addr).start();
    let tls = gw.connect(&pki.client("a", "alice")).await.unwrap();
    assert_eq!(echo_roundtrip(tls, 20_000, 1).await, 20_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections_are_served() {
    let pki = pki();
    let backend = backends::echo().await;
    // Generous timeouts: this test measures concurrency, not speed, and shares two cores
    // with the other tests.
    let gw = Arc::new(
        gateway(&pki)
            .pool("a", backend.addr)
            .top("[timeouts]\nhandshake = \"60s\"\nconnect = \"30s\"")
            .start(),
    );
    let client = pki.client("a", "alice");
    // Open them 50 at a time (the client side does its TLS in a debug build), hold all 1000.
    let gate = Arc::new(tokio::sync::Semaphore::new(50));
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let (gw, client, gate) = (gw.clone(), client.clone(), gate.clone());
            tokio::spawn(async move {
                let permit = gate.acquire_owned().await.unwrap();
                let mut tls = gw.connect(&client).await.unwrap();
                let msg = format!("hello {i}");
                tls.write_all(msg.as_bytes()).await.unwrap();
                let mut back = vec![0u8; msg.len()];
                tls.read_exact(&mut back).await.unwrap();
                assert_eq!(back, msg.as_bytes());
                drop(permit);
                tls
            })
        })
        .collect();
    let mut open = Vec::new();
    let mut failed = 0;
    for t in tasks {
        match t.await {
            Ok(tls) => open.push(tls),
            Err(_) => failed += 1,
        }
    }
    if failed > 0 {
        let rejected: Vec<String> = gw
            .metrics()
            .await
            .lines()
            .filter(|l| l.contains("rejected_total"))
            .map(String::from)
            .collect();
        panic!("{failed} of 1000 connections failed; refusals: {rejected:#?}");
    }
    gw.wait_metric(
        "bkpool_gateway_connections_open",
        &[("pool", "local/a")],
        1000.0,
    )
    .await;
    // All 1000 at once, full duplex: each echoes again while all are open.
    let round: Vec<_> = open
        .into_iter()
        .enumerate()
        .map(|(i, mut tls)| {
            tokio::spawn(async move {
                let msg = format!("again {i}");
                tls.write_all(msg.as_bytes()).await.unwrap();
                let mut back = vec![0u8; msg.len()];
                tls.read_exact(&mut back).await.unwrap();
                assert_eq!(back, msg.as_bytes());
                tls
            })
        })
        .collect();
    let mut open = Vec::new();
    for t in round {
        open.push(t.await.unwrap());
    }
    drop(open);
    gw.wait_metric(
        "bkpool_gateway_connections_open",
        &[("pool", "local/a")],
        0.0,
    )
    .await;
    assert_eq!(
        gw.metric(
            "bkpool_gateway_connections_accepted_total",
            &[("pool", "local/a")]
        )
        .await,
        1000.0
    );
}

/// Runs `attempt` and checks the gateway refused it with `reason`, and that a good client is
/// still served afterwards.
async fn refused_with(
    gw: &support::GatewayProcess,
    pki: &TestPki,
    reason: &str,
    attempt: impl std::future::Future<Output = ()>,
) {
    let before = gw
        .metric(
            "bkpool_gateway_connections_rejected_total",
            &[("pool", ""), ("reason", reason)],
        )
        .await;
    attempt.await;
    gw.wait_metric(
        "bkpool_gateway_connections_rejected_total",
        &[("pool", ""), ("reason", reason)],
        before + 1.0,
    )
    .await;
    let mut ok = gw
        .connect(&pki.client("a", "alice"))
        .await
        .expect("a good client is still served");
    ok.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    ok.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
}

/// With TLS 1.3 a client learns that its certificate was refused only when it reads.
async fn expect_refused(
    result: std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
) {
    if let Ok(mut tls) = result {
        let _ = tls.write_all(b"x").await;
        let mut buf = [0u8; 1];
        let read = tls.read(&mut buf).await;
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "a refused client must not get bytes: {read:?}"
        );
    }
}

#[tokio::test]
async fn bad_clients_are_refused_with_their_reason_and_others_keep_working() {
    let pki = pki();
    let backend = backends::echo().await;
    let gw = gateway(&pki)
        .pool("a", backend.addr)
        .pool("b", backend.addr)
        .top("[timeouts]\nhandshake = \"1s\"")
        .start();

    refused_with(&gw, &pki, "cert_untrusted", async {
        expect_refused(gw.connect(&pki.client_from_other_ca("a", "eve")).await).await
    })
    .await;
    refused_with(&gw, &pki, "cert_untrusted", async {
        expect_refused(
            gw.connect(&pki.client_for_pool_signed_by("a", "b", "mallory"))
                .await,
        )
        .await
    })
    .await;
    refused_with(&gw, &pki, "cert_expired", async {
        expect_refused(gw.connect(&pki.expired_client("a", "old")).await).await
    })
    .await;
    refused_with(&gw, &pki, "cert_purpose", async {
        expect_refused(
            gw.connect(&pki.client_without_client_auth_eku("a", "srv"))
                .await,
        )
        .await
    })
    .await;
    refused_with(&gw, &pki, "cert_no_pool", async {
        expect_refused(
            gw.connect(&pki.client_naming_two_pools("a", "b", "twin"))
                .await,
        )
        .await
    })
    .await;
    refused_with(&gw, &pki, "no_client_cert", async {
        let tcp = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
        let config = Arc::new(pki.anonymous_config(&[b"h2"]));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        expect_refused(
            tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await,
        )
        .await
    })
    .await;
    refused_with(&gw, &pki, "tls_protocol", async {
        let mut tcp = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tcp.read_to_end(&mut buf).await;
    })
    .await;
    refused_with(&gw, &pki, "tls_protocol", async {
        let mut tcp = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
        tcp.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5, 6, 7, 8])
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tcp.read_to_end(&mut buf).await;
    })
    .await;
    refused_with(&gw, &pki, "handshake_timeout", async {
        let mut tcp = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
        tcp.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        let started = Instant::now();
        let mut buf = Vec::new();
        let _ = tcp.read_to_end(&mut buf).await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
            "closed after {waited:?}"
        );
    })
    .await;
    // Nothing unauthenticated counts as pool activity.
    assert_eq!(
        gw.metric(
            "bkpool_gateway_connections_accepted_total",
            &[("pool", "local/b")]
        )
        .await,
        0.0
    );
}

#[tokio::test]
async fn a_certificate_for_one_pool_reaches_that_pool_only() {
    let pki = pki();
    let (ba, bb) = (backends::echo().await, backends::echo().await);
    let gw = gateway(&pki).pool("a", ba.addr).pool("b", bb.addr).start();
    for (pool, backend) in [("a", &ba), ("b", &bb)] {
        let mut tls = gw.connect(&pki.client(pool, "alice")).await.unwrap();
        tls.write_all(b"hi").await.unwrap();
        let mut back = [0u8; 2];
        tls.read_exact(&mut back).await.unwrap();
        assert_eq!(backend.accepted(), 1, "pool {pool} went to its own backend");
    }
}

#[tokio::test]
async fn half_close_lets_the_backend_answer_after_the_request() {
    let pki = pki();
    let backend = backends::answer_after_eof(3 * MIB).await;
    let gw = gateway(&pki).pool("a", backend.addr).start();
    let mut tls = gw.connect(&pki.client("a", "alice")).await.unwrap();
    tls.write_all(&vec![b'r'; 100_000]).await.unwrap();
    tls.shutdown().await.unwrap(); // close_notify: the request is complete
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await.unwrap();
    let header = b"reply-to:100000\n";
    assert_eq!(&answer[..header.len()], header);
    let mut body = vec![0u8; 3 * MIB];
    Pattern::new(7).fill(&mut body);
    assert!(
        answer[header.len()..] == body[..],
        "the whole answer arrived after the half-close"
    );
    gw.wait_metric(
        "bkpool_gateway_half_closes_total",
        &[("direction", "in")],
        1.0,
    )
    .await;
}

#[tokio::test]
async fn a_backend_reset_ends_the_client_connection_promptly() {
    let pki = pki();
    let backend = backends::reset_after(1000).await;
    let gw = gateway(&pki).pool("a", backend.addr).start();
    let mut tls = gw.connect(&pki.client("a", "alice")).await.unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
            .await
            .expect("ended promptly")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    assert_eq!(got.len(), 1000, "bytes sent before the reset arrived");
    assert!(started.elapsed() < Duration::from_secs(2));
    gw.wait_metric("bkpool_gateway_resets_total", &[("direction", "out")], 1.0)
        .await;
}

#[tokio::test]
async fn pool_and_identity_limits_refuse_and_release() {
    let pki = pki();
    let backend = backends::echo().await;
    let gw = gateway(&pki)
        .pool("a", backend.addr)
        .with("[pool.limits]\nmax_connections = 3\nmax_connections_per_identity = 2")
        .start();
    let (alice, bob) = (pki.client("a", "alice"), pki.client("a", "bob"));
    async fn served(
        gw: &support::GatewayProcess,
        c: &control::pki::testing::TestClient,
    ) -> Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let mut tls = gw.connect(c).await.ok()?;
        tls.write_all(b"x").await.ok()?;
        let mut b = [0u8; 1];
        match tls.read(&mut b).await {
            Ok(1) => Some(tls),
            _ => None,
        }
    }
    let a1 = served(&gw, &alice).await.expect("alice 1");
    let _a2 = served(&gw, &alice).await.expect("alice 2");
    assert!(
        served(&gw, &alice).await.is_none(),
        "alice's third is over her limit"
    );
    gw.wait_metric(
        "bkpool_gateway_connections_rejected_total",
        &[("pool", "local/a"), ("reason", "identity_limit")],
        1.0,
    )
    .await;
    let _b1 = served(&gw, &bob).await.expect("bob is unaffected");
    assert!(served(&gw, &bob).await.is_none(), "the pool is full");
    gw.wait_metric(
        "bkpool_gateway_connections_rejected_total",
        &[("pool", "local/a"), ("reason", "pool_limit")],
        1.0,
    )
    .await;
    drop(a1);
    gw.wait_metric(
        "bkpool_gateway_connections_open",
        &[("pool", "local/a")],
        2.0,
    )
    .await;
    assert!(
        served(&gw, &alice).await.is_some(),
        "a slot came back on close"
    );
}

#[tokio::test]
async fn metrics_are_valid_openmetrics_and_activity_is_json() {
    let pki = pki();
    let backend = backends::echo().await;
    let gw = gateway(&pki).pool("a", backend.addr).start();
    let mut tls = gw.connect(&pki.client("a", "alice")).await.unwrap();
    tls.write_all(b"hello").await.unwrap();
    let mut back = [0u8; 5];
    tls.read_exact(&mut back).await.unwrap();
    let text = gw.metrics().await;
    let samples = support::metrics::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    for name in [
        "bkpool_gateway_connections_open",
        "bkpool_gateway_connections_accepted_total",
        "bkpool_gateway_bytes_total",
        "bkpool_gateway_handshake_duration_seconds_bucket",
        "bkpool_gateway_handshakes_in_flight",
        "bkpool_gateway_last_activity_timestamp_seconds",
        "bkpool_gateway_relay_bytes_total",
    ] {
        assert!(
            samples.iter().any(|s| s.name == name),
            "{name} missing from\n{text}"
        );
    }
    let (status, body) = gw.get("/activity").await;
    assert_eq!(status, 200);
    let snapshot: proxy::activity::Snapshot = serde_json::from_str(&body).unwrap();
    let a = snapshot
        .pools
        .iter()
        .find(|p| p.pool == "local/a")
        .expect("pool a in /activity");
    assert_eq!((a.open, a.accepted), (1, 1));
    assert!(a.last_activity_ms > 0);
    assert_eq!(gw.get("/healthz").await.0, 200);
    assert_eq!(gw.get("/readyz").await.0, 200);
}

/// A TLS 1.2-only client configuration for `client` whose session cache is kept across
/// connections (as `openssl s_client -sess_out`/`-sess_in` keeps one in a file), so every
/// connection after the first offers to resume.
fn tls12_resuming(client: &control::pki::testing::TestClient) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls::pki_types::pem::PemObject::from_pem_slice(client.server_ca_pem.as_bytes());
    roots.add(ca.unwrap()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(client.chain_der(), client.key_der())
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Connects with `config`, echoes one message, and says how the handshake went.
async fn echo_once(
    gw: &support::GatewayProcess,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<rustls::HandshakeKind> {
    let tcp = tokio::net::TcpStream::connect(gw.listen).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await?;
    let kind = tls.get_ref().1.handshake_kind().unwrap();
    tls.write_all(b"ping").await?;
    let mut back = [0u8; 4];
    tls.read_exact(&mut back).await?;
    assert_eq!(&back, b"ping");
    Ok(kind)
}

#[tokio::test]
async fn a_tls12_session_is_never_resumed_so_an_expired_certificate_stays_out() {
    use control::pki::IssueOptions;
    use std::time::SystemTime;
    let pki = pki();
    let backend = backends::echo().await;
    let gw = gateway(&pki).pool("a", backend.addr).start();
    let now = SystemTime::now();
    let expires = now + Duration::from_secs(5);
    let window = IssueOptions::new().valid_between(now - Duration::from_secs(60), expires);
    let brief = pki.client_with("a", "a", "brief", window);
    let config = tls12_resuming(&brief);

    let first = echo_once(&gw, &config).await.expect("served while valid");
    assert_eq!(first, rustls::HandshakeKind::Full);
    let second = echo_once(&gw, &config).await.expect("still valid");
    assert_eq!(
        second,
        rustls::HandshakeKind::Full,
        "the session offered for resumption is refused: every handshake verifies the certificate"
    );

    // Certificate times have one-second precision: wait until it is unambiguously expired.
    let past = expires + Duration::from_millis(1500);
    tokio::time::sleep(past.duration_since(SystemTime::now()).unwrap_or_default()).await;
    let reason = [("pool", ""), ("reason", "cert_expired")];
    let before = gw
        .metric("bkpool_gateway_connections_rejected_total", &reason)
        .await;
    let after_expiry = echo_once(&gw, &config).await;
    assert!(
        after_expiry.is_err(),
        "an expired certificate was served again: {after_expiry:?}"
    );
    gw.wait_metric(
        "bkpool_gateway_connections_rejected_total",
        &reason,
        before + 1.0,
    )
    .await;
    assert_eq!(
        backend.accepted(),
        2,
        "nothing reached the backend after expiry"
    );
}

#[tokio::test]
async fn a_tls12_session_does_not_survive_a_rotation_that_drops_its_issuer() {
    let pki = pki();
    let backend = backends::echo().await;
    let gw = gateway(&pki).pool("a", backend.addr).start();
    let config = tls12_resuming(&pki.client("a", "alice"));
    assert_eq!(
        echo_once(&gw, &config).await.unwrap(),
        rustls::HandshakeKind::Full
    );

    // The pool's client CA is replaced by one that did not issue alice's certificate.
    let successor = control::pki::Ca::generate("successor", Duration::from_secs(3600)).unwrap();
    std::fs::write(pki.client_ca_path("a"), successor.cert_pem()).unwrap();
    gw.wait_metric(
        "bkpool_gateway_credential_reloads_total",
        &[("kind", "client_ca"), ("result", "ok")],
        1.0,
    )
    .await;
    let reason = [("pool", ""), ("reason", "cert_untrusted")];
    let resumed = echo_once(&gw, &config).await;
    assert!(
        resumed.is_err(),
        "a session from before the rotation was served: {resumed:?}"
    );
    gw.wait_metric("bkpool_gateway_connections_rejected_total", &reason, 1.0)
        .await;
    assert_eq!(backend.accepted(), 1);
}

/// One echoed message.
async fn ping<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    tls: &mut S,
) -> std::io::Result<()> {
    tls.write_all(b"ping").await?;
    let mut back = [0u8; 4];
    tls.read_exact(&mut back).await?;
    assert_eq!(&back, b"ping");
    Ok(())
}

#[tokio::test]
async fn an_open_connection_ends_when_its_certificate_expires() {
    use control::pki::IssueOptions;
    use std::time::SystemTime;
    let pki = pki();
    let backend = backends::echo().await;
    let gw = gateway(&pki).pool("a", backend.addr).start();
    let now = SystemTime::now();
    let expires = now + Duration::from_secs(4);
    let window = IssueOptions::new().valid_between(now - Duration::from_secs(60), expires);
    let mut brief = gw
        .connect(&pki.client_with("a", "a", "brief", window))
        .await
        .unwrap();
    let mut lasting = gw.connect(&pki.client("a", "alice")).await.unwrap();

    // Both stay busy (no idle timeout applies); the brief one is cut when its certificate
    // expires (certificate times have one-second precision), the other goes on.
    let cut = loop {
        if ping(&mut brief).await.is_err() {
            break SystemTime::now();
        }
        ping(&mut lasting)
            .await
            .expect("the lasting connection goes on");
        assert!(
            SystemTime::now() < expires + Duration::from_secs(5),
            "still served after its certificate expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(cut + Duration::from_secs(1) >= expires, "cut early");
    ping(&mut lasting)
        .await
        .expect("the lasting connection goes on");
    gw.wait_metric(
        "bkpool_gateway_connections_expired_total",
        &[("pool", "local/a")],
        1.0,
    )
    .await;
}

#[tokio::test]
async fn a_connection_counts_as_open_while_its_backend_is_dialled() {
    let pki = pki();
    let backend = backends::unanswered();
    let gw = gateway(&pki)
        .pool("a", backend.addr)
        .top("[timeouts]\nconnect = \"4s\"")
        .start();
    let client = pki.client("a", "alice");
    let mut tls = gw.connect(&client).await.unwrap();
    tls.write_all(b"ping").await.unwrap();
    // Authenticated and routed, its backend still being dialled: the scaler must see it,
    // or a drain could scale the pool to zero under it.
    gw.wait_metric(
        "bkpool_gateway_connections_open",
        &[("pool", "local/a")],
        1.0,
    )
    .await;
    let (_, body) = gw.get("/activity").await;
    let snapshot: proxy::activity::Snapshot = serde_json::from_str(&body).unwrap();
    let a = snapshot.pools.iter().find(|p| p.pool == "local/a").unwrap();
    assert_eq!(a.open, 1, "{a:?}");
    gw.wait_metric(
        "bkpool_gateway_connections_rejected_total",
        &[("pool", "local/a"), ("reason", "backend_timeout")],
        1.0,
    )
    .await;
    gw.wait_metric(
        "bkpool_gateway_connections_open",
        &[("pool", "local/a")],
        0.0,
    )
    .await;
}

/// The soft open-files limit of this process, from /proc/self/limits.
fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_trickling_sockets_from_one_source_do_not_stop_a_real_handshake() {
    const TRICKLERS: usize = 1024;
    // This process holds the trickling sockets (the gateway, its own process, raises its limit).
    let limit = open_files_limit();
    assert!(
        limit >= TRICKLERS as u64 + 256,
        "this test needs {} open files; the soft limit is {limit} (ulimit -n)",
        TRICKLERS + 256
    );
    let pki = pki();
    let backend = backends::echo().await;
    let gw = gateway(&pki)
        .pool("a", backend.addr)
        .top("[timeouts]\nclient_hello = \"2s\"")
        .start();
    // Every socket from one address, each starting a TLS record it never finishes.
    let mut sockets = Vec::with_capacity(TRICKLERS);
    for _ in 0..TRICKLERS {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut tcp = socket.connect(gw.listen).await.unwrap();
        tcp.write_all(&[0x16]).await.unwrap();
        sockets.push(tcp);
    }
    let trickle = tokio::spawn(async move {
        for byte in [0x03, 0x01, 0x02, 0x00]
            .into_iter()
            .chain(std::iter::repeat(0))
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
            for tcp in &mut sockets {
                let _ = tcp.write_all(&[byte]).await;
            }
        }
    });
    // Past the per-source cap, the rest are refused at once, holding no global slot.
    gw.wait_metric(
        "bkpool_gateway_connections_rejected_total",
        &[("pool", ""), ("reason", "handshake_source_limit")],
        (TRICKLERS - 64) as f64,
    )
    .await;
    let started = Instant::now();
    let mut tls = tokio::time::timeout(
        Duration::from_secs(5),
        gw.connect(&pki.client("a", "alice")),
    )
    .await
    .expect("handshake within 5 s")
    .expect("a real client is served while the trickling sockets are open");
    tls.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tls.read_exact(&mut back).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "served at once");
    // The ones that got a slot are cut at the ClientHello deadline, trickling or not.
    gw.wait_metric(
        "bkpool_gateway_connections_rejected_total",
        &[("pool", ""), ("reason", "client_hello_timeout")],
        64.0,
    )
    .await;
    assert_eq!(
        gw.metric("bkpool_gateway_handshakes_in_flight", &[]).await,
        0.0
    );
    trickle.abort();
}
