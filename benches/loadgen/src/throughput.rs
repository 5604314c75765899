//! Bulk throughput over 1..N connections: `upload` writes for a fixed time
//! and waits for the backend's close (so bytes still in buffers count
//! against the clock); `echo` writes and reads back at once, verifying
//! every byte against a position-derived pattern.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::connect::{self, Opening, Stream};
use crate::procfs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Upload,
    Echo,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub target: SocketAddr,
    pub conns: usize,
    pub duration: Duration,
    pub mode: Mode,
    /// The proxy's processes, for CPU time; empty to skip.
    pub pids: Vec<u32>,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub mode: Mode,
    pub conns: usize,
    pub seconds: f64,
    /// Bytes that made the whole trip (written for upload, echoed back for echo).
    pub bytes: u64,
    pub gbit_per_s: f64,
    /// Proxy CPU seconds per wall second: near 1.0 the proxy was the bottleneck.
    pub proxy_cores: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ThroughputError {
    #[error(transparent)]
    Connect(#[from] connect::ConnectError),
    #[error("connection {conn}: {source}")]
    Io { conn: usize, source: std::io::Error },
    #[error("connection {conn}: echoed byte {offset} differs")]
    Corrupt { conn: usize, offset: u64 },
    #[error("connection {conn}: no close from the backend within {0:?}", DRAIN)]
    Drain { conn: usize },
    #[error("reading the proxy's CPU time: {0}")]
    Proc(std::io::Error),
    #[error("task: {0}")]
    Join(#[from] tokio::task::JoinError),
}

const CHUNK: usize = 256 * 1024;
/// A prime period, so the pattern never lines up with buffer sizes.
const PERIOD: usize = 251;
/// How long the close may take to come back once the writer stops.
const DRAIN: Duration = Duration::from_secs(10);

pub async fn run(plan: Plan, opening: Opening) -> Result<Report, ThroughputError> {
    // Connect (and handshake) everything before the clock starts.
    let mut streams = Vec::with_capacity(plan.conns);
    for _ in 0..plan.conns {
        streams.push(connect::open(plan.target, &opening).await?);
    }
    let cpu_before = procfs::cpu_time_of(&plan.pids).map_err(ThroughputError::Proc)?;
    let start = Instant::now();
    let deadline = start + plan.duration;
    let tasks: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(conn, stream)| tokio::spawn(one(conn, stream, plan.mode, deadline)))
        .collect();
    let mut bytes = 0;
    for task in tasks {
        bytes += task.await??;
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu_after = procfs::cpu_time_of(&plan.pids).map_err(ThroughputError::Proc)?;
    let cpu = cpu_before
        .zip(cpu_after)
        .map(|(b, a)| (a - b).as_secs_f64());
    Ok(Report {
        mode: plan.mode,
        conns: plan.conns,
        seconds,
        bytes,
        gbit_per_s: bytes as f64 * 8.0 / seconds / 1e9,
        proxy_cores: cpu.map(|cpu| cpu / seconds),
    })
}

async fn one(
    conn: usize,
    stream: Stream,
    mode: Mode,
    deadline: Instant,
) -> Result<u64, ThroughputError> {
    let io = |source| ThroughputError::Io { conn, source };
    let (mut reader, mut writer) = tokio::io::split(stream);
    let write = async move {
        let written = write_until(&mut writer, deadline).await?;
        writer.shutdown().await?;
        Ok::<_, std::io::Error>(written)
    };
    let read = async {
        let read = match mode {
            Mode::Upload => drain(&mut reader).await.map_err(io)?,
            Mode::Echo => verify(&mut reader, conn).await?,
        };
        Ok::<_, ThroughputError>(read)
    };
    let (written, read) = tokio::join!(write, async {
        tokio::time::timeout(deadline_plus_drain(deadline), read).await
    });
    let written = written.map_err(io)?;
    let read = read.map_err(|_| ThroughputError::Drain { conn })??;
    Ok(match mode {
        Mode::Upload => written,
        Mode::Echo => read,
    })
}

fn deadline_plus_drain(deadline: Instant) -> Duration {
    (deadline + DRAIN).saturating_duration_since(Instant::now())
}

fn pattern() -> Vec<u8> {
    (0..CHUNK + PERIOD).map(|i| (i % PERIOD) as u8).collect()
}

async fn write_until(
    writer: &mut (impl AsyncWriteExt + Unpin),
    deadline: Instant,
) -> std::io::Result<u64> {
    let pattern = pattern();
    let mut offset = 0u64;
    while Instant::now() < deadline {
        let at = (offset % PERIOD as u64) as usize;
        writer.write_all(&pattern[at..at + CHUNK]).await?;
        offset += CHUNK as u64;
    }
    Ok(offset)
}

/// Reads until the backend closes; upload mode expects nothing back.
async fn drain(reader: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        match read_some(reader, &mut buf).await? {
            0 => return Ok(total),
            n => total += n as u64,
        }
    }
}

async fn verify(
    reader: &mut (impl AsyncReadExt + Unpin),
    conn: usize,
) -> Result<u64, ThroughputError> {
    let pattern = pattern();
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    loop {
        let n = read_some(reader, &mut buf)
            .await
            .map_err(|source| ThroughputError::Io { conn, source })?;
        if n == 0 {
            return Ok(offset);
        }
        let at = (offset % PERIOD as u64) as usize;
        if buf[..n] != pattern[at..at + n] {
            return Err(ThroughputError::Corrupt { conn, offset });
        }
        offset += n as u64;
    }
}

/// A read where a TCP close without TLS close_notify counts as the end:
/// some proxies close that way once the backend has closed.
async fn read_some(
    reader: &mut (impl AsyncReadExt + Unpin),
    buf: &mut [u8],
) -> std::io::Result<usize> {
    match reader.read(buf).await {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, Behaviour};

    async fn backend(behaviour: Behaviour, skip_client_hello: bool) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = Backend {
            behaviour,
            skip_client_hello,
        };
        tokio::spawn(backend.run(listener, Duration::from_secs(30)));
        addr
    }

    fn plan(target: SocketAddr, mode: Mode) -> Plan {
        Plan {
            target,
            conns: 2,
            duration: Duration::from_millis(200),
            mode,
            pids: vec![],
        }
    }

    #[tokio::test]
    async fn echo_verifies_every_byte_after_a_skipped_client_hello() {
        let target = backend(Behaviour::Echo, true).await;
        let hello = crate::tls::client_hello("bench.example").unwrap();
        let report = run(plan(target, Mode::Echo), Opening::Hello(hello))
            .await
            .unwrap();
        assert!(report.bytes > 0);
    }

    #[tokio::test]
    async fn upload_counts_what_the_sink_took() {
        let target = backend(Behaviour::Sink, false).await;
        let report = run(plan(target, Mode::Upload), Opening::Plain)
            .await
            .unwrap();
        assert!(report.bytes >= CHUNK as u64 * 2);
        assert!(report.gbit_per_s > 0.0);
    }
}
