//! Test harness for end-to-end tests of the `bkpool` binary: a gateway process started from a
//! configuration written for the test, real backends on loopback, real TLS clients.
#![allow(dead_code)]

pub mod backends;
pub mod buildkit;
pub mod k8s;
pub mod local;
pub mod metrics;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control::pki::testing::{TestClient, TestPki};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A pool as the test configures it.
#[derive(Clone)]
pub struct PoolSpec {
    pub name: String,
    pub passthrough: bool,
    pub backends: Vec<SocketAddr>,
    pub hostnames: Vec<String>,
    pub extra: String,
}

/// Builds a gateway configuration and starts the binary on it.
pub struct GatewayBuilder {
    pki: Arc<TestPki>,
    pools: Vec<PoolSpec>,
    top: String,
    open_files: Option<u64>,
}

/// A running `bkpool gateway` process, killed on drop.
pub struct GatewayProcess {
    pub child: Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub pki: Arc<TestPki>,
    pub config_dir: tempfile::TempDir,
    pub log: Arc<Mutex<Vec<String>>>,
}

pub fn gateway(pki: &Arc<TestPki>) -> GatewayBuilder {
    GatewayBuilder {
        pki: pki.clone(),
        pools: Vec::new(),
        top: String::new(),
        open_files: None,
    }
}

impl GatewayBuilder {
    pub fn pool(mut self, name: &str, backend: SocketAddr) -> Self {
        self.pools.push(PoolSpec {
            name: name.into(),
            passthrough: false,
            backends: vec![backend],
            hostnames: vec![],
            extra: String::new(),
        });
        self
    }

    pub fn passthrough(mut self, name: &str, hostname: &str, backend: SocketAddr) -> Self {
        self.pools.push(PoolSpec {
            name: name.into(),
            passthrough: true,
            backends: vec![backend],
            hostnames: vec![hostname.into()],
            extra: String::new(),
        });
        self
    }

    /// More backends for the last pool added.
    pub fn and_backends(mut self, more: &[SocketAddr]) -> Self {
        let last = self.pools.last_mut().expect("a pool to extend");
        last.backends.extend_from_slice(more);
        self
    }

    /// Extra TOML lines for the last pool added (e.g. its `[pool.limits]`).
    pub fn with(mut self, toml: &str) -> Self {
        let last = self.pools.last_mut().expect("a pool to extend");
        last.extra.push_str(toml);
        last.extra.push('\n');
        self
    }

    /// Extra TOML at the top level (before any table).
    pub fn top(mut self, toml: &str) -> Self {
        self.top.push_str(toml);
        self.top.push('\n');
        self
    }

    /// Runs the gateway with this open-files limit (soft and hard, so it cannot raise it).
    pub fn open_files(mut self, limit: u64) -> Self {
        self.open_files = Some(limit);
        self
    }

    pub fn config_text(&self) -> String {
        let mut t = format!(
            "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n{}\n",
            self.top
        );
        t += &format!(
            "[[server_cert]]\ncert = {:?}\nkey = {:?}\n",
            self.pki.server_cert_path(),
            self.pki.server_key_path()
        );
        for p in &self.pools {
            t += &format!("\n[[pool]]\nname = {:?}\n", p.name);
            t += &format!(
                "backends = {:?}\n",
                p.backends.iter().map(|b| b.to_string()).collect::<Vec<_>>()
            );
            if p.passthrough {
                t += &format!("mode = \"passthrough\"\nhostnames = {:?}\n", p.hostnames);
            } else {
                t += &format!("client_ca = {:?}\n", self.pki.client_ca_path(&p.name));
            }
            t += &p.extra;
        }
        t
    }

    pub fn start(self) -> GatewayProcess {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, self.config_text()).unwrap();
        start_binary_with(&path, dir, self.pki, self.open_files)
    }
}

/// Starts `bkpool gateway --config path` and waits for its listening line.
pub fn start_binary(
    path: &Path,
    config_dir: tempfile::TempDir,
    pki: Arc<TestPki>,
) -> GatewayProcess {
    start_binary_with(path, config_dir, pki, None)
}

/// [`start_binary`], under an open-files limit when one is given: the shell sets it and then
/// execs the gateway, so the child's pid is the gateway's.
fn start_binary_with(
    path: &Path,
    config_dir: tempfile::TempDir,
    pki: Arc<TestPki>,
    open_files: Option<u64>,
) -> GatewayProcess {
    let bin = env!("CARGO_BIN_EXE_bkpool");
    let mut command = match open_files {
        None => Command::new(bin),
        Some(limit) => {
            let mut sh = Command::new("sh");
            sh.args([
                "-c",
                &format!("ulimit -n {limit} && exec \"$0\" \"$@\""),
                bin,
            ]);
            sh
        }
    };
    command
        .args(["--log-format", "json", "gateway", "--config"])
        .arg(path)
        .env("BKPOOL_LOG", "info,proxy=debug");
    let Listening {
        child,
        listen,
        admin,
        log,
    } = spawn_listening(command, "gateway");
    GatewayProcess {
        child,
        listen,
        admin,
        pki,
        config_dir,
        log,
    }
}

/// A bkpool process whose gateway is listening, with its log collected as it runs.
pub struct Listening {
    pub child: Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

/// Spawns a `bkpool` command logging JSON to stderr and waits (20 s at most) for the
/// gateway's "gateway listening" line, which names its listen and admin addresses.
pub fn spawn_listening(mut command: Command, what: &str) -> Listening {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start bkpool {what}: {e}"));
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("gateway listening") {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let f = &v["fields"];
                let addr = |k: &str| f[k].as_str().unwrap().parse::<SocketAddr>().unwrap();
                let _ = tx.send((addr("listen"), addr("admin")));
            }
            sink.lock().unwrap().push(line);
        }
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok((listen, admin)) => Listening {
            child,
            listen,
            admin,
            log,
        },
        Err(_) => {
            let _ = child.kill();
            panic!(
                "bkpool {what} did not start; log:\n{}",
                log.lock().unwrap().join("\n")
            );
        }
    }
}

impl GatewayProcess {
    /// A TLS connection to the gateway as `client`, offering `h2`.
    pub async fn connect(&self, client: &TestClient) -> std::io::Result<TlsStream<TcpStream>> {
        let config = client.arc_config(&[b"h2"]);
        let tcp = TcpStream::connect(self.listen).await?;
        TlsConnector::from(config)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
    }

    pub async fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").await.1
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }

    /// The value of one sample in `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metrics::sample(&self.metrics().await, name, labels).unwrap_or(0.0)
    }

    /// Waits until `metric` reaches `value` (metrics settle a moment after a connection ends).
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        for _ in 0..100 {
            if self.metric(name, labels).await == value {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{name}{labels:?} never reached {value}; metrics:\n{}",
            self.metrics().await
        );
    }

    pub fn signal(&self, sig: i32) {
        // The gateway is our own child: signalling it by pid is safe here.
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn config_path(&self) -> PathBuf {
        self.config_dir.path().join("gateway.toml")
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 GET (the admin endpoint), returning status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(addr).await.expect("admin endpoint");
    let req = format!("GET {path} HTTP/1.1\r\nHost: bkpool\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.into()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift), so both ends can check a stream without
/// keeping it.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}
