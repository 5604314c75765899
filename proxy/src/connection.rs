//! One connection's life, top to bottom:
//! admit → handshake → authorize → route → connect → relay.
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

use crate::admit::Permit;
use crate::config::Mode;
use crate::connect::{self, Connected};
use crate::gateway::Gateway;
use crate::handshake::{self, Accepted};
use crate::names::ClientIdentity;
use crate::relay::{self, Direction, Outcome, Tally};
use crate::route::{Caller, PoolRoute};

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
            stream,
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
            let pool = route.clone();
            serve(
                gateway,
                &route,
                Some(&who.identity),
                peer,
                |backend| async move {
                    // A connection never outlives the certificate that opened it: its
                    // lifetime is the only revocation there is.
                    let settings = relay::Settings {
                        ends_at: ends_at(expires),
                        ..settings(&pool)
                    };
                    let Some(tls) = &pool.backend_tls else {
                        return Ok(Box::pin(relay::copy(
                            stream,
                            backend.tcp,
                            &settings,
                            &backend.tally,
                        ))
                        .await);
                    };
                    let secure =
                        connect::secure(backend.tcp, backend.addr, tls, pool.connect_timeout);
                    match Box::pin(secure).await {
                        Ok(secured) => {
                            let relay =
                                relay::copy(stream, Box::new(secured), &settings, &backend.tally);
                            Ok(Box::pin(relay).await)
                        }
                        Err(e) => {
                            tracing::warn!(pool = %pool.id, error = %e, "backend TLS failed");
                            Err(e.reason())
                        }
                    }
                },
            )
            .await
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
            let pool = route.clone();
            serve(gateway, &route, None, peer, |mut backend| async move {
                if let Err(e) = backend.tcp.write_all(&hello).await {
                    tracing::debug!(pool = %pool.id, error = %e, "backend closed before the ClientHello was replayed");
                    return Err("backend_closed");
                }
                // The replayed ClientHello is the first of the client's bytes.
                backend.tally.moved(Direction::Inbound, relay::Path::Copy, hello.len() as u64);
                drop((hello, buffered));
                Ok(Box::pin(relay::splice(tcp, backend.tcp, &settings(&pool), &backend.tally)).await)
            })
            .await
        }
    }
}

/// A connected backend, handed to the relay closure with the tally of its pool.
pub struct Backend<'a> {
    pub tcp: TcpStream,
    pub addr: crate::names::BackendAddr,
    pub tally: crate::activity::ConnectionTally<'a>,
}

/// The authenticated part: pool limits, backend choice (possibly waiting for a wake),
/// connect, then the relay given by `relay_with` (which returns a refusal reason when the
/// backend leg cannot be set up).
async fn serve<'g, F, Fut>(
    gateway: &'g Arc<Gateway>,
    route: &Arc<PoolRoute>,
    identity: Option<&ClientIdentity>,
    peer: SocketAddr,
    relay_with: F,
) where
    F: FnOnce(Backend<'g>) -> Fut,
    Fut: Future<Output = Result<Outcome, &'static str>>,
{
    let pool = &route.id;
    let activity = gateway.activity.pool(pool);
    let refuse = |reason: &'static str| {
        activity.rejected();
        gateway.metrics.rejected(Some(pool.as_str()), reason);
    };
    let _permit = match gateway.admission.enter(
        pool,
        identity,
        route.max_connections,
        route.max_connections_per_identity,
    ) {
        Ok(permit) => permit,
        Err(refused) => return refuse(refused.reason()),
    };
    let caller = Caller::new(
        peer.ip(),
        identity.is_some(),
        pool.clone(),
        gateway.admission.clone(),
    );
    let candidates = match route.upstream.candidates(&activity, &caller).await {
        Ok(candidates) => candidates,
        Err(e) => {
            tracing::info!(%pool, %peer, error = %e, "no backend for connection");
            return refuse(e.reason());
        }
    };
    // Open from the moment it is routed, not once its backend answers: a dial may take the
    // connect timeout for each candidate, longer than a drain's settle time, and a connection
    // neither held nor open would let the scaler take the pool down under it.
    let _open = activity.open();
    let Connected {
        tcp,
        addr,
        load: _load,
    } = match connect::dial(&candidates, route.connect_timeout).await {
        Ok(connected) => connected,
        Err(e) => {
            tracing::warn!(%pool, %peer, error = %e, "backend unreachable");
            return refuse(e.reason());
        }
    };
    let opened = Instant::now();
    tracing::debug!(%pool, %peer, identity = identity.map(ClientIdentity::as_str), backend = %addr, "relaying");
    let tally = gateway.activity.tally(activity.clone());
    match relay_with(Backend { tcp, addr, tally }).await {
        Ok(outcome) if matches!(outcome.end, relay::End::Expired) => {
            let identity = identity.map(ClientIdentity::as_str);
            tracing::info!(%pool, %peer, identity, ?outcome, "connection closed: its client certificate expired");
            gateway.metrics.expired(pool.as_str());
        }
        Ok(outcome) => tracing::debug!(%pool, %peer, ?outcome, "connection closed"),
        Err(reason) => gateway.metrics.rejected(Some(pool.as_str()), reason),
    }
    gateway.metrics.connection_closed(opened.elapsed());
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
