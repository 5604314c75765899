//! A certificate authority: its certificate, its key, and the checks that make a pair of PEM
//! files one (the key matches, the certificate is a CA, it is within its validity).

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::CertificateDer;

use super::inspect::{CertInfo, key_from_pem};
use super::issue::{CLOCK_SKEW, random_serial};
use super::{PkiError, Problem};

/// A CA able to issue certificates. One per purpose: each pool's client CA, the gateway's
/// server CA, the backend CA. Never shared between purposes, so trust in one is no trust in
/// another.
pub struct Ca {
    pub(crate) issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
    info: CertInfo,
}

impl Ca {
    /// A new self-signed ECDSA P-256 CA named `common_name` (say what it is for, e.g.
    /// `bkpool client CA local/default`), valid for `valid_for` from five minutes ago.
    pub fn generate(common_name: &str, valid_for: Duration) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "bkpool");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + valid_for).into();
        params.serial_number = Some(random_serial()?.to_vec().into());
        let cert = params.self_signed(&key)?;
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        let info = CertInfo::from_der(cert.der().clone(), Path::new("<generated CA>"))?;
        let issuer = Issuer::new(params, key);
        Ok(Self {
            issuer,
            cert_pem,
            key_pem,
            info,
        })
    }

    /// Loads a CA from its certificate and key files, refusing a key that does not match, a
    /// certificate that is not a CA, and one outside its validity.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let cert_pem = super::files::read_text(cert_path)?;
        let key_pem = super::files::read_text(key_path)?;
        Self::parse(cert_pem, key_pem, cert_path, key_path)
    }

    /// As [`Ca::load`], from PEM text already in memory.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let (cert_path, key_path) = (Path::new("<CA certificate>"), Path::new("<CA key>"));
        Self::parse(cert_pem.into(), key_pem.into(), cert_path, key_path)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.info.der
    }

    /// The CA's private key, PEM (PKCS#8). Only the store should need this.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    pub fn not_after(&self) -> SystemTime {
        self.info.not_after
    }

    fn parse(
        cert_pem: String,
        key_pem: String,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Self, PkiError> {
        let info = CertInfo::from_pem(&cert_pem, cert_path)?;
        let key = key_from_pem(&key_pem, key_path)?;
        info.check_key(&key, key_path, cert_path)?;
        if !info.is_ca {
            return Err(PkiError::invalid(cert_path, Problem::NotCa));
        }
        info.check_valid_at(SystemTime::now(), cert_path)?;
        let issuer = Issuer::from_ca_cert_der(&info.der, key)
            .map_err(|_| PkiError::invalid(cert_path, Problem::BadCertificate))?;
        Ok(Self {
            issuer,
            cert_pem,
            key_pem,
            info,
        })
    }
}

impl std::fmt::Debug for Ca {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}
