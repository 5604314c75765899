//! Measures the gateway's own share of wake latency with `bkpool local --standin`: for each
//! run, one mTLS gRPC health check reaches a sleeping pool; the connection's hold time (from
//! `bkpool_controller_hold_duration_seconds`) minus the stand-in's own start-to-healthy time
//! (measured apart, by spawning `bkpool standin` and polling it every millisecond) is what
//! the gateway and control loop add. Also reports idle-to-sleep timing.
//!
//! ```text
//! cargo build --release && cargo run --release --example wake_overhead -- target/release/bkpool 20
//! ```

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use control::health::{self, Health};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IDLE_AFTER: Duration = Duration::from_secs(1);

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let bin = PathBuf::from(args.next().unwrap_or("target/release/bkpool".into()));
    let runs: usize = args.next().map_or(20, |n| n.parse().expect("runs"));
    let dir = tempfile::tempdir().unwrap();
    let own = replica_own_start(&bin, runs).await;

    let config = dir.path().join("local.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nports = \"32000-32099\"\n\
         [[pool]]\nname = \"default\"\n[pool.scaling]\nidle_after = \"1s\"\nmin_up_after_wake = \"0s\"\n\
         [pool.replica]\nstandin = true\n",
    )
    .unwrap();
    let state = dir.path().join("state");
    let mut child = Command::new(&bin)
        .args(["--log-format", "json", "local", "--config"])
        .arg(&config)
        .arg("--state-dir")
        .arg(&state)
        .env("BKPOOL_LOG", "warn,proxy::server=info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bkpool local");
    let (listen, admin) = listening(child.stderr.take().unwrap());
    let tls = dir.path().join("tls");
    let issued = Command::new(&bin)
        .args([
            "cert", "issue", "--pool", "default", "--ttl", "10m", "--out",
        ])
        .arg(&tls)
        .arg("--state-dir")
        .arg(&state)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(issued.status.success());
    let client = client_config(&tls);

    let (mut client_seen, mut holds, mut healthy, mut share, mut to_sleep) =
        (vec![], vec![], vec![], vec![], vec![]);
    let own_median = median(&own);
    for _ in 0..runs {
        wait_state(admin, "sleeping").await;
        let before = sums(admin).await;
        let began = Instant::now();
        let name = ServerName::try_from("localhost").unwrap();
        let answer = health::probe_tls(listen, name, client.clone(), Duration::from_secs(20)).await;
        assert_eq!(answer.unwrap(), Health::Serving);
        client_seen.push(began.elapsed());
        let closed = Instant::now();
        let after = sums(admin).await;
        let hold = after.0 - before.0;
        holds.push(Duration::from_secs_f64(hold));
        healthy.push(Duration::from_secs_f64(after.1 - before.1));
        share.push(Duration::from_secs_f64(
            (hold - own_median.as_secs_f64()).max(0.0),
        ));
        wait_state(admin, "sleeping").await;
        to_sleep.push(closed.elapsed().saturating_sub(IDLE_AFTER));
    }
    let _ = child.kill();
    let _ = child.wait();

    println!("{runs} wakes of a sleeping stand-in pool (medians, p90, min):");
    report("client: connect to answer", &client_seen);
    report("connection held (arrival to release)", &holds);
    report("wake start to healthy (controller)", &healthy);
    report("stand-in alone: spawn to healthy", &own);
    report("gateway share = held - stand-in alone", &share);
    report("idle-to-sleep beyond idle_after", &to_sleep);
}

/// The stand-in's own start-to-healthy time, without bkpool in the way.
async fn replica_own_start(bin: &Path, runs: usize) -> Vec<Duration> {
    let mut times = Vec::new();
    for i in 0..runs {
        let addr: SocketAddr = format!("127.0.0.1:{}", 32_500 + i).parse().unwrap();
        let began = Instant::now();
        let mut child = Command::new(bin)
            .args(["standin", "--listen", &addr.to_string()])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        loop {
            if let Ok(Health::Serving) = health::probe(addr, Duration::from_millis(100)).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        times.push(began.elapsed());
        let _ = child.kill();
        let _ = child.wait();
    }
    times
}

fn report(what: &str, values: &[Duration]) {
    let mut v = values.to_vec();
    v.sort();
    let p90 = v[(v.len() * 9 / 10).min(v.len() - 1)];
    println!(
        "  {what:<42} {:>9.2?} {:>9.2?} {:>9.2?}",
        median(&v),
        p90,
        v[0]
    );
}

fn median(values: &[Duration]) -> Duration {
    let mut v = values.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn listening(stderr: std::process::ChildStderr) -> (SocketAddr, SocketAddr) {
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if line.contains("gateway listening") {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            let f = &v["fields"];
            let addr = |k: &str| f[k].as_str().unwrap().parse::<SocketAddr>().unwrap();
            return (addr("listen"), addr("admin"));
        }
    }
    panic!("bkpool local did not start");
}

async fn wait_state(admin: SocketAddr, state: &str) {
    let want = format!("\"state\":\"{state}\"");
    while !get(admin, "/pools").await.contains(&want) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// (hold duration sum, healthy-phase sum) in seconds.
async fn sums(admin: SocketAddr) -> (f64, f64) {
    let text = get(admin, "/metrics").await;
    let value = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("bkpool_controller_hold_duration_seconds_sum{pool=\"local/default\"}"),
        value(
            "bkpool_controller_wake_duration_seconds_sum{pool=\"local/default\",phase=\"healthy\"}",
        ),
    )
}

async fn get(addr: SocketAddr, path: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: bkpool\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    raw.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

fn client_config(dir: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    Arc::new(config)
}
