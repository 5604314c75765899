//! End-to-end: the static gateway (`bkpool gateway --config`) in front of the real buildkitd,
//! driven by the real `buildctl`: terminate mode with two pools, each client certificate
//! reaching only its own pool's daemon (over an mTLS backend leg, or plaintext); passthrough
//! to a buildkitd that terminates mTLS itself; and a SIGTERM drain that lets a build in flight
//! finish.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use control::pki::testing::TestPki;
use control::pki::write_tls_dir;
use support::buildkit::{Context, Daemon, DaemonTls, Endpoint, build_ok, processes_with, workers};
use support::gateway;

/// Writes a `ca.pem`, `cert.pem`, `key.pem` directory under `dir`; returns it.
fn tls_dir(dir: &Path, name: &str, ca_pem: &str, cert: &control::pki::IssuedCert) -> PathBuf {
    let out = dir.join(name);
    let key = cert.key_pem.as_deref().expect("issued with its key");
    write_tls_dir(&out, ca_pem, &cert.cert_pem, key).unwrap();
    out
}

/// A client's `--tlsdir` for `pool`, trusting the gateway.
fn client_dir(pki: &TestPki, dir: &Path, pool: &str) -> PathBuf {
    let out = dir.join(format!("client-{pool}"));
    pki.client(pool, "alice").write_tls_dir(&out);
    out
}

#[tokio::test]
async fn terminate_mode_takes_each_pools_certificate_to_its_own_daemon_only() {
    let Some((buildkit, busybox)) = support::buildkit::tools() else {
        return;
    };
    let pki = Arc::new(TestPki::new().pool("a").pool("b"));
    let dir = tempfile::tempdir().unwrap();
    let backend_ca = pki.local().backend_ca().cert_pem().to_owned();
    // Pool a's daemon serves mTLS to the gateway's backend certificate; pool b's plaintext.
    let serve = tls_dir(
        dir.path(),
        "serve-a",
        &backend_ca,
        &pki.backend_server(&["127.0.0.1"]),
    );
    let leg = tls_dir(dir.path(), "leg", &backend_ca, &pki.backend_client());
    let tls = DaemonTls {
        serve: &serve,
        client: &leg,
    };
    let (daemon_a, daemon_b) = tokio::join!(
        Daemon::start(&buildkit, Some(tls)),
        Daemon::start(&buildkit, None)
    );
    let backend_tls = format!(
        "[pool.backend_tls]\nca = {:?}\ncert = {:?}\nkey = {:?}",
        leg.join("ca.pem"),
        leg.join("cert.pem"),
        leg.join("key.pem")
    );
    let gw = gateway(&pki)
        .pool("a", daemon_a.addr)
        .with(&backend_tls)
        .pool("b", daemon_b.addr)
        .start();
    let via_a = Endpoint::tls(gw.listen, &client_dir(&pki, dir.path(), "a"));
    let via_b = Endpoint::tls(gw.listen, &client_dir(&pki, dir.path(), "b"));

    let direct_a = workers(&buildkit, &daemon_a.endpoint).await.unwrap();
    let direct_b = workers(&buildkit, &daemon_b.endpoint).await.unwrap();
    assert!(
        !direct_a.is_empty() && direct_a != direct_b,
        "{direct_a:?} {direct_b:?}"
    );
    assert_eq!(
        workers(&buildkit, &via_a).await.unwrap(),
        direct_a,
        "a's certificate"
    );
    assert_eq!(
        workers(&buildkit, &via_b).await.unwrap(),
        direct_b,
        "b's certificate"
    );

    let context = Context::new(&busybox, "terminated by the gateway", "");
    build_ok(&buildkit, &via_a, &context, "terminated by the gateway").await;
    build_ok(&buildkit, &via_b, &context, "terminated by the gateway").await;
}

#[tokio::test]
async fn passthrough_reaches_a_buildkitd_that_terminates_mtls_itself() {
    let Some((buildkit, busybox)) = support::buildkit::tools() else {
        return;
    };
    let pki = Arc::new(TestPki::new().pool("p"));
    let dir = tempfile::tempdir().unwrap();
    let hostname = "buildkit-p.example";
    // buildkitd trusts the pool's client CA; clients trust the CA of buildkitd's certificate.
    let backend_ca = pki.local().backend_ca().cert_pem().to_owned();
    let client_ca = pki.client_ca("p").cert_pem().to_owned();
    let server = pki.backend_server(&[hostname, "127.0.0.1"]);
    let serve = tls_dir(dir.path(), "serve", &client_ca, &server);
    let alice = pki.client("p", "alice");
    let client = dir.path().join("client");
    write_tls_dir(&client, &backend_ca, &alice.cert_pem, &alice.key_pem).unwrap();
    let daemon = Daemon::start(
        &buildkit,
        Some(DaemonTls {
            serve: &serve,
            client: &client,
        }),
    )
    .await;
    let gw = gateway(&pki)
        .passthrough("p", hostname, daemon.addr)
        .start();

    let mut through = Endpoint::tls(gw.listen, &client);
    through.server_name = Some(hostname.into());
    let direct = workers(&buildkit, &daemon.endpoint).await.unwrap();
    assert_eq!(workers(&buildkit, &through).await.unwrap(), direct);
    let context = Context::new(&busybox, "passed through", "");
    build_ok(&buildkit, &through, &context, "passed through").await;

    // By bare IP buildctl sends no SNI: there is nothing to route by.
    let without_sni = Endpoint::tls(gw.listen, &client);
    let refused = workers(&buildkit, &without_sni).await;
    assert!(refused.is_err(), "{refused:?}");
}

#[tokio::test]
async fn sigterm_lets_a_build_in_flight_finish_then_the_gateway_exits() {
    let Some((buildkit, busybox)) = support::buildkit::tools() else {
        return;
    };
    let pki = Arc::new(TestPki::new().pool("a"));
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&buildkit, None).await;
    let mut gw = gateway(&pki)
        .pool("a", daemon.addr)
        .top("[timeouts]\ndrain = \"60s\"")
        .start();
    let endpoint = Endpoint::tls(gw.listen, &client_dir(&pki, dir.path(), "a"));
    // Three seconds, spelt so that no other process on the machine matches it.
    let context = Context::new(&busybox, "drained", "/bin/busybox sleep 3.04713 && ");
    let build = tokio::spawn({
        let (buildkit, endpoint) = (buildkit.clone(), endpoint.clone());
        async move { build_ok(&buildkit, &endpoint, &context, "drained").await }
    });
    let step = support::buildkit::within(Duration::from_secs(60), || {
        !processes_with("sleep 3.04713").is_empty()
    })
    .await;
    assert!(step, "the build reached its RUN step:\n{}", gw.log_text());

    gw.signal(libc::SIGTERM);
    let refused = support::buildkit::within(Duration::from_secs(5), || {
        std::net::TcpStream::connect(gw.listen).is_err()
    })
    .await;
    assert!(refused, "new connections are refused once draining");
    build.await.expect("the build in flight finishes");
    let status = tokio::task::spawn_blocking(move || gw.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "a clean exit after the drain: {status:?}");
}
