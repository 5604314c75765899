//! Gateway configuration: TOML parsed into a raw shape, then converted into typed values with
//! every fault collected and reported with its field path, so the process refuses to start —
//! before binding anything — with the whole list in hand.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::names::{BackendAddr, DEFAULT_NAMESPACE, PoolId};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:1235";
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9235";
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_MAX_HANDSHAKES: usize = 1_024;
/// Handshakes in flight from one source address: far above what one client (even a CI fleet
/// behind one NAT address) needs, far below the global cap.
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: usize = 64;
/// Connections held for a wake from one source address, all pools together.
pub const DEFAULT_MAX_HELD_PER_SOURCE: usize = 64;
/// Per pool, held connections the gateway cannot authenticate (passthrough): anyone can send
/// a ClientHello, so they get a small budget of their own.
pub const DEFAULT_MAX_HELD_UNAUTHENTICATED: usize = 16;
/// Bytes of ClientHellos kept for replay to passthrough backends, all connections together:
/// about a thousand of the largest (16 KiB) ones, eight thousand typical ones.
pub const DEFAULT_MAX_CLIENT_HELLO_BYTES: usize = 16 << 20;
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client sends its ClientHello as soon as it connects: one that has not arrived whole by
/// then is a slow or idle socket holding a handshake slot.
pub const DEFAULT_CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A BuildKit `RUN` step can keep a session silent for a long time.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(2 * 60 * 60);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A validated gateway configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub limits: Limits,
    pub timeouts: Timeouts,
    /// Server certificates; the first is the default for clients that send no (or an unknown) SNI.
    pub server_certs: Vec<CertFiles>,
    pub pools: Vec<PoolConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, all pools together (capped later by the fd limit).
    pub max_connections: usize,
    /// TLS handshakes (or ClientHello reads) in flight at once.
    pub max_handshakes: usize,
    /// Handshakes in flight from one source address.
    pub max_handshakes_per_source: usize,
    /// Connections held for a wake from one source address.
    pub max_held_per_source: usize,
    /// Per pool, held connections the gateway did not authenticate (passthrough).
    pub max_held_unauthenticated: usize,
    /// Bytes of ClientHellos kept for replay to passthrough backends.
    pub max_client_hello_bytes: usize,
}

/// The gateway's `[limits]` as written, whichever configuration it comes from.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawGatewayLimits {
    pub max_connections: Option<i64>,
    pub max_handshakes: Option<i64>,
    pub max_handshakes_per_source: Option<i64>,
    pub max_held_per_source: Option<i64>,
    pub max_held_unauthenticated: Option<i64>,
    pub max_client_hello_bytes: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From accept to a complete ClientHello (within the handshake timeout).
    pub client_hello: Duration,
    pub handshake: Duration,
    pub connect: Duration,
    pub idle: Duration,
    pub drain: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The gateway is the TLS server and verifies the client certificate.
    Terminate,
    /// The gateway routes by SNI and splices raw bytes; the backend terminates TLS.
    Passthrough,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub id: PoolId,
    pub mode: Mode,
    /// Terminate mode: the only CA whose client certificates reach this pool.
    pub client_ca: Option<PathBuf>,
    pub backends: Vec<BackendAddr>,
    /// SNI host names (lowercase). Routing key in passthrough mode.
    pub hostnames: Vec<String>,
    pub max_connections: Option<usize>,
    pub max_connections_per_identity: Option<usize>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// mTLS towards the backend (terminate mode only); plaintext when absent.
    pub backend_tls: Option<BackendTls>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Name to verify the backend certificate against (defaults to the backend's IP).
    pub server_name: Option<String>,
}

/// Every fault found in a configuration, each with its field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<Fault>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for fault in &self.0 {
            writeln!(f, "  {}: {}", fault.path, fault.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl GatewayConfig {
    /// Reads and validates a configuration file; relative paths are taken from its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let text = read_file(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base)
    }

    /// Parses and validates TOML text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ConfigErrors> {
        let raw: RawConfig = from_toml(text)?;
        let mut v = Validator {
            faults: Faults::default(),
            base,
        };
        let config = v.config(raw);
        v.faults.into_result(config)
    }

    pub fn pool(&self, id: &PoolId) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| &p.id == id)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_source: DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            max_held_per_source: DEFAULT_MAX_HELD_PER_SOURCE,
            max_held_unauthenticated: DEFAULT_MAX_HELD_UNAUTHENTICATED,
            max_client_hello_bytes: DEFAULT_MAX_CLIENT_HELLO_BYTES,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            client_hello: DEFAULT_CLIENT_HELLO_TIMEOUT,
            handshake: DEFAULT_HANDSHAKE_TIMEOUT,
            connect: DEFAULT_CONNECT_TIMEOUT,
            idle: DEFAULT_IDLE_TIMEOUT,
            drain: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

