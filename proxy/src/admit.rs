//! Admission: connection slots (global, per pool, per identity), the handshake caps (global
//! and per source address), the limits on connections held for a wake (per source address,
//! and per pool for connections the gateway cannot authenticate) and the memory budget of
//! buffered ClientHellos, all as RAII permits. A permit is moved into the connection task and
//! released when it drops; nothing is ever decremented by hand.

use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use crate::names::{ClientIdentity, PoolId};

/// Why a connection was refused at admission. Each is a fixed metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the gateway's connection limit is reached")]
    GlobalLimit,
    #[error("too many TLS handshakes in flight")]
    HandshakeLimit,
    #[error("too many TLS handshakes in flight from this source address")]
    HandshakeSourceLimit,
    #[error("the pool's connection limit is reached")]
    PoolLimit,
    #[error("this identity's connection limit for the pool is reached")]
    IdentityLimit,
    #[error("too many connections from this source address are held for a wake")]
    HoldSourceLimit,
    #[error("too many unauthenticated connections are held for this pool's wake")]
    UnauthenticatedHoldLimit,
    #[error("the memory for buffered ClientHellos is used up")]
    ClientHelloMemory,
}

impl Refused {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::GlobalLimit => "global_limit",
            Self::HandshakeLimit => "handshake_limit",
            Self::HandshakeSourceLimit => "handshake_source_limit",
            Self::PoolLimit => "pool_limit",
            Self::IdentityLimit => "identity_limit",
            Self::HoldSourceLimit => "hold_source_limit",
            Self::UnauthenticatedHoldLimit => "hold_unauthenticated_limit",
            Self::ClientHelloMemory => "client_hello_memory",
        }
    }
}

/// A counter with a ceiling, shared by the permits taken from it.
#[derive(Debug)]
pub struct Slots {
    used: AtomicUsize,
    max: AtomicUsize,
}

/// One slot of a [`Slots`]; released on drop.
#[derive(Debug)]
pub struct Permit(Arc<Slots>);

impl Slots {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        })
    }

    /// Takes a slot if one is free.
    pub fn try_take(self: &Arc<Self>) -> Option<Permit> {
        let max = self.max.load(Ordering::Relaxed);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                (used < max).then_some(used + 1)
            })
            .ok()
            .map(|_| Permit(self.clone()))
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// Changes the ceiling; permits already out stay valid.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Slots counted per key (an identity, a source address), each key's entry dropped with its
/// last permit so the map does not grow with every key ever seen.
#[derive(Debug)]
pub struct KeyedSlots<K: Eq + Hash>(Arc<DashMap<K, Arc<Slots>>>);

/// One slot of a [`KeyedSlots`]; released, and the key forgotten if it was the last, on drop.
#[derive(Debug)]
pub struct KeyedPermit<K: Eq + Hash> {
    permit: Option<Permit>,
    key: K,
    map: Arc<DashMap<K, Arc<Slots>>>,
}

impl<K: Eq + Hash + Clone> KeyedSlots<K> {
    pub fn new() -> Self {
        Self(Arc::new(DashMap::new()))
    }

    /// Takes one of `key`'s `max` slots, if one is free.
    pub fn try_take(&self, key: &K, max: usize) -> Option<KeyedPermit<K>> {
        // The slot is taken while the map entry is locked: the last permit's drop removes the
        // entry under the same lock, and only when no slot is taken, so it never removes an
        // entry between a lookup and a take (which would let the taker count on an orphan
        // while a newcomer starts a fresh count).
        let entry = self.0.entry(key.clone()).or_insert_with(|| Slots::new(max));
        entry.set_max(max);
        let permit = entry.try_take()?;
        drop(entry);
        Some(KeyedPermit {
            permit: Some(permit),
            key: key.clone(),
            map: self.0.clone(),
        })
    }

    /// How many keys hold a slot now.
    pub fn keys(&self) -> usize {
        self.0.len()
    }
}

impl<K: Eq + Hash + Clone> Default for KeyedSlots<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Eq + Hash> Drop for KeyedPermit<K> {
    fn drop(&mut self) {
        drop(self.permit.take());
        // Under the entry's lock, like every take: a newcomer either took its slot before
        // (then the count is not zero and the entry stays) or finds no entry and starts one.
        self.map.remove_if(&self.key, |_, slots| slots.used() == 0);
    }
}

/// A budget of bytes, taken and given back in amounts.
#[derive(Debug)]
pub struct Bytes {
    used: AtomicUsize,
    max: AtomicUsize,
}

