//! Certificate API metrics: certificates issued by pool and method, refusals by pool and
//! reason (pool empty when the URL named no existing pool, so callers cannot mint label
//! values), wakes asked for by pool, why and whether they were let through. Names follow
//! `bkpool_certapi_*`; never an identity label.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone)]
pub struct ApiMetrics {
    issued: Family<IssuedLabels, Counter>,
    denied: Family<DeniedLabels, Counter>,
    wakes: Family<WakeLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WakeLabels {
    pool: String,
    /// `certificate` (pre-warm on issue) or `requested` (`POST .../wake`).
    reason: &'static str,
    /// `started` or `rate_limited`.
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuedLabels {
    pool: String,
    method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeniedLabels {
    pool: String,
    reason: &'static str,
}

impl ApiMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let sub = registry.sub_registry_with_prefix("bkpool_certapi");
        let metrics = Self {
            issued: Family::default(),
            denied: Family::default(),
            wakes: Family::default(),
        };
        sub.register(
            "certificates_issued",
            "Client certificates issued, by pool and authentication method",
            metrics.issued.clone(),
        );
        sub.register(
            "requests_denied",
            "Requests refused, by pool (empty when unknown) and reason",
            metrics.denied.clone(),
        );
        sub.register(
            "wakes",
            "Pool wakes asked for, by pool, reason (certificate, requested) and result (started, rate_limited)",
            metrics.wakes.clone(),
        );
        metrics
    }

    /// Metrics that are counted but not exported (tests, embedding without a registry).
    pub fn unregistered() -> Self {
        Self::register(&mut Registry::default())
    }

    pub fn issued(&self, pool: &str, method: &'static str) {
        let labels = IssuedLabels {
            pool: pool.to_owned(),
            method,
        };
        self.issued.get_or_create(&labels).inc();
    }

    pub fn wake(&self, pool: &str, reason: &'static str, result: &'static str) {
        let labels = WakeLabels {
            pool: pool.to_owned(),
            reason,
            result,
        };
        self.wakes.get_or_create(&labels).inc();
    }

    pub fn denied(&self, pool: &str, reason: &'static str) {
        let labels = DeniedLabels {
            pool: pool.to_owned(),
            reason,
        };
        self.denied.get_or_create(&labels).inc();
    }
}
