//! The `BuildKitPool` spec. Every field is read by a bkpool component: the reconcilers in
//! `operator` (workload, buildkitd, tls, gateway names), the scaler (scaling), the gateway
//! (gateway limits and mode) and the certificate API served by every controller replica
//! (auth, `tls.clientCertMaxTTL`, read from a watch cache on every request). Defaults live in
//! the schema, so `kubectl get -o yaml` shows what is in force.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::status::BuildKitPoolStatus;

/// A pool of BuildKit daemons behind the bkpool gateway, scaled to zero when idle.
#[derive(CustomResource, Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "bkpool.dev",
    version = "v1alpha1",
    kind = "BuildKitPool",
    plural = "buildkitpools",
    shortname = "bkp",
    category = "bkpool",
    namespaced,
    status = "BuildKitPoolStatus",
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"}"#,
    printcolumn = r#"{"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"}"#,
    printcolumn = r#"{"name": "Connections", "type": "integer", "jsonPath": ".status.openConnections"}"#,
    printcolumn = r#"{"name": "Last Activity", "type": "date", "jsonPath": ".status.lastActivityTime"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BuildKitPoolSpec {
    #[serde(default)]
    pub workload: Workload,
    #[serde(default)]
    pub buildkitd: Buildkitd,
    #[serde(default)]
    pub scaling: Scaling,
    #[serde(default)]
    pub gateway: Gateway,
    #[serde(default)]
    pub tls: Tls,
    #[serde(default)]
    pub auth: Auth,
}

/// What runs buildkitd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Deployment (stateless), StatefulSet (one cache volume per replica, kept while asleep)
    /// or Job (one ephemeral replica per wake, deleted when idle).
    #[serde(default)]
    pub kind: WorkloadKind,
    /// The buildkitd image. Rootless mode needs a `-rootless` image.
    #[serde(default = "default_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// Extra buildkitd arguments, after the ones bkpool sets (address, TLS, config).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Rootless (no privileges, needs unconfined seccomp/AppArmor) or Privileged.
    #[serde(default)]
    pub security: SecurityMode,
    /// The BuildKit cache volume (StatefulSet only): one claim per replica, kept across
    /// scale-to-zero so a woken pool builds warm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheVolume>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum WorkloadKind {
    #[default]
    Deployment,
    StatefulSet,
    Job,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum SecurityMode {
    #[default]
    Rootless,
    Privileged,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheVolume {
    /// Size of each replica's cache claim, e.g. `50Gi`.
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"))]
    pub size: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// buildkitd.toml: structured fields, or `raw` TOML used as is (not both).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Buildkitd {
    /// A complete buildkitd.toml. Excludes every structured field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
    /// Most build steps run at once (`[worker.oci] max-parallelism`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_parallelism: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gc: Option<GcPolicy>,
    /// Registry settings: mirrors for pulls, plain HTTP or untrusted TLS for registries
    /// used as cache export/import backends (`type=registry`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub registries: Vec<Registry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GcPolicy {
    /// Cache kept after garbage collection, in bytes (`keepBytes`).
    #[schemars(range(min = 0))]
    pub keep_bytes: i64,
    /// Cache entries unused for longer are collected first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub keep_duration: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Registry {
    /// Registry host, e.g. `docker.io` or `cache.internal:5000`.
    #[schemars(regex(pattern = r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?$"))]
    pub host: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<String>,
    /// Speak plain HTTP to this registry.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub http: bool,
    /// Accept any TLS certificate from this registry.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
}

/// How the pool follows demand (read by the scaler).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Scaling {
    /// Replicas kept when idle (0 = scale to zero). Also the replicas a new workload starts with.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub min_replicas: i32,
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub max_replicas: i32,
    /// No connection for this long makes the pool idle.
    #[serde(default = "default_idle_after")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub idle_after: String,
    /// A woken pool stays up at least this long (anti-flap).
    #[serde(default = "default_min_up_after_wake")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub min_up_after_wake: String,
    /// A held connection is refused when the pool is not ready within this. Unset: 5m where
    /// the gateway answers the HTTP/2 preface while holding (terminate mode, the default), so
    /// a wake may wait for a new node or an image pull; 15s otherwise, inside the 20 s a
    /// BuildKit client waits for that preface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub wake_timeout: Option<String>,
    /// Connections held per gateway replica while the pool wakes.
    #[serde(default = "default_max_held")]
    #[schemars(range(min = 0, max = 10000))]
    pub max_held: u32,
    /// Scale out when open connections per ready replica exceed this.
    #[serde(default = "default_target_connections")]
    #[schemars(range(min = 1, max = 10000))]
    pub target_connections_per_replica: u32,
    /// Windows during which `minReplicas` of the window are kept, even when idle.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warm_windows: Vec<WarmWindow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmWindow {
    /// When the window opens: five cron fields, UTC (`0 8 * * 1-5`).
    #[schemars(regex(pattern = r"^(\S+\s+){4}\S+$"))]
    pub schedule: String,
    /// How long it stays open.
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub duration: String,
    #[schemars(range(min = 1, max = 100))]
    pub min_replicas: i32,
}

/// How the gateway serves this pool.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Gateway {
    #[serde(default)]
    pub mode: GatewayMode,
    /// Extra DNS names clients use for this pool (SNI in passthrough mode; added to the
    /// gateway's server certificate in terminate mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Open connections to this pool across the gateway replica (0 = unlimited).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub max_connections: u32,
    /// Open connections per caller identity (0 = unlimited).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub max_connections_per_identity: u32,
    /// Terminate mode: answer the HTTP/2 preface while a connection is held for a wake, so
    /// the wake may outlast the 20 s a BuildKit client waits for it (default true; passthrough
    /// mode cannot read the encrypted bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preface_while_waking: Option<bool>,
    /// How connections spread over replicas. Affine (the default in terminate mode): a caller
    /// identity returns to its replica, and to the cache there, while that replica carries at
    /// most `loadBound` times the average; a StatefulSet's ordinals keep their volumes across
    /// sleeps. LeastLoaded (passthrough mode, which sees no identity): the replica with the
    /// fewest connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "balance_schema")]
    pub balance: Option<Balance>,
    /// Affine balance: the most a replica carries, in multiples of the average (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub load_bound: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Balance {
    Affine,
    LeastLoaded,
}