/// Reads a configuration file; a failure is reported against its path.
pub fn read_file(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![Fault {
            path: path.display().to_string(),
            message: e.to_string(),
        }])
    })
}

/// Parses TOML into its raw shape; a syntax error is reported at its line.
pub fn from_toml<R: serde::de::DeserializeOwned>(text: &str) -> Result<R, ConfigErrors> {
    toml::from_str(text).map_err(|e| {
        let path = e.span().map_or_else(
            || "(toml)".to_owned(),
            |s| {
                let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}")
            },
        );
        ConfigErrors(vec![Fault {
            path,
            message: e.message().to_string(),
        }])
    })
}

/// The faults found while turning a raw configuration into a typed one, each with its field
/// path, and the conversions every bkpool configuration shares (the gateway's and local
/// mode's): each reports the same thing the same way and falls back to a placeholder, so one
/// pass collects every fault.
#[derive(Debug, Default)]
pub struct Faults(Vec<Fault>);

impl Faults {
    pub fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Fault {
            path: path.into(),
            message: message.into(),
        });
    }

    /// `value` if nothing was found wrong, else every fault.
    pub fn into_result<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors(self.0))
        }
    }

    pub fn addr(&mut self, path: &str, text: &str) -> SocketAddr {
        value::addr(text).unwrap_or_else(|message| {
            self.add(path, message);
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    /// The listen and admin addresses, which may not be the same.
    pub fn listeners(
        &mut self,
        listen: Option<&str>,
        admin: Option<&str>,
    ) -> (SocketAddr, SocketAddr) {
        let listen = self.addr("listen", listen.unwrap_or(DEFAULT_LISTEN));
        let admin = self.addr("admin", admin.unwrap_or(DEFAULT_ADMIN));
        if listen == admin && listen.port() != 0 {
            self.add("admin", format!("same address as listen ({listen})"));
        }
        (listen, admin)
    }

    pub fn count(&mut self, path: &str, n: Option<i64>) -> Option<usize> {
        value::count(n?)
            .map_err(|message| self.add(path, message))
            .ok()
    }

    /// `[limits]`: global connection and handshake caps.
    pub fn limits(&mut self, raw: &RawGatewayLimits) -> Limits {
        let d = Limits::default();
        let limits = Limits {
            max_connections: self
                .count("limits.max_connections", raw.max_connections)
                .unwrap_or(d.max_connections),
            max_handshakes: self
                .count("limits.max_handshakes", raw.max_handshakes)
                .unwrap_or(d.max_handshakes),
            max_handshakes_per_source: self
                .count(
                    "limits.max_handshakes_per_source",
                    raw.max_handshakes_per_source,
                )
                .unwrap_or(d.max_handshakes_per_source),
            max_held_per_source: self
                .count("limits.max_held_per_source", raw.max_held_per_source)
                .unwrap_or(d.max_held_per_source),
            max_held_unauthenticated: self
                .count(
                    "limits.max_held_unauthenticated",
                    raw.max_held_unauthenticated,
                )
                .unwrap_or(d.max_held_unauthenticated),
            max_client_hello_bytes: raw
                .max_client_hello_bytes
                .and_then(|n| {
                    value::client_hello_bytes(n)
                        .map_err(|m| self.add("limits.max_client_hello_bytes", m))
                        .ok()
                })
                .unwrap_or(d.max_client_hello_bytes),
        };
        if raw.max_handshakes_per_source.is_some()
            && limits.max_handshakes_per_source > limits.max_handshakes
        {
            self.add(
                "limits.max_handshakes_per_source",
                format!(
                    "{} exceeds max_handshakes {}",
                    limits.max_handshakes_per_source, limits.max_handshakes
                ),
            );
        }
        limits
    }

    /// A duration longer than zero; `default` when not given.
    pub fn duration(&mut self, path: &str, text: Option<&str>, default: Duration) -> Duration {
        let Some(text) = text else { return default };
        value::duration(text).unwrap_or_else(|message| {
            self.add(path, message);
            default
        })
    }

    /// A duration, possibly zero.
    pub fn any_duration(&mut self, path: &str, text: &str) -> Option<Duration> {
        value::any_duration(text)
            .map_err(|message| self.add(path, message))
            .ok()
    }

    /// `[timeouts]`.
    pub fn timeouts(&mut self, raw: &RawTimeouts) -> Timeouts {
        let d = Timeouts::default();
        Timeouts {
            client_hello: self.duration(
                "timeouts.client_hello",
                raw.client_hello.as_deref(),
                d.client_hello,
            ),
            handshake: self.duration("timeouts.handshake", raw.handshake.as_deref(), d.handshake),
            connect: self.duration("timeouts.connect", raw.connect.as_deref(), d.connect),
            idle: self.duration("timeouts.idle", raw.idle.as_deref(), d.idle),
            drain: self.duration("timeouts.drain", raw.drain.as_deref(), d.drain),
        }
    }

    /// A pool's id from its `namespace` (default `local`) and `name`, at `<at>.name`.
    pub fn pool_id(&mut self, at: &str, namespace: Option<&str>, name: &str) -> PoolId {
        PoolId::new(namespace.unwrap_or(DEFAULT_NAMESPACE), name).unwrap_or_else(|e| {
            self.add(format!("{at}.name"), e.to_string());
            PoolId::new(DEFAULT_NAMESPACE, "invalid").expect("valid placeholder")
        })
    }

    /// A pool's `[pool.timeouts]` (connect, idle), each defaulting to the global one.
    pub fn pool_timeouts(
        &mut self,
        at: &str,
        raw: &RawPoolTimeouts,
        global: &Timeouts,
    ) -> (Duration, Duration) {
        let connect_at = format!("{at}.timeouts.connect");
        let idle_at = format!("{at}.timeouts.idle");
        (
            self.duration(&connect_at, raw.connect.as_deref(), global.connect),
            self.duration(&idle_at, raw.idle.as_deref(), global.idle),
        )
    }
}

// ---- the raw shape, as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    admin: Option<String>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    server_cert: Vec<RawCertFiles>,
    #[serde(default)]
    pool: Vec<RawPool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<i64>,
    max_handshakes: Option<i64>,
    max_handshakes_per_source: Option<i64>,
    max_held_per_source: Option<i64>,
    max_held_unauthenticated: Option<i64>,
    max_client_hello_bytes: Option<i64>,
}

impl RawLimits {
    fn gateway(&self) -> RawGatewayLimits {
        RawGatewayLimits {
            max_connections: self.max_connections,
            max_handshakes: self.max_handshakes,
            max_handshakes_per_source: self.max_handshakes_per_source,
            max_held_per_source: self.max_held_per_source,
            max_held_unauthenticated: self.max_held_unauthenticated,
            max_client_hello_bytes: self.max_client_hello_bytes,
        }
    }
}

/// `[timeouts]` as written: shared by every bkpool configuration with a gateway in it.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    pub client_hello: Option<String>,
    pub handshake: Option<String>,
    pub connect: Option<String>,
    pub idle: Option<String>,
    pub drain: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertFiles {
    cert: String,
    key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: String,
    namespace: Option<String>,
    mode: Option<Mode>,
    client_ca: Option<String>,
    #[serde(default)]
    backends: Vec<String>,
    #[serde(default)]
    hostnames: Vec<String>,
    #[serde(default)]
    limits: RawPoolLimits,
    #[serde(default)]
    timeouts: RawPoolTimeouts,
    backend_tls: Option<RawBackendTls>,
}

/// `[pool.limits]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPoolLimits {
    pub max_connections: Option<i64>,
    pub max_connections_per_identity: Option<i64>,
}

