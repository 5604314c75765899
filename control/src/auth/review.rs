//! A short-lived, bounded memory of the API server's review answers, so repeated requests
//! with one token (a CI job retrying, listing, then asking for a certificate) cost one
//! TokenReview, and one SubjectAccessReview per question, every few seconds at most.
//!
//! Keys are SHA-256 digests (of the token, or of the user and the question): no token is kept
//! in memory. Refusals are remembered too, so a stream of requests with one forged token
//! reaches the API server once; answers the API server could not give (it was unreachable)
//! are never remembered. When full, expired entries go first, then the one expiring soonest,
//! so a flood of new tokens cannot grow memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use aws_lc_rs::digest::{Context, SHA256};
use tokio::time::Instant;

/// A SHA-256 digest naming a cache entry.
pub type Key = [u8; 32];

/// The digest of `parts`, each length-prefixed so that no two part lists collide.
pub fn key(parts: &[&[u8]]) -> Key {
    let mut context = Context::new(&SHA256);
    for part in parts {
        context.update(&(part.len() as u64).to_be_bytes());
        context.update(part);
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(context.finish().as_ref());
    key
}

/// How long answers are kept and how many at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// A TokenReview answer is kept this long (never past the token's own expiry).
    pub token_ttl: Duration,
    /// A SubjectAccessReview answer is kept this long: RBAC changes take effect within it.
    pub access_ttl: Duration,
    /// Entries per cache at most.
    pub capacity: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            token_ttl: Duration::from_secs(10),
            access_ttl: Duration::from_secs(5),
            capacity: 4096,
        }
    }
}

/// One cache of answers of type `V`.
#[derive(Debug)]
pub struct ReviewCache<V> {
    capacity: usize,
    entries: Mutex<HashMap<Key, (Instant, V)>>,
}

impl<V: Clone> ReviewCache<V> {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The answer for `key`, if one is kept and still fresh.
    pub fn get(&self, key: &Key) -> Option<V> {
        let mut entries = self.lock();
        match entries.get(key) {
            Some((expires, value)) if *expires > Instant::now() => Some(value.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// Keeps `value` for `ttl` (nothing is kept for a zero `ttl`).
    pub fn insert(&self, key: Key, value: V, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut entries = self.lock();
        if !entries.contains_key(&key) && entries.len() >= self.capacity {
            entries.retain(|_, (expires, _)| *expires > now);
            if entries.len() >= self.capacity {
                let soonest = entries
                    .iter()
                    .min_by_key(|(_, (expires, _))| *expires)
                    .map(|(k, _)| *k);
                if let Some(soonest) = soonest {
                    entries.remove(&soonest);
                }
            }
        }
        entries.insert(key, (now + ttl, value));
    }

    /// How many answers are kept.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, (Instant, V)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_length_prefixed_digests() {
        assert_ne!(key(&[b"ab", b"c"]), key(&[b"a", b"bc"]));
        assert_eq!(key(&[b"token"]), key(&[b"token"]));
        assert_ne!(key(&[b"token"]), key(&[b"token2"]));
    }

    #[tokio::test(start_paused = true)]
    async fn answers_expire_and_the_cache_stays_bounded() {
        let cache = ReviewCache::new(3);
        cache.insert(key(&[b"a"]), 1, Duration::from_secs(10));
        assert_eq!(cache.get(&key(&[b"a"])), Some(1));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(cache.get(&key(&[b"a"])), None, "expired");
        assert!(cache.is_empty());

        cache.insert(key(&[b"long"]), 0, Duration::from_secs(100));
        for i in 0..1000u32 {
            cache.insert(key(&[&i.to_be_bytes()]), i, Duration::from_secs(10));
        }
        assert_eq!(cache.len(), 3);
        assert_eq!(
            cache.get(&key(&[b"long"])),
            Some(0),
            "the soonest to expire go first"
        );
        cache.insert(key(&[b"never"]), 9, Duration::ZERO);
        assert_eq!(cache.get(&key(&[b"never"])), None);
    }
}
