//! The buildkitd workload: a Deployment, a StatefulSet whose cache claims survive
//! scale-to-zero, or Jobs started one per wake.
//!
//! Replicas belong to the scaler (through `/scale`). This reconciler sets `replicas` only when
//! it creates the workload (a create, with `spec.scaling.minReplicas`); every later write is
//! an apply that leaves `replicas` out, so bkpool's apply never owns the field and never
//! resets what the scaler chose. A StatefulSet scaled to zero keeps its PersistentVolumeClaims
//! (Kubernetes 1.20 has no retention policy and deletes none), and bkpool never deletes them
//! either: the BuildKit cache survives sleep.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, StatefulSet, StatefulSetSpec,
};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, ExecAction,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, SeccompProfile, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};

use super::apply::{self, Outcome, kind_of};
use super::buildkitd::{self, CONFIG_KEY};
use super::context::{Context, cached};
use super::error::Error;
use super::objects::{BUILDKITD_PORT, PoolNames, content_hash, owned_meta, selector};
use crate::crd::{BuildKitPool, GatewayMode, SecurityMode, WorkloadKind};

const RECONCILER: &str = "workload";
/// Label on a wake's Job naming the wake.
pub const WAKE_LABEL: &str = "bkpool.dev/wake";
const SOCKET: &str = "unix:///run/buildkit/buildkitd.sock";
const TLS_DIR: &str = "/etc/bkpool/tls";
const CONFIG_DIR: &str = "/etc/buildkit";
const ROOTLESS_UID: i64 = 1000;

/// Hashes of what pods read at start (configuration and certificate), so a change rolls them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inputs {
    pub config_hash: String,
    pub tls_hash: String,
}

/// The pod template every workload kind shares.
pub fn pod_template(pool: &BuildKitPool, inputs: &Inputs) -> PodTemplateSpec {
    let names = PoolNames::of(pool);
    let rootless = pool.spec.workload.security == SecurityMode::Rootless;
    let mut annotations = BTreeMap::from([
        (
            "bkpool.dev/config-hash".to_owned(),
            inputs.config_hash.clone(),
        ),
        ("bkpool.dev/tls-hash".to_owned(), inputs.tls_hash.clone()),
    ]);
    if rootless {
        // Rootless BuildKit needs unconfined AppArmor (an annotation until Kubernetes 1.30).
        let key = "container.apparmor.security.beta.kubernetes.io/buildkitd";
        annotations.insert(key.into(), "unconfined".into());
    }
    let tls_secret = match pool.spec.gateway.mode {
        // Passthrough: buildkitd is the TLS server clients see, verifying the client CA.
        GatewayMode::Passthrough => names.gateway_tls(),
        GatewayMode::Terminate => names.buildkitd_tls(),
    };
    let w = &pool.spec.workload;
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.config_map(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(tls_secret),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        empty_dir("run"),
    ];
    let stateful_cache = w.kind == WorkloadKind::StatefulSet && w.cache.is_some();
    if !stateful_cache {
        volumes.push(empty_dir("cache"));
    }
    let template_labels = selector(pool);
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(template_labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container(pool, rootless)],
            volumes: Some(volumes),
            node_selector: (!w.node_selector.is_empty()).then(|| w.node_selector.clone()),
            tolerations: (!w.tolerations.is_empty()).then(|| w.tolerations.clone()),
            affinity: w.affinity.clone(),
            // buildkitd needs nothing from the API server.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: rootless.then(|| PodSecurityContext {
                fs_group: Some(ROOTLESS_UID),
                ..PodSecurityContext::default()
            }),
            restart_policy: (w.kind == WorkloadKind::Job).then(|| "Never".into()),
            ..PodSpec::default()
        }),
    }
}

