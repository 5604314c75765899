//! The gateways' activity reports: which replicas to ask (every address of the gateway
//! Service's Endpoints, ready or not), asking them all at once over one pooled HTTP/1.1
//! client, and whether what came back is complete enough to act on.
//!
//! A replica's report is **fresh** when its last poll answered 200 with a snapshot received
//! within the staleness bound, **stale** when its last answer is older than that, and
//! **missing** when its last poll failed (error, non-200 such as the 503 of a gateway still
//! syncing its watches, timeout) or it never answered. Only when every known replica is
//! fresh (and at least one is known) is the picture complete; otherwise every pool counts as
//! busy.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Endpoints;
use proxy::activity::{PoolSnapshot, Snapshot};
use tokio::time::Instant;

/// One gateway replica's admin address.
pub type Replica = SocketAddr;

/// Every replica of the gateway Service: ready and not-ready addresses (a not-ready gateway
/// may still be draining connections), on the port named `port_name`.
pub fn replicas(endpoints: Option<&Endpoints>, port_name: &str) -> Vec<Replica> {
    let mut out = Vec::new();
    for subset in endpoints
        .and_then(|e| e.subsets.as_ref())
        .into_iter()
        .flatten()
    {
        let port = subset
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(port_name))
            .and_then(|p| u16::try_from(p.port).ok());
        let Some(port) = port else { continue };
        let addresses = subset.addresses.iter().flatten();
        let not_ready = subset.not_ready_addresses.iter().flatten();
        for address in addresses.chain(not_ready) {
            if let Ok(ip) = address.ip.parse::<IpAddr>() {
                out.push(SocketAddr::new(ip, port));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// How one replica's report stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Freshness {
    Fresh,
    Stale,
    Missing,
}

impl Freshness {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fresh => "fresh",
            Self::Stale => "stale",
            Self::Missing => "missing",
        }
    }
}

/// The last thing each known replica said.
#[derive(Debug, Default)]
pub struct Reports {
    replicas: HashMap<Replica, Last>,
}

#[derive(Debug, Default)]
struct Last {
    answer: Option<(Instant, Snapshot)>,
    /// The latest poll failed.
    failed: bool,
}

/// What all replicas said, as one view per pool.
#[derive(Debug, Clone, PartialEq)]
pub enum View {
    /// Some replica's report is missing or stale, or no replica is known: act as if every
    /// pool were busy.
    Partial,
    /// Every replica answered recently; one snapshot per replica.
    Complete(Vec<Snapshot>),
}

/// One pool across every replica of a complete view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    pub open: u64,
    pub held: u64,
    /// The latest across replicas, 0 if none saw any.
    pub last_activity_ms: u64,
    /// Per replica: the drain mark it echoes for the pool, None when it has none or does not
    /// list the pool.
    pub marks: Vec<Option<String>>,
}

impl Seen {
    pub fn busy(&self) -> bool {
        self.open > 0 || self.held > 0
    }

    /// Every replica lists the pool with exactly `mark` (and there is at least one replica).
    pub fn acked_by_all(&self, mark: &str) -> bool {
        !self.marks.is_empty() && self.marks.iter().all(|m| m.as_deref() == Some(mark))
    }
}

impl Reports {
    /// Forgets replicas that left the Endpoints, keeps the others' last answers.
    pub fn retain(&mut self, current: &[Replica]) {
        self.replicas.retain(|r, _| current.contains(r));
        for r in current {
            self.replicas.entry(*r).or_default();
        }
    }

    /// Records the outcome of one poll of `replica`.
    pub fn record(&mut self, replica: Replica, at: Instant, outcome: Option<Snapshot>) {
        let last = self.replicas.entry(replica).or_default();
        match outcome {
            Some(snapshot) => {
                last.answer = Some((at, snapshot));
                last.failed = false;
            }
            None => last.failed = true,
        }
    }

    pub fn freshness(&self, replica: &Replica, now: Instant, stale_after: Duration) -> Freshness {
        match self.replicas.get(replica) {
            None => Freshness::Missing,
            Some(Last { failed: true, .. } | Last { answer: None, .. }) => Freshness::Missing,
            Some(Last {
                answer: Some((at, _)),
                ..
            }) if now.saturating_duration_since(*at) > stale_after => Freshness::Stale,
            Some(_) => Freshness::Fresh,
        }
    }

