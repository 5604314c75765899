//! Property tests of [`decide`]: random rounds of gateway reports (missing or stale, busy or
//! quiet, acknowledging the current drain mark, an old one or none), clock steps and a
//! workload that follows the decisions, sometimes a round late. Whatever the sequence:
//! - no drain starts or is confirmed while any report is missing or any connection is open
//!   or held;
//! - a drain starts only after `idleAfter` of continuous quiet (this scaler's view and every
//!   gateway's last activity) and `minUpAfterWake` up;
//! - a scale-down comes only after every gateway acknowledged the exact mark, with nothing
//!   open or held, continuously for the settle time;
//! - scale-ups stay within `[floor, max]` and only go up;
//! - and a pool nobody uses, its gateways answering, reaches its floor.

use std::time::Duration;

use proptest::prelude::*;

use super::decide::{Decision, Input, Policy, Track, decide};
use super::reports::Seen;

/// How one gateway answers about the pool this round.
#[derive(Debug, Clone, Copy)]
enum Ack {
    Nothing,
    Current,
    Old,
}

#[derive(Debug, Clone)]
struct Round {
    /// Milliseconds since the last round.
    step_ms: u64,
    /// None: some gateway's report is missing or stale.
    reports: Option<Reports>,
    /// The workload reaches what was asked only a round later.
    lagging: bool,
}

#[derive(Debug, Clone)]
struct Reports {
    open: u64,
    held: u64,
    /// Activity without a connection still open (one that opened and closed in between).
    touched: bool,
    acks: Vec<Ack>,
}

fn policy() -> impl Strategy<Value = Policy> {
    (
        0..3i32,
        1..5i32,
        1..10u64,
        0..5u64,
        1..10u32,
        any::<bool>(),
        0..3u64,
    )
        .prop_map(|(floor, max, idle, up, target, by_load, settle)| Policy {
            floor,
            max: max.max(floor),
            idle_after: Duration::from_secs(idle),
            min_up_after_wake: Duration::from_secs(up),
            target_per_replica: target,
            scales_by_load: by_load,
            settle: Duration::from_secs(settle),
        })
}

fn ack() -> impl Strategy<Value = Ack> {
    prop_oneof![
        1 => Just(Ack::Nothing),
        6 => Just(Ack::Current),
        1 => Just(Ack::Old),
    ]
}

fn reports() -> impl Strategy<Value = Reports> {
    (
        prop_oneof![6 => Just(0u64), 1 => 1..30u64],
        prop_oneof![8 => Just(0u64), 1 => 1..3u64],
        prop::bool::weighted(0.1),
        prop::collection::vec(ack(), 1..4),
    )
        .prop_map(|(open, held, touched, acks)| Reports {
            open,
            held,
            touched,
            acks,
        })
}

fn round() -> impl Strategy<Value = Round> {
    (
        0..3_000u64,
        prop_oneof![1 => Just(None), 8 => reports().prop_map(Some)],
        prop::bool::weighted(0.3),
    )
        .prop_map(|(step_ms, reports, lagging)| Round {
            step_ms,
            reports,
            lagging,
        })
}

/// The pool's world: what the workload runs, the mark, and every round's input.
struct World {
    policy: Policy,
    now: u64,
    replicas: i32,
    running: i32,
    mark: Option<String>,
    last_activity: u64,
    track: Track,
    history: Vec<Input>,
}

const T0: u64 = 1_700_000_000_000;

impl World {
    fn new(policy: Policy, replicas: i32) -> Self {
        World {
            policy,
            now: T0,
            replicas,
            running: replicas,
            mark: None,
            last_activity: T0,
            track: Track::default(),
            history: Vec::new(),
        }
    }

    /// One round: the reports, the decision, its checks, and the world following it.
    fn round(&mut self, round: &Round) -> Decision {
        self.now += round.step_ms;
        let seen = round.reports.as_ref().map(|r| {
            if r.open + r.held > 0 || r.touched {
                self.last_activity = self.now;
            }
            let marks = r
                .acks
                .iter()
                .map(|a| match a {
                    Ack::Nothing => None,
                    Ack::Current => self.mark.clone(),
                    Ack::Old => Some("an old mark".to_owned()),
                })
                .collect();
            Seen {
                open: r.open,
                held: r.held,
                last_activity_ms: self.last_activity,
                marks,
            }
        });
        self.track.observe_replicas(self.replicas, None, self.now);
        let input = Input {
            now_ms: self.now,
            seen,
            replicas: self.replicas,
            running: self.running,
            mark: self.mark.clone(),
        };
        self.history.push(input.clone());
        let decision = decide(&self.policy, &input, &mut self.track);
        self.check(&input, &decision);
        if !round.lagging {
            self.running = self.replicas;
        }
        match &decision {
            Decision::Nothing => {}
            Decision::StartDrain => self.mark = Some(format!("mark-{}", self.now)),
            Decision::CancelDrain(_) | Decision::Stopped => self.mark = None,
            Decision::ConfirmDrain { to } | Decision::ScaleUp { to, .. } => self.replicas = *to,
        }
        decision
    }

