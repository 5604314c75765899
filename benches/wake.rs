//! What a wake costs a client, and how much of it is bkpool's. A client of a sleeping pool is
//! held from its connection until buildkitd answers through the gateway; buildkitd itself
//! needs some time from its start to its first answer, which no gateway can save. The wake
//! overhead is the difference: the gateway noticing, starting the replica (or scaling the
//! workload, the cluster's controllers making the pod, the kubelet starting it), seeing it
//! up, probing it, and relaying. Target: 100 ms or less.
//!
//! `cargo bench --bench wake` as root, with the real BuildKit on PATH and, for the Kubernetes
//! rows, `BKPOOL_TEST_KUBECONFIG` (kube-local: its process kubelet runs the pods). Rounds of
//! every scenario are interleaved; `BKPOOL_BENCH_ROUNDS` sets how many (default 7). It prints
//! one line per scenario (median, min, max in ms) and the overheads.
//!
//! Scenarios:
//! - `process-plain`: buildkitd (plaintext, its own state directory) from spawn to its first
//!   gRPC health answer, probed every 2 ms: the process's own start-to-ready, as the process
//!   kubelet starts it (a plain child process).
//! - `process-namespace`: the same through bkpool's local process driver: the replica in its
//!   own PID and mount namespace under bkpool's tiny init, as `bkpool local` starts it.
//! - `local-mtls`, `local-plaintext`: `bkpool local`, a pool asleep; the time a gRPC health
//!   check through the gateway (mTLS client) is held until it is answered, with the gateway's
//!   leg to buildkitd over mTLS (the default) or plaintext loopback TCP.
//! - `kubernetes`: `bkpool gateway --kubernetes` and `bkpool controller`, a Deployment pool at
//!   zero; the time a client that starts HTTP/2 is held until buildkitd's SETTINGS frame
//!   comes back through the gateway.
//!
//! Overheads: `local-*` minus `process-namespace`, `kubernetes` minus `process-plain`.

#[path = "../control/tests/support/mod.rs"]
mod cluster;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use control::crd::{BuildKitPool, Phase};
use control::driver::local::{LocalDriver, ProcessSpec};
use control::health;
use control::kubelet::Kubelet;
use control::testkit::BuildKit;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Client;
use kube::api::{Api, ListParams};
use proxy::names::PoolId;
use serde_json::json;

const POOL: &str = "wake";

type Samples = BTreeMap<&'static str, Vec<Duration>>;

fn main() {
    let rounds: usize = std::env::var("BKPOOL_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let Some(buildkit) = control::testkit::on_path("buildkitd")
        .zip(control::testkit::on_path("buildctl"))
        .map(|(buildkitd, buildctl)| BuildKit {
            buildctl,
            buildkitd,
        })
    else {
        eprintln!(
            "wake: buildkitd and buildctl must be on PATH (../shared/tools/buildkit/build.sh)"
        );
        std::process::exit(2);
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(buildkit, rounds));
}

async fn run(buildkit: BuildKit, rounds: usize) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut samples = Samples::new();
    let local_mtls = LocalPool::start(&buildkit, false, "31900-31904");
    let local_plain = LocalPool::start(&buildkit, true, "31905-31909");
    let kube = match std::env::var_os("BKPOOL_TEST_KUBECONFIG") {
        Some(_) => Some(KubePool::start(&buildkit).await),
        None => {
            eprintln!("wake: BKPOOL_TEST_KUBECONFIG is not set: no Kubernetes rows");
            None
        }
    };
    for round in 1..=rounds {
        let mut record = |name, d: Duration| samples.entry(name).or_default().push(d);
        record("process-plain", process_plain(&buildkit).await);
        record("process-namespace", process_namespace(&buildkit).await);
        record("local-mtls", local_mtls.cold().await);
        record("local-plaintext", local_plain.cold().await);
        if let Some(kube) = &kube {
            let (held, created, running) = kube.cold().await;
            record("kubernetes", held);
            // Where the time went: until the pod object exists (the gateway's /scale call and
            // the cluster's Deployment and ReplicaSet controllers), until it runs with an IP
            // (the kubelet), until the client is served (the gateway seeing and probing it).
            if let (Some(c), Some(r)) = (created, running) {
                record("k8s-to-pod-created", c);
                record("k8s-pod-to-running", r.saturating_sub(c));
                record("k8s-running-to-served", held.saturating_sub(r));
            }
        }
        eprintln!("wake: round {round}/{rounds} done");
    }
    if let Some(kube) = kube {
        kube.stop().await;
    }

    let median = |name: &str| samples.get(name).map(|s| ms(percentile(s, 50)));
    println!("scenario            median      min      max   (ms, {rounds} rounds)");
    for (name, s) in &samples {
        println!(
            "{name:<18} {:>8.1} {:>8.1} {:>8.1}",
            ms(percentile(s, 50)),
            ms(percentile(s, 0)),
            ms(percentile(s, 100))
        );
    }
    let overhead = |held: &str, own: &str| {
        if let (Some(h), Some(o)) = (median(held), median(own)) {
            println!(
                "overhead {held:<18} {:>8.1} ms (median {held} - median {own})",
                h - o
            );
        }
    };
    overhead("local-mtls", "process-namespace");
    overhead("local-plaintext", "process-namespace");
    overhead("kubernetes", "process-plain");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(samples: &[Duration], p: usize) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[(sorted.len() - 1) * p / 100]
}

