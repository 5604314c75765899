//! `proxy::clienthello::parse` never panics, and never answers a prefix differently from the
//! whole (`proxy::fuzzing::client_hello`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxy::fuzzing::client_hello(data));