/// `[pool.timeouts]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPoolTimeouts {
    pub connect: Option<String>,
    pub idle: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackendTls {
    ca: String,
    cert: String,
    key: String,
    server_name: Option<String>,
}

// ---- raw → typed, collecting faults ----

struct Validator<'a> {
    faults: Faults,
    base: &'a Path,
}

impl Validator<'_> {
    fn config(&mut self, raw: RawConfig) -> GatewayConfig {
        let f = &mut self.faults;
        let (listen, admin) = f.listeners(raw.listen.as_deref(), raw.admin.as_deref());
        let limits = f.limits(&raw.limits.gateway());
        let timeouts = f.timeouts(&raw.timeouts);
        let server_certs = raw
            .server_cert
            .iter()
            .enumerate()
            .map(|(i, c)| CertFiles {
                cert: self.file(&format!("server_cert[{i}].cert"), &c.cert),
                key: self.file(&format!("server_cert[{i}].key"), &c.key),
            })
            .collect();
        let pools: Vec<PoolConfig> = raw
            .pool
            .into_iter()
            .enumerate()
            .map(|(i, p)| self.pool(i, p, &limits, &timeouts))
            .collect();
        let config = GatewayConfig {
            listen,
            admin,
            limits,
            timeouts,
            server_certs,
            pools,
        };
        self.cross_checks(&config);
        config
    }

    fn pool(&mut self, i: usize, raw: RawPool, limits: &Limits, timeouts: &Timeouts) -> PoolConfig {
        let pool_at = format!("pool[{i}]");
        let at = |field: &str| format!("{pool_at}.{field}");
        let id = self
            .faults
            .pool_id(&pool_at, raw.namespace.as_deref(), &raw.name);
        let mode = raw.mode.unwrap_or(Mode::Terminate);
        let client_ca = raw
            .client_ca
            .as_deref()
            .map(|p| self.file(&at("client_ca"), p));
        match (mode, &client_ca) {
            (Mode::Terminate, None) => self
                .faults
                .add(at("client_ca"), "required in terminate mode"),
            (Mode::Passthrough, Some(_)) => self.faults.add(
                at("client_ca"),
                "not used in passthrough mode (the backend verifies clients)",
            ),
            _ => {}
        }
        let backends = raw
            .backends
            .iter()
            .enumerate()
            .filter_map(|(j, b)| match b.parse::<SocketAddr>() {
                Ok(addr) => Some(BackendAddr(addr)),
                Err(_) => {
                    self.faults.add(
                        at(&format!("backends[{j}]")),
                        format!("{b:?} is not host:port with an IP address"),
                    );
                    None
                }
            })
            .collect();
        let mut hostnames = Vec::new();
        for (j, h) in raw.hostnames.iter().enumerate() {
            match normalize_hostname(h) {
                Some(h) => hostnames.push(h),
                None => self.faults.add(
                    at(&format!("hostnames[{j}]")),
                    format!("{h:?} is not a DNS host name"),
                ),
            }
        }
        if mode == Mode::Passthrough && hostnames.is_empty() {
            self.faults.add(
                at("hostnames"),
                "passthrough mode routes by SNI: name at least one host name",
            );
        }
        let max_connections = self
            .faults
            .count(&at("limits.max_connections"), raw.limits.max_connections);
        let per_identity = self.faults.count(
            &at("limits.max_connections_per_identity"),
            raw.limits.max_connections_per_identity,
        );
        if let Some(m) = max_connections
            && m > limits.max_connections
        {
            self.faults.add(
                at("limits.max_connections"),
                format!("{m} exceeds the global limit {}", limits.max_connections),
            );
        }
        if let (Some(p), Some(m)) = (per_identity, max_connections)
            && p > m
        {
            self.faults.add(
                at("limits.max_connections_per_identity"),
                format!("{p} exceeds the pool's limit {m}"),
            );
        }
        let backend_tls = raw.backend_tls.map(|b| BackendTls {
            ca: self.file(&at("backend_tls.ca"), &b.ca),
            cert: self.file(&at("backend_tls.cert"), &b.cert),
            key: self.file(&at("backend_tls.key"), &b.key),
            server_name: b.server_name,
        });
        if mode == Mode::Passthrough && backend_tls.is_some() {
            self.faults.add(
                at("backend_tls"),
                "not used in passthrough mode (bytes are relayed untouched)",
            );
        }
        let (connect_timeout, idle_timeout) =
            self.faults.pool_timeouts(&pool_at, &raw.timeouts, timeouts);
        PoolConfig {
            id,
            mode,
            client_ca,
            backends,
            hostnames,
            max_connections,
            max_connections_per_identity: per_identity,
            connect_timeout,
            idle_timeout,
            backend_tls,
        }
    }

    fn cross_checks(&mut self, config: &GatewayConfig) {
        let mut ids = HashSet::new();
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut cas: HashMap<PathBuf, usize> = HashMap::new();
        for (i, pool) in config.pools.iter().enumerate() {
            // One file for two pools' client CAs: whoever holds that CA can sign for both.
            // (Two copies of one CA are found when the files are read: Credentials.)
            if let Some(ca) = &pool.client_ca {
                let same = std::fs::canonicalize(ca).unwrap_or_else(|_| ca.clone());
                let j = *cas.entry(same).or_insert(i);
                if j != i {
                    self.faults.add(
                        format!("pool[{i}].client_ca"),
                        format!(
                            "{} is also pool[{j}]'s client CA: a CA shared by two pools signs \
                             certificates for both, so each pool needs its own",
                            ca.display()
                        ),
                    );
                }
            }
            if !ids.insert(&pool.id) {
                self.faults.add(
                    format!("pool[{i}].name"),
                    format!("pool {} is defined twice", pool.id),
                );
            }
            for h in &pool.hostnames {
                if let Some(j) = names.insert(h, i)
                    && j != i
                {
                    self.faults.add(
                        format!("pool[{i}].hostnames"),
                        format!("{h} is already routed to pool[{j}]"),
                    );
                }
            }
        }
        let terminates = config.pools.iter().any(|p| p.mode == Mode::Terminate);
        if terminates && config.server_certs.is_empty() {
            self.faults.add(
                "server_cert",
                "terminate mode needs at least one [[server_cert]]",
            );
        }
    }

    fn file(&mut self, path: &str, value: &str) -> PathBuf {
        if value.is_empty() {
            self.faults.add(path, "empty path");
        }
        self.base.join(value)
    }
}

