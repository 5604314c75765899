//! bkpool control plane.
//!
//! - [`pki`]: CAs, client and server certificates, CSR signing, the local PKI directory.
//! - [`crd`]: the `BuildKitPool` custom resource, its schema and semantic validation.
//! - [`operator`]: the Kubernetes reconcilers, the controller and leader election.
pub mod crd;
pub mod operator;
pub mod pki;
