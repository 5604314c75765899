//! bkpool control plane.
//!
//! - [`pki`]: CAs, client and server certificates, CSR signing, the local PKI directory.
//! - [`auth`]: bearer tokens (ServiceAccount, OIDC, static) to callers allowed on a pool.
//! - [`certapi`]: the HTTPS certificate API (issue, list pools, wake).
//! - [`https`]: the small outbound HTTPS client (OIDC issuers, API server, `bkpool login`).
//! - [`health`]: replica readiness, a gRPC health check over h2c or (m)TLS.
//! - [`standin`]: the built-in stand-in backend (gRPC health + raw echo on one port).
//! - [`driver`]: starting and stopping replicas (local processes).
//! - `grpc`: the hand-encoded gRPC frame and `grpc.health.v1` messages.
pub mod auth;
pub mod certapi;
pub mod driver;
mod grpc;
pub mod health;
pub mod https;
pub mod pki;
pub mod standin;