/// Bytes of a [`Bytes`] budget; given back on drop.
#[derive(Debug)]
pub struct BytesPermit {
    budget: Arc<Bytes>,
    bytes: usize,
}

impl Bytes {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        })
    }

    /// Takes `bytes` if they fit.
    pub fn try_take(self: &Arc<Self>, bytes: usize) -> Option<BytesPermit> {
        let max = self.max.load(Ordering::Relaxed);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                (used + bytes <= max).then_some(used + bytes)
            })
            .ok()
            .map(|_| BytesPermit {
                budget: self.clone(),
                bytes,
            })
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }
}

impl Drop for BytesPermit {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Limits on connections held while their pool wakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldLimits {
    /// Held connections from one source address, all pools together.
    pub per_source: usize,
    /// Held connections of one pool that the gateway could not authenticate (passthrough).
    pub unauthenticated_per_pool: usize,
}

/// A held connection's place under the [`HoldLimits`].
#[derive(Debug)]
pub struct HoldPermit {
    _source: KeyedPermit<IpAddr>,
    _unauthenticated: Option<KeyedPermit<PoolId>>,
}

/// The gateway's admission state.
#[derive(Debug)]
pub struct Admission {
    connections: Arc<Slots>,
    handshakes: Arc<Slots>,
    /// Handshakes in flight per source address, so one client cannot take every slot.
    handshake_sources: KeyedSlots<IpAddr>,
    max_handshakes_per_source: AtomicUsize,
    pools: DashMap<PoolId, Arc<Slots>>,
    identities: KeyedSlots<(PoolId, ClientIdentity)>,
    held_sources: KeyedSlots<IpAddr>,
    held_unauthenticated: KeyedSlots<PoolId>,
    hold_limits: std::sync::Mutex<HoldLimits>,
    /// ClientHellos kept to be replayed to a passthrough backend.
    client_hellos: Arc<Bytes>,
}

/// What an admitted, authenticated connection holds until it closes.
#[derive(Debug)]
pub struct PoolPermit {
    _pool: Option<Permit>,
    _identity: Option<KeyedPermit<(PoolId, ClientIdentity)>>,
}

/// A handshake's place under the global and the per-source caps.
#[derive(Debug)]
pub struct HandshakePermit {
    _global: Permit,
    _source: KeyedPermit<IpAddr>,
}

impl Admission {
    /// Admission with these global caps; handshakes per source are not capped below
    /// `max_handshakes` until [`Admission::set_max_handshakes_per_source`] says so.
    pub fn new(max_connections: usize, max_handshakes: usize) -> Arc<Self> {
        Arc::new(Self {
            connections: Slots::new(max_connections),
            handshakes: Slots::new(max_handshakes),
            handshake_sources: KeyedSlots::new(),
            max_handshakes_per_source: AtomicUsize::new(max_handshakes),
            pools: DashMap::new(),
            identities: KeyedSlots::new(),
            held_sources: KeyedSlots::new(),
            held_unauthenticated: KeyedSlots::new(),
            hold_limits: std::sync::Mutex::new(HoldLimits {
                per_source: usize::MAX,
                unauthenticated_per_pool: usize::MAX,
            }),
            client_hellos: Bytes::new(usize::MAX),
        })
    }

    pub fn set_hold_limits(&self, limits: HoldLimits) {
        *self.hold_limits.lock().unwrap_or_else(|e| e.into_inner()) = limits;
    }

    pub fn set_max_client_hello_bytes(&self, max: usize) {
        self.client_hellos.set_max(max);
    }

    /// A place for a connection from `source` held while `pool` wakes. A connection the
    /// gateway could not authenticate also takes one of the pool's small budget for those:
    /// it may be anyone, and must not fill the hold queue that authenticated callers need.
    pub fn hold(
        &self,
        pool: &PoolId,
        source: IpAddr,
        authenticated: bool,
    ) -> Result<HoldPermit, Refused> {
        let limits = *self.hold_limits.lock().unwrap_or_else(|e| e.into_inner());
        let unauthenticated = match authenticated {
            true => None,
            false => Some(
                self.held_unauthenticated
                    .try_take(pool, limits.unauthenticated_per_pool)
                    .ok_or(Refused::UnauthenticatedHoldLimit)?,
            ),
        };
        let source = self
            .held_sources
            .try_take(&source, limits.per_source)
            .ok_or(Refused::HoldSourceLimit)?;
        Ok(HoldPermit {
            _source: source,
            _unauthenticated: unauthenticated,
        })
    }

