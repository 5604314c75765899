//! The mTLS leg between `bkpool local`'s gateway and its replicas. A replica listens on a
//! loopback port any local user can reach: in plaintext, that user could talk to buildkitd
//! directly, past the gateway's client certificates and its pool isolation. So each replica
//! serves TLS with a certificate of the local backend CA and accepts only clients with one
//! too, which only the gateway holds.
//!
//! Both certificates are issued afresh at every start from the backend CA in the state
//! directory, into two `buildctl --tlsdir`-shaped directories (0700, keys 0600):
//!
//! ```text
//! <pki>/backend/replica/   ca.pem (the backend CA: whom to accept), cert.pem, key.pem
//!                          (the replicas' server certificate for 127.0.0.1): `{tls}`
//! <pki>/backend/gateway/   ca.pem (whom to trust), cert.pem, key.pem (the gateway's client
//!                          certificate)
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proxy::config::BackendTls;

use crate::pki::files::write_tls_dir;
use crate::pki::{LocalPki, PkiError};

/// How long the leg's certificates are valid. They never leave the state directory and are
/// issued again at every start, so they only have to outlive one run of bkpool.
const VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The two ends' certificate directories.
#[derive(Debug, Clone)]
pub struct BackendLeg {
    replica: PathBuf,
    gateway: PathBuf,
}

impl BackendLeg {
    /// Issues both certificates from `pki`'s backend CA and writes them.
    pub fn issue(pki: &LocalPki) -> Result<Self, PkiError> {
        let ca = pki.backend_ca();
        let dir = pki.dir().join("backend");
        let leg = BackendLeg {
            replica: dir.join("replica"),
            gateway: dir.join("gateway"),
        };
        let names = ["127.0.0.1".to_owned(), "localhost".to_owned()];
        let server = ca.issue_server(&names, VALIDITY)?;
        let client = ca.issue_client_named("bkpool local gateway", VALIDITY)?;
        for (out, issued) in [(&leg.replica, server), (&leg.gateway, client)] {
            let key = issued.key_pem.as_deref().unwrap_or_default();
            write_tls_dir(out, ca.cert_pem(), &issued.cert_pem, key)?;
        }
        Ok(leg)
    }

    /// What replicas read (`{tls}` in their command): the server certificate, its key, and
    /// the CA their clients must have a certificate of.
    pub fn replica_dir(&self) -> &Path {
        &self.replica
    }

    /// The gateway's side, as its configuration names it.
    pub fn gateway_tls(&self) -> BackendTls {
        BackendTls {
            ca: self.gateway.join("ca.pem"),
            cert: self.gateway.join("cert.pem"),
            key: self.gateway.join("key.pem"),
            server_name: None,
        }
    }

    /// The gateway's client configuration, for readiness probes of replicas.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, proxy::tls::TlsError> {
        let tls = self.gateway_tls();
        proxy::tls::backend_client_config(&tls.ca, &tls.cert, &tls.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::inspect::CertInfo;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn both_ends_get_a_certificate_of_the_backend_ca_and_keys_stay_private() {
        let dir = tempfile::tempdir().unwrap();
        let pki = LocalPki::open_or_init(dir.path(), &[], &[]).unwrap();
        let leg = BackendLeg::issue(&pki).unwrap();
        let replica = leg.replica_dir();
        let server_pem = std::fs::read_to_string(replica.join("cert.pem")).unwrap();
        let server = CertInfo::from_pem(&server_pem, &replica.join("cert.pem")).unwrap();
        assert!(
            server.server_names.contains(&"127.0.0.1".to_owned()),
            "{server:?}"
        );
        let ca_path = replica.join("ca.pem");
        server
            .check_issued_by(
                pki.backend_ca().cert_der(),
                &replica.join("cert.pem"),
                &ca_path,
            )
            .unwrap();
        for key in [replica.join("key.pem"), leg.gateway_tls().key] {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        }
        leg.client_config().expect("the gateway's side loads");
        // Issued afresh each time: a second start replaces both.
        let again = BackendLeg::issue(&pki).unwrap();
        let second = std::fs::read_to_string(again.replica_dir().join("cert.pem")).unwrap();
        assert_ne!(second, server_pem);
    }
}
