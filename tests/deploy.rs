//! deploy/ checked without a cluster: every manifest parses as its typed kind (the
//! PodDisruptionBudgets as policy/v1, which Kubernetes 1.20 does not serve), the kustomize
//! resources exist, the Helm chart's CRD is the generated one, RBAC grants what the
//! reconcilers use and no more, the gateway's admin port is closed to all but the controller
//! and monitoring (kustomize and Helm alike), and the Grafana dashboard names only metrics
//! that exist.

use std::collections::BTreeSet;
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
    serde_yaml::Deserializer::from_str(&text)
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

    // The chart renders the same policy with its default values.
    let chart = deploy().join("helm/bkpool/templates/networkpolicy.yaml");
    let rendered: Value = serde_yaml::from_str(&render_chart(&chart)).unwrap();
    typed::<NetworkPolicy>(&rendered, &chart);
    assert_eq!(
        rendered["spec"], policy["spec"],
        "Helm and kustomize differ"
    );
    assert_eq!(rendered["metadata"]["name"], policy["metadata"]["name"]);
}

/// Renders a chart template with the chart's default values, for the little of Helm's
/// template language the chart's NetworkPolicy uses (`if` on a value, a value, `toJson` of a
/// value, the release namespace, the labels helper): there is no helm binary here, and an
/// expression this does not know fails the test rather than pass unrendered.
fn render_chart(template: &Path) -> String {
    let values_path = deploy().join("helm/bkpool/values.yaml");
    let values: Value =
        serde_yaml::from_str(&std::fs::read_to_string(values_path).unwrap()).unwrap();
    let value = |path: &str| -> Value {
        let path = path
            .strip_prefix(".Values.")
            .unwrap_or_else(|| panic!("{path}"));
        let found = path.split('.').fold(&values, |v, key| &v[key]);
        assert!(!found.is_null(), ".Values.{path} is not in values.yaml");
        found.clone()
    };
    let text = std::fs::read_to_string(template).unwrap();
    let (mut out, mut shown) = (String::new(), vec![true]);
    for line in text.lines() {
        let bare = line.trim();
        if let Some(cond) = bare
            .strip_prefix("{{- if ")
            .and_then(|r| r.strip_suffix(" }}"))
        {
            shown.push(value(cond).as_bool().expect("a boolean condition"));
            continue;
        }
        if bare == "{{- end }}" {
            shown.pop();
            continue;
        }
        if !shown.iter().all(|s| *s) {
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("{{") {
            let end = start + rest[start..].find("}}").expect("a closed expression");
            let expr = &rest[start + 2..end];
            out += &rest[..start];
            if expr.starts_with('-') {
                out.truncate(out.trim_end().len());
            }
            let expr = expr.trim_matches(|c: char| c == '-' || c == ' ');
            out += &match expr {
                ".Release.Namespace" => "bkpool-system".to_owned(),
                "include \"bkpool.labels\" . | nindent 4" => {
                    "\n    app.kubernetes.io/part-of: bkpool".to_owned()
                }
                e if e.starts_with("toJson ") => value(&e["toJson ".len()..]).to_string(),
                e if e.starts_with(".Values.") => match value(e) {
                    Value::String(s) => s,
                    other => other.to_string(),
                },
                other => panic!("{}: cannot render {{{{ {other} }}}}", template.display()),
            };
            rest = &rest[end + 2..];
        }
        out += rest;
        out += "\n";
    }
    out
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
