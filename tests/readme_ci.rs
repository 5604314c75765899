//! The README's "Use from CI" on Kubernetes, as written, against a real API server (skipped
//! without `BKPOOL_TEST_KUBECONFIG`): its pool, ServiceAccount, Role, RoleBinding and Job are
//! read from the README and created (the Job with a server-side dry run: there is no kubelet),
//! a `bkpool controller` process serves the certificate API as its own ServiceAccount with the
//! RBAC from `deploy/` (which also lets everyone read the API's CA), and the Job's own `bkpool login`
//! command line runs with what its pod would have (the projected token for audience `bkpool`,
//! the ServiceAccount's credentials for the ConfigMap), with only the addresses and namespaces
//! replaced and the build command replaced by a check of what `--exec` hands it. The real
//! `buildctl` through the gateway is `kube_front_door`'s part.

#[path = "../control/tests/support/mod.rs"]
mod cluster;
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cluster::{
    TestNamespace, deployed_namespaces, eventually, install_crd, install_rbac_in,
    service_account_token, service_account_token_for, test_client,
};
use control::crd::BuildKitPool;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::Value;
use support::k8s::{Controller, kubeconfig_with_token};

/// The YAML blocks of the README's "On Kubernetes" section, with namespace `ci` moved to `ns`.
fn readme_yaml(ns: &str) -> Vec<Vec<Value>> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme
        .find("### On Kubernetes")
        .expect("README: On Kubernetes");
    let end = readme
        .find("### Outside Kubernetes")
        .expect("README: Outside Kubernetes");
    let section = &readme[start..end];
    let mut blocks = Vec::new();
    let mut rest = section;
    while let Some(open) = rest.find("```yaml\n") {
        let body = &rest[open + 8..];
        let close = body.find("```").unwrap();
        let text = body[..close]
            .replace("namespace: ci}", &format!("namespace: {ns}}}"))
            .replace("--pool=ci/default", &format!("--pool={ns}/default"));
        let docs = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        blocks.push(docs);
        rest = &body[close..];
    }
    blocks
}

async fn create<K>(client: &Client, ns: &str, doc: &Value, dry_run: bool)
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let object: K = serde_json::from_value(doc.clone()).unwrap();
    let pp = PostParams {
        dry_run,
        ..PostParams::default()
    };
    Api::<K>::namespaced(client.clone(), ns)
        .create(&pp, &object)
        .await
        .unwrap_or_else(|e| panic!("README {}: {e}", doc["kind"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_kubernetes_job_gets_a_certificate_as_written() {
    let Some(client) = test_client().await else {
        return;
    };
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "bkp-readme").await;
    let system = TestNamespace::create(&client, "bkp-readme-sys").await;
    let blocks = readme_yaml(&ns.name);
    assert!(blocks.len() >= 2, "a pool block and a Job block");

    // The pool, then the Job's ServiceAccount, Role and RoleBinding, as the README has them.
    let pool = &blocks[0][0];
    assert_eq!(pool["kind"], "BuildKitPool");
    create::<BuildKitPool>(&client, &ns.name, pool, false).await;
    let mut job = None;
    for doc in &blocks[1] {
        match doc["kind"].as_str().unwrap() {
            "ServiceAccount" => create::<ServiceAccount>(&client, &ns.name, doc, false).await,
            "Role" => create::<Role>(&client, &ns.name, doc, false).await,
            "RoleBinding" => create::<RoleBinding>(&client, &ns.name, doc, false).await,
            "Job" => {
                create::<Job>(&client, &ns.name, doc, true).await;
                job = Some(doc.clone());
            }
            other => panic!("README: unexpected {other}"),
        }
    }
    let job = job.expect("README: a Job");
    let pod = &job["spec"]["template"]["spec"];
    let sa = pod["serviceAccountName"].as_str().unwrap();
    let audience = pod["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"]
        .as_str()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let command: Vec<String> = pod["containers"][0]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(command[..2], ["bkpool", "login"]);

    let moves = deployed_namespaces(&system.name, &system.name);
    let cluster_names =
        install_rbac_in(&client, &moves, &system.name, "rbac-controller.yaml").await;
    let controller_kubeconfig = dir.path().join("controller.kubeconfig");
    kubeconfig_with_token(
        &controller_kubeconfig,
        &service_account_token(&client, &system.name, "bkpool-controller").await,
    );
    let controller = Controller::start_in(
        &ns.name,
        &system.name,
        &system.name,
        &controller_kubeconfig,
        &dir.path().join("controller.log"),
    );
    let certapi = controller.certapi();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), &ns.name);
    eventually("the pool's client CA", Duration::from_secs(30), || async {
        secrets.get("default-client-ca").await.ok()
    })
    .await;

    // What the pod would have: the projected token, and its ServiceAccount's credentials.
    let token_file = dir.path().join("token");
    let token = service_account_token_for(&client, &ns.name, sa, &[audience]).await;
    std::fs::write(&token_file, token).unwrap();
    let in_cluster = dir.path().join("in-cluster.kubeconfig");
    kubeconfig_with_token(
        &in_cluster,
        &service_account_token(&client, &ns.name, sa).await,
    );
    let endpoint = format!("tcp://default.{}.svc:1234", ns.name);
    let check = format!(
        "test -s \"$BKPOOL_TLS_DIR/cert.pem\" && test -s \"$BKPOOL_TLS_DIR/key.pem\" \
         && test \"$BUILDKIT_HOST\" = {endpoint}"
    );
    let run = |token_file: &Path| {
        let mut args: Vec<String> = Vec::new();
        let mut after_exec = false;
        for arg in &command[2..] {
            if after_exec {
                continue;
            }
            match arg.split_once('=') {
                Some(("--serviceaccount", _)) => {
                    args.push(format!("--serviceaccount={}", token_file.display()))
                }
                Some(("--server", _)) => args.push(format!("--server=https://{certapi}")),
                _ if arg == "--ca-configmap" => {
                    args.push(format!("--ca-configmap={}/bkpool-certapi-ca", system.name));
                    args.push(format!("--kubeconfig={}", in_cluster.display()));
                }
                _ if arg == "--" => {
                    args.extend(["--".into(), "sh".into(), "-c".into(), check.clone()]);
                    after_exec = true;
                }
                _ => args.push(arg.clone()),
            }
        }
        let out = Command::new(env!("CARGO_BIN_EXE_bkpool"))
            .arg("login")
            .args(&args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The controller's caches and certificate come first; RBAC may take a moment too.
    let mut last = None;
    for _ in 0..40 {
        let (status, stderr) = run(&token_file);
        if status.success() {
            last = None;
            break;
        }
        last = Some(stderr);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(last, None, "the README's Job command");

    // The pod's default token (for the API server) is refused, as the README says.
    let default_token: PathBuf = dir.path().join("default-token");
    std::fs::write(
        &default_token,
        service_account_token(&client, &ns.name, sa).await,
    )
    .unwrap();
    let (status, stderr) = run(&default_token);
    assert!(!status.success());
    assert!(stderr.contains("audience_mismatch"), "{stderr}");

    drop(controller);
    let roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(client.clone());
    let bindings: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> = Api::all(client.clone());
    let _ = bindings.delete(&cluster_names, &Default::default()).await;
    let _ = roles.delete(&cluster_names, &Default::default()).await;
    ns.delete().await;
    system.delete().await;
}
