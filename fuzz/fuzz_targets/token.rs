//! Token parsing and claim-rule evaluation never panic on arbitrary input, and never accept a
//! token over the size bound (`control::auth::fuzz_token`: a rule pattern, a newline, a token).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| control::auth::fuzz_token(data));
