//! One connection's life, top to bottom:
//! admit → handshake → authorize → route (holding while the pool wakes) → connect → relay.
//!
//! Every refusal is counted with a fixed reason; every slot is an RAII permit held by this
//! function's frame, so an early return releases everything.
//!
//! The handshake, backend TLS and relay futures are boxed, and TLS streams stay boxed: a
//! task's allocation is as large as its largest state, for its whole life, and most
//! connections spend that life idle. Inline, they made each task about 7.7 KiB.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::activity::OpenGuard;
use crate::admit::{Permit, PoolPermit};
use crate::config::Mode;
use crate::connect::{self, Connected};
use crate::gateway::Gateway;
use crate::handshake::{self, Accepted};
use crate::hold;
use crate::names::ClientIdentity;
use crate::relay::{self, Direction, Outcome, Tally};
use crate::route::{BackendLoad, Caller, PoolRoute};

/// Serves one accepted connection. `_slot` is its place under the global limit.
pub async fn handle(gateway: &Arc<Gateway>, tcp: TcpStream, peer: SocketAddr, _slot: Permit) {
    if let Err(e) = relay::tune(&tcp) {
        tracing::debug!(error = %e, "socket options not set");
    }
    let handshake_permit = match gateway.admission.handshake(peer.ip()) {
        Ok(permit) => permit,
        Err(refused) => return gateway.metrics.rejected(None, refused.reason()),
    };
    let routes = gateway.routes.load_full();
    let started = Instant::now();
    let limits = &gateway.settings;
    let accepted = tokio::time::timeout(
        limits.handshake_timeout,
        // Boxed: the handshake's state is large and short-lived; inline it would stay in
        // every connection task's allocation for the connection's whole life.
        Box::pin(handshake::accept(
            tcp,
            &routes,
            gateway.tls.load_full(),
            limits.client_hello_timeout,
        )),
    )
    .await;
    drop(handshake_permit);
    let accepted = match accepted {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "handshake failed");
            return gateway.metrics.rejected(None, e.reason());
        }
        Err(_) => {
            tracing::debug!(%peer, "handshake timed out");
            return gateway.metrics.rejected(None, "handshake_timeout");
        }
    };
    gateway.metrics.handshake(started.elapsed());

    match accepted {
        Accepted::Terminated {
            mut stream,
            peer: who,
            expires,
        } => {
            let Some(route) = routes
                .pool(&who.pool)
                .filter(|r| r.mode == Mode::Terminate)
                .cloned()
            else {
                // The verifier only accepts pools it has a CA for; a route swap in between can
                // still leave the pool without a route.
                return gateway.metrics.rejected(None, "no_route");
            };
            let client = hold::Client::Tls {
                stream: &mut stream,
                answer: route.preface_while_waking,
            };
            let identity = Some(&who.identity);
            let Some(routed) = admit_and_connect(gateway, &route, identity, peer, client).await
            else {
                return;
            };
            let Routed {
                backend,
                replay,
                guards,
            } = routed;
            // A connection never outlives the certificate that opened it: its lifetime is the
            // only revocation there is.
            let settings = relay::Settings {
                ends_at: ends_at(expires),
                ..settings(&route)
            };
            let outcome = match &route.backend_tls {
                None => match replayed(backend.tcp, &replay, &route).await {
                    Ok(tcp) => {
                        let relay = relay::copy(stream, tcp, &settings, &backend.tally);
                        Ok(Box::pin(relay).await)
                    }
                    Err(reason) => Err(reason),
                },
                Some(tls) => {
                    let secure =
                        connect::secure(backend.tcp, backend.addr, tls, route.connect_timeout);
                    match Box::pin(secure).await {
                        Ok(secured) => match replayed(secured, &replay, &route).await {
                            Ok(secured) => {
                                let relay = relay::copy(
                                    stream,
                                    Box::new(secured),
                                    &settings,
                                    &backend.tally,
                                );
                                Ok(Box::pin(relay).await)
                            }
                            Err(reason) => Err(reason),
                        },
                        Err(e) => {
                            tracing::warn!(pool = %route.id, error = %e, "backend TLS failed");
                            Err(e.reason())
                        }
                    }
                }
            };
            finish(gateway, &route, identity, peer, guards, outcome);
        }
        Accepted::Passthrough {
            tcp,
            route,
            mut hello,
        } => {
            // Kept until it is replayed, perhaps for a whole wake: its real size counts
            // against the gateway's memory for buffered ClientHellos.
            hello.shrink_to_fit();
            let buffered = match gateway.admission.buffer_client_hello(hello.capacity()) {
                Ok(permit) => permit,
                Err(refused) => {
                    gateway.activity.pool(&route.id).rejected();
                    let pool = Some(route.id.as_str());
                    return gateway.metrics.rejected(pool, refused.reason());
                }
            };
            let client = hold::Client::Raw(&tcp);
            let Some(routed) = admit_and_connect(gateway, &route, None, peer, client).await else {
                return;
            };
            let Routed {
                backend, guards, ..
            } = routed;
            let outcome = match replayed(backend.tcp, &hello, &route).await {
                Ok(backend_tcp) => {
                    // The replayed ClientHello is the first of the client's bytes.
                    let tally = &backend.tally;
                    tally.moved(Direction::Inbound, relay::Path::Copy, hello.len() as u64);
                    drop((hello, buffered));
                    let settings = settings(&route);
                    let relay = relay::splice(tcp, backend_tcp, &settings, tally);
                    Ok(Box::pin(relay).await)
                }
                Err(reason) => Err(reason),
            };
            finish(gateway, &route, None, peer, guards, outcome);
        }
    }
}

