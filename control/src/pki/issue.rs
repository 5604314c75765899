//! Certificates issued by a [`Ca`]: client certificates naming a pool and a caller, server
//! certificates naming hosts, and client certificates for CSRs whose names the caller decides.
//!
//! Every leaf gets a fresh ECDSA P-256 key (unless it comes from a CSR), a random positive
//! 128-bit serial, a NotBefore five minutes in the past (clocks disagree) and a NotAfter no
//! later than its CA's. [`IssueOptions`] bends those rules for tests that need bad
//! certificates: expired, not yet valid, the wrong key usage, two pool URIs.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use proxy::identify::uri_san;
use proxy::names::{ClientIdentity, PoolId};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
};
use rustls::pki_types::CertificateDer;

use super::{Ca, PkiError, csr};

/// How far NotBefore is backdated, so a client whose clock is a little behind still accepts
/// a certificate issued a moment ago.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Longest subject common name X.509 allows (ub-common-name).
const MAX_COMMON_NAME: usize = 64;

/// Extended key usages a leaf may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eku {
    ClientAuth,
    ServerAuth,
}

/// Deviations from the normal issuing rules, for tests. The default deviates from nothing.
#[derive(Debug, Clone, Default)]
pub struct IssueOptions {
    validity: Option<(SystemTime, SystemTime)>,
    ekus: Option<Vec<Eku>>,
    extra_uris: Vec<String>,
}

/// A freshly issued certificate.
#[derive(Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    /// The private key (PKCS#8 PEM); `None` when the key stayed with the requester (CSR).
    pub key_pem: Option<String>,
    pub not_after: SystemTime,
    pub serial: Serial,
    cert_der: CertificateDer<'static>,
    ca_pem: String,
}

/// A certificate serial number: 128 random bits, encoded as a positive integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Serial(pub [u8; 16]);

impl Ca {
    /// A client certificate for `identity` in `pool`: clientAuth only, the pool's `bkpool://`
    /// URI SAN, CN = identity (truncated to 64 characters).
    pub fn issue_client(
        &self,
        pool: &PoolId,
        identity: &ClientIdentity,
        ttl: Duration,
    ) -> Result<IssuedCert, PkiError> {
        self.issue_client_with(pool, identity, ttl, &IssueOptions::default())
    }

