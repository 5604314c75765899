//! `bkpool_controller_*` metrics: reconciles, errors and durations by reconciler, writes,
//! pools by phase, certificate expiry, leadership, and the scaler's scale events, drains and
//! gateway reports. Labels are fixed sets (reconciler, reason, phase, certificate, direction,
//! result, state) plus `pool` as `namespace/name`.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::crd::Phase;

#[derive(Debug, Clone)]
pub struct Metrics {
    reconciles: Family<ReconcilerLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<ReconcilerLabels, Histogram>,
    writes: Family<ReconcilerLabels, Counter>,
    pools: Family<PhaseLabels, Gauge>,
    cert_expiry: Family<CertLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    leader: Gauge<i64, AtomicI64>,
    scale_events: Family<ScaleLabels, Counter>,
    drains: Family<DrainLabels, Counter>,
    gateway_reports: Family<ReportLabels, Gauge>,
}

/// Which way a scale event went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Up,
    Down,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainResult {
    Confirmed,
    Cancelled,
}

const SCALE_REASONS: [&str; 3] = ["idle", "load", "floor"];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcilerLabels {
    reconciler: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    reconciler: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScaleLabels {
    pool: String,
    direction: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DrainLabels {
    pool: String,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReportLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    pool: String,
    certificate: &'static str,
}

impl Metrics {
    /// Registers everything under the `bkpool_controller` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("bkpool_controller");
        let metrics = Self {
            reconciles: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 14))
            }),
            writes: Family::default(),
            pools: Family::default(),
            cert_expiry: Family::default(),
            leader: Gauge::default(),
            scale_events: Family::default(),
            drains: Family::default(),
            gateway_reports: Family::default(),
        };
        r.register("reconciles", "Reconciler runs", metrics.reconciles.clone());
        r.register(
            "reconcile_errors",
            "Reconciler failures, by reconciler and reason",
            metrics.errors.clone(),
        );
        r.register_with_unit(
            "reconcile_duration",
            "Time one reconciler took for one pool",
            Unit::Seconds,
            metrics.duration.clone(),
        );
        r.register(
            "writes",
            "Objects written (applied, created or deleted); zero when nothing changed",
            metrics.writes.clone(),
        );
        r.register("pools", "Pools by phase", metrics.pools.clone());
        r.register_with_unit(
            "certificate_expiry_timestamp",
            "Unix time the pool's certificate expires, by certificate",
            Unit::Seconds,
            metrics.cert_expiry.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the leader lease",
            metrics.leader.clone(),
        );
        r.register(
            "scale_events",
            "Workload replicas changed by the scaler, by direction and reason (idle, load, floor)",
            metrics.scale_events.clone(),
        );
        r.register(
            "drains",
            "Drains before a scale-down, by result (confirmed, cancelled)",
            metrics.drains.clone(),
        );
        r.register(
            "gateway_reports",
            "Gateway replicas by the state of their activity report (fresh, stale, missing)",
            metrics.gateway_reports.clone(),
        );
        for state in ["fresh", "stale", "missing"] {
            let _ = metrics
                .gateway_reports
                .get_or_create(&ReportLabels { state });
        }
        for phase in Phase::ALL {
            let _ = metrics.pools.get_or_create(&PhaseLabels {
                phase: phase.as_str(),
            });
        }
        metrics
    }

    pub fn reconciled(&self, reconciler: &'static str, took: Duration) {
        let labels = ReconcilerLabels { reconciler };
        self.reconciles.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    pub fn failed(&self, reconciler: &'static str, reason: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels { reconciler, reason })
            .inc();
    }

    pub fn wrote(&self, reconciler: &'static str) {
        self.writes
            .get_or_create(&ReconcilerLabels { reconciler })
            .inc();
    }

    /// Runs so far of `reconciler`.
    pub fn reconciles(&self, reconciler: &'static str) -> u64 {
        self.reconciles
            .get_or_create(&ReconcilerLabels { reconciler })
            .get()
    }

    /// Writes so far by `reconciler`.
    pub fn writes(&self, reconciler: &'static str) -> u64 {
        self.writes
            .get_or_create(&ReconcilerLabels { reconciler })
            .get()
    }

    pub fn set_pools(&self, counts: &[(Phase, i64)]) {
        for (phase, count) in counts {
            self.pools
                .get_or_create(&PhaseLabels {
                    phase: phase.as_str(),
                })
                .set(*count);
        }
    }

    pub fn certificate_expiry(&self, pool: &str, certificate: &'static str, at: SystemTime) {
        let secs = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let labels = CertLabels {
            pool: pool.to_owned(),
            certificate,
        };
        self.cert_expiry
            .get_or_create(&labels)
            .set(secs.as_secs_f64());
    }

    /// Counts a change of a pool's replicas; `reason` is `idle`, `load` or `floor`.
    pub fn scaled(&self, pool: &str, direction: Direction, reason: &'static str) {
        let direction = match direction {
            Direction::Up => "up",
            Direction::Down => "down",
        };
        self.scale_events
            .get_or_create(&ScaleLabels {
                pool: pool.to_owned(),
                direction,
                reason,
            })
            .inc();
    }

    pub fn drained(&self, pool: &str, result: DrainResult) {
        let result = match result {
            DrainResult::Confirmed => "confirmed",
            DrainResult::Cancelled => "cancelled",
        };
        self.drains
            .get_or_create(&DrainLabels {
                pool: pool.to_owned(),
                result,
            })
            .inc();
    }

    /// Gateway replicas whose report is in `state` (`fresh`, `stale` or `missing`).
    pub fn set_gateway_reports(&self, state: &'static str, replicas: i64) {
        self.gateway_reports
            .get_or_create(&ReportLabels { state })
            .set(replicas);
    }

    /// Scale events so far of `pool` in `direction` for `reason`.
    pub fn scale_events(&self, pool: &str, direction: &'static str, reason: &'static str) -> u64 {
        self.scale_events
            .get_or_create(&ScaleLabels {
                pool: pool.to_owned(),
                direction,
                reason,
            })
            .get()
    }

    /// Forgets a deleted pool's certificates, scale events and drains.
    pub fn forget_pool(&self, pool: &str) {
        for direction in ["up", "down"] {
            for reason in SCALE_REASONS {
                self.scale_events.remove(&ScaleLabels {
                    pool: pool.to_owned(),
                    direction,
                    reason,
                });
            }
        }
        for result in ["confirmed", "cancelled"] {
            self.drains.remove(&DrainLabels {
                pool: pool.to_owned(),
                result,
            });
        }
        for certificate in super::pki::CERTIFICATES {
            let labels = CertLabels {
                pool: pool.to_owned(),
                certificate,
            };
            self.cert_expiry.remove(&labels);
        }
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }
}

