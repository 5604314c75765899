//! Holding an authenticated connection while its pool wakes: the client is watched, not just
//! parked.
//!
//! A backend that is ready is used at once and nothing here happens. Otherwise, while the
//! upstream waits for a backend:
//! - terminate mode with `h2` negotiated (and the pool's `preface_while_waking` on): the
//!   gateway answers the HTTP/2 preface itself once the client sent its own
//!   ([`crate::preface`]), so a wake may outlast the
//!   client's 20 s connect deadline; the client's frames are kept for the backend, and a
//!   client that leaves ends its hold at once;
//! - otherwise the connection is parked, and a client that closes before sending anything
//!   (a passthrough client waits for the ServerHello in silence) ends its hold at once.
//!
//! When the wait fails after the preface was answered, the client gets a GOAWAY saying no
//! stream was processed (so it may retry) with the refusal reason as debug data.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::preface::{self, Fallback, Held};
use crate::route::{Candidate, RouteError};

/// How long a client has to acknowledge the gateway's SETTINGS once a backend is ready. A
/// client acknowledges on receipt, so this only bounds a broken one.
const ACK_DEADLINE: Duration = Duration::from_secs(5);

/// The client side of a connection that may be held.
pub enum Client<'a> {
    /// Terminate mode; `answer` when the pool answers the HTTP/2 preface while waking.
    Tls {
        stream: &'a mut TlsStream<TcpStream>,
        answer: bool,
    },
    /// Passthrough: the ClientHello was read, the client waits for the backend's answer.
    Raw(&'a TcpStream),
}

/// What the hold produced besides the backends.
#[derive(Debug, Default)]
pub struct Released {
    /// Client bytes read while held, to send to the backend before anything else.
    pub replay: Vec<u8>,
    /// Whether the gateway answered the HTTP/2 preface (the connection was held).
    pub answered: bool,
    /// Why the preface was not answered, or answering stopped, if it did.
    pub fallback: Option<Fallback>,
}

/// Why a held connection ended without a backend.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("the client left while its connection was held")]
    ClientLeft,
    #[error("the client did not acknowledge the gateway's HTTP/2 SETTINGS")]
    NoAck,
}

impl HoldError {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Route(e) => e.reason(),
            Self::ClientLeft => "client_left_while_held",
            Self::NoAck => "h2_no_ack",
        }
    }
}

/// Waits for `candidates`, watching `client` meanwhile (see the module docs). On success the
/// backends come with what must be replayed to them, and with what `open` made the moment
/// they were ready: the connection's count as open, taken before the last wait for the
/// client (its HTTP/2 acknowledgement), so that it is never neither held nor open.
pub async fn wait<F, G>(
    candidates: F,
    client: Client<'_>,
    open: impl FnOnce() -> G,
) -> (Result<(Vec<Candidate>, G), HoldError>, Released)
where
    F: Future<Output = Result<Vec<Candidate>, RouteError>>,
{
    let mut candidates = pin!(candidates);
    if let Poll::Ready(ready) = poll_fn(|cx| Poll::Ready(candidates.as_mut().poll(cx))).await {
        let ready = ready.map(|c| (c, open())).map_err(HoldError::from);
        return (ready, Released::default());
    }
    let (parked, released) = match client {
        Client::Raw(tcp) => (parked(candidates, tcp).await, Released::default()),
        Client::Tls { stream, answer } => {
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            if !answer {
                (
                    parked(candidates, stream.get_ref().0).await,
                    Released::default(),
                )
            } else if !h2 {
                let released = Released {
                    fallback: Some(Fallback::NotH2),
                    ..Released::default()
                };
                (parked(candidates, stream.get_ref().0).await, released)
            } else {
                return answered(candidates, stream, open).await;
            }
        }
    };
    (parked.map(|c| (c, open())), released)
}

