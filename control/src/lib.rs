//! bkpool control plane.
//!
//! - [`pki`]: CAs, client and server certificates, CSR signing, the local PKI directory.
//! - [`auth`]: bearer tokens (ServiceAccount, OIDC, static) to callers allowed on a pool.
//! - [`certapi`]: the HTTPS certificate API (issue, list pools, wake).
//! - [`https`]: the small outbound HTTPS client (OIDC issuers, API server, `bkpool login`).
pub mod auth;
pub mod certapi;
pub mod https;
pub mod pki;
