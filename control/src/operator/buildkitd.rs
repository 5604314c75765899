//! The `buildkitd.toml` ConfigMap: raw TOML as given, or rendered from the structured fields.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::Api;
use toml::{Table, Value};

use super::apply::{self, Outcome};
use super::context::{Context, cached};
use super::error::Error;
use super::objects::{PoolNames, owned_meta};
use crate::crd::{BuildKitPool, Buildkitd, duration};

const RECONCILER: &str = "buildkitd";
/// The key (and file name) of the configuration in the ConfigMap.
pub const CONFIG_KEY: &str = "buildkitd.toml";

/// The configuration text for `spec.buildkitd`.
pub fn render(config: &Buildkitd) -> String {
    if let Some(raw) = &config.raw {
        return raw.clone();
    }
    let mut root = Table::new();
    let mut oci = Table::new();
    if let Some(n) = config.max_parallelism {
        oci.insert("max-parallelism".into(), Value::Integer(n.into()));
    }
    if let Some(gc) = &config.gc {
        let mut policy = Table::new();
        policy.insert("keepBytes".into(), Value::Integer(gc.keep_bytes));
        if let Some(keep) = gc
            .keep_duration
            .as_deref()
            .and_then(|d| duration::parse(d).ok())
        {
            let secs = i64::try_from(keep.as_secs()).unwrap_or(i64::MAX);
            policy.insert("keepDuration".into(), Value::Integer(secs));
        }
        oci.insert("gc".into(), Value::Boolean(true));
        oci.insert("gcpolicy".into(), Value::Array(vec![Value::Table(policy)]));
    }
    if !oci.is_empty() {
        let worker = Table::from_iter([("oci".to_owned(), Value::Table(oci))]);
        root.insert("worker".into(), Value::Table(worker));
    }
    let mut registries = Table::new();
    for r in &config.registries {
        let mut entry = Table::new();
        if !r.mirrors.is_empty() {
            let mirrors = r.mirrors.iter().cloned().map(Value::String).collect();
            entry.insert("mirrors".into(), Value::Array(mirrors));
        }
        if r.http {
            entry.insert("http".into(), Value::Boolean(true));
        }
        if r.insecure {
            entry.insert("insecure".into(), Value::Boolean(true));
        }
        registries.insert(r.host.clone(), Value::Table(entry));
    }
    if !registries.is_empty() {
        root.insert("registry".into(), Value::Table(registries));
    }
    let header = "# Rendered by bkpool from the BuildKitPool spec.\n";
    format!("{header}{}", toml::to_string(&root).unwrap_or_default())
}

/// The desired ConfigMap.
pub fn desired(pool: &BuildKitPool) -> ConfigMap {
    let names = PoolNames::of(pool);
    ConfigMap {
        metadata: owned_meta(pool, names.config_map()),
        data: Some(BTreeMap::from([(
            CONFIG_KEY.to_owned(),
            render(&pool.spec.buildkitd),
        )])),
        ..ConfigMap::default()
    }
}

pub async fn reconcile(pool: &BuildKitPool, ctx: &Context) -> Result<(), Error> {
    let ns = pool.namespace().unwrap_or_default();
    let desired = desired(pool);
    let current = cached(&ctx.stores.config_maps, &ns, &desired.name_any());
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    if apply::apply(&api, RECONCILER, &desired, current.as_deref()).await? == Outcome::Applied {
        ctx.metrics.wrote(RECONCILER);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{BuildKitPoolSpec, GcPolicy, Registry};
    use crate::operator::objects::fixtures;

    #[test]
    fn structured_fields_render_to_buildkitd_toml() {
        let config = Buildkitd {
            raw: None,
            max_parallelism: Some(4),
            gc: Some(GcPolicy {
                keep_bytes: 10_000_000_000,
                keep_duration: Some("2d".into()),
            }),
            registries: vec![
                Registry {
                    host: "cache.internal:5000".into(),
                    mirrors: vec![],
                    http: true,
                    insecure: false,
                },
                Registry {
                    host: "docker.io".into(),
                    mirrors: vec!["mirror.gcr.io".into()],
                    http: false,
                    insecure: false,
                },
            ],
        };
        let text = render(&config);
        let parsed: Table = text.parse().unwrap();
        let oci = &parsed["worker"]["oci"];
        assert_eq!(oci["max-parallelism"].as_integer(), Some(4));
        assert_eq!(
            oci["gcpolicy"][0]["keepDuration"].as_integer(),
            Some(172_800)
        );
        assert_eq!(
            parsed["registry"]["cache.internal:5000"]["http"].as_bool(),
            Some(true)
        );
        assert_eq!(
            parsed["registry"]["docker.io"]["mirrors"][0].as_str(),
            Some("mirror.gcr.io")
        );
    }

    #[test]
    fn raw_toml_is_used_verbatim_and_defaults_render_empty() {
        let raw = "debug = true\n[worker.oci]\nmax-parallelism = 2\n";
        let config = Buildkitd {
            raw: Some(raw.into()),
            ..Buildkitd::default()
        };
        assert_eq!(render(&config), raw);
        let empty: Table = render(&Buildkitd::default()).parse().unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn the_config_map_is_owned_by_the_pool() {
        let cm = desired(&fixtures::pool("a", BuildKitPoolSpec::default()));
        assert_eq!(cm.metadata.name.as_deref(), Some("a-buildkitd-config"));
        let owner = &cm.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("BuildKitPool", Some(true))
        );
        assert!(cm.data.unwrap().contains_key("buildkitd.toml"));
    }
}
