//! End-to-end: `bkpool local` wakes a sleeping pool on the first authenticated connection,
//! once however many arrive, and nothing else wakes it. Replicas are real processes (the
//! built-in stand-in, or a command that never becomes healthy).

mod support;

use std::time::Duration;

use control::health::Health;
use control::scale::Phase;
use support::local::{alive, anonymous_config, local};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn standin_pool(name: &str, scaling: &str) -> String {
    format!(
        "[[pool]]\nname = \"{name}\"\n[pool.scaling]\n{scaling}\n[pool.replica]\nstandin = true\n"
    )
}

#[tokio::test]
async fn a_connection_to_a_sleeping_pool_wakes_it_and_its_bytes_flow() {
    let bk = local("31000-31009", &standin_pool("default", ""));
    let tls = bk.issue("default");
    assert_eq!(bk.pool("default").await.state, Phase::Sleeping);
    assert!(
        bk.replica_pids().is_empty(),
        "nothing runs before a connection"
    );

    // gRPC health over mTLS with ALPN h2, through the gateway, to the woken stand-in.
    assert_eq!(bk.health(&tls).await.unwrap(), Health::Serving);
    let pool = bk.pool("default").await;
    assert_eq!(pool.state, Phase::Ready);
    assert_eq!(pool.replicas.len(), 1);
    assert_eq!(bk.replica_pids().len(), 1);

    // Raw bytes too: the stand-in echoes a non-HTTP/2 stream.
    let mut stream = bk.connect(&tls).await.unwrap();
    stream
        .write_all(b"hello through the gateway")
        .await
        .unwrap();
    let mut echoed = [0u8; 25];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"hello through the gateway");
    drop(stream);

    let wakes = bk
        .metric(
            "bkpool_controller_wakes_total",
            &[("pool", "local/default"), ("result", "ok")],
        )
        .await;
    assert_eq!(wakes, 1.0);
    let healthy = bk
        .metric(
            "bkpool_controller_wake_duration_seconds_count",
            &[("pool", "local/default"), ("phase", "healthy")],
        )
        .await;
    assert_eq!(healthy, 1.0);
}

#[tokio::test]
async fn two_hundred_concurrent_connections_start_exactly_one_replica() {
    let bk = local("31010-31019", &standin_pool("default", ""));
    let tls = bk.issue("default");
    let bk = std::sync::Arc::new(bk);
    let clients: Vec<_> = (0..200)
        .map(|_| {
            let (bk, tls) = (bk.clone(), tls.clone());
            tokio::spawn(async move { bk.health(&tls).await })
        })
        .collect();
    let mut served = 0;
    for client in clients {
        assert_eq!(client.await.unwrap().unwrap(), Health::Serving);
        served += 1;
    }
    assert_eq!(served, 200);
    let up = bk
        .metric(
            "bkpool_controller_scale_events_total",
            &[
                ("pool", "local/default"),
                ("direction", "up"),
                ("reason", "wake"),
            ],
        )
        .await;
    assert_eq!(up, 1.0, "one wake");
    assert_eq!(bk.pool("default").await.replicas.len(), 1);
    assert_eq!(bk.replica_pids().len(), 1, "one replica process");
}

#[tokio::test]
async fn garbage_unauthenticated_connections_and_port_scans_leave_a_sleeping_pool_asleep() {
    let bk = local("31020-31029", &standin_pool("default", ""));
    let tls = bk.issue("default");
    // A port scan: connect and close.
    for _ in 0..5 {
        drop(tokio::net::TcpStream::connect(bk.listen).await.unwrap());
    }
    // Garbage instead of a ClientHello.
    let mut garbage = tokio::net::TcpStream::connect(bk.listen).await.unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), garbage.read_to_end(&mut sink)).await;
    // TLS without a client certificate.
    let anonymous = bk.connect_with(anonymous_config(&tls)).await;
    if let Ok(mut s) = anonymous {
        let _ = s.write_all(b"x").await;
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut [0u8; 8])).await;
    }
    // A certificate from a CA this pool does not trust.
    let stranger = control::pki::testing::TestPki::new().pool("default");
    let mallory = bk.dir.path().join("mallory");
    stranger
        .client("default", "mallory")
        .write_tls_dir(&mallory);
    std::fs::copy(tls.join("ca.pem"), mallory.join("ca.pem")).unwrap();
    if let Ok(mut s) = bk.connect(&mallory).await {
        let _ = s.write_all(b"x").await;
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut [0u8; 8])).await;
    }

    tokio::time::sleep(Duration::from_millis(500)).await;
    let pool = bk.pool("default").await;
    assert_eq!(pool.state, Phase::Sleeping, "{pool:?}");
    assert!(pool.replicas.is_empty());
    assert!(bk.replica_pids().is_empty());
    let wakes = bk.metrics().await;
    assert!(
        !wakes.contains("bkpool_controller_wakes_total{"),
        "no wake at all:\n{wakes}"
    );
}

