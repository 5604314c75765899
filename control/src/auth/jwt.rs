//! JWT parsing before any key is involved: size, shape, base64url and JSON of the three
//! segments, and the registered claims bkpool reads. Nothing here is trusted: it only decides
//! which issuer and key to check the signature with, and refuses garbage early with a precise
//! reason. This is what the `token` fuzz target drives.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};

/// Tokens longer than this are refused before any decoding (real OIDC and ServiceAccount
/// tokens are 1–2 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// A token split and decoded, signature not yet checked.
#[derive(Debug, Clone)]
pub struct UnverifiedJwt<'a> {
    pub raw: &'a str,
    pub header: Header,
    pub claims: Map<String, Value>,
}

/// The JOSE header fields bkpool looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub alg: String,
    pub kid: Option<String>,
}

/// Which of the three segments a fault is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    Header,
    Payload,
    Signature,
}

/// Why a token was refused before its signature was looked at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("token is longer than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    #[error("token is not three dot-separated segments (empty, truncated or not a JWT)")]
    Malformed,
    #[error("token {0:?} segment is not base64url")]
    Encoding(Segment),
    #[error("token {0:?} segment is not a JSON object of the expected shape")]
    Json(Segment),
    #[error("token header names critical extensions bkpool does not implement")]
    UnsupportedCritical,
}

impl JwtError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge => "token_too_large",
            Self::Malformed => "token_malformed",
            Self::Encoding(_) => "token_bad_encoding",
            Self::Json(_) => "token_bad_json",
            Self::UnsupportedCritical => "token_unsupported_critical",
        }
    }
}

/// Splits and decodes `token`.
pub fn parse(token: &str) -> Result<UnverifiedJwt<'_>, JwtError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwtError::TooLarge);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    if h.is_empty() || p.is_empty() || s.is_empty() {
        return Err(JwtError::Malformed);
    }
    let header = decode_object(h, Segment::Header)?;
    let claims = decode_object(p, Segment::Payload)?;
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| JwtError::Encoding(Segment::Signature))?;
    Ok(UnverifiedJwt {
        raw: token,
        header: Header::from_json(&header)?,
        claims,
    })
}

impl UnverifiedJwt<'_> {
    /// The `iss` claim, when it is a string.
    pub fn issuer(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }
}

impl Header {
    fn from_json(header: &Map<String, Value>) -> Result<Self, JwtError> {
        let bad = || JwtError::Json(Segment::Header);
        if header.contains_key("crit") {
            return Err(JwtError::UnsupportedCritical);
        }
        let alg = header.get("alg").and_then(Value::as_str).ok_or_else(bad)?;
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => return Err(bad()),
        };
        Ok(Self {
            alg: alg.to_owned(),
            kid,
        })
    }
}

/// The string value of a claim for rule matching: strings as they are, numbers and booleans
/// as JSON prints them, anything else (arrays, objects, null) has no string value.
pub fn claim_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn decode_object(segment: &str, which: Segment) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| JwtError::Encoding(which))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(JwtError::Json(which)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    fn token(header: &str, payload: &str) -> String {
        format!("{}.{}.{}", b64(header), b64(payload), b64("sig"))
    }

    #[test]
    fn a_well_formed_token_parses_with_its_issuer_and_kid() {
        let t = token(
            r#"{"alg":"RS256","kid":"k1"}"#,
            r#"{"iss":"https://i","sub":"x"}"#,
        );
        let jwt = parse(&t).unwrap();
        assert_eq!(jwt.header.alg, "RS256");
        assert_eq!(jwt.header.kid.as_deref(), Some("k1"));
        assert_eq!(jwt.issuer(), Some("https://i"));
    }

    #[test]
    fn each_kind_of_garbage_has_its_own_reason() {
        let good = token(r#"{"alg":"RS256"}"#, r#"{"iss":"x"}"#);
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "token_malformed"),
            ("a.b".into(), "token_malformed"),
            ("a.b.c.d".into(), "token_malformed"),
            (format!("{good}."), "token_malformed"),
            (
                good.rsplit_once('.').unwrap().0.to_owned(),
                "token_malformed",
            ),
            (
                format!("!!.{}", &good[good.find('.').unwrap() + 1..]),
                "token_bad_encoding",
            ),
            (token("not json", "{}"), "token_bad_json"),
            (token("[1]", "{}"), "token_bad_json"),
            (token(r#"{"alg":5}"#, "{}"), "token_bad_json"),
            (token(r#"{"alg":"RS256","kid":5}"#, "{}"), "token_bad_json"),
            (token(r#"{"alg":"RS256"}"#, "\"str\""), "token_bad_json"),
            (
                token(r#"{"alg":"RS256","crit":["x"]}"#, "{}"),
                "token_unsupported_critical",
            ),
            ("a".repeat(MAX_TOKEN_BYTES + 1), "token_too_large"),
        ];
        for (t, reason) in cases {
            let err = parse(&t).unwrap_err();
            assert_eq!(err.reason(), reason, "{t:.80}: {err}");
        }
    }

    #[test]
    fn claim_text_reads_scalars_only() {
        assert_eq!(claim_text(&"a".into()).as_deref(), Some("a"));
        assert_eq!(claim_text(&5.into()).as_deref(), Some("5"));
        assert_eq!(claim_text(&true.into()).as_deref(), Some("true"));
        assert_eq!(claim_text(&serde_json::json!(["a"])), None);
        assert_eq!(claim_text(&Value::Null), None);
    }
}