/// The Deployment; `replicas` only when creating it.
pub fn deployment(pool: &BuildKitPool, replicas: Option<i32>, inputs: &Inputs) -> Deployment {
    let names = PoolNames::of(pool);
    Deployment {
        metadata: owned_meta(pool, names.buildkitd()),
        spec: Some(DeploymentSpec {
            replicas,
            selector: label_selector(pool),
            template: pod_template(pool, inputs),
            // A new pod must be ready before an old one, still serving builds, goes.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(k8s_openapi::api::apps::v1::RollingUpdateDeployment {
                    max_surge: Some(
                        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1),
                    ),
                    max_unavailable: Some(
                        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0),
                    ),
                }),
            }),
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// The StatefulSet with its cache claim template; `replicas` only when creating it.
pub fn stateful_set(pool: &BuildKitPool, replicas: Option<i32>, inputs: &Inputs) -> StatefulSet {
    let names = PoolNames::of(pool);
    let claims = pool.spec.workload.cache.as_ref().map(|cache| {
        vec![PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("cache".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: cache.storage_class_name.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_owned(),
                        Quantity(cache.size.clone()),
                    )])),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            status: None,
        }]
    });
    StatefulSet {
        metadata: owned_meta(pool, names.buildkitd()),
        spec: Some(StatefulSetSpec {
            replicas,
            selector: label_selector(pool),
            service_name: Some(names.buildkitd()),
            // Waking to N replicas must not wait for each one in turn.
            pod_management_policy: Some("Parallel".into()),
            template: pod_template(pool, inputs),
            volume_claim_templates: claims,
            ..StatefulSetSpec::default()
        }),
        status: None,
    }
}

/// The Job that serves one wake of a Job pool (started by the scaler, deleted when idle).
pub fn job_for_wake(pool: &BuildKitPool, wake: &str, inputs: &Inputs) -> Job {
    let names = PoolNames::of(pool);
    let mut metadata = owned_meta(pool, format!("{}-{wake}", names.buildkitd()));
    metadata
        .labels
        .get_or_insert_default()
        .insert(WAKE_LABEL.into(), wake.into());
    let mut template = pod_template(pool, inputs);
    if let Some(meta) = template.metadata.as_mut() {
        meta.labels
            .get_or_insert_default()
            .insert(WAKE_LABEL.into(), wake.into());
    }
    Job {
        metadata,
        spec: Some(JobSpec {
            parallelism: Some(1),
            completions: Some(1),
            backoff_limit: Some(0),
            template,
            ..JobSpec::default()
        }),
        status: None,
    }
}

/// Starts the Job serving wake `wake` of a Job pool. Idempotent: a second call for the same
/// wake finds the Job there and succeeds. (Called by the scaler's Kubernetes driver.)
pub async fn start_wake_job(
    client: &kube::Client,
    pool: &BuildKitPool,
    wake: &str,
) -> Result<(), Error> {
    let names = PoolNames::of(pool);
    let job = job_for_wake(pool, wake, &Inputs::default());
    let api: Api<Job> = Api::namespaced(client.clone(), &names.namespace);
    let params = PostParams {
        field_manager: Some(super::FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    match api.create(&params, &job).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(source) => Err(write_error::<Job>(
            &names.namespace,
            &job.name_any(),
            source,
        )),
    }
}

/// Deletes every wake Job of a Job pool, and their pods with them (the pool went idle).
/// Returns how many were deleted.
pub async fn delete_wake_jobs(client: &kube::Client, pool: &BuildKitPool) -> Result<usize, Error> {
    let names = PoolNames::of(pool);
    let api: Api<Job> = Api::namespaced(client.clone(), &names.namespace);
    let selector = format!(
        "{},{}={}",
        super::objects::MANAGED_SELECTOR,
        super::objects::POOL_LABEL,
        names.pool
    );
    let jobs = api
        .list(&kube::api::ListParams::default().labels(&selector))
        .await
        .map_err(|source| write_error::<Job>(&names.namespace, "(list)", source))?;
    let mut deleted = 0;
    for job in jobs {
        match api
            .delete(&job.name_any(), &DeleteParams::background())
            .await
        {
            Ok(_) => deleted += 1,
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(Error::Delete {
                    reconciler: RECONCILER,
                    kind: "Job",
                    namespace: names.namespace.clone(),
                    name: job.name_any(),
                    source,
                });
            }
        }
    }
    Ok(deleted)
}

