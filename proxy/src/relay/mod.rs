//! The relay: moves bytes between an admitted client and its backend until both are done.
//!
//! Two paths with one set of rules. [`splice()`] serves pairs that are plaintext TCP on
//! both sides (passthrough) with splice(2) through pooled pipes; [`copy()`] serves anything
//! else (TLS on either side) through pooled buffers. Both:
//! - half-close per direction: a source's EOF is forwarded as FIN / close_notify and the
//!   other direction keeps flowing;
//! - propagate a reset only after the bytes already owed to the other side are flushed,
//!   by closing the other side with SO_LINGER 0 so its peer sees RST promptly;
//! - end both sides after `idle_timeout` without a byte in either direction, or at a hard
//!   end (`ends_at`: the client certificate's expiry), with one lazily re-armed timer per
//!   connection;
//! - borrow buffers and pipes only while bytes move ([`pool`]), so idle connections,
//!   which are most of them (a BuildKit `RUN` step can keep a session silent for an
//!   hour), cost their sockets (and TLS state) and nothing else.
//!
//! `splice.rs` holds the relay's only `unsafe` (splice(2), pipes);
//! `copy.rs` the buffered path; [`pool`] the buffers and pipes.

mod copy;
pub mod pool;
mod splice;

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::Poll;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Which way bytes flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client → backend.
    Inbound,
    /// Backend → client.
    Outbound,
}

/// How bytes were moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    /// splice(2) through a pipe: the bytes never enter user space.
    Splice,
    /// read into a pooled buffer, then write.
    Copy,
}

/// Which end of the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Client,
    Backend,
}

/// Where the relay reports what it moved; implemented by the gateway (per-pool activity
/// and metrics). Called on the hot path: implementations are atomics only.
pub trait Tally: Send + Sync {
    /// `bytes` were delivered to the destination of `dir`.
    fn moved(&self, dir: Direction, path: Path, bytes: u64);
    /// EOF (FIN or close_notify) on the source of `dir` was forwarded to its destination.
    fn half_closed(&self, dir: Direction);
    /// A reset on the source of `dir` was propagated to its destination.
    fn reset(&self, dir: Direction);
}

/// How a relay behaves: the pool's idle timeout, and the connection's hard end if it has one.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Both sides are closed after this long without a byte in either direction.
    pub idle_timeout: Duration,
    /// Both sides are reset at this instant, whatever is moving.
    pub ends_at: Option<Instant>,
}

/// How a relay ended, and what it moved.
#[derive(Debug)]
pub struct Outcome {
    pub end: End,
    /// Bytes delivered to the backend.
    pub inbound: u64,
    /// Bytes delivered to the client.
    pub outbound: u64,
}

/// Why a relay ended.
#[derive(Debug)]
pub enum End {
    /// Both directions saw EOF and forwarded it.
    Finished,
    /// Nothing moved for `idle_timeout`; both sides were closed.
    IdleTimeout,
    /// `ends_at` came; both sides were reset.
    Expired,
    /// The source of `dir` was reset; its destination was reset in turn.
    Reset { dir: Direction },
    /// A side failed in another way; both sides were reset.
    Error(RelayError),
}

/// A failure that is neither EOF nor a reset.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("client connection failed: {0}")]
    Client(#[source] io::Error),
    #[error("backend connection failed: {0}")]
    Backend(#[source] io::Error),
}

impl RelayError {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Client(_) => "client_io",
            Self::Backend(_) => "backend_io",
        }
    }
}

impl End {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Finished => "finished",
            Self::IdleTimeout => "idle_timeout",
            Self::Expired => "expired",
            Self::Reset {
                dir: Direction::Inbound,
            } => "client_reset",
            Self::Reset {
                dir: Direction::Outbound,
            } => "backend_reset",
            Self::Error(e) => e.reason(),
        }
    }
}

/// A relay leg: a byte stream plus the TCP socket under it (for readiness, and to set
/// SO_LINGER 0 when a reset must be propagated).
pub trait Leg: AsyncRead + AsyncWrite + Unpin + Send {
    fn socket(&self) -> &TcpStream;

    /// Whether a read can find bytes while the socket is not readable (TLS keeps decrypted
    /// plaintext). When not, the relay waits for readiness before borrowing a buffer.
    fn buffers_plaintext(&self) -> bool {
        true
    }
}

impl Leg for TcpStream {
    fn socket(&self) -> &TcpStream {
        self
    }
    fn buffers_plaintext(&self) -> bool {
        false
    }
}