/// Probes plaintext `addr` every 2 ms until buildkitd answers; the time since `began`.
async fn until_serving(addr: SocketAddr, began: Instant) -> Duration {
    loop {
        if let Ok(h) = health::probe(addr, Duration::from_secs(2)).await
            && h.is_ready()
        {
            return began.elapsed();
        }
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "buildkitd never answered"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().port()
}

async fn process_plain(buildkit: &BuildKit) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let began = Instant::now();
    let mut child = tokio::process::Command::new(&buildkit.buildkitd)
        .arg("--addr")
        .arg(format!("tcp://{addr}"))
        .arg("--root")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let took = until_serving(addr, began).await;
    let _ = child.kill().await;
    took
}

async fn process_namespace(buildkit: &BuildKit) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let driver = LocalDriver::new(dir.path().to_path_buf(), port..=port);
    let spec = ProcessSpec {
        program: buildkit.buildkitd.clone(),
        args: ["--addr", "tcp://{addr}", "--root", "{root}"]
            .map(String::from)
            .into(),
        env: Vec::new(),
        grace: Duration::from_secs(5),
    };
    let pool = PoolId::new("bench", "wake").unwrap();
    let began = Instant::now();
    let replica = driver.start(&pool, &spec).await.unwrap();
    let took = until_serving(replica.addr, began).await;
    driver.stop(&replica).await.unwrap();
    took
}

/// A `bkpool local` with one pool that sleeps a second after its last connection.
struct LocalPool {
    local: support::local::Local,
    tls: std::path::PathBuf,
}

impl LocalPool {
    fn start(buildkit: &BuildKit, plaintext: bool, ports: &str) -> Self {
        let buildkitd = format!("{:?}", buildkit.buildkitd.display().to_string());
        let (command, extra) = if plaintext {
            (
                format!("[{buildkitd}, \"--addr\", \"tcp://{{addr}}\", \"--root\", \"{{root}}\"]"),
                "plaintext = true\n",
            )
        } else {
            let mut words = control::local_config::DEFAULT_COMMAND.map(|a| format!("{a:?}"));
            words[0] = buildkitd;
            (format!("[{}]", words.join(", ")), "")
        };
        let body = format!(
            "[[pool]]\nname = \"{POOL}\"\n[pool.scaling]\nidle_after = \"1s\"\n\
             min_up_after_wake = \"0s\"\n[pool.replica]\ncommand = {command}\n{extra}"
        );
        let local = support::local::local(ports, &body);
        let tls = local.issue(POOL);
        LocalPool { local, tls }
    }

    /// Waits for the pool to sleep, then times a health check through the gateway.
    async fn cold(&self) -> Duration {
        use control::scale::Phase;
        self.local
            .wait_phase(POOL, Phase::Sleeping, Duration::from_secs(60))
            .await;
        let began = Instant::now();
        let health = self.local.health(&self.tls).await;
        let took = began.elapsed();
        assert!(
            health.is_ok_and(|h| h.is_ready()),
            "{}",
            self.local.log_text()
        );
        took
    }
}