/// What the pod template depends on: the configuration this pass applied, and the TLS
/// certificate from the cache. `None` while the certificate's Secret is not in the cache yet
/// (the PKI reconciler has just created it): a template applied now would carry the hash of
/// nothing, and a second revision, replacing the first pod, would follow the moment the
/// Secret arrived. Its arrival reconciles the pool again.
pub fn inputs(pool: &BuildKitPool, ctx: &Context) -> Option<Inputs> {
    let names = PoolNames::of(pool);
    let config = buildkitd::desired(pool);
    let config_text = config.data.as_ref().and_then(|d| d.get(CONFIG_KEY));
    let tls_name = match pool.spec.gateway.mode {
        GatewayMode::Passthrough => names.gateway_tls(),
        GatewayMode::Terminate => names.buildkitd_tls(),
    };
    let tls = ctx.stores.secret(&names.namespace, &tls_name)?;
    let cert = tls.data.as_ref()?.get("tls.crt")?;
    Some(Inputs {
        config_hash: content_hash(&[config_text.map_or(&[][..], |t| t.as_bytes())]),
        tls_hash: content_hash(&[&cert.0]),
    })
}

pub async fn reconcile(pool: &BuildKitPool, ctx: &Context) -> Result<(), Error> {
    let names = PoolNames::of(pool);
    let (ns, name) = (names.namespace.as_str(), names.buildkitd());
    let kind = pool.spec.workload.kind;
    if kind != WorkloadKind::Deployment && cached(&ctx.stores.deployments, ns, &name).is_some() {
        delete::<Deployment>(ctx, ns, &name).await?;
    }
    if kind != WorkloadKind::StatefulSet && cached(&ctx.stores.stateful_sets, ns, &name).is_some() {
        delete::<StatefulSet>(ctx, ns, &name).await?;
    }
    let Some(inputs) = inputs(pool, ctx) else {
        tracing::debug!(namespace = ns, workload = %name, "TLS Secret not cached yet; the workload waits for it");
        return Ok(());
    };
    let min = Some(pool.spec.scaling.min_replicas);
    match kind {
        WorkloadKind::Deployment => {
            let current = cached(&ctx.stores.deployments, ns, &name);
            let desired = |r| deployment(pool, r, &inputs);
            ensure(ctx, ns, current.as_deref(), desired(min), desired(None)).await
        }
        WorkloadKind::StatefulSet => {
            let current = cached(&ctx.stores.stateful_sets, ns, &name);
            let desired = |r| stateful_set(pool, r, &inputs);
            ensure(ctx, ns, current.as_deref(), desired(min), desired(None)).await
        }
        // Jobs exist only while awake; the scaler starts and deletes them.
        WorkloadKind::Job => Ok(()),
    }
}

/// Creates `create` when nothing is cached, else applies `apply` if it changed anything.
async fn ensure<K>(
    ctx: &Context,
    ns: &str,
    current: Option<&K>,
    create: K,
    apply: K,
) -> Result<(), Error>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let Some(current) = current else {
        let params = PostParams {
            field_manager: Some(super::FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        match api.create(&params, &create).await {
            Ok(_) => {
                ctx.metrics.wrote(RECONCILER);
                return Ok(());
            }
            // The cache lags a create of ours: fall through to an apply.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(source) => return Err(write_error::<K>(ns, &create.name_any(), source)),
        }
        apply::apply(&api, RECONCILER, &apply, None).await?;
        ctx.metrics.wrote(RECONCILER);
        return Ok(());
    };
    if apply::apply(&api, RECONCILER, &apply, Some(current)).await? == Outcome::Applied {
        ctx.metrics.wrote(RECONCILER);
    }
    Ok(())
}

async fn delete<K>(ctx: &Context, ns: &str, name: &str) -> Result<(), Error>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => ctx.metrics.wrote(RECONCILER),
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(source) => {
            return Err(Error::Delete {
                reconciler: RECONCILER,
                kind: kind_of::<K>(),
                namespace: ns.into(),
                name: name.into(),
                source,
            });
        }
    }
    Ok(())
}

