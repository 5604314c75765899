//! Cache-affine backend choice: consistent hashing with bounded loads (Mirrokni, Thorup and
//! Zadimoghaddam, "Consistent Hashing with Bounded Loads", 2016).
//!
//! BuildKit's cache lives with a replica (a StatefulSet ordinal's volume, a local replica
//! slot's state directory), so a caller that builds the same repository again should reach
//! the replica that built it last. Each caller's identity is hashed onto a ring of replicas;
//! the connection goes to the first replica clockwise whose load stays within `c` times the
//! average, counting the new connection. Hence:
//! - the same identity reaches the same replica while that replica is not overloaded;
//! - adding or removing a replica moves only the identities it gains or loses on the ring;
//! - no replica carries more than `⌈c × (connections + 1) / replicas⌉`.
//!
//! Replicas are named by a stable key (slot or ordinal), not an address: a pod's IP changes
//! across sleeps, its ordinal and volume do not. Hashes are fixed functions of their input,
//! so every gateway replica of one version picks the same backend for the same caller.

use crate::route::Candidate;

/// The load bound when a pool names none: a replica takes up to twice the average before its
/// callers spill to the next replica on the ring. Looser than the paper's 1 + ε, because a
/// cache miss costs a build minutes while one more build on a replica costs it a share of
/// CPU: on the cache benchmark (docs/performance.md), 1.25 gave 1.32 times least-loaded's
/// cache-hit ratio and 2.0 gave 1.48.
pub const DEFAULT_LOAD_BOUND: f64 = 2.0;

/// How a pool spreads its connections over its replicas.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Balance {
    /// Each connection to the replica carrying the fewest.
    LeastLoaded,
    /// Each caller to its replica on the ring while that replica carries at most
    /// `load_bound` × the average (at least 1).
    Affine { load_bound: f64 },
}

impl Balance {
    /// Orders `candidates` (least loaded first) for one connection from `caller`. Without a
    /// caller identity (passthrough) or with fewer than two replicas, the order is unchanged.
    ///
    /// The ring is rebuilt per call: a handful of replicas costs a few hundred hashes, far
    /// below the TLS handshake that precedes it, and needs no cache to invalidate when
    /// replicas come and go.
    pub fn order(&self, candidates: Vec<Candidate>, caller: Option<&str>) -> Vec<Candidate> {
        let (Self::Affine { load_bound }, Some(caller)) = (*self, caller) else {
            return candidates;
        };
        if candidates.len() < 2 {
            return candidates;
        }
        let ring = Ring::new(&candidates.iter().map(|c| &*c.replica).collect::<Vec<_>>());
        let loads: Vec<usize> = candidates.iter().map(Candidate::load).collect();
        let mut slots: Vec<Option<Candidate>> = candidates.into_iter().map(Some).collect();
        ring.order(caller, &loads, load_bound)
            .into_iter()
            .filter_map(|i| slots[i].take())
            .collect()
    }
}

/// Points per replica on the ring: enough that keys spread evenly over a handful of replicas.
const POINTS_PER_REPLICA: u64 = 64;

/// The ring of one pool's replicas, rebuilt when the set of replicas changes.
#[derive(Debug, Clone, Default)]
pub struct Ring {
    /// (point, index into the replicas given to [`Ring::new`]), sorted by point.
    points: Vec<(u64, usize)>,
    replicas: usize,
}

impl Ring {
    /// A ring over replicas named by stable keys (slot names, StatefulSet ordinals).
    pub fn new<K: AsRef<str>>(replicas: &[K]) -> Self {
        let mut points: Vec<(u64, usize)> = replicas
            .iter()
            .enumerate()
            .flat_map(|(index, key)| {
                let base = hash(key.as_ref().as_bytes());
                (0..POINTS_PER_REPLICA).map(move |p| (mix(base ^ mix(p + 1)), index))
            })
            .collect();
        points.sort_unstable();
        Self {
            points,
            replicas: replicas.len(),
        }
    }

