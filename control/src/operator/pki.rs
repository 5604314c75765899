//! PKI Secrets per pool: a client CA (clients, and the gateway's server certificate for the
//! pool's names) and a backend CA (the gateway ↔ buildkitd leg), never shared between pools
//! or purposes, plus three leaf certificates.
//!
//! | Secret | Keys | Used by |
//! |---|---|---|
//! | `<pool>-client-ca` | `ca.crt`, `ca.key`, `next.crt`/`next.key`, `ca-bundle.crt` | certificate API; gateway trust |
//! | `<pool>-backend-ca` | same | operator only |
//! | `<pool>-gateway-tls` | `tls.crt`, `tls.key`, `ca.crt` (client CA bundle) | gateway (terminate) or buildkitd (passthrough) |
//! | `<pool>-buildkitd-tls` | `tls.crt`, `tls.key`, `ca.crt` (backend CA bundle) | buildkitd (terminate) |
//! | `<pool>-gateway-backend-tls` | `tls.crt`, `tls.key`, `ca.crt` (backend CA bundle) | gateway's backend leg |
//!
//! Rotation never breaks a client: a CA's successor is generated `2 × rotateBefore` ahead of
//! expiry and published in `ca-bundle.crt` at once, but only takes over issuing
//! `rotateBefore` ahead; the old CA stays in the bundle until it expires. Leaves are reissued
//! `rotateBefore` ahead of expiry, when their names change, or when their CA was replaced.
//! Certificates are parsed only when a Secret's resourceVersion changes; a Secret that cannot
//! be read is an error and is never overwritten.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::events::EventType;

use super::apply::{self, Outcome};
use super::context::Context;
use super::error::Error;
use super::objects::{GATEWAY_SECRET_LABEL, PoolNames, owned_meta};
use crate::crd::{BuildKitPool, duration};
use crate::pki::inspect::CertInfo;
use crate::pki::{Ca, PkiError, Problem, opaque_name};

const RECONCILER: &str = "pki";

/// Certificate labels of `bkpool_controller_certificate_expiry_timestamp_seconds`.
pub const CERTIFICATES: [&str; 5] = [
    "client-ca",
    "backend-ca",
    "gateway",
    "buildkitd",
    "gateway-backend",
];

/// Lifetimes from `spec.tls`, parsed (validation has already accepted them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    pub ca: Duration,
    pub server: Duration,
    pub rotate_before: Duration,
}

impl Lifetimes {
    pub fn of(pool: &BuildKitPool) -> Self {
        let t = &pool.spec.tls;
        let or = |text: &str, fallback: u64| {
            duration::parse(text).unwrap_or(Duration::from_secs(fallback * 86_400))
        };
        Self {
            ca: or(&t.ca_lifetime, 365),
            server: or(&t.server_cert_lifetime, 30),
            rotate_before: or(&t.rotate_before, 7),
        }
    }
}

/// A CA Secret, parsed.
pub struct CaSecret {
    pub current: Ca,
    pub next: Option<Ca>,
    /// Replaced CAs still valid, PEM, kept in the bundle until they expire.
    pub previous: Vec<(String, SystemTime)>,
}

/// A leaf Secret, parsed.
#[derive(Debug, Clone)]
pub struct LeafSecret {
    pub cert_pem: String,
    pub key_pem: String,
    pub info: CertInfo,
}

/// Parsed Secrets by namespace/name, with the resourceVersion they were parsed at.
#[derive(Default)]
pub struct ParsedCache {
    cas: Mutex<HashMap<String, (String, Arc<CaSecret>)>>,
    leaves: Mutex<HashMap<String, (String, Arc<LeafSecret>)>>,
}

/// What happened to one CA this reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaChange {
    Kept,
    Created,
    /// A successor was generated and published in the bundle.
    SuccessorPublished,
    /// The successor took over issuing.
    Rotated,
}

