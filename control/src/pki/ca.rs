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

/// A CA subject name that says nothing about what the CA is for: `bkpool CA` and 16 random
/// hex digits. The gateway names every pool's client CA in its CertificateRequest to anyone
/// who connects (Go clients send a certificate only when its issuer is named), so readable
/// names would list the pools; clients choose their certificate by issuer match, which an
/// opaque name serves as well. CAs made with readable names keep them and keep working.
pub fn opaque_name() -> Result<String, PkiError> {
    let random = super::issue::random_serial()?;
    let hex: String = random[..8].iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("bkpool CA {hex}"))
}

impl Ca {
    /// A new self-signed ECDSA P-256 CA named `common_name`, valid for `valid_for` from five
    /// minutes ago. A CA whose name is shown to clients gets an [`opaque_name`].
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

#[cfg(test)]
mod tests {
    use std::fs;

    use x509_parser::extensions::ParsedExtension;
    use x509_parser::prelude::{FromDer, X509Certificate};

    use super::*;
    use crate::pki::IssueOptions;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn a_generated_ca_is_a_p256_ca_that_can_only_sign_leaves() {
        let ca = Ca::generate("bkpool client CA local/default", 30 * DAY).unwrap();
        let (_, cert) = X509Certificate::from_der(ca.cert_der()).unwrap();
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, "bkpool client CA local/default");
        assert_eq!(cert.subject(), cert.issuer());
        let bc = cert.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca && bc.path_len_constraint == Some(0), "{bc:?}");
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
        let curve = cert
            .public_key()
            .algorithm
            .parameters
            .as_ref()
            .unwrap()
            .as_oid()
            .unwrap();
        assert_eq!(curve, x509_parser::oid_registry::OID_EC_P256);
        cert.verify_signature(None).unwrap();
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, (30 * DAY + CLOCK_SKEW).as_secs() as i64);
        let has_ski = cert.extensions().iter().any(|e| {
            matches!(
                e.parsed_extension(),
                ParsedExtension::SubjectKeyIdentifier(_)
            )
        });
        assert!(has_ski);
    }

    #[test]
    fn a_loaded_ca_issues_like_the_generated_one() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Ca::generate("a", DAY).unwrap();
        let (cert_path, key_path) = (tmp.path().join("ca.pem"), tmp.path().join("ca.key"));
        fs::write(&cert_path, ca.cert_pem()).unwrap();
        fs::write(&key_path, ca.key_pem()).unwrap();
        let loaded = Ca::load(&cert_path, &key_path).unwrap();
        assert_eq!(loaded.cert_der(), ca.cert_der());
        let pool = "a".parse().unwrap();
        let who = proxy::names::ClientIdentity::new("alice").unwrap();
        let leaf = loaded.issue_client(&pool, &who, DAY).unwrap();
        let verifier = crate::pki::testing::client_verifier(&ca);
        let now = rustls::pki_types::UnixTime::now();
        verifier
            .verify_client_cert(leaf.cert_der(), &[], now)
            .unwrap();
    }

    #[test]
    fn expired_and_non_ca_certs_do_not_load() {
        let ca = Ca::generate("a", DAY).unwrap();
        let err =
            Ca::from_pem(ca.cert_pem(), Ca::generate("b", DAY).unwrap().key_pem()).unwrap_err();
        assert!(
            matches!(
                err,
                PkiError::Invalid {
                    problem: Problem::KeyMismatch { .. },
                    ..
                }
            ),
            "{err}"
        );

        // An expired CA: sign a CA certificate over the same key with a past window.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.not_before = (SystemTime::now() - 2 * DAY).into();
        params.not_after = (SystemTime::now() - DAY).into();
        let expired = params.self_signed(&key).unwrap();
        let err = Ca::from_pem(&expired.pem(), &key.serialize_pem()).unwrap_err();
        assert!(
            matches!(
                err,
                PkiError::Invalid {
                    problem: Problem::Expired { .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("expired at"), "{err}");

        let leaf = ca
            .issue_server_with(&["localhost".into()], DAY, &IssueOptions::new())
            .unwrap();
        let err = Ca::from_pem(&leaf.cert_pem, leaf.key_pem.as_deref().unwrap()).unwrap_err();
        assert!(
            matches!(
                err,
                PkiError::Invalid {
                    problem: Problem::NotCa,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn missing_files_are_read_errors_naming_them() {
        let tmp = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (tmp.path().join("ca.pem"), tmp.path().join("ca.key"));
        let err = Ca::load(&cert_path, &key_path).unwrap_err();
        assert_eq!(err.path(), Some(cert_path.as_path()));
        assert!(err.to_string().contains("ca.pem: cannot read"), "{err}");
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let ca = Ca::generate("a", DAY).unwrap();
        let shown = format!("{ca:?}");
        assert!(
            !shown.contains("PRIVATE") && !shown.contains(&ca.key_pem()[30..60]),
            "{shown}"
        );
    }
}
