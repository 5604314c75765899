//! The `BuildKitPool` status. The operator's status reconciler owns `phase`, `conditions`,
//! `observedGeneration`, `replicas`, `readyReplicas` and `endpoint` (field manager `bkpool`);
//! the scaler owns `lastActivityTime`, `openConnections` and `drainingSince` under its own
//! field manager, so a status apply by one never erases the other's fields.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildKitPoolStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "phase_schema")]
    pub phase: Option<Phase>,
    /// Ready, PKIReady, WorkloadReady, Validated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Where clients connect: `tcp://<service>.<namespace>.svc:<port>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_connections: Option<i64>,
    /// Set by the scaler when it starts draining the pool before a scale-down; its value is
    /// the drain's mark, which every gateway echoes in its activity report once it holds new
    /// connections instead of routing them. Cleared when the drain ends either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining_since: Option<Time>,
}

/// Where a pool is in its life. The variants are the whole vocabulary: a pool is asleep,
/// waking, serving, draining before a scale-down, or broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    Sleeping,
    Waking,
    Ready,
    Draining,
    Degraded,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Self::Sleeping,
        Self::Waking,
        Self::Ready,
        Self::Draining,
        Self::Degraded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sleeping => "Sleeping",
            Self::Waking => "Waking",
            Self::Ready => "Ready",
            Self::Draining => "Draining",
            Self::Degraded => "Degraded",
        }
    }
}

/// A plain string enum: the derived schema of an optional enum lists `null` among the values,
/// which Kubernetes 1.20 cannot decode.
fn phase_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "enum": Phase::ALL.map(Phase::as_str),
        "description": "Sleeping, Waking, Ready, Draining or Degraded.",
    })
}

impl BuildKitPoolStatus {
    /// The drain mark as text, exactly as gateways echo it and the scaler compares it.
    pub fn draining_mark(&self) -> Option<String> {
        let since = self.draining_since.as_ref()?;
        match serde_json::to_value(since) {
            Ok(serde_json::Value::String(text)) => Some(text),
            _ => None,
        }
    }

    /// The condition of `type_`, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}