/// A plain string enum: the derived schema of an optional enum lists `null` among the values,
/// which Kubernetes 1.20 cannot decode.
fn balance_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "enum": ["Affine", "LeastLoaded"],
        "description": "How connections spread over replicas. Affine (the default in terminate \
            mode): a caller identity returns to its replica, and to the cache there, while that \
            replica carries at most `loadBound` times the average; a StatefulSet's ordinals keep \
            their volumes across sleeps. LeastLoaded (passthrough mode, which sees no identity): \
            the replica with the fewest connections.",
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum GatewayMode {
    /// The gateway terminates TLS and speaks mTLS to buildkitd with the backend CA.
    #[default]
    Terminate,
    /// The gateway routes by SNI and splices; buildkitd verifies clients with the pool's
    /// client CA itself.
    Passthrough,
}

/// Certificate lifetimes. Rotation starts `rotateBefore` ahead of expiry and overlaps trust.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tls {
    /// Longest client certificate the certificate API issues (at most 24h), and the
    /// lifetime given when a caller asks for none; asking for longer is refused.
    #[serde(default = "default_client_ttl")]
    #[serde(rename = "clientCertMaxTTL")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub client_cert_max_ttl: String,
    #[serde(default = "default_ca_lifetime")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub ca_lifetime: String,
    #[serde(default = "default_server_lifetime")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub server_cert_lifetime: String,
    #[serde(default = "default_rotate_before")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub rotate_before: String,
}

/// Who may get a client certificate for this pool from the certificate API (`bkpool login`).
/// These rules apply to this pool only: nothing listed here grants anything on another pool,
/// in this namespace or any other. A change applies to the next request.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Auth {
    /// How Kubernetes ServiceAccount tokens (issued for the certificate API's audience,
    /// `bkpool` by default, checked with a TokenReview) are let in. `ServiceAccounts`: only
    /// the accounts in `serviceAccounts`. `RBAC`: any ServiceAccount allowed `create` on
    /// `buildkitpools/certificates` (API group `bkpool.dev`) for this pool, asked with a
    /// SubjectAccessReview.
    #[serde(default)]
    pub mode: AuthMode,
    /// The ServiceAccounts `ServiceAccounts` mode lets in: `NAME` (of this namespace) or
    /// `NAMESPACE/NAME`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    /// External OIDC issuers (GitHub Actions, GitLab) whose tokens this pool accepts, in any
    /// mode, when every claim rule holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub oidc: Vec<OidcIssuer>,
}

/// How ServiceAccount callers are let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum AuthMode {
    /// The accounts in `serviceAccounts`, and no other.
    #[default]
    ServiceAccounts,
    /// Any account RBAC allows `create` on `buildkitpools/certificates` for this pool.
    #[serde(rename = "RBAC")]
    Rbac,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OidcIssuer {
    /// The issuer URL exactly as its tokens carry it in `iss`; keys come from its OIDC
    /// discovery document.
    #[schemars(regex(pattern = r"^https://[^\s]+$"))]
    pub issuer: String,
    /// `aud` values accepted.
    #[schemars(length(min = 1))]
    pub audiences: Vec<String>,
    /// Every rule must hold, and at least one must say more than `*` (an issuer such as
    /// GitHub signs tokens for anyone). The caller's identity is the issuer's host and the
    /// token's `sub`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<ClaimRule>,
}

/// One claim rule: the claim's value matches one of `values`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimRule {
    /// The claim's name, e.g. `repository` or `ref`.
    #[schemars(length(min = 1))]
    pub claim: String,
    /// Accepted values; `*` matches any run of characters (`refs/tags/v*`).
    #[schemars(length(min = 1))]
    pub values: Vec<String>,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            kind: WorkloadKind::default(),
            image: default_image(),
            args: Vec::new(),
            resources: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
            security: SecurityMode::default(),
            cache: None,
        }
    }
}

impl Default for Scaling {
    fn default() -> Self {
        Self {
            min_replicas: 0,
            max_replicas: default_max_replicas(),
            idle_after: default_idle_after(),
            min_up_after_wake: default_min_up_after_wake(),
            wake_timeout: None,
            max_held: default_max_held(),
            target_connections_per_replica: default_target_connections(),
            warm_windows: Vec::new(),
        }
    }
}

impl Default for Tls {
    fn default() -> Self {
        Self {
            client_cert_max_ttl: default_client_ttl(),
            ca_lifetime: default_ca_lifetime(),
            server_cert_lifetime: default_server_lifetime(),
            rotate_before: default_rotate_before(),
        }
    }
}

fn default_image() -> String {
    "moby/buildkit:v0.17.3-rootless".into()
}
fn default_max_replicas() -> i32 {
    1
}
fn default_idle_after() -> String {
    "10m".into()
}
fn default_min_up_after_wake() -> String {
    "2m".into()
}
fn default_max_held() -> u32 {
    64
}
fn default_target_connections() -> u32 {
    8
}
fn default_client_ttl() -> String {
    "1h".into()
}
fn default_ca_lifetime() -> String {
    "365d".into()
}
fn default_server_lifetime() -> String {
    "30d".into()
}
fn default_rotate_before() -> String {
    "7d".into()
}
