//! Semantic validation: what the OpenAPI schema cannot say (Kubernetes 1.20 has no CEL).
//! Every fault is collected with its field path, so one status update tells the user all of
//! them; the reconcilers act on nothing but the `Validated` condition while any remain.

use std::fmt;

use super::BuildKitPool;
use super::duration;
use super::spec::{AuthMode, Balance, BuildKitPoolSpec, GatewayMode, WorkloadKind};

/// One thing wrong with a spec, at a field path like `spec.scaling.minReplicas`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every fault in `spec`; empty when the pool can be reconciled.
pub fn validate(spec: &BuildKitPoolSpec) -> Vec<Fault> {
    let mut faults = Faults(Vec::new());
    workload(spec, &mut faults);
    buildkitd(spec, &mut faults);
    scaling(spec, &mut faults);
    gateway(spec, &mut faults);
    tls(spec, &mut faults);
    auth(spec, &mut faults);
    faults.0
}

/// Every fault of `pool`: its spec's, and those that depend on the namespace it lives in.
pub fn validate_pool(pool: &BuildKitPool) -> Vec<Fault> {
    let mut faults = Faults(validate(&pool.spec));
    let namespace = pool.metadata.namespace.as_deref().unwrap_or_default();
    for (i, host) in pool.spec.gateway.hosts.iter().enumerate() {
        // A cluster Service name belongs to the namespace it names: a pool elsewhere that
        // claimed it would receive (passthrough) or answer for (terminate) another
        // namespace's connections.
        if let Some(owner) = service_namespace(host)
            && owner != namespace
        {
            let message = format!(
                "{host:?} is a Service name of namespace {owner:?}; a pool may only use the names of its own namespace ({namespace:?})"
            );
            faults.push(&format!("gateway.hosts[{i}]"), message);
        }
    }
    faults.0
}

/// The namespace a cluster DNS name belongs to: `<service>.<namespace>.svc` and
/// `<service>.<namespace>.svc.cluster.local`, and any name below those (a StatefulSet pod's).
pub fn service_namespace(host: &str) -> Option<&str> {
    let host = host.strip_suffix('.').unwrap_or(host);
    let base = host
        .strip_suffix(".svc.cluster.local")
        .or_else(|| host.strip_suffix(".svc"))?;
    base.rsplit('.').next()
}

/// Joins faults for a condition message or an Event.
pub fn summary(faults: &[Fault]) -> String {
    let all: Vec<String> = faults.iter().map(Fault::to_string).collect();
    all.join("; ")
}

/// `tls.clientCertMaxTTL` at most: a certificate is the only revocation there is, so none
/// lives longer than a day.
const CLIENT_TTL_CEILING: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

struct Faults(Vec<Fault>);

impl Faults {
    fn push(&mut self, path: &str, message: impl Into<String>) {
        let (path, message) = (format!("spec.{path}"), message.into());
        self.0.push(Fault { path, message });
    }

    fn duration(&mut self, path: &str, text: &str) -> Option<std::time::Duration> {
        let parsed = duration::parse(text);
        if let Err(e) = &parsed {
            self.push(path, e.to_string());
        }
        parsed.ok()
    }
}

fn workload(spec: &BuildKitPoolSpec, faults: &mut Faults) {
    let w = &spec.workload;
    if w.cache.is_some() && w.kind != WorkloadKind::StatefulSet {
        faults.push("workload.cache", "a cache volume needs kind StatefulSet");
    }
    if w.image.trim().is_empty() || w.image.contains(char::is_whitespace) {
        faults.push(
            "workload.image",
            format!("{:?} is not an image reference", w.image),
        );
    }
}

fn buildkitd(spec: &BuildKitPoolSpec, faults: &mut Faults) {
    let b = &spec.buildkitd;
    if let Some(raw) = &b.raw {
        let structured = b.max_parallelism.is_some() || b.gc.is_some() || !b.registries.is_empty();
        if structured {
            faults.push(
                "buildkitd.raw",
                "raw TOML excludes maxParallelism, gc and registries",
            );
        }
        if let Err(e) = raw.parse::<toml::Table>() {
            let first = e.to_string().lines().next().unwrap_or_default().to_owned();
            faults.push("buildkitd.raw", format!("not valid TOML: {first}"));
        }
    }
    if let Some(keep) = b.gc.as_ref().and_then(|gc| gc.keep_duration.as_deref()) {
        faults.duration("buildkitd.gc.keepDuration", keep);
    }
    for (i, registry) in b.registries.iter().enumerate() {
        if registry
            .mirrors
            .iter()
            .any(|m| m.is_empty() || m.contains(char::is_whitespace))
        {
            faults.push(
                &format!("buildkitd.registries[{i}].mirrors"),
                "empty or blank mirror",
            );
        }
    }
}

