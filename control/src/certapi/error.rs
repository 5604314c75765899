//! The API's one error type and how it is answered: JSON `{"reason", "message"}` with a
//! stable `reason` and a status saying who failed. Messages are fixed texts: no error chains,
//! paths or upstream answers ever reach a caller (those go to the log).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::auth::{AuthError, Refusal};
use crate::pki::CsrError;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("pool names must be DNS labels: /v1/namespaces/NS/pools/NAME")]
    BadPoolName,
    #[error("no such pool")]
    PoolNotFound,
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("the request body is larger than the limit")]
    BodyTooLarge,
    #[error("ttl must be a duration such as \"30m\", at least one minute")]
    BadTtl,
    #[error("ttl is longer than this pool allows ({}s at most)", .0.as_secs())]
    TtlAboveCap(std::time::Duration),
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error("the server does not generate keys here: send a CSR (bkpool login makes one)")]
    KeyGenerationDisabled,
    #[error(
        "the pool's client CA is missing or unreadable; nothing is issued until the operator repairs it"
    )]
    PoolCaUnavailable,
    #[error("too many requests from this identity; retry later")]
    RateLimited,
    #[error("too many requests from this address; retry later")]
    SourceRateLimited,
    #[error("too many wake requests from this identity; retry later")]
    WakeRateLimited,
    #[error("the request took too long")]
    Timeout,
    #[error("no such endpoint")]
    NotFound,
    #[error("internal error")]
    Internal,
}

#[derive(Serialize)]
struct Body {
    reason: &'static str,
    message: String,
}

impl ApiError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Auth(e) => e.reason(),
            Self::BadPoolName => "invalid_pool_name",
            Self::PoolNotFound => "pool_not_found",
            Self::BadRequest(_) => "bad_request",
            Self::BodyTooLarge => "body_too_large",
            Self::BadTtl => "invalid_ttl",
            Self::TtlAboveCap(_) => "ttl_above_cap",
            Self::Csr(e) => e.reason(),
            Self::KeyGenerationDisabled => "key_generation_disabled",
            Self::PoolCaUnavailable => "pool_ca_unavailable",
            Self::RateLimited => "rate_limited",
            Self::SourceRateLimited => "source_rate_limited",
            Self::WakeRateLimited => "wake_rate_limited",
            Self::Timeout => "timeout",
            Self::NotFound => "not_found",
            Self::Internal => "internal",
        }
    }

    /// What the caller is told: fixed text, never an upstream's answer or an address.
    pub fn public_message(&self) -> String {
        match self {
            Self::Auth(AuthError::Jwks(e)) if e.reason() != "unknown_key" => {
                "the token's issuer could not be reached or is misconfigured; retry later".into()
            }
            Self::Auth(AuthError::Jwks(_)) => {
                "the token names a key its issuer does not publish".into()
            }
            other => other.to_string(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Auth(e) => match e.refusal() {
                Refusal::Unauthenticated => StatusCode::UNAUTHORIZED,
                Refusal::Forbidden => StatusCode::FORBIDDEN,
                Refusal::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            },
            Self::BadPoolName
            | Self::BadRequest(_)
            | Self::BadTtl
            | Self::TtlAboveCap(_)
            | Self::Csr(_)
            | Self::KeyGenerationDisabled => StatusCode::BAD_REQUEST,
            Self::PoolNotFound | Self::NotFound => StatusCode::NOT_FOUND,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited | Self::SourceRateLimited | Self::WakeRateLimited => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::Timeout | Self::PoolCaUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status(),
            Json(Body {
                reason: self.reason(),
                message: self.public_message(),
            }),
        )
            .into_response();
        if self.status() == StatusCode::UNAUTHORIZED {
            let challenge = axum::http::HeaderValue::from_static("Bearer");
            response.headers_mut().insert("www-authenticate", challenge);
        }
        response
    }
}
