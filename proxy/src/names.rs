//! Newtypes for the names that cross module boundaries: which pool, who is calling, where
//! the bytes go. Each is validated once, where it enters, and trusted afterwards.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

/// The namespace pools get when none is named (local mode, standalone gateway).
pub const DEFAULT_NAMESPACE: &str = "local";

/// A pool's identity: `namespace/name`, both DNS-1123 labels. This is also the `pool` metric
/// label. Cheap to clone (one `Arc`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolId(Arc<str>);

/// Why a pool name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} {value:?} is longer than 63 characters")]
    TooLong { what: &'static str, value: String },
    #[error(
        "{what} {value:?} is not a DNS label (lowercase letters, digits and '-', starting and ending with a letter or digit)"
    )]
    NotLabel { what: &'static str, value: String },
    #[error("identity {value:?} is not printable text of at most 256 bytes")]
    BadIdentity { value: String },
}

/// Checks one DNS-1123 label (what Kubernetes requires of namespace and object names we use).
pub fn check_label(what: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { what });
    }
    if value.len() > 63 {
        return Err(NameError::TooLong {
            what,
            value: value.into(),
        });
    }
    let ok_char = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-';
    let bytes = value.as_bytes();
    let ends_ok = bytes[0] != b'-' && bytes[bytes.len() - 1] != b'-';
    if !ends_ok || !bytes.iter().all(|&c| ok_char(c)) {
        return Err(NameError::NotLabel {
            what,
            value: value.into(),
        });
    }
    Ok(())
}

impl PoolId {
    pub fn new(namespace: &str, name: &str) -> Result<Self, NameError> {
        check_label("namespace", namespace)?;
        check_label("pool name", name)?;
        Ok(Self(format!("{namespace}/{name}").into()))
    }

    pub fn namespace(&self) -> &str {
        self.0.split_once('/').map_or("", |(ns, _)| ns)
    }

    pub fn name(&self) -> &str {
        self.0.split_once('/').map_or(&self.0, |(_, n)| n)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `ns/name`, or a bare `name` in the default namespace.
impl FromStr for PoolId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) => Self::new(ns, name),
            None => Self::new(DEFAULT_NAMESPACE, s),
        }
    }
}

impl fmt::Display for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PoolId({})", self.0)
    }
}

/// Who is calling, as named by the client certificate (e.g. `system:serviceaccount:ci:builder`
/// or `repo:org/app:ref:refs/heads/main`). Used for per-identity limits and logs, never as a
/// metric label.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientIdentity(Arc<str>);

impl ClientIdentity {
    pub const MAX_LEN: usize = 256;

    pub fn new(value: &str) -> Result<Self, NameError> {
        let printable = value.chars().all(|c| !c.is_control());
        if value.is_empty() || value.len() > Self::MAX_LEN || !printable {
            return Err(NameError::BadIdentity {
                value: value.chars().take(64).collect(),
            });
        }
        Ok(Self(value.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientIdentity({})", self.0)
    }
}

/// A backend replica's address (a buildkitd listening on TCP).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr(pub SocketAddr);

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BackendAddr({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_ids_parse_with_and_without_namespace() {
        let p: PoolId = "ci/builders".parse().unwrap();
        assert_eq!((p.namespace(), p.name()), ("ci", "builders"));
        let q: PoolId = "default".parse().unwrap();
        assert_eq!(q.as_str(), "local/default");
    }

    #[test]
    fn pool_ids_refuse_what_kubernetes_would() {
        for bad in ["", "A/b", "a/-b", "a/b-", "a/b_c", "a/b/c", &"x".repeat(64)] {
            assert!(bad.parse::<PoolId>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn identities_are_bounded_printable_text() {
        assert!(ClientIdentity::new("repo:org/app:ref:refs/heads/main").is_ok());
        assert!(ClientIdentity::new("").is_err());
        assert!(ClientIdentity::new("a\nb").is_err());
        assert!(ClientIdentity::new(&"x".repeat(257)).is_err());
    }
}
