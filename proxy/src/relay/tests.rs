//! Relay behaviour over real loopback sockets, with rustls on the TLS legs.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::*;

/// A bound on anything that should happen "promptly" (never reached when the relay works).
const PROMPT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn large_transfers_arrive_intact_both_ways_at_once() {
    for (rig, bytes) in [
        (Rig::Splice, 64 << 20),
        (
            Rig::Copy {
                client_tls: false,
                backend_tls: false,
            },
            32 << 20,
        ),
        (
            Rig::Copy {
                client_tls: true,
                backend_tls: false,
            },
            16 << 20,
        ),
        (
            Rig::Copy {
                client_tls: true,
                backend_tls: true,
            },
            8 << 20,
        ),
    ] {
        let relay = Relay::start(rig, Duration::from_secs(60)).await;
        let (mut client_rx, mut client_tx) = tokio::io::split(relay.client);
        let (mut backend_rx, mut backend_tx) = tokio::io::split(relay.backend);
        let up = async {
            send_pattern(&mut client_tx, 1, bytes).await;
            client_tx.shutdown().await.unwrap();
        };
        let down = async {
            send_pattern(&mut backend_tx, 2, bytes).await;
            backend_tx.shutdown().await.unwrap();
        };
        let got_up = expect_pattern(&mut backend_rx, 1, bytes);
        let got_down = expect_pattern(&mut client_rx, 2, bytes);
        timeout(PROMPT * 4, async {
            tokio::join!(up, down, got_up, got_down)
        })
        .await
        .unwrap();

        let outcome = relay.outcome.await.unwrap();
        assert!(matches!(outcome.end, End::Finished), "{rig:?}: {outcome:?}");
        assert_eq!(
            (outcome.inbound, outcome.outbound),
            (bytes as u64, bytes as u64),
            "{rig:?}"
        );
        let path = rig.path();
        assert_eq!(
            relay.counts.moved(Direction::Inbound, path),
            bytes as u64,
            "{rig:?}"
        );
        assert_eq!(
            relay.counts.moved(Direction::Outbound, path),
            bytes as u64,
            "{rig:?}"
        );
        assert_eq!(relay.counts.half_closed(), [1, 1], "{rig:?}");
    }
}

#[tokio::test]
async fn half_close_lets_the_backend_answer_after_the_request() {
    for rig in Rig::ALL {
        let mut relay = Relay::start(rig, Duration::from_secs(60)).await;
        relay.client.write_all(b"build this").await.unwrap();
        relay.client.shutdown().await.unwrap();

        let mut request = Vec::new();
        relay.backend.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"build this", "{rig:?}");
        assert_eq!(
            relay.counts.half_closed(),
            [1, 0],
            "{rig:?}: EOF forwarded inbound only"
        );

        // The answer comes after the client's EOF, and is bigger than any buffer or pipe.
        send_pattern(&mut relay.backend, 7, 3 << 20).await;
        relay.backend.shutdown().await.unwrap();
        timeout(PROMPT, expect_pattern(&mut relay.client, 7, 3 << 20))
            .await
            .unwrap();
        let mut rest = [0; 1];
        assert_eq!(
            relay.client.read(&mut rest).await.unwrap(),
            0,
            "{rig:?}: then EOF"
        );

        let outcome = relay.outcome.await.unwrap();
        assert!(matches!(outcome.end, End::Finished), "{rig:?}: {outcome:?}");
        assert_eq!(relay.counts.half_closed(), [1, 1], "{rig:?}");
    }
}