    /// Replicas by freshness, for the `gateway_reports` gauge.
    pub fn counts(&self, now: Instant, stale_after: Duration) -> [(Freshness, i64); 3] {
        let mut counts = [
            (Freshness::Fresh, 0),
            (Freshness::Stale, 0),
            (Freshness::Missing, 0),
        ];
        for replica in self.replicas.keys() {
            let f = self.freshness(replica, now, stale_after);
            if let Some(slot) = counts.iter_mut().find(|(k, _)| *k == f) {
                slot.1 += 1;
            }
        }
        counts
    }

    pub fn view(&self, now: Instant, stale_after: Duration) -> View {
        if self.replicas.is_empty() {
            return View::Partial;
        }
        let mut snapshots = Vec::with_capacity(self.replicas.len());
        for (replica, last) in &self.replicas {
            if self.freshness(replica, now, stale_after) != Freshness::Fresh {
                return View::Partial;
            }
            if let Some((_, snapshot)) = &last.answer {
                snapshots.push(snapshot.clone());
            }
        }
        View::Complete(snapshots)
    }
}

impl View {
    /// The pool `id` (`namespace/name`) across replicas; None when the view is partial.
    pub fn pool(&self, id: &str) -> Option<Seen> {
        let View::Complete(snapshots) = self else {
            return None;
        };
        let mut seen = Seen::default();
        for snapshot in snapshots {
            let entry: Option<&PoolSnapshot> = snapshot.pools.iter().find(|p| p.pool == id);
            if let Some(p) = entry {
                seen.open += p.open;
                seen.held += p.held;
                seen.last_activity_ms = seen.last_activity_ms.max(p.last_activity_ms);
            }
            seen.marks.push(entry.and_then(|p| p.draining.clone()));
        }
        Some(seen)
    }
}

