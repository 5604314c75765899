//! Harness for `bkpool local`: a child process on a configuration written for the test
//! (ports 127.0.0.1:0, its own state directory and replica port range), client certificates
//! from `bkpool cert issue`, and readers for `/pools` and `/metrics`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use control::health::{self, Health, ProbeError};
use control::scale::Phase;
use control::scale::status::{PoolStatus, Pools};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A running `bkpool local`, killed on drop.
pub struct Local {
    pub child: Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub log: Arc<Mutex<Vec<String>>>,
}

/// Starts `bkpool local` with `body` (pools and more) after the test's top-level settings.
pub fn local(ports: &str, body: &str) -> Local {
    local_with(ports, body, |_| Vec::new())
}

/// [`local`], with `args` (given the configuration's directory) after `bkpool local`'s own.
pub fn local_with(ports: &str, body: &str, args: impl FnOnce(&Path) -> Vec<String>) -> Local {
    let dir = tempfile::tempdir().unwrap();
    let config =
        format!("listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nports = \"{ports}\"\n{body}\n");
    std::fs::write(dir.path().join("local.toml"), config).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_bkpool"));
    command
        .args(["--log-format", "json", "local", "--config"])
        .arg(dir.path().join("local.toml"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(args(dir.path()))
        .env("XDG_RUNTIME_DIR", dir.path())
        .env("BKPOOL_LOG", "info");
    let super::Listening {
        child,
        listen,
        admin,
        log,
    } = super::spawn_listening(command, "local");
    Local {
        child,
        listen,
        admin,
        dir,
        log,
    }
}

impl Local {
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("local.toml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `bkpool cert issue` for `pool` into a fresh directory; returns it.
    pub fn issue(&self, pool: &str) -> PathBuf {
        let out = self.dir.path().join(format!("tls-{pool}"));
        let output = self.cert_issue(&["--pool", pool, "--ttl", "10m"], &out);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        out
    }

    /// `bkpool cert issue` with `args`, this instance's state directory and configuration.
    pub fn cert_issue(&self, args: &[&str], out: &Path) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_bkpool"))
            .args(["cert", "issue"])
            .args(args)
            .arg("--out")
            .arg(out)
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--config")
            .arg(self.config_path())
            .env("XDG_RUNTIME_DIR", self.dir.path())
            .output()
            .unwrap()
    }

    /// A gRPC health check through the gateway over mTLS (ALPN h2), as `tls` directs.
    pub async fn health(&self, tls: &Path) -> Result<Health, ProbeError> {
        let name = ServerName::try_from("localhost").unwrap();
        health::probe_tls(
            self.listen,
            name,
            client_config(tls),
            Duration::from_secs(20),
        )
        .await
    }

    /// A raw mTLS connection through the gateway (the stand-in echoes what it gets).
    pub async fn connect(&self, tls: &Path) -> std::io::Result<TlsStream<TcpStream>> {
        self.connect_with(Arc::new(client_config(tls).as_ref().clone()))
            .await
    }

    pub async fn connect_with(
        &self,
        config: Arc<ClientConfig>,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.listen).await?;
        let name = ServerName::try_from("localhost").unwrap();
        TlsConnector::from(config).connect(name, tcp).await
    }

    pub async fn pools(&self) -> Vec<PoolStatus> {
        let (status, body) = super::http_get(self.admin, "/pools").await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Pools>(&body).unwrap().pools
    }

    pub async fn pool(&self, name: &str) -> PoolStatus {
        let id = format!("local/{name}");
        self.pools()
            .await
            .into_iter()
            .find(|p| p.pool == id)
            .unwrap()
    }

    /// Polls `/pools` until `pool` is in `phase`; returns how long that took.
    pub async fn wait_phase(&self, pool: &str, phase: Phase, within: Duration) -> Duration {
        let began = Instant::now();
        while began.elapsed() < within {
            if self.pool(pool).await.state == phase {
                return began.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!(
            "pool {pool} not {phase:?} within {within:?}: {:?}\n{}",
            self.pool(pool).await,
            self.log_text()
        );
    }

    pub async fn metrics(&self) -> String {
        super::http_get(self.admin, "/metrics").await.1
    }

    /// One sample of `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        super::metrics::sample(&self.metrics().await, name, labels).unwrap_or(0.0)
    }

    /// Processes whose parent is this bkpool: its replicas.
    pub fn replica_pids(&self) -> Vec<u32> {
        children_of(self.child.id())
    }

    /// Waits (up to 5 s) for a log line containing `text`.
    pub async fn wait_log(&self, text: &str) {
        for _ in 0..100 {
            if self.log_text().contains(text) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no log line with {text:?}:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client configuration from a `buildctl --tlsdir` directory, offering ALPN h2.
pub fn client_config(dir: &Path) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
    let mut config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A client that trusts the gateway (from `dir`'s ca.pem) but presents no certificate.
pub fn anonymous_config(dir: &Path) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Pids whose parent is `pid`, from /proc.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // The command name is parenthesised and may contain spaces: read after the last ')'.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let ppid = after.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid == Some(pid) {
            found.push(child);
        }
    }
    found
}

/// Whether process `pid` still exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let after = s.rsplit_once(')').map_or("", |(_, rest)| rest);
            after.split_whitespace().next() != Some("Z")
        })
        .unwrap_or(false)
}