#[tokio::test]
async fn tiny_writes_go_through_one_byte_at_a_time() {
    for rig in Rig::ALL {
        let relay = Relay::start(rig, Duration::from_secs(60)).await;
        let (mut client, mut backend) = (relay.client, relay.backend);
        let echo = tokio::spawn(async move {
            let mut byte = [0; 1];
            while backend.read(&mut byte).await.unwrap() == 1 {
                backend.write_all(&byte).await.unwrap();
            }
            backend.shutdown().await.unwrap();
        });
        for i in 0..200u32 {
            let sent = [(i % 251) as u8];
            client.write_all(&sent).await.unwrap();
            let mut back = [0; 1];
            timeout(PROMPT, client.read_exact(&mut back))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(back, sent, "{rig:?}: round {i}");
        }
        client.shutdown().await.unwrap();
        echo.await.unwrap();
        let outcome = relay.outcome.await.unwrap();
        assert_eq!((outcome.inbound, outcome.outbound), (200, 200), "{rig:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_direction_does_not_hold_up_the_other() {
    for rig in [
        Rig::Splice,
        Rig::Copy {
            client_tls: true,
            backend_tls: false,
        },
    ] {
        let relay = Relay::start(rig, Duration::from_secs(60)).await;
        let (mut client_rx, mut client_tx) = tokio::io::split(relay.client);
        let (mut backend_rx, mut backend_tx) = tokio::io::split(relay.backend);
        let upload = tokio::spawn(async move {
            let chunk = vec![0u8; 64 << 10];
            for _ in 0..512 {
                client_tx.write_all(&chunk).await.unwrap();
            }
            client_tx
        });
        let sink = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            while backend_rx.read(&mut buf).await.unwrap() != 0 {}
        });
        // While 32 MiB go up, small messages come down without waiting for the upload.
        for i in 0..20u8 {
            backend_tx.write_all(&[i; 100]).await.unwrap();
            let mut got = [0; 100];
            timeout(Duration::from_secs(1), client_rx.read_exact(&mut got))
                .await
                .unwrap_or_else(|_| panic!("{rig:?}: message {i} held up"))
                .unwrap();
            assert_eq!(got, [i; 100]);
        }
        let mut client_tx = upload.await.unwrap();
        client_tx.shutdown().await.unwrap();
        sink.await.unwrap();
        backend_tx.shutdown().await.unwrap();
        let outcome = relay.outcome.await.unwrap();
        assert!(matches!(outcome.end, End::Finished), "{rig:?}: {outcome:?}");
        assert_eq!(
            (outcome.inbound, outcome.outbound),
            (32 << 20, 2000),
            "{rig:?}"
        );
    }
}

#[tokio::test]
async fn without_pipes_a_spliced_pair_is_copied_instead() {
    let (mut client, gw_client) = connected().await;
    let (gw_backend, mut backend) = connected().await;
    let counts = Counts::default();
    let meter = Meter::new(&counts);
    let no_pipes: splice::Pipes = || Err(io::Error::from_raw_os_error(libc::EMFILE));
    let relay = splice::duplex(&gw_client, &gw_backend, &meter, no_pipes);
    let peers = async {
        let (mut client_rx, mut client_tx) = client.split();
        let (mut backend_rx, mut backend_tx) = backend.split();
        let up = async {
            send_pattern(&mut client_tx, 4, 2 << 20).await;
            client_tx.shutdown().await.unwrap();
        };
        let down = async {
            send_pattern(&mut backend_tx, 5, 2 << 20).await;
            backend_tx.shutdown().await.unwrap();
        };
        tokio::join!(
            up,
            down,
            expect_pattern(&mut backend_rx, 4, 2 << 20),
            expect_pattern(&mut client_rx, 5, 2 << 20)
        );
    };
    let (result, ()) = timeout(PROMPT, async { tokio::join!(relay, peers) })
        .await
        .unwrap();
    result.unwrap();
    assert_eq!(counts.moved(Direction::Inbound, Path::Copy), 2 << 20);
    assert_eq!(counts.moved(Direction::Outbound, Path::Copy), 2 << 20);
    assert_eq!(counts.moved(Direction::Inbound, Path::Splice), 0);
    assert_eq!(counts.half_closed(), [1, 1]);
}

