//! Full mTLS handshakes per second with resumption off. Each connection
//! also makes one 1-byte round trip: under TLS 1.3 a refused client
//! certificate only shows after the client believes it is done, so only an
//! answered byte proves the proxy accepted it. The proxy's CPU time over
//! the run turns the rate into handshakes per proxy core-second, which
//! stays comparable when the load side is the bottleneck.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::connect::{self, ConnectError, Opening};
use crate::procfs;

#[derive(Debug, Clone)]
pub struct Plan {
    pub target: SocketAddr,
    pub concurrency: usize,
    pub duration: Duration,
    /// The proxy's processes, for CPU time; empty to skip.
    pub pids: Vec<u32>,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub seconds: f64,
    pub handshakes: u64,
    pub handshakes_per_s: f64,
    pub connect_errors: u64,
    pub handshake_errors: u64,
    pub roundtrip_errors: u64,
    /// Proxy CPU seconds per wall second (1.0 = one core busy).
    pub proxy_cores: Option<f64>,
    pub handshakes_per_proxy_core_s: Option<f64>,
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    connect: AtomicU64,
    handshake: AtomicU64,
    roundtrip: AtomicU64,
}

pub async fn run(plan: Plan, opening: Opening) -> std::io::Result<Report> {
    let counts = Arc::new(Counts::default());
    let cpu_before = procfs::cpu_time_of(&plan.pids)?;
    let start = Instant::now();
    let deadline = start + plan.duration;
    let workers: Vec<_> = (0..plan.concurrency)
        .map(|_| {
            tokio::spawn(worker(
                plan.target,
                opening.clone(),
                deadline,
                counts.clone(),
            ))
        })
        .collect();
    for worker in workers {
        worker.await?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu_after = procfs::cpu_time_of(&plan.pids)?;
    let handshakes = counts.ok.load(Ordering::Relaxed);
    let cpu = cpu_before
        .zip(cpu_after)
        .map(|(b, a)| (a - b).as_secs_f64());
    Ok(Report {
        seconds,
        handshakes,
        handshakes_per_s: handshakes as f64 / seconds,
        connect_errors: counts.connect.load(Ordering::Relaxed),
        handshake_errors: counts.handshake.load(Ordering::Relaxed),
        roundtrip_errors: counts.roundtrip.load(Ordering::Relaxed),
        proxy_cores: cpu.map(|cpu| cpu / seconds),
        handshakes_per_proxy_core_s: cpu
            .filter(|cpu| *cpu > 0.0)
            .map(|cpu| handshakes as f64 / cpu),
    })
}

async fn worker(target: SocketAddr, opening: Opening, deadline: Instant, counts: Arc<Counts>) {
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let counter = match tokio::time::timeout(left, one(target, &opening)).await {
            // Cut off by the end of the run: neither success nor failure.
            Err(_) => return,
            Ok(Ok(())) => &counts.ok,
            Ok(Err(Failure::Connect)) => &counts.connect,
            Ok(Err(Failure::Handshake)) => &counts.handshake,
            Ok(Err(Failure::RoundTrip)) => &counts.roundtrip,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

enum Failure {
    Connect,
    Handshake,
    RoundTrip,
}

async fn one(target: SocketAddr, opening: &Opening) -> Result<(), Failure> {
    let mut stream = connect::open(target, opening).await.map_err(|e| match e {
        ConnectError::Tcp(_) => Failure::Connect,
        ConnectError::Handshake(_) => Failure::Handshake,
    })?;
    round_trip(&mut stream)
        .await
        .map_err(|_| Failure::RoundTrip)
}

/// Sends one byte and waits for it to come back (the backend echoes).
pub async fn round_trip(stream: &mut connect::Stream) -> std::io::Result<()> {
    stream.write_all(b"*").await?;
    stream.flush().await?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await?;
    Ok(())
}
