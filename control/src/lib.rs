//! bkpool control plane.
//!
//! - [`pki`]: CAs, client and server certificates, CSR signing, the local PKI directory.
//! - [`auth`]: bearer tokens (ServiceAccount, OIDC, static) to callers allowed on a pool.
//! - [`certapi`]: the HTTPS certificate API (issue, list pools, wake).
//! - [`https`]: the small outbound HTTPS client (OIDC issuers, API server, `bkpool login`).
//! - [`scale`]: scale to zero and back: the scaler, wake on connect, the driver seam.
//! - [`local_config`]: the `bkpool local` configuration (pools, scaling, replica commands).
//! - [`backend_leg`]: the mTLS leg from `bkpool local`'s gateway to its replicas.
//! - [`health`]: replica readiness, a gRPC health check over h2c or (m)TLS.
//! - [`standin`]: the built-in stand-in backend (gRPC health + raw echo on one port).
//! - [`driver`]: starting and stopping replicas (local processes).
//! - `grpc`: the hand-encoded gRPC frame and `grpc.health.v1` messages.
//! - [`crd`]: the `BuildKitPool` custom resource, its schema and semantic validation.
//! - [`operator`]: the Kubernetes reconcilers, the controller and leader election.
//! - [`fuzzing`]: the checks the control plane's fuzz targets run, replayed by `cargo test`.
//! - `kubelet` (feature `test-util`): a process kubelet for test clusters without one: binds
//!   pods and runs their containers as local processes (the real buildkitd).
//! - `testkit` (feature `test-util`): how a test skips (never silently), and what tests need
//!   from outside the project (an API server, BuildKit, openssl).
pub mod auth;
pub mod backend_leg;
pub mod certapi;
pub mod crd;
pub mod driver;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
mod grpc;
pub mod health;
pub mod https;
#[cfg(any(test, feature = "test-util"))]
pub mod kubelet;
pub mod local_config;
pub mod operator;
pub mod pki;
pub mod scale;
pub mod standin;
#[cfg(any(test, feature = "test-util"))]
pub mod testkit;
