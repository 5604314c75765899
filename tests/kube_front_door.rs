//! The cluster path a CI job takes, end to end with the real BuildKit (skipped without
//! `BKPOOL_TEST_KUBECONFIG`, BuildKit or a static busybox). Every bkpool component is a
//! process acting as its own ServiceAccount with the RBAC of `deploy/`, in namespaces laid out
//! as deployed (the controller's, the gateways' Secret copies', the pools'); the process
//! kubelet runs the pods the operator asks for. A ServiceAccount token goes through `bkpool
//! login`; the certificate it writes carries a real `buildctl build` through `bkpool gateway
//! --kubernetes` to a pool woken from zero; the pool drains and is scaled back to zero; and the
//! certificate gets into no other pool of the namespace (presented under that pool's name it
//! reaches its own), nor does the token get a certificate for one.

#[path = "../control/tests/support/mod.rs"]
mod cluster;
mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use cluster::{
    TestNamespace, deployed_namespaces, eventually, install_crd, install_rbac_in,
    service_account_token, service_account_token_for, test_client,
};
use control::crd::{BuildKitPool, Phase};
use control::kubelet::Kubelet;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use support::buildkit::{self, Context, Endpoint};
use support::k8s::{
    Controller, create_sleeping_pool, free_ports, kubeconfig_with_token, loopback,
    publish_gateways, secret_text, start_ready_gateway,
};

const WAIT: Duration = Duration::from_secs(90);
/// The pool the job may use, and one of the same namespace it may not.
const POOL: &str = "bk";
const OTHER: &str = "other";
/// The job's ServiceAccount.
const BUILDER: &str = "builder";

async fn phase(client: &Client, ns: &str, pool: &str) -> Option<Phase> {
    let pools: Api<BuildKitPool> = Api::namespaced(client.clone(), ns);
    pools.get(pool).await.ok()?.status?.phase
}

/// The pods of `pool`, by the label the operator puts on them.
async fn pods(client: &Client, ns: &str, pool: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = ListParams::default().labels(&format!("bkpool.dev/pool={pool}"));
    pods.list(&selector).await.unwrap().items
}

