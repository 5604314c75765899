//! A soak: an hour (or `BKPOOL_SOAK_MINUTES`) of churn through the gateway, checked byte for
//! byte, while pools sleep and wake and the server certificate is reloaded every minute.
//! Run with `benches/soak.sh [--minutes N]` (not in CI).
//!
//! - A standalone `bkpool gateway`: pool `t` terminates TLS in front of an echo server, pool
//!   `p` passes TLS through (by SNI) to an echo server that terminates it.
//! - A `bkpool local` whose stand-in pool sleeps after 5 s idle; it gets traffic 20 s out of
//!   every 35, so it sleeps and wakes throughout.
//! - Eight clients open short connections (1–64 KiB each way) round the three pools; two move
//!   64 MiB each way, through `t` and `p` in turn. Every byte that comes back is compared with
//!   what was sent.
//! - Every 10 s, each bkpool process's RSS, open files and threads, and the gateway's open
//!   connections and lent pipes go to a CSV (`BKPOOL_SOAK_CSV`, default `target/soak.csv`).
//!
//! At the end it prints the connections made, bytes checked, corrupted bytes (must be 0),
//! failed connections, reloads, and the slope of RSS and open files per process over the run
//! after the first minute (flat is the goal).

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use control::pki::testing::TestPki;
use rustls::pki_types::ServerName;
use support::{Pattern, backends, gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SNI: &str = "p.soak.example";

#[derive(Default)]
struct Totals {
    connections: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
    corrupted: AtomicU64,
    /// Failures by target (t, p, local) and stage (connect, TLS, echo).
    failures: [[AtomicU64; 3]; 3],
}

impl Totals {
    fn failed(&self, target: usize, stage: usize) {
        self.failed.fetch_add(1, Relaxed);
        self.failures[target][stage].fetch_add(1, Relaxed);
    }
}

/// Where a client goes: the address, the TLS client, the name it asks for.
#[derive(Clone)]
struct Target {
    index: usize,
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    name: &'static str,
}

fn main() {
    let minutes: u64 = std::env::var("BKPOOL_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(60);
    let csv = std::env::var("BKPOOL_SOAK_CSV").unwrap_or_else(|_| "target/soak.csv".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(soak(Duration::from_secs(minutes * 60), &csv));
}

async fn soak(length: Duration, csv: &str) {
    let pki = Arc::new(TestPki::new().pool("t").pool("p").server_name(SNI));
    let echo = backends::echo().await;
    let tls_echo = backends::tls_echo(&pki, "p").await;
    let gw = gateway(&pki)
        .pool("t", echo.addr)
        .passthrough("p", SNI, tls_echo)
        .start();
    let local = support::local::local(
        "31800-31809",
        "[[pool]]\nname = \"s\"\n[pool.scaling]\nidle_after = \"5s\"\n[pool.replica]\nstandin = true\n",
    );
    let local_tls = local.issue("s");
    let targets = [
        Target {
            index: 0,
            addr: gw.listen,
            tls: pki.client("t", "soak").arc_config(&[]),
            name: "localhost",
        },
        Target {
            index: 1,
            addr: gw.listen,
            tls: pki.client("p", "soak").arc_config(&[]),
            name: SNI,
        },
        Target {
            index: 2,
            addr: local.listen,
            tls: support::local::client_config(&local_tls),
            name: "localhost",
        },
    ];

    let totals = Arc::new(Totals::default());
    let stop = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    let mut clients = Vec::new();
    for i in 0..8u64 {
        let (targets, totals, stop) = (targets.clone(), totals.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut sizes = Pattern::new(i + 1);
            let mut n = i as usize;
            while !stop.load(Relaxed) {
                let mut size = [0u8; 2];
                sizes.fill(&mut size);
                let len = 1024 + (u16::from_le_bytes(size) as usize % (63 * 1024));
                // The local pool gets traffic 20 s out of every 35, so it sleeps and wakes.
                let resting = began.elapsed().as_secs() % 35 >= 20;
                let target = match n % targets.len() {
                    2 if resting => 0,
                    t => t,
                };
                exchange(&targets[target], len, n as u64, &totals).await;
                n += 1;
            }
        }));
    }
    for i in 0..2u64 {
        let (targets, totals, stop) = (targets.clone(), totals.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut n = i as usize;
            while !stop.load(Relaxed) {
                exchange(&targets[n % 2], 64 << 20, 1000 + n as u64, &totals).await;
                n += 1;
            }
        }));
    }

    let mut out = std::fs::File::create(csv).expect("the CSV");
    writeln!(
        out,
        "seconds,process,rss_kib,open_files,threads,open_connections,pipes"
    )
    .unwrap();
    let processes = [
        ("gateway", gw.child.id(), gw.admin),
        ("local", local.child.id(), local.admin),
    ];
    let mut samples: Vec<(f64, usize, f64, f64)> = Vec::new();
    let mut reloads = 0;
    let mut next_reload = Duration::from_secs(60);
    while began.elapsed() < length {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let t = began.elapsed();
        if t >= next_reload {
            // The same pair written again: the gateway reloads what changed on disk.
            let path = pki.server_cert_path();
            let cert = std::fs::read(&path).unwrap();
            std::fs::write(&path, cert).unwrap();
            reloads += 1;
            next_reload += Duration::from_secs(60);
        }
        for (i, (name, pid, admin)) in processes.iter().enumerate() {
            let (rss, threads) = status(*pid);
            let files = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
            let metrics = support::http_get(*admin, "/metrics").await.1;
            let sum = |name: &str| {
                support::metrics::parse(&metrics)
                    .unwrap_or_default()
                    .iter()
                    .filter(|s| s.name == name)
                    .map(|s| s.value)
                    .sum::<f64>()
            };
            let open = sum("bkpool_gateway_connections_open");
            let pipes = sum("bkpool_gateway_relay_pipes_outstanding");
            writeln!(
                out,
                "{:.0},{name},{rss},{files},{threads},{open},{pipes}",
                t.as_secs_f64()
            )
            .unwrap();
            samples.push((t.as_secs_f64(), i, rss as f64, files as f64));
        }
        out.flush().unwrap();
    }
    stop.store(true, Relaxed);
    for client in clients {
        let _ = client.await;
    }
    let reloaded = gw
        .metric(
            "bkpool_gateway_credential_reloads_total",
            &[("kind", "server_cert"), ("result", "ok")],
        )
        .await;

    println!(
        "soak: {:.0} min, CSV in {csv}",
        began.elapsed().as_secs_f64() / 60.0
    );
    println!(
        "connections {}, failed {}, bytes checked {}, corrupted bytes {}",
        totals.connections.load(Relaxed),
        totals.failed.load(Relaxed),
        totals.bytes.load(Relaxed),
        totals.corrupted.load(Relaxed)
    );
    for (name, stages) in ["t (terminate)", "p (passthrough)", "local"]
        .iter()
        .zip(&totals.failures)
    {
        let [connect, tls, echo] = stages.each_ref().map(|n| n.load(Relaxed));
        println!("failures through {name}: connect {connect}, TLS {tls}, echo {echo}");
    }
    println!("certificate rewrites {reloads}, reloads the gateway counted {reloaded}");
    let wakes = local
        .metric(
            "bkpool_controller_wakes_total",
            &[("pool", "local/s"), ("result", "ok")],
        )
        .await;
    println!("the local pool woke {wakes} times");
    for (i, (name, _, _)) in processes.iter().enumerate() {
        let after_warmup: Vec<_> = samples.iter().filter(|s| s.1 == i && s.0 >= 60.0).collect();
        let rss = slope(after_warmup.iter().map(|s| (s.0, s.2)));
        let files = slope(after_warmup.iter().map(|s| (s.0, s.3)));
        println!(
            "{name}: RSS slope {:.1} KiB/hour, open files slope {:.2}/hour ({} samples)",
            rss * 3600.0,
            files * 3600.0,
            after_warmup.len()
        );
    }
}

