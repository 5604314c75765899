//! What a certificate signing request contributes: its public key, and nothing else. The
//! request's own signature proves the requester holds the private key; its subject and other
//! extensions are discarded, because who the certificate is for is decided by whoever
//! authenticated the requester. A request that asks for names (any subject alternative name)
//! or for a CA certificate is refused outright rather than quietly signed without them: its
//! requester expects something it will never get, and says so early.

use rcgen::{
    PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_RSA_SHA256, PublicKeyData,
    SignatureAlgorithm,
};
use rustls::pki_types::CertificateSigningRequestDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::ParsedExtension;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

/// Smallest RSA modulus accepted.
pub const MIN_RSA_BITS: usize = 2048;

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("no PEM CERTIFICATE REQUEST block (empty, truncated or not PEM)")]
    NotPem,
    #[error("not a valid PKCS#10 certificate request")]
    Malformed,
    #[error("the request's signature does not verify with its own public key")]
    BadSignature,
    #[error("unsupported key type {0}: use ECDSA P-256, ECDSA P-384 or RSA of at least 2048 bits")]
    UnsupportedKey(String),
    #[error("RSA key of {0} bits is too small: at least {MIN_RSA_BITS} are required")]
    WeakRsa(usize),
    #[error(
        "the request asks for subject alternative names; the certificate's names are set by the issuer, send a request without them"
    )]
    AsksForNames,
    #[error("the request asks for a CA certificate; only client certificates are issued")]
    AsksForCa,
}

impl CsrError {
    /// The stable reason a refusal is reported with.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotPem | Self::Malformed | Self::BadSignature => "csr_invalid",
            Self::UnsupportedKey(_) | Self::WeakRsa(_) => "csr_key_unsupported",
            Self::AsksForNames => "csr_asks_for_names",
            Self::AsksForCa => "csr_asks_for_ca",
        }
    }
}

/// The public key of a verified CSR, ready to be put in a certificate.
#[derive(Debug, Clone)]
pub struct RequestedKey {
    raw: Vec<u8>,
    alg: &'static SignatureAlgorithm,
}

/// Parses a PEM CSR, verifies its self-signature and returns its key if the key is one we
/// accept.
pub fn requested_key(csr_pem: &str) -> Result<RequestedKey, CsrError> {
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|_| CsrError::NotPem)?;
    requested_key_der(der.as_ref())
}

/// As [`requested_key`], from DER.
pub fn requested_key_der(der: &[u8]) -> Result<RequestedKey, CsrError> {
    let (rest, csr) = X509CertificationRequest::from_der(der).map_err(|_| CsrError::Malformed)?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed);
    }
    // The key first: a key we refuse may also be one the verifier cannot check, and
    // "unsupported key" is the answer that tells the requester what to change.
    let spki = &csr.certification_request_info.subject_pki;
    let alg = accepted_algorithm(spki)?;
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    refuse_requested_extensions(&csr)?;
    let raw = spki.subject_public_key.data.to_vec();
    Ok(RequestedKey { raw, alg })
}

impl PublicKeyData for RequestedKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

/// Refuses a request asking for subject alternative names or `CA:true`.
fn refuse_requested_extensions(csr: &X509CertificationRequest<'_>) -> Result<(), CsrError> {
    for extension in csr.requested_extensions().into_iter().flatten() {
        match extension {
            ParsedExtension::SubjectAlternativeName(_) => return Err(CsrError::AsksForNames),
            ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(CsrError::AsksForCa),
            _ => {}
        }
    }
    Ok(())
}