/// Plans one CA: keep it, publish a successor, or promote the successor. Pure but for key
/// generation. New CAs get opaque names: a client CA is named to whoever connects to the
/// gateway (or, in passthrough, to buildkitd), and the name must not say which pool it is.
pub fn plan_ca(
    existing: Option<&CaSecret>,
    life: Lifetimes,
    now: SystemTime,
) -> Result<(CaSecret, CaChange), PkiError> {
    let fresh = || Ca::generate(&opaque_name()?, life.ca);
    let Some(existing) = existing else {
        let ca = CaSecret {
            current: fresh()?,
            next: None,
            previous: Vec::new(),
        };
        return Ok((ca, CaChange::Created));
    };
    let remaining = existing
        .current
        .not_after()
        .duration_since(now)
        .unwrap_or_default();
    let mut previous: Vec<(String, SystemTime)> = existing
        .previous
        .iter()
        .filter(|(_, end)| *end > now)
        .cloned()
        .collect();
    let reload = |ca: &Ca| Ca::from_pem(ca.cert_pem(), ca.key_pem());
    if remaining < life.rotate_before {
        let successor = match &existing.next {
            Some(next) => reload(next)?,
            None => fresh()?,
        };
        previous.push((
            existing.current.cert_pem().to_owned(),
            existing.current.not_after(),
        ));
        let ca = CaSecret {
            current: successor,
            next: None,
            previous,
        };
        return Ok((ca, CaChange::Rotated));
    }
    let current = reload(&existing.current)?;
    if remaining < life.rotate_before * 2 && existing.next.is_none() {
        let ca = CaSecret {
            current,
            next: Some(fresh()?),
            previous,
        };
        return Ok((ca, CaChange::SuccessorPublished));
    }
    let next = existing.next.as_ref().map(reload).transpose()?;
    Ok((
        CaSecret {
            current,
            next,
            previous,
        },
        CaChange::Kept,
    ))
}

/// What [`plan_ca`] would do with `existing`, without touching any key.
pub fn decide(existing: &CaSecret, life: Lifetimes, now: SystemTime) -> CaChange {
    let remaining = existing
        .current
        .not_after()
        .duration_since(now)
        .unwrap_or_default();
    if remaining < life.rotate_before {
        CaChange::Rotated
    } else if remaining < life.rotate_before * 2 && existing.next.is_none() {
        CaChange::SuccessorPublished
    } else {
        CaChange::Kept
    }
}

impl CaSecret {
    /// How long until this CA Secret needs writing again: its successor is due, the successor
    /// takes over, or a predecessor expires and leaves the bundle (a second after, so it has).
    pub fn due(&self, life: Lifetimes, now: SystemTime) -> Duration {
        let rotation = match &self.next {
            Some(_) => self.current.not_after() - life.rotate_before,
            None => self.current.not_after() - life.rotate_before * 2,
        };
        let pruned = self
            .previous
            .iter()
            .map(|(_, end)| *end + Duration::from_secs(1));
        std::iter::once(rotation)
            .chain(pruned)
            .map(|at| at.duration_since(now).unwrap_or_default())
            .min()
            .unwrap_or_default()
    }

    /// Every CA certificate a peer should trust now: current, successor, predecessors.
    pub fn bundle(&self) -> String {
        let mut bundle = self.current.cert_pem().to_owned();
        bundle.extend(self.next.iter().map(|n| n.cert_pem().to_owned()));
        bundle.extend(self.previous.iter().map(|(pem, _)| pem.clone()));
        bundle
    }

    /// The Secret's data.
    pub fn data(&self) -> BTreeMap<String, ByteString> {
        let mut data = BTreeMap::from([
            text("ca.crt", self.current.cert_pem()),
            text("ca.key", self.current.key_pem()),
            text("ca-bundle.crt", &self.bundle()),
        ]);
        if let Some(next) = &self.next {
            data.extend([
                text("next.crt", next.cert_pem()),
                text("next.key", next.key_pem()),
            ]);
        }
        if !self.previous.is_empty() {
            let pems: String = self.previous.iter().map(|(pem, _)| pem.as_str()).collect();
            data.extend([text("previous.crt", &pems)]);
        }
        data
    }