/// A connected backend, with the tally of its pool.
pub struct Backend<'a> {
    pub tcp: TcpStream,
    pub addr: crate::names::BackendAddr,
    pub tally: crate::activity::ConnectionTally<'a>,
}

/// An authenticated connection with its backend.
struct Routed<'g> {
    backend: Backend<'g>,
    /// Client bytes read while the connection was held, owed to the backend first.
    replay: Vec<u8>,
    guards: Guards,
}

/// Every slot an authenticated connection holds, released together when this drops after
/// the relay.
struct Guards {
    opened: Instant,
    _permit: PoolPermit,
    load: BackendLoad,
    _open: OpenGuard,
}

/// The authenticated part: pool limits, backend choice (holding the connection while the pool
/// wakes, see [`hold`]), connect. `None` when the connection was refused (and counted).
async fn admit_and_connect<'g>(
    gateway: &'g Arc<Gateway>,
    route: &Arc<PoolRoute>,
    identity: Option<&ClientIdentity>,
    peer: SocketAddr,
    client: hold::Client<'_>,
) -> Option<Routed<'g>> {
    let pool = &route.id;
    let activity = gateway.activity.pool(pool);
    let refuse = |reason: &'static str| {
        activity.rejected();
        gateway.metrics.rejected(Some(pool.as_str()), reason);
    };
    let permit = match gateway.admission.enter(
        pool,
        identity,
        route.max_connections,
        route.max_connections_per_identity,
    ) {
        Ok(permit) => permit,
        Err(refused) => {
            refuse(refused.reason());
            return None;
        }
    };
    let caller = Caller::new(
        peer.ip(),
        identity.is_some(),
        pool.clone(),
        gateway.admission.clone(),
    );
    // Boxed: a held connection's state (the preface buffer) is large and rare.
    // Open from the moment it is routed, not once its backend answers: the client's HTTP/2
    // acknowledgement and a dial (the connect timeout for each candidate) may take longer
    // than a drain's settle time, and a connection neither held nor open would let the
    // scaler take the pool down under it.
    let (ready, released) = Box::pin(hold::wait(
        route.upstream.candidates(&activity, &caller),
        client,
        || activity.open(),
    ))
    .await;
    gateway.metrics.held(&released);
    let (candidates, open) = match ready {
        // Ordered once the pool is awake, so a held caller reaches its own replica too.
        Ok((candidates, open)) => {
            let ordered = route
                .balance
                .order(candidates, identity.map(ClientIdentity::as_str));
            (ordered, open)
        }
        Err(e) => {
            tracing::info!(%pool, %peer, error = %e, "no backend for connection");
            refuse(e.reason());
            return None;
        }
    };
    let Connected { tcp, addr, load } =
        match connect::dial(&candidates, route.connect_timeout).await {
            Ok(connected) => connected,
            Err(e) => {
                tracing::warn!(%pool, %peer, error = %e, "backend unreachable");
                refuse(e.reason());
                return None;
            }
        };
    tracing::debug!(%pool, %peer, identity = identity.map(ClientIdentity::as_str), backend = %addr, "relaying");
    let tally = gateway.activity.tally(activity.clone());
    Some(Routed {
        backend: Backend { tcp, addr, tally },
        replay: released.replay,
        guards: Guards {
            opened: Instant::now(),
            _permit: permit,
            load,
            _open: open,
        },
    })
}

