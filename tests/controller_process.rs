//! `bkpool controller` as real processes against a real API server (skipped without
//! `BKPOOL_TEST_KUBECONFIG`): two replicas elect one leader, both serve health and metrics,
//! only the leader reconciles, and the standby takes over when the leader is stopped.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use control::crd::{BuildKitPool, Phase};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use support::http_get;

struct Replica {
    child: Child,
    admin: SocketAddr,
}

impl Replica {
    fn start(kubeconfig: &std::path::Path, ns: &str, identity: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bkpool"))
            .args(["--log-format", "json", "controller", "--kubeconfig"])
            .arg(kubeconfig)
            .args([
                "--namespace",
                ns,
                "--lease-namespace",
                ns,
                "--gateway-secret-namespace",
                ns,
                "--identity",
                identity,
            ])
            .args([
                "--lease-duration",
                "4s",
                "--retry-period",
                "300ms",
                "--listen",
                "127.0.0.1:0",
                "--certapi-listen",
                "127.0.0.1:0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bkpool controller");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("controller admin endpoint") {
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                    let _ = tx.send(
                        v["fields"]["addr"]
                            .as_str()
                            .unwrap()
                            .parse::<SocketAddr>()
                            .unwrap(),
                    );
                }
            }
        });
        let admin = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("controller admin endpoint");
        Self { child, admin }
    }

    async fn leader(&self) -> Option<bool> {
        let (status, body) = http_get(self.admin, "/metrics").await;
        assert_eq!(status, 200);
        let line = body
            .lines()
            .find(|l| l.starts_with("bkpool_controller_leader "))?;
        Some(line.ends_with(" 1"))
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                return exit;
            }
            assert!(
                Instant::now() < deadline,
                "controller did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn reconciled(pools: &Api<BuildKitPool>, name: &str) -> Option<()> {
    let status = pools.get(name).await.ok()?.status?;
    (status.phase == Some(Phase::Sleeping)).then_some(())
}

#[tokio::test]
async fn two_replicas_one_leader_and_takeover_when_it_stops() {
    let Some(kubeconfig) = control::testkit::kubeconfig() else {
        return;
    };
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let file = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    install_crd(&client).await;
    let ns = format!(
        "bkp-proc-{:x}",
        std::process::id() ^ Instant::now().elapsed().subsec_nanos()
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut namespace = Namespace::default();
    namespace.metadata.name = Some(ns.clone());
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();

    let mut a = Replica::start(&kubeconfig, &ns, "a");
    let mut b = Replica::start(&kubeconfig, &ns, "b");
    let leader = wait_for("one leader", Duration::from_secs(15), || async {
        match (a.leader().await, b.leader().await) {
            (Some(true), Some(false)) => Some('a'),
            (Some(false), Some(true)) => Some('b'),
            (Some(true), Some(true)) => panic!("two leaders"),
            _ => None,
        }
    })
    .await;
    for replica in [&a, &b] {
        assert_eq!(http_get(replica.admin, "/healthz").await.0, 200);
        // Ready once its certificate API serves (caches synced, certificate in place): a
        // standby is ready too, as it serves certificates.
        wait_for("a standby ready too", Duration::from_secs(20), || async {
            (http_get(replica.admin, "/readyz").await.0 == 200).then_some(())
        })
        .await;
    }

    let pools: Api<BuildKitPool> = Api::namespaced(client.clone(), &ns);
    let pool = |name: &str| -> BuildKitPool {
        serde_json::from_value(json!({"apiVersion": "bkpool.dev/v1alpha1", "kind": "BuildKitPool", "metadata": {"name": name}, "spec": {}})).unwrap()
    };
    pools
        .create(&PostParams::default(), &pool("first"))
        .await
        .unwrap();
    wait_for("first pool reconciled", Duration::from_secs(20), || {
        reconciled(&pools, "first")
    })
    .await;
    let (stopping, standby) = if leader == 'a' {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    let metrics = http_get(standby.admin, "/metrics").await.1;
    assert!(
        !metrics.contains("bkpool_controller_reconciles_total{"),
        "the standby reconciled:\n{metrics}"
    );

    // SIGTERM: the leader releases the lease and exits; the standby takes over at once.
    let stopped_at = Instant::now();
    let exit = stopping.terminate();
    assert!(exit.success(), "{exit:?}");
    wait_for("takeover", Duration::from_secs(5), || async {
        standby.leader().await.filter(|l| *l)
    })
    .await;
    let took = stopped_at.elapsed();
    pools
        .create(&PostParams::default(), &pool("second"))
        .await
        .unwrap();
    wait_for(
        "second pool reconciled by the new leader",
        Duration::from_secs(20),
        || reconciled(&pools, "second"),
    )
    .await;
    let metrics = http_get(standby.admin, "/metrics").await.1;
    assert!(
        metrics.contains("bkpool_controller_reconciles_total{reconciler=\"pki\"}"),
        "{metrics}"
    );
    eprintln!("takeover after SIGTERM: {took:?}");
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
}

/// Creates the CRD if it is missing and waits until pools can be listed.
async fn install_crd(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    match crds
        .create(&PostParams::default(), &control::crd::yaml::crd())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("create CRD: {e}"),
    }
    let pools: Api<BuildKitPool> = Api::all(client.clone());
    wait_for("CRD served", Duration::from_secs(20), || async {
        pools.list(&Default::default()).await.ok().map(drop)
    })
    .await;
}
