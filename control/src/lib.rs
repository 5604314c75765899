//! bkpool control plane.
//!
//! - [`pki`]: CAs, client and server certificates, CSR signing, the local PKI directory.
pub mod pki;