/// The one pooled keep-alive client the scaler polls gateways with.
#[derive(Clone)]
pub struct Poller {
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

impl Poller {
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1)
            .build(connector);
        Self { client, timeout }
    }

    /// Polls every replica at once and records each outcome.
    pub async fn poll_all(&self, reports: &mut Reports, replicas: &[Replica]) {
        reports.retain(replicas);
        let polls = replicas
            .iter()
            .map(|r| async move { (*r, self.poll(*r).await) });
        for (replica, outcome) in futures::future::join_all(polls).await {
            reports.record(replica, Instant::now(), outcome);
        }
    }

    /// `GET /activity` of one replica; None on any failure (logged at debug).
    pub async fn poll(&self, replica: Replica) -> Option<Snapshot> {
        let uri: http::Uri = format!("http://{replica}/activity").parse().ok()?;
        let fetch = async {
            let response = self.client.get(uri).await.map_err(|e| e.to_string())?;
            if response.status() != http::StatusCode::OK {
                return Err(format!("status {}", response.status()));
            }
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            serde_json::from_slice::<Snapshot>(&body.to_bytes()).map_err(|e| e.to_string())
        };
        match tokio::time::timeout(self.timeout, fetch).await {
            Ok(Ok(snapshot)) => Some(snapshot),
            Ok(Err(error)) => {
                tracing::debug!(%replica, %error, "gateway activity report failed");
                None
            }
            Err(_) => {
                tracing::debug!(%replica, "gateway activity report timed out");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{EndpointAddress, EndpointPort, EndpointSubset};

    use super::*;

    const STALE: Duration = Duration::from_secs(3);

    fn addr(last: u8) -> Replica {
        SocketAddr::from(([127, 0, 0, last], 9235))
    }

    fn pool(name: &str, open: u64, held: u64, draining: Option<&str>) -> PoolSnapshot {
        PoolSnapshot {
            pool: name.into(),
            open,
            held,
            last_activity_ms: 1_000 * open,
            draining: draining.map(Into::into),
            ..PoolSnapshot::default()
        }
    }

    fn snapshot(pools: Vec<PoolSnapshot>) -> Option<Snapshot> {
        Some(Snapshot {
            taken_at_ms: 1,
            pools,
        })
    }

    #[test]
    fn replicas_are_ready_and_not_ready_addresses_on_the_named_port() {
        let address = |ip: &str| EndpointAddress {
            ip: ip.into(),
            ..EndpointAddress::default()
        };
        let port = |name: &str, port| EndpointPort {
            name: Some(name.into()),
            port,
            ..EndpointPort::default()
        };
        let endpoints = Endpoints {
            subsets: Some(vec![
                EndpointSubset {
                    addresses: Some(vec![address("127.0.0.2"), address("127.0.0.1")]),
                    not_ready_addresses: Some(vec![address("127.0.0.3")]),
                    ports: Some(vec![port("buildkit", 1234), port("admin", 9235)]),
                },
                EndpointSubset {
                    addresses: Some(vec![address("::1")]),
                    not_ready_addresses: None,
                    ports: Some(vec![port("buildkit", 1234)]),
                },
            ]),
            ..Endpoints::default()
        };
        assert_eq!(
            replicas(Some(&endpoints), "admin"),
            [addr(1), addr(2), addr(3)]
        );
        assert_eq!(replicas(None, "admin"), []);
    }

    #[test]
    fn a_view_is_complete_only_when_every_replica_is_fresh() {
        let t0 = Instant::now();
        let mut reports = Reports::default();
        assert_eq!(reports.view(t0, STALE), View::Partial, "no replica known");
        reports.retain(&[addr(1), addr(2)]);
        reports.record(addr(1), t0, snapshot(vec![]));
        assert_eq!(reports.freshness(&addr(2), t0, STALE), Freshness::Missing);
        assert_eq!(reports.view(t0, STALE), View::Partial, "one never answered");
        reports.record(addr(2), t0, snapshot(vec![]));
        assert!(matches!(reports.view(t0, STALE), View::Complete(s) if s.len() == 2));
        // A failed poll (503, timeout) makes the replica missing, even with an older answer.
        reports.record(addr(2), t0, None);
        assert_eq!(reports.freshness(&addr(2), t0, STALE), Freshness::Missing);
        assert_eq!(reports.view(t0, STALE), View::Partial);
        reports.record(addr(2), t0, snapshot(vec![]));
        // Answers older than the bound are stale.
        let later = t0 + STALE + Duration::from_millis(1);
        assert_eq!(reports.freshness(&addr(1), later, STALE), Freshness::Stale);
        assert_eq!(reports.view(later, STALE), View::Partial);
        assert_eq!(
            reports.counts(later, STALE),
            [
                (Freshness::Fresh, 0),
                (Freshness::Stale, 2),
                (Freshness::Missing, 0)
            ]
        );
        // A replica that left the Endpoints no longer counts.
        reports.record(addr(1), later, snapshot(vec![]));
        reports.record(addr(2), t0, None);
        reports.retain(&[addr(1)]);
        assert!(matches!(reports.view(later, STALE), View::Complete(s) if s.len() == 1));
    }

    #[test]
    fn a_pool_sums_counts_and_collects_every_replicas_mark() {
        let view = View::Complete(vec![
            snapshot(vec![
                pool("ci/a", 2, 0, None),
                pool("ci/b", 0, 0, Some("m")),
            ])
            .unwrap(),
            snapshot(vec![
                pool("ci/a", 1, 3, None),
                pool("ci/b", 0, 0, Some("m")),
            ])
            .unwrap(),
            snapshot(vec![pool("ci/a", 0, 0, None)]).unwrap(),
        ]);
        let a = view.pool("ci/a").unwrap();
        assert_eq!((a.open, a.held, a.last_activity_ms), (3, 3, 2_000));
        assert!(a.busy());
        let b = view.pool("ci/b").unwrap();
        assert!(!b.busy());
        // The third replica does not list b: no acknowledgement from it.
        assert_eq!(b.marks, [Some("m".into()), Some("m".into()), None]);
        assert!(!b.acked_by_all("m"));
        let two = View::Complete(vec![
            snapshot(vec![pool("ci/b", 0, 0, Some("m"))]).unwrap(),
            snapshot(vec![pool("ci/b", 0, 0, Some("m"))]).unwrap(),
        ]);
        assert!(two.pool("ci/b").unwrap().acked_by_all("m"));
        assert!(!two.pool("ci/b").unwrap().acked_by_all("other"));
        assert_eq!(View::Partial.pool("ci/a"), None);
        assert!(!Seen::default().acked_by_all("m"));
    }
}
