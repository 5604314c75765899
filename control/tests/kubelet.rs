//! The process kubelet against a real API server (skipped without `BKPOOL_TEST_KUBECONFIG`
//! or busybox): pods are bound and run as local processes with their volumes, environment
//! and own loopback IP, their readiness probes decide the Ready condition, crashes show as
//! restarts or failures as `restartPolicy` says, a deletion is SIGTERM, then SIGKILL after the
//! grace period, then gone, and a claim's directory outlives its pods.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use control::kubelet::Kubelet;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use support::*;

const WAIT: Duration = Duration::from_secs(30);

/// A cluster client, a fresh namespace and busybox, or a skip.
async fn setup(prefix: &str) -> Option<(Client, TestNamespace, PathBuf)> {
    let client = test_client().await?;
    let busybox = control::testkit::on_path("busybox").or_else(control::testkit::static_busybox)?;
    let ns = TestNamespace::create(&client, prefix).await;
    Some((client, ns, busybox))
}

async fn create<K>(client: &Client, ns: &str, object: serde_json::Value) -> K
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
{
    let object: K = serde_json::from_value(object).unwrap();
    let api = Api::<K>::namespaced(client.clone(), ns);
    for _ in 0..100 {
        match api.create(&PostParams::default(), &object).await {
            Ok(created) => return created,
            // A new namespace's default ServiceAccount and its token come a moment later.
            Err(kube::Error::Api(s)) if s.message.contains("retry") => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("create {}: {e}", object.name_any()),
        }
    }
    panic!(
        "create {}: still told to retry after 20 s",
        object.name_any()
    );
}

/// Waits until pod `name` satisfies `check`; returns it.
async fn pod_until(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    kubelet: &Kubelet,
    check: impl Fn(&Pod) -> bool,
) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    for _ in 0..(WAIT.as_millis() / 100) {
        if let Ok(pod) = pods.get(name).await
            && check(&pod)
        {
            return pod;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pod = pods.get(name).await.ok();
    panic!(
        "pod {name}: {what} not within {WAIT:?}; status: {:#?}\nlogs:\n{}",
        pod.and_then(|p| p.status),
        kubelet.logs()
    );
}

fn condition(pod: &Pod, kind: &str) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions
        .into_iter()
        .flatten()
        .any(|c| c.type_ == kind && c.status == "True")
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn container_status(pod: &Pod) -> k8s_openapi::api::core::v1::ContainerStatus {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone());
    statuses
        .unwrap_or_default()
        .into_iter()
        .next()
        .expect("a container status")
}

#[tokio::test]
async fn a_pod_runs_with_its_volumes_environment_and_ip_and_its_probe_makes_it_ready() {
    let Some((client, ns, busybox)) = setup("kl-run").await else {
        return;
    };
    let kubelet = Kubelet::builder(client.clone(), &ns.name).start();
    let _: Secret = create(
        &client,
        &ns.name,
        json!({
            "metadata": {"name": "s"}, "stringData": {"password": "hunter2"}
        }),
    )
    .await;
    let _: ConfigMap = create(
        &client,
        &ns.name,
        json!({
            "metadata": {"name": "c"}, "data": {"greeting": "hello"}
        }),
    )
    .await;
    // Serves its volumes' contents over HTTP on the pod IP; ready once /www/ready exists,
    // which it writes after a moment, so Ready comes from the probe, not from the start.
    let script = r#"
        cat /etc/secret/password /etc/config/hello.txt > /www/index.html
        echo "$GREETING $POD_NAME $POD_IP" >> /www/index.html
        (sleep 3; touch /www/ready) &
        exec $BUSYBOX httpd -f -p $(POD_IP):8080 -h /www
    "#;
    let _: Pod = create(&client, &ns.name, json!({
        "metadata": {"name": "web"},
        "spec": {
            "containers": [{
                "name": "web",
                "image": "busybox",
                "command": ["/bin/sh", "-c", script],
                "env": [
                    {"name": "BUSYBOX", "value": busybox.to_string_lossy()},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "greeting"}}},
                ],
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {
                    "exec": {"command": ["/bin/sh", "-c", "test -f /www/ready"]},
                    "periodSeconds": 1,
                },
                "volumeMounts": [
                    {"name": "secret", "mountPath": "/etc/secret", "readOnly": true},
                    {"name": "config", "mountPath": "/etc/config"},
                    {"name": "www", "mountPath": "/www"},
                ],
            }],
            "volumes": [
                {"name": "secret", "secret": {"secretName": "s", "defaultMode": 0o400}},
                {"name": "config", "configMap": {"name": "c", "items": [{"key": "greeting", "path": "hello.txt"}]}},
                {"name": "www", "emptyDir": {}},
            ],
        }
    })).await;

    let running = pod_until(&client, &ns.name, "web", "Running", &kubelet, |p| {
        phase(p) == "Running"
    })
    .await;
    assert_eq!(
        running.spec.as_ref().unwrap().node_name.as_deref(),
        Some("kube-local-node")
    );
    let ready = pod_until(&client, &ns.name, "web", "Ready", &kubelet, |p| {
        condition(p, "Ready")
    })
    .await;
    assert!(
        !condition(&running, "Ready"),
        "Running, but not Ready before the probe passes"
    );
    let ip: std::net::Ipv4Addr = ready
        .status
        .as_ref()
        .unwrap()
        .pod_ip
        .as_ref()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(ip.octets()[..2], [127, 42], "a loopback pod IP");
    assert!(container_status(&ready).ready);

    let body = http_get(ip, 8080, &kubelet).await;
    assert_eq!(
        body,
        format!("hunter2hellohello web {ip}\n"),
        "{}",
        kubelet.logs()
    );
    ns.delete_after(kubelet).await;
}