fn scaling(spec: &BuildKitPoolSpec, faults: &mut Faults) {
    let s = &spec.scaling;
    if s.min_replicas > s.max_replicas {
        let message = format!("{} exceeds maxReplicas {}", s.min_replicas, s.max_replicas);
        faults.push("scaling.minReplicas", message);
    }
    if spec.workload.kind == WorkloadKind::Job && s.min_replicas > 0 {
        faults.push(
            "scaling.minReplicas",
            "a Job pool starts replicas on wake only; use 0",
        );
    }
    faults.duration("scaling.idleAfter", &s.idle_after);
    faults.duration("scaling.minUpAfterWake", &s.min_up_after_wake);
    if let Some(wake_timeout) = &s.wake_timeout {
        faults.duration("scaling.wakeTimeout", wake_timeout);
    }
    for (i, window) in s.warm_windows.iter().enumerate() {
        let path = format!("scaling.warmWindows[{i}]");
        if let Err(message) = check_cron(&window.schedule) {
            faults.push(&format!("{path}.schedule"), message);
        }
        faults.duration(&format!("{path}.duration"), &window.duration);
        if window.min_replicas > s.max_replicas {
            faults.push(&format!("{path}.minReplicas"), "exceeds maxReplicas");
        }
    }
}

fn gateway(spec: &BuildKitPoolSpec, faults: &mut Faults) {
    for (i, host) in spec.gateway.hosts.iter().enumerate() {
        let path = format!("gateway.hosts[{i}]");
        if !is_dns_name(host) {
            faults.push(&path, format!("{host:?} is not a DNS name"));
        } else if !host.contains('.') {
            // A bare name means a different Service in every namespace: the gateway could
            // never tell whose connection it is.
            let message = format!(
                "{host:?} is a single label, ambiguous across namespaces; use a qualified name"
            );
            faults.push(&path, message);
        }
    }
    let g = &spec.gateway;
    if g.max_connections > 0 && g.max_connections_per_identity > g.max_connections {
        let message = "exceeds maxConnections";
        faults.push("gateway.maxConnectionsPerIdentity", message);
    }
    let passthrough = g.mode == GatewayMode::Passthrough;
    if passthrough && g.preface_while_waking == Some(true) {
        let message =
            "not possible in passthrough mode (the gateway cannot read the encrypted bytes)";
        faults.push("gateway.prefaceWhileWaking", message);
    }
    if passthrough && g.balance == Some(Balance::Affine) {
        let message = "Affine needs the caller's identity, which passthrough mode never sees";
        faults.push("gateway.balance", message);
    }
    if let Some(bound) = g.load_bound {
        if g.balance == Some(Balance::LeastLoaded) || (passthrough && g.balance.is_none()) {
            faults.push("gateway.loadBound", "only used with balance Affine");
        } else if !(1.0..=100.0).contains(&bound) {
            let message = format!("{bound} is not between 1.0 and 100.0 (times the average load)");
            faults.push("gateway.loadBound", message);
        }
    }
}

fn tls(spec: &BuildKitPoolSpec, faults: &mut Faults) {
    let t = &spec.tls;
    let client = faults.duration("tls.clientCertMaxTTL", &t.client_cert_max_ttl);
    let ca = faults.duration("tls.caLifetime", &t.ca_lifetime);
    let server = faults.duration("tls.serverCertLifetime", &t.server_cert_lifetime);
    let rotate = faults.duration("tls.rotateBefore", &t.rotate_before);
    let (Some(client), Some(ca), Some(server), Some(rotate)) = (client, ca, server, rotate) else {
        return;
    };
    if rotate >= server {
        faults.push(
            "tls.rotateBefore",
            "must be shorter than serverCertLifetime",
        );
    }
    // The next CA is published a full rotateBefore ahead of taking over, so a CA must live
    // longer than two of them or trust would never overlap.
    if rotate * 2 >= ca {
        faults.push(
            "tls.rotateBefore",
            "must be shorter than half of caLifetime",
        );
    }
    if server > ca {
        faults.push("tls.serverCertLifetime", "must not exceed caLifetime");
    }
    if client > ca || client.is_zero() || client > CLIENT_TTL_CEILING {
        faults.push(
            "tls.clientCertMaxTTL",
            "must be positive, at most 24h, and not exceed caLifetime",
        );
    }
}

