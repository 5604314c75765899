//! One pod's life on the process kubelet: prepare (volumes, environment; retried while a
//! Secret or claim is missing, as ContainerCreating), start each container's process, follow
//! exits (restarted with back-off, or left terminated, as the restart policy says) and
//! readiness, write the status whenever it changes, and on deletion SIGTERM every process,
//! SIGKILL what outlives the grace period, and finish the deletion.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use rustix::process::{Pid, Signal};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::Node;
use super::ips::PodIp;
use super::launch::Launch;
use super::status::{ContainerView, Ended, PodView, State};
use super::volumes::Volumes;

/// The longest back-off between restarts, as a kubelet's.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long to wait for processes to be reaped after SIGKILL.
const REAP: Duration = Duration::from_secs(10);

/// Runs the pod `updates` follows until it is deleted (or the kubelet stops). `None` on the
/// channel means the object is gone from the API server.
pub async fn run(node: Arc<Node>, mut updates: watch::Receiver<Option<Arc<Pod>>>) {
    let Some(pod) = updates.borrow_and_update().clone() else {
        return;
    };
    let ip = match super::ips::reserve() {
        Ok(ip) => ip,
        Err(error) => {
            tracing::error!(pod = %pod.name_any(), %error, "no pod IP");
            return;
        }
    };
    let dir = node.pod_dir(&pod);
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default();
    let views = containers
        .iter()
        .map(|c| ContainerView {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            state: waiting("ContainerCreating", None),
            last: None,
            restarts: 0,
            ready: false,
        })
        .collect();
    let policy = pod.spec.as_ref().and_then(|s| s.restart_policy.clone());
    let (tx, rx) = mpsc::unbounded_channel();
    let mut worker = Worker {
        view: PodView::new(ip.ip, policy.as_deref(), views),
        slots: containers.iter().map(|_| Slot::default()).collect(),
        node,
        pod,
        ip,
        dir,
        tx,
        rx,
        written: None,
    };
    let end = worker.live(&mut updates).await;
    worker.end(end).await;
}

/// Why a pod's life ends.
enum End {
    /// Deleted with a grace period: stop gracefully, then finish the deletion.
    Deleted(Duration),
    /// The object is gone already.
    Gone,
    /// The kubelet stops: kill everything and delete the pod at once.
    Shutdown,
}

enum Event {
    Exited {
        index: usize,
        generation: u64,
        status: Option<ExitStatus>,
    },
    Ready {
        index: usize,
        generation: u64,
        ready: bool,
    },
}

#[derive(Default)]
struct Slot {
    launch: Option<Launch>,
    /// The running process, if any.
    pid: Option<u32>,
    probe: Option<AbortHandle>,
    /// Counts starts, so that events of an earlier process are told apart.
    generation: u64,
    started: Option<Timestamp>,
    restart_at: Option<Instant>,
}

struct Worker {
    node: Arc<Node>,
    pod: Arc<Pod>,
    ip: PodIp,
    dir: PathBuf,
    view: PodView,
    slots: Vec<Slot>,
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
    written: Option<PodStatus>,
}

impl Worker {
    /// Prepares and runs the pod until it must end.
    async fn live(&mut self, updates: &mut watch::Receiver<Option<Arc<Pod>>>) -> End {
        if let Some(end) = self.deleted() {
            return end;
        }
        loop {
            match self.prepare().await {
                Ok(()) => break,
                Err((reason, message)) => {
                    for c in &mut self.view.containers {
                        c.state = waiting(reason, Some(message.clone()));
                    }
                    self.write_status().await;
                    let pause = tokio::time::sleep(Duration::from_secs(1));
                    if let Some(end) = self.wait(updates, pause).await {
                        return end;
                    }
                    if reason != "ContainerCreating" {
                        // Not retryable: wait for the pod to be deleted.
                        loop {
                            if let Some(end) = self.wait(updates, std::future::pending()).await {
                                return end;
                            }
                        }
                    }
                }
            }
        }
        for index in 0..self.slots.len() {
            self.start(index).await;
        }
        loop {
            self.write_status().await;
            let next = self.slots.iter().filter_map(|s| s.restart_at).min();
            let restart = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            if let Some(end) = self.wait(updates, restart).await {
                return end;
            }
            let now = Instant::now();
            for index in 0..self.slots.len() {
                if self.slots[index].restart_at.is_some_and(|at| at <= now) {
                    self.slots[index].restart_at = None;
                    self.view.containers[index].restarts += 1;
                    self.start(index).await;
                }
            }
        }
    }

