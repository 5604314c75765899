//! A bounded memo of client certificates whose chain already verified against their pool's
//! CA. CI clients present the same short-lived certificate on every connection of a build;
//! checking its chain again costs an ECDSA verification and two X.509 parses per handshake.
//!
//! Only the chain is memoised, keyed by the exact DER of the end-entity certificate, inside
//! one verifier (a reload builds a new verifier, so a changed CA bundle starts empty). The
//! proof of possession (the handshake's CertificateVerify signature) is checked on every
//! handshake, and a memo only holds while both the certificate and its pool's CAs are valid.

use std::collections::HashMap;
use std::sync::Mutex;

use rustls::pki_types::UnixTime;

use crate::names::PoolId;

/// How many certificates are remembered; past that the memo starts over (simple, and an
/// attacker cannot fill it: only certificates that verified are inserted).
pub const CAPACITY: usize = 4096;

#[derive(Debug, Default)]
pub struct Verified {
    entries: Mutex<HashMap<Box<[u8]>, Entry>>,
}

#[derive(Debug, Clone)]
struct Entry {
    pool: PoolId,
    /// Unix seconds between which the memo holds.
    not_before: u64,
    not_after: u64,
}

impl Verified {
    /// The pool `der` verified for, if it did and the memo still holds at `now`.
    pub fn lookup(&self, der: &[u8], now: UnixTime) -> Option<PoolId> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.get(der)?;
        let now = now.as_secs();
        (entry.not_before <= now && now <= entry.not_after).then(|| entry.pool.clone())
    }

    /// Remembers that `der` verified for `pool`, for the window `[not_before, not_after]`.
    pub fn remember(&self, der: &[u8], pool: PoolId, not_before: u64, not_after: u64) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= CAPACITY {
            entries.clear();
        }
        entries.insert(
            der.into(),
            Entry {
                pool,
                not_before,
                not_after,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memo_holds_only_inside_its_window_and_for_the_same_bytes() {
        let memo = Verified::default();
        let pool: PoolId = "a".parse().unwrap();
        memo.remember(b"cert", pool.clone(), 100, 200);
        assert_eq!(
            memo.lookup(
                b"cert",
                UnixTime::since_unix_epoch(std::time::Duration::from_secs(150))
            ),
            Some(pool)
        );
        assert_eq!(
            memo.lookup(
                b"cert",
                UnixTime::since_unix_epoch(std::time::Duration::from_secs(201))
            ),
            None
        );
        assert_eq!(
            memo.lookup(
                b"cert",
                UnixTime::since_unix_epoch(std::time::Duration::from_secs(99))
            ),
            None
        );
        assert_eq!(
            memo.lookup(
                b"cerT",
                UnixTime::since_unix_epoch(std::time::Duration::from_secs(150))
            ),
            None
        );
    }

    #[test]
    fn the_memo_stays_bounded() {
        let memo = Verified::default();
        let pool: PoolId = "a".parse().unwrap();
        for i in 0..CAPACITY * 3 {
            memo.remember(&i.to_le_bytes(), pool.clone(), 0, u64::MAX);
            assert!(memo.len() <= CAPACITY);
        }
    }
}
