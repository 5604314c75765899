//! Micro-benchmarks of the gateway's hot paths:
//! ClientHello/SNI parsing, client-certificate authorization, activity updates under
//! contention, route lookup, and the relay (splice vs pooled copy) over loopback.
//!
//! `cargo bench --bench micro` (add `-- <filter>` to pick one).

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use control::pki::testing::TestPki;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use proxy::activity::Activity;
use proxy::names::PoolId;
use proxy::relay::{self, Direction, Path, Settings, Tally};
use proxy::route::{PoolRoute, Routes, StaticUpstream};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn client_hello(c: &mut Criterion) {
    let pki = TestPki::new().pool("a");
    let config = Arc::new(pki.client("a", "alice").config(&[b"h2"]));
    let name = ServerName::try_from("builds.example.com").unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    let mut group = c.benchmark_group("clienthello");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_sni", |b| {
        b.iter(|| proxy::clienthello::parse(black_box(&hello)).unwrap())
    });
    group.finish();
}

fn client_cert_authorization(c: &mut Criterion) {
    let pools: Vec<String> = (0..100).map(|i| format!("pool-{i}")).collect();
    let pki = pools.iter().fold(TestPki::new(), |p, name| p.pool(name));
    let cas: HashMap<PoolId, Vec<CertificateDer<'static>>> = pools
        .iter()
        .map(|n| {
            (
                n.parse().unwrap(),
                vec![pki.client_ca(n).cert_der().clone()],
            )
        })
        .collect();
    let verifier = proxy::tls::client_verifier(&cas).unwrap();
    let client = pki.client("pool-42", "alice");
    let chain = client.chain_der();
    let now = UnixTime::now();
    let mut group = c.benchmark_group("authorize");
    group.bench_function("verify_client_cert_100_pools", |b| {
        b.iter(|| {
            verifier
                .verify_client_cert(black_box(&chain[0]), &[], now)
                .unwrap()
        })
    });
    group.bench_function("identify_uri_san", |b| {
        b.iter(|| proxy::identify::identify(black_box(&chain[0])).unwrap())
    });
    group.finish();
}

fn activity_updates(c: &mut Criterion) {
    let activity = Arc::new(Activity::default());
    let pool: PoolId = "busy".parse().unwrap();
    let mut group = c.benchmark_group("activity");
    for threads in [1usize, 2] {
        group.throughput(Throughput::Elements(threads as u64 * 10_000));
        group.bench_with_input(
            BenchmarkId::new("tally_moved", threads),
            &threads,
            |b, &threads| {
                b.iter_custom(|iters| {
                    let started = Instant::now();
                    std::thread::scope(|s| {
                        for _ in 0..threads {
                            let (activity, pool) = (activity.clone(), pool.clone());
                            s.spawn(move || {
                                let tally = activity.tally(activity.pool(&pool));
                                for _ in 0..iters * 10_000 {
                                    tally.moved(Direction::Inbound, Path::Copy, 1500);
                                }
                            });
                        }
                    });
                    started.elapsed()
                })
            },
        );
    }
    group.bench_function("open_and_close", |b| {
        let a = activity.pool(&pool);
        b.iter(|| drop(black_box(a.open())))
    });
    group.finish();
}

fn route_lookup(c: &mut Criterion) {
    let routes = Routes::new((0..1000).map(|i| {
        let config = proxy::config::PoolConfig {
            id: format!("ns/pool-{i}").parse().unwrap(),
            mode: proxy::config::Mode::Passthrough,
            client_ca: None,
            backends: vec![],
            hostnames: vec![format!("pool-{i}.builds.example")],
            max_connections: None,
            max_connections_per_identity: None,
            connect_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(60),
            preface_while_waking: false,
            balance: proxy::affinity::Balance::LeastLoaded,
            backend_tls: None,
        };
        PoolRoute::from_config(&config, Arc::new(StaticUpstream::new(&[])), None)
    }));
    let id: PoolId = "ns/pool-500".parse().unwrap();
    let mut group = c.benchmark_group("route");
    group.bench_function("by_pool_1000", |b| {
        b.iter(|| routes.pool(black_box(&id)).unwrap())
    });
    group.bench_function("by_sni_1000", |b| {
        b.iter(|| {
            routes
                .passthrough(black_box("pool-500.builds.example"))
                .unwrap()
        })
    });
    group.finish();
}

