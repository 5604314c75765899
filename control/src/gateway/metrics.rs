//! Metrics of the Kubernetes gateway's control side, `bkpool_gateway_*`: wakes it asked for,
//! how long a held connection waited, the pools it routes, and the Secrets it could not use.
//! The data plane's own metrics (connections, bytes, rejections) are registered next to these.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use proxy::names::PoolId;

use super::upstream::Woke;

/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    wakes: Family<ResultLabels, Counter>,
    wake_seconds: Family<PoolLabels, Histogram, fn() -> Histogram>,
    held_seconds: Family<PoolLabels, Histogram, fn() -> Histogram>,
    pools: Family<StateLabels, Gauge>,
    ready_backends: Family<PoolLabels, Gauge>,
    bad_secrets: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    pool: String,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// 1 ms to about 65 s: BuildKit clients give up after about 20 s.
fn wait_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn pool(id: &PoolId) -> PoolLabels {
    PoolLabels {
        pool: id.to_string(),
    }
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            wakes: Family::default(),
            wake_seconds: Family::new_with_constructor(wait_histogram),
            held_seconds: Family::new_with_constructor(wait_histogram),
            pools: Family::default(),
            ready_backends: Family::default(),
            bad_secrets: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("bkpool_gateway");
        r.register(
            "wake_requests",
            "Wakes this gateway asked the API server for, by result",
            m.wakes.clone(),
        );
        r.register_with_unit(
            "wake_duration",
            "From the first held connection to a ready backend, per wake",
            Unit::Seconds,
            m.wake_seconds.clone(),
        );
        r.register_with_unit(
            "held_duration",
            "How long a connection was held before it got a backend",
            Unit::Seconds,
            m.held_seconds.clone(),
        );
        r.register(
            "kubernetes_pools",
            "Pools seen in the cluster: routed, or not routable (invalid spec, missing certificates)",
            m.pools.clone(),
        );
        r.register(
            "ready_backends",
            "Ready buildkitd pods per pool",
            m.ready_backends.clone(),
        );
        r.register(
            "secret_errors",
            "Certificate Secrets that could not be used (the last good material is kept)",
            m.bad_secrets.clone(),
        );
        m
    }

    pub fn wake_requested(&self, id: &PoolId, woke: Woke) {
        let result = match woke {
            Woke::AlreadyWanted => "already_wanted",
            Woke::ScaledUp => "scaled_up",
            Woke::JobStarted => "job_started",
        };
        self.wake(id, result);
    }

    pub fn wake_failed(&self, id: &PoolId) {
        self.wake(id, "failed");
    }

    pub fn wake_timed_out(&self, id: &PoolId) {
        self.wake(id, "timeout");
    }

    fn wake(&self, id: &PoolId, result: &'static str) {
        self.wakes
            .get_or_create(&ResultLabels {
                pool: id.to_string(),
                result,
            })
            .inc();
    }

    pub fn woke(&self, id: &PoolId, took: Duration) {
        self.wake_seconds
            .get_or_create(&pool(id))
            .observe(took.as_secs_f64());
    }

    pub fn held_for(&self, id: &PoolId, took: Duration) {
        self.held_seconds
            .get_or_create(&pool(id))
            .observe(took.as_secs_f64());
    }

    pub fn pools(&self, routed: usize, unroutable: usize) {
        for (state, n) in [("routed", routed), ("unroutable", unroutable)] {
            self.pools
                .get_or_create(&StateLabels { state })
                .set(n as i64);
        }
    }

    pub fn ready_backends(&self, id: &PoolId, n: usize) {
        self.ready_backends.get_or_create(&pool(id)).set(n as i64);
    }

    pub fn forget(&self, id: &PoolId) {
        self.ready_backends.remove(&pool(id));
        self.wake_seconds.remove(&pool(id));
        self.held_seconds.remove(&pool(id));
    }

    pub fn bad_secret(&self) {
        self.bad_secrets.inc();
    }
}
