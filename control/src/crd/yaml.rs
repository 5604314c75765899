//! The CRD manifest, generated from the Rust types. `deploy/crds/` holds a copy checked by a
//! test; `bkpool crd > deploy/crds/buildkitpools.bkpool.dev.yaml` refreshes it.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::spec::BuildKitPool;

/// Where the checked-in manifest lives, relative to the repository root.
pub const CHECKED_IN: &str = "deploy/crds/buildkitpools.bkpool.dev.yaml";

/// The `BuildKitPool` CustomResourceDefinition.
pub fn crd() -> CustomResourceDefinition {
    BuildKitPool::crd()
}

/// The CRD as YAML, with a header saying where it comes from.
pub fn crd_yaml() -> String {
    let body = serde_yaml::to_string(&crd()).expect("a CRD always serializes");
    format!("# Generated from control/src/crd by `bkpool crd`. Do not edit.\n{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_crd_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(CHECKED_IN);
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == crd_yaml(),
            "{CHECKED_IN} is stale; regenerate it with: cargo run -- crd > {CHECKED_IN}"
        );
    }

    #[test]
    fn the_crd_names_and_columns_are_the_documented_ones() {
        let crd = crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("buildkitpools.bkpool.dev")
        );
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["bkp".to_owned()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            [
                "Phase",
                "Replicas",
                "Ready",
                "Connections",
                "Last Activity",
                "Age"
            ]
        );
    }

    #[test]
    fn the_schema_carries_enums_ranges_patterns_and_defaults() {
        let yaml = crd_yaml();
        for needle in [
            "- StatefulSet",
            "- passthrough",
            "pattern: ^([0-9]+(ms|s|m|h|d))+$",
            "maximum: 100",
            "default: 10m",
            "- Degraded",
        ] {
            assert!(yaml.contains(needle), "{needle:?} missing from the CRD");
        }
        assert!(
            !yaml.contains("x-kubernetes-validations"),
            "1.20 has no CEL"
        );
    }
}
