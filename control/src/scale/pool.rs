//! One pool's state, under one lock: its phase, its healthy replicas with their connection
//! counts, and the marks idle detection needs. Every check-then-act on a pool (route a
//! connection, confirm a drain, drop a crashed replica) happens while holding that lock, so a
//! new connection and a scale-down can never both win. The lock is never held across an await.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use proxy::names::PoolId;
use proxy::route::{BackendHealth, Candidate, RouteError};
use tokio::sync::watch;
use tokio::time::Instant;

use super::driver::Started;
use super::metrics::Metrics;
use super::policy::Policy;

/// Where a pool is in its life, as shown in metrics and `/pools`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// No replica: the next authenticated connection wakes the pool.
    Sleeping,
    /// A replica is starting; connections are held until it answers.
    Waking,
    /// Healthy replicas serve connections.
    Ready,
    /// Idle: about to stop its replicas, unless a connection arrives first.
    Draining,
}

impl Phase {
    pub const ALL: [Phase; 4] = [Self::Sleeping, Self::Waking, Self::Ready, Self::Draining];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sleeping => "sleeping",
            Self::Waking => "waking",
            Self::Ready => "ready",
            Self::Draining => "draining",
        }
    }
}

/// The phase with what each state needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Sleeping,
    Waking,
    Ready,
    /// `stopping` once the drain is confirmed and replicas are being stopped: from then on
    /// connections are held, and the pool wakes again once the stop is done.
    Draining {
        since: Instant,
        stopping: bool,
    },
}

/// A healthy replica and the connections the gateway has open to it.
#[derive(Debug, Clone)]
pub(crate) struct Replica {
    pub started: Started,
    pub load: Arc<AtomicUsize>,
    /// Set while it is being retired (too many replicas): no new connections go to it.
    pub retiring_since: Option<Instant>,
    /// How the gateway's connections to it ended lately.
    pub health: Arc<BackendHealth>,
    /// Set once its connections failed `Settings::unhealthy_after` times in a row: no new
    /// connection goes to it, a replacement starts, and it stops once it carries none.
    pub unhealthy: bool,
}

impl Replica {
    pub fn new(started: Started) -> Self {
        Self {
            started,
            load: Arc::default(),
            retiring_since: None,
            health: Arc::default(),
            unhealthy: false,
        }
    }
}

/// Mutable state of one pool; only touched through [`Pool::lock`].
#[derive(Debug)]
pub(crate) struct PoolState {
    pub state: State,
    pub replicas: Vec<Replica>,
    /// Replicas being started to add capacity (not wakes).
    pub starting: usize,
    /// Wake attempts so far; a failure is recorded with its attempt number.
    pub attempt: u64,
    pub failure: Option<(u64, RouteError)>,
    pub woke_at: Option<Instant>,
    /// Since when no connection was seen open or held (None while busy).
    pub idle_since: Option<Instant>,
    /// When a connection was last routed (or held): a connection that came and went between
    /// two ticks still resets the idle clock.
    pub last_routed: Option<Instant>,
}

/// One pool: its policy, its state, and the broadcast that tells held connections to look
/// again (a replica became ready, a wake failed, a stop finished).
#[derive(Debug)]
pub(crate) struct Pool {
    pub id: PoolId,
    pub policy: Policy,
    state: Mutex<PoolState>,
    changed: watch::Sender<u64>,
    /// Connections held right now (bounded by `policy.max_held`).
    pub held: AtomicUsize,
    pub metrics: Metrics,
}

impl Pool {
    pub fn new(id: PoolId, policy: Policy, metrics: Metrics) -> Self {
        metrics.init_pool(&id, Phase::Sleeping);
        Self {
            id,
            policy,
            state: Mutex::new(PoolState {
                state: State::Sleeping,
                replicas: Vec::new(),
                starting: 0,
                attempt: 0,
                failure: None,
                woke_at: None,
                idle_since: None,
                last_routed: None,
            }),
            changed: watch::channel(0).0,
            held: AtomicUsize::new(0),
            metrics,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic while holding the lock leaves consistent-enough state (every change is
        // a few assignments); keep serving rather than poisoning every later connection.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver that sees every change made after this call.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Moves to `state`, updates the metrics and wakes everyone waiting. Call with the lock.
    pub fn set(&self, s: &mut PoolState, state: State) {
        s.state = state;
        self.metrics.state(&self.id, s.phase());
        self.metrics.replicas(&self.id, s.replicas.len());
        self.notify();
    }

    pub fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub fn held_count(&self) -> usize {
        self.held.load(Relaxed)
    }
}

impl PoolState {
    pub fn phase(&self) -> Phase {
        match self.state {
            State::Sleeping => Phase::Sleeping,
            State::Waking => Phase::Waking,
            State::Ready => Phase::Ready,
            State::Draining { .. } => Phase::Draining,
        }
    }

    /// Connections the gateway has open to this pool's replicas (engaged backends).
    pub fn load(&self) -> usize {
        self.replicas.iter().map(|r| r.load.load(Relaxed)).sum()
    }

    /// Replicas that may take connections: not marked unhealthy.
    pub fn serving(&self) -> impl Iterator<Item = &Replica> {
        self.replicas.iter().filter(|r| !r.unhealthy)
    }

    /// The replicas to offer a connection, least loaded first: the serving ones not being
    /// retired, or all serving ones if every one is.
    pub fn candidates(&self) -> Vec<Candidate> {
        let active: Vec<&Replica> = self
            .serving()
            .filter(|r| r.retiring_since.is_none())
            .collect();
        let mut list: Vec<&Replica> = if active.is_empty() {
            self.serving().collect()
        } else {
            active
        };
        list.sort_by_key(|r| r.load.load(Relaxed));
        list.iter()
            .map(|r| {
                let addr = proxy::names::BackendAddr(r.started.addr);
                Candidate::new(addr, r.started.name.as_str().into(), r.load.clone())
                    .with_health(r.health.clone())
            })
            .collect()
    }
}