fn write_error<K: kube::Resource<DynamicType = ()>>(
    ns: &str,
    name: &str,
    source: kube::Error,
) -> Error {
    Error::Write {
        reconciler: RECONCILER,
        kind: kind_of::<K>(),
        namespace: ns.into(),
        name: name.into(),
        source,
    }
}

fn container(pool: &BuildKitPool, rootless: bool) -> Container {
    let w = &pool.spec.workload;
    let data_dir = if rootless {
        "/home/user/.local/share/buildkit"
    } else {
        "/var/lib/buildkit"
    };
    let mut args = vec![
        format!("--addr={SOCKET}"),
        format!("--addr=tcp://0.0.0.0:{BUILDKITD_PORT}"),
        format!("--tlscert={TLS_DIR}/tls.crt"),
        format!("--tlskey={TLS_DIR}/tls.key"),
        format!("--tlscacert={TLS_DIR}/ca.crt"),
        format!("--config={CONFIG_DIR}/{CONFIG_KEY}"),
        // Named, not left to the image's user and defaults: the cache volume is mounted
        // here, and a StatefulSet's claim keeps it across sleep.
        format!("--root={data_dir}"),
    ];
    if rootless {
        args.push("--oci-worker-no-process-sandbox".into());
    }
    args.extend(w.args.iter().cloned());
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    };
    Container {
        name: "buildkitd".into(),
        image: Some(w.image.clone()),
        args: Some(args),
        ports: Some(vec![ContainerPort {
            name: Some("buildkitd".into()),
            container_port: BUILDKITD_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        // Ready means buildkitd answers a gRPC call, not merely that the process exists. For
        // Endpoints, the pool's status and rollouts: a wake does not wait for it (the gateway
        // probes a Running pod itself, see gateway::starting), so it may stay slow and cheap.
        readiness_probe: Some(probe(2, 5)),
        liveness_probe: Some(probe(30, 30)),
        resources: w.resources.clone(),
        security_context: Some(if rootless {
            SecurityContext {
                run_as_user: Some(ROOTLESS_UID),
                run_as_group: Some(ROOTLESS_UID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "Unconfined".into(),
                    ..SeccompProfile::default()
                }),
                ..SecurityContext::default()
            }
        } else {
            SecurityContext {
                privileged: Some(true),
                ..SecurityContext::default()
            }
        }),
        volume_mounts: Some(vec![
            mount("config", CONFIG_DIR, true),
            mount("tls", TLS_DIR, true),
            mount("run", "/run/buildkit", false),
            mount("cache", data_dir, false),
        ]),
        ..Container::default()
    }
}

fn probe(initial_delay: i32, period: i32) -> Probe {
    let command = ["buildctl", "--addr", SOCKET, "debug", "workers"];
    Probe {
        exec: Some(ExecAction {
            command: Some(command.map(String::from).to_vec()),
        }),
        initial_delay_seconds: Some(initial_delay),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

fn empty_dir(name: &str) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }
}

fn label_selector(pool: &BuildKitPool) -> LabelSelector {
    LabelSelector {
        match_labels: Some(selector(pool)),
        ..LabelSelector::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{BuildKitPoolSpec, CacheVolume};
    use crate::operator::objects::fixtures;

    fn spec_of(pool: &BuildKitPool) -> PodSpec {
        pod_template(pool, &Inputs::default()).spec.unwrap()
    }

    #[test]
    fn a_deployment_sets_replicas_only_when_created() {
        let mut spec = BuildKitPoolSpec::default();
        spec.scaling.min_replicas = 1;
        let pool = fixtures::pool("a", spec);
        let created = deployment(&pool, Some(1), &Inputs::default());
        assert_eq!(created.spec.as_ref().unwrap().replicas, Some(1));
        let applied = serde_json::to_value(deployment(&pool, None, &Inputs::default())).unwrap();
        assert!(applied["spec"].get("replicas").is_none(), "{applied}");
        assert_eq!(
            applied["spec"]["selector"]["matchLabels"]["bkpool.dev/pool"],
            "a"
        );
    }

    #[test]
    fn buildkitd_gets_backend_mtls_a_socket_probe_and_its_config() {
        let pool = fixtures::pool("a", BuildKitPoolSpec::default());
        let pod = spec_of(&pool);
        let c = &pod.containers[0];
        let args = c.args.as_ref().unwrap();
        assert!(args.contains(&"--tlscacert=/etc/bkpool/tls/ca.crt".to_owned()));
        assert!(args.contains(&"--oci-worker-no-process-sandbox".to_owned()));
        let cache = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "cache");
        let root = format!("--root={}", cache.unwrap().mount_path);
        assert!(
            args.contains(&root),
            "state where the cache volume is: {args:?}"
        );
        let probe = c.readiness_probe.as_ref().unwrap().exec.as_ref().unwrap();
        assert_eq!(
            probe.command.as_ref().unwrap()[3..],
            ["debug".to_owned(), "workers".to_owned()]
        );
        let tls = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "tls")
            .unwrap();
        assert_eq!(
            tls.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("a-buildkitd-tls")
        );
        assert_eq!(c.security_context.as_ref().unwrap().run_as_user, Some(1000));
        assert_eq!(pod.automount_service_account_token, Some(false));
    }

    #[test]
    fn passthrough_mounts_the_client_facing_certificate_and_privileged_is_privileged() {
        let mut spec = BuildKitPoolSpec::default();
        spec.gateway.mode = GatewayMode::Passthrough;
        spec.workload.security = SecurityMode::Privileged;
        let pod = spec_of(&fixtures::pool("a", spec));
        let tls = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "tls")
            .unwrap();
        assert_eq!(
            tls.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("a-gateway-tls")
        );
        let sc = pod.containers[0].security_context.as_ref().unwrap();
        assert_eq!(sc.privileged, Some(true));
        assert!(
            !pod.containers[0]
                .args
                .as_ref()
                .unwrap()
                .iter()
                .any(|a| a.contains("no-process-sandbox"))
        );
    }

    #[test]
    fn a_stateful_set_claims_cache_per_replica_through_its_headless_service() {
        let mut spec = BuildKitPoolSpec::default();
        spec.workload.kind = WorkloadKind::StatefulSet;
        spec.workload.cache = Some(CacheVolume {
            size: "50Gi".into(),
            storage_class_name: Some("fast".into()),
        });
        let pool = fixtures::pool("a", spec);
        let sts = stateful_set(&pool, None, &Inputs::default());
        let s = sts.spec.unwrap();
        assert_eq!(s.service_name.as_deref(), Some("a-buildkitd"));
        let claim = &s.volume_claim_templates.unwrap()[0];
        assert_eq!(claim.metadata.name.as_deref(), Some("cache"));
        let pvc = claim.spec.as_ref().unwrap();
        assert_eq!(
            pvc.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0,
            "50Gi"
        );
        // The cache volume comes from the claim, not an emptyDir.
        let volumes = s.template.spec.unwrap().volumes.unwrap();
        assert!(!volumes.iter().any(|v| v.name == "cache"));
    }

    #[test]
    fn a_wake_job_runs_one_pod_that_is_never_restarted() {
        let mut spec = BuildKitPoolSpec::default();
        spec.workload.kind = WorkloadKind::Job;
        let job = job_for_wake(&fixtures::pool("a", spec), "w1", &Inputs::default());
        assert_eq!(job.metadata.name.as_deref(), Some("a-buildkitd-w1"));
        let s = job.spec.unwrap();
        assert_eq!((s.parallelism, s.backoff_limit), (Some(1), Some(0)));
        assert_eq!(
            s.template.spec.unwrap().restart_policy.as_deref(),
            Some("Never")
        );
        assert_eq!(job.metadata.labels.unwrap()[WAKE_LABEL], "w1");
    }

    #[test]
    fn scheduling_fields_reach_the_pod() {
        let mut spec = BuildKitPoolSpec::default();
        spec.workload
            .node_selector
            .insert("pool".into(), "builders".into());
        spec.workload.args = vec!["--debug".into()];
        let pod = spec_of(&fixtures::pool("a", spec));
        assert_eq!(pod.node_selector.unwrap()["pool"], "builders");
        assert_eq!(
            pod.containers[0].args.as_ref().unwrap().last().unwrap(),
            "--debug"
        );
    }
}
