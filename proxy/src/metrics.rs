//! Gateway metrics. Per-pool figures are read from [`Activity`] at scrape time by a collector,
//! so the hot path pays for atomics only and pools that leave disappear from the exposition.
//! Names follow `bkpool_gateway_*`, base units, `_total` for counters, `pool` as
//! `namespace/name`, and never a per-connection label.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::activity::Activity;
use crate::admit::Admission;

/// Metrics the gateway records as events happen (the rest is collected from activity).
#[derive(Debug, Clone)]
pub struct Metrics {
    rejected: Family<RejectLabels, Counter>,
    handshake_seconds: Histogram,
    connection_seconds: Histogram,
    reloads: Family<ResultLabels, Counter>,
    expired: Family<PoolLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    /// Empty when the connection was refused before it named a pool.
    pool: String,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    kind: &'static str,
    result: &'static str,
}

impl Metrics {
    /// Registers everything under the `bkpool_gateway` prefix.
    pub fn register(
        registry: &mut Registry,
        activity: Arc<Activity>,
        admission: Arc<Admission>,
    ) -> Self {
        // The relay's pools name their metrics in full (`bkpool_gateway_relay_*`).
        crate::relay::pool::register(registry);
        let gw = registry.sub_registry_with_prefix("bkpool_gateway");
        let metrics = Self {
            rejected: Family::default(),
            handshake_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 16)),
            connection_seconds: Histogram::new(exponential_buckets(0.001, 4.0, 14)),
            reloads: Family::default(),
            expired: Family::default(),
        };
        gw.register(
            "connections_rejected",
            "Connections refused, by pool (empty before authentication) and reason",
            metrics.rejected.clone(),
        );
        gw.register_with_unit(
            "handshake_duration",
            "Duration of successful TLS handshakes (terminate) or ClientHello reads (passthrough)",
            Unit::Seconds,
            metrics.handshake_seconds.clone(),
        );
        gw.register_with_unit(
            "connection_duration",
            "Lifetime of authenticated connections",
            Unit::Seconds,
            metrics.connection_seconds.clone(),
        );
        gw.register(
            "connections_expired",
            "Authenticated connections closed when their client certificate expired, by pool",
            metrics.expired.clone(),
        );
        gw.register(
            "credential_reloads",
            "Certificate and CA reloads, by kind and result",
            metrics.reloads.clone(),
        );
        gw.register_collector(Box::new(ActivityCollector {
            activity,
            admission,
        }));
        metrics
    }

    pub fn rejected(&self, pool: Option<&str>, reason: &'static str) {
        let labels = RejectLabels {
            pool: pool.unwrap_or_default().to_string(),
            reason,
        };
        self.rejected.get_or_create(&labels).inc();
    }

    pub fn handshake(&self, took: Duration) {
        self.handshake_seconds.observe(took.as_secs_f64());
    }

    pub fn connection_closed(&self, lasted: Duration) {
        self.connection_seconds.observe(lasted.as_secs_f64());
    }

    pub fn expired(&self, pool: &str) {
        let labels = PoolLabels { pool: pool.into() };
        self.expired.get_or_create(&labels).inc();
    }

    pub fn reload(&self, kind: &'static str, ok: bool) {
        let labels = ResultLabels {
            kind,
            result: if ok { "ok" } else { "error" },
        };
        self.reloads.get_or_create(&labels).inc();
    }
}

#[derive(Debug)]
struct ActivityCollector {
    activity: Arc<Activity>,
    admission: Arc<Admission>,
}

impl Collector for ActivityCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.activity.snapshot();
        let per_pool = |encoder: &mut DescriptorEncoder,
                        name,
                        help,
                        unit: Option<&Unit>,
                        counter: bool,
                        value: &dyn Fn(&crate::activity::PoolSnapshot) -> f64|
         -> Result<(), std::fmt::Error> {
            let kind = if counter {
                prometheus_client::metrics::MetricType::Counter
            } else {
                prometheus_client::metrics::MetricType::Gauge
            };
            let mut family = encoder.encode_descriptor(name, help, unit, kind)?;
            for pool in &snapshot.pools {
                let labels = [("pool", pool.pool.as_str())];
                let metric = family.encode_family(&labels)?;
                if counter {
                    ConstCounter::new(value(pool)).encode(metric)?;
                } else {
                    ConstGauge::new(value(pool)).encode(metric)?;
                }
            }
            Ok(())
        };
        per_pool(
            &mut encoder,
            "connections_open",
            "Authenticated connections open",
            None,
            false,
            &|p| p.open as f64,
        )?;
        per_pool(
            &mut encoder,
            "connections_held",
            "Authenticated connections held while their pool wakes",
            None,
            false,
            &|p| p.held as f64,
        )?;
        per_pool(
            &mut encoder,
            "connections_accepted",
            "Authenticated connections accepted",
            None,
            true,
            &|p| p.accepted as f64,
        )?;
        per_pool(
            &mut encoder,
            "last_activity_timestamp",
            "Unix time of the pool's last authenticated activity",
            Some(&Unit::Seconds),
            false,
            &|p| p.last_activity_ms as f64 / 1000.0,
        )?;

        let mut bytes = encoder.encode_descriptor(
            "bytes",
            "Bytes relayed, by pool and direction (in: from clients)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for pool in &snapshot.pools {
            for (direction, value) in [("in", pool.bytes_in), ("out", pool.bytes_out)] {
                let labels = [("pool", pool.pool.as_str()), ("direction", direction)];
                ConstCounter::new(value).encode(bytes.encode_family(&labels)?)?;
            }
        }

        let totals = self.activity.relay_totals();
        let mut by_path = encoder.encode_descriptor(
            "relay",
            "Bytes relayed, by how they moved (splice: zero-copy through a pipe)",
            Some(&Unit::Bytes),
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (path, counter) in [
            ("splice", &totals.splice_bytes),
            ("copy", &totals.copy_bytes),
        ] {
            ConstCounter::new(counter.load(Relaxed))
                .encode(by_path.encode_family(&[("path", path)])?)?;
        }
        for (name, help, counters) in [
            (
                "half_closes",
                "Half-closes forwarded, by direction",
                &totals.half_closes,
            ),
            ("resets", "Resets propagated, by direction", &totals.resets),
        ] {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (direction, counter) in ["in", "out"].iter().zip(counters.iter()) {
                ConstCounter::new(counter.load(Relaxed))
                    .encode(family.encode_family(&[("direction", *direction)])?)?;
            }
        }

        let gauges = [
            (
                "handshakes_in_flight",
                "TLS handshakes or ClientHello reads in flight",
                self.admission.handshakes_in_flight(),
            ),
            (
                "client_connections",
                "Client connections open, authenticated or not",
                self.admission.connections().used(),
            ),
            (
                "client_hello_bytes",
                "Bytes of ClientHellos kept for replay to passthrough backends",
                self.admission.client_hello_bytes(),
            ),
            (
                "connections_limit",
                "The gateway's connection limit",
                self.admission.connections().max(),
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value as i64);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}