/// A plain HTTP GET of `/`, returning the body.
async fn http_get(ip: std::net::Ipv4Addr, port: u16, kubelet: &Kubelet) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connected = tokio::net::TcpStream::connect((ip, port)).await;
    let mut tcp = connected.unwrap_or_else(|e| panic!("the pod serves: {e}\n{}", kubelet.logs()));
    tcp.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    raw.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn crashes_restart_with_back_off_or_fail_the_pod_as_the_restart_policy_says() {
    let Some((client, ns, _)) = setup("kl-crash").await else {
        return;
    };
    let kubelet = Kubelet::builder(client.clone(), &ns.name)
        .restart_backoff(Duration::from_millis(200))
        .start();
    let crashing = |name: &str, policy: &str| {
        json!({
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": policy,
                "containers": [{"name": "c", "image": "busybox", "command": ["/bin/sh", "-c", "sleep 0.2; exit 3"]}],
            }
        })
    };
    let _: Pod = create(&client, &ns.name, crashing("never", "Never")).await;
    let _: Pod = create(&client, &ns.name, crashing("always", "Always")).await;
    let _: Pod = create(&client, &ns.name, json!({
        "metadata": {"name": "done"},
        "spec": {"restartPolicy": "OnFailure", "containers": [{"name": "c", "image": "busybox", "command": ["true"]}]}
    })).await;

    let failed = pod_until(&client, &ns.name, "never", "Failed", &kubelet, |p| {
        phase(p) == "Failed"
    })
    .await;
    let terminated = container_status(&failed).state.unwrap().terminated.unwrap();
    assert_eq!(
        (terminated.exit_code, terminated.reason.as_deref()),
        (3, Some("Error"))
    );
    assert_eq!(container_status(&failed).restart_count, 0);

    let restarted = pod_until(
        &client,
        &ns.name,
        "always",
        "restarted twice",
        &kubelet,
        |p| p.status.is_some() && container_status(p).restart_count >= 2,
    )
    .await;
    assert_eq!(
        phase(&restarted),
        "Running",
        "a crash loop keeps the pod Running"
    );
    let last = container_status(&restarted)
        .last_state
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(last.exit_code, 3);

    let done = pod_until(&client, &ns.name, "done", "Succeeded", &kubelet, |p| {
        phase(p) == "Succeeded"
    })
    .await;
    assert_eq!(
        container_status(&done)
            .state
            .unwrap()
            .terminated
            .unwrap()
            .reason
            .as_deref(),
        Some("Completed")
    );
    ns.delete_after(kubelet).await;
}

#[tokio::test]
async fn deletion_is_sigterm_then_sigkill_after_the_grace_and_a_claim_outlives_its_pods() {
    let Some((client, ns, _)) = setup("kl-del").await else {
        return;
    };
    let kubelet = Kubelet::builder(client.clone(), &ns.name).start();
    let _: PersistentVolumeClaim = create(&client, &ns.name, json!({
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    })).await;
    // Notes SIGTERM in the claim, then ignores it: only SIGKILL ends it. It also leaves a
    // detached process behind, which must go with the pod.
    let stubborn = r#"
        trap 'echo TERM >> /data/signals' TERM
        setsid sh -c 'sleep 1000; : /data' &
        n=$(cat /data/runs 2>/dev/null || echo 0); echo $((n + 1)) > /data/runs
        while true; do sleep 0.1; done
    "#;
    let pod = |name: &str| {
        json!({
            "metadata": {"name": name},
            "spec": {
                "terminationGracePeriodSeconds": 2,
                "containers": [{"name": "c", "image": "busybox", "command": ["/bin/sh", "-c", stubborn],
                                "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
            }
        })
    };
    let _: Pod = create(&client, &ns.name, pod("first")).await;
    pod_until(&client, &ns.name, "first", "Ready", &kubelet, |p| {
        condition(p, "Ready")
    })
    .await;
    let claim = kubelet.claim_dir("data");
    // Its processes name the claim's directory: /data was rewritten to it.
    let marker = claim.to_string_lossy().into_owned();
    let tree = eventually("the pod's processes", WAIT, || async {
        let tree = family(&marker);
        (tree.len() >= 3).then_some(tree)
    })
    .await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let asked = std::time::Instant::now();
    pods.delete("first", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the pod object gone", WAIT, || async {
        matches!(pods.get_opt("first").await, Ok(None)).then_some(())
    })
    .await;
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "waited out the grace period: {took:?}"
    );
    assert_eq!(
        std::fs::read_to_string(claim.join("signals")).unwrap(),
        "TERM\n"
    );
    let left: Vec<_> = tree.iter().filter(|&&p| alive(p)).collect();
    assert!(left.is_empty(), "killed, detached ones too: {left:?}");

    // The next pod on the same claim finds what the first one left.
    let _: Pod = create(&client, &ns.name, pod("second")).await;
    pod_until(&client, &ns.name, "second", "Ready", &kubelet, |p| {
        condition(p, "Ready")
    })
    .await;
    eventually("the second run counted", WAIT, || async {
        (std::fs::read_to_string(claim.join("runs")).ok()?.trim() == "2").then_some(())
    })
    .await;
    ns.delete_after(kubelet).await;
}