/// Value parsers shared by every bkpool configuration (the gateway's and local mode's): each
/// returns the message a fault reports, so every file says the same thing the same way.
pub mod value {
    use std::net::SocketAddr;
    use std::time::Duration;

    pub fn addr(text: &str) -> Result<SocketAddr, String> {
        text.parse()
            .map_err(|_| format!("{text:?} is not an IP address and port"))
    }

    /// A count of connections or the like: 1 to 1,000,000.
    pub fn count(n: i64) -> Result<usize, String> {
        match usize::try_from(n) {
            Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
            _ => Err(format!("{n} is out of range (1 to 1000000)")),
        }
    }

    /// The memory for buffered ClientHellos: room for at least one of the largest.
    pub fn client_hello_bytes(n: i64) -> Result<usize, String> {
        let least = crate::clienthello::MAX_CLIENT_HELLO;
        match usize::try_from(n) {
            Ok(n) if (least..=1 << 30).contains(&n) => Ok(n),
            _ => Err(format!("{n} is out of range ({least} to {})", 1 << 30)),
        }
    }

    /// A duration such as "10s" or "2h", possibly zero.
    pub fn any_duration(text: &str) -> Result<Duration, String> {
        humantime::parse_duration(text)
            .map_err(|e| format!("{text:?} is not a duration like \"10s\" or \"2h\": {e}"))
    }

