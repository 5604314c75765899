//! Per-pool activity: what the control loop needs to decide whether a pool is busy or idle.
//!
//! The hot path touches only atomics of one pool's [`PoolActivity`], which each connection
//! holds an `Arc` to; the map is read when a connection is authenticated and when someone takes
//! a snapshot. Only authenticated connections count: a port scan never makes a pool look busy.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde::Serialize;

use crate::names::PoolId;
use crate::relay::{Direction, Path, Tally};

/// Activity of every pool this gateway serves.
#[derive(Debug, Default)]
pub struct Activity {
    pools: DashMap<PoolId, Arc<PoolActivity>>,
    relay: RelayTotals,
}

/// Counters of one pool. Gauges (`open`, `held`) are changed only through guards.
#[derive(Debug, Default)]
pub struct PoolActivity {
    open: AtomicU64,
    held: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Unix time in milliseconds of the last authenticated connection event or byte moved.
    last_activity_ms: AtomicU64,
    /// The drain this gateway has acknowledged for the pool (Kubernetes mode): set once new
    /// connections are held instead of routed, so a scaler that sees it on every gateway knows
    /// no connection can reach the backend without showing up here first.
    draining: std::sync::Mutex<Option<Arc<str>>>,
}

/// Gateway-wide relay counters (splice and copy counted apart, half-closes and resets).
#[derive(Debug, Default)]
pub struct RelayTotals {
    pub splice_bytes: AtomicU64,
    pub copy_bytes: AtomicU64,
    pub half_closes: [AtomicU64; 2],
    pub resets: [AtomicU64; 2],
}

/// What `/activity` serves and the control loop reads.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Snapshot {
    /// Unix time in milliseconds when the snapshot was taken.
    pub taken_at_ms: u64,
    pub pools: Vec<PoolSnapshot>,
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PoolSnapshot {
    pub pool: String,
    pub open: u64,
    pub held: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Unix time in milliseconds; 0 if the pool never saw an authenticated connection.
    pub last_activity_ms: u64,
    /// The drain mark this gateway holds new connections for, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining: Option<String>,
}

impl Activity {
    /// The counters of `pool`, created on first use.
    pub fn pool(&self, pool: &PoolId) -> Arc<PoolActivity> {
        if let Some(found) = self.pools.get(pool) {
            return found.clone();
        }
        self.pools.entry(pool.clone()).or_default().clone()
    }

    /// Drops the entries of pools that left the configuration. Connections still open keep
    /// their own `Arc`, so nothing they count is lost mid-flight; it just stops being reported.
    pub fn retain(&self, keep: impl Fn(&PoolId) -> bool) {
        self.pools.retain(|id, _| keep(id));
    }

    pub fn relay_totals(&self) -> &RelayTotals {
        &self.relay
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut pools: Vec<PoolSnapshot> = self
            .pools
            .iter()
            .map(|e| e.value().snapshot(e.key()))
            .collect();
        pools.sort_by(|a, b| a.pool.cmp(&b.pool));
        Snapshot {
            taken_at_ms: now_ms(),
            pools,
        }
    }

    /// A relay tally for one connection of `pool`.
    pub fn tally(&self, pool: Arc<PoolActivity>) -> ConnectionTally<'_> {
        ConnectionTally {
            pool,
            totals: &self.relay,
        }
    }
}

impl PoolActivity {
    /// Counts an authenticated connection as open, from the moment it is routed (its backend
    /// may still be being dialled), until the guard drops.
    pub fn open(self: &Arc<Self>) -> OpenGuard {
        self.accepted.fetch_add(1, Relaxed);
        self.open.fetch_add(1, Relaxed);
        self.touch();
        OpenGuard(self.clone())
    }

    /// Counts an authenticated connection as held (waiting for a backend) until the guard drops.
    pub fn hold(self: &Arc<Self>) -> HeldGuard {
        self.held.fetch_add(1, Relaxed);
        self.touch();
        HeldGuard(self.clone())
    }

    pub fn rejected(&self) {
        self.rejected.fetch_add(1, Relaxed);
    }

    pub fn open_count(&self) -> u64 {
        self.open.load(Relaxed)
    }

    pub fn held_count(&self) -> u64 {
        self.held.load(Relaxed)
    }

    pub fn last_activity_ms(&self) -> u64 {
        self.last_activity_ms.load(Relaxed)
    }

    /// Acknowledges (or, with `None`, clears) the drain mark `token`. Cold path: called when
    /// a pool's drain state changes, never per connection.
    pub fn set_draining(&self, token: Option<&str>) {
        let mut draining = self.draining.lock().unwrap_or_else(|e| e.into_inner());
        *draining = token.map(Arc::from);
    }

    pub fn draining(&self) -> Option<Arc<str>> {
        let draining = self.draining.lock().unwrap_or_else(|e| e.into_inner());
        draining.clone()
    }

    fn touch(&self) {
        self.last_activity_ms.store(now_ms(), Relaxed);
    }

