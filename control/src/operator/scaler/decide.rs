//! What to do with one pool this round: a pure function of what the gateways reported, the
//! workload's replicas, the pool's policy and drain mark, and what this scaler remembers of
//! the pool ([`Track`]). Times are Unix milliseconds passed in, so tests control the clock.
//!
//! The rules, in order:
//! - **Draining** (the pool carries a mark): any busy replica, an incomplete picture, or a
//!   floor that rose to the current replicas cancels the drain at once. Otherwise, once every
//!   replica echoes the exact mark with nothing open or held, continuously for the settle
//!   time, the drain is confirmed: scale to the floor.
//! - **Below the floor** (minReplicas or a warm window): scale up to it, even from zero.
//! - **Busy**: scale up by load, `ceil(open / targetConnectionsPerReplica)` within
//!   `[floor, maxReplicas]`, only while awake (gateways wake sleeping pools themselves).
//! - **Idle**: above the floor, seen idle by this scaler for `idleAfter`, no activity on any
//!   gateway for `idleAfter`, and up for `minUpAfterWake`: start a drain.

use std::time::Duration;

use super::reports::Seen;

/// One pool's scaling parameters, already resolved for this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `max(minReplicas, open warm windows)`; 0 for Job pools.
    pub floor: i32,
    pub max: i32,
    pub idle_after: Duration,
    pub min_up_after_wake: Duration,
    pub target_per_replica: u32,
    /// Deployments and StatefulSets scale by load; Job pools only wake and sleep.
    pub scales_by_load: bool,
    /// How long every gateway must acknowledge a drain with nothing open or held.
    pub settle: Duration,
}

/// What one round sees of one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub now_ms: u64,
    /// The pool across every gateway, or None when some gateway's report is missing or stale.
    pub seen: Option<Seen>,
    /// Replicas the workload asks for (Job pools: their wake Jobs).
    pub replicas: i32,
    /// Replicas the workload still runs (pods not yet terminating; Job pools: their Jobs).
    pub running: i32,
    /// The drain mark in effect (see [`Track::mark`]).
    pub mark: Option<String>,
}

/// What this scaler remembers of a pool between rounds (lost on restart, which only ever
/// delays a scale-down).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Track {
    /// Since when every gateway has reported the pool not busy (this scaler's own view).
    pub idle_since_ms: Option<u64>,
    /// Since when the pool has been up: when this scaler saw its replicas leave zero, else
    /// the pool's Ready condition's transition time, else when this scaler first saw it.
    pub up_since_ms: Option<u64>,
    /// Since when every gateway has acknowledged the current mark with nothing open or held.
    pub acked_since_ms: Option<u64>,
    /// Replicas seen last round.
    pub replicas: Option<i32>,
    /// A mark this scaler wrote that the pool cache does not show yet.
    pub set_mark: Option<String>,
    /// A mark this scaler cleared that the pool cache still shows.
    pub cleared_mark: Option<String>,
    /// The drain was confirmed and the workload scaled down: the mark stays until its pods
    /// are gone, so no gateway routes a held connection to a pod about to be deleted.
    pub stopping: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Nothing,
    StartDrain,
    CancelDrain(Cancel),
    ConfirmDrain {
        to: i32,
    },
    /// The scale-down of a confirmed drain is done: clear the mark (gateways then wake the
    /// pool for any connection they held meanwhile).
    Stopped,
    ScaleUp {
        to: i32,
        reason: UpReason,
    },
}

/// Why a drain was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// A gateway reported an open or held connection.
    Busy,
    /// Some gateway's report is missing or stale: the backend stays, held clients proceed.
    PartialReports,
    /// The floor rose (minReplicas or a warm window) to what is running.
    Floor,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpReason {
    /// minReplicas or an open warm window.
    Floor,
    Load,
}

impl UpReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Floor => "floor",
            Self::Load => "load",
        }
    }
}

impl Cancel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Busy => "connection during drain",
            Self::PartialReports => "a gateway's activity report is missing or stale",
            Self::Floor => "the replica floor rose",
        }
    }
}

