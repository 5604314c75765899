//! Verifying an OIDC token against one issuer a pool trusts: the header's `alg` is checked
//! against the key's type *before* any signature check (so `none`, HMAC, and an algorithm the
//! key cannot have made are refused outright), the key is picked by `kid` from the issuer's
//! cached JWKS, then `jsonwebtoken` checks the signature and `iss`, `aud`, `exp`, `nbf` with a
//! small leeway; `iat` in the future is refused here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use super::jwks::JwksCache;
use super::jwt::{UnverifiedJwt, claim_text};
use super::{AuthError, OidcTrust};

/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY: Duration = Duration::from_secs(60);

/// Checks `jwt` against `trust` and returns its claims.
pub async fn verify(
    keys: &JwksCache,
    jwt: &UnverifiedJwt<'_>,
    trust: &OidcTrust,
) -> Result<Map<String, Value>, AuthError> {
    let alg = allowed_algorithm(&jwt.header.alg)?;
    let key = keys
        .key(&trust.issuer, jwt.header.kid.as_deref())
        .await
        .map_err(AuthError::Jwks)?;
    if !key.algorithms.contains(&alg) {
        return Err(AuthError::AlgKeyMismatch);
    }
    let mut validation = Validation::new(alg);
    validation.leeway = LEEWAY.as_secs();
    validation.validate_nbf = true;
    validation.set_issuer(&[&trust.issuer]);
    validation.set_audience(&trust.audiences);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    let data = jsonwebtoken::decode::<Map<String, Value>>(jwt.raw, &key.key, &validation)
        .map_err(|e| map_error(e.kind()))?;
    check_issued_at(&data.claims)?;
    Ok(data.claims)
}

/// The identity an OIDC caller gets: `<issuer host>:<claim>` (the claim is `sub` unless the
/// pool names another, e.g. `repository`).
pub fn identity(trust: &OidcTrust, claims: &Map<String, Value>) -> Result<String, AuthError> {
    let claim = trust.identity_claim.as_deref().unwrap_or("sub");
    let value = claims
        .get(claim)
        .and_then(claim_text)
        .ok_or(AuthError::MissingClaim)?;
    let host = trust
        .issuer
        .trim_start_matches("https://")
        .split(['/', ':'])
        .next()
        .unwrap_or_default();
    Ok(format!("{host}:{value}"))
}

/// Parses the header's `alg`, refusing `none` and HMAC by name before anything else.
pub fn allowed_algorithm(alg: &str) -> Result<Algorithm, AuthError> {
    if alg.eq_ignore_ascii_case("none") {
        return Err(AuthError::AlgNone);
    }
    let parsed: Algorithm = alg.parse().map_err(|_| AuthError::AlgUnsupported)?;
    match parsed {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Err(AuthError::AlgHmac),
        other => Ok(other),
    }
}

fn check_issued_at(claims: &Map<String, Value>) -> Result<(), AuthError> {
    let Some(iat) = claims.get("iat") else {
        return Ok(());
    };
    let iat = iat.as_f64().ok_or(AuthError::MissingClaim)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    if iat > now + LEEWAY.as_secs_f64() {
        return Err(AuthError::IssuedInFuture);
    }
    Ok(())
}

fn map_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidIssuer => AuthError::IssuerNotTrusted,
        ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => {
            AuthError::MissingClaim
        }
        ErrorKind::InvalidAlgorithm => AuthError::AlgKeyMismatch,
        _ => AuthError::BadSignature,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_and_hmac_are_refused_by_name() {
        assert_eq!(allowed_algorithm("none"), Err(AuthError::AlgNone));
        assert_eq!(allowed_algorithm("NONE"), Err(AuthError::AlgNone));
        assert_eq!(allowed_algorithm("HS256"), Err(AuthError::AlgHmac));
        assert_eq!(allowed_algorithm("HS512"), Err(AuthError::AlgHmac));
        assert_eq!(allowed_algorithm("RS1"), Err(AuthError::AlgUnsupported));
        assert_eq!(allowed_algorithm("ES256"), Ok(Algorithm::ES256));
    }

    #[test]
    fn identities_are_issuer_host_and_claim() {
        let trust = OidcTrust::for_tests("https://token.actions.githubusercontent.com", "sub");
        let claims = serde_json::json!({"sub": "repo:org/app:ref:refs/heads/main"});
        let id = identity(&trust, claims.as_object().unwrap()).unwrap();
        assert_eq!(
            id,
            "token.actions.githubusercontent.com:repo:org/app:ref:refs/heads/main"
        );
        let none = serde_json::json!({});
        assert_eq!(
            identity(&trust, none.as_object().unwrap()),
            Err(AuthError::MissingClaim)
        );
    }
}
