//! End-to-end operations: configuration errors, openssl as a client, backend fallback,
//! certificate reload under load, and graceful drain.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use control::pki::testing::TestPki;
use support::{backends, gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn pki() -> Arc<TestPki> {
    Arc::new(TestPki::new().pool("a"))
}

async fn ping(gw: &support::GatewayProcess, pki: &TestPki) -> std::io::Result<()> {
    let mut tls = gw.connect(&pki.client("a", "alice")).await?;
    tls.write_all(b"ping").await?;
    let mut back = [0u8; 4];
    tls.read_exact(&mut back).await?;
    assert_eq!(&back, b"ping");
    Ok(())
}

#[test]
fn a_bad_configuration_is_refused_with_every_fault_and_binds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    // A port we know is free; if the gateway bound it before refusing, connecting would work.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    std::fs::write(
        &path,
        format!(
            "listen = \"{free}\"\n[timeouts]\nidle = \"soon\"\n[[pool]]\nname = \"UPPER\"\nbackends = [\"nowhere\"]\n"
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bkpool"))
        .args(["gateway", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for path in [
        "timeouts.idle",
        "pool[0].name",
        "pool[0].client_ca",
        "pool[0].backends[0]",
        "server_cert",
    ] {
        assert!(err.contains(path), "{path} not reported in:\n{err}");
    }
    assert!(
        std::net::TcpStream::connect(free).is_err(),
        "nothing was bound"
    );
}

#[test]
fn unreadable_certificates_are_reported_by_file_before_binding() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    let bad_cert = dir.path().join("server.pem");
    std::fs::write(
        &bad_cert,
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let text = format!(
        "[[server_cert]]\ncert = {bad_cert:?}\nkey = {:?}\n[[pool]]\nname = \"a\"\nclient_ca = {:?}\nbackends = [\"127.0.0.1:9\"]\n",
        pki.server_key_path(),
        pki.client_ca_path("a")
    );
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bkpool"))
        .args(["gateway", "--check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.pem"), "the bad file is named:\n{err}");
}

#[test]
fn two_pools_sharing_a_client_ca_are_refused_before_binding() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    // Pool b's CA file is a copy of pool a's: the same CA under another name.
    let copy = dir.path().join("b-ca.pem");
    std::fs::copy(pki.client_ca_path("a"), &copy).unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let path = dir.path().join("gateway.toml");
    let text = format!(
        "listen = \"{free}\"\n[[server_cert]]\ncert = {:?}\nkey = {:?}\n\
         [[pool]]\nname = \"a\"\nclient_ca = {:?}\nbackends = [\"127.0.0.1:9\"]\n\
         [[pool]]\nname = \"b\"\nclient_ca = {copy:?}\nbackends = [\"127.0.0.1:9\"]\n",
        pki.server_cert_path(),
        pki.server_key_path(),
        pki.client_ca_path("a")
    );
    std::fs::write(&path, text).unwrap();
    for check in [true, false] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_bkpool"));
        command.arg("gateway");
        if check {
            command.arg("--check");
        }
        let mut child = (command.arg("--config").arg(&path))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A gateway that accepted the configuration would serve until stopped.
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                child.kill().unwrap();
                panic!("the gateway accepted the configuration (check: {check})");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "check: {check}");
        let err = String::from_utf8_lossy(&out.stderr);
        for part in ["local/a", "local/b", "b-ca.pem", "needs its own"] {
            assert!(err.contains(part), "{part} not in:\n{err}");
        }
    }
    assert!(
        std::net::TcpStream::connect(free).is_err(),
        "nothing was bound"
    );
}

