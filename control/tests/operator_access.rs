//! Leader election and least privilege against a real API server (skipped without
//! `BKPOOL_TEST_KUBECONFIG`): one leader of two, takeover on release and on a crash; the
//! controller running as its own ServiceAccount with the RBAC from `deploy/` does its job
//! (reconcilers, publishing the gateway's Secrets, the certificate API) and is refused
//! anything else.

mod support;

use std::time::{Duration, Instant};

use control::crd::{BuildKitPool, Phase};
use control::operator::leader::LeaderElection;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use support::*;
use tokio::sync::{oneshot, watch};

struct Contender {
    leader: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

fn contend(client: &Client, ns: &str, identity: &str) -> Contender {
    let election = LeaderElection::new(client.clone(), ns, "bkpool-controller", identity)
        .with_timings(Duration::from_secs(3), Duration::from_millis(200));
    let (tx, leader) = watch::channel(false);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        election
            .run(tx, async move {
                let _ = stopped.await;
            })
            .await;
    });
    Contender {
        leader,
        stop: Some(stop),
        task,
    }
}

async fn holder(client: &Client, ns: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    leases
        .get("bkpool-controller")
        .await
        .ok()?
        .spec?
        .holder_identity
}

#[tokio::test]
async fn two_contenders_elect_one_leader_and_the_other_takes_over() {
    let Some(client) = test_client().await else {
        return;
    };
    let ns = TestNamespace::create(&client, "bkp-leader").await;
    let a = contend(&client, &ns.name, "a");
    let b = contend(&client, &ns.name, "b");
    let first = eventually("a leader", Duration::from_secs(10), || async {
        match (*a.leader.borrow(), *b.leader.borrow()) {
            (true, false) => Some("a"),
            (false, true) => Some("b"),
            (true, true) => panic!("two leaders"),
            _ => None,
        }
    })
    .await;
    // Leadership is stable: for a few renewals exactly one leads, the one the Lease names.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_ne!(*a.leader.borrow(), *b.leader.borrow(), "exactly one leader");
    }
    assert_eq!(holder(&client, &ns.name).await.as_deref(), Some(first));

    // A leader that stops releases the Lease: the other takes over within a retry or two.
    let (leading, mut standby) = if first == "a" { (a, b) } else { (b, a) };
    let stopped_at = Instant::now();
    let _ = leading.stop.unwrap().send(());
    let _ = leading.task.await;
    standby.leader.wait_for(|l| *l).await.unwrap();
    let took = stopped_at.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "takeover after release took {took:?}"
    );

    // A leader that dies without releasing is replaced once its lease expires (3 s).
    let mut c = contend(&client, &ns.name, "c");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!*c.leader.borrow(), "c must wait while the lease is held");
    let crashed_at = Instant::now();
    standby.task.abort();
    tokio::time::timeout(Duration::from_secs(10), c.leader.wait_for(|l| *l))
        .await
        .unwrap()
        .unwrap();
    let took = crashed_at.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "took over a live lease after {took:?}"
    );
    let lease: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let spec = lease.get("bkpool-controller").await.unwrap().spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("c"));
    assert!(spec.lease_transitions.unwrap() >= 2, "{spec:?}");
    let _ = c.stop.take().unwrap().send(());
    let _ = c.task.await;
    ns.delete().await;
}