    pub fn issue_client_with(
        &self,
        pool: &PoolId,
        identity: &ClientIdentity,
        ttl: Duration,
        options: &IssueOptions,
    ) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = self.client_params(pool, identity, ttl, options)?;
        self.sign(&params, &key, Some(key.serialize_pem()))
    }

    /// Signs a PEM PKCS#10 request for `identity` in `pool`. Only the request's key is used:
    /// every name and extension it asks for is ignored, the caller decides who it is for.
    pub fn sign_client_csr(
        &self,
        csr_pem: &str,
        pool: &PoolId,
        identity: &ClientIdentity,
        ttl: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let key = csr::requested_key(csr_pem)?;
        let params = self.client_params(pool, identity, ttl, &IssueOptions::default())?;
        self.sign(&params, &key, None)
    }

    /// A client certificate naming no pool, only `common_name` (the gateway's certificate
    /// for the backend leg, checked by buildkitd against the backend CA).
    pub fn issue_client_named(
        &self,
        common_name: &str,
        ttl: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let options = IssueOptions::default();
        let params = self.leaf_params(common_name, Vec::new(), Eku::ClientAuth, ttl, &options)?;
        self.sign(&params, &key, Some(key.serialize_pem()))
    }

    /// A server certificate for `names` (DNS names and IP addresses), serverAuth only.
    pub fn issue_server(&self, names: &[String], ttl: Duration) -> Result<IssuedCert, PkiError> {
        self.issue_server_with(names, ttl, &IssueOptions::default())
    }

    pub fn issue_server_with(
        &self,
        names: &[String],
        ttl: Duration,
        options: &IssueOptions,
    ) -> Result<IssuedCert, PkiError> {
        if names.is_empty() {
            return Err(PkiError::NoServerNames);
        }
        let sans = names
            .iter()
            .map(|n| server_san(n))
            .collect::<Result<Vec<_>, _>>()?;
        let common_name = names.first().map_or("bkpool server", String::as_str);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = self.leaf_params(common_name, sans, Eku::ServerAuth, ttl, options)?;
        self.sign(&params, &key, Some(key.serialize_pem()))
    }

    fn client_params(
        &self,
        pool: &PoolId,
        identity: &ClientIdentity,
        ttl: Duration,
        options: &IssueOptions,
    ) -> Result<CertificateParams, PkiError> {
        let uri = uri_san(pool, identity);
        let sans = vec![SanType::URI(uri.try_into()?)];
        self.leaf_params(identity.as_str(), sans, Eku::ClientAuth, ttl, options)
    }

    fn leaf_params(
        &self,
        common_name: &str,
        mut sans: Vec<SanType>,
        eku: Eku,
        ttl: Duration,
        options: &IssueOptions,
    ) -> Result<CertificateParams, PkiError> {
        for uri in &options.extra_uris {
            sans.push(SanType::URI(uri.clone().try_into()?));
        }
        let now = SystemTime::now();
        let default_window = (now - CLOCK_SKEW, (now + ttl).min(self.not_after()));
        let (not_before, not_after) = options.validity.unwrap_or(default_window);
        let ekus = options.ekus.clone().unwrap_or_else(|| vec![eku]);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let cn: String = common_name.chars().take(MAX_COMMON_NAME).collect();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = ekus.into_iter().map(Eku::purpose).collect();
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial()?.to_vec().into());
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    fn sign(
        &self,
        params: &CertificateParams,
        key: &impl PublicKeyData,
        key_pem: Option<String>,
    ) -> Result<IssuedCert, PkiError> {
        let cert = params.signed_by(key, &self.issuer)?;
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| s.to_bytes())
            .unwrap_or_default();
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem,
            not_after: params.not_after.into(),
            serial: Serial(serial.try_into().unwrap_or_default()),
            ca_pem: self.cert_pem().to_owned(),
        })
    }
}

impl IssueOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// Exactly this validity window instead of five minutes ago until the TTL.
    pub fn valid_between(mut self, not_before: SystemTime, not_after: SystemTime) -> Self {
        self.validity = Some((not_before, not_after));
        self
    }

    /// Expired an hour ago (valid for the day before).
    pub fn expired(self) -> Self {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        self.valid_between(now - 25 * hour, now - hour)
    }

    /// Valid from an hour from now.
    pub fn not_yet_valid(self) -> Self {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        self.valid_between(now + hour, now + 25 * hour)
    }

    /// These extended key usages instead of the one the certificate kind calls for (an empty
    /// list leaves the extension out, which RFC 5280 reads as "any purpose").
    pub fn ekus(mut self, ekus: &[Eku]) -> Self {
        self.ekus = Some(ekus.to_vec());
        self
    }

    /// One more URI SAN after the ones the certificate kind calls for (e.g. a second
    /// `bkpool://` URI, which must make the certificate name no pool at all).
    pub fn extra_uri(mut self, uri: &str) -> Self {
        self.extra_uris.push(uri.to_owned());
        self
    }
}

impl IssuedCert {
    /// The certificate followed by its issuing CA's, PEM.
    pub fn chain_pem(&self) -> String {
        format!("{}{}", self.cert_pem, self.ca_pem)
    }

    /// The issuing CA's certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }
}

impl fmt::Debug for IssuedCert {
    /// Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("has_key", &self.key_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl Eku {
    fn purpose(self) -> ExtendedKeyUsagePurpose {
        match self {
            Self::ClientAuth => ExtendedKeyUsagePurpose::ClientAuth,
            Self::ServerAuth => ExtendedKeyUsagePurpose::ServerAuth,
        }
    }
}

/// 128 random bits; rcgen encodes them as a positive INTEGER (a leading zero byte when the
/// top bit is set), so the serial is never negative.
pub(crate) fn random_serial() -> Result<[u8; 16], PkiError> {
    let mut serial = [0u8; 16];
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .secure_random
        .fill(&mut serial)
        .map_err(|_| PkiError::Random)?;
    Ok(serial)
}