    fn check(&self, input: &Input, decision: &Decision) {
        let p = &self.policy;
        match decision {
            Decision::StartDrain => {
                assert!(input.mark.is_none(), "a second mark");
                assert!(input.replicas > p.floor, "a drain at the floor");
                let quiet = self.quiet_for(|i| i.seen.as_ref().is_some_and(|s| !s.busy()));
                assert!(quiet >= p.idle_after, "drain after {quiet:?} of quiet");
                let seen = input.seen.as_ref().unwrap();
                let since = Duration::from_millis(self.now - seen.last_activity_ms);
                assert!(since >= p.idle_after, "drain {since:?} after activity");
            }
            Decision::ConfirmDrain { to } => {
                let mark = input.mark.clone().expect("a confirmation without a mark");
                let acked = self.quiet_for(|i| {
                    i.mark.as_deref() == Some(&mark)
                        && i.seen
                            .as_ref()
                            .is_some_and(|s| !s.busy() && s.acked_by_all(&mark))
                });
                assert!(acked >= p.settle, "confirmed after {acked:?} of acks");
                assert_eq!(*to, p.floor);
                assert!(*to < input.replicas, "a scale-down that does not go down");
            }
            Decision::ScaleUp { to, .. } => {
                assert!(*to > input.replicas, "a scale-up that does not go up");
                assert!(*to <= p.max.max(p.floor), "above max");
            }
            Decision::Stopped => {
                assert!(input.replicas <= p.floor && input.running <= p.floor);
            }
            Decision::CancelDrain(_) | Decision::Nothing => {}
        }
    }

    /// How long the rounds up to this one have all satisfied `ok`: from the first round of
    /// the unbroken run that ends here (zero when this one does not).
    fn quiet_for(&self, ok: impl Fn(&Input) -> bool) -> Duration {
        let run = self.history.iter().rev().take_while(|i| ok(i)).last();
        run.map_or(Duration::ZERO, |first| {
            Duration::from_millis(self.now - first.now_ms)
        })
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn no_scale_down_without_quiet_and_fresh_acknowledgements(
        policy in policy(),
        replicas in 0..5i32,
        rounds in prop::collection::vec(round(), 1..200),
    ) {
        let mut world = World::new(policy, replicas);
        for round in &rounds {
            world.round(round);
        }
    }

    #[test]
    fn a_pool_nobody_uses_reaches_its_floor(
        policy in policy(),
        replicas in 1..5i32,
        gateways in 1..4usize,
    ) {
        let mut world = World::new(policy.clone(), replicas.max(policy.floor));
        let quiet = Round {
            step_ms: 500,
            reports: Some(Reports {
                open: 0,
                held: 0,
                touched: false,
                acks: vec![Ack::Current; gateways],
            }),
            lagging: false,
        };
        // idleAfter, minUpAfterWake and the settle time, in half-second rounds, and spare.
        let bound = (policy.idle_after + policy.min_up_after_wake + policy.settle).as_millis()
            as usize / 500 + 8;
        for _ in 0..bound {
            world.round(&quiet);
        }
        prop_assert_eq!(world.replicas, policy.floor);
        prop_assert_eq!(world.mark, None, "the drain mark cleared once stopped");
    }

    #[test]
    fn a_connection_during_a_drain_cancels_it(
        policy in policy(),
        open in 1..5u64,
        held in 0..2u64,
    ) {
        let mut world = World::new(policy.clone(), policy.floor + 1);
        let quiet = Round {
            step_ms: 500,
            reports: Some(Reports { open: 0, held: 0, touched: false, acks: vec![Ack::Nothing] }),
            lagging: false,
        };
        while world.mark.is_none() {
            world.round(&quiet);
        }
        let busy = Round {
            reports: Some(Reports { open, held, touched: false, acks: vec![Ack::Current] }),
            ..quiet
        };
        prop_assert!(matches!(world.round(&busy), Decision::CancelDrain(_)));
        prop_assert_eq!(world.replicas, policy.floor + 1);
    }
}
