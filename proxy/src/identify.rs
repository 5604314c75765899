//! Who is on the other end of a terminated connection: the pool and the caller's identity,
//! read from the client certificate's `bkpool://` URI SAN.
//!
//! The format is `bkpool://<namespace>/<pool>[/<identity>]`, the identity percent-encoded
//! (it may hold `/` and `:`, e.g. `repo:org/app:ref:refs/heads/main`). Exactly one such URI
//! must be present: a certificate naming two pools names none. Without an identity segment
//! the subject CN is used, and `anonymous` without that.

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::names::{ClientIdentity, NameError, PoolId};

pub const URI_SCHEME: &str = "bkpool://";

/// Characters escaped in the identity segment: everything that is not an RFC 3986 pchar,
/// plus `/` (it separates segments) and `%`.
const IDENTITY_ESCAPE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// The authenticated peer of a terminated connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub pool: PoolId,
    pub identity: ClientIdentity,
}

/// Why a certificate names no pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentifyError {
    #[error("certificate is not valid DER X.509")]
    Malformed,
    #[error("certificate has no bkpool:// URI SAN naming a pool")]
    NoPoolUri,
    #[error("certificate has more than one bkpool:// URI SAN")]
    SeveralPoolUris,
    #[error("bkpool:// URI SAN {0:?} is not bkpool://<namespace>/<pool>[/<identity>]")]
    BadUri(String),
    #[error("bkpool:// URI SAN names an invalid pool: {0}")]
    BadName(#[from] NameError),
}

/// The URI SAN a client certificate for `pool` issued to `identity` carries.
pub fn uri_san(pool: &PoolId, identity: &ClientIdentity) -> String {
    let id = utf8_percent_encode(identity.as_str(), IDENTITY_ESCAPE);
    format!("{URI_SCHEME}{}/{}/{id}", pool.namespace(), pool.name())
}

/// Reads pool and identity from a DER end-entity certificate. Does not verify anything:
/// the chain is verified against the named pool's CA by the TLS layer.
pub fn identify(cert: &CertificateDer<'_>) -> Result<Peer, IdentifyError> {
    identify_with_validity(cert).map(|(peer, _)| peer)
}

/// [`identify`], plus the certificate's validity window in Unix seconds.
pub fn identify_with_validity(
    cert: &CertificateDer<'_>,
) -> Result<(Peer, (i64, i64)), IdentifyError> {
    let (_, cert) = X509Certificate::from_der(cert).map_err(|_| IdentifyError::Malformed)?;
    let validity = (
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    );
    identify_parsed(&cert).map(|peer| (peer, validity))
}

fn identify_parsed(cert: &X509Certificate<'_>) -> Result<Peer, IdentifyError> {
    let mut found = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && uri.starts_with(URI_SCHEME)
            {
                if found.is_some() {
                    return Err(IdentifyError::SeveralPoolUris);
                }
                found = Some(*uri);
            }
        }
    }
    let uri = found.ok_or(IdentifyError::NoPoolUri)?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok());
    parse_uri(uri, common_name)
}

/// Parses `bkpool://ns/pool[/identity]`; `fallback` names the caller when the URI does not.
pub fn parse_uri(uri: &str, fallback: Option<&str>) -> Result<Peer, IdentifyError> {
    let bad = || IdentifyError::BadUri(uri.chars().take(128).collect());
    let rest = uri.strip_prefix(URI_SCHEME).ok_or_else(bad)?;
    let mut parts = rest.splitn(3, '/');
    let (ns, pool) = (parts.next().ok_or_else(bad)?, parts.next().ok_or_else(bad)?);
    let pool = PoolId::new(ns, pool)?;
    let identity = match parts.next() {
        Some(raw) if !raw.is_empty() => {
            let decoded = percent_decode_str(raw).decode_utf8().map_err(|_| bad())?;
            ClientIdentity::new(&decoded)?
        }
        Some(_) => return Err(bad()),
        None => ClientIdentity::new(fallback.filter(|cn| !cn.is_empty()).unwrap_or("anonymous"))?,
    };
    Ok(Peer { pool, identity })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trips_identities_with_slashes_and_colons() {
        let pool = PoolId::new("ci", "builders").unwrap();
        let id = ClientIdentity::new("repo:org/app:ref:refs/heads/main %x").unwrap();
        let uri = uri_san(&pool, &id);
        assert!(
            uri.starts_with("bkpool://ci/builders/repo:org%2Fapp"),
            "{uri}"
        );
        assert_eq!(parse_uri(&uri, None).unwrap(), Peer { pool, identity: id });
    }

    #[test]
    fn identity_falls_back_to_common_name() {
        let p = parse_uri("bkpool://local/default", Some("alice")).unwrap();
        assert_eq!(p.identity.as_str(), "alice");
        let p = parse_uri("bkpool://local/default", None).unwrap();
        assert_eq!(p.identity.as_str(), "anonymous");
    }

    #[test]
    fn malformed_uris_are_refused() {
        for bad in [
            "bkpool://",
            "bkpool://local",
            "bkpool://local/",
            "bkpool://Local/x",
            "bkpool://local/x/",
            "bkpool://local/x/%ff",
            "bkpool://local/x/a%0Ab",
            "https://local/x",
        ] {
            assert!(parse_uri(bad, None).is_err(), "{bad:?} should be refused");
        }
    }
}