    pub fn len(&self) -> usize {
        self.replicas
    }

    pub fn is_empty(&self) -> bool {
        self.replicas == 0
    }

    /// Replica indexes in the order to try them for a caller `key`: first the one consistent
    /// hashing with bounded loads picks (`loads[i]` is replica `i`'s open connections, `c` the
    /// load bound, at least 1), then the others in ring order, so a failed dial falls back
    /// to the replica the caller would move to anyway.
    pub fn order(&self, key: &str, loads: &[usize], c: f64) -> Vec<usize> {
        debug_assert_eq!(loads.len(), self.replicas);
        let mut order = self.walk(hash(key.as_bytes()));
        let bound = capacity(loads.iter().sum(), self.replicas, c);
        if let Some(first) = order.iter().position(|&i| loads[i] < bound) {
            order[..=first].rotate_right(1);
        }
        order
    }

    /// Each replica once, clockwise from `at`.
    fn walk(&self, at: u64) -> Vec<usize> {
        let start = self.points.partition_point(|&(point, _)| point < at);
        let mut seen = vec![false; self.replicas];
        let mut order = Vec::with_capacity(self.replicas);
        let clockwise = self.points[start..].iter().chain(&self.points[..start]);
        for &(_, index) in clockwise {
            if !std::mem::replace(&mut seen[index], true) {
                order.push(index);
                if order.len() == self.replicas {
                    break;
                }
            }
        }
        order
    }
}

/// The most connections one replica may carry once one more arrives:
/// `⌈c × (total + 1) / replicas⌉`, never less than 1.
pub fn capacity(total: usize, replicas: usize, c: f64) -> usize {
    if replicas == 0 {
        return 0;
    }
    let average = (total + 1) as f64 / replicas as f64;
    ((c.max(1.0) * average).ceil() as usize).max(1)
}

/// FNV-1a, finished with [`mix`]: fixed, so every gateway computes the same ring.
fn hash(bytes: &[u8]) -> u64 {
    let fnv = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    mix(fnv)
}