#[tokio::test]
async fn a_replica_that_never_becomes_healthy_fails_held_connections_at_the_deadline() {
    let body = "[[pool]]\nname = \"stuck\"\n[pool.scaling]\nwake_timeout = \"1s\"\n[pool.replica]\ncommand = [\"sleep\", \"1000\"]\nplaintext = true\nstop_grace = \"1s\"\n";
    let bk = local("31030-31039", body);
    let tls = bk.issue("stuck");
    let began = std::time::Instant::now();
    let mut stream = bk.connect(&tls).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await;
    let waited = began.elapsed();
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed, not served: {read:?}"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    let refused = bk
        .metric(
            "bkpool_gateway_connections_rejected_total",
            &[("pool", "local/stuck"), ("reason", "wake_timeout")],
        )
        .await;
    assert_eq!(refused, 1.0, "{}", bk.metrics().await);
    let log = bk.log_text();
    assert!(
        log.contains("timed out waiting for the pool to wake"),
        "{log}"
    );
    // The unhealthy replica is stopped and the pool sleeps again.
    bk.wait_phase("stuck", Phase::Sleeping, Duration::from_secs(5))
        .await;
    for _ in 0..100 {
        if bk.replica_pids().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        bk.replica_pids().is_empty(),
        "the sleep process was stopped"
    );
    let timeouts = bk
        .metric(
            "bkpool_controller_wakes_total",
            &[("pool", "local/stuck"), ("result", "timeout")],
        )
        .await;
    assert_eq!(timeouts, 1.0);
}

#[tokio::test]
async fn a_crashed_replica_is_replaced_on_the_next_connection() {
    let bk = local("31040-31049", &standin_pool("default", ""));
    let tls = bk.issue("default");
    assert_eq!(bk.health(&tls).await.unwrap(), Health::Serving);
    let pids = bk.replica_pids();
    assert_eq!(pids.len(), 1);
    let status = std::process::Command::new("kill")
        .args(["-9", &pids[0].to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    bk.wait_phase("default", Phase::Sleeping, Duration::from_secs(5))
        .await;
    assert!(!alive(pids[0]));

    assert_eq!(
        bk.health(&tls).await.unwrap(),
        Health::Serving,
        "served by a new replica"
    );
    let now = bk.replica_pids();
    assert_eq!(now.len(), 1);
    assert_ne!(now[0], pids[0]);
    let crashed = bk
        .metric(
            "bkpool_controller_scale_events_total",
            &[
                ("pool", "local/default"),
                ("direction", "down"),
                ("reason", "crashed"),
            ],
        )
        .await;
    assert_eq!(crashed, 1.0);
}

#[tokio::test]
async fn a_replica_that_exits_at_start_fails_held_connections_at_once() {
    let body = "[[pool]]\nname = \"broken\"\n[pool.scaling]\nwake_timeout = \"20s\"\n[pool.replica]\ncommand = [\"sh\", \"-c\", \"echo cannot start >&2; exit 3\"]\nplaintext = true\n";
    let bk = local("31050-31059", body);
    let tls = bk.issue("broken");
    let began = std::time::Instant::now();
    let mut stream = bk.connect(&tls).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut [0u8; 8])).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed, not served: {read:?}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    let refused = bk
        .metric(
            "bkpool_gateway_connections_rejected_total",
            &[("pool", "local/broken"), ("reason", "wake_failed")],
        )
        .await;
    assert_eq!(refused, 1.0);
    bk.wait_log("exited before it became healthy").await;
    let log = std::fs::read_to_string(bk.state_dir().join("replicas/local/broken/r0.log"));
    assert!(
        log.is_ok_and(|l| l.contains("cannot start")),
        "the replica's own log keeps its output"
    );
}
