//! The scaler's part of a pool's status — `openConnections`, `lastActivityTime` and
//! `drainingSince` — applied to `/status` with its own field manager, `bkpool-scaler`.
//!
//! Server-side apply removes every field a manager set before and omits now, so every apply
//! sends the whole part, built by [`body`] from one [`ScalerStatus`]: a drain mark, a count
//! or a time is never dropped by an apply that meant to change something else.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Map, Value, json};

use super::reports::Seen;
use crate::crd::{BuildKitPool, BuildKitPoolStatus};

/// The scaler's field manager (the status reconciler's is `bkpool`).
pub const FIELD_MANAGER: &str = "bkpool-scaler";

/// While the last activity keeps moving, it is written at most this often.
pub const ACTIVITY_WRITE_INTERVAL: Duration = Duration::from_secs(10);

/// Everything the scaler sets in a pool's status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScalerStatus {
    pub open_connections: Option<i64>,
    /// Whole seconds.
    pub last_activity: Option<Time>,
    /// The drain mark, exactly as serialized (`2024-05-06T10:00:00Z`).
    pub draining_since: Option<String>,
}

impl ScalerStatus {
    /// What the cached status says of the scaler's fields.
    pub fn cached(status: &BuildKitPoolStatus) -> Self {
        Self {
            open_connections: status.open_connections,
            last_activity: status.last_activity_time.clone(),
            draining_since: status.draining_since.as_ref().and_then(mark),
        }
    }

    /// This round's values: the gateways' figures when complete (the cached ones otherwise),
    /// the latest activity ever seen, and the drain mark in effect.
    pub fn wanted(base: &Self, seen: Option<&Seen>, draining_since: Option<String>) -> Self {
        let open = seen.map(|s| i64::try_from(s.open).unwrap_or(i64::MAX));
        let reported = seen
            .map(|s| s.last_activity_ms)
            .filter(|ms| *ms > 0)
            .and_then(|ms| Timestamp::from_second(i64::try_from(ms / 1_000).ok()?).ok())
            .map(Time);
        let last_activity = match (reported, base.last_activity.clone()) {
            (Some(r), Some(b)) => Some(if r.0 > b.0 { r } else { b }),
            (r, b) => r.or(b),
        };
        Self {
            open_connections: open.or(base.open_connections),
            last_activity,
            draining_since,
        }
    }

    /// Whether `self` is worth writing over `base`, last written `since_write` ago: any change
    /// of the count or the mark at once, a moving activity time at most every 10 s.
    pub fn due(&self, base: &Self, since_write: Option<Duration>) -> bool {
        let activity_due = since_write.is_none_or(|d| d >= ACTIVITY_WRITE_INTERVAL);
        self.open_connections != base.open_connections
            || self.draining_since != base.draining_since
            || (self.last_activity != base.last_activity && activity_due)
    }
}

/// The drain mark of a `drainingSince` value: its serialized string, as gateways echo it.
pub fn mark(time: &Time) -> Option<String> {
    match serde_json::to_value(time) {
        Ok(Value::String(s)) => Some(s),
        _ => None,
    }
}

/// A new drain mark for `now` (whole seconds, as the API carries it).
pub fn new_mark(now: Timestamp) -> Option<String> {
    let second = Timestamp::from_second(now.as_second()).ok()?;
    mark(&Time(second))
}

/// The apply body for `status`: the whole of the scaler's part, nothing else.
pub fn body(status: &ScalerStatus) -> Value {
    let mut fields = Map::new();
    if let Some(open) = status.open_connections {
        fields.insert("openConnections".into(), json!(open));
    }
    if let Some(time) = status.last_activity.as_ref().and_then(mark) {
        fields.insert("lastActivityTime".into(), json!(time));
    }
    if let Some(since) = &status.draining_since {
        fields.insert("drainingSince".into(), json!(since));
    }
    json!({
        "apiVersion": "bkpool.dev/v1alpha1",
        "kind": "BuildKitPool",
        "status": fields,
    })
}

/// Applies `status` as the pool's scaler part.
pub async fn apply(
    api: &Api<BuildKitPool>,
    name: &str,
    status: &ScalerStatus,
) -> Result<(), kube::Error> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(name, &params, &Patch::Apply(&body(status)))
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn the_body_carries_every_field_the_scaler_owns() {
        let status = ScalerStatus {
            open_connections: Some(0),
            last_activity: Some(time(1_714_989_600)),
            draining_since: Some("2024-05-06T10:05:00Z".into()),
        };
        assert_eq!(
            body(&status),
            json!({
                "apiVersion": "bkpool.dev/v1alpha1",
                "kind": "BuildKitPool",
                "status": {
                    "openConnections": 0,
                    "lastActivityTime": "2024-05-06T10:00:00Z",
                    "drainingSince": "2024-05-06T10:05:00Z",
                },
            })
        );
        let cleared = ScalerStatus {
            draining_since: None,
            ..status
        };
        assert!(body(&cleared)["status"].get("drainingSince").is_none());
        assert!(body(&cleared)["status"].get("openConnections").is_some());
    }

    #[test]
    fn marks_are_whole_seconds_and_read_back_as_written() {
        let now: Timestamp = "2024-05-06T10:05:00.734Z".parse().unwrap();
        let m = new_mark(now).unwrap();
        assert_eq!(m, "2024-05-06T10:05:00Z");
        let back: Time = serde_json::from_value(json!(m)).unwrap();
        assert_eq!(mark(&back).as_deref(), Some(m.as_str()));
        let cached = BuildKitPoolStatus {
            draining_since: Some(back),
            ..BuildKitPoolStatus::default()
        };
        assert_eq!(ScalerStatus::cached(&cached).draining_since, Some(m));
    }

    #[test]
    fn partial_reports_keep_the_cached_figures() {
        let base = ScalerStatus {
            open_connections: Some(3),
            last_activity: Some(time(100)),
            draining_since: None,
        };
        let wanted = ScalerStatus::wanted(&base, None, None);
        assert_eq!(wanted, base);
        // A restarted gateway reports an older (or no) activity: the time never goes back.
        let seen = Seen {
            open: 0,
            last_activity_ms: 50_000,
            ..Seen::default()
        };
        let wanted = ScalerStatus::wanted(&base, Some(&seen), Some("m".into()));
        assert_eq!(wanted.open_connections, Some(0));
        assert_eq!(wanted.last_activity, Some(time(100)));
        assert_eq!(wanted.draining_since.as_deref(), Some("m"));
        let later = Seen {
            last_activity_ms: 130_999,
            ..Seen::default()
        };
        let wanted = ScalerStatus::wanted(&base, Some(&later), None);
        assert_eq!(wanted.last_activity, Some(time(130)));
    }

    #[test]
    fn writes_are_due_on_changes_and_activity_at_most_every_ten_seconds() {
        let base = ScalerStatus {
            open_connections: Some(1),
            last_activity: Some(time(100)),
            draining_since: None,
        };
        let second = Some(Duration::from_secs(1));
        assert!(!base.due(&base, second));
        let moved = ScalerStatus {
            last_activity: Some(time(101)),
            ..base.clone()
        };
        assert!(!moved.due(&base, second));
        assert!(moved.due(&base, Some(Duration::from_secs(10))));
        assert!(moved.due(&base, None));
        let opened = ScalerStatus {
            open_connections: Some(2),
            ..moved.clone()
        };
        assert!(opened.due(&base, second));
        let marked = ScalerStatus {
            draining_since: Some("m".into()),
            ..base.clone()
        };
        assert!(marked.due(&base, second));
    }
}
