//! A pod's volumes as directories under the pod's own directory: `secret`, `configMap` and
//! `projected` (secrets, ConfigMaps and ServiceAccount tokens from TokenRequest) written out
//! as files once, when the pod starts; `emptyDir` as an empty directory that goes with the
//! pod; a `persistentVolumeClaim` as a directory per claim under the kubelet's root, which
//! outlives every pod that mounts it (kube-local binds no claims: the claim only has to
//! exist). Anything else is refused with an error naming it.
//!
//! Unlike a real kubelet, files are not refreshed when their Secret or ConfigMap changes.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, KeyToPath, PersistentVolumeClaim, Pod, Secret, ServiceAccount, Volume,
};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

/// Why a pod's volumes or environment could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("{kind} {name} not found")]
    Missing { kind: &'static str, name: String },
    #[error("key {key} not found in {kind} {name}")]
    MissingKey {
        kind: &'static str,
        name: String,
        key: String,
    },
    #[error("reading {kind} {name}: {source}")]
    Api {
        kind: &'static str,
        name: String,
        source: kube::Error,
    },
    #[error("{what} is not supported by the process kubelet")]
    Unsupported { what: String },
    #[error("container {container} mounts volume {volume}, which the pod does not declare")]
    UnknownVolume { container: String, volume: String },
    #[error("writing {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl PrepareError {
    /// Whether trying again later may succeed (an object not there yet, the API server), as
    /// a kubelet keeps a pod in ContainerCreating until its Secrets exist.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            PrepareError::Missing { .. }
                | PrepareError::MissingKey { .. }
                | PrepareError::Api { .. }
        )
    }
}

/// Each volume's directory on the host, by volume name.
#[derive(Debug, Clone, Default)]
pub struct Volumes(HashMap<String, PathBuf>);

impl Volumes {
    /// Writes every volume of `pod` under `pod_dir` (claims under `claims_dir`).
    pub async fn materialize(
        client: &Client,
        pod: &Pod,
        pod_dir: &Path,
        claims_dir: &Path,
    ) -> Result<Self, PrepareError> {
        let ns = pod.namespace().unwrap_or_default();
        let mut dirs = HashMap::new();
        let volumes = pod.spec.as_ref().and_then(|s| s.volumes.clone());
        for volume in volumes.unwrap_or_default() {
            let dir = pod_dir.join("v").join(&volume.name);
            let dir = materialize(client, &ns, pod, &volume, dir, claims_dir).await?;
            dirs.insert(volume.name.clone(), dir);
        }
        Ok(Volumes(dirs))
    }

    /// `container`'s mount paths and the host directories they stand for.
    pub fn mounts(&self, container: &Container) -> Result<Vec<(String, PathBuf)>, PrepareError> {
        let mounts = container.volume_mounts.iter().flatten();
        mounts
            .map(|m| {
                let dir = self
                    .0
                    .get(&m.name)
                    .ok_or_else(|| PrepareError::UnknownVolume {
                        container: container.name.clone(),
                        volume: m.name.clone(),
                    })?;
                let dir = match m.sub_path.as_deref() {
                    Some(sub) if !sub.is_empty() => dir.join(sub),
                    _ => dir.clone(),
                };
                Ok((m.mount_path.clone(), dir))
            })
            .collect()
    }
}

async fn materialize(
    client: &Client,
    ns: &str,
    pod: &Pod,
    volume: &Volume,
    dir: PathBuf,
    claims_dir: &Path,
) -> Result<PathBuf, PrepareError> {
    if volume.empty_dir.is_some() {
        create_dir(&dir)?;
    } else if let Some(claim) = &volume.persistent_volume_claim {
        let name = &claim.claim_name;
        fetch::<PersistentVolumeClaim>(client, ns, name, "PersistentVolumeClaim")
            .await?
            .ok_or_else(|| PrepareError::Missing {
                kind: "PersistentVolumeClaim",
                name: name.clone(),
            })?;
        let dir = claims_dir.join(name);
        create_dir(&dir)?;
        return Ok(dir);
    } else if let Some(source) = &volume.secret {
        create_dir(&dir)?;
        let name = source.secret_name.clone().unwrap_or_default();
        let files = secret_files(client, ns, &name, source.optional).await?;
        let mode = source.default_mode.unwrap_or(0o644);
        write_files(&dir, &files, source.items.as_deref(), mode, "Secret", &name)?;
    } else if let Some(source) = &volume.config_map {
        create_dir(&dir)?;
        let name = &source.name;
        let files = config_map_files(client, ns, name, source.optional).await?;
        let mode = source.default_mode.unwrap_or(0o644);
        write_files(
            &dir,
            &files,
            source.items.as_deref(),
            mode,
            "ConfigMap",
            name,
        )?;
    } else if let Some(projected) = &volume.projected {
        create_dir(&dir)?;
        let mode = projected.default_mode.unwrap_or(0o644);
        for source in projected.sources.iter().flatten() {
            if let Some(s) = &source.secret {
                let files = secret_files(client, ns, &s.name, s.optional).await?;
                write_files(&dir, &files, s.items.as_deref(), mode, "Secret", &s.name)?;
            } else if let Some(c) = &source.config_map {
                let files = config_map_files(client, ns, &c.name, c.optional).await?;
                write_files(&dir, &files, c.items.as_deref(), mode, "ConfigMap", &c.name)?;
            } else if let Some(t) = &source.service_account_token {
                let token = token(client, pod, t.audience.clone(), t.expiration_seconds).await?;
                write_file(&dir.join(&t.path), token.as_bytes(), mode)?;
            } else {
                return Err(unsupported(
                    volume,
                    "a projected source other than secret, configMap or serviceAccountToken",
                ));
            }
        }
    } else {
        return Err(unsupported(volume, "this volume type"));
    }
    Ok(dir)
}