impl Track {
    /// The mark in effect given what the pool cache shows: a mark just written counts before
    /// the cache shows it, a mark just cleared stops counting before the cache drops it.
    pub fn mark(&mut self, cached: Option<&str>) -> Option<String> {
        if cached.is_some() && cached == self.set_mark.as_deref() {
            self.set_mark = None;
        }
        if cached.is_none() || cached != self.cleared_mark.as_deref() {
            self.cleared_mark = None;
        }
        match cached {
            Some(m) if self.cleared_mark.as_deref() == Some(m) => self.set_mark.clone(),
            Some(m) => Some(m.to_owned()),
            None => self.set_mark.clone(),
        }
    }

    /// Notes the replicas seen this round. `ready_since_ms` is the pool's Ready condition's
    /// transition time when it is True.
    pub fn observe_replicas(&mut self, replicas: i32, ready_since_ms: Option<u64>, now_ms: u64) {
        match (self.replicas, replicas > 0) {
            (_, false) => self.up_since_ms = None,
            (Some(0), true) => self.up_since_ms = Some(now_ms),
            (None, true) => self.up_since_ms = Some(ready_since_ms.unwrap_or(now_ms).min(now_ms)),
            (Some(_), true) => {
                self.up_since_ms.get_or_insert(now_ms);
            }
        }
        self.replicas = Some(replicas);
    }
}

/// This round's decision for one pool; updates the timers in `track`.
pub fn decide(policy: &Policy, input: &Input, track: &mut Track) -> Decision {
    let now = input.now_ms;
    if track.stopping && input.mark.is_some() {
        // Held connections wait (they show as busy, but there is nothing left to cancel).
        return if input.replicas <= policy.floor && input.running <= policy.floor {
            track.stopping = false;
            Decision::Stopped
        } else {
            Decision::Nothing
        };
    }
    let Some(seen) = &input.seen else {
        track.idle_since_ms = None;
        track.acked_since_ms = None;
        if input.mark.is_some() {
            return Decision::CancelDrain(Cancel::PartialReports);
        }
        return below_floor(policy, input);
    };
    if seen.busy() {
        track.idle_since_ms = None;
    } else {
        track.idle_since_ms.get_or_insert(now);
    }
    if let Some(mark) = &input.mark {
        return draining(policy, input, seen, mark, track);
    }
    track.stopping = false;
    track.acked_since_ms = None;
    match below_floor(policy, input) {
        Decision::Nothing => {}
        up => return up,
    }
    if seen.busy() {
        return by_load(policy, input, seen);
    }
    if idle_long_enough(policy, input, seen, track) {
        return Decision::StartDrain;
    }
    Decision::Nothing
}

fn draining(
    policy: &Policy,
    input: &Input,
    seen: &Seen,
    mark: &str,
    track: &mut Track,
) -> Decision {
    if seen.busy() {
        track.acked_since_ms = None;
        return Decision::CancelDrain(Cancel::Busy);
    }
    if policy.floor >= input.replicas && input.replicas > 0 {
        track.acked_since_ms = None;
        return Decision::CancelDrain(Cancel::Floor);
    }
    if !seen.acked_by_all(mark) {
        track.acked_since_ms = None;
        return Decision::Nothing;
    }
    let since = *track.acked_since_ms.get_or_insert(input.now_ms);
    if elapsed(since, input.now_ms) >= policy.settle {
        // A new idle period must pass before another drain, so a cache still showing the
        // replicas just removed cannot start one.
        track.acked_since_ms = None;
        track.idle_since_ms = None;
        track.stopping = true;
        return Decision::ConfirmDrain { to: policy.floor };
    }
    Decision::Nothing
}

fn below_floor(policy: &Policy, input: &Input) -> Decision {
    if policy.floor > input.replicas {
        Decision::ScaleUp {
            to: policy.floor,
            reason: UpReason::Floor,
        }
    } else {
        Decision::Nothing
    }
}