#[tokio::test]
async fn the_controller_does_its_job_with_the_deployed_rbac_and_nothing_more() {
    let Some(config) = test_config().await else {
        return;
    };
    let client = Client::try_from(config.clone()).unwrap();
    install_crd(&client).await;
    // The controller's own namespace, the one it publishes the gateway's Secrets in, and
    // the namespace of the pools it serves.
    let system = TestNamespace::create(&client, "bkp-rbac-sys").await;
    let gateway_secrets = TestNamespace::create(&client, "bkp-rbac-gws").await;
    let ns = TestNamespace::create(&client, "bkp-rbac").await;
    let moves = deployed_namespaces(&system.name, &gateway_secrets.name);
    let cluster_names =
        install_rbac_in(&client, &moves, &system.name, "rbac-controller.yaml").await;

    let token = service_account_token(&client, &system.name, "bkpool-controller").await;
    let sa_client = client_with_token(config, &token);

    // The ServiceAccount's Lease and reconciles work.
    let election = LeaderElection::new(sa_client.clone(), &system.name, "bkpool-controller", "sa");
    assert!(
        election.try_acquire_or_renew().await.unwrap(),
        "the Role allows the Lease"
    );
    let controller = RunningController::start_in(&sa_client, &ns.name, &gateway_secrets.name);
    let pools: Api<BuildKitPool> = Api::namespaced(client.clone(), &ns.name);
    let pool: BuildKitPool = serde_json::from_value(json!({
        "apiVersion": "bkpool.dev/v1alpha1", "kind": "BuildKitPool",
        "metadata": {"name": "p"},
        "spec": {"workload": {"kind": "StatefulSet"}, "auth": {"mode": "RBAC"}}
    }))
    .unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();
    eventually(
        "pool reconciled as the ServiceAccount",
        Duration::from_secs(30),
        || async {
            let status = pools.get("p").await.ok()?.status?;
            (status.phase == Some(Phase::Sleeping)).then_some(())
        },
    )
    .await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    assert!(secrets.get("p-client-ca").await.is_ok());
    // The gateway's certificates are published in their own namespace.
    let published: Api<Secret> = Api::namespaced(client.clone(), &gateway_secrets.name);
    let copy = format!("{}.p-gateway-tls", ns.name);
    eventually("the gateway's copy", Duration::from_secs(30), || async {
        published.get(&copy).await.ok()
    })
    .await;

    // The certificate API as the same ServiceAccount: its CA Secret and ConfigMap, its
    // caches, TokenReview and SubjectAccessReview.
    certificate_api_works(&client, &sa_client, &system.name, &ns.name).await;
    controller.stop().await;

    // A copy has no owner in another namespace: once its pool is gone, the next controller
    // to start (and every one, each minute) deletes it, with the Role in its own namespace.
    pools.delete("p", &DeleteParams::default()).await.unwrap();
    eventually("the pool gone", Duration::from_secs(30), || async {
        pools.get("p").await.is_err().then_some(())
    })
    .await;
    let controller = RunningController::start_in(&sa_client, &ns.name, &gateway_secrets.name);
    eventually("the copy deleted", Duration::from_secs(30), || async {
        published.get(&copy).await.is_err().then_some(())
    })
    .await;
    controller.stop().await;

    // Anything outside the role is refused.
    let forbidden = |r: Result<(), kube::Error>, what: &str| match r {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{what}: {s:?}"),
        other => panic!("{what}: expected 403, got {other:?}"),
    };
    let sa_pods: Api<Pod> = Api::namespaced(sa_client.clone(), &ns.name);
    forbidden(
        sa_pods.list(&ListParams::default()).await.map(drop),
        "list pods",
    );
    let sa_secrets: Api<Secret> = Api::namespaced(sa_client.clone(), &ns.name);
    forbidden(
        sa_secrets.get("p-client-ca").await.map(drop),
        "get a secret",
    );
    forbidden(
        sa_secrets
            .delete("p-client-ca", &DeleteParams::default())
            .await
            .map(drop),
        "delete a secret of a pool's namespace",
    );
    let sa_system_secrets: Api<Secret> = Api::namespaced(sa_client.clone(), &system.name);
    forbidden(
        sa_system_secrets
            .delete("bkpool-certapi-ca", &DeleteParams::default())
            .await
            .map(drop),
        "delete a secret of its own namespace (the certificate API's CA)",
    );
    let sa_pools: Api<BuildKitPool> = Api::namespaced(sa_client.clone(), &ns.name);
    forbidden(
        sa_pools
            .delete("p", &DeleteParams::default())
            .await
            .map(drop),
        "delete a pool",
    );
    let other_lease = Lease {
        metadata: kube::api::ObjectMeta {
            name: Some("other".into()),
            ..Default::default()
        },
        spec: None,
    };
    let sa_leases: Api<Lease> = Api::namespaced(sa_client.clone(), &system.name);
    sa_leases
        .create(&PostParams::default(), &other_lease)
        .await
        .unwrap();
    forbidden(sa_leases.get("other").await.map(drop), "get another lease");

    let roles: Api<ClusterRole> = Api::all(client.clone());
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    let _ = bindings
        .delete(&cluster_names, &DeleteParams::default())
        .await;
    let _ = roles.delete(&cluster_names, &DeleteParams::default()).await;
    ns.delete().await;
    gateway_secrets.delete().await;
    system.delete().await;
}