#[tokio::test]
async fn tls_client_closing_tcp_without_close_notify_counts_as_eof() {
    let mut relay = Relay::start(
        Rig::Copy {
            client_tls: true,
            backend_tls: false,
        },
        Duration::from_secs(60),
    )
    .await;
    relay.client.write_all(b"last words").await.unwrap();
    relay.client.flush().await.unwrap();
    SockRef::from(relay.client.socket())
        .shutdown(std::net::Shutdown::Write)
        .unwrap();

    let mut request = Vec::new();
    timeout(PROMPT, relay.backend.read_to_end(&mut request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(request, b"last words");

    relay.backend.write_all(b"bye").await.unwrap();
    relay.backend.shutdown().await.unwrap();
    let mut answer = Vec::new();
    relay.client.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer, b"bye", "answered, then a proper close_notify");
    assert!(matches!(relay.outcome.await.unwrap().end, End::Finished));
}

#[tokio::test]
async fn backend_reset_reaches_the_client_after_the_bytes_it_sent() {
    for rig in [
        Rig::Splice,
        Rig::Copy {
            client_tls: true,
            backend_tls: false,
        },
    ] {
        let mut relay = Relay::start(rig, Duration::from_secs(60)).await;
        send_pattern(&mut relay.backend, 3, 100_000).await;
        timeout(PROMPT, expect_pattern(&mut relay.client, 3, 100_000))
            .await
            .unwrap();

        reset(relay.backend.socket());
        drop(relay.backend);
        let mut rest = [0; 16];
        let read = timeout(PROMPT, relay.client.read(&mut rest))
            .await
            .expect("reset seen promptly");
        let err = read.expect_err("a reset, not a clean end");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{rig:?}");

        let outcome = relay.outcome.await.unwrap();
        assert!(
            matches!(
                outcome.end,
                End::Reset {
                    dir: Direction::Outbound
                }
            ),
            "{rig:?}: {outcome:?}"
        );
        assert_eq!(outcome.end.reason(), "backend_reset");
        assert_eq!(
            relay.counts.reset[Direction::Outbound as usize].load(Relaxed),
            1
        );
    }
}

#[tokio::test]
async fn client_reset_reaches_the_backend() {
    for rig in [
        Rig::Splice,
        Rig::Copy {
            client_tls: false,
            backend_tls: true,
        },
    ] {
        let mut relay = Relay::start(rig, Duration::from_secs(60)).await;
        relay.client.write_all(b"half a request").await.unwrap();
        relay.client.flush().await.unwrap();
        let mut got = [0; 14];
        timeout(PROMPT, relay.backend.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"half a request");

        reset(relay.client.socket());
        drop(relay.client);
        let mut rest = [0; 16];
        let read = timeout(PROMPT, relay.backend.read(&mut rest))
            .await
            .expect("reset seen promptly");
        assert_eq!(
            read.unwrap_err().kind(),
            io::ErrorKind::ConnectionReset,
            "{rig:?}"
        );
        let outcome = relay.outcome.await.unwrap();
        assert!(
            matches!(
                outcome.end,
                End::Reset {
                    dir: Direction::Inbound
                }
            ),
            "{rig:?}: {outcome:?}"
        );
    }
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_idle_timeout() {
    let idle = Duration::from_millis(500);
    let gap = idle / 5;
    for rig in [
        Rig::Splice,
        Rig::Copy {
            client_tls: true,
            backend_tls: false,
        },
    ] {
        let mut relay = Relay::start(rig, idle).await;
        // A byte every `gap`, either way, keeps it open past one timeout.
        for i in 0..7 {
            let (from, to) = if i % 2 == 0 {
                (&mut relay.client, &mut relay.backend)
            } else {
                (&mut relay.backend, &mut relay.client)
            };
            from.write_all(b"x").await.unwrap();
            from.flush().await.unwrap();
            to.read_exact(&mut [0; 1]).await.unwrap();
            tokio::time::sleep(gap).await;
        }
        assert!(!relay.outcome.is_finished(), "{rig:?}: closed while active");

        let silent = Instant::now();
        let outcome = timeout(PROMPT, relay.outcome).await.unwrap().unwrap();
        let waited = silent.elapsed();
        assert!(
            matches!(outcome.end, End::IdleTimeout),
            "{rig:?}: {outcome:?}"
        );
        // Due `idle` after the last byte, which came `gap` before `silent`.
        assert!(
            waited >= idle - gap * 2 && waited < idle * 4,
            "{rig:?}: {waited:?}"
        );
        let mut rest = [0; 1];
        let n = timeout(PROMPT, relay.backend.read(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0, "{rig:?}: the backend sees the close");
    }
}

#[tokio::test(start_paused = true)]
async fn the_idle_timer_is_rearmed_from_the_last_activity() {
    let counts = Counts::default();
    let meter = Meter::new(&counts);
    let start = Instant::now();
    let touch = async {
        tokio::time::sleep(Duration::from_secs(40)).await;
        meter.touch();
    };
    let (_, end) = tokio::join!(touch, timer(&meter, Duration::from_secs(60), None));
    assert!(matches!(end, End::IdleTimeout), "{end:?}");
    assert_eq!(
        start.elapsed().as_secs(),
        100,
        "60 s after the activity at 40 s"
    );
}

#[tokio::test(start_paused = true)]
async fn the_hard_end_comes_whatever_moves_and_before_the_idle_timeout() {
    let counts = Counts::default();
    let meter = Meter::new(&counts);
    let start = Instant::now();
    let busy = async {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            meter.touch();
        }
    };
    let ends_at = Some(start + Duration::from_secs(30));
    tokio::select! {
        () = busy => panic!("the hard end did not come while bytes moved"),
        end = timer(&meter, Duration::from_secs(60), ends_at) => {
            assert!(matches!(end, End::Expired), "{end:?}");
        }
    }
    assert_eq!(start.elapsed().as_secs(), 30);
    // Silent, a later hard end leaves the idle timeout first.
    let meter = Meter::new(&counts);
    let end = timer(
        &meter,
        Duration::from_secs(60),
        Some(meter.start + Duration::from_secs(90)),
    );
    assert!(matches!(end.await, End::IdleTimeout));
}

#[tokio::test]
async fn garbage_from_a_tls_client_is_a_client_error_after_what_it_sent() {
    let mut relay = Relay::start(
        Rig::Copy {
            client_tls: true,
            backend_tls: false,
        },
        Duration::from_secs(60),
    )
    .await;
    relay.client.write_all(b"hello").await.unwrap();
    relay.client.flush().await.unwrap();
    let mut got = [0; 5];
    timeout(PROMPT, relay.backend.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"hello");

    relay.client.socket().writable().await.unwrap();
    relay
        .client
        .socket()
        .try_write(b"this is not a TLS record")
        .unwrap();
    let outcome = timeout(PROMPT, relay.outcome).await.unwrap().unwrap();
    let End::Error(err) = &outcome.end else {
        panic!("{outcome:?}")
    };
    assert!(
        matches!(err, RelayError::Client(e) if e.kind() == io::ErrorKind::InvalidData),
        "{err:?}"
    );
    assert_eq!(outcome.end.reason(), "client_io");
    assert_eq!(outcome.inbound, 5);
    let mut rest = [0; 1];
    let read = timeout(PROMPT, relay.backend.read(&mut rest))
        .await
        .unwrap();
    assert!(
        read.is_err(),
        "the backend is reset, not shown a clean end: {read:?}"
    );
}

#[tokio::test]
async fn tune_sets_nodelay_and_keepalive() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    tune(&tcp).unwrap();
    let sock = SockRef::from(&tcp);
    assert!(sock.tcp_nodelay().unwrap());
    assert!(sock.keepalive().unwrap());
}

#[test]
fn a_reset_found_while_writing_waits_for_the_direction_reading_that_socket() {
    let counts = Counts::default();
    let meter = Meter::new(&counts);
    let mut joint = Joint::default();
    // Writing to the backend failed: the backend (source of Outbound) was reset.
    let first = joint.ended(
        Direction::Inbound,
        Err(Stop::Reset(Direction::Outbound)),
        &meter,
    );
    assert!(first.is_none(), "outbound may still owe the client bytes");
    assert!(meter.reset_seen());
    // Outbound delivers what it read, then reports the reset it finds.
    let end = joint.ended(
        Direction::Outbound,
        Err(Stop::Reset(Direction::Outbound)),
        &meter,
    );
    assert!(
        matches!(end, Some(Err(Stop::Reset(Direction::Outbound)))),
        "{end:?}"
    );
}

#[test]
fn a_reset_read_or_a_failure_ends_the_relay_at_once() {
    let counts = Counts::default();
    let meter = Meter::new(&counts);
    let mut joint = Joint::default();
    let end = joint.ended(
        Direction::Outbound,
        Err(Stop::Reset(Direction::Outbound)),
        &meter,
    );
    assert!(
        matches!(end, Some(Err(Stop::Reset(Direction::Outbound)))),
        "{end:?}"
    );
    let mut joint = Joint::default();
    assert!(joint.ended(Direction::Inbound, Ok(()), &meter).is_none());
    let failed = Stop::Error(RelayError::Backend(io::ErrorKind::TimedOut.into()));
    let end = joint.ended(Direction::Outbound, Err(failed), &meter);
    assert!(
        matches!(end, Some(Err(Stop::Error(RelayError::Backend(_))))),
        "{end:?}"
    );
    assert!(!meter.reset_seen());
}

#[test]
fn directions_take_turns_being_polled_first() {
    let counts = Counts::default();
    let meter = Meter::new(&counts);
    let mut joint = Joint::default();
    let mut order = Vec::new();
    for _ in 0..3 {
        let polled = joint.poll(&meter, |dir| {
            order.push(dir);
            Poll::Pending
        });
        assert!(polled.is_pending());
    }
    use Direction::*;
    assert_eq!(
        order,
        [Inbound, Outbound, Outbound, Inbound, Inbound, Outbound]
    );
}

#[test]
fn labels_are_fixed_strings() {
    assert_eq!(Direction::Inbound.as_str(), "inbound");
    assert_eq!(Direction::Outbound.reverse(), Direction::Inbound);
    assert_eq!(Path::Splice.as_str(), "splice");
    assert_eq!(
        End::Reset {
            dir: Direction::Inbound
        }
        .reason(),
        "client_reset"
    );
    let failed = RelayError::Backend(io::ErrorKind::TimedOut.into());
    assert_eq!(End::Error(failed).reason(), "backend_io");
}

// ---- harness -------------------------------------------------------------------------

/// Which relay runs between the test's client and backend.
#[derive(Clone, Copy, Debug)]
enum Rig {
    Splice,
    Copy { client_tls: bool, backend_tls: bool },
}

impl Rig {
    const ALL: [Rig; 4] = [
        Rig::Splice,
        Rig::Copy {
            client_tls: false,
            backend_tls: false,
        },
        Rig::Copy {
            client_tls: true,
            backend_tls: false,
        },
        Rig::Copy {
            client_tls: true,
            backend_tls: true,
        },
    ];

    fn path(self) -> Path {
        match self {
            Rig::Splice => Path::Splice,
            Rig::Copy { .. } => Path::Copy,
        }
    }
}

/// A running relay and the two peers the test plays.
struct Relay {
    client: Box<dyn Leg>,
    backend: Box<dyn Leg>,
    outcome: JoinHandle<Outcome>,
    counts: Arc<Counts>,
}

impl Relay {
    async fn start(rig: Rig, idle_timeout: Duration) -> Self {
        let (client, gw_client) = connected().await;
        let (gw_backend, backend) = connected().await;
        for tcp in [&client, &gw_client, &gw_backend, &backend] {
            tune(tcp).unwrap();
        }
        let counts = Arc::new(Counts::default());
        let settings = Settings {
            idle_timeout,
            ends_at: None,
        };
        let tls = Tls::new();
        let (client, backend, outcome): (Box<dyn Leg>, Box<dyn Leg>, _) = match rig {
            Rig::Splice => {
                let c = counts.clone();
                let run = tokio::spawn(async move {
                    super::splice(gw_client, gw_backend, &settings, &*c).await
                });
                (Box::new(client), Box::new(backend), run)
            }
            Rig::Copy {
                client_tls: false,
                backend_tls: false,
            } => {
                let run = spawn_copy(gw_client, gw_backend, settings, counts.clone());
                (Box::new(client), Box::new(backend), run)
            }
            Rig::Copy {
                client_tls: true,
                backend_tls: false,
            } => {
                let (client, gw_client) = tls.wrap(client, gw_client).await;
                let run = spawn_copy(gw_client, gw_backend, settings, counts.clone());
                (Box::new(client), Box::new(backend), run)
            }
            Rig::Copy {
                client_tls: false,
                backend_tls: true,
            } => {
                let (gw_backend, backend) = tls.wrap(gw_backend, backend).await;
                let run = spawn_copy(gw_client, gw_backend, settings, counts.clone());
                (Box::new(client), Box::new(backend), run)
            }
            Rig::Copy {
                client_tls: true,
                backend_tls: true,
            } => {
                let (client, gw_client) = tls.wrap(client, gw_client).await;
                let (gw_backend, backend) = tls.wrap(gw_backend, backend).await;
                let run = spawn_copy(gw_client, gw_backend, settings, counts.clone());
                (Box::new(client), Box::new(backend), run)
            }
        };
        Self {
            client,
            backend,
            outcome,
            counts,
        }
    }
}

fn spawn_copy<C: Leg + 'static, B: Leg + 'static>(
    client: C,
    backend: B,
    settings: Settings,
    counts: Arc<Counts>,
) -> JoinHandle<Outcome> {
    tokio::spawn(async move { super::copy(client, backend, &settings, &*counts).await })
}

/// Two ends of one loopback TCP connection: (connecting side, accepted side).
async fn connected() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (near, far) = tokio::join!(
        TcpStream::connect(listener.local_addr().unwrap()),
        listener.accept()
    );
    (near.unwrap(), far.unwrap().0)
}

