//! Test fixtures for the control crate's integration tests.
#![allow(dead_code)]

pub mod issuer;