impl Leg for tokio_rustls::server::TlsStream<TcpStream> {
    fn socket(&self) -> &TcpStream {
        self.get_ref().0
    }
}

impl Leg for tokio_rustls::client::TlsStream<TcpStream> {
    fn socket(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// Lets a gateway hold either kind of client leg behind one type.
impl<L: Leg + ?Sized> Leg for Box<L> {
    fn socket(&self) -> &TcpStream {
        (**self).socket()
    }
    fn buffers_plaintext(&self) -> bool {
        (**self).buffers_plaintext()
    }
}

/// Relays a plaintext TCP pair with splice(2) until both directions end, one side resets or
/// fails, or nothing moves for `idle_timeout`.
pub async fn splice(
    client: TcpStream,
    backend: TcpStream,
    settings: &Settings,
    tally: &dyn Tally,
) -> Outcome {
    let meter = Meter::new(tally);
    let duplex = splice::duplex(&client, &backend, &meter, pool::PipeLease::take);
    let end = run(duplex, &meter, settings).await;
    conclude(end, &client, &backend, &meter)
}

/// Relays any pair of legs through pooled buffers, with the same rules as [`splice()`].
pub async fn copy<C: Leg, B: Leg>(
    mut client: C,
    mut backend: B,
    settings: &Settings,
    tally: &dyn Tally,
) -> Outcome {
    let meter = Meter::new(tally);
    let end = run(
        copy::duplex(&mut client, &mut backend, &meter),
        &meter,
        settings,
    )
    .await;
    conclude(end, client.socket(), backend.socket(), &meter)
}

/// Sets TCP_NODELAY (the relay forwards whatever it has at once; gRPC frames are small) and
/// keepalive (finds peers that vanished during hour-long silent builds: first probe after
/// 60 s idle, then every 15 s, given up after 4).
pub fn tune(tcp: &TcpStream) -> io::Result<()> {
    let sock = SockRef::from(tcp);
    sock.set_tcp_nodelay(true)?;
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(15))
        .with_retries(4);
    sock.set_tcp_keepalive(&keepalive)
}

impl Direction {
    pub fn reverse(self) -> Self {
        match self {
            Self::Inbound => Self::Outbound,
            Self::Outbound => Self::Inbound,
        }
    }

    /// The side bytes of this direction come from.
    pub fn source(self) -> Side {
        match self {
            Self::Inbound => Side::Client,
            Self::Outbound => Side::Backend,
        }
    }

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

impl Path {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Splice => "splice",
            Self::Copy => "copy",
        }
    }
}

/// Why one direction stopped before EOF.
#[derive(Debug)]
enum Stop {
    /// The source of this direction was reset.
    Reset(Direction),
    Error(RelayError),
}

impl Stop {
    /// Classifies a failure reading the source of `dir`.
    fn on_read(dir: Direction, e: io::Error) -> Self {
        if is_reset(&e) {
            Self::Reset(dir)
        } else {
            Self::side(dir.source(), e)
        }
    }

    /// Classifies a failure writing the destination of `dir`: a reset there is a reset of
    /// the reverse direction's source.
    fn on_write(dir: Direction, e: io::Error) -> Self {
        let failed = dir.reverse();
        if is_reset(&e) {
            Self::Reset(failed)
        } else {
            Self::side(failed.source(), e)
        }
    }

    fn side(side: Side, e: io::Error) -> Self {
        Self::Error(match side {
            Side::Client => RelayError::Client(e),
            Side::Backend => RelayError::Backend(e),
        })
    }
}

fn is_reset(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | BrokenPipe | ConnectionAborted | NotConnected
    )
}

/// Per-connection counters and the coarse last-activity clock; touched once per chunk.
struct Meter<'a> {
    tally: &'a dyn Tally,
    start: Instant,
    /// Milliseconds after `start` of the last byte moved.
    last_ms: AtomicU64,
    moved: [AtomicU64; 2],
    /// A destination was found reset while writing; the direction reading from that socket
    /// reports its EOF as that reset rather than forwarding a FIN.
    reset_seen: AtomicBool,
}

impl<'a> Meter<'a> {
    fn new(tally: &'a dyn Tally) -> Self {
        Self {
            tally,
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            moved: [AtomicU64::new(0), AtomicU64::new(0)],
            reset_seen: AtomicBool::new(false),
        }
    }

    fn moved(&self, dir: Direction, path: Path, n: usize) {
        self.moved[dir as usize].fetch_add(n as u64, Relaxed);
        self.touch();
        self.tally.moved(dir, path, n as u64);
    }

