//! Server-side apply with the `bkpool` field manager, skipped when the cached object already
//! says everything the desired one says.
//!
//! "Already says" is [`covers`]: every field bkpool sets has the same value in the cached
//! object. Fields the API server adds (defaults, status, managedFields) and fields other
//! managers own are ignored, empty lists and maps match absent ones (the server drops them),
//! and quantities compare by value (`1000m` is `1`). So an unchanged pool costs no request.

use std::fmt::Debug;

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::FIELD_MANAGER;
use super::error::Error;

/// What an apply did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Unchanged,
    Applied,
}

/// The patch parameters of every bkpool apply: field manager `bkpool`, forced (bkpool is the
/// only writer of the fields it sets; a conflict means someone edited an owned object by
/// hand, and the pool's spec wins).
pub fn params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Applies `desired` unless `cached` already covers it.
pub async fn apply<K>(
    api: &Api<K>,
    reconciler: &'static str,
    desired: &K,
    cached: Option<&K>,
) -> Result<Outcome, Error>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    if cached.is_some_and(|c| covers_object(c, desired)) {
        return Ok(Outcome::Unchanged);
    }
    let name = desired.name_any();
    api.patch(&name, &params(), &Patch::Apply(desired))
        .await
        .map_err(|source| Error::Write {
            reconciler,
            kind: kind_of::<K>(),
            namespace: desired.namespace().unwrap_or_default(),
            name,
            source,
        })?;
    Ok(Outcome::Applied)
}

/// Whether `cached` already has every field of `desired` with the same value.
pub fn covers_object<K: Serialize>(cached: &K, desired: &K) -> bool {
    match (serde_json::to_value(cached), serde_json::to_value(desired)) {
        (Ok(actual), Ok(wanted)) => covers(&actual, &wanted),
        _ => false,
    }
}

/// Whether `actual` has everything `wanted` has (see the module comment).
pub fn covers(actual: &Value, wanted: &Value) -> bool {
    match (actual, wanted) {
        (_, Value::Null) => true,
        (Value::Object(actual), Value::Object(wanted)) => {
            wanted.iter().all(|(key, w)| match actual.get(key) {
                Some(a) => covers(a, w),
                None => is_empty(w),
            })
        }
        (Value::Array(actual), Value::Array(wanted)) => {
            actual.len() == wanted.len() && actual.iter().zip(wanted).all(|(a, w)| covers(a, w))
        }
        (Value::String(a), Value::String(w)) => a == w || same_quantity(a, w),
        (Value::Number(a), Value::Number(w)) => a.as_f64() == w.as_f64(),
        (Value::Number(a), Value::String(w)) | (Value::String(w), Value::Number(a)) => {
            same_quantity(&a.to_string(), w)
        }
        (a, w) => a == w,
    }
}

/// The kind name of `K`, for errors.
pub fn kind_of<K: Resource<DynamicType = ()>>() -> &'static str {
    // Kinds are a fixed set of static strings for the types bkpool writes.
    match K::kind(&()).as_ref() {
        "Secret" => "Secret",
        "ConfigMap" => "ConfigMap",
        "Deployment" => "Deployment",
        "StatefulSet" => "StatefulSet",
        "Job" => "Job",
        "Service" => "Service",
        "NetworkPolicy" => "NetworkPolicy",
        "BuildKitPool" => "BuildKitPool",
        "Lease" => "Lease",
        _ => "object",
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_empty),
        Value::Number(n) => n.as_f64() == Some(0.0),
    }
}

fn same_quantity(a: &str, b: &str) -> bool {
    matches!((quantity(a), quantity(b)), (Some(x), Some(y)) if (x - y).abs() <= f64::EPSILON * x.abs().max(1.0))
}

/// A Kubernetes quantity's value (`500Mi`, `1.5`, `250m`, `1e3`), or None if it is not one.
fn quantity(text: &str) -> Option<f64> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse().ok()?),
        _ => return None,
    };
    Some(number * scale)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn server_additions_and_empty_fields_do_not_count_as_changes() {
        let wanted = json!({"metadata": {"name": "a", "labels": {}}, "spec": {"args": [], "port": 1234, "privileged": false}});
        let actual = json!({"metadata": {"name": "a", "resourceVersion": "7", "managedFields": []}, "spec": {"port": 1234, "protocol": "TCP"}, "status": {"x": 1}});
        assert!(covers(&actual, &wanted));
    }

    #[test]
    fn any_changed_or_missing_field_counts() {
        let actual = json!({"spec": {"image": "a", "args": ["x"]}});
        assert!(!covers(&actual, &json!({"spec": {"image": "b"}})));
        assert!(!covers(&actual, &json!({"spec": {"args": ["x", "y"]}})));
        assert!(!covers(&actual, &json!({"spec": {"args": ["y"]}})));
        assert!(!covers(&actual, &json!({"spec": {"command": ["sh"]}})));
        assert!(!covers(&actual, &json!({"spec": {"enabled": true}})));
    }

    #[test]
    fn quantities_compare_by_value() {
        let actual = json!({"cpu": "1", "memory": "512Mi", "storage": "1Gi"});
        assert!(covers(
            &actual,
            &json!({"cpu": "1000m", "memory": "0.5Gi", "storage": "1024Mi"})
        ));
        assert!(!covers(&actual, &json!({"cpu": "2"})));
        assert!(!covers(&json!({"name": "web"}), &json!({"name": "web2"})));
    }

    #[test]
    fn parameters_are_one_forced_field_manager() {
        let p = params();
        assert_eq!(p.field_manager.as_deref(), Some("bkpool"));
        assert!(p.force);
    }
}