    /// Room for a ClientHello of `bytes` kept until it is replayed to the backend.
    pub fn buffer_client_hello(&self, bytes: usize) -> Result<BytesPermit, Refused> {
        self.client_hellos
            .try_take(bytes)
            .ok_or(Refused::ClientHelloMemory)
    }

    /// Bytes of ClientHellos buffered now.
    pub fn client_hello_bytes(&self) -> usize {
        self.client_hellos.used()
    }

    pub fn set_max_handshakes_per_source(&self, max: usize) {
        self.max_handshakes_per_source.store(max, Ordering::Relaxed);
    }

    pub fn connection(&self) -> Result<Permit, Refused> {
        self.connections.try_take().ok_or(Refused::GlobalLimit)
    }

    /// A handshake slot for a connection from `source`: the source's own cap first, so a
    /// source at its cap never holds a global slot, then the global one.
    pub fn handshake(&self, source: IpAddr) -> Result<HandshakePermit, Refused> {
        let per_source = self.max_handshakes_per_source.load(Ordering::Relaxed);
        let source = self
            .handshake_sources
            .try_take(&source, per_source)
            .ok_or(Refused::HandshakeSourceLimit)?;
        let global = self.handshakes.try_take().ok_or(Refused::HandshakeLimit)?;
        Ok(HandshakePermit {
            _global: global,
            _source: source,
        })
    }

    pub fn handshakes_in_flight(&self) -> usize {
        self.handshakes.used()
    }

    pub fn connections(&self) -> &Slots {
        &self.connections
    }

    /// Admits an authenticated connection to `pool` under the pool's and the identity's limits.
    pub fn enter(
        &self,
        pool: &PoolId,
        identity: Option<&ClientIdentity>,
        pool_max: Option<usize>,
        identity_max: Option<usize>,
    ) -> Result<PoolPermit, Refused> {
        let pool_permit = match pool_max {
            Some(max) => {
                let slots = self
                    .pools
                    .entry(pool.clone())
                    .or_insert_with(|| Slots::new(max))
                    .clone();
                slots.set_max(max);
                Some(slots.try_take().ok_or(Refused::PoolLimit)?)
            }
            None => None,
        };
        let identity_permit = match (identity, identity_max) {
            (Some(identity), Some(max)) => {
                let key = (pool.clone(), identity.clone());
                let permit = self.identities.try_take(&key, max);
                Some(permit.ok_or(Refused::IdentityLimit)?)
            }
            _ => None,
        };
        Ok(PoolPermit {
            _pool: pool_permit,
            _identity: identity_permit,
        })
    }

    /// Forgets the pool limits of pools that left the configuration.
    pub fn retain_pools(&self, keep: impl Fn(&PoolId) -> bool) {
        self.pools.retain(|id, _| keep(id));
    }

    pub fn tracked_identities(&self) -> usize {
        self.identities.keys()
    }