    /// Parses a CA Secret's data; `name` names it in errors.
    pub fn parse(secret: &Secret) -> Result<Self, PkiError> {
        let cert = field(secret, "ca.crt")?;
        let key = field(secret, "ca.key")?;
        let current = Ca::from_pem(&cert, &key)?;
        let next = match (field(secret, "next.crt"), field(secret, "next.key")) {
            (Ok(cert), Ok(key)) => Some(Ca::from_pem(&cert, &key)?),
            _ => None,
        };
        let mut previous = Vec::new();
        if let Ok(pems) = field(secret, "previous.crt") {
            for pem in split_pem(&pems) {
                let info = CertInfo::from_pem(&pem, Path::new("previous.crt"))?;
                previous.push((pem, info.not_after));
            }
        }
        Ok(Self {
            current,
            next,
            previous,
        })
    }
}

/// Whether a leaf must be (re)issued: missing, near expiry, other names, or another issuer.
pub fn leaf_needs_issue(
    existing: Option<&LeafSecret>,
    issuer: &Ca,
    names: &[String],
    life: Lifetimes,
    now: SystemTime,
) -> bool {
    let Some(leaf) = existing else { return true };
    let remaining = leaf.info.not_after.duration_since(now).unwrap_or_default();
    let names_changed = !names.is_empty() && leaf.info.server_names != names;
    let other_issuer = leaf
        .info
        .check_issued_by(issuer.cert_der(), Path::new("tls.crt"), Path::new("ca.crt"))
        .is_err();
    remaining < life.rotate_before || names_changed || other_issuer
}

/// The Secret data of a leaf: its pair and the bundle its peer is verified against.
pub fn leaf_data(cert_pem: &str, key_pem: &str, bundle: &str) -> BTreeMap<String, ByteString> {
    BTreeMap::from([
        text("tls.crt", cert_pem),
        text("tls.key", key_pem),
        text("ca.crt", bundle),
    ])
}

/// Names on buildkitd's backend certificate: its Service, its StatefulSet pods, loopback.
pub fn buildkitd_names(names: &PoolNames) -> Vec<String> {
    let (svc, ns) = (names.buildkitd(), &names.namespace);
    vec![
        svc.clone(),
        format!("{svc}.{ns}.svc"),
        format!("*.{svc}.{ns}.svc"),
        format!("{svc}.{ns}.svc.cluster.local"),
        format!("*.{svc}.{ns}.svc.cluster.local"),
        "localhost".into(),
        "127.0.0.1".into(),
    ]
}

/// Names on the gateway's server certificate for the pool: its Service names and
/// `spec.gateway.hosts`.
pub fn gateway_names(pool: &BuildKitPool) -> Vec<String> {
    let mut names = PoolNames::of(pool).client_dns_names();
    for host in &pool.spec.gateway.hosts {
        if !names.contains(host) {
            names.push(host.clone());
        }
    }
    names
}

/// Ensures the pool's five Secrets. Returns how long until something needs rotating.
pub async fn reconcile(pool: &BuildKitPool, ctx: &Context) -> Result<Duration, Error> {
    let names = PoolNames::of(pool);
    let life = Lifetimes::of(pool);
    let now = SystemTime::now();
    let pool_id = format!("{}/{}", names.namespace, names.pool);
    let client = ca(pool, ctx, &names.client_ca(), life, now).await?;
    let backend = ca(pool, ctx, &names.backend_ca(), life, now).await?;
    let leaves = [
        (names.gateway_tls(), &client, gateway_names(pool), "gateway"),
        (
            names.buildkitd_tls(),
            &backend,
            buildkitd_names(&names),
            "buildkitd",
        ),
        (
            names.gateway_backend_tls(),
            &backend,
            Vec::new(),
            "gateway-backend",
        ),
    ];
    let mut next_due = Duration::from_secs(3_600);
    for (ca, label) in [(&client, "client-ca"), (&backend, "backend-ca")] {
        ctx.metrics
            .certificate_expiry(&pool_id, label, ca.current.not_after());
        next_due = next_due.min(ca.due(life, now));
    }
    for (name, ca, dns, label) in leaves {
        let not_after = leaf(pool, ctx, &name, ca, &dns, label, life, now).await?;
        ctx.metrics.certificate_expiry(&pool_id, label, not_after);
        let due = (not_after - life.rotate_before)
            .duration_since(now)
            .unwrap_or_default();
        next_due = next_due.min(due);
    }
    Ok(next_due.max(Duration::from_secs(1)))
}