/// `bkpool login` as the job runs it, once.
fn login_once(
    certapi: &str,
    configmap: &str,
    kubeconfig: &Path,
    pool: &str,
    token: &Path,
    out: &Path,
) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bkpool"))
        .arg("login")
        .arg(format!("--server=https://{certapi}"))
        .arg(format!("--ca-configmap={configmap}"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg(format!("--pool={pool}"))
        .arg("--token-file")
        .arg(token)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

/// [`login_once`], retried while the controller's caches and certificate come up (the last
/// failure's output is the panic's message).
async fn login(
    certapi: &str,
    configmap: &str,
    kubeconfig: &Path,
    pool: &str,
    token: &Path,
    out: &Path,
) {
    let mut last = String::new();
    for _ in 0..40 {
        let output = login_once(certapi, configmap, kubeconfig, pool, token, out);
        if output.status.success() {
            return;
        }
        last = String::from_utf8_lossy(&output.stderr).into_owned();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("bkpool login: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ci_token_becomes_a_build_on_a_pool_woken_from_zero_and_nowhere_else() {
    let Some(client) = test_client().await else {
        return;
    };
    let Some(tools) = buildkit::tools() else {
        return;
    };
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "bkp-door").await;
    let system = TestNamespace::create(&client, "bkp-door-sys").await;
    let published = TestNamespace::create(&client, "bkp-door-gws").await;
    let dir = tempfile::tempdir().unwrap();

    // The components' identities and rights, as deploy/ has them.
    let moves = deployed_namespaces(&system.name, &published.name);
    let gateway_role = install_rbac_in(&client, &moves, &system.name, "rbac-gateway.yaml").await;
    let controller_role =
        install_rbac_in(&client, &moves, &system.name, "rbac-controller.yaml").await;
    let controller_kubeconfig = kubeconfig_with_token(
        &dir.path().join("controller.kubeconfig"),
        &service_account_token(&client, &system.name, "bkpool-controller").await,
    );
    let gateway_kubeconfig = kubeconfig_with_token(
        &dir.path().join("gateway.kubeconfig"),
        &service_account_token(&client, &system.name, "bkpool-gateway").await,
    );

    // Two pools; only the first lists the job's ServiceAccount.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns.name);
    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": BUILDER}})).unwrap();
    accounts
        .create(&PostParams::default(), &account)
        .await
        .unwrap();
    let controller = Controller::start_in(
        &ns.name,
        &system.name,
        &published.name,
        &controller_kubeconfig,
        &dir.path().join("controller.log"),
    );
    let certapi = controller.certapi().to_string();
    for (name, auth) in [
        (
            POOL,
            json!({"mode": "ServiceAccounts", "serviceAccounts": [BUILDER]}),
        ),
        (OTHER, json!({"mode": "ServiceAccounts"})),
    ] {
        let spec = json!({"auth": auth,
                          "scaling": {"idleAfter": "2s", "minUpAfterWake": "0s", "wakeTimeout": "60s"},
                          "workload": {"security": "Privileged"}});
        create_sleeping_pool(&client, &ns.name, name, spec).await;
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);

    let kubelet = Kubelet::builder(client.clone(), &ns.name)
        .buildkit(&tools.0)
        .start();
    let ip = loopback(16, 1);
    let ports = free_ports(ip);
    let gateway = start_ready_gateway(
        ip,
        ports,
        &ns.name,
        &published.name,
        &gateway_kubeconfig,
        dir.path(),
    )
    .await;
    publish_gateways(&client, &system.name, &[ip], ports.1).await;
    assert!(
        pods(&client, &ns.name, POOL).await.is_empty(),
        "asleep: no pod"
    );

    // 1. The job's token for audience `bkpool` goes through `bkpool login`, which pins the
    // certificate API's CA from the operator's ConfigMap with the job's own credentials.
    let token = dir.path().join("token");
    let projected = service_account_token_for(&client, &ns.name, BUILDER, &["bkpool"]).await;
    std::fs::write(&token, projected).unwrap();
    let own_credentials = kubeconfig_with_token(
        &dir.path().join("builder.kubeconfig"),
        &service_account_token(&client, &ns.name, BUILDER).await,
    );
    let tlsdir = dir.path().join("tls");
    login(
        &certapi,
        &format!("{}/bkpool-certapi-ca", system.name),
        &own_credentials,
        &format!("{}/{POOL}", ns.name),
        &token,
        &tlsdir,
    )
    .await;

    // 2 and 3. A real build with that certificate, through the gateway, on the pool woken
    // from zero; then idle, drained, scaled to zero, every pod gone.
    let endpoint = Endpoint {
        server_name: Some(format!("{POOL}.{}.svc", ns.name)),
        ..Endpoint::tls(gateway.listen, &tlsdir)
    };
    let context = Context::new(&tools.1, "front door", "");
    let (output, out) = context.build(&tools.0, &endpoint).await;
    let built = std::fs::read_to_string(out.path().join("out.txt")).unwrap_or_default();
    assert!(
        output.status.success() && built == Context::expected("front door"),
        "build through the gateway: {}\nout.txt: {built:?}\ngateway log:\n{}\nkubelet:\n{}\ncontroller log:\n{}",
        buildkit::describe(&output),
        gateway.log.lock().unwrap().join("\n"),
        kubelet.logs(),
        std::fs::read_to_string(dir.path().join("controller.log")).unwrap_or_default(),
    );
    eventually("the pool asleep again, no pod left", WAIT, || async {
        (phase(&client, &ns.name, POOL).await? == Phase::Sleeping).then_some(())?;
        pods(&client, &ns.name, POOL).await.is_empty().then_some(())
    })
    .await;

    // 4. Nowhere else. In terminate mode the pool is the certificate's (URI SAN, checked
    // against the CA that signed it), not the name the client dials: presented under the
    // other pool's name, with that pool's gateway certificate trusted (what a login for it
    // would write), the certificate reaches its own pool and the other pool sees nothing.
    let other_ca: Secret = secrets.get(&format!("{OTHER}-client-ca")).await.unwrap();
    let other_tlsdir = dir.path().join("tls-other");
    std::fs::create_dir(&other_tlsdir).unwrap();
    for file in ["cert.pem", "key.pem"] {
        std::fs::copy(tlsdir.join(file), other_tlsdir.join(file)).unwrap();
    }
    let other_bundle = secret_text(&other_ca, "ca-bundle.crt");
    std::fs::write(other_tlsdir.join("ca.pem"), other_bundle).unwrap();
    let elsewhere = Endpoint {
        server_name: Some(format!("{OTHER}.{}.svc", ns.name)),
        ..Endpoint::tls(gateway.listen, &other_tlsdir)
    };
    buildkit::workers(&tools.0, &elsewhere)
        .await
        .expect("served by its own pool");
    let metrics = support::http_get(gateway.admin, "/metrics").await.1;
    let accepted = |pool: &str| {
        support::metrics::sample(
            &metrics,
            "bkpool_gateway_connections_accepted_total",
            &[("pool", &format!("{}/{pool}", ns.name))],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(accepted(POOL), 2.0, "the build, then this: {metrics}");
    assert_eq!(accepted(OTHER), 0.0, "{metrics}");
    assert!(
        !pods(&client, &ns.name, POOL).await.is_empty(),
        "its own pool woke"
    );
    assert!(pods(&client, &ns.name, OTHER).await.is_empty(), "no wake");
    assert_eq!(phase(&client, &ns.name, OTHER).await, Some(Phase::Sleeping));

    // And the job's token gets no certificate for the other pool: it is not listed there.
    let refused = login_once(
        &certapi,
        &format!("{}/bkpool-certapi-ca", system.name),
        &own_credentials,
        &format!("{}/{OTHER}", ns.name),
        &token,
        &dir.path().join("tls-refused"),
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("serviceaccount_not_listed"), "{stderr}");
    assert!(!dir.path().join("tls-refused/cert.pem").exists());

    drop((controller, gateway));
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    let roles: Api<ClusterRole> = Api::all(client.clone());
    for name in [&gateway_role, &controller_role] {
        let _ = bindings.delete(name, &Default::default()).await;
        let _ = roles.delete(name, &Default::default()).await;
    }
    ns.delete_after(kubelet).await;
    system.delete().await;
    published.delete().await;
}