fn auth(spec: &BuildKitPoolSpec, faults: &mut Faults) {
    let a = &spec.auth;
    if a.mode == AuthMode::Rbac && !a.service_accounts.is_empty() {
        faults.push(
            "auth.serviceAccounts",
            "unused in RBAC mode; remove or use ServiceAccounts",
        );
    }
    for (i, issuer) in a.oidc.iter().enumerate() {
        if issuer.audiences.iter().any(String::is_empty) {
            faults.push(&format!("auth.oidc[{i}].audiences"), "empty audience");
        }
    }
    // What the certificate API would refuse to build rules from (names, claim rules that
    // say nothing): the namespace only fills in unqualified names, so any one does.
    if let Err(rule_faults) = crate::certapi::cluster::pool_auth("default", a) {
        faults.0.extend(rule_faults);
    }
}

fn check_cron(schedule: &str) -> Result<(), String> {
    let fields: Vec<&str> = schedule.split_whitespace().collect();
    let limits = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)];
    if fields.len() != limits.len() {
        return Err(format!("{schedule:?} does not have five cron fields"));
    }
    for (field, (low, high)) in fields.iter().zip(limits) {
        let numbers = field.split([',', '-', '/']).filter(|p| *p != "*");
        for n in numbers {
            let ok = n.parse::<u32>().is_ok_and(|n| (low..=high).contains(&n));
            if !ok {
                return Err(format!("{field:?} in {schedule:?} is outside {low}-{high}"));
            }
        }
    }
    Ok(())
}