/// Runs the certificate API with `sa_client` (the controller's ServiceAccount) and gets a
/// certificate for pool `ns/p` (RBAC mode) with a ServiceAccount token: that takes its CA
/// Secret and ConfigMap in `system`, its watch caches, a TokenReview and a
/// SubjectAccessReview. Anyone authenticated may read the ConfigMap, and nothing else there.
async fn certificate_api_works(admin: &Client, sa_client: &Client, system: &str, ns: &str) {
    use control::certapi::replica::{Replica, ReplicaSettings};
    use control::operator::watch::Scope;
    use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};

    let settings = ReplicaSettings {
        namespace: system.to_owned(),
        scope: Scope::Namespace(ns.to_owned()),
        audiences: vec!["bkpool".into()],
        server_names: vec!["127.0.0.1".into()],
        operator: control::operator::Settings::default(),
        oidc_roots: None,
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let replica = Replica::new(sa_client.clone(), &settings, &mut registry);
    let ready = replica.readiness();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(replica.run(listener, stop.clone()));
    eventually(
        "the certificate API serving",
        Duration::from_secs(30),
        || async {
            ready
                .load(std::sync::atomic::Ordering::Relaxed)
                .then_some(())
        },
    )
    .await;

    let Ok(user_token) = std::env::var("KUBE_LOCAL_USER_TOKEN") else {
        panic!("KUBE_LOCAL_USER_TOKEN: kube-local's unprivileged user (alice)");
    };
    let config = test_config().await.unwrap();
    let alice = client_with_token(config, &user_token);
    let alice_maps: Api<ConfigMap> = Api::namespaced(alice, system);
    let published = alice_maps.get("bkpool-certapi-ca").await.unwrap();
    let ca = published.data.unwrap()["ca.crt"].clone();
    match alice_maps.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("alice may list ConfigMaps: {other:?}"),
    }

    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "builder"}})).unwrap();
    sas.create(&PostParams::default(), &sa).await.unwrap();
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "bkpool-builder"},
        "rules": [{"apiGroups": ["bkpool.dev"], "resources": ["buildkitpools/certificates"],
                   "resourceNames": ["p"], "verbs": ["create"]}],
    }))
    .unwrap();
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "bkpool-builder"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "bkpool-builder"},
        "subjects": [{"kind": "ServiceAccount", "name": "builder", "namespace": ns}],
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let request = k8s_openapi::api::authentication::v1::TokenRequest {
        spec: k8s_openapi::api::authentication::v1::TokenRequestSpec {
            audiences: vec!["bkpool".into()],
            expiration_seconds: Some(600),
            ..Default::default()
        },
        ..Default::default()
    };
    let token = sas
        .create_token_request("builder", &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let http = control::https::HttpsClient::with_roots_pem(&ca).unwrap();
    let url = format!("https://{addr}/v1/namespaces/{ns}/pools/p/certificates");
    let body = json!({"csr": csr, "ttl": "10m"}).to_string().into_bytes();
    let mut last = String::new();
    for _ in 0..30 {
        let answer = http
            .post_json(&url, Some(&token), body.clone())
            .await
            .unwrap();
        if answer.status == 200 {
            last.clear();
            break;
        }
        last = format!(
            "{} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        last.is_empty(),
        "a certificate as the controller's ServiceAccount: {last}"
    );
    stop.cancel();
    let _ = serving.await;
}
