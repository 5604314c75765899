//! bkpool control plane.
//!
//! - [`pki`]: CAs, client and server certificates, CSR signing, the local PKI directory.
//! - [`health`]: replica readiness, a gRPC health check over h2c or (m)TLS.
//! - [`standin`]: the built-in stand-in backend (gRPC health + raw echo on one port).
//! - `grpc`: the hand-encoded gRPC frame and `grpc.health.v1` messages.
mod grpc;
pub mod health;
pub mod pki;
pub mod standin;
