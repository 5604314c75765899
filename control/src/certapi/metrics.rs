//! Certificate API metrics: certificates issued by pool and method, refusals by pool and
//! reason (pool empty when the URL named no existing pool, so callers cannot mint label
//! values). Names follow `bkpool_certapi_*`; never an identity label.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone)]
pub struct ApiMetrics {
    issued: Family<IssuedLabels, Counter>,
    denied: Family<DeniedLabels, Counter>,
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

    pub fn denied(&self, pool: &str, reason: &'static str) {
        let labels = DeniedLabels {
            pool: pool.to_owned(),
            reason,
        };
        self.denied.get_or_create(&labels).inc();
    }
}