fn server_san(name: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    match name.to_owned().try_into() {
        Ok(dns) if is_dns_name(name) => Ok(SanType::DnsName(dns)),
        _ => Err(PkiError::BadServerName(name.to_owned())),
    }
}

/// A host name, optionally a `*.` wildcard: dot-separated labels of letters, digits and
/// inner hyphens.
pub(crate) fn is_dns_name(name: &str) -> bool {
    let host = name.strip_prefix("*.").unwrap_or(name);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    host.len() <= 253 && host.split('.').all(label_ok)
}

#[cfg(test)]
mod tests {
    use proxy::identify::identify;
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::{CertificateError, Error as TlsError};
    use x509_parser::prelude::{FromDer, X509Certificate};

    use super::*;
    use crate::pki::testing::{client_verifier, server_verifier};

    const HOUR: Duration = Duration::from_secs(3600);

    fn ca(name: &str) -> Ca {
        Ca::generate(name, 24 * HOUR).unwrap()
    }

    fn pool(name: &str) -> PoolId {
        name.parse().unwrap()
    }

    fn who(name: &str) -> ClientIdentity {
        ClientIdentity::new(name).unwrap()
    }

    fn verify_client(ca: &Ca, cert: &IssuedCert) -> Result<(), TlsError> {
        let verifier = client_verifier(ca);
        verifier
            .verify_client_cert(cert.cert_der(), &[], UnixTime::now())
            .map(drop)
    }

    #[test]
    fn a_client_cert_opens_its_pools_ca_and_no_other() {
        let (ca_a, ca_b) = (ca("a"), ca("b"));
        let cert = ca_a.issue_client(&pool("a"), &who("alice"), HOUR).unwrap();
        verify_client(&ca_a, &cert).unwrap();
        assert!(matches!(
            verify_client(&ca_b, &cert),
            Err(TlsError::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        ));
    }

    #[test]
    fn identify_gives_back_pool_and_full_identity_while_cn_is_truncated() {
        let long = format!("repo:org/app:ref:refs/heads/{}", "x".repeat(80));
        let cert = ca("a")
            .issue_client(&pool("ci/a"), &who(&long), HOUR)
            .unwrap();
        let peer = identify(cert.cert_der()).unwrap();
        assert_eq!((peer.pool, peer.identity), (pool("ci/a"), who(&long)));
        let (_, parsed) = X509Certificate::from_der(cert.cert_der()).unwrap();
        let cn = parsed
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, &long[..64]);
    }