async fn ca(
    pool: &BuildKitPool,
    ctx: &Context,
    name: &str,
    life: Lifetimes,
    now: SystemTime,
) -> Result<Arc<CaSecret>, Error> {
    let ns = pool.namespace().unwrap_or_default();
    let cached = ctx.stores.secret(&ns, name);
    let parsed = match cached.as_deref().map(|secret| ctx.parsed.ca(secret)) {
        None => None,
        Some(Ok(parsed)) => Some(parsed),
        // Expired while nothing rotated it (the operator was down for longer than
        // rotateBefore): no client can use it any more, so a new CA is the only way on.
        Some(Err(PkiError::Invalid {
            problem: Problem::Expired { .. },
            ..
        })) => {
            let note = format!("{name}: the CA expired unrotated; a new CA replaces it");
            ctx.event(pool, EventType::Warning, "CAExpired", "Rotate", note)
                .await;
            None
        }
        Some(Err(e)) => return Err(pki_error(&ns, name, e)),
    };
    if let Some(parsed) = &parsed
        && decide(parsed, life, now) == CaChange::Kept
        && parsed.previous.iter().all(|(_, end)| *end > now)
    {
        // The common case: nothing to do, and no key is parsed again.
        return Ok(parsed.clone());
    }
    let (planned, change) =
        plan_ca(parsed.as_deref(), life, now).map_err(|e| pki_error(&ns, name, e))?;
    // Kept but for predecessors that expired: they leave the bundle, so the Secret is written.
    let pruned = parsed
        .as_ref()
        .is_some_and(|p| p.previous.len() != planned.previous.len());
    if change == CaChange::Kept && !pruned && parsed.is_some() {
        return Ok(parsed.unwrap_or_else(|| Arc::new(planned)));
    }
    let secret = Secret {
        metadata: owned_meta(pool, name.to_owned()),
        type_: Some("Opaque".into()),
        data: Some(planned.data()),
        ..Secret::default()
    };
    write(ctx, &ns, &secret, cached.as_deref()).await?;
    let note = match change {
        CaChange::SuccessorPublished => Some(format!(
            "{name}: successor CA published in the trust bundle"
        )),
        CaChange::Rotated => Some(format!("{name}: successor CA took over issuing")),
        _ => None,
    };
    if let Some(note) = note {
        ctx.event(
            pool,
            EventType::Normal,
            "CertificateRotated",
            "Rotate",
            note,
        )
        .await;
    }
    Ok(Arc::new(planned))
}

