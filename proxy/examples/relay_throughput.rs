//! Single-connection loopback throughput of each relay path, one direction at a time.
//!
//! `cargo run --release -p bkpool-proxy --example relay_throughput [MiB]`: a client writes
//! MiB (default 2048) through the relay to a backend that discards them. A quick check,
//! not a benchmark: run it on a quiet machine and read the figures as indicative.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proxy::relay::{self, Direction, Path, Settings, Tally};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .map_or(512, |a| a.parse().expect("MiB"));
    let rounds: usize = std::env::args()
        .nth(2)
        .map_or(5, |a| a.parse().expect("rounds"));
    let bytes = mib << 20;
    // Best of several rounds, paths interleaved: on a shared machine the best round is the
    // one least disturbed by others.
    let mut best = [(Duration::MAX, Duration::MAX); 4];
    for _ in 0..rounds {
        for (path, best) in best.iter_mut().enumerate() {
            let (took, cpu) = one(path, bytes).await;
            *best = (best.0.min(took), best.1.min(cpu));
        }
    }
    let names = [
        "splice   tcp → tcp",
        "copy     tcp → tcp",
        "copy     tls → tcp",
        "no relay tcp → tcp",
    ];
    for (name, best) in names.iter().zip(best) {
        report(name, bytes, best);
    }
}

/// One transfer through relay path number `path`.
async fn one(path: usize, bytes: usize) -> (Duration, Duration) {
    let settings = Settings {
        idle_timeout: Duration::from_secs(60),
    };
    let (gw_backend, backend) = connected().await;
    match path {
        0 => {
            let (client, gw_client) = connected().await;
            let run = tokio::spawn(async move {
                relay::splice(gw_client, gw_backend, &settings, &NoTally).await
            });
            let took = pump(client, backend, bytes).await;
            run.await.unwrap();
            took
        }
        1 => {
            let (client, gw_client) = connected().await;
            let run = tokio::spawn(async move {
                relay::copy(gw_client, gw_backend, &settings, &NoTally).await
            });
            let took = pump(client, backend, bytes).await;
            run.await.unwrap();
            took
        }
        2 => {
            let (client, gw_client) = tls_pair().await;
            let run = tokio::spawn(async move {
                relay::copy(gw_client, gw_backend, &settings, &NoTally).await
            });
            let took = pump(client, backend, bytes).await;
            run.await.unwrap();
            took
        }
        _ => {
            drop(gw_backend);
            let (client, backend) = connected().await;
            pump(client, backend, bytes).await
        }
    }
}

/// Writes `bytes` into `client` while `backend` reads them; returns the elapsed wall and
/// process CPU time (CPU includes the test's own writer and reader).
async fn pump<C, B>(mut client: C, mut backend: B, bytes: usize) -> (Duration, Duration)
where
    C: AsyncWrite + Unpin + Send + 'static,
    B: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let start = Instant::now();
    let cpu = cpu_time();
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
    (start.elapsed(), cpu_time() - cpu)
}

fn report(what: &str, bytes: usize, (took, cpu): (Duration, Duration)) {
    let gbps = bytes as f64 / took.as_secs_f64() / 1e9;
    let cpu_per_gib = cpu.as_secs_f64() / (bytes as f64 / (1u64 << 30) as f64);
    println!(
        "{what}: {gbps:5.2} GB/s, {cpu_per_gib:4.2} CPU s/GiB ({} MiB in {took:.2?})",
        bytes >> 20
    );
}

/// User + system CPU time of this process so far (from /proc, in clock ticks of 10 ms).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
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

/// A TLS connection over loopback: (client side, server side), self-signed `localhost`.
async fn tls_pair() -> (
    tokio_rustls::client::TlsStream<TcpStream>,
    tokio_rustls::server::TlsStream<TcpStream>,
) {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (near, far) = connected().await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let (near, far) = tokio::join!(connector.connect(name, near), acceptor.accept(far));
    (near.unwrap(), far.unwrap())
}
