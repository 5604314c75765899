//! `bkpool local` configuration: the gateway's top-level settings plus, per pool, how it
//! scales and what its replicas run. TOML parsed into a raw shape, then converted into typed
//! values with every fault collected with its field path (as the gateway's configuration
//! does), so a bad file is refused — whole list in hand — before anything starts.
//!
//! ```toml
//! listen = "127.0.0.1:1235"
//! admin = "127.0.0.1:9235"
//! ports = "20000-20999"          # loopback ports for replicas
//! [limits]
//! max_held = 10000               # connections held for wakes, all pools together
//! [scaling]
//! drain_settle = "250ms"         # draining → confirm no connection → stop
//! unhealthy_after = 5            # connections failed in a row that replace a replica
//! [[pool]]
//! name = "default"
//! max_cert_ttl = "1h"
//! preface_while_waking = true   # answer HTTP/2 while held, so wakes may outlast 20 s
//! balance = "affine"             # a caller returns to its replica's cache ("least-loaded")
//! load_bound = 2.0               # ... unless that replica carries > 2 × the average
//! [pool.scaling]
//! idle_after = "10m"
//! [pool.replica]
//! command = ["buildkitd", "--addr", "tcp://{addr}", "--root", "{root}",
//!            "--tlscacert", "{tls}/ca.pem", "--tlscert", "{tls}/cert.pem", "--tlskey", "{tls}/key.pem"]
//! ```
//!
//! A replica serves mTLS on its loopback port (`{tls}`: see [`crate::backend_leg`]), so no
//! local user can reach buildkitd past the gateway. A command that does not pass `{tls}` is
//! refused unless the pool says `plaintext = true`, accepting that risk.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proxy::affinity::Balance;
use proxy::config::{
    BackendTls, BalanceMode, CertFiles, ConfigErrors, Faults, GatewayConfig, Limits, Mode,
    PoolConfig, RawGatewayLimits, RawPoolLimits, RawPoolTimeouts, RawTimeouts, Timeouts, from_toml,
    read_file,
};
use proxy::names::PoolId;
use serde::Deserialize;

use crate::scale::policy::{
    DEFAULT_MAX_HELD_TOTAL, DEFAULT_WAKE_TIMEOUT_ANSWERED, Policy, Settings,
};

/// What a pool's replicas run when no configuration file is given: buildkitd serving mTLS
/// with the backend leg's certificates.
pub const DEFAULT_COMMAND: [&str; 11] = [
    "buildkitd",
    "--addr",
    "tcp://{addr}",
    "--root",
    "{root}",
    "--tlscacert",
    "{tls}/ca.pem",
    "--tlscert",
    "{tls}/cert.pem",
    "--tlskey",
    "{tls}/key.pem",
];
pub const DEFAULT_PORTS: RangeInclusive<u16> = 20_000..=20_999;
pub const DEFAULT_MAX_CERT_TTL: Duration = Duration::from_secs(3600);
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// A validated local configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalConfig {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub limits: Limits,
    pub timeouts: Timeouts,
    /// Scaler-wide settings: `[scaling]` and `limits.max_held` (held connections, all pools).
    pub scaler: Settings,
    /// Loopback ports replicas listen on.
    pub ports: RangeInclusive<u16>,
    pub pools: Vec<LocalPool>,
}

/// One local pool.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalPool {
    pub id: PoolId,
    pub max_connections: Option<usize>,
    pub max_connections_per_identity: Option<usize>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub scaling: Policy,
    pub replica: ReplicaCommand,
    /// Longest lifetime `bkpool cert issue` grants a client certificate of this pool.
    pub max_cert_ttl: Duration,
    /// Answer the HTTP/2 preface while a connection is held for a wake (on by default).
    pub preface_while_waking: bool,
    /// How connections spread over replicas: by caller identity onto replica slots, whose
    /// state directories (and caches) survive sleeps, unless configured least-loaded.
    pub balance: Balance,
}