#[allow(clippy::too_many_arguments)]
async fn leaf(
    pool: &BuildKitPool,
    ctx: &Context,
    name: &str,
    ca: &CaSecret,
    dns: &[String],
    label: &'static str,
    life: Lifetimes,
    now: SystemTime,
) -> Result<SystemTime, Error> {
    let ns = pool.namespace().unwrap_or_default();
    let cached = ctx.stores.secret(&ns, name);
    let parsed = match &cached {
        Some(secret) => Some(
            ctx.parsed
                .leaf(secret)
                .map_err(|e| pki_error(&ns, name, e))?,
        ),
        None => None,
    };
    let bundle = ca.bundle();
    let (cert_pem, key_pem, not_after, reissued) =
        if leaf_needs_issue(parsed.as_deref(), &ca.current, dns, life, now) {
            let issued = if dns.is_empty() {
                let cn = format!("bkpool gateway {}/{}", ns, pool.name_any());
                ca.current.issue_client_named(&cn, life.server)
            } else {
                ca.current.issue_server(dns, life.server)
            }
            .map_err(|e| pki_error(&ns, name, e))?;
            let key = issued.key_pem.clone().unwrap_or_default();
            (issued.cert_pem, key, issued.not_after, parsed.is_some())
        } else {
            let leaf = parsed.as_ref().expect("needs no issue only when present");
            (
                leaf.cert_pem.clone(),
                leaf.key_pem.clone(),
                leaf.info.not_after,
                false,
            )
        };
    let mut metadata = owned_meta(pool, name.to_owned());
    if label.starts_with("gateway") {
        metadata
            .labels
            .get_or_insert_default()
            .insert(GATEWAY_SECRET_LABEL.into(), "true".into());
    }
    let secret = Secret {
        metadata,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(leaf_data(&cert_pem, &key_pem, &bundle)),
        ..Secret::default()
    };
    let written = write(ctx, &ns, &secret, cached.as_deref()).await?;
    if label.starts_with("gateway") {
        super::publish::copy(ctx, pool, &secret).await?;
    }
    if written == Outcome::Applied && reissued {
        let note = format!("{name}: {label} certificate reissued");
        ctx.event(
            pool,
            EventType::Normal,
            "CertificateRotated",
            "Rotate",
            note,
        )
        .await;
    }
    Ok(not_after)
}

async fn write(
    ctx: &Context,
    ns: &str,
    secret: &Secret,
    cached: Option<&Secret>,
) -> Result<Outcome, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let outcome = apply::apply(&api, RECONCILER, secret, cached).await?;
    if outcome == Outcome::Applied {
        ctx.metrics.wrote(RECONCILER);
    }
    Ok(outcome)
}

impl ParsedCache {
    /// The parsed CA Secret, parsing only when its resourceVersion changed.
    pub fn ca(&self, secret: &Secret) -> Result<Arc<CaSecret>, PkiError> {
        cached(&self.cas, secret, CaSecret::parse)
    }

    pub fn leaf(&self, secret: &Secret) -> Result<Arc<LeafSecret>, PkiError> {
        cached(&self.leaves, secret, |s| {
            let cert_pem = field(s, "tls.crt")?;
            let key_pem = field(s, "tls.key")?;
            let info = CertInfo::from_pem(&cert_pem, Path::new("tls.crt"))?;
            Ok(LeafSecret {
                cert_pem,
                key_pem,
                info,
            })
        })
    }