/// The rcgen algorithm whose SubjectPublicKeyInfo encoding matches the key, if we accept it.
fn accepted_algorithm(
    spki: &SubjectPublicKeyInfo<'_>,
) -> Result<&'static SignatureAlgorithm, CsrError> {
    let key_oid = &spki.algorithm.algorithm;
    if *key_oid == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
            _ => return Err(CsrError::Malformed),
        };
        return if bits >= MIN_RSA_BITS {
            Ok(&PKCS_RSA_SHA256)
        } else {
            Err(CsrError::WeakRsa(bits))
        };
    }
    if *key_oid != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(CsrError::UnsupportedKey(key_oid.to_id_string()));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    match curve {
        Some(c) if c == OID_EC_P256 => Ok(&PKCS_ECDSA_P256_SHA256),
        Some(c) if c == OID_NIST_EC_P384 => Ok(&PKCS_ECDSA_P384_SHA384),
        Some(c) => Err(CsrError::UnsupportedKey(format!(
            "EC curve {}",
            c.to_id_string()
        ))),
        None => Err(CsrError::UnsupportedKey("EC without a named curve".into())),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proxy::identify::identify;
    use proxy::names::{ClientIdentity, PoolId};
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, PKCS_ED25519,
        RsaKeySize,
    };
    use x509_parser::prelude::X509Certificate;

    use super::*;
    use crate::pki::{Ca, PkiError};

    const HOUR: Duration = Duration::from_secs(3600);

    /// RSA-1024 request made with `openssl req -newkey rsa:1024` (rcgen will not make one).
    const RSA_1024_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIIBTjCBuAIBADAPMQ0wCwYDVQQDDAR3ZWFrMIGfMA0GCSqGSIb3DQEBAQUAA4GN
ADCBiQKBgQDMvCK7pRySyoagiebJCZBowxoOVz4z65Pn1Tk4yTyDasYUby7xiiDv
6G7rGWDxvE7FL1wqKhMCJ5vXobo/PlzzV1lUpbRzMhsMHKBNi4roWoq7r8BIN7EU
8dRABMYAybxNf7mVv1cTyIY6Rntz4xodeyUK+GfwMC0CCVEGV4yu2wIDAQABoAAw
DQYJKoZIhvcNAQELBQADgYEAORSo9tXrWhTYW4+04nDJ7RbnddE/OjiUcaJvDZDK
ogEkRajxRZ7p+CNu4+M7OFrOPH+njUTVbOphgdWNlGs17vZ0xXqLeOOcT4abTsCB
jjE1AkbC/rlFtlhooGEDxzm/NHaokVefj8IwTfRNsTlrMm647Y4Htyze6nLg+cvI
LN0=
-----END CERTIFICATE REQUEST-----
";

    /// secp256k1 request made with `openssl req -newkey ec -pkeyopt ec_paramgen_curve:secp256k1`.
    const SECP256K1_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIHDMGwCAQAwDTELMAkGA1UEAwwCazEwVjAQBgcqhkjOPQIBBgUrgQQACgNCAATM
