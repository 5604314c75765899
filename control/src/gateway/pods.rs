//! Which buildkitd pods may take connections. Pods are watched directly: readiness arrives
//! sooner than through Endpoints. A pod serves when it is Ready, not terminating, and has an IP;
//! one that is Running with an IP but not yet Ready is [`starting`]: the gateway may probe it
//! itself ([`super::starting`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::operator::objects::{BUILDKITD_PORT, POOL_LABEL};

/// Label selector of the pods the gateway watches: every pool's buildkitd.
pub const SELECTOR: &str = "app.kubernetes.io/name=buildkitd,bkpool.dev/pool";

/// Whether `pod` may take connections now.
pub fn serves(pod: &Pod) -> bool {
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let Some(status) = &pod.status else {
        return false;
    };
    let running = !matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    running && ready && status.pod_ip.is_some()
}

/// Whether `pod` is up but not (yet) Ready: Running, not terminating, with an IP.
pub fn starting(pod: &Pod) -> bool {
    if pod.metadata.deletion_timestamp.is_some() || serves(pod) {
        return false;
    }
    pod.status
        .as_ref()
        .is_some_and(|s| s.phase.as_deref() == Some("Running") && s.pod_ip.is_some())
}

/// Starting pods of every pool, by `namespace/name`.
pub fn starting_by_pool(pods: &[Arc<Pod>]) -> HashMap<String, Vec<super::starting::Pod>> {
    let mut by_pool: HashMap<String, Vec<_>> = HashMap::new();
    for pod in pods.iter().filter(|p| starting(p)) {
        let (Some(pool), Some(ns), Some(addr), Some(uid)) = (
            pod.labels().get(POOL_LABEL),
            pod.namespace(),
            address(pod),
            pod.uid(),
        ) else {
            continue;
        };
        by_pool
            .entry(format!("{ns}/{pool}"))
            .or_default()
            .push(super::starting::Pod { uid, addr });
    }
    by_pool
}

/// buildkitd's address in `pod`, if it has a usable IP.
fn address(pod: &Pod) -> Option<SocketAddr> {
    let ip: IpAddr = pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
    Some(SocketAddr::new(ip, BUILDKITD_PORT as u16))
}

/// Ready backends of every pool, by `namespace/name`.
pub fn ready_by_pool(pods: &[Arc<Pod>]) -> HashMap<String, Vec<SocketAddr>> {
    let mut by_pool: HashMap<String, Vec<SocketAddr>> = HashMap::new();
    for pod in pods.iter().filter(|p| serves(p)) {
        let (Some(pool), Some(ns), Some(addr)) =
            (pod.labels().get(POOL_LABEL), pod.namespace(), address(pod))
        else {
            continue;
        };
        by_pool
            .entry(format!("{ns}/{pool}"))
            .or_default()
            .push(addr);
    }
    by_pool
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn pod(ns: &str, pool: &str, ip: Option<&str>, ready: bool) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.namespace = Some(ns.into());
        pod.metadata.name = Some(format!("{pool}-x"));
        pod.metadata.labels = Some([(POOL_LABEL.to_owned(), pool.to_owned())].into());
        pod.status = Some(PodStatus {
            pod_ip: ip.map(Into::into),
            phase: Some("Running".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        });
        pod
    }

    #[test]
    fn only_ready_live_pods_with_an_ip_serve() {
        let ready = pod("ci", "a", Some("10.0.0.5"), true);
        assert!(serves(&ready));
        assert!(!serves(&pod("ci", "a", Some("10.0.0.5"), false)));
        assert!(!serves(&pod("ci", "a", None, true)));
        let mut leaving = ready.clone();
        leaving.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        assert!(!serves(&leaving));
        let mut done = ready.clone();
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert!(!serves(&done));
    }

    #[test]
    fn running_pods_with_an_ip_that_are_not_ready_are_starting() {
        let mut up = pod("ci", "a", Some("10.0.0.5"), false);
        up.metadata.uid = Some("u1".into());
        assert!(starting(&up));
        assert!(
            !starting(&pod("ci", "a", Some("10.0.0.5"), true)),
            "Ready serves"
        );
        assert!(!starting(&pod("ci", "a", None, false)), "no IP yet");
        let mut pending = up.clone();
        pending.status.as_mut().unwrap().phase = Some("Pending".into());
        assert!(!starting(&pending));
        let mut leaving = up.clone();
        leaving.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        assert!(!starting(&leaving));
        let by_pool = starting_by_pool(&[Arc::new(up)]);
        assert_eq!(
            by_pool["ci/a"],
            [crate::gateway::starting::Pod {
                uid: "u1".into(),
                addr: "10.0.0.5:1234".parse().unwrap()
            }]
        );
    }

    #[test]
    fn backends_are_grouped_by_namespace_and_pool() {
        let pods: Vec<Arc<Pod>> = [
            pod("ci", "a", Some("10.0.0.5"), true),
            pod("ci", "a", Some("10.0.0.6"), false),
            pod("dev", "a", Some("10.0.1.5"), true),
            pod("ci", "b", Some("not-an-ip"), true),
        ]
        .into_iter()
        .map(Arc::new)
        .collect();
        let by_pool = ready_by_pool(&pods);
        assert_eq!(by_pool["ci/a"], ["10.0.0.5:1234".parse().unwrap()]);
        assert_eq!(by_pool["dev/a"], ["10.0.1.5:1234".parse().unwrap()]);
        assert!(!by_pool.contains_key("ci/b"));
    }
}
