//! Scaling parameters: per pool ([`Policy`]) and for the whole scaler ([`Settings`]).

use std::time::Duration;

/// How one pool scales.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Replicas kept even when idle; 0 lets the pool sleep.
    pub min_replicas: usize,
    pub max_replicas: usize,
    /// A pool with no authenticated connection open or held for this long goes to sleep.
    pub idle_after: Duration,
    /// Anti-flap: a pool that woke stays up at least this long.
    pub min_up_after_wake: Duration,
    /// How long a connection is held waiting for a wake, and how long a replica may take to
    /// become healthy.
    pub wake_timeout: Duration,
    /// Connections held at once for this pool; more are refused.
    pub max_held: usize,
    /// Above this many connections per replica, another replica is started (up to the max).
    pub target_connections_per_replica: usize,
}

/// Scaler-wide settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// How often activity is read for idle detection and scale-down.
    pub tick: Duration,
    /// Time between marking a pool (or replica) draining and confirming it has no
    /// connection: a connection routed just before the mark has engaged its backend by then.
    pub drain_settle: Duration,
    /// Readiness probes while a replica starts, at most this far apart (they start at a
    /// few milliseconds and back off to it).
    pub probe_interval: Duration,
    /// Connections held at once across all pools.
    pub max_held_total: usize,
    /// A replica whose connections fail this many times in a row (refused, reset, closed
    /// unanswered) is replaced, though its health check passes.
    pub unhealthy_after: u32,
}

pub const DEFAULT_IDLE_AFTER: Duration = Duration::from_secs(10 * 60);
pub const DEFAULT_MIN_UP_AFTER_WAKE: Duration = Duration::from_secs(60);
/// BuildKit clients give up about 20 s after connecting without the server's HTTP/2
/// preface: a held connection nobody answers is refused before then, and the client is told
/// why instead of timing out on its own.
pub const DEFAULT_WAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// With the preface answered while held, the client waits as long as the wake takes: time for
/// a new node and an image pull.
pub const DEFAULT_WAKE_TIMEOUT_ANSWERED: Duration = Duration::from_secs(5 * 60);
pub const DEFAULT_MAX_HELD: usize = 1_000;
pub const DEFAULT_TARGET_CONNECTIONS: usize = 100;
pub const DEFAULT_MAX_HELD_TOTAL: usize = 10_000;
/// Few enough that a broken replica costs a handful of failed builds, enough that a few
/// clients hanging up early do not replace a good one.
pub const DEFAULT_UNHEALTHY_AFTER: u32 = 5;

impl Default for Policy {
    fn default() -> Self {
        Self {
            min_replicas: 0,
            max_replicas: 1,
            idle_after: DEFAULT_IDLE_AFTER,
            min_up_after_wake: DEFAULT_MIN_UP_AFTER_WAKE,
            wake_timeout: DEFAULT_WAKE_TIMEOUT,
            max_held: DEFAULT_MAX_HELD,
            target_connections_per_replica: DEFAULT_TARGET_CONNECTIONS,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            tick: Duration::from_millis(100),
            drain_settle: Duration::from_millis(250),
            probe_interval: Duration::from_millis(25),
            max_held_total: DEFAULT_MAX_HELD_TOTAL,
            unhealthy_after: DEFAULT_UNHEALTHY_AFTER,
        }
    }
}