/// What a replica runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaCommand {
    /// A program and its arguments, with `{addr}`, `{port}`, `{root}`, `{pool}` and `{tls}`
    /// filled in.
    Command {
        program: String,
        args: Vec<String>,
        env: Vec<(String, String)>,
        stop_grace: Duration,
        /// Serves plaintext (no `{tls}`), which the pool accepted with `plaintext = true`.
        plaintext: bool,
    },
    /// The built-in stand-in backend (`bkpool standin`), to try the gateway without buildkitd.
    Standin { stop_grace: Duration },
}

impl LocalConfig {
    /// The embedded default: one pool `default`, buildkitd from PATH, asleep after 10 minutes.
    pub fn embedded() -> Self {
        Self::parse("[[pool]]\nname = \"default\"\n", Path::new("."))
            .expect("the embedded configuration is valid")
    }

    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let text = read_file(path)?;
        Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
    }

    /// Parses and validates TOML text. `_base` is where relative paths would resolve.
    pub fn parse(text: &str, _base: &Path) -> Result<Self, ConfigErrors> {
        let raw: RawConfig = from_toml(text)?;
        let mut v = Validator::default();
        let config = v.config(raw);
        v.faults.into_result(config)
    }

    /// Every pool runs the stand-in instead of its command.
    pub fn use_standin(&mut self) {
        for pool in &mut self.pools {
            let stop_grace = pool.replica.stop_grace();
            pool.replica = ReplicaCommand::Standin { stop_grace };
        }
    }

    pub fn pool(&self, id: &PoolId) -> Option<&LocalPool> {
        self.pools.iter().find(|p| &p.id == id)
    }

    /// The gateway's configuration: terminate mode, the PKI's server certificate and each
    /// pool's client CA, and `backend_tls` on the leg to replicas that serve mTLS; backends
    /// come from the scaler.
    pub fn gateway(
        &self,
        server_cert: CertFiles,
        client_ca: impl Fn(&PoolId) -> PathBuf,
        backend_tls: &BackendTls,
    ) -> GatewayConfig {
        GatewayConfig {
            listen: self.listen,
            admin: self.admin,
            limits: self.limits,
            timeouts: self.timeouts,
            server_certs: vec![server_cert],
            pools: self
                .pools
                .iter()
                .map(|p| PoolConfig {
                    id: p.id.clone(),
                    mode: Mode::Terminate,
                    client_ca: Some(client_ca(&p.id)),
                    backends: Vec::new(),
                    hostnames: Vec::new(),
                    max_connections: p.max_connections,
                    max_connections_per_identity: p.max_connections_per_identity,
                    connect_timeout: p.connect_timeout,
                    idle_timeout: p.idle_timeout,
                    preface_while_waking: p.preface_while_waking,
                    balance: p.balance,
                    backend_tls: p.replica.mtls().then(|| backend_tls.clone()),
                })
                .collect(),
        }
    }
}

impl ReplicaCommand {
    pub fn stop_grace(&self) -> Duration {
        match self {
            Self::Command { stop_grace, .. } | Self::Standin { stop_grace } => *stop_grace,
        }
    }

    /// Whether the gateway reaches these replicas over mTLS (all but `plaintext` ones).
    pub fn mtls(&self) -> bool {
        !matches!(
            self,
            Self::Command {
                plaintext: true,
                ..
            }
        )
    }
}

