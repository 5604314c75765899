//! A bearer token as one request sees it: read once (a static token's grant, or a JWT split
//! and decoded), and reviewed by the API server at most once however many pools the request
//! looks at (listing, or a pool that does not exist).

use tokio::sync::OnceCell;

use super::AuthError;
use super::jwt::UnverifiedJwt;
use super::kube::ReviewedUser;
use super::static_tokens::StaticGrant;

/// One request's token.
#[derive(Debug)]
pub struct Bearer<'t> {
    pub(super) presented: Presented<'t>,
    /// The TokenReview's answer, once asked for.
    pub(super) reviewed: OnceCell<Result<ReviewedUser, AuthError>>,
}

/// What the token is, before any pool is considered.
#[derive(Debug)]
pub(super) enum Presented<'t> {
    Static(StaticGrant),
    Jwt(UnverifiedJwt<'t>),
}

impl<'t> Bearer<'t> {
    pub(super) fn new(presented: Presented<'t>) -> Self {
        Self {
            presented,
            reviewed: OnceCell::new(),
        }
    }

    /// The JWT, when the token is one.
    pub fn jwt(&self) -> Option<&UnverifiedJwt<'t>> {
        match &self.presented {
            Presented::Jwt(jwt) => Some(jwt),
            Presented::Static(_) => None,
        }
    }
}