/// Ordering a pool's replicas for one connection: affine (the ring of the caller's identity,
/// built per connection from the replicas up at that moment) against least-loaded.
fn replica_order(c: &mut Criterion) {
    use proxy::affinity::{Balance, DEFAULT_LOAD_BOUND};
    use proxy::names::BackendAddr;
    use proxy::route::Candidate;
    use std::sync::atomic::AtomicUsize;
    let candidates = |n: usize| -> Vec<Candidate> {
        (0..n)
            .map(|i| {
                let addr = BackendAddr(([127, 0, 0, 1], 20000 + i as u16).into());
                let load = Arc::new(AtomicUsize::new(i % 3));
                Candidate::new(addr, format!("bk-{i}").into(), load)
            })
            .collect()
    };
    let affine = Balance::Affine {
        load_bound: DEFAULT_LOAD_BOUND,
    };
    let caller = Some("system:serviceaccount:ci:repo-7");
    let mut group = c.benchmark_group("balance");
    for n in [3, 16] {
        let replicas = candidates(n);
        group.bench_function(BenchmarkId::new("affine", n), |b| {
            b.iter(|| affine.order(black_box(replicas.clone()), black_box(caller)))
        });
        group.bench_function(BenchmarkId::new("least_loaded", n), |b| {
            b.iter(|| Balance::LeastLoaded.order(black_box(replicas.clone()), black_box(caller)))
        });
    }
    group.finish();
}

#[derive(Default)]
struct NoTally;
impl Tally for NoTally {
    fn moved(&self, _: Direction, _: Path, _: u64) {}
    fn half_closed(&self, _: Direction) {}
    fn reset(&self, _: Direction) {}
}

/// Moves `bytes` one way through an in-process relay over loopback and returns the time.
async fn relay_once(bytes: usize, splice: bool) -> Duration {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (baddr, faddr) = (backend.local_addr().unwrap(), front.local_addr().unwrap());
    let sink = tokio::spawn(async move {
        let (mut s, _) = backend.accept().await.unwrap();
        let mut buf = vec![0u8; 256 << 10];
        let mut total = 0;
        while total < bytes {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0);
            total += n;
        }
    });
    let relay = tokio::spawn(async move {
        let (client, _) = front.accept().await.unwrap();
        let upstream = TcpStream::connect(baddr).await.unwrap();
        let settings = Settings {
            idle_timeout: Duration::from_secs(30),
            ends_at: None,
        };
        if splice {
            relay::splice(client, upstream, &settings, &NoTally).await
        } else {
            relay::copy(client, upstream, &settings, &NoTally).await
        }
    });
    let mut client = TcpStream::connect(faddr).await.unwrap();
    let chunk = vec![7u8; 256 << 10];
    let started = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        client.write_all(&chunk).await.unwrap();
        sent += chunk.len();
    }
    sink.await.unwrap();
    let took = started.elapsed();
    drop(client);
    let _ = relay.await;
    took
}

fn relay_paths(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    const BYTES: usize = 256 << 20;
    let mut group = c.benchmark_group("relay_loopback");
    group
        .sample_size(10)
        .throughput(Throughput::Bytes(BYTES as u64));
    for (name, splice) in [("splice", true), ("copy", false)] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| rt.block_on(relay_once(BYTES, splice)))
                    .sum()
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    client_hello,
    client_cert_authorization,
    activity_updates,
    route_lookup,
    replica_order,
    relay_paths
);
criterion_main!(benches);