    fn half_closed(&self, dir: Direction) {
        self.touch();
        self.tally.half_closed(dir);
    }

    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Relaxed))
    }

    fn reset_seen(&self) -> bool {
        self.reset_seen.load(Relaxed)
    }
}

/// How far the two directions of one relay have got.
#[derive(Default)]
struct Joint {
    ended: [Option<Result<(), Stop>>; 2],
    /// Polled first on the next wake-up; alternates, so a direction that is always ready
    /// cannot spend the task's whole cooperative budget every time and starve the other.
    outbound_first: bool,
}

impl Joint {
    /// Polls each direction that has not ended; ready with the relay's result once known.
    fn poll(
        &mut self,
        meter: &Meter<'_>,
        mut poll: impl FnMut(Direction) -> Poll<Result<(), Stop>>,
    ) -> Poll<Result<(), Stop>> {
        let first = if self.outbound_first {
            Direction::Outbound
        } else {
            Direction::Inbound
        };
        self.outbound_first = !self.outbound_first;
        for dir in [first, first.reverse()] {
            if self.ended[dir as usize].is_some() {
                continue;
            }
            if let Poll::Ready(result) = poll(dir)
                && let Some(end) = self.ended(dir, result, meter)
            {
                return Poll::Ready(end);
            }
        }
        Poll::Pending
    }

    /// Records how `dir` ended; returns the relay's result once it is known.
    ///
    /// A reset found while writing (the destination is gone) lets the other direction,
    /// which reads from that socket, deliver what it still holds before the relay ends.
    /// Any other failure ends the relay at once.
    fn ended(
        &mut self,
        dir: Direction,
        result: Result<(), Stop>,
        meter: &Meter<'_>,
    ) -> Option<Result<(), Stop>> {
        match result {
            Err(Stop::Reset(reset)) if reset != dir => meter.reset_seen.store(true, Relaxed),
            Err(stop) => return Some(Err(stop)),
            Ok(()) => {}
        }
        self.ended[dir as usize] = Some(result);
        let [Some(a), Some(b)] = &mut self.ended else {
            return None;
        };
        Some(std::mem::replace(a, Ok(())).and(std::mem::replace(b, Ok(()))))
    }
}

/// Runs the duplex future against the idle timer and the hard end.
async fn run(
    duplex: impl Future<Output = Result<(), Stop>>,
    meter: &Meter<'_>,
    settings: &Settings,
) -> End {
    tokio::select! {
        result = duplex => match result {
            Ok(()) => End::Finished,
            Err(Stop::Reset(dir)) => End::Reset { dir },
            Err(Stop::Error(e)) => End::Error(e),
        },
        end = timer(meter, settings.idle_timeout, settings.ends_at) => end,
    }
}

/// Completes once nothing has moved for `timeout` (IdleTimeout), or at `ends_at` (Expired).
/// One timer: when it fires early (bytes moved meanwhile), it is re-armed for the last
/// activity plus `timeout`, or `ends_at` if that comes first.
async fn timer(meter: &Meter<'_>, timeout: Duration, ends_at: Option<Instant>) -> End {
    let mut idle_at = meter.start + timeout;
    loop {
        tokio::time::sleep_until(ends_at.map_or(idle_at, |end| end.min(idle_at))).await;
        let now = Instant::now();
        if ends_at.is_some_and(|end| end <= now) {
            return End::Expired;
        }
        idle_at = meter.last_activity() + timeout;
        if idle_at <= now {
            return End::IdleTimeout;
        }
    }
}

/// Applies the end to the sockets (RST where a reset or failure must be propagated) and
/// reports it. The caller's drop of the streams then closes them.
fn conclude(end: End, client: &TcpStream, backend: &TcpStream, meter: &Meter<'_>) -> Outcome {
    match &end {
        End::Reset { dir } => {
            meter.tally.reset(*dir);
            abort(match dir {
                Direction::Inbound => backend,
                Direction::Outbound => client,
            });
        }
        // A truncated stream must not look like a clean end to either peer.
        End::Error(_) | End::Expired => {
            abort(client);
            abort(backend);
        }
        End::Finished | End::IdleTimeout => {}
    }
    Outcome {
        end,
        inbound: meter.moved[Direction::Inbound as usize].load(Relaxed),
        outbound: meter.moved[Direction::Outbound as usize].load(Relaxed),
    }
}

/// Makes the coming close send RST instead of FIN.
fn abort(tcp: &TcpStream) {
    let _ = SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests;
