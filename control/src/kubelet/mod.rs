//! A process kubelet for test clusters that have none (kube-local: an API server and
//! controllers, no scheduler, no kubelet). For one namespace it plays both:
//! - **the scheduler**: binds each new pod to the node (`KUBE_LOCAL_NODE`, else
//!   `kube-local-node`), as the Endpoints controller requires of a pod it lists;
//! - **the kubelet**: runs each container as a local process ([`launch`]): its `command` and
//!   `args` (the image mapped to a local program when there is no command), its `env`, its
//!   volumes materialized on disk ([`volumes`]), mount paths and the wildcard address
//!   rewritten in one place ([`rewrite`]); gives the pod its own loopback IP ([`ips`]); runs
//!   the readiness probe ([`probe`]) and writes the pod's status from what really happened
//!   ([`status`]); restarts a crashed container or leaves it terminated as `restartPolicy`
//!   says; and on deletion sends SIGTERM, SIGKILL after the grace period, then finishes the
//!   deletion ([`pod`]).
//!
//! So the operator's real pod spec starts the real `buildkitd`:
//!
//! ```no_run
//! # async fn example(client: kube::Client, buildkit: control::testkit::BuildKit) {
//! use control::kubelet::Kubelet;
//! let kubelet = Kubelet::builder(client, "my-test-ns").buildkit(&buildkit).start();
//! // ... create a BuildKitPool, scale it up: its pods run, become Ready, serve builds ...
//! println!("{}", kubelet.logs()); // every container's output, for a failing test's message
//! kubelet.shutdown().await;        // kills what still runs, deletes its pods at once
//! # }
//! ```
//!
//! What differs from a real node: processes run as the kubelet's user on the host's
//! filesystem and network (no image, no resource limits, no `nodeSelector` or affinity), each
//! in its own process group; a container asking for another user (`runAsUser`, as a rootless
//! buildkitd does) is refused, so pools the process kubelet runs are `security: Privileged`;
//! paths a program has compiled in are not rewritten; Secret and ConfigMap files are written
//! once, at start; liveness and startup probes are not run; init containers, `hostPath` and
//! `downwardAPI` volumes are refused. A refusal shows as the container's waiting reason
//! (`CreateContainerConfigError`) with a message naming what was refused.

mod env;
mod ips;
mod launch;
mod pod;
mod probe;
mod rewrite;
mod status;
mod volumes;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::driver::spawn::Spawner;
use volumes::PrepareError;

/// A running process kubelet for one namespace. Dropping it kills its pods' processes;
/// [`Kubelet::shutdown`] also deletes their pods.
pub struct Kubelet {
    node: Arc<Node>,
    watch: tokio::task::JoinHandle<()>,
    _root: Option<tempfile::TempDir>,
}

/// How to start a [`Kubelet`].
pub struct Builder {
    client: Client,
    namespace: String,
    node: String,
    images: Vec<(String, PathBuf)>,
    programs: Vec<PathBuf>,
    backoff: Duration,
    root: Option<PathBuf>,
    readiness_passes: bool,
}

impl Kubelet {
    /// A kubelet for the pods of `namespace`.
    pub fn builder(client: Client, namespace: &str) -> Builder {
        Builder {
            client,
            namespace: namespace.into(),
            node: std::env::var("KUBE_LOCAL_NODE").unwrap_or_else(|_| "kube-local-node".into()),
            images: Vec::new(),
            programs: Vec::new(),
            backoff: Duration::from_secs(10),
            root: None,
            readiness_passes: true,
        }
    }

    /// Where pods keep their volumes and logs, and claims their data.
    pub fn root(&self) -> &Path {
        &self.node.root
    }

    /// The directory standing for PersistentVolumeClaim `claim`: it outlives the pods.
    pub fn claim_dir(&self, claim: &str) -> PathBuf {
        self.node.root.join("pvc").join(claim)
    }

    /// Every container's output so far, pod by pod, for a failing test's message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let Ok(pods) = std::fs::read_dir(self.node.root.join("p")) else {
            return out;
        };
        for dir in pods.flatten().map(|e| e.path()) {
            let name = std::fs::read_to_string(dir.join("pod")).unwrap_or_default();
            let Ok(files) = std::fs::read_dir(&dir) else {
                continue;
            };
            for log in files.flatten().map(|e| e.path()) {
                if log.extension().is_some_and(|e| e == "log") {
                    let stem = log.file_stem().unwrap_or_default().to_string_lossy();
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    out += &format!("==== pod {name} container {stem}\n{text}\n");
                }
            }
        }
        out
    }

    /// Stops: kills every process it started and deletes their pods at once (so the
    /// namespace can go), then returns.
    pub async fn shutdown(mut self) {
        self.node.stop.cancel();
        let _ = (&mut self.watch).await;
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.node.stop.cancel();
    }
}