/// One connection to `target`: `len` bytes each way from a seeded pattern, checked on return.
async fn exchange(target: &Target, len: usize, seed: u64, totals: &Totals) {
    totals.connections.fetch_add(1, Relaxed);
    let Ok(tcp) = TcpStream::connect(target.addr).await else {
        totals.failed(target.index, 0);
        return;
    };
    let name = ServerName::try_from(target.name).unwrap();
    let Ok(tls) = tokio_rustls::TlsConnector::from(target.tls.clone())
        .connect(name, tcp)
        .await
    else {
        totals.failed(target.index, 1);
        return;
    };
    let (mut r, mut w) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        let mut pattern = Pattern::new(seed);
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            pattern.fill(&mut buf[..n]);
            w.write_all(&buf[..n]).await?;
            left -= n;
        }
        w.flush().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut pattern = Pattern::new(seed);
    let (mut want, mut got) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut left = len;
    while left > 0 {
        let n = left.min(got.len());
        if r.read_exact(&mut got[..n]).await.is_err() {
            totals.failed(target.index, 2);
            return;
        }
        pattern.fill(&mut want[..n]);
        let wrong = got[..n]
            .iter()
            .zip(&want[..n])
            .filter(|(a, b)| a != b)
            .count();
        totals.corrupted.fetch_add(wrong as u64, Relaxed);
        totals.bytes.fetch_add(n as u64, Relaxed);
        left -= n;
    }
    if let Ok(Ok(mut w)) = writer.await {
        let _ = w.shutdown().await;
    }
}

/// VmRSS (KiB) and Threads of `pid`.
fn status(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("Threads:"))
}

/// Least-squares slope of `points` (y per x).
fn slope(points: impl Iterator<Item = (f64, f64)>) -> f64 {
    let points: Vec<_> = points.collect();
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x, sy + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y - my), den + (x - mx) * (x - mx))
    });
    if den == 0.0 { 0.0 } else { num / den }
}