    fn snapshot(&self, id: &PoolId) -> PoolSnapshot {
        PoolSnapshot {
            pool: id.to_string(),
            open: self.open.load(Relaxed),
            held: self.held.load(Relaxed),
            accepted: self.accepted.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            last_activity_ms: self.last_activity_ms.load(Relaxed),
            draining: self.draining().map(|t| t.to_string()),
        }
    }
}

/// An open authenticated connection; dropping it closes the count and stamps last activity.
#[derive(Debug)]
pub struct OpenGuard(Arc<PoolActivity>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
        self.0.touch();
    }
}

/// A held connection (its pool is waking); dropping it ends the hold.
#[derive(Debug)]
pub struct HeldGuard(Arc<PoolActivity>);

impl Drop for HeldGuard {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Relaxed);
        self.0.touch();
    }
}

/// The relay's view of one connection: bytes go to the pool and to the gateway totals.
#[derive(Debug)]
pub struct ConnectionTally<'a> {
    pool: Arc<PoolActivity>,
    totals: &'a RelayTotals,
}

impl Tally for ConnectionTally<'_> {
    fn moved(&self, dir: Direction, path: Path, bytes: u64) {
        let counter = match dir {
            Direction::Inbound => &self.pool.bytes_in,
            Direction::Outbound => &self.pool.bytes_out,
        };
        counter.fetch_add(bytes, Relaxed);
        let by_path = match path {
            Path::Splice => &self.totals.splice_bytes,
            Path::Copy => &self.totals.copy_bytes,
        };
        by_path.fetch_add(bytes, Relaxed);
        self.pool.touch();
    }

    fn half_closed(&self, dir: Direction) {
        self.totals.half_closes[dir as usize].fetch_add(1, Relaxed);
    }

    fn reset(&self, dir: Direction) {
        self.totals.resets[dir as usize].fetch_add(1, Relaxed);
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str) -> PoolId {
        name.parse().unwrap()
    }

    #[test]
    fn guards_count_open_and_held_and_stamp_activity() {
        let activity = Activity::default();
        let a = activity.pool(&pool("a"));
        assert_eq!(a.last_activity_ms(), 0);
        let open = a.open();
        let held = a.hold();
        let snap = activity.snapshot();
        assert_eq!(
            (
                snap.pools[0].open,
                snap.pools[0].held,
                snap.pools[0].accepted
            ),
            (1, 1, 1)
        );
        assert!(snap.pools[0].last_activity_ms > 0);
        drop((open, held));
        let snap = activity.snapshot();
        assert_eq!(
            (
                snap.pools[0].open,
                snap.pools[0].held,
                snap.pools[0].accepted
            ),
            (0, 0, 1)
        );
    }

    #[test]
    fn tally_counts_bytes_by_direction_and_path() {
        let activity = Activity::default();
        let tally = activity.tally(activity.pool(&pool("a")));
        tally.moved(Direction::Inbound, Path::Splice, 10);
        tally.moved(Direction::Outbound, Path::Copy, 3);
        let snap = &activity.snapshot().pools[0];
        assert_eq!((snap.bytes_in, snap.bytes_out), (10, 3));
        assert_eq!(activity.relay_totals().splice_bytes.load(Relaxed), 10);
        assert_eq!(activity.relay_totals().copy_bytes.load(Relaxed), 3);
    }

    #[test]
    fn a_drain_mark_is_reported_until_cleared() {
        let activity = Activity::default();
        let a = activity.pool(&pool("a"));
        a.set_draining(Some("2026-11-26T09:00:00Z"));
        let snap = activity.snapshot();
        assert_eq!(
            snap.pools[0].draining.as_deref(),
            Some("2026-11-26T09:00:00Z")
        );
        let json = serde_json::to_string(&snap).unwrap();
        assert!(
            json.contains(r#""draining":"2026-11-26T09:00:00Z""#),
            "{json}"
        );
        a.set_draining(None);
        let json = serde_json::to_string(&activity.snapshot()).unwrap();
        assert!(!json.contains("draining"), "{json}");
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back.pools[0].draining, None);
    }

    #[test]
    fn pools_that_leave_are_dropped() {
        let activity = Activity::default();
        activity.pool(&pool("a"));
        activity.pool(&pool("b"));
        activity.retain(|id| id.name() == "b");
        let names: Vec<_> = activity
            .snapshot()
            .pools
            .into_iter()
            .map(|p| p.pool)
            .collect();
        assert_eq!(names, ["local/b"]);
    }

    #[test]
    fn updates_from_many_threads_are_not_lost() {
        let activity = Arc::new(Activity::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let activity = activity.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        let guard = activity.pool(&pool("a")).open();
                        activity.tally(activity.pool(&pool("a"))).moved(
                            Direction::Inbound,
                            Path::Copy,
                            1,
                        );
                        drop(guard);
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let snap = &activity.snapshot().pools[0];
        assert_eq!(
            (snap.open, snap.accepted, snap.bytes_in),
            (0, 40_000, 40_000)
        );
    }
}