fn is_dns_name(name: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    name.len() <= 253 && name.split('.').all(label_ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::spec::*;

    fn paths(spec: &BuildKitPoolSpec) -> Vec<String> {
        validate(spec).into_iter().map(|f| f.path).collect()
    }

    #[test]
    fn the_default_spec_is_valid() {
        assert_eq!(validate(&BuildKitPoolSpec::default()), vec![]);
    }

    #[test]
    fn every_fault_is_reported_with_its_path() {
        let mut spec = BuildKitPoolSpec::default();
        spec.scaling.min_replicas = 3;
        spec.scaling.max_replicas = 2;
        spec.workload.cache = Some(CacheVolume {
            size: "1Gi".into(),
            storage_class_name: None,
        });
        spec.buildkitd.raw = Some("[worker.oci\n".into());
        spec.tls.rotate_before = "40d".into();
        spec.gateway.hosts = vec!["Bad_Host".into()];
        spec.scaling.warm_windows = vec![WarmWindow {
            schedule: "0 25 * * *".into(),
            duration: "1h".into(),
            min_replicas: 1,
        }];
        assert_eq!(
            paths(&spec),
            [
                "spec.workload.cache",
                "spec.buildkitd.raw",
                "spec.scaling.minReplicas",
                "spec.scaling.warmWindows[0].schedule",
                "spec.gateway.hosts[0]",
                "spec.tls.rotateBefore",
            ]
        );
        let text = summary(&validate(&spec));
        assert!(
            text.contains("spec.scaling.minReplicas: 3 exceeds maxReplicas 2"),
            "{text}"
        );
        assert!(text.contains("not valid TOML"), "{text}");
    }

    #[test]
    fn raw_toml_excludes_structured_fields() {
        let mut spec = BuildKitPoolSpec::default();
        spec.buildkitd.raw = Some("debug = true\n".into());
        assert_eq!(validate(&spec), vec![]);
        spec.buildkitd.max_parallelism = Some(4);
        assert_eq!(paths(&spec), ["spec.buildkitd.raw"]);
    }

    #[test]
    fn lifetimes_must_nest() {
        let mut spec = BuildKitPoolSpec::default();
        spec.tls.server_cert_lifetime = "400d".into();
        spec.tls.client_cert_max_ttl = "0s".into();
        assert_eq!(
            paths(&spec),
            ["spec.tls.serverCertLifetime", "spec.tls.clientCertMaxTTL"]
        );
        let mut spec = BuildKitPoolSpec::default();
        spec.tls.client_cert_max_ttl = "25h".into();
        assert_eq!(paths(&spec), ["spec.tls.clientCertMaxTTL"], "a day at most");
        spec.tls.client_cert_max_ttl = "5s".into();
        assert!(paths(&spec).is_empty(), "short is fine");
    }

    #[test]
    fn host_names_under_svc_belong_to_their_namespace() {
        let pool = |ns: &str, hosts: &[&str]| {
            let mut spec = BuildKitPoolSpec::default();
            spec.gateway.hosts = hosts.iter().map(|h| h.to_string()).collect();
            let mut pool = BuildKitPool::new("a", spec);
            pool.metadata.namespace = Some(ns.into());
            pool
        };
        let own = pool(
            "ci",
            &["a.ci.svc", "b.ci.svc.cluster.local", "builds.example.com"],
        );
        assert_eq!(validate_pool(&own), vec![]);
        let takeover = pool(
            "evil",
            &[
                "x.example.com",
                "ci.default.svc",
                "0.ci.default.svc.cluster.local",
            ],
        );
        let faults = validate_pool(&takeover);
        let paths: Vec<&str> = faults.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["spec.gateway.hosts[1]", "spec.gateway.hosts[2]"]);
        assert!(
            faults[0].message.contains("namespace \"default\""),
            "{faults:?}"
        );
        let bare = pool("ci", &["builder"]);
        assert!(validate_pool(&bare)[0].message.contains("single label"));
        assert_eq!(service_namespace("a.b.svc."), Some("b"));
        assert_eq!(service_namespace("svc.example.com"), None);
    }

    #[test]
    fn auth_names_are_accounts_of_this_or_a_named_namespace() {
        let mut spec = BuildKitPoolSpec::default();
        spec.auth.service_accounts = vec![
            "ci".into(),
            "tools/ci".into(),
            "system:serviceaccount:x:y".into(),
        ];
        assert_eq!(paths(&spec), ["spec.auth.serviceAccounts[2]"]);
        spec.auth.mode = AuthMode::Rbac;
        assert_eq!(paths(&spec)[0], "spec.auth.serviceAccounts");
    }

    #[test]
    fn passthrough_refuses_what_needs_the_decrypted_stream() {
        let mut spec = BuildKitPoolSpec::default();
        spec.gateway.load_bound = Some(3.0);
        assert_eq!(validate(&spec), vec![], "affine is the terminate default");
        spec.gateway.load_bound = Some(0.9);
        assert_eq!(paths(&spec), ["spec.gateway.loadBound"]);
        spec.gateway.mode = GatewayMode::Passthrough;
        spec.gateway.load_bound = None;
        spec.gateway.preface_while_waking = Some(true);
        spec.gateway.balance = Some(Balance::Affine);
        assert_eq!(
            paths(&spec),
            ["spec.gateway.prefaceWhileWaking", "spec.gateway.balance"]
        );
        spec.gateway.preface_while_waking = Some(false);
        spec.gateway.balance = Some(Balance::LeastLoaded);
        spec.gateway.load_bound = Some(2.0);
        assert_eq!(paths(&spec), ["spec.gateway.loadBound"]);
    }

    #[test]
    fn an_oidc_issuer_needs_claim_rules_that_say_something() {
        let mut spec = BuildKitPoolSpec::default();
        let rule = |claim: &str, value: &str| crate::crd::ClaimRule {
            claim: claim.into(),
            values: vec![value.into()],
        };
        spec.auth.oidc = vec![crate::crd::OidcIssuer {
            issuer: "https://token.actions.githubusercontent.com".into(),
            audiences: vec!["bkpool".into()],
            claims: vec![],
        }];
        assert_eq!(paths(&spec), ["spec.auth.oidc[0].claims"]);
        spec.auth.oidc[0].claims = vec![rule("repository", "*")];
        assert_eq!(
            paths(&spec),
            ["spec.auth.oidc[0].claims"],
            "every repository"
        );
        spec.auth.oidc[0].claims = vec![rule("repository", "org/app"), rule("ref", "*")];
        assert!(paths(&spec).is_empty());
    }
}
