//! `proxy::clienthello::parse` never panics, and never answers a prefix differently from the
//! whole: once a prefix is complete (or refused), more bytes cannot change the answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::clienthello::{Progress, parse};

/// Inputs up to this size also have every prefix checked (quadratic, so keep it small).
const PREFIX_CHECK_MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    if data.len() > PREFIX_CHECK_MAX {
        return;
    }
    for cut in 0..data.len() {
        match (parse(&data[..cut]), &whole) {
            (Ok(Progress::Incomplete), _) => {}
            (Ok(Progress::Complete(early)), Ok(Progress::Complete(late))) => {
                assert_eq!(&early, late, "prefix of {cut} bytes");
                assert!(early.len <= cut, "len past the prefix");
            }
            (Err(early), Err(late)) => assert_eq!(early.reason(), late.reason()),
            (early, late) => panic!("prefix of {cut} bytes gave {early:?}, whole {late:?}"),
        }
    }
});
