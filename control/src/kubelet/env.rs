//! A container's environment as a kubelet builds it: `envFrom` (Secrets, ConfigMaps), then
//! `env` in order (literal values, `fieldRef`, `secretKeyRef`, `configMapKeyRef`), each value
//! expanding `$(NAME)` of the variables before it; and the same expansion in `command` and
//! `args`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::{Client, ResourceExt};

use super::volumes::{PrepareError, config_map_files, secret_files};

/// `container`'s variables, in order, later ones overriding earlier ones of the same name.
pub async fn resolve(
    client: &Client,
    pod: &Pod,
    container: &Container,
    pod_ip: Ipv4Addr,
) -> Result<Vec<(String, String)>, PrepareError> {
    let ns = pod.namespace().unwrap_or_default();
    let mut env = Vars::default();
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let files = if let Some(s) = &from.secret_ref {
            secret_files(client, &ns, &s.name, s.optional).await?
        } else if let Some(c) = &from.config_map_ref {
            config_map_files(client, &ns, &c.name, c.optional).await?
        } else {
            BTreeMap::new()
        };
        for (key, value) in files {
            env.set(
                format!("{prefix}{key}"),
                String::from_utf8_lossy(&value).into(),
            );
        }
    }
    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => expand(var.value.as_deref().unwrap_or(""), &env.0),
            Some(from) => {
                if let Some(field) = &from.field_ref {
                    field_value(pod, &field.field_path, pod_ip)?
                } else if let Some(key) = &from.secret_key_ref {
                    let files = secret_files(client, &ns, &key.name, key.optional).await?;
                    lookup(files, "Secret", &key.name, &key.key, key.optional)?
                } else if let Some(key) = &from.config_map_key_ref {
                    let files = config_map_files(client, &ns, &key.name, key.optional).await?;
                    lookup(files, "ConfigMap", &key.name, &key.key, key.optional)?
                } else {
                    return Err(PrepareError::Unsupported {
                        what: format!("env {}: resourceFieldRef", var.name),
                    });
                }
            }
        };
        env.set(var.name.clone(), value);
    }
    Ok(env.0)
}

/// `text` with every `$(NAME)` of a defined variable replaced by its value; `$$` is a literal
/// `$`, and a reference to an undefined variable stays as written.
pub fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = rest
            .strip_prefix("$(")
            .and_then(|r| r.split_once(')'))
            .and_then(|(name, after)| Some((name, after)).filter(|_| !name.is_empty()))
            && let Some((_, value)) = env.iter().rev().find(|(k, _)| k == name)
        {
            out.push_str(value);
            rest = after;
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

#[derive(Default)]
struct Vars(Vec<(String, String)>);

impl Vars {
    fn set(&mut self, name: String, value: String) {
        self.0.retain(|(k, _)| *k != name);
        self.0.push((name, value));
    }
}

fn lookup(
    files: BTreeMap<String, Vec<u8>>,
    kind: &'static str,
    name: &str,
    key: &str,
    optional: Option<bool>,
) -> Result<String, PrepareError> {
    match files.get(key) {
        Some(value) => Ok(String::from_utf8_lossy(value).into()),
        None if optional == Some(true) => Ok(String::new()),
        None => Err(PrepareError::MissingKey {
            kind,
            name: name.into(),
            key: key.into(),
        }),
    }
}

/// The downward API's fields a process kubelet knows.
fn field_value(pod: &Pod, path: &str, pod_ip: Ipv4Addr) -> Result<String, PrepareError> {
    let spec = pod.spec.as_ref();
    let keyed = |prefix: &str, map: &BTreeMap<String, String>| {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.get(key).cloned().unwrap_or_default())
    };
    let value = match path {
        "metadata.name" => pod.name_any(),
        "metadata.namespace" => pod.namespace().unwrap_or_default(),
        "metadata.uid" => pod.uid().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.podIPs" => pod_ip.to_string(),
        "status.hostIP" => "127.0.0.1".into(),
        _ => keyed("metadata.labels['", pod.labels())
            .or_else(|| keyed("metadata.annotations['", pod.annotations()))
            .ok_or_else(|| PrepareError::Unsupported {
                what: format!("fieldRef {path}"),
            })?,
    };
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn references_expand_like_a_kubelet() {
        let env = vars(&[("A", "1"), ("PATH_X", "/x")]);
        assert_eq!(expand("$(A)-$(PATH_X)/y", &env), "1-/x/y");
        assert_eq!(expand("$$(A) costs $$5", &env), "$(A) costs $5");
        assert_eq!(expand("$(MISSING) $( ) $(A", &env), "$(MISSING) $( ) $(A");
        assert_eq!(expand("$", &env), "$");
        assert_eq!(expand("$()", &env), "$()");
    }

    #[test]
    fn downward_fields_come_from_the_pod() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u", "labels": {"app": "x"}},
            "spec": {"containers": [], "nodeName": "node"},
        }))
        .unwrap();
        let ip = Ipv4Addr::new(127, 42, 0, 9);
        let get = |path| field_value(&pod, path, ip).unwrap();
        assert_eq!(get("metadata.name"), "p");
        assert_eq!(get("status.podIP"), "127.42.0.9");
        assert_eq!(get("metadata.labels['app']"), "x");
        assert_eq!(get("metadata.labels['none']"), "");
        assert!(field_value(&pod, "status.phase", ip).is_err());
    }
}
