//! The backend leg of `bkpool local`: replicas listen on loopback, where any local user can
//! connect, so they serve mTLS with the state directory's backend CA and only the gateway's
//! certificate opens them. A plain connection, a TLS one without a certificate, and one with
//! a pool's own client certificate are all refused at the replica; through the gateway the
//! same client is served.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use control::health::{self, Health};
use rustls::pki_types::ServerName;
use support::local::{anonymous_config, client_config, local};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const POOL: &str = "[[pool]]\nname = \"default\"\n[pool.replica]\nstandin = true\n";

#[tokio::test]
async fn a_replica_refuses_everyone_but_the_gateway() {
    let bk = local("31500-31509", POOL);
    let tls = bk.issue("default");
    assert_eq!(
        bk.health(&tls).await.unwrap(),
        Health::Serving,
        "through the gateway"
    );
    let pool = bk.pool("default").await;
    let replica: SocketAddr = pool.replicas[0].addr.parse().unwrap();
    let quick = Duration::from_secs(5);

    let plain = health::probe(replica, quick).await;
    assert!(plain.is_err(), "plaintext gRPC to the replica: {plain:?}");
    let name = || ServerName::IpAddress(replica.ip().into());
    let anonymous = health::probe_tls(replica, name(), anonymous_config(&tls), quick).await;
    assert!(
        anonymous.is_err(),
        "TLS without a certificate: {anonymous:?}"
    );
    // A client certificate of the pool (trusting the replica's CA, to get that far) is for
    // the gateway's listener, not for the replica behind it.
    let backend_ca = bk.state_dir().join("pki/backend/ca.pem");
    let with_pool_cert = tls_dir_trusting(&tls, &backend_ca);
    let client = health::probe_tls(replica, name(), client_config(&with_pool_cert), quick).await;
    assert!(client.is_err(), "a pool's client certificate: {client:?}");

    // The gateway's own certificate is what opens it.
    let gateway = bk.state_dir().join("pki/backend/gateway");
    let served = health::probe_tls(replica, name(), client_config(&gateway), quick).await;
    assert_eq!(
        served.unwrap(),
        Health::Serving,
        "the gateway's side of the leg"
    );
}

/// A copy of the `--tlsdir` `dir` whose `ca.pem` is `ca`.
fn tls_dir_trusting(dir: &std::path::Path, ca: &std::path::Path) -> std::path::PathBuf {
    let copy = dir.with_extension("trusting-backend");
    std::fs::create_dir_all(&copy).unwrap();
    for file in ["cert.pem", "key.pem"] {
        std::fs::copy(dir.join(file), copy.join(file)).unwrap();
    }
    std::fs::copy(ca, copy.join("ca.pem")).unwrap();
    copy
}

/// A replica whose process is up and whose health check passes, but which echoes each
/// connection's first bytes and then resets it: the gateway counts the failures, stops
/// offering it after `unhealthy_after` in a row, starts a replacement (the connection that
/// finds none serving is held for it) and stops the broken one. No client waits past its
/// timeout, and the clients after the replacement are all served.
#[tokio::test]
async fn a_replica_that_drops_every_connection_is_replaced() {
    let marker = tempfile::tempdir().unwrap();
    let flap = marker.path().join("flap");
    std::fs::write(&flap, "").unwrap();
    let body = format!(
        "[[pool]]\nname = \"flaky\"\n[pool.scaling]\nwake_timeout = \"10s\"\n\
         [pool.replica]\ncommand = [{:?}, \"standin\", \"--listen\", \"{{addr}}\", \
         \"--tls\", \"{{tls}}\", \"--flap-once\", {:?}]\n",
        env!("CARGO_BIN_EXE_bkpool"),
        flap.display().to_string(),
    );
    let bk = local("31740-31749", &body);
    let tls = bk.issue("flaky");
    let attempts = 50;
    let mut failed = Vec::new();
    for i in 0..attempts {
        // Two exchanges: the broken replica answers the first, then resets.
        let exchange = async {
            let mut tcp = bk.connect(&tls).await?;
            for part in [format!("ping {i}"), format!("pong {i}")] {
                tcp.write_all(part.as_bytes()).await?;
                let mut back = vec![0; part.len()];
                tcp.read_exact(&mut back).await?;
                assert_eq!(back, part.as_bytes(), "attempt {i}: the echo");
            }
            tcp.shutdown().await?;
            let n = tcp.read(&mut [0; 16]).await?;
            assert_eq!(n, 0, "attempt {i}: EOF after the echo");
            std::io::Result::Ok(())
        };
        let outcome = tokio::time::timeout(Duration::from_secs(15), exchange)
            .await
            .unwrap_or_else(|_| panic!("attempt {i} hung past 15 s\n{}", bk.log_text()));
        if let Err(e) = outcome {
            failed.push((i, e.to_string()));
        }
    }
    let first_served = (0..attempts).find(|i| !failed.iter().any(|(f, _)| f == i));
    assert!(
        (5..=8).contains(&failed.len()),
        "the first replica fails 5 connections (unhealthy_after), give or take one in flight \
         when the fifth is counted; failed: {failed:?}\n{}",
        bk.log_text()
    );
    assert!(
        failed.iter().all(|(i, _)| *i < failed.len()),
        "failures only before the replacement, then every attempt is served: {failed:?}"
    );
    assert_eq!(first_served, Some(failed.len()));

    bk.wait_log("replica drops every connection; replacing it")
        .await;
    let scaled = |direction: &'static str, reason: &'static str| {
        let labels = [
            ("pool", "local/flaky"),
            ("direction", direction),
            ("reason", reason),
        ];
        let bk = &bk;
        async move {
            bk.metric("bkpool_controller_scale_events_total", &labels)
                .await
        }
    };
    assert_eq!(scaled("up", "replace").await, 1.0, "{}", bk.metrics().await);
    assert_eq!(
        scaled("down", "unhealthy").await,
        1.0,
        "{}",
        bk.metrics().await
    );
    let pool = bk.pool("flaky").await;
    assert_eq!(
        pool.replicas.len(),
        1,
        "only the replacement runs: {pool:?}"
    );
    assert_eq!(
        bk.replica_pids().len(),
        1,
        "the broken replica's process is gone"
    );
}
