//! Memory per idle connection: open N connections (handshake done, one
//! round trip each so the proxy has fully set up both legs), let them sit,
//! and compare the proxy's RSS and PSS with what it used before; finally
//! prove every connection is still open with another round trip.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::connect::{self, Opening, Stream};
use crate::handshakes::round_trip;
use crate::procfs::{self, Memory};

#[derive(Debug, Clone)]
pub struct Plan {
    pub target: SocketAddr,
    pub conns: usize,
    /// Connections being opened at once.
    pub concurrency: usize,
    /// How long the connections sit idle before memory is read.
    pub settle: Duration,
    pub pids: Vec<u32>,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub conns: usize,
    pub opened: usize,
    pub open_after_idle: usize,
    pub all_open: bool,
    pub open_seconds: f64,
    pub before: Memory,
    pub after: Memory,
    pub rss_after_mib: f64,
    pub kib_per_conn_rss: f64,
    pub kib_per_conn_pss: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum IdleError {
    #[error("reading the proxy's memory: {0}")]
    Proc(#[from] std::io::Error),
    #[error("opening: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Bounds each step so a stuck proxy cannot hang the run.
const STEP: Duration = Duration::from_secs(15);

pub async fn run(plan: Plan, opening: Opening) -> Result<Report, IdleError> {
    let before = procfs::memory(&plan.pids)?;
    let start = Instant::now();
    let streams = open_all(&plan, opening).await?;
    let opened = streams.len();
    let open_seconds = start.elapsed().as_secs_f64();
    tokio::time::sleep(plan.settle).await;
    let after = procfs::memory(&plan.pids)?;
    let open_after_idle = still_open(streams).await?;
    let per_conn = |b: u64, a: u64| (a as f64 - b as f64) / plan.conns.max(1) as f64;
    Ok(Report {
        conns: plan.conns,
        opened,
        open_after_idle,
        all_open: open_after_idle == plan.conns,
        open_seconds,
        before,
        after,
        rss_after_mib: after.rss_kib as f64 / 1024.0,
        kib_per_conn_rss: per_conn(before.rss_kib, after.rss_kib),
        kib_per_conn_pss: per_conn(before.pss_kib, after.pss_kib),
    })
}

async fn open_all(plan: &Plan, opening: Opening) -> Result<Vec<Stream>, IdleError> {
    let permits = Arc::new(Semaphore::new(plan.concurrency));
    let tasks: Vec<_> = (0..plan.conns)
        .map(|_| {
            let permits = permits.clone();
            let opening = opening.clone();
            let target = plan.target;
            tokio::spawn(async move {
                let _permit = permits.acquire_owned().await.ok()?;
                let open = async {
                    let mut stream = connect::open(target, &opening).await.ok()?;
                    round_trip(&mut stream).await.ok()?;
                    Some(stream)
                };
                tokio::time::timeout(STEP, open).await.ok().flatten()
            })
        })
        .collect();
    let mut streams = Vec::with_capacity(plan.conns);
    for task in tasks {
        streams.extend(task.await?);
    }
    Ok(streams)
}

async fn still_open(streams: Vec<Stream>) -> Result<usize, IdleError> {
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                let ok = tokio::time::timeout(STEP, round_trip(&mut stream)).await;
                matches!(ok, Ok(Ok(())))
            })
        })
        .collect();
    let mut open = 0;
    for task in tasks {
        open += usize::from(task.await?);
    }
    Ok(open)
}