impl Builder {
    /// The node pods are bound to.
    pub fn node(mut self, name: &str) -> Self {
        self.node = name.into();
        self
    }

    /// Containers of images from `repository` (any tag; `docker.io/` and `library/` are
    /// implied as Docker does) run `program` when they set no `command`.
    pub fn image(mut self, repository: &str, program: impl Into<PathBuf>) -> Self {
        self.images
            .push((repository_of(repository), program.into()));
        self
    }

    /// A directory searched (before `PATH`) for programs named by a `command` or an exec
    /// probe, and put first on the containers' `PATH`.
    pub fn programs(mut self, dir: impl Into<PathBuf>) -> Self {
        self.programs.push(dir.into());
        self
    }

    /// `moby/buildkit` images run the real `buildkitd`, and `buildctl` (the readiness
    /// probe's program) is found.
    pub fn buildkit(self, buildkit: &crate::testkit::BuildKit) -> Self {
        self.image("moby/buildkit", &buildkit.buildkitd)
            .programs(buildkit.bin_dir())
    }

    /// The first delay between restarts of a crashed container (then doubling): a kubelet's
    /// is 10 s.
    pub fn restart_backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// Never runs readiness probes: a container that has one stays Running and not Ready, as
    /// on a node whose probe has not passed yet (for tests of what does not wait for Ready).
    pub fn readiness_never_passes(mut self) -> Self {
        self.readiness_passes = false;
        self
    }

    /// Keep pods and claims under `dir` (default: a temporary directory, removed with the
    /// kubelet). Keep it short: Unix socket paths in volumes must fit 107 bytes.
    pub fn root(mut self, dir: impl Into<PathBuf>) -> Self {
        self.root = Some(dir.into());
        self
    }

    /// Starts watching the namespace's pods.
    ///
    /// # Panics
    /// Outside a tokio runtime, or if its root directory or the process spawner cannot be
    /// made.
    pub fn start(self) -> Kubelet {
        let (owned, root) = match self.root {
            Some(root) => (None, root),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("kl")
                    .tempdir()
                    .expect("the kubelet's root directory");
                let root = dir.path().to_path_buf();
                (Some(dir), root)
            }
        };
        let spawner = Spawner::start(tokio::runtime::Handle::current())
            .expect("the kubelet's process spawner");
        let node = Arc::new(Node {
            client: self.client,
            namespace: self.namespace,
            name: self.node,
            root,
            images: self.images,
            programs: self.programs,
            backoff: self.backoff,
            readiness_passes: self.readiness_passes,
            spawner,
            stop: CancellationToken::new(),
        });
        let watch = tokio::spawn(watch_pods(node.clone()));
        Kubelet {
            node,
            watch,
            _root: owned,
        }
    }
}

/// What every pod of the kubelet shares.
pub(crate) struct Node {
    client: Client,
    namespace: String,
    name: String,
    root: PathBuf,
    images: Vec<(String, PathBuf)>,
    programs: Vec<PathBuf>,
    backoff: Duration,
    readiness_passes: bool,
    spawner: Spawner,
    stop: CancellationToken,
}

impl Node {
    /// The containers' `PATH`: the program directories, then the kubelet's own `PATH`.
    fn search_path(&self) -> String {
        let host = std::env::var_os("PATH").unwrap_or_default();
        let dirs = self
            .programs
            .iter()
            .cloned()
            .chain(std::env::split_paths(&host));
        let joined = std::env::join_paths(dirs).unwrap_or_default();
        joined.to_string_lossy().into_owned()
    }

    /// A `command`'s program: a path as given, else found in the program directories or on
    /// `PATH`.
    fn find_program(&self, name: &str) -> Result<PathBuf, PrepareError> {
        if name.contains('/') {
            return Ok(PathBuf::from(name));
        }
        let path = self.search_path();
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
            .ok_or_else(|| PrepareError::Unsupported {
                what: format!(
                    "program {name}, found neither in the program directories nor on PATH,"
                ),
            })
    }

    /// The local program of a container `image` that sets no `command`.
    fn image_program(&self, image: &str) -> Result<PathBuf, PrepareError> {
        let repository = repository_of(image);
        let found = self.images.iter().find(|(r, _)| *r == repository);
        found
            .map(|(_, p)| p.clone())
            .ok_or_else(|| PrepareError::Unsupported {
                what: format!(
                    "image {image} without a command (no local program for {repository})"
                ),
            })
    }

