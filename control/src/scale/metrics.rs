//! Control loop metrics, `bkpool_controller_*`: wakes by result, wake duration by phase,
//! holds, pool state and replicas, scale events. Labels are fixed sets; `pool` is
//! `namespace/name`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use proxy::names::PoolId;

use super::pool::Phase;

/// The scaler's metrics. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    wakes: Family<ResultLabels, Counter>,
    wake_seconds: Family<PhaseLabels, Histogram, fn() -> Histogram>,
    hold_seconds: Family<PoolLabels, Histogram, fn() -> Histogram>,
    held: Family<PoolLabels, Gauge>,
    state: Family<StateLabels, Gauge>,
    replicas: Family<PoolLabels, Gauge>,
    scale_events: Family<ScaleLabels, Counter>,
    drains_cancelled: Family<PoolLabels, Counter>,
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
struct PhaseLabels {
    pool: String,
    phase: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    pool: String,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScaleLabels {
    pool: String,
    direction: &'static str,
    reason: &'static str,
}

/// Wake latencies: 1 ms (a stand-in wakes in a few) to about 65 s.
fn wake_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn pool(id: &PoolId) -> PoolLabels {
    PoolLabels {
        pool: id.to_string(),
    }
}

impl Metrics {
    /// Registers everything under the `bkpool_controller` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            wakes: Family::default(),
            wake_seconds: Family::new_with_constructor(wake_histogram),
            hold_seconds: Family::new_with_constructor(wake_histogram),
            held: Family::default(),
            state: Family::default(),
            replicas: Family::default(),
            scale_events: Family::default(),
            drains_cancelled: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("bkpool_controller");
        r.register(
            "wakes",
            "Wakes of sleeping pools, by result (ok, timeout, failed)",
            m.wakes.clone(),
        );
        r.register_with_unit(
            "wake_duration",
            "Time from the start of a wake to each phase: spawned, listening, healthy",
            Unit::Seconds,
            m.wake_seconds.clone(),
        );
        r.register_with_unit(
            "hold_duration",
            "Time connections were held while their pool woke",
            Unit::Seconds,
            m.hold_seconds.clone(),
        );
        r.register(
            "held_connections",
            "Connections held right now, waiting for their pool to wake",
            m.held.clone(),
        );
        r.register(
            "pool_state",
            "1 for the state each pool is in (sleeping, waking, ready, draining), else 0",
            m.state.clone(),
        );
        r.register(
            "replicas",
            "Healthy replicas serving each pool",
            m.replicas.clone(),
        );
        r.register(
            "scale_events",
            "Replicas started (up) and stopped (down), by reason",
            m.scale_events.clone(),
        );
        r.register(
            "drains_cancelled",
            "Drains cancelled because a connection arrived",
            m.drains_cancelled.clone(),
        );
        m
    }

    /// Starts a pool's series at zero, in the given state.
    pub(crate) fn init_pool(&self, id: &PoolId, phase: Phase) {
        self.held.get_or_create(&pool(id)).set(0);
        self.replicas.get_or_create(&pool(id)).set(0);
        self.state(id, phase);
    }

    pub(crate) fn state(&self, id: &PoolId, phase: Phase) {
        for p in Phase::ALL {
            let labels = StateLabels {
                pool: id.to_string(),
                state: p.as_str(),
            };
            self.state.get_or_create(&labels).set(i64::from(p == phase));
        }
    }

    pub fn wake(&self, id: &PoolId, result: &'static str) {
        let labels = ResultLabels {
            pool: id.to_string(),
            result,
        };
        self.wakes.get_or_create(&labels).inc();
    }

    pub fn wake_phase(&self, id: &PoolId, phase: &'static str, since_start: Duration) {
        let labels = PhaseLabels {
            pool: id.to_string(),
            phase,
        };
        self.wake_seconds
            .get_or_create(&labels)
            .observe(since_start.as_secs_f64());
    }

    pub(crate) fn held(&self, id: &PoolId, delta: i64) {
        self.held.get_or_create(&pool(id)).inc_by(delta);
    }

    pub fn hold_ended(&self, id: &PoolId, held_for: Duration) {
        self.hold_seconds
            .get_or_create(&pool(id))
            .observe(held_for.as_secs_f64());
    }

    pub(crate) fn replicas(&self, id: &PoolId, count: usize) {
        let count = i64::try_from(count).unwrap_or(i64::MAX);
        self.replicas.get_or_create(&pool(id)).set(count);
    }

    pub fn scaled(&self, id: &PoolId, direction: &'static str, reason: &'static str) {
        let labels = ScaleLabels {
            pool: id.to_string(),
            direction,
            reason,
        };
        self.scale_events.get_or_create(&labels).inc();
    }

    pub fn drain_cancelled(&self, id: &PoolId) {
        self.drains_cancelled.get_or_create(&pool(id)).inc();
    }
}
