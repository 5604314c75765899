//! deploy/ checked without a cluster: every manifest parses as its typed kind (the
//! PodDisruptionBudgets as policy/v1, which Kubernetes 1.20 does not serve), the kustomize
//! resources exist, the Helm chart's CRD is the generated one, the chart renders with its
//! default values to the kustomize objects (but for the differences listed in
//! `CHART_VS_KUSTOMIZE`), RBAC grants what the reconcilers use and no more, the gateway's admin
//! port is closed to all but the controller and monitoring, and the Grafana dashboard names
//! only metrics that exist.

mod helm;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    docs_in(&text, path)
}

/// The YAML documents of `text`, read from `path`.
fn docs_in(text: &str, path: &Path) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| {
            serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Deserializes `doc` as `K` and checks nothing was dropped on the way (an unknown or
/// misspelt field would be).
fn typed<K: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value, file: &Path) {
    let parsed: K =
        serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let back = serde_json::to_value(parsed).unwrap();
    assert!(
        subset(doc, &back),
        "{}: fields lost parsing {}:\n{doc:#}\nvs\n{back:#}",
        file.display(),
        doc["kind"]
    );
}

fn subset(wanted: &Value, actual: &Value) -> bool {
    match (wanted, actual) {
        (Value::Object(w), Value::Object(a)) => w
            .iter()
            .all(|(k, v)| a.get(k).is_some_and(|x| subset(v, x))),
        (Value::Array(w), Value::Array(a)) => {
            w.len() == a.len() && w.iter().zip(a).all(|(x, y)| subset(x, y))
        }
        (Value::Number(w), Value::Number(a)) => w.as_f64() == a.as_f64(),
        (w, a) => w == a,
    }
}

#[test]
fn every_kustomize_manifest_is_a_valid_typed_object() {
    let dir = deploy().join("kustomize");
    let mut kinds = BTreeSet::new();
    for file in [
        "namespace.yaml",
        "rbac-controller.yaml",
        "rbac-gateway.yaml",
        "controller.yaml",
        "gateway.yaml",
    ] {
        let path = dir.join(file);
        for doc in docs(&path) {
            let kind = doc["kind"].as_str().unwrap().to_owned();
            match kind.as_str() {
                "Namespace" => typed::<Namespace>(&doc, &path),
                "ServiceAccount" => typed::<ServiceAccount>(&doc, &path),
                "ClusterRole" => typed::<ClusterRole>(&doc, &path),
                "ClusterRoleBinding" => typed::<ClusterRoleBinding>(&doc, &path),
                "Role" => typed::<Role>(&doc, &path),
                "RoleBinding" => typed::<RoleBinding>(&doc, &path),
                "Deployment" => {
                    typed::<Deployment>(&doc, &path);
                    assert_eq!(doc["spec"]["replicas"], 2, "{file}: two replicas");
                    let anti = &doc["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"];
                    assert!(!anti.is_null(), "{file}: anti-affinity");
                    assert_eq!(
                        doc["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
                        true
                    );
                }
                "Service" => typed::<Service>(&doc, &path),
                "ConfigMap" => typed::<ConfigMap>(&doc, &path),
                "NetworkPolicy" => typed::<NetworkPolicy>(&doc, &path),
                "PodDisruptionBudget" => {
                    assert_eq!(doc["apiVersion"], "policy/v1");
                    typed::<PodDisruptionBudget>(&doc, &path);
                }
                other => panic!("{file}: unexpected kind {other}"),
            }
            kinds.insert(kind);
        }
    }
    assert!(
        kinds.contains("PodDisruptionBudget") && kinds.contains("ClusterRole"),
        "{kinds:?}"
    );
    for doc in docs(&dir.join("kustomization.yaml")) {
        for resource in doc["resources"].as_array().unwrap() {
            let path = dir.join(resource.as_str().unwrap());
            assert!(
                path.exists(),
                "kustomization names missing {}",
                path.display()
            );
        }
    }
    for example in ["deployment-pool.yaml", "statefulset-pool.yaml"] {
        for doc in docs(&dir.join("examples").join(example)) {
            let pool: control::crd::BuildKitPool = serde_json::from_value(doc).unwrap();
            assert_eq!(control::crd::validate(&pool.spec), vec![], "{example}");
        }
    }
}

#[test]
fn the_helm_chart_ships_the_generated_crd() {
    let copy = deploy().join("helm/bkpool/crds/buildkitpools.bkpool.dev.yaml");
    let text = std::fs::read_to_string(&copy).unwrap_or_default();
    assert!(
        text == control::crd::yaml::crd_yaml(),
        "{} is stale; regenerate with: cargo run -- crd > deploy/crds/buildkitpools.bkpool.dev.yaml && cp deploy/crds/buildkitpools.bkpool.dev.yaml deploy/helm/bkpool/crds/",
        copy.display()
    );
}

#[test]
fn only_the_controller_and_monitoring_reach_the_gateway_admin_port() {
    let path = deploy().join("kustomize/gateway.yaml");
    let manifests = docs(&path);
    let of_kind = |kind: &str| manifests.iter().find(|d| d["kind"] == kind).unwrap();
    let policy = of_kind("NetworkPolicy");
    typed::<NetworkPolicy>(policy, &path);
    let gateway = of_kind("Deployment");
    let controller = docs(&deploy().join("kustomize/controller.yaml"))
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .unwrap();
    let port = |name: &str| {
        let ports = gateway["spec"]["template"]["spec"]["containers"][0]["ports"].clone();
        let ports = ports.as_array().unwrap().clone();
        let port = ports.into_iter().find(|p| p["name"] == name).unwrap();
        port["containerPort"].clone()
    };
    let (buildkit, admin) = (port("buildkit"), port("admin"));
    let config = of_kind("ConfigMap")["data"]["gateway.toml"]
        .as_str()
        .unwrap();
    assert!(
        config.contains(&format!("admin = \"0.0.0.0:{admin}\"")),
        "{config}"
    );

    let spec = &policy["spec"];
    let pod_labels = &gateway["spec"]["template"]["metadata"]["labels"];
    assert!(
        subset(&spec["podSelector"]["matchLabels"], pod_labels),
        "{spec}"
    );
    assert_eq!(spec["policyTypes"], serde_json::json!(["Ingress"]));
    let rules = spec["ingress"].as_array().unwrap();
    let ports_of = |rule: &Value| -> Vec<Value> {
        let ports = rule["ports"]
            .as_array()
            .expect("every rule names its ports");
        ports.iter().map(|p| p["port"].clone()).collect()
    };
    // Clients reach the gateway port from anywhere, and nothing else is open to anyone.
    let open: Vec<&Value> = rules.iter().filter(|r| r["from"].is_null()).collect();
    assert_eq!(open.len(), 1, "{spec}");
    assert_eq!(ports_of(open[0]), vec![buildkit], "{spec}");
    // The admin port: controller pods (in the gateway's namespace) and the monitoring namespace.
    let admin_rules: Vec<&Value> = rules
        .iter()
        .filter(|r| ports_of(r).contains(&admin))
        .collect();
    assert_eq!(admin_rules.len(), 1, "{spec}");
    let peers = admin_rules[0]["from"].as_array().unwrap();
    assert_eq!(peers.len(), 2, "{spec}");
    let controller_labels = &controller["spec"]["template"]["metadata"]["labels"];
    assert!(peers[0]["namespaceSelector"].is_null(), "{spec}");
    assert!(subset(
        &peers[0]["podSelector"]["matchLabels"],
        controller_labels
    ));
    assert!(peers[1]["podSelector"].is_null(), "{spec}");
    assert_eq!(
        peers[1]["namespaceSelector"]["matchLabels"],
        serde_json::json!({"kubernetes.io/metadata.name": "monitoring"})
    );
}

/// What the chart, rendered with its default values, may have that kustomize has not (or the
/// other way round), each with its reason. Any other difference is drift: fix the wrong side.
const CHART_VS_KUSTOMIZE: &[Allowed] = &[
    Allowed {
        only_in: Side::Chart,
        object: "*",
        at: At::Field("/metadata/labels/helm.sh~1chart"),
        why: "Helm's bookkeeping label, on every object the chart renders",
    },
    Allowed {
        only_in: Side::Chart,
        object: "*",
        at: At::Field("/metadata/labels/app.kubernetes.io~1managed-by"),
        why: "Helm's bookkeeping label, on every object the chart renders",
    },
    Allowed {
        only_in: Side::Kustomize,
        object: "v1 Namespace bkpool-system",
        at: At::Object,
        why: "Helm installs into a release namespace it does not create (--create-namespace)",
    },
    Allowed {
        only_in: Side::Chart,
        object: "apps/v1 Deployment bkpool-system/bkpool-controller",
        at: At::Item(
            "/spec/template/spec/containers/0/args",
            "--gateway-namespace-label=kubernetes.io/metadata.name=bkpool-system",
        ),
        why: "the chart cannot label its release namespace bkpool.dev/system=true (the \
              default) as kustomize does, so pool NetworkPolicies know it by its name label",
    },
];

#[derive(Debug)]
enum Side {
    Chart,
    Kustomize,
}

#[derive(Debug)]
enum At {
    /// The whole object.
    Object,
    /// A field, as a JSON pointer.
    Field(&'static str),
    /// A string in the list at a JSON pointer.
    Item(&'static str, &'static str),
}

struct Allowed {
    only_in: Side,
    /// "apiVersion Kind namespace/name" (cluster-wide: "apiVersion Kind name"), or "*": every
    /// object that has it.
    object: &'static str,
    at: At,
    why: &'static str,
}

#[test]
fn the_helm_chart_renders_the_kustomize_objects() {
    let (mut chart, mut kustomize) = (chart_objects(), kustomize_objects());
    for allowed in CHART_VS_KUSTOMIZE {
        let side = match allowed.only_in {
            Side::Chart => &mut chart,
            Side::Kustomize => &mut kustomize,
        };
        let applied = allow(side, allowed);
        assert!(
            applied > 0 && (allowed.object == "*" || applied == 1),
            "CHART_VS_KUSTOMIZE is stale: {:?} only in {} of {:?} applied {applied} times ({})",
            allowed.at,
            allowed.object,
            allowed.only_in,
            allowed.why
        );
    }
    let mut drift = Vec::new();
    for id in chart
        .keys()
        .chain(kustomize.keys())
        .collect::<BTreeSet<_>>()
    {
        match (chart.get(id), kustomize.get(id)) {
            (Some(c), Some(k)) => {
                let mut found = Vec::new();
                differences("", Some(c), Some(k), &mut found);
                drift.extend(found.into_iter().map(|d| format!("{id}: {d}")));
            }
            (Some(_), None) => drift.push(format!("{id}: only in the chart")),
            _ => drift.push(format!("{id}: only in kustomize")),
        }
    }
    assert!(
        drift.is_empty(),
        "the Helm chart (default values) and deploy/kustomize differ; fix the wrong one, or \
         list a legitimate difference in CHART_VS_KUSTOMIZE:\n  {}",
        drift.join("\n  ")
    );
}

/// What `helm install -n bkpool-system` creates with the chart's default values on a cluster
/// serving policy/v1 and the Prometheus Operator's ServiceMonitor: the rendered templates and
/// the CRDs of crds/.
fn chart_objects() -> BTreeMap<String, Value> {
    let chart = deploy().join("helm/bkpool");
    let release = helm::Release {
        namespace: "bkpool-system",
        api_versions: &[
            "policy/v1/PodDisruptionBudget",
            "monitoring.coreos.com/v1/ServiceMonitor",
        ],
    };
    let mut objects = Vec::new();
    for (template, text) in helm::render_chart(&chart, &release) {
        objects.extend(docs_in(&text, &template));
    }
    for crd in std::fs::read_dir(chart.join("crds")).unwrap() {
        objects.extend(docs(&crd.unwrap().path()));
    }
    by_id(objects)
}

/// What `kubectl apply -k deploy/kustomize` and `-k deploy/kustomize/monitoring` create.
fn kustomize_objects() -> BTreeMap<String, Value> {
    let dir = deploy().join("kustomize");
    let mut objects = kustomization(&dir);
    objects.extend(kustomization(&dir.join("monitoring")));
    by_id(objects)
}

/// The resources of `dir`'s kustomization.yaml, files or other kustomizations.
fn kustomization(dir: &Path) -> Vec<Value> {
    let [file]: [Value; 1] = docs(&dir.join("kustomization.yaml")).try_into().unwrap();
    for key in file.as_object().unwrap().keys() {
        assert!(
            ["apiVersion", "kind", "resources"].contains(&key.as_str()),
            "{}: this test does not apply `{key}`",
            dir.display()
        );
    }
    let resources = file["resources"].as_array().unwrap().iter();
    resources
        .flat_map(|resource| {
            let path = dir.join(resource.as_str().unwrap());
            if path.is_dir() {
                kustomization(&path)
            } else {
                docs(&path)
            }
        })
        .collect()
}

/// Objects by "apiVersion Kind namespace/name" ("apiVersion Kind name" if cluster-wide).
fn by_id(objects: Vec<Value>) -> BTreeMap<String, Value> {
    let mut by_id = BTreeMap::new();
    for object in objects {
        let field = |v: &Value| v.as_str().map(str::to_owned);
        let meta = &object["metadata"];
        let name = field(&meta["name"]).unwrap_or_else(|| panic!("unnamed: {object}"));
        let name = match field(&meta["namespace"]) {
            Some(ns) => format!("{ns}/{name}"),
            None => name,
        };
        let (api, kind) = (field(&object["apiVersion"]), field(&object["kind"]));
        let id = format!("{} {} {name}", api.unwrap(), kind.unwrap());
        assert!(by_id.insert(id.clone(), object).is_none(), "{id} twice");
    }
    by_id
}

/// Takes what `allowed` lets its side have out of that side's objects; returns how many it
/// was taken out of.
fn allow(objects: &mut BTreeMap<String, Value>, allowed: &Allowed) -> usize {
    let field = match allowed.at {
        At::Object => return usize::from(objects.remove(allowed.object).is_some()),
        At::Field(_) | At::Item(..) => &allowed.at,
    };
    objects
        .iter_mut()
        .filter(|(id, _)| allowed.object == "*" || *id == allowed.object)
        .map(|(_, object)| take(object, field))
        .filter(|taken| *taken)
        .count()
}

fn take(object: &mut Value, at: &At) -> bool {
    match *at {
        At::Object => unreachable!("objects are taken by id"),
        At::Field(pointer) => {
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            let key = key.replace("~1", "/").replace("~0", "~");
            let parent = object.pointer_mut(parent).and_then(Value::as_object_mut);
            parent.and_then(|p| p.remove(&key)).is_some()
        }
        At::Item(pointer, item) => {
            let Some(list) = object.pointer_mut(pointer).and_then(Value::as_array_mut) else {
                return false;
            };
            let before = list.len();
            list.retain(|v| v != item);
            list.len() < before
        }
    }
}

/// Where two versions of an object differ, as "path: chart …, kustomize …".
fn differences(
    path: &str,
    chart: Option<&Value>,
    kustomize: Option<&Value>,
    out: &mut Vec<String>,
) {
    match (chart, kustomize) {
        (Some(Value::Object(c)), Some(Value::Object(k))) => {
            for key in c.keys().chain(k.keys()).collect::<BTreeSet<_>>() {
                differences(&format!("{path}.{key}"), c.get(key), k.get(key), out);
            }
        }
        (Some(Value::Array(c)), Some(Value::Array(k))) if c.len() == k.len() => {
            for (i, (c, k)) in c.iter().zip(k).enumerate() {
                differences(&format!("{path}[{i}]"), Some(c), Some(k), out);
            }
        }
        (Some(c), Some(k)) if subset(c, k) => {}
        (c, k) => {
            let show = |v: Option<&Value>| v.map_or("(absent)".to_owned(), Value::to_string);
            out.push(format!("{path}: chart {}, kustomize {}", show(c), show(k)));
        }
    }
}

#[test]
fn the_controller_may_not_read_pods_or_delete_secrets() {
    let path = deploy().join("kustomize/rbac-controller.yaml");
    let role = docs(&path)
        .into_iter()
        .find(|d| d["kind"] == "ClusterRole")
        .unwrap();
    for rule in role["rules"].as_array().unwrap() {
        let resources: Vec<&str> = rule["resources"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let verbs: Vec<&str> = rule["verbs"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            !resources.contains(&"pods") && !resources.contains(&"*"),
            "{rule}"
        );
        assert!(
            !verbs.contains(&"*") && !verbs.contains(&"escalate") && !verbs.contains(&"bind"),
            "{rule}"
        );
        if resources.contains(&"secrets") {
            assert!(
                !verbs.contains(&"delete") && !verbs.contains(&"get"),
                "{rule}"
            );
        }
    }
}

#[test]
fn the_dashboard_names_only_real_metrics() {
    let exposed = exposed_metric_names();
    let path = deploy().join("grafana/bkpool.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let text = dashboard.to_string();
    let mut used = BTreeSet::new();
    for (i, _) in text.match_indices("bkpool_") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        used.insert(name);
    }
    assert!(used.len() > 15, "{used:?}");
    let unknown: Vec<&String> = used.iter().filter(|n| !exposed.contains(*n)).collect();
    assert!(
        unknown.is_empty(),
        "dashboard uses metrics nothing exposes: {unknown:?}\nexposed: {exposed:?}"
    );
    assert!(
        used.iter().any(|n| n.starts_with("bkpool_gateway_"))
            && used.iter().any(|n| n.starts_with("bkpool_controller_"))
    );
}

/// Every sample name the gateway, the controller (both modes' scalers and the Kubernetes
/// gateway's waker) and the certificate API expose, with some of everything recorded (a
/// family shows no sample before its first).
fn exposed_metric_names() -> BTreeSet<String> {
    let mut registry = prometheus_client::registry::Registry::default();
    let activity = Arc::new(proxy::activity::Activity::default());
    let pool = "ci/a".parse::<proxy::names::PoolId>().unwrap();
    activity.pool(&pool);
    let gateway = proxy::metrics::Metrics::register(
        &mut registry,
        activity,
        proxy::admit::Admission::new(10, 10),
    );
    gateway.rejected(Some("ci/a"), "no_route");
    gateway.handshake(Duration::from_millis(1));
    gateway.connection_closed(Duration::from_secs(1));
    gateway.reload("cert", true);
    let controller = control::operator::metrics::Metrics::register(&mut registry);
    controller.reconciled("pki", Duration::from_millis(1));
    controller.failed("pki", "forbidden");
    controller.wrote("pki");
    controller.certificate_expiry("ci/a", "client-ca", SystemTime::now());
    controller.set_leader(true);
    use control::operator::metrics::{Direction, DrainResult};
    controller.scaled("ci/a", Direction::Up, "load");
    controller.drained("ci/a", DrainResult::Confirmed);
    // Local mode's scaler, the Kubernetes gateway's waker, the certificate API.
    let local = control::scale::metrics::Metrics::register(&mut registry);
    local.wake(&pool, "ok");
    local.wake_phase(&pool, "healthy", Duration::from_millis(1));
    local.hold_ended(&pool, Duration::from_millis(1));
    local.scaled(&pool, "up", "wake");
    local.drain_cancelled(&pool);
    let waker = control::gateway::metrics::Metrics::register(&mut registry);
    waker.wake_requested(&pool, control::gateway::upstream::Woke::ScaledUp);
    waker.woke(&pool, Duration::from_millis(1));
    waker.held_for(&pool, Duration::from_millis(1));
    let api = control::certapi::metrics::ApiMetrics::register(&mut registry);
    api.issued("ci/a", "serviceaccount");
    api.denied("ci/a", "access_denied");
    api.wake("ci/a", "certificate", "started");
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}
