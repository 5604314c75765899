//! Pods the gateway probes itself while their pool wakes. Kubernetes marks a pod Ready only
//! once its readiness probe passed: the operator's exec of `buildctl debug workers` starts 2 s
//! after the container and repeats every 5 s, and no probe can repeat faster than once a
//! second, while buildkitd answers about 0.2 s after it starts. Waiting for Ready would hold
//! every waking client for seconds. So while a pool has no Ready pod, each of its pods that is
//! Running with an IP is probed here as local mode probes its replicas: a gRPC health check
//! over the gateway's mTLS leg to buildkitd, every [`INTERVAL`] until it answers SERVING. From
//! then on the pod serves (before Kubernetes' own probe catches up), until it is Ready, is
//! terminating or gone, or another pod of the pool is Ready.
//!
//! Kubernetes' readiness probe stays in the pod spec for what reads Ready (Endpoints, the
//! pool's status, a rollout); the gateway asks the same question sooner.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use proxy::route::BackendTlsClient;
use rustls::pki_types::ServerName;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::health;

/// The pause between probes of a starting pod: a wake waits for this much at most after
/// buildkitd can answer.
pub const INTERVAL: Duration = Duration::from_millis(20);
/// How long one probe may take.
const TIMEOUT: Duration = Duration::from_secs(2);
/// After this long without an answer, a pod is probed only every [`SLOW_INTERVAL`]: one that
/// never answers costs little.
const FAST_FOR: Duration = Duration::from_secs(60);
const SLOW_INTERVAL: Duration = Duration::from_secs(1);

/// A pod to probe: its UID (an IP may be reused by the next pod) and buildkitd's address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pod {
    pub uid: String,
    pub addr: SocketAddr,
}

/// The probes in flight and their outcomes, by pod.
pub struct Starting {
    probes: HashMap<Pod, Probe>,
    /// Woken when a probe first succeeds, so the feed recomputes backends.
    answered: Arc<Notify>,
}

struct Probe {
    serving: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Starting {
    pub fn new(answered: Arc<Notify>) -> Self {
        Self {
            probes: HashMap::new(),
            answered,
        }
    }

    /// Keeps probing exactly the pods in `starting` (each with its pool's backend TLS), starts
    /// probes for new ones, and returns those that answered, by pool.
    pub fn update(
        &mut self,
        starting: HashMap<String, Vec<(Pod, BackendTlsClient)>>,
    ) -> HashMap<String, Vec<SocketAddr>> {
        let mut keep = HashMap::with_capacity(self.probes.len());
        let mut serving: HashMap<String, Vec<SocketAddr>> = HashMap::new();
        for (pool, pods) in starting {
            for (pod, tls) in pods {
                let probe = match self.probes.remove(&pod) {
                    Some(probe) => probe,
                    None => {
                        tracing::debug!(%pool, addr = %pod.addr, "probing a starting pod");
                        self.spawn(&pod, tls)
                    }
                };
                if probe.serving.load(Relaxed) {
                    serving.entry(pool.clone()).or_default().push(pod.addr);
                }
                keep.insert(pod, probe);
            }
        }
        // Dropping the rest aborts their probes.
        self.probes = keep;
        serving
    }

    fn spawn(&self, pod: &Pod, tls: BackendTlsClient) -> Probe {
        let serving = Arc::new(AtomicBool::new(false));
        let (addr, flag, answered) = (pod.addr, serving.clone(), self.answered.clone());
        let name = tls
            .server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        let task = tokio::spawn(async move {
            let started = Instant::now();
            loop {
                match health::probe_tls(addr, name.clone(), tls.config.clone(), TIMEOUT).await {
                    Ok(h) if h.is_ready() => {
                        tracing::info!(%addr, after = ?started.elapsed(), "starting pod answered the gateway's probe");
                        flag.store(true, Relaxed);
                        answered.notify_one();
                        return;
                    }
                    Ok(_) | Err(_) => {}
                }
                let pause = if started.elapsed() < FAST_FOR {
                    INTERVAL
                } else {
                    SLOW_INTERVAL
                };
                tokio::time::sleep(pause).await;
            }
        });
        Probe { serving, task }
    }
}
