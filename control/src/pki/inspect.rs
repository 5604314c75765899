//! Reading PEM certificates and keys, and the few facts about a certificate the PKI acts on
//! (validity, CA flag, names, issuer signature). Every error names the file it came from, so
//! an operator knows which of a dozen PEM files to look at.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::KeyPair;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{PkiError, Problem};

/// Facts read from one certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub der: CertificateDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    /// DNS names and IP addresses (as text) from the subject alternative names.
    pub server_names: Vec<String>,
    /// URI subject alternative names.
    pub uris: Vec<String>,
    /// The raw subject public key (the BIT STRING contents).
    pub public_key: Vec<u8>,
}

impl CertInfo {
    /// Parses the first certificate of a PEM text; `path` names it in errors.
    pub fn from_pem(pem: &str, path: &Path) -> Result<Self, PkiError> {
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|_| PkiError::invalid(path, Problem::NoPem("CERTIFICATE")))?;
        Self::from_der(der, path)
    }

    pub fn from_der(der: CertificateDer<'static>, path: &Path) -> Result<Self, PkiError> {
        let bad = || PkiError::invalid(path, Problem::BadCertificate);
        let (rest, cert) = X509Certificate::from_der(&der).map_err(|_| bad())?;
        if !rest.is_empty() {
            return Err(bad());
        }
        let validity = cert.validity();
        let (server_names, uris) = names(&cert);
        let info = Self {
            not_before: to_system_time(validity.not_before.timestamp()),
            not_after: to_system_time(validity.not_after.timestamp()),
            is_ca: cert.is_ca(),
            server_names,
            uris,
            public_key: cert.public_key().subject_public_key.data.to_vec(),
            der: der.clone(),
        };
        Ok(info)
    }

    /// Refuses a certificate outside its validity window at `now`.
    pub fn check_valid_at(&self, now: SystemTime, path: &Path) -> Result<(), PkiError> {
        if now > self.not_after {
            let not_after = self.not_after;
            return Err(PkiError::invalid(path, Problem::Expired { not_after }));
        }
        if now < self.not_before {
            let not_before = self.not_before;
            return Err(PkiError::invalid(path, Problem::NotYetValid { not_before }));
        }
        Ok(())
    }

    /// Refuses `key` unless it is the private half of this certificate's public key.
    pub fn check_key(
        &self,
        key: &KeyPair,
        key_path: &Path,
        cert_path: &Path,
    ) -> Result<(), PkiError> {
        if key.public_key_raw() != self.public_key.as_slice() {
            let cert = cert_path.to_path_buf();
            return Err(PkiError::invalid(key_path, Problem::KeyMismatch { cert }));
        }
        Ok(())
    }

    /// Refuses this certificate unless `issuer` signed it.
    pub fn check_issued_by(
        &self,
        issuer: &CertificateDer<'_>,
        path: &Path,
        issuer_path: &Path,
    ) -> Result<(), PkiError> {
        let not_issued = || {
            let ca = issuer_path.to_path_buf();
            PkiError::invalid(path, Problem::NotIssuedBy { ca })
        };
        let (_, issuer) = X509Certificate::from_der(issuer).map_err(|_| not_issued())?;
        let (_, cert) = X509Certificate::from_der(&self.der).map_err(|_| not_issued())?;
        cert.verify_signature(Some(issuer.public_key()))
            .map_err(|_| not_issued())
    }
}

/// Parses a PEM private key (PKCS#8, SEC1 or PKCS#1); `path` names it in errors.
pub fn key_from_pem(pem: &str, path: &Path) -> Result<KeyPair, PkiError> {
    if !pem.contains("-----BEGIN") || !pem.contains("-----END") {
        return Err(PkiError::invalid(path, Problem::NoPem("PRIVATE KEY")));
    }
    KeyPair::from_pem(pem).map_err(|e| PkiError::invalid(path, Problem::BadKey(e.to_string())))
}

fn names(cert: &X509Certificate<'_>) -> (Vec<String>, Vec<String>) {
    let (mut server_names, mut uris) = (Vec::new(), Vec::new());
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return (server_names, uris);
    };
    for name in &san.value.general_names {
        match name {
            GeneralName::DNSName(dns) => server_names.push(dns.to_string()),
            GeneralName::IPAddress(raw) => server_names.extend(ip_text(raw)),
            GeneralName::URI(uri) => uris.push(uri.to_string()),
            _ => {}
        }
    }
    (server_names, uris)
}

fn ip_text(raw: &[u8]) -> Option<String> {
    let ip = match raw.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(raw).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(raw).ok()?),
        _ => return None,
    };
    Some(ip.to_string())
}

fn to_system_time(unix: i64) -> SystemTime {
    match u64::try_from(unix) {
        Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => SystemTime::UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs()),
    }
}
