//! End to end: `bkpool certapi` over a local PKI, `bkpool login` trading a token for a
//! certificate (key and CSR made by login), and a real `bkpool gateway` letting that
//! certificate into its pool and no other.

#[path = "../control/tests/support/issuer.rs"]
#[allow(dead_code)]
mod issuer;
mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use control::pki::testing::TestPki;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::{backends, gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const TOKEN: &str = "ci-token-0123456789abcdef";

/// A running `bkpool certapi`, killed on drop.
struct CertApi {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    log: Arc<std::sync::Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl CertApi {
    /// The audit lines logged so far, as JSON.
    fn audit(&self) -> Vec<serde_json::Value> {
        let lines = self.log.lock().unwrap().clone();
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "bkpool::audit")
            .collect()
    }
}

impl Drop for CertApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_certapi(pki: &TestPki, gateway: SocketAddr) -> CertApi {
    let pools = "[[pool]]\nname = \"local/a\"\nmax_ttl = \"15m\"\n[[pool]]\nname = \"local/b\"\n";
    start_certapi_with(pki, gateway, pools)
}

fn start_certapi_with(pki: &TestPki, gateway: SocketAddr, extra: &str) -> CertApi {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    let token_file =
        format!("[[token]]\ntoken = {TOKEN:?}\nidentity = \"ci-bot\"\npools = [\"local/a\"]\n");
    std::fs::write(&tokens, token_file).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.path().join("certapi.toml");
    let text = format!(
        "listen = \"127.0.0.1:0\"\npki_dir = {:?}\nendpoints = [\"{gateway}\"]\nstatic_tokens = {:?}\n{extra}",
        pki.dir(),
        tokens
    );
    std::fs::write(&config, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bkpool"))
        .args([
            "--log-format",
            "json",
            "certapi",
            "--admin",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("certificate API listening") {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let addr = |k: &str| v["fields"][k].as_str().unwrap().parse().unwrap();
                let _ = tx.send((addr("listen"), addr("admin")));
            }
            sink.lock().unwrap().push(line);
        }
    });
    let Ok((addr, admin)) = rx.recv_timeout(Duration::from_secs(20)) else {
        let _ = child.kill();
        panic!("certapi did not start:\n{}", log.lock().unwrap().join("\n"));
    };
    CertApi {
        child,
        addr,
        admin,
        log,
        _dir: dir,
    }
}

fn login(api: &CertApi, pki: &TestPki, pool: &str, out: &Path, extra: &[&str]) -> Output {
    let token = out.with_extension("token");
    std::fs::write(&token, TOKEN).unwrap();
    Command::new(env!("CARGO_BIN_EXE_bkpool"))
        .args(["login", "--server", &format!("https://{}", api.addr)])
        .args(["--pool", pool, "--token-file"])
        .arg(&token)
        .arg("--ca")
        .arg(pki.server_ca_path())
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// A TLS client configured from a `buildctl --tlsdir` directory.
fn tls_dir_config(dir: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Whether `config` gets bytes echoed through the gateway at `addr`.
async fn echoes(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> bool {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let Ok(mut tls) = TlsConnector::from(config).connect(name, tcp).await else {
        return false;
    };
    if tls.write_all(b"hello pool").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 10];
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut buf)).await;
    matches!(read, Ok(Ok(_))) && &buf == b"hello pool"
}

#[tokio::test]
async fn login_gets_a_certificate_that_opens_its_pool_and_no_other() {
    let pki = Arc::new(TestPki::new().pool("a").pool("b"));
    let (backend_a, backend_b) = (backends::echo().await, backends::echo().await);
    let gw = gateway(&pki).pool("a", backend_a.addr).start();
    let gw_b = gateway(&pki).pool("b", backend_b.addr).start();
    let api = start_certapi(&pki, gw.listen);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("tls");

    let done = login(&api, &pki, "local/a", &out, &["--ttl", "10m"]);
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(
        stdout.contains(&format!("buildctl --addr tcp://{}", gw.listen)),
        "{stdout}"
    );
    assert!(stdout.contains("docker buildx create"), "{stdout}");
    let mode = std::fs::metadata(out.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let config = tls_dir_config(&out);
    assert!(
        echoes(gw.listen, config.clone()).await,
        "the right pool lets it in"
    );
    assert_eq!(backend_a.accepted(), 1);
    assert!(
        !echoes(gw_b.listen, config).await,
        "another pool's gateway refuses it"
    );
    assert_eq!(backend_b.accepted(), 0);

    let expired = pki.expired_client("a", "ci-bot");
    assert!(
        !echoes(gw.listen, expired.arc_config(&[b"h2"])).await,
        "an expired one is refused"
    );

    let refused = login(&api, &pki, "local/b", &work.path().join("tls-b"), &[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("pool_not_allowed"), "{stderr}");
    assert!(
        !work.path().join("tls-b").exists(),
        "nothing written on refusal"
    );

    let decisions: Vec<(String, String, String, String)> = api
        .audit()
        .iter()
        .map(|v| {
            let field = |k: &str| v["fields"][k].as_str().unwrap_or("").to_owned();
            (
                field("identity"),
                field("pool"),
                field("result"),
                field("reason"),
            )
        })
        .collect();
    let expected = [
        ("ci-bot", "local/a", "issued", ""),
        ("", "local/b", "denied", "pool_not_allowed"),
    ]
    .map(|(a, b, c, d)| (a.to_owned(), b.to_owned(), c.to_owned(), d.to_owned()));
    assert_eq!(decisions, expected, "one audit line per decision");

    let (status, metrics) = support::http_get(api.admin, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        r#"bkpool_certapi_certificates_issued_total{pool="local/a",method="static"} 1"#,
        r#"bkpool_certapi_requests_denied_total{pool="local/b",reason="pool_not_allowed"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
}

#[tokio::test]
async fn login_exec_runs_the_command_with_the_certificates_and_its_exit_status() {
    let pki = Arc::new(TestPki::new().pool("a").pool("b"));
    let backend = backends::echo().await;
    let gw = gateway(&pki).pool("a", backend.addr).start();
    let api = start_certapi(&pki, gw.listen);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("tls");
    let script = "test -s \"$BKPOOL_TLS_DIR/key.pem\" && echo \"$BUILDKIT_HOST\" && exit 7";
    let done = login(
        &api,
        &pki,
        "local/a",
        &out,
        &["--exec", "--", "sh", "-c", script],
    );
    assert_eq!(
        done.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert_eq!(stdout.trim(), format!("tcp://{}", gw.listen));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_from_github_actions_trades_the_runner_token_for_a_certificate() {
    use issuer::{SigningKey, TestIssuer, now_plus};
    let pki = Arc::new(TestPki::new().pool("a").pool("b"));
    let backend = backends::echo().await;
    let gw = gateway(&pki).pool("a", backend.addr).start();
    let oidc = TestIssuer::start().await;
    let key = SigningKey::rsa("gh-1");
    oidc.publish("gh", &[&key]);
    let work = tempfile::tempdir().unwrap();
    let roots = work.path().join("oidc-ca.pem");
    std::fs::write(&roots, oidc.ca.cert_pem()).unwrap();
    let pools = format!(
        "oidc_roots = {roots:?}\n[[pool]]\nname = \"local/a\"\n[[pool.oidc]]\nissuer = {:?}\naudiences = [\"bkpool\"]\n\
         claims = {{ repository = \"org/app\", ref = [\"refs/heads/main\", \"refs/tags/v*\"] }}\n\
         [[pool]]\nname = \"local/b\"\n[[pool.oidc]]\nissuer = {:?}\naudiences = [\"bkpool\"]\nclaims = {{ repository = \"org/other\" }}\n",
        oidc.url("gh"),
        oidc.url("gh")
    );
    let api = start_certapi_with(&pki, gw.listen, &pools);
    let claims = serde_json::json!({
        "sub": "repo:org/app:ref:refs/heads/main",
        "repository": "org/app",
        "repository_owner": "org",
        "ref": "refs/heads/main",
        "iat": now_plus(-5),
        "nbf": now_plus(-5),
        "exp": now_plus(300),
    });
    oidc.serve_actions_tokens("gh", &key, claims, "runner-request-token");
    let login_as_github = |pool: &str, out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_bkpool"))
            .args([
                "login",
                "--github-actions",
                "--server",
                &format!("https://{}", api.addr),
            ])
            .args(["--pool", pool, "--ca"])
            .arg(pki.server_ca_path())
            .arg("--out")
            .arg(out)
            .env(
                "ACTIONS_ID_TOKEN_REQUEST_URL",
                format!("{}/actions-token?api-version=2.0", oidc.url("gh")),
            )
            .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "runner-request-token")
            .env("SSL_CERT_FILE", &roots)
            .output()
            .unwrap()
    };
    let out = work.path().join("tls");
    let done = tokio::task::block_in_place(|| login_as_github("local/a", &out));
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(
        stderr.contains("as 127.0.0.1:repo:org/app:ref:refs/heads/main"),
        "{stderr}"
    );
    assert!(echoes(gw.listen, tls_dir_config(&out)).await);

    let refused =
        tokio::task::block_in_place(|| login_as_github("local/b", &work.path().join("tls-b")));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("claim_rule_mismatch"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_with_a_serviceaccount_token_reviewed_by_the_api_server() {
    use control::auth::KubeApi;
    use serde_json::json;
    let Some(kubeconfig) = control::testkit::kubeconfig() else {
        return;
    };
    let kube = KubeApi::from_kubeconfig(&kubeconfig).unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let ns = format!("bkpool-login-{}-{nanos}", std::process::id());
    let create = |path: String, body: serde_json::Value| {
        let kube = kube.clone();
        async move { kube.create(&path, &body).await.unwrap() }
    };
    create(
        "/api/v1/namespaces".into(),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .await;
    create(
        format!("/api/v1/namespaces/{ns}/serviceaccounts"),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "builder"}}),
    )
    .await;
    create(format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles"), json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "bkpool"},
        "rules": [{"apiGroups": ["bkpool.dev"], "resources": ["buildkitpools/certificates"], "verbs": ["create"]}],
    })).await;
    create(format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings"), json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "bkpool"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "bkpool"},
        "subjects": [{"kind": "ServiceAccount", "name": "builder", "namespace": ns}],
    })).await;
    let answer = create(
        format!("/api/v1/namespaces/{ns}/serviceaccounts/builder/token"),
        json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": ["bkpool"], "expirationSeconds": 600},
        }),
    )
    .await;
    let work = tempfile::tempdir().unwrap();
    let token = work.path().join("sa-token");
    std::fs::write(&token, answer["status"]["token"].as_str().unwrap()).unwrap();

    let pki = Arc::new(TestPki::new().pool("a"));
    let backend = backends::echo().await;
    let gw = gateway(&pki).pool("a", backend.addr).start();
    let pools = format!(
        "[kubernetes]\nkubeconfig = {kubeconfig:?}\n[[pool]]\nname = \"{ns}/app\"\nserviceaccounts = true\n"
    );
    let api = start_certapi_with(&pki, gw.listen, &pools);
    let out = work.path().join("tls");
    let mut done = None;
    // RBAC takes a moment to see the new binding.
    for _ in 0..30 {
        let output = Command::new(env!("CARGO_BIN_EXE_bkpool"))
            .args(["login", "--server", &format!("https://{}", api.addr)])
            .args(["--pool", &format!("{ns}/app"), "--serviceaccount"])
            .arg(&token)
            .arg("--ca")
            .arg(pki.server_ca_path())
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let denied = String::from_utf8_lossy(&output.stderr).contains("access_denied");
        done = Some(output);
        if !denied {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let done = done.unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("as system:serviceaccount:{ns}:builder")),
        "{stderr}"
    );
    let _ = kube.delete(&format!("/api/v1/namespaces/{ns}")).await;
}