    /// How many Secrets are parsed and kept.
    pub fn len(&self) -> usize {
        let cas = self.cas.lock().map(|m| m.len()).unwrap_or_default();
        cas + self.leaves.lock().map(|m| m.len()).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn cached<T>(
    map: &Mutex<HashMap<String, (String, Arc<T>)>>,
    secret: &Secret,
    parse: impl FnOnce(&Secret) -> Result<T, PkiError>,
) -> Result<Arc<T>, PkiError> {
    let key = format!(
        "{}/{}",
        secret.namespace().unwrap_or_default(),
        secret.name_any()
    );
    let version = secret.resource_version().unwrap_or_default();
    let mut map = map.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((seen, parsed)) = map.get(&key)
        && *seen == version
    {
        return Ok(parsed.clone());
    }
    let parsed = Arc::new(parse(secret)?);
    map.insert(key, (version, parsed.clone()));
    Ok(parsed)
}

fn field(secret: &Secret, key: &str) -> Result<String, PkiError> {
    let path = Path::new(key);
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .ok_or_else(|| PkiError::invalid(path, Problem::NoPem("PEM")))?;
    String::from_utf8(bytes.0.clone()).map_err(|_| PkiError::invalid(path, Problem::NoPem("PEM")))
}

fn split_pem(pems: &str) -> Vec<String> {
    let end = "-----END CERTIFICATE-----";
    pems.split_inclusive(end)
        .map(str::trim)
        .filter(|p| p.contains(end))
        .map(|p| format!("{p}\n"))
        .collect()
}

fn text(key: &str, value: &str) -> (String, ByteString) {
    (key.to_owned(), ByteString(value.as_bytes().to_vec()))
}

fn pki_error(namespace: &str, name: &str, source: PkiError) -> Error {
    Error::Pki {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::BuildKitPoolSpec;
    use crate::operator::objects::fixtures;

    const DAY: Duration = Duration::from_secs(86_400);

    fn life() -> Lifetimes {
        Lifetimes {
            ca: 30 * DAY,
            server: 10 * DAY,
            rotate_before: 5 * DAY,
        }
    }

    fn secret_of(data: BTreeMap<String, ByteString>, version: &str) -> Secret {
        let mut secret = Secret {
            data: Some(data),
            ..Secret::default()
        };
        secret.metadata.name = Some("a-client-ca".into());
        secret.metadata.namespace = Some("ci".into());
        secret.metadata.resource_version = Some(version.into());
        secret
    }

    #[test]
    fn a_ca_is_kept_then_succeeded_then_replaced_with_overlapping_trust() {
        let now = SystemTime::now();
        let (first, change) = plan_ca(None, life(), now).unwrap();
        assert_eq!(change, CaChange::Created);
        let (kept, change) = plan_ca(Some(&first), life(), now).unwrap();
        assert_eq!(change, CaChange::Kept);
        assert_eq!(kept.current.cert_pem(), first.current.cert_pem());

        // 21 days on, 9 remain: under 2 × rotateBefore, so a successor joins the bundle.
        let later = now + 21 * DAY;
        let (with_next, change) = plan_ca(Some(&first), life(), later).unwrap();
        assert_eq!(change, CaChange::SuccessorPublished);
        assert_eq!(decide(&first, life(), later), change);
        assert_eq!(decide(&first, life(), now), CaChange::Kept);
        assert_eq!(with_next.current.cert_pem(), first.current.cert_pem());
        let next_pem = with_next.next.as_ref().unwrap().cert_pem().to_owned();
        assert!(with_next.bundle().contains(&next_pem));

        // 26 days on, 4 remain: the successor issues and the old CA stays trusted.
        let (rotated, change) = plan_ca(Some(&with_next), life(), now + 26 * DAY).unwrap();
        assert_eq!(change, CaChange::Rotated);
        assert_eq!(decide(&with_next, life(), now + 26 * DAY), change);
        assert_eq!(rotated.current.cert_pem(), next_pem);
        assert!(rotated.bundle().contains(first.current.cert_pem()));

        // Once the old CA has expired it leaves the bundle.
        let (pruned, _) = plan_ca(Some(&rotated), life(), now + 31 * DAY).unwrap();
        assert!(!pruned.bundle().contains(first.current.cert_pem()));
    }

    #[test]
    fn a_ca_secret_is_due_again_when_its_predecessor_expires() {
        let now = SystemTime::now();
        let (mut ca, _) = plan_ca(None, life(), now).unwrap();
        // 30-day CA, 5 days' rotateBefore: the successor is due in 20 days.
        let successor = ca.due(life(), now);
        assert!(
            successor > 19 * DAY && successor <= 20 * DAY,
            "{successor:?}"
        );
        ca.previous
            .push(("predecessor".into(), now + Duration::from_secs(3600)));
        assert_eq!(ca.due(life(), now), Duration::from_secs(3601));
        // Already past: due at once.
        ca.previous.push(("older".into(), now - DAY));
        assert_eq!(ca.due(life(), now), Duration::ZERO);
    }

    #[test]
    fn new_cas_are_named_without_their_pool() {
        let now = SystemTime::now();
        let (first, _) = plan_ca(None, life(), now).unwrap();
        let (second, _) = plan_ca(None, life(), now).unwrap();
        let subject = |ca: &Ca| {
            let (_, cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
            cert.subject().to_string()
        };
        let name = subject(&first.current);
        assert!(name.starts_with("CN=bkpool CA "), "{name}");
        assert!(!name.contains("client") && !name.contains('/'), "{name}");
        assert_ne!(name, subject(&second.current), "each CA its own name");
        let (with_next, _) = plan_ca(Some(&first), life(), now + 21 * DAY).unwrap();
        let next = subject(with_next.next.as_ref().unwrap());
        assert!(next.starts_with("CN=bkpool CA "), "{next}");
    }

    #[test]
    fn ca_secrets_round_trip_through_their_data() {
        let (ca, _) = plan_ca(None, life(), SystemTime::now()).unwrap();
        let (ca, _) = plan_ca(Some(&ca), life(), SystemTime::now() + 21 * DAY).unwrap();
        let parsed = CaSecret::parse(&secret_of(ca.data(), "1")).unwrap();
        assert_eq!(parsed.current.cert_pem(), ca.current.cert_pem());
        assert_eq!(parsed.next.unwrap().cert_pem(), ca.next.unwrap().cert_pem());
    }

    #[test]
    fn an_unreadable_secret_is_an_error_not_a_fresh_ca() {
        let mut data = BTreeMap::new();
        data.insert("ca.crt".to_owned(), ByteString(b"garbage".to_vec()));
        data.insert("ca.key".to_owned(), ByteString(b"garbage".to_vec()));
        assert!(CaSecret::parse(&secret_of(data, "1")).is_err());
        assert!(CaSecret::parse(&secret_of(BTreeMap::new(), "1")).is_err());
    }

    #[test]
    fn secrets_are_parsed_once_per_resource_version() {
        let (ca, _) = plan_ca(None, life(), SystemTime::now()).unwrap();
        let cache = ParsedCache::default();
        let first = cache.ca(&secret_of(ca.data(), "7")).unwrap();
        let again = cache.ca(&secret_of(ca.data(), "7")).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        let changed = cache.ca(&secret_of(ca.data(), "8")).unwrap();
        assert!(!Arc::ptr_eq(&first, &changed));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn leaves_are_reissued_for_expiry_names_and_issuer_only() {
        let now = SystemTime::now();
        let (ca, _) = plan_ca(None, life(), now).unwrap();
        let names = vec!["a.ci.svc".to_owned()];
        let issued = ca.current.issue_server(&names, life().server).unwrap();
        let info = CertInfo::from_pem(&issued.cert_pem, Path::new("x")).unwrap();
        let leaf = LeafSecret {
            cert_pem: issued.cert_pem,
            key_pem: String::new(),
            info,
        };
        assert!(!leaf_needs_issue(
            Some(&leaf),
            &ca.current,
            &names,
            life(),
            now
        ));
        assert!(leaf_needs_issue(None, &ca.current, &names, life(), now));
        assert!(leaf_needs_issue(
            Some(&leaf),
            &ca.current,
            &names,
            life(),
            now + 6 * DAY
        ));
        let other = vec!["b.ci.svc".to_owned()];
        assert!(leaf_needs_issue(
            Some(&leaf),
            &ca.current,
            &other,
            life(),
            now
        ));
        let (stranger, _) = plan_ca(None, life(), now).unwrap();
        assert!(leaf_needs_issue(
            Some(&leaf),
            &stranger.current,
            &names,
            life(),
            now
        ));
    }

    #[test]
    fn the_gateway_certificate_names_the_pool_service_and_its_hosts() {
        let mut spec = BuildKitPoolSpec::default();
        spec.gateway.hosts = vec!["builds.example.com".into(), "a.ci.svc".into()];
        let pool = fixtures::pool("a", spec);
        assert_eq!(
            gateway_names(&pool),
            [
                "a",
                "a.ci",
                "a.ci.svc",
                "a.ci.svc.cluster.local",
                "builds.example.com"
            ]
        );
        let names = buildkitd_names(&PoolNames::of(&pool));
        assert!(names.contains(&"*.a-buildkitd.ci.svc".to_owned()));
    }
}