/// A registry with the controller metrics in it, shareable with the HTTP server.
pub fn registry() -> (Arc<std::sync::Mutex<Registry>>, Metrics) {
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    (Arc::new(std::sync::Mutex::new(registry)), metrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_uses_the_documented_names() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        metrics.reconciled("workload", Duration::from_millis(3));
        metrics.failed("pki", "forbidden");
        metrics.wrote("service");
        metrics.set_pools(&[(Phase::Sleeping, 2)]);
        metrics.certificate_expiry(
            "ci/a",
            "client-ca",
            SystemTime::UNIX_EPOCH + Duration::from_secs(10),
        );
        metrics.set_leader(true);
        metrics.scaled("ci/a", Direction::Down, "idle");
        metrics.drained("ci/a", DrainResult::Cancelled);
        metrics.set_gateway_reports("missing", 2);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "bkpool_controller_reconciles_total{reconciler=\"workload\"} 1",
            "bkpool_controller_reconcile_errors_total{reconciler=\"pki\",reason=\"forbidden\"} 1",
            "bkpool_controller_reconcile_duration_seconds_count{reconciler=\"workload\"} 1",
            "bkpool_controller_writes_total{reconciler=\"service\"} 1",
            "bkpool_controller_pools{phase=\"Sleeping\"} 2",
            "bkpool_controller_pools{phase=\"Ready\"} 0",
            "bkpool_controller_certificate_expiry_timestamp_seconds{pool=\"ci/a\",certificate=\"client-ca\"} 10.0",
            "bkpool_controller_leader 1",
            "bkpool_controller_scale_events_total{pool=\"ci/a\",direction=\"down\",reason=\"idle\"} 1",
            "bkpool_controller_drains_total{pool=\"ci/a\",result=\"cancelled\"} 1",
            "bkpool_controller_gateway_reports{state=\"missing\"} 2",
            "bkpool_controller_gateway_reports{state=\"fresh\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
