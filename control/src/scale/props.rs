//! Property tests of the local scaler: the real [`Scaler`] on tokio's paused clock, driven by
//! random sequences of connections (held while the pool wakes, then open for a while, some
//! dropped by their replica so that it is replaced), clock steps and replica crashes, against a driver whose replicas start slowly, never become
//! healthy, fail to start or take time to stop. Whatever the sequence:
//! - no replica is stopped with a connection open on it, and none is offered to a connection
//!   once its stop has begun;
//! - a pool's replicas are stopped for idleness only after `idle_after` with no connection
//!   open or held, and `min_up_after_wake` after the wake;
//! - every connection is answered (a backend or a refusal) by its wake deadline;
//! - once connections stop, the pool sleeps and no replica is left running.
//!
//! Idleness is read every tick, so a connection that opened and closed between two ticks
//! counts from when it was routed: the idle check allows one tick for that.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::registry::Registry;
use proptest::prelude::*;
use proxy::activity::{Activity, PoolActivity};
use proxy::names::PoolId;
use proxy::route::{BoxFuture, Upstream};
use tokio::sync::broadcast;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

use super::*;

/// How the driver's replicas behave in one case.
#[derive(Debug, Clone)]
struct Behaviour {
    /// None: replicas never become healthy, so every wake times out.
    healthy_after: Option<Duration>,
    /// Every `fail_every`-th start fails (0: none does).
    fail_every: usize,
    stop_takes: Duration,
}

#[derive(Debug, Clone)]
enum Op {
    /// `count` connections arrive now; each that gets a backend stays open `open_for`, and
    /// with `fails` its backend drops it (the gateway counts a failure against the replica).
    Connect {
        count: usize,
        open_for: Duration,
        fails: bool,
    },
    Step(Duration),
    /// The oldest healthy replica exits on its own.
    Crash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    Starting(Instant),
    Healthy { since: Instant },
    Stopping,
    Gone,
}

#[derive(Debug)]
struct Replica {
    life: Life,
    /// Set on the first stop of a drain that took this replica: later stops of the same
    /// drain are not checked again (connections may be held, legitimately, in between).
    drained: bool,
    /// `Journal::seq` when its stop began.
    stop_seq: Option<u64>,
}

/// One connection as the gateway saw it.
#[derive(Debug, Clone)]
struct Conn {
    arrived: Instant,
    answered: Option<(Instant, u64, Result<String, &'static str>)>,
    closed: Option<Instant>,
}

/// A driver that keeps every replica's life and checks the invariants when a stop begins.
struct Machine {
    behaviour: Behaviour,
    policy: Policy,
    tick: Duration,
    starts: AtomicUsize,
    seq: AtomicU64,
    replicas: Mutex<BTreeMap<String, Replica>>,
    /// Connections open per replica, kept by the connections.
    open: Mutex<BTreeMap<String, usize>>,
    conns: Mutex<Vec<Conn>>,
    scaler: OnceLock<Scaler>,
    /// When the pool last went from no healthy replica to one: its wake.
    woke: Mutex<Option<Instant>>,
    violations: Mutex<Vec<String>>,
    exits: broadcast::Sender<Exited>,
}

fn pool_id() -> PoolId {
    "a".parse().unwrap()
}

impl Machine {
    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, SeqCst)
    }

    fn violation(&self, what: String) {
        self.violations.lock().unwrap().push(what);
    }

    /// A drain's first stop: nothing was open or held for `idle_after` (less one tick), and
    /// the pool has been up `min_up_after_wake`.
    fn check_drain(&self, name: &str, now: Instant) {
        let mut replicas = self.replicas.lock().unwrap();
        if replicas[name].drained {
            return;
        }
        for r in replicas.values_mut() {
            if let Life::Healthy { .. } = r.life {
                r.drained = true;
            }
        }
        replicas.get_mut(name).unwrap().drained = true;
        drop(replicas);
        let quiet_from = now - self.policy.idle_after + self.tick;
        for c in self.conns.lock().unwrap().iter() {
            let ended = c.closed.or(match &c.answered {
                Some((at, _, Err(_))) => Some(*at),
                _ => None,
            });
            if c.arrived < now && ended.is_none_or(|e| e > quiet_from) {
                self.violation(format!(
                    "{name} stopped for idleness at {:?} but a connection arrived at {:?} and ended at {:?}",
                    now, c.arrived, ended
                ));
            }
        }
        if let Some(woke) = *self.woke.lock().unwrap()
            && now.duration_since(woke) < self.policy.min_up_after_wake
        {
            self.violation(format!(
                "{name} stopped {:?} after the wake",
                now.duration_since(woke)
            ));
        }
    }

    fn crash_oldest(&self) {
        let mut replicas = self.replicas.lock().unwrap();
        let Some((name, r)) = replicas
            .iter_mut()
            .find(|(_, r)| matches!(r.life, Life::Healthy { .. }))
        else {
            return;
        };
        r.life = Life::Gone;
        let _ = self.exits.send(Exited {
            pool: pool_id(),
            name: name.clone(),
            requested: false,
        });
    }

    fn running(&self) -> Vec<String> {
        let replicas = self.replicas.lock().unwrap();
        replicas
            .iter()
            .filter(|(_, r)| r.life != Life::Gone)
            .map(|(n, r)| format!("{n}: {:?}", r.life))
            .collect()
    }
}