/// Parked: waits for the backends, ending early only if the client closes before sending
/// anything (bytes it sends cannot be read here, so after them only the wait ends the hold).
async fn parked<F>(candidates: F, tcp: &TcpStream) -> Result<Vec<Candidate>, HoldError>
where
    F: Future<Output = Result<Vec<Candidate>, RouteError>>,
{
    tokio::select! {
        biased;
        ready = candidates => ready.map_err(HoldError::from),
        () = closed_before_sending(tcp) => Err(HoldError::ClientLeft),
    }
}

/// Resolves when the peer closes (or resets) before sending a byte; pends forever once it
/// has sent one.
async fn closed_before_sending(tcp: &TcpStream) {
    let mut probe = [0u8; 1];
    loop {
        if tcp.readable().await.is_err() {
            return;
        }
        match tcp.peek(&mut probe).await {
            Ok(0) => return,
            Ok(_) => return std::future::pending().await,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
    }
}

/// Keeps the client's frames while the wait lasts, answers the preface once the client has
/// sent its own, and makes sure the acknowledgement of the gateway's SETTINGS was seen (and
/// removed) before the backend gets the rest.
async fn answered<F, G>(
    candidates: std::pin::Pin<&mut F>,
    stream: &mut TlsStream<TcpStream>,
    open: impl FnOnce() -> G,
) -> (Result<(Vec<Candidate>, G), HoldError>, Released)
where
    F: Future<Output = Result<Vec<Candidate>, RouteError>>,
{
    let mut released = Released::default();
    let mut held = Held::new(preface::DEFAULT_LIMIT);
    let mut candidates = candidates;
    let mut chunk = vec![0u8; 16 * 1024];
    let ready = loop {
        let room = held.room().min(chunk.len());
        tokio::select! {
            biased;
            ready = candidates.as_mut() => break ready,
            read = stream.read(&mut chunk[..room]) => match read {
                Ok(0) | Err(_) => return (Err(HoldError::ClientLeft), released),
                Ok(n) => {
                    if let Err(fallback) = held.push(&chunk[..n]) {
                        // Stop reading: what is kept is replayed as it is, the rest stays
                        // in the socket until the relay takes it.
                        released.fallback = Some(fallback);
                        break candidates.await;
                    }
                    // Answer only a client that spoke HTTP/2 first: whatever else offered
                    // `h2` never sees a byte from the gateway.
                    if !released.answered && held.spoke_h2() {
                        let sent = stream.write_all(&preface::SETTINGS).await;
                        if sent.is_err() || stream.flush().await.is_err() {
                            return (Err(HoldError::ClientLeft), released);
                        }
                        released.answered = true;
                    }
                }
            },
        }
    };
    let candidates = match ready {
        Ok(candidates) => (candidates, open()),
        Err(e) => {
            if released.answered {
                let _ = stream.write_all(&preface::goaway(e.reason())).await;
                let _ = stream.shutdown().await;
            }
            return (Err(e.into()), released);
        }
    };
    if released.answered && released.fallback.is_none() && !held.acknowledged() {
        let acked = tokio::time::timeout(ACK_DEADLINE, read_until_ack(stream, &mut held)).await;
        match acked {
            Ok(Ok(())) => {}
            Ok(Err(fallback)) => released.fallback = Some(fallback),
            Err(_) => return (Err(HoldError::NoAck), released),
        }
    }
    released.replay = held.into_replay();
    (Ok(candidates), released)
}

/// Reads until the client's acknowledgement arrives; `Err` when the stream goes wrong first.
async fn read_until_ack(
    stream: &mut TlsStream<TcpStream>,
    held: &mut Held,
) -> Result<(), Fallback> {
    let mut chunk = [0u8; 4096];
    while !held.acknowledged() {
        let room = held.room().min(chunk.len());
        match stream.read(&mut chunk[..room]).await {
            // The relay sees the same end and handles it.
            Ok(0) | Err(_) => return Ok(()),
            Ok(n) => held.push(&chunk[..n])?,
        }
    }
    Ok(())
}
