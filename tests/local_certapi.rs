//! `bkpool local --certapi FILE`: the certificate API served by the local instance, over its
//! PKI, waking pools through its own scaler. A token traded by `bkpool login` gets a
//! certificate and wakes the sleeping pool before any connection; `POST .../wake` (with
//! `curl`) wakes only for a caller allowed on the pool; a pool the instance does not run is
//! refused at start.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use control::health::Health;
use control::scale::Phase;
use support::local::{Local, local_with};

const TOKEN: &str = "ci-token-0123456789abcdef";

fn standin_pool(name: &str) -> String {
    format!("[[pool]]\nname = \"{name}\"\n[pool.replica]\nstandin = true\n")
}

/// The API's configuration in `dir`: a static token for `local/default` only, and `pools`.
fn api_config(dir: &Path, pools: &[&str]) -> PathBuf {
    let tokens = dir.join("tokens.toml");
    let text = format!(
        "[[token]]\ntoken = {TOKEN:?}\nidentity = \"ci-bot\"\npools = [\"local/default\"]\n"
    );
    std::fs::write(&tokens, text).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut text = format!("listen = \"127.0.0.1:0\"\nstatic_tokens = {tokens:?}\n");
    for pool in pools {
        text += &format!("[[pool]]\nname = \"{pool}\"\n");
    }
    let path = dir.join("certapi.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `bkpool local` with pools `default` and `other`, both served by its certificate API.
fn local_with_api(ports: &str) -> (Local, String) {
    let body = standin_pool("default") + &standin_pool("other");
    let bk = local_with(ports, &body, |dir| {
        let api = api_config(dir, &["local/default", "local/other"]);
        vec!["--certapi".into(), api.display().to_string()]
    });
    let line = bk
        .log
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("certificate API listening"))
        .cloned()
        .expect("the certificate API's address in the log");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let addr = v["fields"]["listen"].as_str().unwrap().to_owned();
    (bk, addr)
}

fn gateway_ca(bk: &Local) -> PathBuf {
    bk.state_dir().join("pki/gateway/ca.pem")
}

/// `curl -X POST .../wake` for `pool` of namespace `local`, with `token` if any; the status.
fn post_wake(bk: &Local, api: &str, pool: &str, token: Option<&str>) -> u16 {
    let mut curl = Command::new("curl");
    curl.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .arg("--cacert")
        .arg(gateway_ca(bk))
        .arg(format!(
            "https://{api}/v1/namespaces/local/pools/{pool}/wake"
        ));
    if let Some(token) = token {
        curl.arg("-H").arg(format!("Authorization: Bearer {token}"));
    }
    let out = curl.output().expect("curl runs");
    String::from_utf8_lossy(&out.stdout).parse().unwrap()
}

#[tokio::test]
async fn a_login_wakes_the_sleeping_pool_and_its_certificate_opens_it() {
    let (bk, api) = local_with_api("31700-31709");
    assert_eq!(bk.pool("default").await.state, Phase::Sleeping);
    assert!(bk.replica_pids().is_empty(), "nothing runs before a login");

    let token = bk.dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let out = bk.dir.path().join("tls");
    let login = Command::new(env!("CARGO_BIN_EXE_bkpool"))
        .args(["login", "--server", &format!("https://{api}")])
        .args(["--pool", "local/default", "--ttl", "10m", "--token-file"])
        .arg(&token)
        .arg("--ca")
        .arg(gateway_ca(&bk))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        login.status.success(),
        "{}",
        String::from_utf8_lossy(&login.stderr)
    );

    // Woken by the certificate's issue, before any connection.
    bk.wait_phase("default", Phase::Ready, Duration::from_secs(20))
        .await;
    let accepted = bk
        .metric(
            "bkpool_gateway_connections_accepted_total",
            &[("pool", "local/default")],
        )
        .await;
    assert_eq!(accepted, 0.0, "no connection woke it");
    let issued = bk
        .metric(
            "bkpool_certapi_certificates_issued_total",
            &[("pool", "local/default")],
        )
        .await;
    assert_eq!(issued, 1.0);

    // The certificate opens its pool through the gateway; the other pool sleeps on.
    assert_eq!(bk.health(&out).await.unwrap(), Health::Serving);
    assert_eq!(bk.pool("other").await.state, Phase::Sleeping);
}

#[tokio::test]
async fn post_wake_wakes_a_pool_only_for_a_caller_allowed_on_it() {
    let (bk, api) = local_with_api("31710-31719");
    assert_eq!(post_wake(&bk, &api, "default", None), 401);
    assert_eq!(post_wake(&bk, &api, "other", Some(TOKEN)), 403);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bk.pool("default").await.state, Phase::Sleeping);
    assert_eq!(bk.pool("other").await.state, Phase::Sleeping);

    let status = post_wake(&bk, &api, "default", Some(TOKEN));
    assert!((200..300).contains(&status), "{status}");
    bk.wait_phase("default", Phase::Ready, Duration::from_secs(20))
        .await;
    assert_eq!(bk.pool("other").await.state, Phase::Sleeping);
}

#[test]
fn a_certificate_api_pool_the_instance_does_not_run_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("local.toml");
    let body = format!(
        "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nports = \"31720-31729\"\n{}",
        standin_pool("default")
    );
    std::fs::write(&config, body).unwrap();
    let api = api_config(dir.path(), &["local/default", "ci/elsewhere"]);
    let out = Command::new(env!("CARGO_BIN_EXE_bkpool"))
        .args(["local", "--config"])
        .arg(&config)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--certapi")
        .arg(&api)
        .env("XDG_RUNTIME_DIR", dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("pool ci/elsewhere is not a pool of this instance (local/default)"),
        "{stderr}"
    );
}