/// Sends the client's bytes already read (a passthrough ClientHello, frames kept while the
/// connection was held) to the backend before the relay takes over.
async fn replayed<S: tokio::io::AsyncWrite + Unpin>(
    mut backend: S,
    bytes: &[u8],
    route: &PoolRoute,
) -> Result<S, &'static str> {
    if bytes.is_empty() {
        return Ok(backend);
    }
    if let Err(e) = backend.write_all(bytes).await {
        tracing::debug!(pool = %route.id, error = %e, "backend closed before the client's first bytes were replayed");
        return Err("backend_closed");
    }
    Ok(backend)
}

/// Counts how the relay ended, then releases the connection's slots.
fn finish(
    gateway: &Gateway,
    route: &PoolRoute,
    identity: Option<&ClientIdentity>,
    peer: SocketAddr,
    guards: Guards,
    outcome: Result<Outcome, &'static str>,
) {
    let pool = &route.id;
    judge_backend(&guards.load, &outcome);
    match outcome {
        Ok(outcome) if matches!(outcome.end, relay::End::Expired) => {
            let identity = identity.map(ClientIdentity::as_str);
            tracing::info!(%pool, %peer, identity, ?outcome, "connection closed: its client certificate expired");
            gateway.metrics.expired(pool.as_str());
        }
        Ok(outcome) => tracing::debug!(%pool, %peer, ?outcome, "connection closed"),
        Err(reason) => gateway.metrics.rejected(Some(pool.as_str()), reason),
    }
    gateway.metrics.connection_closed(guards.opened.elapsed());
}

/// What a connection's end says about its backend, for upstreams that stop offering a replica
/// that keeps dropping connections: reset or failed by it, or closed with nothing answered to
/// a client that spoke, is a failure; anything answered is service. A client that left
/// without a word says nothing.
fn judge_backend(load: &BackendLoad, outcome: &Result<Outcome, &'static str>) {
    let Ok(outcome) = outcome else {
        // The replay or the backend's TLS failed: both the backend's side.
        return load.failed();
    };
    match outcome.end {
        relay::End::Reset {
            dir: Direction::Outbound,
        }
        | relay::End::Error(relay::RelayError::Backend(_)) => load.failed(),
        _ if outcome.outbound > 0 => load.served(),
        relay::End::Finished if outcome.inbound > 0 => load.failed(),
        _ => {}
    }
}

fn settings(route: &PoolRoute) -> relay::Settings {
    relay::Settings {
        idle_timeout: route.idle_timeout,
        ends_at: None,
    }
}

/// The instant `expires` (wall clock) comes, on the relay's monotonic clock: converted once,
/// so a wall-clock step after the handshake neither cuts nor spares the connection. Only the
/// leaf's notAfter counts: bkpool issues no certificate that outlives its CA, and a CA's end,
/// like its rotation, leaves open connections alone (the README's security section).
fn ends_at(expires: SystemTime) -> Option<tokio::time::Instant> {
    let left = expires
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::Instant::now().checked_add(left)
}