fn unsupported(volume: &Volume, what: &str) -> PrepareError {
    PrepareError::Unsupported {
        what: format!("volume {}: {what}", volume.name),
    }
}

/// GET `name`, `None` when it does not exist.
pub(super) async fn fetch<K>(
    client: &Client,
    ns: &str,
    name: &str,
    kind: &'static str,
) -> Result<Option<K>, PrepareError>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    api.get_opt(name).await.map_err(|source| PrepareError::Api {
        kind,
        name: name.into(),
        source,
    })
}

/// A Secret's data by key (empty for a missing optional one).
pub(super) async fn secret_files(
    client: &Client,
    ns: &str,
    name: &str,
    optional: Option<bool>,
) -> Result<BTreeMap<String, Vec<u8>>, PrepareError> {
    match fetch::<Secret>(client, ns, name, "Secret").await? {
        Some(secret) => Ok(secret
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect()),
        None if optional == Some(true) => Ok(BTreeMap::new()),
        None => Err(PrepareError::Missing {
            kind: "Secret",
            name: name.into(),
        }),
    }
}

/// A ConfigMap's data and binary data by key (empty for a missing optional one).
pub(super) async fn config_map_files(
    client: &Client,
    ns: &str,
    name: &str,
    optional: Option<bool>,
) -> Result<BTreeMap<String, Vec<u8>>, PrepareError> {
    match fetch::<ConfigMap>(client, ns, name, "ConfigMap").await? {
        Some(cm) => {
            let text = cm.data.unwrap_or_default().into_iter();
            let binary = cm.binary_data.unwrap_or_default().into_iter();
            Ok(text
                .map(|(k, v)| (k, v.into_bytes()))
                .chain(binary.map(|(k, v)| (k, v.0)))
                .collect())
        }
        None if optional == Some(true) => Ok(BTreeMap::new()),
        None => Err(PrepareError::Missing {
            kind: "ConfigMap",
            name: name.into(),
        }),
    }
}

/// A token of the pod's ServiceAccount for `audience`, bound to the pod, as a kubelet gets
/// one for a projected volume.
async fn token(
    client: &Client,
    pod: &Pod,
    audience: Option<String>,
    expiration: Option<i64>,
) -> Result<String, PrepareError> {
    let ns = pod.namespace().unwrap_or_default();
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.into_iter().collect(),
            expiration_seconds: Some(expiration.unwrap_or(3600)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name_any()),
                uid: pod.uid(),
            }),
        },
        ..TokenRequest::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let answer = api
        .create_token_request(&account, &PostParams::default(), &request)
        .await
        .map_err(|source| PrepareError::Api {
            kind: "ServiceAccount token for",
            name: account.clone(),
            source,
        })?;
    Ok(answer.status.map(|s| s.token).unwrap_or_default())
}

/// Writes `files` into `dir`: every key, or only `items` (key → relative path, own mode).
fn write_files(
    dir: &Path,
    files: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    mode: i32,
    kind: &'static str,
    name: &str,
) -> Result<(), PrepareError> {
    match items {
        None => files
            .iter()
            .try_for_each(|(key, data)| write_file(&dir.join(key), data, mode)),
        Some(items) => items.iter().try_for_each(|item| {
            let data = files
                .get(&item.key)
                .ok_or_else(|| PrepareError::MissingKey {
                    kind,
                    name: name.into(),
                    key: item.key.clone(),
                })?;
            write_file(&dir.join(&item.path), data, item.mode.unwrap_or(mode))
        }),
    }
}

fn write_file(path: &Path, data: &[u8], mode: i32) -> Result<(), PrepareError> {
    let io = |source| PrepareError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    std::fs::write(path, data).map_err(io)?;
    let mode = u32::try_from(mode).unwrap_or(0o644) & 0o7777;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)
}

fn create_dir(dir: &Path) -> Result<(), PrepareError> {
    std::fs::create_dir_all(dir).map_err(|source| PrepareError::Io {
        path: dir.to_path_buf(),
        source,
    })
}
