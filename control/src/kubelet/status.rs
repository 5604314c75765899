//! A pod's status as the kubelet reports it, from what really happened to its processes:
//! each container's state (waiting with a reason, running since, terminated with its exit
//! code), its last termination and restart count, readiness from the probe, the pod's phase
//! by the kubelet's rules, and the conditions with their transition times.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// What one container is doing.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        since: Timestamp,
    },
    Terminated(Ended),
}

/// How a container's process ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Ended {
    /// The exit code, or 128 + the signal that killed it.
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub started: Timestamp,
    pub finished: Timestamp,
}

impl Ended {
    pub fn new(status: Option<ExitStatus>, started: Timestamp) -> Self {
        let signal = status.and_then(|s| s.signal());
        let exit_code = match (status.and_then(|s| s.code()), signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 255,
        };
        Ended {
            exit_code,
            signal,
            started,
            finished: Timestamp::now(),
        }
    }

    pub fn succeeded(&self) -> bool {
        self.exit_code == 0
    }
}

/// One container as the status shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerView {
    pub name: String,
    pub image: String,
    pub state: State,
    pub last: Option<Ended>,
    pub restarts: i32,
    pub ready: bool,
}

/// The whole pod as the status shows it.
#[derive(Debug, Clone)]
pub struct PodView {
    pub ip: Ipv4Addr,
    pub started: Timestamp,
    pub restart_policy: String,
    pub containers: Vec<ContainerView>,
    /// When each condition last changed, to report transitions as they happened.
    transitions: BTreeMap<&'static str, (bool, Timestamp)>,
}

impl PodView {
    pub fn new(ip: Ipv4Addr, restart_policy: Option<&str>, containers: Vec<ContainerView>) -> Self {
        PodView {
            ip,
            started: Timestamp::now(),
            restart_policy: restart_policy.unwrap_or("Always").to_owned(),
            containers,
            transitions: BTreeMap::new(),
        }
    }

    /// The pod's phase by the kubelet's rules.
    pub fn phase(&self) -> &'static str {
        let (mut waiting, mut running, mut stopped, mut succeeded) = (0, 0, 0, 0);
        for c in &self.containers {
            match &c.state {
                State::Running { .. } => running += 1,
                State::Waiting { .. } if c.last.is_some() => stopped += 1,
                State::Waiting { .. } => waiting += 1,
                State::Terminated(ended) => {
                    stopped += 1;
                    succeeded += i32::from(ended.succeeded());
                }
            }
        }
        match () {
            () if waiting > 0 => "Pending",
            () if running > 0 => "Running",
            () if stopped == 0 => "Pending",
            () if self.restart_policy == "Always" => "Running",
            () if stopped == succeeded => "Succeeded",
            () if self.restart_policy == "OnFailure" => "Running",
            () => "Failed",
        }
    }

    /// Whether every container has ended for good (the pod is Succeeded or Failed).
    pub fn finished(&self) -> bool {
        matches!(self.phase(), "Succeeded" | "Failed")
    }

    /// The status to write, with conditions stamped when they changed.
    pub fn render(&mut self) -> PodStatus {
        let finished = self.finished();
        let ready = !finished && self.containers.iter().all(|c| c.ready);
        let conditions = [
            ("PodScheduled", true),
            ("Initialized", true),
            ("ContainersReady", ready),
            ("Ready", ready),
        ];
        let conditions = conditions
            .into_iter()
            .map(|(kind, status)| self.condition(kind, status, finished))
            .collect();
        PodStatus {
            phase: Some(self.phase().into()),
            host_ip: Some("127.0.0.1".into()),
            pod_ip: Some(self.ip.to_string()),
            pod_ips: Some(vec![PodIP {
                ip: self.ip.to_string(),
            }]),
            start_time: Some(Time(self.started)),
            conditions: Some(conditions),
            container_statuses: Some(self.containers.iter().map(container_status).collect()),
            ..PodStatus::default()
        }
    }

    fn condition(&mut self, kind: &'static str, status: bool, finished: bool) -> PodCondition {
        let (_, since) = *self
            .transitions
            .entry(kind)
            .and_modify(|(was, at)| {
                if *was != status {
                    *was = status;
                    *at = Timestamp::now();
                }
            })
            .or_insert((status, Timestamp::now()));
        let reason = (!status && finished && kind.contains("Ready")).then(|| "PodCompleted".into());
        PodCondition {
            type_: kind.into(),
            status: if status { "True" } else { "False" }.into(),
            last_transition_time: Some(Time(since)),
            reason,
            ..PodCondition::default()
        }
    }
}