/// splitmix64's finaliser: spreads nearby inputs over the whole ring.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("r{i}")).collect()
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("ci/repo-{i}")).collect()
    }

    /// Where each key goes with no load: plain consistent hashing.
    fn owners(ring: &Ring, keys: &[String]) -> Vec<usize> {
        let idle = vec![0; ring.len()];
        keys.iter().map(|k| ring.order(k, &idle, 1.25)[0]).collect()
    }

    #[test]
    fn every_replica_appears_once_and_the_choice_is_stable() {
        let ring = Ring::new(&names(5));
        let loads = [0; 5];
        for key in keys(200) {
            let mut order = ring.order(&key, &loads, 1.25);
            assert_eq!(order, ring.order(&key, &loads, 1.25));
            order.sort();
            assert_eq!(order, vec![0, 1, 2, 3, 4]);
        }
        assert_eq!(
            Ring::new(&names(5)).points,
            ring.points,
            "same input, same ring"
        );
    }

    #[test]
    fn keys_spread_over_every_replica() {
        let ring = Ring::new(&names(3));
        let mut count = [0; 3];
        for owner in owners(&ring, &keys(3000)) {
            count[owner] += 1;
        }
        for c in count {
            assert!((700..1300).contains(&c), "{count:?}");
        }
    }

    #[test]
    fn adding_a_replica_moves_only_the_keys_it_takes() {
        let keys = keys(2000);
        let before = owners(&Ring::new(&names(3)), &keys);
        let after = owners(&Ring::new(&names(4)), &keys);
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                assert_eq!(*a, 3, "a key moved between two old replicas");
                moved += 1;
            }
        }
        assert!(
            (300..700).contains(&moved),
            "{moved} of 2000 moved to the new replica"
        );
    }

    #[test]
    fn removing_a_replica_moves_only_its_keys() {
        let keys = keys(2000);
        let all = names(4);
        let before = owners(&Ring::new(&all), &keys);
        // Without r1: the remaining replicas keep their names, in a new order.
        let rest = vec![all[0].clone(), all[2].clone(), all[3].clone()];
        let after = owners(&Ring::new(&rest), &keys);
        for (b, a) in before.iter().zip(&after) {
            if *b != 1 {
                assert_eq!(&all[*b], &rest[*a], "a key of a surviving replica moved");
            }
        }
    }

    #[test]
    fn no_replica_exceeds_the_bound_and_keys_stay_home_when_it_allows() {
        let ring = Ring::new(&names(3));
        let c = 1.25;
        let mut loads = vec![0; 3];
        // Every connection from one caller: it fills its replica up to the bound, then spills.
        for n in 0..30 {
            let pick = ring.order("ci/hot-repo", &loads, c)[0];
            assert!(loads[pick] < capacity(n, 3, c));
            loads[pick] += 1;
            assert!(*loads.iter().max().unwrap() <= capacity(n, 3, c));
        }
        let home = owners(&ring, &["ci/hot-repo".to_string()])[0];
        assert_eq!(
            loads[home],
            capacity(29, 3, c),
            "home replica filled to the bound"
        );
        // A quiet pool: each caller goes home.
        let idle = vec![0; 3];
        for key in keys(50) {
            assert_eq!(
                ring.order(&key, &idle, c)[0],
                owners(&ring, std::slice::from_ref(&key))[0]
            );
        }
    }

    #[test]
    fn capacity_counts_the_new_connection_and_is_at_least_one() {
        assert_eq!(capacity(0, 3, 1.25), 1);
        assert_eq!(capacity(11, 3, 1.25), 5);
        assert_eq!(capacity(11, 3, 0.5), 4, "c below 1 is taken as 1");
        assert_eq!(capacity(5, 0, 1.25), 0);
    }

    #[test]
    fn an_empty_ring_orders_nothing() {
        let ring = Ring::new::<String>(&[]);
        assert!(ring.is_empty());
        assert!(ring.order("x", &[], 1.25).is_empty());
    }

    #[test]
    fn balance_orders_candidates_by_caller_and_by_load() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicUsize;

        use crate::names::BackendAddr;

        let loads: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
        let candidates = || -> Vec<Candidate> {
            (0..3u16)
                .map(|i| {
                    let addr = BackendAddr(([127, 0, 0, 1], 2000 + i).into());
                    Candidate::new(addr, format!("r{i}").into(), loads[i as usize].clone())
                })
                .collect()
        };
        let replicas = |list: Vec<Candidate>| -> Vec<String> {
            list.iter().map(|c| c.replica.to_string()).collect()
        };
        let affine = Balance::Affine { load_bound: 1.25 };
        let home = replicas(affine.order(candidates(), Some("ci/repo")));
        assert_eq!(home.len(), 3, "every candidate is kept");
        assert_eq!(home, replicas(affine.order(candidates(), Some("ci/repo"))));
        // The list's order (least loaded first) does not change where a caller goes.
        let mut reversed = candidates();
        reversed.reverse();
        assert_eq!(home, replicas(affine.order(reversed, Some("ci/repo"))));
        // Home carries more than its share: the caller spills to the next on the ring.
        let index = |name: &str| name[1..].parse::<usize>().unwrap();
        loads[index(&home[0])].store(4, std::sync::atomic::Ordering::Relaxed);
        let spilled = replicas(affine.order(candidates(), Some("ci/repo")));
        assert_eq!(spilled[0], home[1]);
        // Without an identity, or least loaded, the given order stands.
        let given = replicas(candidates());
        assert_eq!(given, replicas(affine.order(candidates(), None)));
        let least = Balance::LeastLoaded;
        assert_eq!(given, replicas(least.order(candidates(), Some("ci/repo"))));
    }
}
