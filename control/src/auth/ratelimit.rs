//! Per-identity rate limit on certificate requests: a token bucket per identity in a bounded
//! map. When the map is full the identity seen least recently is forgotten (it comes back
//! with a full bucket, which costs at most one burst), so a stream of new identities cannot
//! grow memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Bucket size and refill.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    /// Requests allowed at once.
    pub burst: u32,
    /// One request more is allowed every `per`.
    pub per: Duration,
    /// Identities tracked at most.
    pub max_identities: usize,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            burst: 20,
            per: Duration::from_secs(3),
            max_identities: 10_000,
        }
    }
}

/// The limiter.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `identity`; false when its bucket is empty.
    pub fn try_acquire(&self, identity: &str) -> bool {
        let now = Instant::now();
        let burst = f64::from(self.limit.burst.max(1));
        let rate = 1.0 / self.limit.per.as_secs_f64().max(1e-9);
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if !buckets.contains_key(identity) && buckets.len() >= self.limit.max_identities.max(1) {
            let oldest = buckets
                .iter()
                .min_by_key(|(_, b)| b.updated)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                buckets.remove(&oldest);
            }
        }
        let bucket = buckets.entry(identity.to_owned()).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let refill = now.duration_since(bucket.updated).as_secs_f64() * rate;
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How many identities are tracked.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().expect("rate limiter lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(burst: u32, max_identities: usize) -> RateLimiter {
        RateLimiter::new(RateLimit {
            burst,
            per: Duration::from_secs(10),
            max_identities,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_one_per_interval() {
        let l = limiter(3, 10);
        assert!((0..3).all(|_| l.try_acquire("a")));
        assert!(!l.try_acquire("a"));
        assert!(l.try_acquire("b"), "identities have their own buckets");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(l.try_acquire("a"));
        assert!(!l.try_acquire("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_map_stays_bounded_under_many_identities() {
        let l = limiter(1, 100);
        for i in 0..10_000 {
            assert!(l.try_acquire(&format!("id-{i}")));
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert_eq!(l.tracked(), 100);
        assert!(
            !l.try_acquire("id-9999"),
            "recent identities keep their state"
        );
    }
}