// ---- the raw shape, as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    admin: Option<String>,
    ports: Option<String>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    scaling: RawSettings,
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
    max_held: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    tick: Option<String>,
    drain_settle: Option<String>,
    probe_interval: Option<String>,
    unhealthy_after: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: String,
    namespace: Option<String>,
    mode: Option<Mode>,
    max_cert_ttl: Option<String>,
    #[serde(default)]
    limits: RawPoolLimits,
    #[serde(default)]
    timeouts: RawPoolTimeouts,
    #[serde(default)]
    scaling: RawScaling,
    #[serde(default)]
    replica: RawReplica,
    preface_while_waking: Option<bool>,
    balance: Option<BalanceMode>,
    load_bound: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawScaling {
    min_replicas: Option<i64>,
    max_replicas: Option<i64>,
    idle_after: Option<String>,
    min_up_after_wake: Option<String>,
    wake_timeout: Option<String>,
    max_held: Option<i64>,
    target_connections_per_replica: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReplica {
    command: Option<Vec<String>>,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    standin: bool,
    stop_grace: Option<String>,
    #[serde(default)]
    plaintext: bool,
}

// ---- raw → typed, collecting faults ----

#[derive(Default)]
struct Validator {
    faults: Faults,
}

impl Validator {
    fn config(&mut self, raw: RawConfig) -> LocalConfig {
        let f = &mut self.faults;
        let (listen, admin) = f.listeners(raw.listen.as_deref(), raw.admin.as_deref());
        let mut limits = f.limits(&RawGatewayLimits {
            max_connections: raw.limits.max_connections,
            max_handshakes: raw.limits.max_handshakes,
            max_handshakes_per_source: raw.limits.max_handshakes_per_source,
            max_held_per_source: raw.limits.max_held_per_source,
            // Local pools terminate TLS: every held connection is authenticated, and no
            // ClientHello is kept for replay.
            ..RawGatewayLimits::default()
        });
        let max_held = f
            .count("limits.max_held", raw.limits.max_held)
            .unwrap_or(DEFAULT_MAX_HELD_TOTAL);
        // The local gateway listens on loopback: every client comes from this host, one
        // source address, so per-source caps default to the whole.
        if raw.limits.max_handshakes_per_source.is_none() {
            limits.max_handshakes_per_source = limits.max_handshakes;
        }
        if raw.limits.max_held_per_source.is_none() {
            limits.max_held_per_source = max_held;
        }
        let timeouts = f.timeouts(&raw.timeouts);
        let d = Settings::default();
        let r = &raw.scaling;
        let scaler = Settings {
            tick: f.duration("scaling.tick", r.tick.as_deref(), d.tick),
            drain_settle: f.duration(
                "scaling.drain_settle",
                r.drain_settle.as_deref(),
                d.drain_settle,
            ),
            probe_interval: f.duration(
                "scaling.probe_interval",
                r.probe_interval.as_deref(),
                d.probe_interval,
            ),
            max_held_total: max_held,
            unhealthy_after: f
                .count("scaling.unhealthy_after", r.unhealthy_after)
                .map_or(d.unhealthy_after, |n| u32::try_from(n).unwrap_or(u32::MAX)),
        };
        let ports = match raw.ports.as_deref() {
            None => DEFAULT_PORTS,
            Some(text) => self.ports(text),
        };
        if raw.pool.is_empty() {
            self.faults.add("pool", "define at least one [[pool]]");
        }
        let pools: Vec<LocalPool> = raw
            .pool
            .into_iter()
            .enumerate()
            .map(|(i, p)| self.pool(i, p, &limits, &timeouts))
            .collect();
        for (i, pool) in pools.iter().enumerate() {
            if pools[..i].iter().any(|p| p.id == pool.id) {
                self.faults.add(
                    format!("pool[{i}].name"),
                    format!("pool {} is defined twice", pool.id),
                );
            }
        }
        LocalConfig {
            listen,
            admin,
            limits,
            timeouts,
            scaler,
            ports,
            pools,
        }
    }

    fn pool(&mut self, i: usize, raw: RawPool, limits: &Limits, timeouts: &Timeouts) -> LocalPool {
        let pool_at = format!("pool[{i}]");
        let at = |field: &str| format!("{pool_at}.{field}");
        let id = self
            .faults
            .pool_id(&pool_at, raw.namespace.as_deref(), &raw.name);
        if raw.mode == Some(Mode::Passthrough) {
            self.faults.add(
                at("mode"),
                "local pools terminate TLS at the gateway; passthrough is not available locally",
            );
        }
        let max_connections = self
            .faults
            .count(&at("limits.max_connections"), raw.limits.max_connections);
        if let Some(m) = max_connections
            && m > limits.max_connections
        {
            self.faults.add(
                at("limits.max_connections"),
                format!("{m} exceeds the global limit {}", limits.max_connections),
            );
        }
        let per_identity = self.faults.count(
            &at("limits.max_connections_per_identity"),
            raw.limits.max_connections_per_identity,
        );
        let preface_while_waking = raw.preface_while_waking.unwrap_or(true);
        let mut scaling = self.scaling(&at("scaling"), &raw.scaling);
        if raw.scaling.wake_timeout.is_none() && preface_while_waking {
            scaling.wake_timeout = DEFAULT_WAKE_TIMEOUT_ANSWERED;
        }
        let replica = self.replica(&at("replica"), raw.replica);
        let (connect_timeout, idle_timeout) =
            self.faults.pool_timeouts(&pool_at, &raw.timeouts, timeouts);
        LocalPool {
            id,
            max_connections,
            max_connections_per_identity: per_identity,
            connect_timeout,
            idle_timeout,
            scaling,
            replica,
            max_cert_ttl: self.faults.duration(
                &at("max_cert_ttl"),
                raw.max_cert_ttl.as_deref(),
                DEFAULT_MAX_CERT_TTL,
            ),
            preface_while_waking,
            balance: self
                .faults
                .balance(&pool_at, Mode::Terminate, raw.balance, raw.load_bound),
        }
    }

    fn scaling(&mut self, at: &str, raw: &RawScaling) -> Policy {
        let d = Policy::default();
        let path = |field: &str| format!("{at}.{field}");
        let min_replicas = match raw.min_replicas {
            None => d.min_replicas,
            Some(n) if (0..=1_000).contains(&n) => n as usize,
            Some(n) => {
                self.faults.add(
                    path("min_replicas"),
                    format!("{n} is out of range (0 to 1000)"),
                );
                d.min_replicas
            }
        };
        let max_replicas = match raw.max_replicas {
            None => d.max_replicas,
            Some(n) if (1..=1_000).contains(&n) => n as usize,
            Some(n) => {
                self.faults.add(
                    path("max_replicas"),
                    format!("{n} is out of range (1 to 1000)"),
                );
                d.max_replicas
            }
        };
        if min_replicas > max_replicas {
            self.faults.add(
                path("min_replicas"),
                format!("{min_replicas} exceeds max_replicas ({max_replicas})"),
            );
        }
        let min_up = match raw.min_up_after_wake.as_deref() {
            Some(text) => self
                .faults
                .any_duration(&path("min_up_after_wake"), text)
                .unwrap_or(d.min_up_after_wake),
            None => d.min_up_after_wake,
        };
        Policy {
            min_replicas,
            max_replicas,
            idle_after: self.faults.duration(
                &path("idle_after"),
                raw.idle_after.as_deref(),
                d.idle_after,
            ),
            min_up_after_wake: min_up,
            wake_timeout: self.faults.duration(
                &path("wake_timeout"),
                raw.wake_timeout.as_deref(),
                d.wake_timeout,
            ),
            max_held: self
                .faults
                .count(&path("max_held"), raw.max_held)
                .unwrap_or(d.max_held),
            target_connections_per_replica: self
                .faults
                .count(
                    &path("target_connections_per_replica"),
                    raw.target_connections_per_replica,
                )
                .unwrap_or(d.target_connections_per_replica),
        }
    }

    fn replica(&mut self, at: &str, raw: RawReplica) -> ReplicaCommand {
        let stop_grace = self.faults.duration(
            &format!("{at}.stop_grace"),
            raw.stop_grace.as_deref(),
            DEFAULT_STOP_GRACE,
        );
        let env: Vec<(String, String)> = raw.env.into_iter().collect();
        match (raw.command, raw.standin) {
            (Some(_), true) => {
                self.faults.add(
                    format!("{at}.standin"),
                    "set either command or standin, not both",
                );
                ReplicaCommand::Standin { stop_grace }
            }
            (None, true) => ReplicaCommand::Standin { stop_grace },
            (Some(command), false) if command.first().is_none_or(|p| p.is_empty()) => {
                self.faults.add(format!("{at}.command"), "names no program");
                ReplicaCommand::Standin { stop_grace }
            }
            (command, false) => {
                let words = command
                    .unwrap_or_else(|| DEFAULT_COMMAND.iter().map(|s| s.to_string()).collect());
                let passes_tls = words
                    .iter()
                    .chain(env.iter().map(|(_, v)| v))
                    .any(|w| w.contains("{tls}"));
                if !passes_tls && !raw.plaintext {
                    self.faults.add(
                        format!("{at}.command"),
                        "does not pass {tls} to the replica: a replica serving plaintext on \
                         loopback can be reached by any local user, past the gateway's client \
                         certificates (for buildkitd: --tlscacert {tls}/ca.pem --tlscert \
                         {tls}/cert.pem --tlskey {tls}/key.pem); set plaintext = true to accept that",
                    );
                }
                let mut words = words.into_iter();
                let program = words.next().expect("checked non-empty");
                ReplicaCommand::Command {
                    program,
                    args: words.collect(),
                    env,
                    stop_grace,
                    plaintext: !passes_tls,
                }
            }
        }
    }

    fn ports(&mut self, text: &str) -> RangeInclusive<u16> {
        let parsed = text.split_once('-').and_then(|(a, b)| {
            Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?))
        });
        match parsed {
            Some((a, b)) if a >= 1024 && a <= b => a..=b,
            _ => {
                self.faults.add(
                    "ports",
                    format!("{text:?} is not a port range like \"20000-20999\" (from 1024 up)"),
                );
                DEFAULT_PORTS
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<LocalConfig, ConfigErrors> {
        LocalConfig::parse(text, Path::new("/etc/bkpool"))
    }

    #[test]
    fn the_embedded_default_runs_buildkitd_and_sleeps_after_ten_minutes() {
        let c = LocalConfig::embedded();
        assert_eq!(c.listen.to_string(), "127.0.0.1:1235");
        assert_eq!(c.admin.to_string(), "127.0.0.1:9235");
        assert_eq!(c.ports, 20_000..=20_999);
        let pool = &c.pools[0];
        assert_eq!(pool.id.as_str(), "local/default");
        assert_eq!(pool.scaling.idle_after, Duration::from_secs(600));
        assert_eq!(pool.scaling.min_replicas, 0);
        assert_eq!(pool.max_cert_ttl, Duration::from_secs(3600));
        let ReplicaCommand::Command { program, args, .. } = &pool.replica else {
            panic!("{:?}", pool.replica)
        };
        assert_eq!(program, "buildkitd");
        assert_eq!(&args[..4], &["--addr", "tcp://{addr}", "--root", "{root}"]);
        assert!(
            args.contains(&"{tls}/cert.pem".to_owned()),
            "mTLS: {args:?}"
        );
        assert!(pool.replica.mtls());
        // Every local client comes from this host: per-source caps are the whole.
        assert_eq!(c.limits.max_handshakes_per_source, c.limits.max_handshakes);
        assert_eq!(c.limits.max_held_per_source, DEFAULT_MAX_HELD_TOTAL);
    }

    #[test]
    fn a_command_without_tls_is_refused_unless_plaintext_is_accepted() {
        let plain = "[[pool]]\nname = \"a\"\n[pool.replica]\ncommand = [\"buildkitd\", \"--addr\", \"tcp://{addr}\"]\n";
        let e = parse(plain).unwrap_err();
        let fault = &e.0[0];
        assert_eq!(fault.path, "pool[0].replica.command");
        assert!(
            fault.message.contains("{tls}") && fault.message.contains("plaintext = true"),
            "{e}"
        );
        let c = parse(&format!("{plain}plaintext = true\n")).unwrap();
        assert!(!c.pools[0].replica.mtls());
        let tls = BackendTls {
            ca: "/b/ca.pem".into(),
            cert: "/b/cert.pem".into(),
            key: "/b/key.pem".into(),
            server_name: None,
        };
        let cert = CertFiles {
            cert: "/s/server.pem".into(),
            key: "/s/server.key".into(),
        };
        assert!(
            c.gateway(cert.clone(), |_| "/ca".into(), &tls).pools[0]
                .backend_tls
                .is_none()
        );
        let env_only = "[[pool]]\nname = \"a\"\n[pool.replica]\ncommand = [\"run\"]\nenv = { TLS = \"{tls}\" }\n";
        let c = parse(env_only).unwrap();
        assert_eq!(
            c.gateway(cert, |_| "/ca".into(), &tls).pools[0].backend_tls,
            Some(tls)
        );
    }

    #[test]
    fn every_field_is_read() {
        let c = parse(
            r#"
            listen = "127.0.0.1:0"
            admin = "127.0.0.1:0"
            ports = "30000-30009"
            [limits]
            max_held = 7
            [scaling]
            drain_settle = "2s"
            unhealthy_after = 3
            [[pool]]
            name = "ci"
            namespace = "team"
            max_cert_ttl = "15m"
            [pool.scaling]
            min_replicas = 1
            max_replicas = 3
            idle_after = "1s"
            min_up_after_wake = "0s"
            wake_timeout = "5s"
            max_held = 9
            target_connections_per_replica = 4
            [pool.replica]
            command = ["sleep", "1000"]
            env = { A = "{pool}" }
            stop_grace = "2s"
            plaintext = true
            "#,
        )
        .unwrap();
        assert_eq!(c.ports, 30_000..=30_009);
        assert_eq!(
            (
                c.scaler.max_held_total,
                c.scaler.drain_settle,
                c.scaler.unhealthy_after
            ),
            (7, Duration::from_secs(2), 3)
        );
        let p = &c.pools[0];
        assert_eq!(p.id.as_str(), "team/ci");
        assert_eq!(p.max_cert_ttl, Duration::from_secs(900));
        assert_eq!(
            p.scaling,
            Policy {
                min_replicas: 1,
                max_replicas: 3,
                idle_after: Duration::from_secs(1),
                min_up_after_wake: Duration::ZERO,
                wake_timeout: Duration::from_secs(5),
                max_held: 9,
                target_connections_per_replica: 4,
            }
        );
        assert_eq!(
            p.replica,
            ReplicaCommand::Command {
                program: "sleep".into(),
                args: vec!["1000".into()],
                env: vec![("A".into(), "{pool}".into())],
                stop_grace: Duration::from_secs(2),
                plaintext: true,
            }
        );
    }

    #[test]
    fn every_fault_is_reported_with_its_path() {
        let e = parse(
            r#"
            ports = "9-1"
            [[pool]]
            name = "Bad"
            mode = "passthrough"
            max_cert_ttl = "0s"
            [pool.scaling]
            min_replicas = 3
            max_replicas = 2
            idle_after = "soon"
            [pool.replica]
            command = []
            [[pool]]
            name = "b"
            [pool.replica]
            command = ["x"]
            standin = true
            "#,
        )
        .unwrap_err();
        let paths: Vec<&str> = e.0.iter().map(|f| f.path.as_str()).collect();
        for expected in [
            "ports",
            "pool[0].name",
            "pool[0].mode",
            "pool[0].max_cert_ttl",
            "pool[0].scaling.min_replicas",
            "pool[0].scaling.idle_after",
            "pool[0].replica.command",
            "pool[1].replica.standin",
        ] {
            assert!(paths.contains(&expected), "missing {expected} in {e}");
        }
    }

    #[test]
    fn unknown_fields_are_refused_with_their_line() {
        let e = parse("[[pool]]\nname = \"a\"\n[pool.scaling]\nidle = \"1m\"\n").unwrap_err();
        assert!(
            e.to_string().contains("line 4") && e.to_string().contains("idle"),
            "{e}"
        );
        let e = parse("[[pool]]\nname = \"a\"\n[[pool]]\nname = \"a\"\n").unwrap_err();
        assert!(e.to_string().contains("defined twice"), "{e}");
    }

    #[test]
    fn standin_replaces_every_command_and_the_gateway_config_terminates() {
        let mut c = LocalConfig::embedded();
        c.use_standin();
        assert!(matches!(c.pools[0].replica, ReplicaCommand::Standin { .. }));
        let cert = CertFiles {
            cert: "/s/server.pem".into(),
            key: "/s/server.key".into(),
        };
        let tls = BackendTls {
            ca: "/b/ca.pem".into(),
            cert: "/b/cert.pem".into(),
            key: "/b/key.pem".into(),
            server_name: None,
        };
        let g = c.gateway(cert, |id| PathBuf::from(format!("/s/{id}/ca.pem")), &tls);
        assert_eq!(g.pools[0].mode, Mode::Terminate);
        assert_eq!(
            g.pools[0].backend_tls,
            Some(tls),
            "the stand-in serves mTLS too"
        );
        assert_eq!(
            g.pools[0].client_ca.as_deref(),
            Some(Path::new("/s/local/default/ca.pem"))
        );
        assert!(g.pools[0].backends.is_empty());
    }
}