/// Whether `pid` is a live process (a zombie counts as gone).
fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
}

/// The processes whose command line contains `text`, and everything below them.
fn family(text: &str) -> Vec<u32> {
    let pids = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    };
    let parent = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok())
    };
    let mut found: Vec<u32> = pids()
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(text)
        })
        .collect();
    let mut i = 0;
    while i < found.len() {
        let below: Vec<u32> = pids().filter(|&p| parent(p) == Some(found[i])).collect();
        found.extend(
            below
                .into_iter()
                .filter(|p| !found.contains(p))
                .collect::<Vec<_>>(),
        );
        i += 1;
    }
    found
}

#[tokio::test]
async fn a_deployments_pods_are_scheduled_and_count_as_available() {
    let Some((client, ns, _)) = setup("kl-deploy").await else {
        return;
    };
    let kubelet = Kubelet::builder(client.clone(), &ns.name).start();
    let _: Deployment = create(&client, &ns.name, json!({
        "metadata": {"name": "d"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "d"}},
            "template": {
                "metadata": {"labels": {"app": "d"}},
                "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "1000"]}]},
            },
        }
    })).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    eventually("2 available replicas", WAIT, || async {
        let status = deployments.get("d").await.ok()?.status?;
        (status.available_replicas == Some(2)).then_some(())
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let ips: std::collections::BTreeSet<String> = pods
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .collect();
    assert_eq!(ips.len(), 2, "one IP per pod: {ips:?}");
    ns.delete_after(kubelet).await;
}

#[tokio::test]
async fn what_it_cannot_run_faithfully_is_refused_with_a_reason() {
    let Some((client, ns, _)) = setup("kl-refuse").await else {
        return;
    };
    let kubelet = Kubelet::builder(client.clone(), &ns.name).start();
    let sleeper = json!({"name": "c", "image": "busybox", "command": ["sleep", "100"]});
    let mut rootless = sleeper.clone();
    rootless["securityContext"] = json!({"runAsUser": 4242});
    let refused = [
        (
            "other-user",
            json!({"containers": [rootless]}),
            "runAsUser 4242",
        ),
        (
            "init",
            json!({"initContainers": [{"name": "i", "image": "busybox", "command": ["true"]}], "containers": [sleeper.clone()]}),
            "init containers",
        ),
        (
            "host-path",
            json!({"containers": [sleeper.clone()], "volumes": [{"name": "h", "hostPath": {"path": "/etc"}}]}),
            "volume h",
        ),
        (
            "no-program",
            json!({"containers": [{"name": "c", "image": "registry.example/unknown:1"}]}),
            "no local program for registry.example/unknown",
        ),
    ];
    for (name, spec, _) in &refused {
        let _: Pod = create(
            &client,
            &ns.name,
            json!({"metadata": {"name": name}, "spec": spec}),
        )
        .await;
    }
    for (name, _, reason) in refused {
        let pod = pod_until(&client, &ns.name, name, "refused", &kubelet, |p| {
            p.status
                .as_ref()
                .is_some_and(|s| s.container_statuses.is_some())
        })
        .await;
        let waiting = container_status(&pod).state.unwrap().waiting.unwrap();
        assert_eq!(
            waiting.reason.as_deref(),
            Some("CreateContainerConfigError"),
            "{name}"
        );
        let message = waiting.message.unwrap_or_default();
        assert!(message.contains(reason), "{name}: {message}");
        assert_eq!(phase(&pod), "Pending");
    }
    ns.delete_after(kubelet).await;
}