    /// Source addresses with a handshake in flight.
    pub fn handshake_sources(&self) -> usize {
        self.handshake_sources.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_refuse_at_the_limit_and_come_back_on_drop() {
        let slots = Slots::new(2);
        let a = slots.try_take().unwrap();
        let _b = slots.try_take().unwrap();
        assert!(slots.try_take().is_none());
        drop(a);
        assert!(slots.try_take().is_some());
    }

    #[test]
    fn pool_and_identity_limits_apply_separately() {
        let admission = Admission::new(100, 10);
        let pool: PoolId = "a".parse().unwrap();
        let alice = ClientIdentity::new("alice").unwrap();
        let bob = ClientIdentity::new("bob").unwrap();
        let p1 = admission
            .enter(&pool, Some(&alice), Some(3), Some(1))
            .unwrap();
        assert_eq!(
            admission
                .enter(&pool, Some(&alice), Some(3), Some(1))
                .unwrap_err(),
            Refused::IdentityLimit
        );
        let p2 = admission
            .enter(&pool, Some(&bob), Some(3), Some(1))
            .unwrap();
        let carol = ClientIdentity::new("carol").unwrap();
        let p3 = admission
            .enter(&pool, Some(&carol), Some(3), Some(1))
            .unwrap();
        let dave = ClientIdentity::new("dave").unwrap();
        assert_eq!(
            admission
                .enter(&pool, Some(&dave), Some(3), Some(1))
                .unwrap_err(),
            Refused::PoolLimit
        );
        drop((p1, p2, p3));
        assert_eq!(
            admission.tracked_identities(),
            0,
            "identities are forgotten when idle"
        );
        assert!(
            admission
                .enter(&pool, Some(&dave), Some(3), Some(1))
                .is_ok()
        );
    }

    #[test]
    fn a_refused_identity_does_not_hold_the_pool_slot() {
        let admission = Admission::new(100, 10);
        let pool: PoolId = "a".parse().unwrap();
        let alice = ClientIdentity::new("alice").unwrap();
        let _held = admission
            .enter(&pool, Some(&alice), Some(2), Some(1))
            .unwrap();
        assert!(
            admission
                .enter(&pool, Some(&alice), Some(2), Some(1))
                .is_err()
        );
        let bob = ClientIdentity::new("bob").unwrap();
        assert!(
            admission.enter(&pool, Some(&bob), Some(2), Some(1)).is_ok(),
            "the refused attempt released its pool slot"
        );
    }

    #[test]
    fn one_source_cannot_take_every_handshake_slot() {
        let admission = Admission::new(100, 4);
        admission.set_max_handshakes_per_source(2);
        let (busy, other): (IpAddr, IpAddr) =
            ("127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap());
        let held: Vec<_> = (0..2).map(|_| admission.handshake(busy).unwrap()).collect();
        assert_eq!(
            admission.handshake(busy).unwrap_err(),
            Refused::HandshakeSourceLimit
        );
        assert_eq!(
            admission.handshakes_in_flight(),
            2,
            "a refusal holds no global slot"
        );
        let _mine = admission.handshake(other).unwrap();
        drop(held);
        assert_eq!(
            admission.handshake_sources(),
            1,
            "sources are forgotten when idle"
        );
        assert!(admission.handshake(busy).is_ok());
    }

    #[test]
    fn held_connections_are_capped_per_source_and_unauthenticated_ones_per_pool() {
        let admission = Admission::new(100, 10);
        admission.set_hold_limits(HoldLimits {
            per_source: 3,
            unauthenticated_per_pool: 2,
        });
        let (a, b): (PoolId, PoolId) = ("a".parse().unwrap(), "b".parse().unwrap());
        let (one, two): (IpAddr, IpAddr) =
            ("127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
        let anon: Vec<_> = (0..2)
            .map(|_| admission.hold(&a, one, false).unwrap())
            .collect();
        assert_eq!(
            admission.hold(&a, two, false).unwrap_err(),
            Refused::UnauthenticatedHoldLimit,
            "the pool's budget is for every source together"
        );
        let _other_pool = admission.hold(&b, two, false).unwrap();
        let _authenticated = admission.hold(&a, one, true).unwrap();
        assert_eq!(
            admission.hold(&a, one, true).unwrap_err(),
            Refused::HoldSourceLimit,
            "three held from one source already"
        );
        let _from_elsewhere = admission.hold(&a, two, true).unwrap();
        drop(anon);
        assert!(admission.hold(&a, one, false).is_ok());
    }

    #[test]
    fn client_hellos_take_their_bytes_from_one_budget() {
        let admission = Admission::new(100, 10);
        admission.set_max_client_hello_bytes(4096);
        let first = admission.buffer_client_hello(3000).unwrap();
        assert_eq!(
            admission.buffer_client_hello(2000).unwrap_err(),
            Refused::ClientHelloMemory
        );
        let _second = admission.buffer_client_hello(1000).unwrap();
        assert_eq!(admission.client_hello_bytes(), 4000);
        drop(first);
        assert!(admission.buffer_client_hello(2000).is_ok());
    }

    #[test]
    fn the_last_permit_of_an_identity_never_races_a_new_one_past_the_limit() {
        let admission = Admission::new(1000, 10);
        let pool: PoolId = "a".parse().unwrap();
        let alice = ClientIdentity::new("alice").unwrap();
        let live = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..64)
            .map(|_| {
                let (admission, pool, alice) = (admission.clone(), pool.clone(), alice.clone());
                let (live, most) = (live.clone(), most.clone());
                std::thread::spawn(move || {
                    for _ in 0..2_000 {
                        let Ok(permit) = admission.enter(&pool, Some(&alice), None, Some(1)) else {
                            continue;
                        };
                        let now = live.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        live.fetch_sub(1, Ordering::SeqCst);
                        drop(permit);
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(most.load(Ordering::SeqCst), 1, "live permits with max = 1");
        assert_eq!(admission.tracked_identities(), 0);
    }
}
