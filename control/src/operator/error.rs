//! The operator's errors. Each names the reconciler and the object it was working on, and
//! maps to a fixed `reason` label.

use crate::pki::PkiError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{reconciler}: writing {kind} {namespace}/{name}: {source}")]
    Write {
        reconciler: &'static str,
        kind: &'static str,
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("{reconciler}: deleting {kind} {namespace}/{name}: {source}")]
    Delete {
        reconciler: &'static str,
        kind: &'static str,
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("pki: secret {namespace}/{name}: {source}")]
    Pki {
        namespace: String,
        name: String,
        source: PkiError,
    },
    #[error("{0}: the pool has no namespace")]
    NoNamespace(String),
}

impl Error {
    /// A fixed label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Write { source, .. } | Self::Delete { source, .. } => kube_reason(source),
            Self::Pki { .. } => "pki",
            Self::NoNamespace(_) => "invalid_object",
        }
    }
}

/// A fixed metric label for a Kubernetes API error.
pub fn kube_reason(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(s) if s.code == 403 => "forbidden",
        kube::Error::Api(s) if s.code == 409 => "conflict",
        kube::Error::Api(s) if s.code == 422 => "invalid",
        kube::Error::Api(s) if s.code == 404 => "not_found",
        kube::Error::Api(_) => "api",
        _ => "transport",
    }
}