    /// A duration longer than zero.
    pub fn duration(text: &str) -> Result<Duration, String> {
        match any_duration(text)? {
            d if d.is_zero() => Err("must be longer than zero".into()),
            d => Ok(d),
        }
    }
}

/// Lowercases a DNS host name and strips one trailing dot; `None` if it is not one.
pub fn normalize_hostname(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    };
    let ok = !name.is_empty() && name.len() <= 253 && name.split('.').all(label_ok);
    ok.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<GatewayConfig, ConfigErrors> {
        GatewayConfig::parse(text, Path::new("/etc/bkpool"))
    }

    const GOOD: &str = r#"
        [[server_cert]]
        cert = "server.pem"
        key = "server.key"

        [[pool]]
        name = "default"
        client_ca = "ca.pem"
        backends = ["127.0.0.1:1234", "[::1]:1234"]

        [[pool]]
        name = "raw"
        namespace = "ci"
        mode = "passthrough"
        backends = ["127.0.0.1:2345"]
        hostnames = ["Raw.Example."]
        [pool.limits]
        max_connections = 5
        max_connections_per_identity = 2
        [pool.timeouts]
        idle = "5m"
    "#;

    #[test]
    fn defaults_and_paths() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.admin.to_string(), DEFAULT_ADMIN);
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.timeouts, Timeouts::default());
        assert_eq!(c.server_certs[0].cert, Path::new("/etc/bkpool/server.pem"));
        let raw = c.pool(&"ci/raw".parse().unwrap()).unwrap();
        assert_eq!(raw.mode, Mode::Passthrough);
        assert_eq!(raw.hostnames, ["raw.example"]);
        assert_eq!(raw.idle_timeout, Duration::from_secs(300));
        assert_eq!(raw.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(raw.max_connections, Some(5));
        let def = c.pool(&"local/default".parse().unwrap()).unwrap();
        assert_eq!(def.mode, Mode::Terminate);
        assert_eq!(def.backends.len(), 2);
    }

    #[test]
    fn every_fault_is_reported_with_its_path() {
        let text = r#"
            listen = "nowhere"
            [limits]
            max_connections = 0
            max_handshakes = 10
            max_handshakes_per_source = 20
            max_held_unauthenticated = 0
            max_client_hello_bytes = 1024
            [timeouts]
            idle = "forever"
            client_hello = "0s"
            [[pool]]
            name = "Bad_Name"
            backends = ["localhost:80"]
            [[pool]]
            name = "p"
            mode = "passthrough"
            client_ca = "x.pem"
            [pool.limits]
            max_connections = 10
            max_connections_per_identity = 20
        "#;
        let errors = parse(text).unwrap_err();
        let paths: Vec<&str> = errors.0.iter().map(|f| f.path.as_str()).collect();
        for expected in [
            "listen",
            "limits.max_connections",
            "limits.max_handshakes_per_source",
            "limits.max_held_unauthenticated",
            "limits.max_client_hello_bytes",
            "timeouts.idle",
            "timeouts.client_hello",
            "pool[0].name",
            "pool[0].client_ca",
            "pool[0].backends[0]",
            "pool[1].client_ca",
            "pool[1].hostnames",
            "pool[1].limits.max_connections_per_identity",
            "server_cert",
        ] {
            assert!(paths.contains(&expected), "missing {expected} in {errors}");
        }
    }

    #[test]
    fn unknown_fields_and_bad_enums_are_refused() {
        let e = parse("[[pool]]\nname = \"a\"\nmode = \"tunnel\"\n").unwrap_err();
        assert!(e.to_string().contains("line 3"), "{e}");
        let e = parse("listne = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(e.to_string().contains("listne"), "{e}");
    }

    #[test]
    fn duplicates_are_refused() {
        let text = r#"
            [[server_cert]]
            cert = "s"
            key = "k"
            [[pool]]
            name = "a"
            mode = "passthrough"
            hostnames = ["x.example"]
            [[pool]]
            name = "a"
            mode = "passthrough"
            hostnames = ["x.example"]
        "#;
        let e = parse(text).unwrap_err().to_string();
        assert!(
            e.contains("defined twice") && e.contains("already routed"),
            "{e}"
        );
    }

    #[test]
    fn two_pools_may_not_share_a_client_ca_file() {
        let text = r#"
            [[server_cert]]
            cert = "s"
            key = "k"
            [[pool]]
            name = "a"
            client_ca = "pools/ca.pem"
            [[pool]]
            name = "b"
            namespace = "ci"
            client_ca = "pools/../pools/ca.pem"
            [[pool]]
            name = "c"
            client_ca = "pools/c.pem"
        "#;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("pools")).unwrap();
        std::fs::write(dir.path().join("pools/ca.pem"), "").unwrap();
        let e = GatewayConfig::parse(text, dir.path()).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert_eq!(e.0[0].path, "pool[1].client_ca");
        assert!(e.0[0].message.contains("also pool[0]'s client CA"), "{e}");
    }

    #[test]
    fn hostnames_are_normalized() {
        assert_eq!(normalize_hostname("A.b.").as_deref(), Some("a.b"));
        assert_eq!(normalize_hostname("a..b"), None);
        assert_eq!(normalize_hostname("-a"), None);
        assert_eq!(normalize_hostname("a b"), None);
    }
}