impl Driver for Machine {
    fn start<'a>(&'a self, _: &'a PoolId) -> BoxFuture<'a, Result<Started, DriverError>> {
        Box::pin(async move {
            sleep(Duration::from_millis(5)).await;
            let n = self.starts.fetch_add(1, SeqCst);
            let every = self.behaviour.fail_every;
            if every > 0 && n % every == every - 1 {
                return Err(DriverError::new("spawn", "no such program"));
            }
            let name = format!("r{n}");
            let replica = Replica {
                life: Life::Starting(Instant::now()),
                drained: false,
                stop_seq: None,
            };
            self.replicas.lock().unwrap().insert(name.clone(), replica);
            let addr = SocketAddr::from(([127, 0, 0, 1], 20_000 + n as u16));
            Ok(Started { name, addr })
        })
    }

    fn stop<'a>(&'a self, _: &'a PoolId, r: &'a Started) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            let now = Instant::now();
            let open = self.open.lock().unwrap().get(&r.name).copied();
            if let Some(n) = open.filter(|n| *n > 0) {
                self.violation(format!("{} stopped with {n} connections open", r.name));
            }
            let status = &self.scaler.get().unwrap().status()[0];
            if status.state == Phase::Draining && status.replicas.is_empty() {
                self.check_drain(&r.name, now);
            }
            let seq = self.next_seq();
            {
                let mut replicas = self.replicas.lock().unwrap();
                let replica = replicas.get_mut(&r.name).unwrap();
                replica.stop_seq = Some(seq);
                if replica.life != Life::Gone {
                    replica.life = Life::Stopping;
                }
            }
            sleep(self.behaviour.stop_takes).await;
            self.replicas.lock().unwrap().get_mut(&r.name).unwrap().life = Life::Gone;
            Ok(())
        })
    }

    fn probe<'a>(&'a self, _: &'a PoolId, r: &'a Started) -> BoxFuture<'a, Readiness> {
        Box::pin(async move {
            let mut replicas = self.replicas.lock().unwrap();
            let asleep = !replicas
                .values()
                .any(|r| matches!(r.life, Life::Healthy { .. }));
            let replica = replicas.get_mut(&r.name).unwrap();
            match replica.life {
                Life::Starting(at) => match self.behaviour.healthy_after {
                    Some(after) if at.elapsed() >= after => {
                        if asleep {
                            *self.woke.lock().unwrap() = Some(Instant::now());
                        }
                        replica.life = Life::Healthy {
                            since: Instant::now(),
                        };
                        Readiness::Healthy
                    }
                    _ => Readiness::Listening,
                },
                Life::Healthy { .. } => Readiness::Healthy,
                Life::Stopping | Life::Gone => Readiness::Exited,
            }
        })
    }

    fn exits(&self) -> broadcast::Receiver<Exited> {
        self.exits.subscribe()
    }
}

/// One connection: routed as the gateway routes it (held while the pool wakes), open from the
/// moment it has a backend, engaged on the first candidate, closed after `open_for`.
async fn connection(
    machine: Arc<Machine>,
    upstream: Arc<dyn Upstream>,
    activity: Arc<PoolActivity>,
    open_for: Duration,
    fails: bool,
) {
    let admission = proxy::admit::Admission::new(100_000, 1_024);
    let caller = proxy::route::Caller::new(
        std::net::Ipv4Addr::LOCALHOST.into(),
        true,
        pool_id(),
        admission,
    );
    let index = {
        let mut conns = machine.conns.lock().unwrap();
        conns.push(Conn {
            arrived: Instant::now(),
            answered: None,
            closed: None,
        });
        conns.len() - 1
    };
    let routed = upstream.candidates(&activity, &caller).await;
    let seq = machine.next_seq();
    let answer = match routed {
        Ok(candidates) => {
            let open = activity.open();
            let load = candidates[0].engage();
            let name = candidates[0].replica.to_string();
            *machine
                .open
                .lock()
                .unwrap()
                .entry(name.clone())
                .or_default() += 1;
            machine.conns.lock().unwrap()[index].answered =
                Some((Instant::now(), seq, Ok(name.clone())));
            sleep(open_for).await;
            if fails {
                load.failed();
            } else {
                load.served();
            }
            *machine.open.lock().unwrap().get_mut(&name).unwrap() -= 1;
            drop((load, open));
            machine.conns.lock().unwrap()[index].closed = Some(Instant::now());
            return;
        }
        Err(e) => Err(e.reason()),
    };
    machine.conns.lock().unwrap()[index].answered = Some((Instant::now(), seq, answer));
}