/// Resets a connection: the close that follows sends RST.
fn reset(tcp: &TcpStream) {
    SockRef::from(tcp).set_linger(Some(Duration::ZERO)).unwrap();
}

/// A CA, a server certificate for `localhost` signed by it, and configs trusting it.
use crate::testing::LoopbackTls as Tls;

/// A tally the tests read back.
#[derive(Default)]
struct Counts {
    moved: [[AtomicU64; 2]; 2],
    half_closed: [AtomicU64; 2],
    reset: [AtomicU64; 2],
}

impl Counts {
    fn moved(&self, dir: Direction, path: Path) -> u64 {
        self.moved[dir as usize][path as usize].load(Relaxed)
    }

    fn half_closed(&self) -> [u64; 2] {
        [0, 1].map(|d| self.half_closed[d].load(Relaxed))
    }
}

impl Tally for Counts {
    fn moved(&self, dir: Direction, path: Path, bytes: u64) {
        self.moved[dir as usize][path as usize].fetch_add(bytes, Relaxed);
    }
    fn half_closed(&self, dir: Direction) {
        self.half_closed[dir as usize].fetch_add(1, Relaxed);
    }
    fn reset(&self, dir: Direction) {
        self.reset[dir as usize].fetch_add(1, Relaxed);
    }
}

