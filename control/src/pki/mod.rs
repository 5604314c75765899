//! Certificates: making, loading and storing them.
//!
//! - [`ca`]: a certificate authority ([`Ca`]), generated or loaded from PEM files.
//! - [`issue`]: client and server certificates issued by a [`Ca`], and CSR signing.
//! - [`csr`]: what a PKCS#10 request may carry (its key) and what it may not (anything else).
//! - [`inspect`]: PEM and X.509 parsing with errors that name the file.
//! - [`files`]: atomic, permission-aware writes (keys are 0600 from their first byte).
//! - [`store`]: the local PKI in a state directory ([`LocalPki`]).
//! - `testing` (feature `test-util`): good and deliberately bad certificates for tests.

pub mod ca;
pub mod csr;
pub mod files;
pub mod inspect;
pub mod issue;
pub mod store;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub use ca::{Ca, opaque_name};
pub use csr::CsrError;
pub use files::write_tls_dir;
pub use issue::{Eku, IssueOptions, IssuedCert, Serial};
pub use store::LocalPki;

/// Everything that can go wrong making, loading or storing certificates. File errors name the
/// file; nothing is ever replaced to get past one of them.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: Problem },
    #[error(
        "{} exists but {} does not; refusing to create one half of a key pair",
        present.display(),
        missing.display()
    )]
    HalfPair { present: PathBuf, missing: PathBuf },
    #[error("{} exists and is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("server name {0:?} is neither an IP address nor a DNS name")]
    BadServerName(String),
    #[error("a server certificate needs at least one DNS name or IP address")]
    NoServerNames,
    #[error("certificate signing request refused: {0}")]
    Csr(#[from] CsrError),
    #[error("the system random number generator failed")]
    Random,
    #[error("cannot generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// What is wrong with a file's contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("no PEM {0} block (empty, truncated or not PEM)")]
    NoPem(&'static str),
    #[error("not a valid X.509 certificate")]
    BadCertificate,
    #[error("not a usable private key: {0}")]
    BadKey(String),
    #[error("private key does not match certificate {}", cert.display())]
    KeyMismatch { cert: PathBuf },
    #[error("certificate is not a CA (basic constraints CA:false or absent)")]
    NotCa,
    #[error("certificate expired at {}", time::OffsetDateTime::from(*not_after))]
    Expired { not_after: SystemTime },
    #[error("certificate is not valid before {}", time::OffsetDateTime::from(*not_before))]
    NotYetValid { not_before: SystemTime },
    #[error("certificate was not issued by {}", ca.display())]
    NotIssuedBy { ca: PathBuf },
}

impl PkiError {
    /// The file the error is about, when there is one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::Read { path, .. }
            | Self::Write { path, .. }
            | Self::Invalid { path, .. }
            | Self::NotADirectory { path } => Some(path),
            Self::HalfPair { present, .. } => Some(present),
            _ => None,
        }
    }

    pub(crate) fn invalid(path: &Path, problem: Problem) -> Self {
        Self::Invalid {
            path: path.to_path_buf(),
            problem,
        }
    }
}
