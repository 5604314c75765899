//! Static bearer tokens for local mode: a TOML file mapping each token to an identity and the
//! pools it may use. Tokens are compared in constant time, all of them on every lookup, so
//! neither timing nor position leaks which one nearly matched.
//!
//! ```toml
//! [[token]]
//! token = "long-random-secret"
//! identity = "ci-bot"
//! pools = ["local/default", "ci/*"]   # exact `ns/name`, or `ns/*` for a whole namespace
//! ```

use std::path::Path;

use proxy::names::{ClientIdentity, PoolId};
use serde::Deserialize;

/// Shortest static token accepted: anything shorter is guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// The loaded token file.
#[derive(Clone, Default)]
pub struct StaticTokens {
    entries: Vec<Entry>,
}

#[derive(Clone)]
struct Entry {
    token: Vec<u8>,
    identity: ClientIdentity,
    pools: Vec<String>,
}

/// What a static token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticGrant {
    pub identity: ClientIdentity,
    pools: Vec<String>,
}

/// Why a token file was refused.
#[derive(Debug, thiserror::Error)]
pub enum StaticTokensError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Invalid { path: String, problem: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    token: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    token: String,
    identity: String,
    pools: Vec<String>,
}

impl StaticTokens {
    pub fn load(path: &Path) -> Result<Self, StaticTokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| StaticTokensError::Read {
            path: path.display().to_string(),
            source,
        })?;
        crate::pki::files::warn_if_loose(path);
        Self::parse(&text).map_err(|problem| StaticTokensError::Invalid {
            path: path.display().to_string(),
            problem,
        })
    }

    /// Parses the file's text, listing every fault.
    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: RawFile = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        let mut faults = Vec::new();
        let mut entries = Vec::new();
        for (i, e) in raw.token.into_iter().enumerate() {
            if e.token.len() < MIN_TOKEN_LEN {
                faults.push(format!(
                    "token[{i}]: shorter than {MIN_TOKEN_LEN} characters"
                ));
            }
            let identity = ClientIdentity::new(&e.identity)
                .map_err(|err| faults.push(format!("token[{i}].identity: {err}")));
            for p in &e.pools {
                if !valid_pool_pattern(p) {
                    faults.push(format!("token[{i}].pools: {p:?} is not ns/name or ns/*"));
                }
            }
            if let Ok(identity) = identity {
                entries.push(Entry {
                    token: e.token.into_bytes(),
                    identity,
                    pools: e.pools,
                });
            }
        }
        if !faults.is_empty() {
            return Err(faults.join("; "));
        }
        Ok(Self { entries })
    }

    /// The grant of `token`, if it is one of ours.
    pub fn lookup(&self, token: &str) -> Option<StaticGrant> {
        let mut found = None;
        for entry in &self.entries {
            if constant_time_eq(&entry.token, token.as_bytes()) && found.is_none() {
                found = Some(StaticGrant {
                    identity: entry.identity.clone(),
                    pools: entry.pools.clone(),
                });
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl std::fmt::Debug for StaticTokens {
    /// Never prints the tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StaticTokens({} entries)", self.entries.len())
    }
}

impl StaticGrant {
    pub fn allows(&self, pool: &PoolId) -> bool {
        self.pools
            .iter()
            .any(|p| p == pool.as_str() || p.strip_suffix("/*") == Some(pool.namespace()))
    }
}

fn valid_pool_pattern(p: &str) -> bool {
    match p.strip_suffix("/*") {
        Some(ns) => proxy::names::check_label("namespace", ns).is_ok(),
        None => p.contains('/') && p.parse::<PoolId>().is_ok(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        [[token]]
        token = "0123456789abcdef-ci"
        identity = "ci-bot"
        pools = ["local/a", "team/*"]
    "#;

    #[test]
    fn a_token_grants_its_pools_and_namespaces_only() {
        let tokens = StaticTokens::parse(FILE).unwrap();
        let grant = tokens.lookup("0123456789abcdef-ci").unwrap();
        assert_eq!(grant.identity.as_str(), "ci-bot");
        assert!(grant.allows(&"local/a".parse().unwrap()));
        assert!(grant.allows(&"team/x".parse().unwrap()));
        assert!(!grant.allows(&"local/b".parse().unwrap()));
        assert!(!grant.allows(&"team2/x".parse().unwrap()));
        assert!(tokens.lookup("0123456789abcdef-c").is_none());
        assert!(tokens.lookup("0123456789abcdef-ci2").is_none());
        assert!(tokens.lookup("").is_none());
    }

    #[test]
    fn every_fault_is_listed() {
        let bad = r#"
            [[token]]
            token = "short"
            identity = ""
            pools = ["nope", "Bad/*"]
        "#;
        let err = StaticTokens::parse(bad).unwrap_err();
        for part in [
            "token[0]: shorter",
            "token[0].identity",
            "\"nope\"",
            "\"Bad/*\"",
        ] {
            assert!(err.contains(part), "{part} missing from {err}");
        }
        assert!(format!("{:?}", StaticTokens::parse(FILE).unwrap()).contains("1 entries"));
    }
}