#[tokio::test]
async fn openssl_s_client_is_served() {
    let Some(openssl) = control::testkit::program("openssl") else {
        return;
    };
    let pki = pki();
    let backend = backends::echo().await;
    let gw = gateway(&pki).pool("a", backend.addr).start();
    let dir = tempfile::tempdir().unwrap();
    pki.client("a", "openssl").write_tls_dir(dir.path());
    let listen = gw.listen.to_string();
    let dirp = dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(openssl)
            .args([
                "s_client",
                "-quiet",
                "-no_ign_eof",
                "-alpn",
                "h2",
                "-connect",
                &listen,
            ])
            .arg("-CAfile")
            .arg(dirp.join("ca.pem"))
            .arg("-cert")
            .arg(dirp.join("cert.pem"))
            .arg("-key")
            .arg(dirp.join("key.pem"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"hello from openssl\n").unwrap();
        std::thread::sleep(Duration::from_millis(500));
        drop(stdin);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("hello from openssl"),
        "echo through the gateway; stdout {stdout:?}, stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_dead_backend_is_skipped_for_the_next() {
    let pki = pki();
    let backend = backends::echo().await;
    let dead = backends::dead_addr().await;
    let mut builder = gateway(&pki).pool("a", dead);
    builder = builder.with(&format!("backends = [\"{dead}\", \"{}\"]", backend.addr));
    // `with` appends after the generated `backends` line: replace it instead.
    let text = builder
        .config_text()
        .replacen(&format!("backends = [\"{dead}\"]\n"), "", 1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let gw = support::start_binary(&path, dir, pki.clone());
    ping(&gw, &pki).await.unwrap();
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn certificates_reload_under_load_without_a_failed_handshake() {
    let pki = pki();
    let backend = backends::echo().await;
    let gw = Arc::new(gateway(&pki).pool("a", backend.addr).start());
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (gw, pki, stop, ok, failed) = (
                gw.clone(),
                pki.clone(),
                stop.clone(),
                ok.clone(),
                failed.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match ping(&gw, &pki).await {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A broken pair first: refused, counted, and the last good pair keeps serving.
    let cert_path = pki.server_cert_path();
    let good_cert = std::fs::read(&cert_path).unwrap();
    std::fs::write(&cert_path, b"garbage").unwrap();
    gw.wait_metric(
        "bkpool_gateway_credential_reloads_total",
        &[("kind", "server_cert"), ("result", "error")],
        1.0,
    )
    .await;
    std::fs::write(&cert_path, &good_cert).unwrap();
    gw.wait_metric(
        "bkpool_gateway_credential_reloads_total",
        &[("kind", "server_cert"), ("result", "ok")],
        1.0,
    )
    .await;

    // A real rotation: a new certificate with a new name; new handshakes see it within a second.
    let rotated_at = Instant::now();
    pki.local()
        .ensure_server_cert(
            &["rotated.example".to_string()],
            std::time::SystemTime::now(),
        )
        .unwrap();
    let config = pki.client("a", "alice").arc_config(&[b"h2"]);
    loop {
        let tcp = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("rotated.example").unwrap();
        if tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            rotated_at.elapsed() < Duration::from_secs(2),
            "the new certificate is served within a second or so"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "{ok} handshakes during reloads, {failed} failed; new certificate after {:?}",
        rotated_at.elapsed()
    );
    assert!(ok > 20, "load kept running ({ok})");
    assert_eq!(failed, 0, "no handshake failed while certificates changed");
}

#[tokio::test]
async fn sigterm_drains_open_connections_and_refuses_new_ones() {
    let pki = pki();
    let backend = backends::echo().await;
    let mut gw = gateway(&pki)
        .pool("a", backend.addr)
        .top("[timeouts]\ndrain = \"20s\"")
        .start();
    let mut open = gw.connect(&pki.client("a", "alice")).await.unwrap();
    open.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).await.unwrap();

    gw.signal(libc::SIGTERM);
    let mut refused = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(gw.listen).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "new connections are refused once draining");
    assert_eq!(gw.get("/readyz").await.0, 503, "not ready while draining");
    open.write_all(b"during").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"during", "the open connection is still served");
    open.shutdown().await.unwrap();
    drop(open);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = gw.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "exits once the last connection closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "clean exit after draining: {status:?}");
}

#[tokio::test]
async fn the_drain_deadline_closes_what_is_left() {
    let pki = pki();
    let backend = backends::silent().await;
    let mut gw = gateway(&pki)
        .pool("a", backend.addr)
        .top("[timeouts]\ndrain = \"1s\"")
        .start();
    let mut open = gw.connect(&pki.client("a", "alice")).await.unwrap();
    open.write_all(b"x").await.unwrap();
    gw.wait_metric(
        "bkpool_gateway_connections_open",
        &[("pool", "local/a")],
        1.0,
    )
    .await;
    let started = Instant::now();
    gw.signal(libc::SIGTERM);
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), open.read(&mut buf))
        .await
        .expect("closed by the deadline");
    assert!(matches!(read, Ok(0) | Err(_)));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "kept open until the deadline ({waited:?})"
    );
    let status = gw.child.wait().unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn the_certificate_request_does_not_name_the_pools() {
    if Command::new("openssl").arg("version").output().is_err() {
        panic!("openssl is not installed (apt-get install openssl)");
    }
    let pki = Arc::new(TestPki::new().pool("a").pool("secret-project"));
    let backend = backends::echo().await;
    let gw = gateway(&pki)
        .pool("a", backend.addr)
        .pool("secret-project", backend.addr)
        .start();
    let (listen, ca) = (gw.listen.to_string(), pki.server_ca_path());
    // No client certificate: what anyone who connects is told.
    let out = tokio::task::spawn_blocking(move || {
        Command::new("openssl")
            .args(["s_client", "-connect", &listen, "-CAfile"])
            .arg(ca)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let names = stdout
        .split("Acceptable client certificate CA names")
        .nth(1)
        .and_then(|rest| rest.split("Requested Signature Algorithms").next())
        .unwrap_or_else(|| panic!("no CA names in the CertificateRequest:\n{stdout}"));
    assert_eq!(names.matches("bkpool CA ").count(), 2, "{names}");
    for pool in ["local/a", "secret-project", "client CA"] {
        assert!(!names.contains(pool), "{pool} named in:\n{names}");
    }
}
