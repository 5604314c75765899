//! What a certificate signing request contributes: its public key, and nothing else. The
//! request's own signature proves the requester holds the private key; its subject, SANs and
//! extensions are discarded unread, because who the certificate is for is decided by whoever
//! authenticated the requester.

use rcgen::{
    PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_RSA_SHA256, PublicKeyData,
    SignatureAlgorithm,
};
use rustls::pki_types::CertificateSigningRequestDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
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