    /// Waits for `timer`, a pod update or a process event (handled here). `Some` when the
    /// pod must end.
    async fn wait(
        &mut self,
        updates: &mut watch::Receiver<Option<Arc<Pod>>>,
        timer: impl Future<Output = ()>,
    ) -> Option<End> {
        enum Woke {
            Stop,
            Update(Option<Arc<Pod>>),
            Event(Event),
            Timer,
        }
        let stop = self.node.stop.clone();
        let woke = tokio::select! {
            () = stop.cancelled() => Woke::Stop,
            changed = updates.changed() => {
                Woke::Update(changed.ok().and_then(|()| updates.borrow_and_update().clone()))
            }
            Some(event) = self.rx.recv() => Woke::Event(event),
            () = timer => Woke::Timer,
        };
        match woke {
            Woke::Stop => Some(End::Shutdown),
            Woke::Update(None) => Some(End::Gone),
            Woke::Update(Some(pod)) => {
                self.pod = pod;
                self.deleted()
            }
            Woke::Event(event) => {
                self.handle(event);
                None
            }
            Woke::Timer => None,
        }
    }

    /// `Some` once the pod has a deletion timestamp, with its grace period.
    fn deleted(&self) -> Option<End> {
        self.pod.metadata.deletion_timestamp.as_ref()?;
        let spec_grace = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds);
        let grace = (self.pod.metadata.deletion_grace_period_seconds)
            .or(spec_grace)
            .unwrap_or(30);
        Some(End::Deleted(Duration::from_secs(
            u64::try_from(grace).unwrap_or(0),
        )))
    }

    /// Volumes, then each container's launch. On failure, the waiting reason and message.
    async fn prepare(&mut self) -> Result<(), (&'static str, String)> {
        let claims = self.node.root.join("pvc");
        let failed = |e: super::volumes::PrepareError| {
            let reason = if e.retryable() {
                "ContainerCreating"
            } else {
                "CreateContainerConfigError"
            };
            (reason, e.to_string())
        };
        let spec = self.pod.spec.as_ref();
        if spec
            .and_then(|s| s.init_containers.as_ref())
            .is_some_and(|c| !c.is_empty())
        {
            let what = "init containers".to_owned();
            return Err(failed(super::volumes::PrepareError::Unsupported { what }));
        }
        let volumes = Volumes::materialize(&self.node.client, &self.pod, &self.dir, &claims)
            .await
            .map_err(failed)?;
        let containers = self
            .pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default();
        for (slot, container) in self.slots.iter_mut().zip(&containers) {
            let launch = Launch::prepare(
                &self.node, &self.pod, container, &volumes, self.ip.ip, &self.dir,
            );
            slot.launch = Some(launch.await.map_err(failed)?);
        }
        Ok(())
    }

    /// Starts container `index`'s process, its exit watcher and its readiness probe.
    async fn start(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        let launch = slot.launch.clone().expect("prepared before started");
        slot.generation += 1;
        let generation = slot.generation;
        let spawned = match launch.command() {
            Ok(command) => self.node.spawner.spawn(command).await,
            Err(error) => Err(error),
        };
        let view = &mut self.view.containers[index];
        let mut child = match spawned {
            Ok(child) => child,
            Err(error) => {
                let message = format!("starting {}: {error}", launch.program.display());
                tracing::warn!(pod = %self.pod.name_any(), container = %view.name, %message);
                view.state = waiting("RunContainerError", Some(message));
                let tx = self.tx.clone();
                let _ = tx.send(Event::Exited {
                    index,
                    generation,
                    status: None,
                });
                return;
            }
        };
        let now = Timestamp::now();
        slot.pid = child.id();
        slot.started = Some(now);
        view.state = State::Running { since: now };
        view.ready = launch.readiness.is_none();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            let _ = tx.send(Event::Exited {
                index,
                generation,
                status,
            });
        });
        if let Some(readiness) = launch.readiness.filter(|_| self.node.readiness_passes) {
            let tx = self.tx.clone();
            let probe = tokio::spawn(readiness.run(move |ready| {
                let _ = tx.send(Event::Ready {
                    index,
                    generation,
                    ready,
                });
            }));
            slot.probe = Some(probe.abort_handle());
        }
        tracing::info!(pod = %self.pod.name_any(), container = %view.name, pid = ?slot.pid, "container started");
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Ready {
                index,
                generation,
                ready,
            } => {
                if self.slots[index].generation == generation && self.slots[index].pid.is_some() {
                    self.view.containers[index].ready = ready;
                }
            }
            Event::Exited {
                index,
                generation,
                status,
            } => {
                let slot = &mut self.slots[index];
                if slot.generation != generation {
                    return;
                }
                slot.pid = None;
                if let Some(probe) = slot.probe.take() {
                    probe.abort();
                }
                let started = slot.started.unwrap_or_else(Timestamp::now);
                let ended = Ended::new(status, started);
                let restart = match self.view.restart_policy.as_str() {
                    "Never" => false,
                    "OnFailure" => !ended.succeeded(),
                    _ => true,
                };
                let view = &mut self.view.containers[index];
                view.ready = false;
                tracing::info!(pod = %self.pod.name_any(), container = %view.name, code = ended.exit_code, restart, "container exited");
                if !restart {
                    view.state = State::Terminated(ended);
                    return;
                }
                let delay = backoff(self.node.backoff, view.restarts);
                view.last = Some(ended);
                view.state = waiting(
                    "CrashLoopBackOff",
                    Some(format!("back-off {delay:?} restarting failed container")),
                );
                slot.restart_at = Some(Instant::now() + delay);
            }
        }
    }

    /// Ends the pod as `end` says, then cleans up its volumes (its logs stay).
    async fn end(mut self, end: End) {
        match end {
            End::Deleted(grace) => {
                self.signal_all(Signal::TERM);
                let deadline = Instant::now() + grace;
                self.reap_until(deadline).await;
                self.kill_all();
                self.reap_until(Instant::now() + REAP).await;
                self.write_status().await;
                self.delete().await;
            }
            End::Gone => {
                self.kill_all();
                self.reap_until(Instant::now() + REAP).await;
            }
            End::Shutdown => {
                self.kill_all();
                self.reap_until(Instant::now() + REAP).await;
                self.delete().await;
            }
        }
        let _ = std::fs::remove_dir_all(self.dir.join("v"));
        tracing::info!(pod = %self.pod.name_any(), ip = %self.ip.ip, "pod ended");
    }

    /// Handles events until no process runs or `deadline` passes; pending restarts are off.
    async fn reap_until(&mut self, deadline: Instant) {
        for slot in &mut self.slots {
            slot.restart_at = None;
        }
        while self.slots.iter().any(|s| s.pid.is_some()) {
            let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.rx.recv()).await else {
                return;
            };
            self.handle(event);
            for slot in &mut self.slots {
                slot.restart_at = None;
            }
        }
    }

    /// Sends `signal` to every container's process group (its shim, when it has its own
    /// namespaces, which passes it on).
    fn signal_all(&self, signal: Signal) {
        for pid in self.slots.iter().filter_map(|s| s.pid) {
            if let Some(pgid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
                let _ = rustix::process::kill_process_group(pgid, signal);
            }
        }
    }

    /// Kills every container with everything it started.
    fn kill_all(&self) {
        for pid in self.slots.iter().filter_map(|s| s.pid) {
            let _ = self.node.spawner.kill(pid);
        }
    }

    /// Writes the status if it changed since the last write.
    async fn write_status(&mut self) {
        let status = self.view.render();
        if self.written.as_ref() == Some(&status) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.node.client.clone(), &self.node.namespace);
        let patch = serde_json::json!({ "status": status });
        match api
            .patch_status(
                &self.pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => self.written = Some(status),
            Err(error) => tracing::debug!(pod = %self.pod.name_any(), %error, "status not written"),
        }
    }

    /// The kubelet's final delete: at once, and only this pod (not a successor of its name).
    async fn delete(&self) {
        let api: Api<Pod> = Api::namespaced(self.node.client.clone(), &self.node.namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: self.pod.uid(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        if let Err(error) = api.delete(&self.pod.name_any(), &params).await {
            tracing::debug!(pod = %self.pod.name_any(), %error, "final delete");
        }
    }
}

fn waiting(reason: &str, message: Option<String>) -> State {
    State::Waiting {
        reason: reason.into(),
        message,
    }
}

/// A kubelet's restart back-off: the first restart at once, then `base`, doubling, at most
/// five minutes.
fn backoff(base: Duration, restarts: i32) -> Duration {
    match u32::try_from(restarts) {
        Ok(0) | Err(_) => Duration::ZERO,
        Ok(n) => base.saturating_mul(1 << (n - 1).min(16)).min(MAX_BACKOFF),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_like_a_kubelet() {
        let base = Duration::from_secs(10);
        let delays: Vec<_> = [0, 1, 2, 3, 6, 40]
            .map(|n| backoff(base, n).as_secs())
            .into();
        assert_eq!(delays, [0, 10, 20, 40, 300, 300]);
    }
}