/// Bytes `pos..pos + len` of the stream numbered `seed`: 8-byte words, each distinct, so a
/// lost, repeated or reordered byte shows.
fn pattern(seed: u64, pos: usize, len: usize) -> Vec<u8> {
    let first = pos / 8;
    let words = (pos + len).div_ceil(8) - first;
    let mut bytes = Vec::with_capacity(words * 8);
    for i in first..first + words {
        let word = (i as u64 ^ (seed << 56)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    bytes.drain(..pos % 8);
    bytes.truncate(len);
    bytes
}

/// Writes `total` bytes of stream `seed` in chunks of varying size.
async fn send_pattern<W: AsyncWrite + Unpin + ?Sized>(w: &mut W, seed: u64, total: usize) {
    let mut pos = 0;
    let mut step = 1;
    while pos < total {
        step = (step * 7 + 1) % (256 * 1024) + 1;
        let len = step.min(total - pos);
        w.write_all(&pattern(seed, pos, len)).await.unwrap();
        pos += len;
    }
    w.flush().await.unwrap();
}

/// Reads exactly `total` bytes and checks they are stream `seed`.
async fn expect_pattern<R: AsyncRead + Unpin + ?Sized>(r: &mut R, seed: u64, total: usize) {
    let mut buf = vec![0; 256 * 1024];
    let mut pos = 0;
    while pos < total {
        let want = buf.len().min(total - pos);
        let n = r.read(&mut buf[..want]).await.unwrap();
        assert_ne!(n, 0, "stream {seed} ended after {pos} of {total} bytes");
        assert!(
            buf[..n] == pattern(seed, pos, n)[..],
            "stream {seed} differs in {pos}..{}",
            pos + n
        );
        pos += n;
    }
}
