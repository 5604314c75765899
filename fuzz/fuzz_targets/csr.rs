//! CSR parsing and checking never panic, and an accepted request gets exactly its key and the
//! issuer's names (`control::fuzzing::csr_request`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| control::fuzzing::csr_request(data));
