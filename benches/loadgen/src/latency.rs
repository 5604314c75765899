//! Open-loop request/response latency. One pacing thread sends fixed-size
//! requests at fixed intervals, round-robin over the connections, and each
//! connection's reader thread matches echoed responses (in order) to their
//! *intended* send times: a stall delays the measured responses instead of
//! the schedule, so the percentiles are free of coordinated omission.
//!
//! Plain threads and blocking sockets rather than tokio: tokio's timer has
//! millisecond granularity, ten times the interval at 10,000 msg/s. The
//! timer slack is set to 1 ns so the pacing sleeps wake on time.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::num::NonZeroU64;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use rustls::ClientConnection;

use crate::tls::TlsClient;

#[derive(Debug, Clone)]
pub struct Plan {
    pub target: SocketAddr,
    pub rate: u64,
    pub size: usize,
    pub conns: usize,
    pub duration: Duration,
    /// Requests sent during the warm-up are not recorded.
    pub warmup: Duration,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub rate: u64,
    pub size: usize,
    pub conns: usize,
    pub sent: u64,
    pub recorded: u64,
    pub lost: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// How late the pacing thread sent, at p99: the floor of the percentiles.
    pub send_lag_p99_us: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum LatencyError {
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    #[error("send: {0}")]
    Send(io::Error),
    #[error("no requests recorded")]
    Empty,
}

/// How long responses may trail the last request before they count as lost.
const GRACE: Duration = Duration::from_secs(5);

pub fn run(plan: Plan, tls: Option<TlsClient>) -> Result<Report, LatencyError> {
    // Best effort: without it the sleeps overshoot by ~50 µs.
    let _ = rustix::thread::set_current_timer_slack(NonZeroU64::new(1));
    let mut halves = Vec::new();
    for _ in 0..plan.conns {
        halves.push(open(plan.target, tls.as_ref())?);
    }
    let start = Instant::now();
    let give_up = start + plan.warmup + plan.duration + GRACE;
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for (writer, reader) in halves {
        let (tx, rx) = mpsc::channel();
        writers.push((writer, tx));
        let size = plan.size;
        readers.push(thread::spawn(move || reader.collect(rx, size, give_up)));
    }
    let (sent, lags) = pace(&plan, start, &mut writers)?;
    drop(writers);
    let mut samples: Vec<Duration> = Vec::new();
    for reader in readers {
        samples.extend(reader.join().unwrap_or_default());
    }
    summarize(&plan, sent, samples, lags)
}

/// Sends on schedule; returns requests sent and how late each was sent.
fn pace(
    plan: &Plan,
    start: Instant,
    writers: &mut [(Writer, Sender<Sample>)],
) -> Result<(u64, Vec<Duration>), LatencyError> {
    let interval = Duration::from_secs(1) / plan.rate as u32;
    let total = (plan.rate as f64 * (plan.warmup + plan.duration).as_secs_f64()).round() as u64;
    let payload = vec![b'x'; plan.size];
    let record_from = start + plan.warmup;
    let mut lags = Vec::with_capacity(total as usize);
    for i in 0..total {
        let intended = start + interval * i as u32;
        let now = Instant::now();
        if now < intended {
            thread::sleep(intended - now);
        }
        let (writer, tx) = &mut writers[i as usize % writers.len()];
        let record = intended >= record_from;
        // Queued before the write, so the reader always finds it.
        let _ = tx.send(Sample { intended, record });
        writer.send(&payload).map_err(LatencyError::Send)?;
        if record {
            lags.push(Instant::now().saturating_duration_since(intended));
        }
    }
    Ok((total, lags))
}

fn summarize(
    plan: &Plan,
    sent: u64,
    mut samples: Vec<Duration>,
    mut lags: Vec<Duration>,
) -> Result<Report, LatencyError> {
    let expected = lags.len() as u64;
    samples.sort_unstable();
    lags.sort_unstable();
    let at = |q: f64| percentile_us(&samples, q).ok_or(LatencyError::Empty);
    Ok(Report {
        rate: plan.rate,
        size: plan.size,
        conns: plan.conns,
        sent,
        recorded: samples.len() as u64,
        lost: expected.saturating_sub(samples.len() as u64),
        p50_us: at(0.50)?,
        p90_us: at(0.90)?,
        p99_us: at(0.99)?,
        p999_us: at(0.999)?,
        max_us: at(1.0)?,
        send_lag_p99_us: percentile_us(&lags, 0.99).unwrap_or(0.0),
    })
}

fn percentile_us(sorted: &[Duration], q: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let index = ((sorted.len() as f64 * q).ceil() as usize)
        .saturating_sub(1)
        .min(last);
    Some(sorted[index].as_secs_f64() * 1e6)
}

struct Sample {
    intended: Instant,
    record: bool,
}

/// The sending half of one connection.
struct Writer {
    socket: TcpStream,
    tls: Option<Arc<Mutex<ClientConnection>>>,
}

/// The receiving half of one connection.
struct Reader {
    socket: TcpStream,
    tls: Option<Arc<Mutex<ClientConnection>>>,
}

fn open(target: SocketAddr, tls: Option<&TlsClient>) -> Result<(Writer, Reader), LatencyError> {
    let mut socket = TcpStream::connect(target).map_err(LatencyError::Connect)?;
    socket.set_nodelay(true).map_err(LatencyError::Connect)?;
    let tls = match tls {
        None => None,
        Some(client) => {
            let mut conn =
                ClientConnection::new(client.config.clone(), client.server_name.clone())?;
            while conn.is_handshaking() {
                conn.complete_io(&mut socket)
                    .map_err(LatencyError::Connect)?;
            }
            Some(Arc::new(Mutex::new(conn)))
        }
    };
    let reader_socket = socket.try_clone().map_err(LatencyError::Connect)?;
    // Lets the reader notice the end of the run while nothing arrives.
    reader_socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(LatencyError::Connect)?;
    Ok((
        Writer {
            socket,
            tls: tls.clone(),
        },
        Reader {
            socket: reader_socket,
            tls,
        },
    ))
}

impl Writer {
    fn send(&mut self, payload: &[u8]) -> io::Result<()> {
        let Some(tls) = &self.tls else {
            return self.socket.write_all(payload);
        };
        // Encrypt under the lock, write outside it: the reader must never
        // wait on a socket write to process what it received.
        let mut records = Vec::with_capacity(payload.len() + 64);
        {
            let mut conn = tls.lock().unwrap_or_else(PoisonError::into_inner);
            conn.writer().write_all(payload)?;
            while conn.wants_write() {
                conn.write_tls(&mut records)?;
            }
        }
        self.socket.write_all(&records)
    }
}

impl Reader {
    /// Matches every `size` bytes received to the next intended send time,
    /// until every request was answered or `give_up` passes.
    fn collect(mut self, queue: Receiver<Sample>, size: usize, give_up: Instant) -> Vec<Duration> {
        let mut samples = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut pending = 0usize;
        // The oldest request still waiting for its response, once seen.
        let mut next: Option<Sample> = None;
        while Instant::now() < give_up {
            let received = match self.receive(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if is_timeout(&e) => 0,
                Err(_) => break,
            };
            let now = Instant::now();
            pending += received;
            while pending >= size {
                pending -= size;
                let Some(sample) = next.take().or_else(|| queue.try_recv().ok()) else {
                    return samples;
                };
                if sample.record {
                    samples.push(now - sample.intended);
                }
            }
            if next.is_none() {
                match queue.try_recv() {
                    Ok(sample) => next = Some(sample),
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) => {}
                }
            }
        }
        samples
    }