/// A Deployment pool on the test cluster behind `bkpool gateway --kubernetes`.
struct KubePool {
    client: Client,
    ns: cluster::TestNamespace,
    kubelet: Kubelet,
    gateway: support::k8s::KillOnDrop,
    _controller: support::k8s::Controller,
    config: std::sync::Arc<rustls::ClientConfig>,
    /// When this bench's watch first saw a pod, and first saw it Running with an IP.
    seen: std::sync::Arc<std::sync::Mutex<Seen>>,
    watch: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

#[derive(Default)]
struct Seen {
    created: Option<Instant>,
    running: Option<Instant>,
}

/// Records when pods of `ns` appear and when they first run with an IP.
fn watch_pods(
    client: Client,
    ns: &str,
    seen: std::sync::Arc<std::sync::Mutex<Seen>>,
) -> tokio::task::JoinHandle<()> {
    use futures_util::StreamExt;
    use kube::runtime::watcher;
    let pods: Api<Pod> = Api::namespaced(client, ns);
    tokio::spawn(async move {
        let mut events = std::pin::pin!(watcher::watcher(pods, watcher::Config::default()));
        while let Some(event) = events.next().await {
            let (Ok(watcher::Event::Apply(pod)) | Ok(watcher::Event::InitApply(pod))) = event
            else {
                continue;
            };
            let now = Instant::now();
            let mut seen = seen.lock().unwrap();
            seen.created.get_or_insert(now);
            let status = pod.status.as_ref();
            let running =
                status.is_some_and(|s| s.phase.as_deref() == Some("Running") && s.pod_ip.is_some());
            if running {
                seen.running.get_or_insert(now);
            }
        }
    })
}

impl KubePool {
    async fn start(buildkit: &BuildKit) -> Self {
        use support::k8s::*;
        let client = cluster::test_client()
            .await
            .expect("BKPOOL_TEST_KUBECONFIG");
        cluster::install_crd(&client).await;
        let ns = cluster::TestNamespace::create(&client, "bkp-bench").await;
        let dir = tempfile::tempdir().unwrap();
        // The gateway's Secret copies go to the pool's namespace: the admin reads them there.
        let controller = Controller::start(
            &ns.name,
            &ns.name,
            &admin_kubeconfig(),
            &dir.path().join("controller.log"),
        );
        let spec = json!({"scaling": {"idleAfter": "1s", "minUpAfterWake": "0s", "wakeTimeout": "60s"},
                          "workload": {"security": "Privileged"}});
        create_sleeping_pool(&client, &ns.name, POOL, spec).await;
        let kubelet = Kubelet::builder(client.clone(), &ns.name)
            .buildkit(buildkit)
            .start();
        let gateway =
            published_gateway(&client, &ns.name, 20, &admin_kubeconfig(), dir.path()).await;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
        let client_ca = secrets.get(&format!("{POOL}-client-ca")).await.unwrap();
        let tlsdir = client_tlsdir(&client_ca, &ns.name, POOL, dir.path());
        let seen = std::sync::Arc::default();
        let watch = watch_pods(client.clone(), &ns.name, std::sync::Arc::clone(&seen));
        KubePool {
            seen,
            watch,
            client,
            ns,
            kubelet,
            gateway,
            _controller: controller,
            config: support::local::client_config(&tlsdir),
            _dir: dir,
        }
    }

    /// Waits for the pool to sleep with no pod left, then times a held HTTP/2 start. Also
    /// returns when the pod was first seen, and first seen Running, from the start.
    async fn cold(&self) -> (Duration, Option<Duration>, Option<Duration>) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns.name);
        let pools: Api<BuildKitPool> = Api::namespaced(self.client.clone(), &self.ns.name);
        cluster::eventually("the pool asleep, no pod left", WAIT, || async {
            let status = pools.get(POOL).await.ok()?.status?;
            (status.phase == Some(Phase::Sleeping)).then_some(())?;
            let left = pods.list(&ListParams::default()).await.ok()?.items;
            left.is_empty().then_some(())
        })
        .await;
        let name = format!("{POOL}.{}.svc", self.ns.name);
        *self.seen.lock().unwrap() = Seen::default();
        let began = Instant::now();
        let stream = tokio::time::timeout(
            WAIT,
            support::k8s::h2_hello(self.gateway.listen, &self.config, &name),
        )
        .await
        .expect("served within the wake timeout");
        let took = began.elapsed();
        drop(stream);
        let seen = self.seen.lock().unwrap();
        let since = |t: Option<Instant>| t.map(|t| t.saturating_duration_since(began));
        (took, since(seen.created), since(seen.running))
    }

    async fn stop(self) {
        self.watch.abort();
        // The gateway's own account: how long each starting pod took to answer its probe.
        for line in self.gateway.log.lock().unwrap().iter() {
            if line.contains("answered the gateway's probe") {
                eprintln!("wake: gateway: {line}");
            }
        }
        drop(self.gateway);
        self.ns.delete_after(self.kubelet).await;
    }
}

const WAIT: Duration = Duration::from_secs(90);