S81gTaVJcHHgoqclC0dvvb7cWDoMNLYBIBGtMEacoH/qVBWpa1qT6QwVNsC6xbzh
UR0TRc8W0XSRqisURrTAoAAwCgYIKoZIzj0EAwIDRwAwRAIgfkfzTOEIphU9MCrU
5Hw/uM/tOBaiLsfFn8co5Clw69ECIFmI3Nin9jWVUAQR/Gym16SLePLHLsaX50EA
A8yiTXWZ
-----END CERTIFICATE REQUEST-----
";

    /// A request from `key` asking for a subject and key usages it will not get (ignored).
    fn greedy_csr(key: &KeyPair) -> rcgen::CertificateSigningRequest {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "root");
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::Any,
        ];
        params.serialize_request(key).unwrap()
    }

    /// A request from `key` asking for `sans` and, with `ca`, for a CA certificate.
    fn asking_csr(key: &KeyPair, sans: Vec<rcgen::SanType>, ca: bool) -> String {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        if ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    fn sign(ca: &Ca, csr_pem: &str) -> Result<crate::pki::IssuedCert, PkiError> {
        let pool: PoolId = "a".parse().unwrap();
        ca.sign_client_csr(csr_pem, &pool, &ClientIdentity::new("alice").unwrap(), HOUR)
    }

    fn csr_error(result: Result<crate::pki::IssuedCert, PkiError>) -> CsrError {
        match result {
            Err(PkiError::Csr(e)) => e,
            other => panic!("expected a CSR error, got {other:?}"),
        }
    }

    #[test]
    fn csr_signing_keeps_only_the_key_and_sets_every_name_itself() {
        let ca = Ca::generate("a", 24 * HOUR).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = sign(&ca, &greedy_csr(&key).pem().unwrap()).unwrap();
        assert!(cert.key_pem.is_none());
        let (_, parsed) = X509Certificate::from_der(cert.cert_der()).unwrap();
        assert_eq!(
            parsed.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        let sans = &parsed
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert_eq!(sans.len(), 1, "{sans:?}");
        let peer = identify(cert.cert_der()).unwrap();
        assert_eq!(
            (peer.pool.as_str(), peer.identity.as_str()),
            ("local/a", "alice")
        );
        let cn = parsed
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, "alice");
        let eku = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth && !eku.any);
        assert!(!parsed.is_ca());
    }

    #[test]
    fn requests_for_names_or_a_ca_are_refused_with_their_own_reason() {
        let ca = Ca::generate("a", 24 * HOUR).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let uri = rcgen::SanType::URI("bkpool://local/other/root".try_into().unwrap());
        let dns = rcgen::SanType::DnsName("evil.example".try_into().unwrap());
        let ip = rcgen::SanType::IpAddress([10, 0, 0, 1].into());
        for (sans, ca_bit, expected) in [
            (vec![uri], false, CsrError::AsksForNames),
            (vec![dns], false, CsrError::AsksForNames),
            (vec![ip], false, CsrError::AsksForNames),
            (vec![], true, CsrError::AsksForCa),
        ] {
            let csr = asking_csr(&key, sans, ca_bit);
            assert_eq!(csr_error(sign(&ca, &csr)), expected);
        }
        assert_eq!(CsrError::AsksForNames.reason(), "csr_asks_for_names");
        assert_eq!(CsrError::AsksForCa.reason(), "csr_asks_for_ca");
        assert_eq!(CsrError::WeakRsa(1024).reason(), "csr_key_unsupported");
        assert!(sign(&ca, &asking_csr(&key, vec![], false)).is_ok());
    }

    #[test]
    fn p384_and_rsa_2048_keys_are_accepted() {
        let ca = Ca::generate("a", 24 * HOUR).unwrap();
        let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let rsa = KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048).unwrap();
        for key in [p384, rsa] {
            let cert = sign(&ca, &greedy_csr(&key).pem().unwrap()).unwrap();
            let (_, parsed) = X509Certificate::from_der(cert.cert_der()).unwrap();
            assert_eq!(
                parsed.public_key().subject_public_key.data.as_ref(),
                key.public_key_raw()
            );
            assert_eq!(parsed.public_key().raw, key.subject_public_key_info());
        }
    }

    #[test]
    fn weak_and_unsupported_keys_are_refused_by_name() {
        let ca = Ca::generate("a", 24 * HOUR).unwrap();
        assert_eq!(csr_error(sign(&ca, RSA_1024_CSR)), CsrError::WeakRsa(1024));
        assert!(
            matches!(csr_error(sign(&ca, SECP256K1_CSR)), CsrError::UnsupportedKey(k) if k.contains("1.3.132.0.10"))
        );
        let ed = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let ed_csr = CertificateParams::default()
            .serialize_request(&ed)
            .unwrap()
            .pem()
            .unwrap();
        assert!(matches!(
            csr_error(sign(&ca, &ed_csr)),
            CsrError::UnsupportedKey(_)
        ));
    }

    #[test]
    fn a_tampered_request_fails_its_signature_check() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        let mut der = csr.der().to_vec();
        // The subject's CN value sits inside the signed info: change one of its letters.
        let at = der
            .windows(3)
            .position(|w| w == b"rcg")
            .expect("default CN in the request");
        der[at] = b'R';
        assert_eq!(requested_key_der(&der).unwrap_err(), CsrError::BadSignature);
        assert!(requested_key_der(csr.der()).is_ok());
    }

    #[test]
    fn garbage_is_not_a_request() {
        let ca = Ca::generate("a", 24 * HOUR).unwrap();
        assert_eq!(csr_error(sign(&ca, "")), CsrError::NotPem);
        assert_eq!(csr_error(sign(&ca, ca.cert_pem())), CsrError::NotPem);
        let truncated = &RSA_1024_CSR[..RSA_1024_CSR.len() / 2];
        assert_eq!(csr_error(sign(&ca, truncated)), CsrError::NotPem);
        assert_eq!(
            requested_key_der(b"\x30\x03\x02\x01\x00").unwrap_err(),
            CsrError::Malformed
        );
    }
}