    /// Plaintext bytes received (0 at end of stream).
    fn receive(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return self.socket.read(buf);
        };
        let n = self.socket.read(buf)?;
        if n == 0 {
            return Ok(0);
        }
        let mut conn = tls.lock().unwrap_or_else(PoisonError::into_inner);
        let mut records = &buf[..n];
        let mut plaintext = 0;
        let mut scratch = [0u8; 16 * 1024];
        while !records.is_empty() {
            conn.read_tls(&mut records)?;
            let state = conn.process_new_packets().map_err(io::Error::other)?;
            let mut left = state.plaintext_bytes_to_read();
            while left > 0 {
                let take = left.min(scratch.len());
                let got = conn.reader().read(&mut scratch[..take])?;
                plaintext += got;
                left -= got;
            }
        }
        // A zero here means "only handshake messages arrived", not EOF.
        if plaintext == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(plaintext)
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, Behaviour};

    #[test]
    fn every_request_is_answered_and_timed() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let target = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let backend = Backend {
                behaviour: Behaviour::Echo,
                skip_client_hello: false,
            };
            tokio::spawn(backend.run(listener, Duration::from_secs(30)));
            addr
        });
        let plan = Plan {
            target,
            rate: 2000,
            size: 1024,
            conns: 2,
            duration: Duration::from_millis(500),
            warmup: Duration::from_millis(100),
        };
        let report = run(plan, None).unwrap();
        assert_eq!(report.sent, 1200);
        assert_eq!(report.recorded, 1000, "{report:?}");
        assert_eq!(report.lost, 0);
        assert!(report.p50_us > 0.0 && report.p50_us <= report.p99_us);
    }

    #[test]
    fn percentiles_take_the_ceiling_rank() {
        let sorted: Vec<_> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile_us(&sorted, 0.5), Some(50.0));
        assert_eq!(percentile_us(&sorted, 0.99), Some(99.0));
        assert_eq!(percentile_us(&sorted, 1.0), Some(100.0));
        assert_eq!(percentile_us(&[], 0.5), None);
    }
}