/// Runs `ops`, then lets the pool go quiet, and returns every broken invariant.
async fn run(policy: Policy, behaviour: Behaviour, ops: Vec<Op>) -> Vec<String> {
    // Replaced after two failed connections in a row, so sequences reach it often.
    let settings = Settings {
        unhealthy_after: 2,
        ..Settings::default()
    };
    let machine = Arc::new(Machine {
        behaviour: behaviour.clone(),
        policy: policy.clone(),
        tick: settings.tick,
        starts: AtomicUsize::new(0),
        seq: AtomicU64::new(0),
        replicas: Mutex::default(),
        open: Mutex::default(),
        conns: Mutex::default(),
        scaler: OnceLock::new(),
        woke: Mutex::default(),
        violations: Mutex::default(),
        exits: broadcast::channel(64).0,
    });
    let scaler = Scaler::new(
        machine.clone(),
        [(pool_id(), policy.clone())],
        settings.clone(),
        &mut Registry::default(),
    );
    let _ = machine.scaler.set(scaler.clone());
    let activity = Arc::new(Activity::default());
    let stop = CancellationToken::new();
    let (s, a, t) = (scaler.clone(), activity.clone(), stop.clone());
    tokio::spawn(async move { s.run(a, t).await });
    let upstream = scaler.upstream(&pool_id()).unwrap();
    let pool_activity = activity.pool(&pool_id());

    let mut conns = tokio::task::JoinSet::new();
    for op in ops {
        match op {
            Op::Connect {
                count,
                open_for,
                fails,
            } => {
                for _ in 0..count {
                    let c = connection(
                        machine.clone(),
                        upstream.clone(),
                        pool_activity.clone(),
                        open_for,
                        fails,
                    );
                    conns.spawn(c);
                }
            }
            Op::Step(d) => sleep(d).await,
            Op::Crash => machine.crash_oldest(),
        }
    }
    // Every connection is answered by its deadline and then closes.
    conns.join_all().await;
    let quiet_at = Instant::now();
    // Long enough for a wake in flight to time out, the idle time, the anti-flap time, the
    // settle time and every stop.
    let max_stops = policy.max_replicas as u32 + 1;
    sleep(
        policy.wake_timeout
            + policy.idle_after
            + policy.min_up_after_wake
            + settings.drain_settle
            + settings.tick * 3
            + behaviour.stop_takes * max_stops,
    )
    .await;
    stop.cancel();

    let mut broken = std::mem::take(&mut *machine.violations.lock().unwrap());
    let replicas = machine.replicas.lock().unwrap();
    for c in machine.conns.lock().unwrap().iter() {
        let Some((at, seq, answer)) = &c.answered else {
            broken.push(format!("connection from {:?} never answered", c.arrived));
            continue;
        };
        let waited = at.duration_since(c.arrived);
        if waited > policy.wake_timeout {
            broken.push(format!(
                "connection from {:?} answered after {waited:?}, past its deadline",
                c.arrived
            ));
        }
        if let Ok(name) = answer
            && replicas[name]
                .stop_seq
                .is_some_and(|stopped| stopped < *seq)
        {
            broken.push(format!("connection routed to {name} after its stop began"));
        }
    }
    drop(replicas);
    let phase = scaler.status()[0].state;
    let running = machine.running();
    if phase != Phase::Sleeping || !running.is_empty() {
        broken.push(format!(
            "{:?} after quiet since {quiet_at:?}: pool {phase:?}, replicas still running {running:?}",
            Instant::now()
        ));
    }
    broken
}

fn policy() -> impl Strategy<Value = Policy> {
    (
        1..=3usize,
        1..=3usize,
        1..=30u64,
        0..=20u64,
        1..=20u64,
        1..=6usize,
    )
        .prop_map(|(max, target, idle, up, wake, held)| Policy {
            min_replicas: 0,
            max_replicas: max,
            idle_after: Duration::from_secs(idle),
            min_up_after_wake: Duration::from_secs(up),
            wake_timeout: Duration::from_secs(wake),
            max_held: held,
            target_connections_per_replica: target,
        })
}

fn behaviour() -> impl Strategy<Value = Behaviour> {
    let healthy = prop_oneof![
        1 => Just(None),
        6 => (0..5_000u64).prop_map(|ms| Some(Duration::from_millis(ms))),
        2 => (0..25_000u64).prop_map(|ms| Some(Duration::from_millis(ms))),
    ];
    (healthy, 0..4usize, 0..3_000u64).prop_map(|(healthy_after, fail_every, stop)| Behaviour {
        healthy_after,
        fail_every,
        stop_takes: Duration::from_millis(stop),
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1..=4usize, 0..60_000u64, prop::bool::weighted(0.3)).prop_map(
            |(count, ms, fails)| Op::Connect {
                count,
                open_for: Duration::from_millis(ms),
                fails,
            }
        ),
        5 => (0..30_000u64).prop_map(|ms| Op::Step(Duration::from_millis(ms))),
        1 => Just(Op::Crash),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn the_local_scaler_keeps_its_invariants(
        policy in policy(),
        behaviour in behaviour(),
        ops in prop::collection::vec(op(), 1..24),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let broken = runtime.block_on(run(policy, behaviour, ops));
        prop_assert!(broken.is_empty(), "{}", broken.join("\n"));
    }
}