fn container_status(c: &ContainerView) -> ContainerStatus {
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: String::new(),
        ready: c.ready,
        restart_count: c.restarts,
        started: Some(matches!(c.state, State::Running { .. })),
        state: Some(state(&c.state)),
        last_state: c.last.as_ref().map(|ended| ContainerState {
            terminated: Some(terminated(ended)),
            ..ContainerState::default()
        }),
        ..ContainerStatus::default()
    }
}

fn state(state: &State) -> ContainerState {
    match state {
        State::Waiting { reason, message } => ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.clone()),
                message: message.clone(),
            }),
            ..ContainerState::default()
        },
        State::Running { since } => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(Time(*since)),
            }),
            ..ContainerState::default()
        },
        State::Terminated(ended) => ContainerState {
            terminated: Some(terminated(ended)),
            ..ContainerState::default()
        },
    }
}

fn terminated(ended: &Ended) -> ContainerStateTerminated {
    ContainerStateTerminated {
        exit_code: ended.exit_code,
        signal: ended.signal,
        reason: Some(
            if ended.succeeded() {
                "Completed"
            } else {
                "Error"
            }
            .into(),
        ),
        started_at: Some(Time(ended.started)),
        finished_at: Some(Time(ended.finished)),
        ..ContainerStateTerminated::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(policy: &str, states: Vec<(State, Option<Ended>)>) -> PodView {
        let containers = states
            .into_iter()
            .enumerate()
            .map(|(i, (state, last))| ContainerView {
                name: format!("c{i}"),
                image: "i".into(),
                state,
                last,
                restarts: 0,
                ready: false,
            })
            .collect();
        PodView::new(Ipv4Addr::new(127, 42, 0, 1), Some(policy), containers)
    }

    fn ended(code: i32) -> Ended {
        Ended {
            exit_code: code,
            signal: None,
            started: Timestamp::now(),
            finished: Timestamp::now(),
        }
    }

    fn creating() -> State {
        State::Waiting {
            reason: "ContainerCreating".into(),
            message: None,
        }
    }

    fn backoff() -> State {
        State::Waiting {
            reason: "CrashLoopBackOff".into(),
            message: None,
        }
    }

    #[test]
    fn phases_follow_the_kubelet_rules() {
        let running = State::Running {
            since: Timestamp::now(),
        };
        assert_eq!(view("Always", vec![(creating(), None)]).phase(), "Pending");
        assert_eq!(
            view("Always", vec![(running.clone(), None)]).phase(),
            "Running"
        );
        assert_eq!(
            view("Always", vec![(backoff(), Some(ended(1)))]).phase(),
            "Running",
            "restarting after a crash"
        );
        let done =
            |policy, code| view(policy, vec![(State::Terminated(ended(code)), None)]).phase();
        assert_eq!(done("Never", 0), "Succeeded");
        assert_eq!(done("Never", 2), "Failed");
        assert_eq!(done("OnFailure", 0), "Succeeded");
        assert_eq!(done("OnFailure", 2), "Running");
        assert_eq!(
            view(
                "Never",
                vec![(running, None), (State::Terminated(ended(2)), None)]
            )
            .phase(),
            "Running"
        );
    }

    #[test]
    fn the_status_shows_readiness_exit_codes_and_stamps_transitions() {
        let mut pod = view(
            "Never",
            vec![(
                State::Running {
                    since: Timestamp::now(),
                },
                None,
            )],
        );
        pod.containers[0].ready = true;
        let status = pod.render();
        let ready = |s: &PodStatus| {
            let c = s
                .conditions
                .as_ref()
                .unwrap()
                .iter()
                .find(|c| c.type_ == "Ready")
                .unwrap();
            (
                c.status.clone(),
                c.last_transition_time.clone(),
                c.reason.clone(),
            )
        };
        assert_eq!(ready(&status).0, "True");
        assert_eq!(status.pod_ip.as_deref(), Some("127.42.0.1"));
        let again = pod.render();
        assert_eq!(
            ready(&again).1,
            ready(&status).1,
            "no change, same transition time"
        );

        let killed = Ended::new(Some(ExitStatus::from_raw(9)), Timestamp::now());
        assert_eq!((killed.exit_code, killed.signal), (137, Some(9)));
        pod.containers[0].state = State::Terminated(killed);
        pod.containers[0].ready = false;
        let status = pod.render();
        assert_eq!(status.phase.as_deref(), Some("Failed"));
        assert_eq!(ready(&status).0, "False");
        assert_eq!(ready(&status).2.as_deref(), Some("PodCompleted"));
        let terminated = status.container_statuses.unwrap()[0]
            .state
            .clone()
            .unwrap()
            .terminated
            .unwrap();
        assert_eq!(
            (terminated.exit_code, terminated.reason.as_deref()),
            (137, Some("Error"))
        );
    }
}