    /// The pod's directory: short (Unix socket paths live in its volumes), named by its uid,
    /// with a `pod` file naming it.
    fn pod_dir(&self, pod: &Pod) -> PathBuf {
        let uid = pod.uid().unwrap_or_default();
        let dir = self.root.join("p").join(&uid[..uid.len().min(8)]);
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join("pod"), pod.name_any());
        dir
    }
}

/// The repository of an image reference: no tag or digest, Docker Hub's defaults implied.
fn repository_of(image: &str) -> String {
    let image = image.split('@').next().unwrap_or(image);
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    let name = match image[last_slash..].find(':') {
        Some(colon) => &image[..last_slash + colon],
        None => image,
    };
    let name = name.strip_prefix("docker.io/").unwrap_or(name);
    let name = name.strip_prefix("library/").unwrap_or(name);
    name.to_owned()
}

/// Follows the namespace's pods: binds new ones, hands bound ones to their workers. On stop,
/// waits for every worker to end.
async fn watch_pods(node: Arc<Node>) {
    let api: Api<Pod> = Api::namespaced(node.client.clone(), &node.namespace);
    let mut events = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut pods: HashMap<String, watch::Sender<Option<Arc<Pod>>>> = HashMap::new();
    let mut listed: Option<HashSet<String>> = None;
    let mut workers = JoinSet::new();
    loop {
        let event = tokio::select! {
            () = node.stop.cancelled() => break,
            Some(_) = workers.join_next(), if !workers.is_empty() => continue,
            event = events.next() => event,
        };
        let pod = match event {
            None => break,
            Some(Err(error)) => {
                tracing::warn!(%error, "pod watch");
                continue;
            }
            Some(Ok(watcher::Event::Init)) => {
                listed = Some(HashSet::new());
                continue;
            }
            Some(Ok(watcher::Event::InitDone)) => {
                // Pods that vanished while the watch was down.
                let seen = listed.take().unwrap_or_default();
                let vanished: Vec<String> = pods
                    .keys()
                    .filter(|uid| !seen.contains(*uid))
                    .cloned()
                    .collect();
                for uid in vanished {
                    if let Some(tx) = pods.remove(&uid) {
                        let _ = tx.send(None);
                    }
                }
                continue;
            }
            Some(Ok(watcher::Event::Delete(pod))) => {
                if let Some(tx) = pod.uid().and_then(|uid| pods.remove(&uid)) {
                    let _ = tx.send(None);
                }
                continue;
            }
            Some(Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod))) => pod,
        };
        let uid = pod.uid().unwrap_or_default();
        if let Some(seen) = &mut listed {
            seen.insert(uid.clone());
        }
        let spec = pod.spec.as_ref();
        let bound_to = spec.and_then(|s| s.node_name.clone());
        let scheduler = spec
            .and_then(|s| s.scheduler_name.as_deref())
            .unwrap_or("default-scheduler");
        match bound_to {
            None if pod.metadata.deletion_timestamp.is_none()
                && scheduler == "default-scheduler" =>
            {
                bind(&api, &pod, &node.name).await;
            }
            Some(name) if name == node.name => {
                let pod = Arc::new(pod);
                match pods.get(&uid) {
                    Some(tx) => {
                        let _ = tx.send(Some(pod));
                    }
                    None => {
                        let (tx, rx) = watch::channel(Some(pod));
                        workers.spawn(pod::run(node.clone(), rx));
                        pods.insert(uid, tx);
                    }
                }
            }
            _ => {}
        }
    }
    // Stopping: every worker sees the same cancellation and ends its pod.
    node.stop.cancel();
    while workers.join_next().await.is_some() {}
}

/// The scheduler's step: binds `pod` to `node`. A conflict means it is bound already.
async fn bind(api: &Api<Pod>, pod: &Pod, node: &str) {
    let binding = serde_json::json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": pod.name_any(), "uid": pod.uid()},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    let bound: Result<serde_json::Value, _> = api
        .create_subresource("binding", &pod.name_any(), &PostParams::default(), &binding)
        .await;
    match bound {
        Ok(_) => tracing::info!(pod = %pod.name_any(), node, "pod bound"),
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(error) => tracing::warn!(pod = %pod.name_any(), %error, "binding"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_reduce_to_their_repository() {
        for (image, repository) in [
            ("moby/buildkit:v0.17.3-rootless", "moby/buildkit"),
            ("docker.io/moby/buildkit@sha256:abc", "moby/buildkit"),
            ("docker.io/library/busybox", "busybox"),
            (
                "registry.local:5000/team/bkpool:1.0",
                "registry.local:5000/team/bkpool",
            ),
        ] {
            assert_eq!(repository_of(image), repository, "{image}");
        }
    }
}
