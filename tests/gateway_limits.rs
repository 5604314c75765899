//! The gateway-wide limits, each seen to refuse, counted with its reason, and to let go: the
//! global connection limit, the cap on handshakes in flight, the accept back-off when file
//! descriptors run out, and the backend connect timeout.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use control::pki::testing::{TestClient, TestPki};
use support::{GatewayProcess, backends, gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const REJECTED: &str = "bkpool_gateway_connections_rejected_total";

fn pki() -> Arc<TestPki> {
    Arc::new(TestPki::new().pool("a"))
}

/// A connection that completed its handshake and had a byte echoed by the backend.
async fn served(gw: &GatewayProcess, client: &TestClient) -> Option<TlsStream<TcpStream>> {
    let attempt = async {
        let mut tls = gw.connect(client).await.ok()?;
        tls.write_all(b"x").await.ok()?;
        let mut b = [0u8; 1];
        match tls.read(&mut b).await {
            Ok(1) => Some(tls),
            _ => None,
        }
    };
    tokio::time::timeout(Duration::from_secs(20), attempt)
        .await
        .expect("served or refused within 20 s, not left hanging")
}

/// A TCP connection from `source` (any address of 127.0.0.0/8), so tests can stand for many
/// clients without meeting the per-source caps.
async fn connect_from(source: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

/// Waits (5 s at most: the timeouts in these tests are far longer) for the gateway to close
/// `tcp` without a byte.
async fn closed_at_once(tcp: &mut TcpStream) {
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("closed at once, not left to time out");
    assert!(matches!(read, Ok(0) | Err(_)), "got bytes: {read:?}");
}

#[tokio::test]
async fn the_global_connection_limit_refuses_past_it_and_frees_a_slot_on_close() {
    let pki = pki();
    let backend = backends::echo().await;
    // Long handshake timeouts, so a refusal cannot be mistaken for a timeout.
    let gw = gateway(&pki)
        .pool("a", backend.addr)
        .top("[limits]\nmax_connections = 2\n[timeouts]\nclient_hello = \"30s\"\nhandshake = \"60s\"")
        .start();
    assert_eq!(
        gw.metric("bkpool_gateway_connections_limit", &[]).await,
        2.0
    );
    let alice = pki.client("a", "alice");
    let first = served(&gw, &alice).await.expect("the first is served");
    // A socket that has not sent a byte holds a slot too: the limit counts every accepted
    // connection, authenticated or not.
    let mut idle = TcpStream::connect(gw.listen).await.unwrap();
    gw.wait_metric("bkpool_gateway_client_connections", &[], 2.0)
        .await;

    let started = Instant::now();
    assert!(
        served(&gw, &alice).await.is_none(),
        "a third connection is over the limit"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once, not after a timeout: {:?}",
        started.elapsed()
    );
    let global = [("pool", ""), ("reason", "global_limit")];
    gw.wait_metric(REJECTED, &global, 1.0).await;
    assert_eq!(
        gw.metric("bkpool_gateway_client_connections", &[]).await,
        2.0,
        "the refused one held no slot"
    );

    // A slot comes back when a connection closes, whichever kind it was.
    idle.shutdown().await.unwrap();
    closed_at_once(&mut idle).await;
    gw.wait_metric("bkpool_gateway_client_connections", &[], 1.0)
        .await;
    let second = served(&gw, &alice)
        .await
        .expect("served once a slot is free");
    drop((first, second));
    gw.wait_metric("bkpool_gateway_client_connections", &[], 0.0)
        .await;
    assert_eq!(gw.metric(REJECTED, &global).await, 1.0);
}

#[tokio::test]
async fn a_flood_of_slow_handshakes_fills_the_cap_and_is_refused_past_it() {
    const CAP: u8 = 8;
    let pki = pki();
    let backend = backends::echo().await;
    // The flood comes from many source addresses, each far under the per-source cap (64 by
    // default): what refuses it is the global cap on handshakes in flight.
    let gw = gateway(&pki)
        .pool("a", backend.addr)
        .top(&format!(
            "[limits]\nmax_handshakes = {CAP}\n[timeouts]\nclient_hello = \"30s\"\nhandshake = \"60s\""
        ))
        .start();
    let hello = include_bytes!("../fuzz/corpus/clienthello/seed-openssl-sni-alpn-h2");
    let mut flood = Vec::new();
    for i in 0..CAP {
        let mut tcp = connect_from([127, 0, 1, 10 + i], gw.listen).await;
        // Half of them send nothing, half send half a ClientHello.
        if i % 2 == 1 {
            tcp.write_all(&hello[..hello.len() / 2]).await.unwrap();
        }
        flood.push(tcp);
    }
    gw.wait_metric("bkpool_gateway_handshakes_in_flight", &[], CAP.into())
        .await;

    // Past the cap, a slow client is refused at once, from any address...
    let capped = [("pool", ""), ("reason", "handshake_limit")];
    for i in 0..4u8 {
        let mut late = connect_from([127, 0, 1, 100 + i], gw.listen).await;
        closed_at_once(&mut late).await;
    }
    gw.wait_metric(REJECTED, &capped, 4.0).await;
    // ...and so is a real client while the flood lasts: that is what the per-source cap is
    // for, and this flood comes from many sources.
    let alice = pki.client("a", "alice");
    assert!(served(&gw, &alice).await.is_none(), "the cap is full");
    gw.wait_metric(REJECTED, &capped, 5.0).await;
    assert_eq!(
        gw.metric("bkpool_gateway_handshakes_in_flight", &[]).await,
        f64::from(CAP),
        "refused connections took no handshake slot"
    );

    // The flood goes away: every slot comes back, and a real client is served.
    drop(flood);
    gw.wait_metric("bkpool_gateway_handshakes_in_flight", &[], 0.0)
        .await;
    gw.wait_metric("bkpool_gateway_client_connections", &[], 0.0)
        .await;
    let ok = served(&gw, &alice).await;
    assert!(ok.is_some(), "served once the flood is gone");
    assert_eq!(gw.metric(REJECTED, &capped).await, 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_accept_loop_backs_off_and_recovers() {
    const OPEN_FILES: u64 = 256;
    let pki = pki();
    let backend = backends::echo().await;
    let gw = gateway(&pki)
        .pool("a", backend.addr)
        .open_files(OPEN_FILES)
        .start();
    // The gateway's own connections cannot exhaust its descriptors: its connection limit
    // follows them (two per connection, 128 kept in reserve).
    assert_eq!(
        gw.metric("bkpool_gateway_connections_limit", &[]).await,
        ((OPEN_FILES - 128) / 2) as f64
    );
    // Descriptors outside that limit can: here, idle connections to the admin endpoint.
    let mut hogs = Vec::new();
    for _ in 0..OPEN_FILES + 64 {
        hogs.push(TcpStream::connect(gw.admin).await.unwrap());
    }
    // The kernel completes this client's TCP handshake; the gateway cannot accept it yet.
    let alice = pki.client("a", "alice");
    let listen = gw.listen;
    let pending = tokio::spawn(async move {
        let config = alice.arc_config(&[b"h2"]);
        let tcp = TcpStream::connect(listen).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        tls.write_all(b"ping").await?;
        let mut back = [0u8; 4];
        tls.read_exact(&mut back).await?;
        std::io::Result::Ok(back)
    });
    let out_of_fds = "accept failed: out of file descriptors";
    let deadline = Instant::now() + Duration::from_secs(20);
    while !gw.log_text().contains(out_of_fds) {
        assert!(
            Instant::now() < deadline,
            "no back-off logged; log:\n{}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exhausted_at = Instant::now();
    // Held long enough for the back-off to reach its ceiling (1 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!pending.is_finished(), "served while out of descriptors?");

    drop(hogs);
    let held = exhausted_at.elapsed();
    let back = tokio::time::timeout(Duration::from_secs(20), pending)
        .await
        .expect("the accept loop recovers once descriptors are free")
        .unwrap()
        .expect("the waiting client is served");
    assert_eq!(&back, b"ping");
    let backoffs = gw
        .metric(REJECTED, &[("pool", ""), ("reason", "accept_fd_exhausted")])
        .await;
    // 5 ms doubling to 1 s: about eight failed accepts in the first second, then one a
    // second. A loop that spun would count thousands.
    let bound = 20.0 + held.as_secs_f64() * 2.0;
    eprintln!("{backoffs} failed accepts while out of descriptors for {held:?}");
    assert!(
        (1.0..=bound).contains(&backoffs),
        "{backoffs} failed accepts in {held:?}: a back-off allows at most {bound}"
    );
    // And it goes on serving.
    assert!(served(&gw, &pki.client("a", "bob")).await.is_some());
}

#[tokio::test]
async fn a_backend_that_never_answers_the_syn_fails_the_client_at_the_connect_timeout() {
    let pki = pki();
    // A listener with a full accept queue: the kernel drops the gateway's SYN, as a
    // blackholed address would.
    let backend = backends::unanswered();
    let gw = gateway(&pki)
        .pool("a", backend.addr)
        .with("[pool.timeouts]\nconnect = \"1s\"")
        .start();
    // The handshake completes before the backend is dialled.
    let mut tls = gw.connect(&pki.client("a", "alice")).await.unwrap();
    let started = Instant::now();
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(15), tls.read(&mut buf))
        .await
        .expect("the client is not left hanging");
    let waited = started.elapsed();
    assert!(matches!(read, Ok(0) | Err(_)), "got bytes: {read:?}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "closed after {waited:?}, for a 1 s connect timeout"
    );
    gw.wait_metric(
        REJECTED,
        &[("pool", "local/a"), ("reason", "backend_timeout")],
        1.0,
    )
    .await;
    gw.wait_metric("bkpool_gateway_client_connections", &[], 0.0)
        .await;
    gw.wait_metric(
        "bkpool_gateway_connections_open",
        &[("pool", "local/a")],
        0.0,
    )
    .await;
    assert!(
        gw.log_text().contains("backend unreachable"),
        "the failure is logged; log:\n{}",
        gw.log_text()
    );
}
