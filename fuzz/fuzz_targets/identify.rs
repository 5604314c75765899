//! `proxy::identify` never panics on arbitrary DER, nor `parse_uri` on arbitrary text, and
//! what `parse_uri` accepts survives a round trip through `uri_san`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::identify::{identify, parse_uri, uri_san};
use rustls_pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    let _ = identify(&CertificateDer::from(data));
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(peer) = parse_uri(text, Some("fallback"))
    {
        let again = parse_uri(&uri_san(&peer.pool, &peer.identity), None);
        assert_eq!(again.as_ref(), Ok(&peer), "{text:?}");
    }
});
