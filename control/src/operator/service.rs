//! Two Services per pool:
//! - `<pool>-buildkitd`, the backend Service the gateway resolves to buildkitd pods: headless
//!   for a StatefulSet (stable per-pod names), a ClusterIP otherwise;
//! - `<pool>`, the name clients use: an ExternalName alias of the gateway Service, so
//!   `tcp://<pool>.<namespace>.svc:1234` reaches the gateway and names the pool (SNI).

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};

use super::apply::{self, Outcome};
use super::context::{Context, Settings, cached};
use super::error::Error;
use super::objects::{BUILDKITD_PORT, PoolNames, owned_meta, selector};
use crate::crd::{BuildKitPool, WorkloadKind};

const RECONCILER: &str = "service";

/// The backend Service.
pub fn backend(pool: &BuildKitPool) -> Service {
    let names = PoolNames::of(pool);
    let headless = pool.spec.workload.kind == WorkloadKind::StatefulSet;
    Service {
        metadata: owned_meta(pool, names.buildkitd()),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: headless.then(|| "None".into()),
            selector: Some(selector(pool)),
            ports: Some(vec![ServicePort {
                name: Some("buildkitd".into()),
                port: BUILDKITD_PORT,
                target_port: Some(IntOrString::String("buildkitd".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The client-facing alias of the gateway.
pub fn client(pool: &BuildKitPool, settings: &Settings) -> Service {
    let names = PoolNames::of(pool);
    Service {
        metadata: owned_meta(pool, names.client_service()),
        spec: Some(ServiceSpec {
            type_: Some("ExternalName".into()),
            external_name: Some(settings.gateway_host.clone()),
            ports: Some(vec![ServicePort {
                name: Some("buildkit".into()),
                port: settings.gateway_port,
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Where clients connect, for `status.endpoint`.
pub fn endpoint(pool: &BuildKitPool, settings: &Settings) -> String {
    let names = PoolNames::of(pool);
    format!(
        "tcp://{}.{}.svc:{}",
        names.pool, names.namespace, settings.gateway_port
    )
}

pub async fn reconcile(pool: &BuildKitPool, ctx: &Context) -> Result<(), Error> {
    let ns = pool.namespace().unwrap_or_default();
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    for desired in [backend(pool), client(pool, &ctx.settings)] {
        let name = desired.name_any();
        let mut current = cached(&ctx.stores.services, &ns, &name);
        if current
            .as_deref()
            .is_some_and(|c| needs_replacing(c, &desired))
        {
            // clusterIP and the headless choice are immutable: replace the Service.
            let deleted = api.delete(&name, &DeleteParams::foreground()).await;
            match deleted {
                Ok(_) => ctx.metrics.wrote(RECONCILER),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(source) => {
                    return Err(Error::Delete {
                        reconciler: RECONCILER,
                        kind: "Service",
                        namespace: ns,
                        name,
                        source,
                    });
                }
            }
            current = None;
        }
        if apply::apply(&api, RECONCILER, &desired, current.as_deref()).await? == Outcome::Applied {
            ctx.metrics.wrote(RECONCILER);
        }
    }
    Ok(())
}

/// Whether `current` cannot become `desired` in place (headless ↔ ClusterIP, or a type
/// change involving ExternalName, which keeps no cluster IP).
fn needs_replacing(current: &Service, desired: &Service) -> bool {
    let spec = |s: &Service| s.spec.clone().unwrap_or_default();
    let (c, d) = (spec(current), spec(desired));
    let headless = |s: &ServiceSpec| s.cluster_ip.as_deref() == Some("None");
    let external = |s: &ServiceSpec| s.type_.as_deref() == Some("ExternalName");
    headless(&c) != headless(&d) || external(&c) != external(&d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::BuildKitPoolSpec;
    use crate::operator::objects::fixtures;

    #[test]
    fn the_backend_service_is_headless_for_a_stateful_set_only() {
        let mut spec = BuildKitPoolSpec::default();
        let deployment = backend(&fixtures::pool("a", spec.clone()));
        spec.workload.kind = WorkloadKind::StatefulSet;
        let stateful = backend(&fixtures::pool("a", spec));
        assert_eq!(deployment.spec.as_ref().unwrap().cluster_ip, None);
        assert_eq!(
            stateful.spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("None")
        );
        assert!(needs_replacing(&deployment, &stateful));
        assert!(!needs_replacing(&deployment, &deployment));
        let port = &stateful.spec.unwrap().ports.unwrap()[0];
        assert_eq!((port.port, port.name.as_deref()), (1234, Some("buildkitd")));
    }

    #[test]
    fn clients_reach_the_gateway_by_the_pool_name() {
        let pool = fixtures::pool("a", BuildKitPoolSpec::default());
        let settings = Settings::default();
        let svc = client(&pool, &settings);
        assert_eq!(svc.metadata.name.as_deref(), Some("a"));
        let spec = svc.spec.unwrap();
        assert_eq!(
            spec.external_name.as_deref(),
            Some(settings.gateway_host.as_str())
        );
        assert_eq!(endpoint(&pool, &settings), "tcp://a.ci.svc:1234");
    }
}
