//! The NetworkPolicy that lets only gateway pods reach buildkitd: ingress to the pool's pods
//! on the buildkitd port from pods with the gateway's labels in the gateway's namespace,
//! nothing else (not even other pods of the pool's namespace).

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kube::api::Api;

use super::apply::{self, Outcome};
use super::context::{Context, Settings, cached};
use super::error::Error;
use super::objects::{BUILDKITD_PORT, PoolNames, owned_meta, selector};
use crate::crd::BuildKitPool;

const RECONCILER: &str = "netpol";

pub fn desired(pool: &BuildKitPool, settings: &Settings) -> NetworkPolicy {
    let names = PoolNames::of(pool);
    let labels = |l: &std::collections::BTreeMap<String, String>| LabelSelector {
        match_labels: Some(l.clone()),
        ..LabelSelector::default()
    };
    NetworkPolicy {
        metadata: owned_meta(pool, names.buildkitd()),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(labels(&selector(pool))),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                // One peer with both selectors: gateway pods *in* the gateway namespace.
                from: Some(vec![NetworkPolicyPeer {
                    namespace_selector: Some(labels(&settings.gateway_namespace_labels)),
                    pod_selector: Some(labels(&settings.gateway_pod_labels)),
                    ..NetworkPolicyPeer::default()
                }]),
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(BUILDKITD_PORT)),
                    protocol: Some("TCP".into()),
                    ..NetworkPolicyPort::default()
                }]),
            }]),
            ..NetworkPolicySpec::default()
        }),
    }
}

pub async fn reconcile(pool: &BuildKitPool, ctx: &Context) -> Result<(), Error> {
    let ns = pool.namespace().unwrap_or_default();
    let desired = desired(pool, &ctx.settings);
    let current = cached(&ctx.stores.network_policies, &ns, &desired.name_any());
    let api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    if apply::apply(&api, RECONCILER, &desired, current.as_deref()).await? == Outcome::Applied {
        ctx.metrics.wrote(RECONCILER);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::BuildKitPoolSpec;
    use crate::operator::objects::fixtures;

    #[test]
    fn only_gateway_pods_in_the_gateway_namespace_reach_buildkitd() {
        let np = desired(
            &fixtures::pool("a", BuildKitPoolSpec::default()),
            &Settings::default(),
        );
        let spec = serde_json::to_value(np.spec.unwrap()).unwrap();
        assert_eq!(spec["podSelector"]["matchLabels"]["bkpool.dev/pool"], "a");
        assert_eq!(spec["policyTypes"], serde_json::json!(["Ingress"]));
        let rules = spec["ingress"].as_array().unwrap();
        assert_eq!(rules.len(), 1);
        let peers = rules[0]["from"].as_array().unwrap();
        assert_eq!(
            peers.len(),
            1,
            "one peer: namespace AND pod selector, not either"
        );
        assert_eq!(
            peers[0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
            "bkpool-gateway"
        );
        assert_eq!(
            peers[0]["namespaceSelector"]["matchLabels"]["bkpool.dev/system"],
            "true"
        );
        assert_eq!(rules[0]["ports"][0]["port"], 1234);
    }
}
