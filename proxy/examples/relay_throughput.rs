//! Single-connection loopback throughput of each relay path, one direction at a time.
//!
//! `cargo run --release -p bkpool-proxy --example relay_throughput [MiB] [rounds]`: a client
//! writes MiB (default 512) through the relay to a backend that discards them, best of
//! `rounds` (default 5). The relay runs alone on its own thread and runtime, so its CPU
//! time per GiB is measured apart from the test's writer and reader; on a shared machine
//! that figure is steadier than the wall-clock rate. A quick check, not a benchmark.

use std::time::{Duration, Instant};

use proxy::relay::{self, Direction, Path, Settings, Tally};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Splice,
    CopyTcp,
    CopyTls,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .map_or(512, |a| a.parse().expect("MiB"));
    let rounds: usize = std::env::args()
        .nth(2)
        .map_or(5, |a| a.parse().expect("rounds"));
    let bytes = mib << 20;
    let tls = Tls::new();
    let kinds = [Kind::Splice, Kind::CopyTcp, Kind::CopyTls];
    // Best of several rounds, kinds interleaved: the best round is the least disturbed.
    let mut best = [(Duration::MAX, Duration::MAX); 3];
    for _ in 0..rounds {
        for (kind, best) in kinds.iter().zip(best.iter_mut()) {
            let (wall, cpu) = one(*kind, bytes, &tls).await;
            *best = (best.0.min(wall), best.1.min(cpu));
        }
    }
    for (kind, (wall, cpu)) in kinds.iter().zip(best) {
        let gbps = bytes as f64 / wall.as_secs_f64() / 1e9;
        let cpu_per_gib = cpu.as_secs_f64() / (bytes as f64 / (1u64 << 30) as f64);
        println!(
            "{kind:?}: {gbps:5.2} GB/s, relay {cpu_per_gib:4.2} CPU s/GiB ({mib} MiB in {wall:.2?})"
        );
    }
}

/// One transfer through the relay; returns wall time and the relay thread's CPU time.
async fn one(kind: Kind, bytes: usize, tls: &Tls) -> (Duration, Duration) {
    let (client, gw_client) = connected().await;
    let (gw_backend, backend) = connected().await;
    let gw_client = gw_client.into_std().unwrap();
    let gw_backend = gw_backend.into_std().unwrap();
    let acceptor = tls.acceptor.clone();
    let relay = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let client = TcpStream::from_std(gw_client).unwrap();
            let backend = TcpStream::from_std(gw_backend).unwrap();
            let settings = Settings {
                idle_timeout: Duration::from_secs(60),
                ends_at: None,
            };
            let start = thread_cpu();
            match kind {
                Kind::Splice => relay::splice(client, backend, &settings, &NoTally).await,
                Kind::CopyTcp => relay::copy(client, backend, &settings, &NoTally).await,
                Kind::CopyTls => {
                    let client = acceptor.accept(client).await.unwrap();
                    relay::copy(client, backend, &settings, &NoTally).await
                }
            };
            thread_cpu() - start
        })
    });
    let wall = match kind {
        Kind::CopyTls => {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let client = tls.connector.connect(name, client).await.unwrap();
            pump(client, backend, bytes).await
        }
        _ => pump(client, backend, bytes).await,
    };
    (wall, relay.join().unwrap())
}

/// Writes `bytes` into `client` while `backend` reads them; returns the elapsed time.
async fn pump<C, B>(mut client: C, mut backend: B, bytes: usize) -> Duration
where
    C: AsyncWrite + Unpin + Send + 'static,
    B: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5a; 256 << 10];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            client.write_all(&chunk[..n]).await.unwrap();
            left -= n;
        }
        client.shutdown().await.unwrap();
        // Kept open until the reader is done: closing a socket with unread bytes (TLS
        // session tickets) would send RST.
        client
    });
    let mut buf = vec![0; 256 << 10];
    let mut got = 0;
    loop {
        match backend.read(&mut buf).await.unwrap() {
            0 => break,
            n => got += n,
        }
    }
    backend.shutdown().await.unwrap();
    drop(writer.await.unwrap());
    assert_eq!(got, bytes);
    start.elapsed()
}

/// User + system CPU time of the calling thread (from /proc, in ticks of 10 ms).
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

struct NoTally;

impl Tally for NoTally {
    fn moved(&self, _: Direction, _: Path, _: u64) {}
    fn half_closed(&self, _: Direction) {}
    fn reset(&self, _: Direction) {}
}

async fn connected() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (near, far) = tokio::join!(
        TcpStream::connect(listener.local_addr().unwrap()),
        listener.accept()
    );
    let (near, far) = (near.unwrap(), far.unwrap().0);
    relay::tune(&near).unwrap();
    relay::tune(&far).unwrap();
    (near, far)
}

use proxy::testing::LoopbackTls as Tls;