    #[test]
    fn client_certs_are_client_auth_only_leaf_certs_with_backdated_not_before() {
        let cert = ca("a")
            .issue_client(&pool("a"), &who("alice"), HOUR)
            .unwrap();
        let (_, parsed) = X509Certificate::from_der(cert.cert_der()).unwrap();
        let eku = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth && !eku.any);
        let ku = parsed.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        assert!(!parsed.is_ca());
        let not_before = parsed.validity().not_before.timestamp();
        let now = UnixTime::now().as_secs() as i64;
        assert!(
            (now - 6 * 60..=now - 4 * 60).contains(&not_before),
            "{not_before} vs {now}"
        );
        let lifetime = parsed.validity().not_after.timestamp() - not_before;
        assert_eq!(lifetime, 3600 + 300);
    }

    #[test]
    fn serials_are_random_positive_and_128_bits() {
        let ca = ca("a");
        let one = ca.issue_client(&pool("a"), &who("alice"), HOUR).unwrap();
        let two = ca.issue_client(&pool("a"), &who("alice"), HOUR).unwrap();
        assert_ne!(one.serial, two.serial);
        let (_, parsed) = X509Certificate::from_der(one.cert_der()).unwrap();
        let raw = parsed.raw_serial();
        assert!(raw[0] < 0x80, "negative serial {raw:02x?}");
        assert_eq!(
            parsed.serial.to_bytes_be(),
            one.serial
                .0
                .iter()
                .copied()
                .skip_while(|b| *b == 0)
                .collect::<Vec<_>>()
        );
        assert_eq!(one.serial.to_string().len(), 32);
    }

    #[test]
    fn leaves_never_outlive_their_ca() {
        let ca = ca("a");
        let cert = ca
            .issue_client(&pool("a"), &who("alice"), 1000 * HOUR)
            .unwrap();
        assert_eq!(cert.not_after, ca.not_after());
    }

    #[test]
    fn expired_and_not_yet_valid_certs_are_refused() {
        let ca = ca("a");
        let issue = |o: IssueOptions| {
            ca.issue_client_with(&pool("a"), &who("alice"), HOUR, &o)
                .unwrap()
        };
        let expired = verify_client(&ca, &issue(IssueOptions::new().expired()));
        assert!(
            matches!(
                expired,
                Err(TlsError::InvalidCertificate(
                    CertificateError::ExpiredContext { .. }
                ))
            ),
            "{expired:?}"
        );
        let early = verify_client(&ca, &issue(IssueOptions::new().not_yet_valid()));
        assert!(
            matches!(
                early,
                Err(TlsError::InvalidCertificate(
                    CertificateError::NotValidYetContext { .. }
                ))
            ),
            "{early:?}"
        );
    }

    #[test]
    fn a_cert_without_client_auth_is_refused_as_a_client() {
        let ca = ca("a");
        let options = IssueOptions::new().ekus(&[Eku::ServerAuth]);
        let cert = ca
            .issue_client_with(&pool("a"), &who("alice"), HOUR, &options)
            .unwrap();
        let result = verify_client(&ca, &cert);
        assert!(
            matches!(
                result,
                Err(TlsError::InvalidCertificate(
                    CertificateError::InvalidPurposeContext { .. }
                ))
            ),
            "{result:?}"
        );
    }

    #[test]
    fn server_certs_name_ips_as_ip_addresses_and_verify_for_those_names_only() {
        let ca = ca("gateway");
        let names: Vec<String> = ["127.0.0.1", "::1", "localhost", "gw.example"]
            .map(String::from)
            .to_vec();
        let cert = ca.issue_server(&names, HOUR).unwrap();
        let (_, parsed) = X509Certificate::from_der(cert.cert_der()).unwrap();
        let sans = &parsed
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        use x509_parser::extensions::GeneralName::{DNSName, IPAddress};
        assert!(matches!(sans[0], IPAddress(ip) if ip == [127, 0, 0, 1]));
        assert!(matches!(sans[1], IPAddress(ip) if ip.len() == 16));
        assert!(matches!(sans[2], DNSName("localhost")));
        let eku = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        let verifier = server_verifier(&ca);
        let verify = |name: &str| {
            let name = ServerName::try_from(name.to_owned()).unwrap();
            verifier.verify_server_cert(cert.cert_der(), &[], &name, &[], UnixTime::now())
        };
        use rustls::client::danger::ServerCertVerifier;
        for good in ["127.0.0.1", "::1", "localhost", "gw.example"] {
            verify(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        assert!(verify("other.example").is_err());
        assert!(verify("10.0.0.1").is_err());
    }

    #[test]
    fn bad_server_names_are_refused() {
        let ca = ca("gateway");
        for bad in ["", "-x.example", "a..b", "a b", "bkpool://x", "é.example"] {
            let err = ca.issue_server(&[bad.to_owned()], HOUR).unwrap_err();
            assert!(
                matches!(err, PkiError::BadServerName(ref n) if n == bad),
                "{bad:?}: {err}"
            );
        }
        assert!(matches!(
            ca.issue_server(&[], HOUR),
            Err(PkiError::NoServerNames)
        ));
    }

    #[test]
    fn the_chain_is_the_leaf_then_its_ca() {
        let ca = ca("a");
        let cert = ca.issue_client(&pool("a"), &who("alice"), HOUR).unwrap();
        assert_eq!(
            cert.chain_pem(),
            format!("{}{}", cert.cert_pem, ca.cert_pem())
        );
        assert!(
            cert.key_pem
                .as_deref()
                .unwrap()
                .contains("BEGIN PRIVATE KEY")
        );
        assert!(!format!("{cert:?}").contains("PRIVATE"));
    }
}
