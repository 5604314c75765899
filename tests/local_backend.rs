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
