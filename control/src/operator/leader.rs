//! Leader election with a coordination.k8s.io/v1 Lease. Only the leader reconciles; every
//! replica serves health and metrics. A leader that cannot renew for a whole lease duration
//! steps down on its own, before another replica may take over; a leader that stops
//! releases the Lease so a standby takes over within one retry period.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

/// One replica's side of the election.
#[derive(Clone)]
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
    retry_period: Duration,
    reachable: Arc<AtomicBool>,
}

impl LeaderElection {
    /// Contends for Lease `name` in `namespace` as `identity` (the pod name), with a 15 s
    /// lease renewed every 2 s.
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
            reachable: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn with_timings(mut self, lease_duration: Duration, retry_period: Duration) -> Self {
        self.lease_duration = lease_duration.max(Duration::from_secs(1));
        self.retry_period = retry_period;
        self
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Whether the last round reached the API server (what `/readyz` reports).
    pub fn api_reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Contends until `shutdown` completes, publishing leadership on `leader`; releases the
    /// Lease on the way out if it holds it.
    pub async fn run(&self, leader: watch::Sender<bool>, shutdown: impl Future<Output = ()>) {
        let mut last_renewed: Option<Instant> = None;
        tokio::pin!(shutdown);
        loop {
            let round = self.try_acquire_or_renew().await;
            self.reachable.store(round.is_ok(), Ordering::Relaxed);
            let held = match round {
                Ok(true) => {
                    last_renewed = Some(Instant::now());
                    true
                }
                Ok(false) => false,
                Err(e) => {
                    tracing::warn!(error = %e, lease = %self.name, "cannot renew the lease");
                    // Keep leading only while the lease we last wrote is surely still ours.
                    last_renewed.is_some_and(|t| t.elapsed() < self.lease_duration / 2)
                }
            };
            if !held {
                last_renewed = None;
            }
            leader.send_if_modified(|was| {
                let changed = *was != held;
                if changed {
                    tracing::info!(identity = %self.identity, leader = held, "leadership changed");
                }
                *was = held;
                changed
            });
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(self.retry_period) => {}
            }
        }
        if *leader.borrow() {
            leader.send_replace(false);
            if let Err(e) = self.release().await {
                tracing::warn!(error = %e, "cannot release the lease");
            }
        }
    }

    /// One round: take the Lease if free or expired, renew it if ours. `Ok(true)` while this
    /// replica holds it. A conflict (another replica wrote first) is `Ok(false)`.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, now, 0)),
            };
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().unwrap_or_default();
        let transitions = spec.lease_transitions.unwrap_or(0);
        let new_spec = if holder == self.identity {
            let acquired = spec.acquire_time.map_or(now, |t| t.0);
            self.spec(acquired, now, transitions)
        } else if holder.is_empty() || expired(&spec, now) {
            self.spec(now, now, transitions + 1)
        } else {
            return Ok(false);
        };
        lease.spec = Some(new_spec);
        // replace carries the resourceVersion read above: a concurrent writer makes it 409.
        conflict_is_false(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )
    }

    /// Gives the Lease up so a standby need not wait for it to expire.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map(drop)
    }

    fn spec(&self, acquired: Timestamp, renewed: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.lease_duration.as_secs() as i32),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(renewed)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }
}

fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(renewed) = spec.renew_time.as_ref() else {
        return true;
    };
    let lease = SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15).into());
    renewed.0 + lease < now
}

fn conflict_is_false(result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_expires_after_its_duration_from_the_last_renewal() {
        let renewed = Timestamp::from_second(1_000).unwrap();
        let spec = LeaseSpec {
            renew_time: Some(MicroTime(renewed)),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        };
        assert!(!expired(&spec, Timestamp::from_second(1_014).unwrap()));
        assert!(expired(&spec, Timestamp::from_second(1_016).unwrap()));
        assert!(expired(&LeaseSpec::default(), renewed));
    }
}