fn by_load(policy: &Policy, input: &Input, seen: &Seen) -> Decision {
    if !policy.scales_by_load || input.replicas == 0 {
        return Decision::Nothing;
    }
    let per = u64::from(policy.target_per_replica.max(1));
    let wanted = i32::try_from(seen.open.div_ceil(per)).unwrap_or(i32::MAX);
    let desired = wanted.min(policy.max).max(policy.floor);
    if desired > input.replicas {
        Decision::ScaleUp {
            to: desired,
            reason: UpReason::Load,
        }
    } else {
        Decision::Nothing
    }
}

fn idle_long_enough(policy: &Policy, input: &Input, seen: &Seen, track: &Track) -> bool {
    let now = input.now_ms;
    let seen_idle = track
        .idle_since_ms
        .is_some_and(|t| elapsed(t, now) >= policy.idle_after);
    let quiet = elapsed(seen.last_activity_ms, now) >= policy.idle_after;
    let up_long_enough = track
        .up_since_ms
        .is_none_or(|t| elapsed(t, now) >= policy.min_up_after_wake);
    input.replicas > policy.floor && seen_idle && quiet && up_long_enough
}

fn elapsed(since_ms: u64, now_ms: u64) -> Duration {
    Duration::from_millis(now_ms.saturating_sub(since_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000;
    const T0: u64 = 1_700_000_000_000;

    fn policy() -> Policy {
        Policy {
            floor: 0,
            max: 4,
            idle_after: Duration::from_secs(60),
            min_up_after_wake: Duration::from_secs(30),
            target_per_replica: 10,
            scales_by_load: true,
            settle: Duration::from_secs(2),
        }
    }

    fn seen(open: u64, held: u64, last_activity_ms: u64, marks: &[Option<&str>]) -> Seen {
        Seen {
            open,
            held,
            last_activity_ms,
            marks: marks.iter().map(|m| m.map(Into::into)).collect(),
        }
    }

    fn quiet(replicas: usize) -> Seen {
        seen(0, 0, T0, &vec![None; replicas])
    }

    fn acked(mark: &str, replicas: usize) -> Seen {
        seen(0, 0, T0, &vec![Some(mark); replicas])
    }

    fn input(now_ms: u64, seen: Option<Seen>, replicas: i32, mark: Option<&str>) -> Input {
        Input {
            now_ms,
            seen,
            replicas,
            running: replicas,
            mark: mark.map(Into::into),
        }
    }

    #[test]
    fn after_the_scale_down_the_mark_stays_until_the_pods_are_gone() {
        let p = policy();
        let mut track = up();
        let m = "2024-05-06T10:00:00Z";
        let got = rounds(&p, &mut track, T0, T0 + 5 * S, |t| {
            input(t, Some(acked(m, 2)), 1, Some(m))
        });
        assert!(matches!(
            got.first(),
            Some((_, Decision::ConfirmDrain { to: 0 }))
        ));
        // Scaled to zero, the pod still terminating; a connection held meanwhile does not
        // cancel anything: there is nothing left to cancel, it waits for the wake.
        let stopping = Input {
            running: 1,
            ..input(
                T0 + 6 * S,
                Some(seen(0, 1, T0, &[Some(m), Some(m)])),
                0,
                Some(m),
            )
        };
        assert_eq!(decide(&p, &stopping, &mut track), Decision::Nothing);
        let gone = input(
            T0 + 7 * S,
            Some(seen(0, 1, T0, &[Some(m), Some(m)])),
            0,
            Some(m),
        );
        assert_eq!(decide(&p, &gone, &mut track), Decision::Stopped);
        assert!(!track.stopping);
    }

    /// A track for a pool up since T0.
    fn up() -> Track {
        let mut track = Track::default();
        track.observe_replicas(1, Some(T0), T0);
        track
    }

    /// Runs rounds every second from `from` to `to` (inclusive) with the same view.
    fn rounds(
        p: &Policy,
        track: &mut Track,
        from: u64,
        to: u64,
        i: impl Fn(u64) -> Input,
    ) -> Vec<(u64, Decision)> {
        (from..=to)
            .step_by(S as usize)
            .map(|t| (t, decide(p, &i(t), track)))
            .filter(|(_, d)| *d != Decision::Nothing)
            .collect()
    }

    #[test]
    fn an_idle_pool_drains_after_idle_after_seen_quiet() {
        let mut track = up();
        let got = rounds(&policy(), &mut track, T0, T0 + 90 * S, |t| {
            input(t, Some(quiet(2)), 1, None)
        });
        assert_eq!(got.first(), Some(&(T0 + 60 * S, Decision::StartDrain)));
    }

    #[test]
    fn recent_activity_on_any_gateway_delays_the_drain() {
        let mut track = up();
        let recent = seen(0, 0, T0 + 50 * S, &[None, None]);
        let got = rounds(&policy(), &mut track, T0, T0 + 200 * S, |t| {
            input(t, Some(recent.clone()), 1, None)
        });
        assert_eq!(got.first(), Some(&(T0 + 110 * S, Decision::StartDrain)));
    }

    #[test]
    fn the_scaler_must_see_the_pool_idle_itself_for_idle_after() {
        // A restarted scaler (fresh track) waits a full idleAfter even when the gateways
        // say the last activity was long ago.
        let mut track = up();
        let old = seen(0, 0, T0 - 3_600 * S, &[None]);
        let start = T0 + 3_600 * S;
        let got = rounds(&policy(), &mut track, start, start + 70 * S, |t| {
            input(t, Some(old.clone()), 1, None)
        });
        assert_eq!(got.first(), Some(&(start + 60 * S, Decision::StartDrain)));
    }

    #[test]
    fn a_busy_report_restarts_the_idle_clock() {
        let p = policy();
        let mut track = up();
        assert_eq!(
            decide(&p, &input(T0, Some(quiet(1)), 1, None), &mut track),
            Decision::Nothing
        );
        let held = seen(0, 1, T0, &[None]);
        assert_eq!(
            decide(&p, &input(T0 + 50 * S, Some(held), 1, None), &mut track),
            Decision::Nothing
        );
        let got = rounds(&p, &mut track, T0 + 51 * S, T0 + 200 * S, |t| {
            input(t, Some(quiet(1)), 1, None)
        });
        assert_eq!(got.first(), Some(&(T0 + 111 * S, Decision::StartDrain)));
    }

    #[test]
    fn anti_flap_keeps_a_woken_pool_up_for_min_up_after_wake() {
        let mut p = policy();
        p.idle_after = Duration::from_secs(5);
        let mut track = Track::default();
        track.observe_replicas(0, None, T0);
        track.observe_replicas(1, None, T0 + 10 * S);
        let got = rounds(&p, &mut track, T0 + 10 * S, T0 + 60 * S, |t| {
            input(t, Some(quiet(1)), 1, None)
        });
        assert_eq!(got.first(), Some(&(T0 + 40 * S, Decision::StartDrain)));
        // A scaler that starts with the pool already up trusts the Ready condition's time.
        let mut fresh = Track::default();
        fresh.observe_replicas(1, Some(T0 + 20 * S), T0 + 21 * S);
        assert_eq!(fresh.up_since_ms, Some(T0 + 20 * S));
        let mut unknown = Track::default();
        unknown.observe_replicas(1, None, T0 + 21 * S);
        assert_eq!(unknown.up_since_ms, Some(T0 + 21 * S));
    }

    #[test]
    fn missing_or_stale_reports_never_start_a_drain() {
        let mut track = up();
        let got = rounds(&policy(), &mut track, T0, T0 + 600 * S, |t| {
            input(t, None, 1, None)
        });
        assert_eq!(got, []);
        assert_eq!(track.idle_since_ms, None);
    }

    #[test]
    fn a_pool_at_its_floor_does_not_drain() {
        let mut p = policy();
        p.floor = 1;
        let mut track = up();
        let got = rounds(&p, &mut track, T0, T0 + 600 * S, |t| {
            input(t, Some(quiet(1)), 1, None)
        });
        assert_eq!(got, []);
        // Above the floor it drains (to the floor).
        let got = rounds(&p, &mut track, T0, T0 + 600 * S, |t| {
            input(t, Some(quiet(1)), 3, None)
        });
        assert_eq!(got.first().map(|g| &g.1), Some(&Decision::StartDrain));
    }

    #[test]
    fn the_drain_is_confirmed_only_after_every_gateway_acks_the_mark_for_the_settle_time() {
        let p = policy();
        let mut track = up();
        let m = "2024-05-06T10:00:00Z";
        let drain = |t, s| decide(&p, &input(t, Some(s), 1, Some(m)), &mut track.clone());
        // One gateway has not seen the mark yet, or echoes another one.
        assert_eq!(
            drain(T0, seen(0, 0, T0, &[Some(m), None])),
            Decision::Nothing
        );
        let mut t = Track::default();
        for s in [
            seen(0, 0, T0, &[Some(m), Some("2024-05-06T09:00:00Z")]),
            seen(0, 0, T0, &[Some(m), None]),
        ] {
            for i in 0..10 {
                assert_eq!(
                    decide(&p, &input(T0 + i * S, Some(s.clone()), 1, Some(m)), &mut t),
                    Decision::Nothing
                );
            }
        }
        // Every gateway acks: confirmed once the acks have held for the settle time.
        let got = rounds(&p, &mut track, T0, T0 + 5 * S, |t| {
            input(t, Some(acked(m, 2)), 1, Some(m))
        });
        assert_eq!(
            got.first(),
            Some(&(T0 + 2 * S, Decision::ConfirmDrain { to: 0 }))
        );
        // The replicas the cache still shows right after do not start another drain.
        let after = T0 + 6 * S;
        assert_eq!(
            decide(&p, &input(after, Some(quiet(2)), 1, None), &mut track),
            Decision::Nothing
        );
        assert_eq!(track.idle_since_ms, Some(after));
    }

    #[test]
    fn a_gap_in_the_acks_restarts_the_settle_time() {
        let p = policy();
        let m = "mark";
        let mut track = up();
        assert_eq!(
            decide(&p, &input(T0, Some(acked(m, 2)), 1, Some(m)), &mut track),
            Decision::Nothing
        );
        let unlisted = seen(0, 0, T0, &[Some(m), None]);
        assert_eq!(
            decide(&p, &input(T0 + S, Some(unlisted), 1, Some(m)), &mut track),
            Decision::Nothing
        );
        assert_eq!(
            decide(
                &p,
                &input(T0 + 2 * S, Some(acked(m, 2)), 1, Some(m)),
                &mut track
            ),
            Decision::Nothing
        );
        assert_eq!(
            decide(
                &p,
                &input(T0 + 3 * S, Some(acked(m, 2)), 1, Some(m)),
                &mut track
            ),
            Decision::Nothing
        );
        assert_eq!(
            decide(
                &p,
                &input(T0 + 4 * S, Some(acked(m, 2)), 1, Some(m)),
                &mut track
            ),
            Decision::ConfirmDrain { to: 0 }
        );
    }

    #[test]
    fn a_drain_scales_to_the_floor() {
        let mut p = policy();
        p.floor = 1;
        let mut track = up();
        let got = rounds(&p, &mut track, T0, T0 + 3 * S, |t| {
            input(t, Some(acked("m", 1)), 3, Some("m"))
        });
        assert_eq!(
            got.first().map(|g| &g.1),
            Some(&Decision::ConfirmDrain { to: 1 })
        );
    }

    #[test]
    fn a_held_or_open_connection_during_a_drain_cancels_it() {
        let p = policy();
        let mut track = up();
        let held = seen(0, 1, T0, &[Some("m"), Some("m")]);
        assert_eq!(
            decide(&p, &input(T0, Some(held), 1, Some("m")), &mut track),
            Decision::CancelDrain(Cancel::Busy)
        );
        let open = seen(1, 0, T0, &[Some("m"), None]);
        assert_eq!(
            decide(&p, &input(T0, Some(open), 1, Some("m")), &mut track),
            Decision::CancelDrain(Cancel::Busy)
        );
        assert_eq!(track.idle_since_ms, None);
        // Even after acks began to settle.
        assert_eq!(
            decide(
                &p,
                &input(T0, Some(acked("m", 2)), 1, Some("m")),
                &mut track
            ),
            Decision::Nothing
        );
        let held = seen(0, 2, T0, &[Some("m"), Some("m")]);
        assert_eq!(
            decide(&p, &input(T0 + 3 * S, Some(held), 1, Some("m")), &mut track),
            Decision::CancelDrain(Cancel::Busy)
        );
        assert_eq!(track.acked_since_ms, None);
    }

    #[test]
    fn partial_reports_during_a_drain_cancel_it() {
        let mut track = up();
        assert_eq!(
            decide(&policy(), &input(T0, None, 1, Some("m")), &mut track),
            Decision::CancelDrain(Cancel::PartialReports)
        );
    }

    #[test]
    fn a_floor_rising_during_a_drain_cancels_it() {
        let mut p = policy();
        p.floor = 1;
        let mut track = up();
        assert_eq!(
            decide(
                &p,
                &input(T0, Some(acked("m", 1)), 1, Some("m")),
                &mut track
            ),
            Decision::CancelDrain(Cancel::Floor)
        );
    }

    #[test]
    fn the_floor_is_kept_even_from_zero_and_with_partial_reports() {
        let mut p = policy();
        p.floor = 2;
        let up_to_floor = Decision::ScaleUp {
            to: 2,
            reason: UpReason::Floor,
        };
        let mut track = Track::default();
        assert_eq!(
            decide(&p, &input(T0, Some(quiet(1)), 0, None), &mut track),
            up_to_floor
        );
        assert_eq!(
            decide(&p, &input(T0, None, 1, None), &mut track),
            up_to_floor
        );
        assert_eq!(
            decide(&p, &input(T0, Some(quiet(1)), 2, None), &mut track),
            Decision::Nothing
        );
    }

    #[test]
    fn load_scales_up_within_floor_and_max_but_never_wakes() {
        let p = policy();
        let mut track = up();
        let load = |open| seen(open, 0, T0, &[None]);
        let up_to = |to| Decision::ScaleUp {
            to,
            reason: UpReason::Load,
        };
        assert_eq!(
            decide(&p, &input(T0, Some(load(25)), 1, None), &mut track),
            up_to(3)
        );
        assert_eq!(
            decide(&p, &input(T0, Some(load(1_000)), 1, None), &mut track),
            up_to(4)
        );
        assert_eq!(
            decide(&p, &input(T0, Some(load(10)), 1, None), &mut track),
            Decision::Nothing
        );
        assert_eq!(
            decide(&p, &input(T0, Some(load(5)), 3, None), &mut track),
            Decision::Nothing
        );
        // Asleep: the gateways wake it; the leader does not.
        assert_eq!(
            decide(&p, &input(T0, Some(load(50)), 0, None), &mut track),
            Decision::Nothing
        );
        let jobs = Policy {
            scales_by_load: false,
            ..policy()
        };
        assert_eq!(
            decide(&jobs, &input(T0, Some(load(50)), 1, None), &mut track),
            Decision::Nothing
        );
    }

    #[test]
    fn the_mark_in_effect_bridges_the_cache_lag() {
        let mut track = Track {
            set_mark: Some("m1".into()),
            ..Track::default()
        };
        assert_eq!(
            track.mark(None),
            Some("m1".into()),
            "written, not cached yet"
        );
        assert_eq!(track.mark(Some("m1")), Some("m1".into()));
        assert_eq!(track.set_mark, None);
        track.cleared_mark = Some("m1".into());
        assert_eq!(track.mark(Some("m1")), None, "cleared, still cached");
        assert_eq!(track.mark(None), None);
        assert_eq!(track.cleared_mark, None);
        // A new mark written while the cache still shows the cleared one counts.
        track.cleared_mark = Some("m1".into());
        track.set_mark = Some("m2".into());
        assert_eq!(track.mark(Some("m1")), Some("m2".into()));
        assert_eq!(track.mark(Some("m2")), Some("m2".into()));
        assert_eq!(
            (track.set_mark.as_deref(), track.cleared_mark.as_deref()),
            (None, None)
        );
        // A mark set by someone else (a previous leader) counts.
        assert_eq!(Track::default().mark(Some("m0")), Some("m0".into()));
    }
}
