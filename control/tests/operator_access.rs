//! Leader election and least privilege against a real API server (skipped without
//! `BKPOOL_TEST_KUBECONFIG`): one leader of two, takeover on release and on a crash; the
//! controller running as its own ServiceAccount with the RBAC from `deploy/` does its job and
//! is refused anything else.

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
    // The controller's own namespace, and the namespace of the pools it serves.
    let system = TestNamespace::create(&client, "bkp-rbac-sys").await;
    let ns = TestNamespace::create(&client, "bkp-rbac").await;
    let cluster_names = install_rbac(&client, &system.name, "rbac-controller.yaml").await;

    let token = service_account_token(&client, &system.name, "bkpool-controller").await;
    let sa_client = client_with_token(config, &token);

    // The ServiceAccount's Lease and reconciles work.
    let election = LeaderElection::new(sa_client.clone(), &system.name, "bkpool-controller", "sa");
    assert!(
        election.try_acquire_or_renew().await.unwrap(),
        "the Role allows the Lease"
    );
    let controller = RunningController::start_in(&sa_client, &ns.name, &system.name);
    let pools: Api<BuildKitPool> = Api::namespaced(client.clone(), &ns.name);
    let pool: BuildKitPool = serde_json::from_value(json!({
        "apiVersion": "bkpool.dev/v1alpha1", "kind": "BuildKitPool",
        "metadata": {"name": "p"}, "spec": {"workload": {"kind": "StatefulSet"}}
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
    // The gateway's certificates are published in the controller's namespace.
    let published: Api<Secret> = Api::namespaced(client.clone(), &system.name);
    let copy = format!("{}.p-gateway-tls", ns.name);
    eventually("the gateway's copy", Duration::from_secs(30), || async {
        published.get(&copy).await.ok()
    })
    .await;
    controller.stop().await;

    // A copy has no owner in another namespace: once its pool is gone, the next controller
    // to start (and every one, each minute) deletes it, with the Role in its own namespace.
    pools.delete("p", &DeleteParams::default()).await.unwrap();
    eventually("the pool gone", Duration::from_secs(30), || async {
        pools.get("p").await.is_err().then_some(())
    })
    .await;
    let controller = RunningController::start_in(&sa_client, &ns.name, &system.name);
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
    system.delete().await;
}
