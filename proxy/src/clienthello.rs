//! Reads a TLS ClientHello without terminating TLS, for passthrough pools: the server name
//! (SNI) to route by and whether the client offers HTTP/2, plus how many bytes carried it so
//! the caller can replay them to the backend unchanged.
//!
//! The parser is pure and incremental: [`parse`] looks at whatever has arrived and answers
//! `Incomplete`, a complete [`ClientHello`], or a typed error. It only decides from bytes it has
//! seen, in order, so a prefix that is complete gives the same answer as any longer buffer.
//! Every length field is checked against its container; the handshake message may be split
//! over several TLS records and is reassembled (copied only in that rare case).

use std::borrow::Cow;

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest ClientHello handshake message we accept, header included. A ClientHello with
/// post-quantum key shares is ~1.8 KiB; 16 KiB leaves room for large ticket and padding.
pub const MAX_HANDSHAKE: usize = 16 * 1024;

/// Bytes we are willing to buffer before deciding: a 16 KiB handshake message plus the
/// headers of the records that carry it (a whole KiB of headers: ~200 fragments).
pub const MAX_CLIENT_HELLO: usize = MAX_HANDSHAKE + 1024;

/// What routing needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The `host_name` server name, lowercased, one trailing dot stripped. `None` when the
    /// client sent no SNI (it connected by IP address).
    pub sni: Option<String>,
    /// The client lists `h2` in ALPN.
    pub offers_h2: bool,
    /// Bytes of the records that carry the whole ClientHello, from the start of the buffer.
    pub len: usize,
}

/// How far [`parse`] got with the bytes it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Valid so far; more bytes are needed.
    Incomplete,
    Complete(ClientHello),
}

/// Why the first bytes of a passthrough connection are not a ClientHello we can route.
#[derive(Debug, thiserror::Error)]
pub enum ClientHelloError {
    /// The first record is not a TLS handshake record (SSLv2-style hellos included).
    #[error("client did not start a TLS handshake{}", http_hint(*.http))]
    NotTls {
        /// The bytes look like a plaintext HTTP request (a client that forgot TLS).
        http: bool,
    },
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("ClientHello larger than {MAX_CLIENT_HELLO} bytes")]
    TooLarge,
    #[error("client closed the connection before its ClientHello was complete")]
    Eof,
    #[error("reading the ClientHello: {0}")]
    Io(#[from] std::io::Error),
}

impl ClientHelloError {
    /// Fixed metric label for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotTls { .. } => "not_tls",
            Self::Malformed(_) => "malformed",
            Self::TooLarge => "too_large",
            Self::Eof => "eof",
            Self::Io(_) => "io",
        }
    }
}

/// Pure, allocation-light parse of what has arrived so far. Allocates only the server name,
/// and a copy of the handshake message when it is fragmented over several records.
pub fn parse(buf: &[u8]) -> Result<Progress, ClientHelloError> {
    let Some(found) = find_message(buf)? else {
        return Ok(Progress::Incomplete);
    };
    let message = assemble(&buf[..found.len], found.msg_len);
    let (sni, offers_h2) = parse_body(&message[HANDSHAKE_HEADER..])?;
    Ok(Progress::Complete(ClientHello {
        sni,
        offers_h2,
        len: found.len,
    }))
}

/// Reads from `io` into `buf` until the ClientHello is complete; `buf` keeps every byte read
/// (it may hold more than `len`), so the caller can replay it. Bounded by [`MAX_CLIENT_HELLO`];
/// the caller bounds the time (handshake timeout).
pub async fn read<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
) -> Result<ClientHello, ClientHelloError> {
    loop {
        if let Progress::Complete(hello) = parse(buf)? {
            return Ok(hello);
        }
        let room = MAX_CLIENT_HELLO.saturating_sub(buf.len());
        if room == 0 {
            return Err(ClientHelloError::TooLarge);
        }
        // Read into spare capacity (no zeroing), never past the bound.
        buf.reserve(room.min(READ_CHUNK));
        if io.read_buf(&mut (&mut *buf).limit(room)).await? == 0 {
            return Err(ClientHelloError::Eof);
        }
    }
}

const READ_CHUNK: usize = 4096;
const RECORD_HEADER: usize = 5;
const HANDSHAKE_HEADER: usize = 4;
const CONTENT_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
/// Largest plaintext record fragment (RFC 8446 §5.1).
const MAX_FRAGMENT: usize = 1 << 14;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const NAME_TYPE_HOST_NAME: u8 = 0;
const MAX_HOST_NAME: usize = 253;

fn http_hint(http: bool) -> &'static str {
    if http {
        " (it sent plaintext HTTP)"
    } else {
        ""
    }
}

/// Whether `buf` (possibly just its first byte) could be the start of an HTTP/1 request
/// line or the HTTP/2 cleartext preface.
fn looks_like_http(buf: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"HEAD ",
        b"DELETE ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"PRI * HTTP/2.0",
    ];
    let seen = &buf[..buf.len().min(8)];
    METHODS
        .iter()
        .any(|m| m.starts_with(seen) || seen.starts_with(m))
}

/// Where the whole ClientHello lies in the buffer.
struct Found {
    /// End of the last record that carries the message.
    len: usize,
    /// Length of the handshake message, header included.
    msg_len: usize,
}

/// Walks the records at the start of `buf` until they carry a whole handshake message.
/// Checks headers as soon as their bytes arrive, so garbage is refused early and every
/// answer depends only on bytes already seen.
fn find_message(buf: &[u8]) -> Result<Option<Found>, ClientHelloError> {
    let mut pos = 0;
    let mut header = HandshakeHeader::default();
    let mut carried = 0;
    loop {
        let rest = &buf[pos..];
        check_record_start(rest, pos == 0)?;
        let Some(hdr) = rest.get(..RECORD_HEADER) else {
            return Ok(None);
        };
        let frag_len = usize::from(u16::from_be_bytes([hdr[3], hdr[4]]));
        if frag_len == 0 {
            return Err(ClientHelloError::Malformed("empty handshake record"));
        }
        if frag_len > MAX_FRAGMENT {
            return Err(ClientHelloError::Malformed("record longer than 16 KiB"));
        }
        let end = pos + RECORD_HEADER + frag_len;
        if end > MAX_CLIENT_HELLO {
            return Err(ClientHelloError::TooLarge);
        }
        let fragment = &buf[pos + RECORD_HEADER..end.min(buf.len())];
        header.feed(fragment)?;
        if end > buf.len() {
            return Ok(None);
        }
        carried += frag_len;
        if let Some(msg_len) = header.msg_len()
            && carried >= msg_len
        {
            if carried > msg_len {
                return Err(ClientHelloError::Malformed("data after the ClientHello"));
            }
            return Ok(Some(Found { len: end, msg_len }));
        }
        pos = end;
    }
}

/// Checks the record header bytes that have arrived. The first record decides whether this
/// is TLS at all; later ones must continue the handshake.
fn check_record_start(rest: &[u8], first: bool) -> Result<(), ClientHelloError> {
    match rest.first() {
        Some(&CONTENT_HANDSHAKE) | None => {}
        Some(_) if first => {
            return Err(ClientHelloError::NotTls {
                http: looks_like_http(rest),
            });
        }
        Some(_) => {
            return Err(ClientHelloError::Malformed(
                "non-handshake record inside the ClientHello",
            ));
        }
    }
    match rest.get(1) {
        Some(3) | None => Ok(()),
        Some(_) if first => Err(ClientHelloError::NotTls { http: false }),
        Some(_) => Err(ClientHelloError::Malformed("record version is not TLS")),
    }
}

/// The 4-byte handshake header, which may itself be split across records.
#[derive(Default)]
struct HandshakeHeader {
    bytes: [u8; HANDSHAKE_HEADER],
    have: usize,
}

impl HandshakeHeader {
    fn feed(&mut self, fragment: &[u8]) -> Result<(), ClientHelloError> {
        let take = (HANDSHAKE_HEADER - self.have).min(fragment.len());
        self.bytes[self.have..self.have + take].copy_from_slice(&fragment[..take]);
        self.have += take;
        if self.have >= 1 && self.bytes[0] != HANDSHAKE_CLIENT_HELLO {
            return Err(ClientHelloError::Malformed(
                "first handshake message is not a ClientHello",
            ));
        }
        match self.msg_len() {
            Some(len) if len > MAX_HANDSHAKE => Err(ClientHelloError::TooLarge),
            _ => Ok(()),
        }
    }

    fn msg_len(&self) -> Option<usize> {
        let [_, a, b, c] = self.bytes;
        let body = u32::from_be_bytes([0, a, b, c]) as usize;
        (self.have == HANDSHAKE_HEADER).then_some(HANDSHAKE_HEADER + body)
    }
}

/// The handshake message, borrowed when one record carries it, copied out of its fragments
/// otherwise. `records` is already validated by [`find_message`].
fn assemble(records: &[u8], msg_len: usize) -> Cow<'_, [u8]> {
    if let Some(msg) = records.get(RECORD_HEADER..RECORD_HEADER + msg_len)
        && records.len() == RECORD_HEADER + msg_len
    {
        return Cow::Borrowed(msg);
    }
    let mut msg = Vec::with_capacity(msg_len);
    let mut rest = records;
    while let Some(hdr) = rest.get(..RECORD_HEADER) {
        let end = RECORD_HEADER + usize::from(u16::from_be_bytes([hdr[3], hdr[4]]));
        msg.extend_from_slice(rest.get(RECORD_HEADER..end).unwrap_or_default());
        rest = rest.get(end..).unwrap_or_default();
    }
    Cow::Owned(msg)
}

/// Parses the ClientHello body (RFC 8446 §4.1.2) down to the two extensions we route by.
fn parse_body(body: &[u8]) -> Result<(Option<String>, bool), ClientHelloError> {
    use ClientHelloError::Malformed;
    let mut r = Reader(body);
    r.take(2 + 32)
        .ok_or(Malformed("truncated version or random"))?;
    let session_id = r
        .vec_u8()
        .ok_or(Malformed("session id overruns the message"))?;
    if session_id.len() > 32 {
        return Err(Malformed("session id longer than 32 bytes"));
    }
    let suites = r
        .vec_u16()
        .ok_or(Malformed("cipher suites overrun the message"))?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(Malformed("cipher suite list is empty or odd"));
    }
    let compression = r
        .vec_u8()
        .ok_or(Malformed("compression overruns the message"))?;
    if compression.is_empty() {
        return Err(Malformed("no compression methods"));
    }
    if r.is_empty() {
        // A TLS 1.0-era hello without extensions: no SNI, no ALPN.
        return Ok((None, false));
    }
    let extensions = r
        .vec_u16()
        .ok_or(Malformed("extensions overrun the message"))?;
    r.end(Malformed("data after the extensions"))?;
    parse_extensions(extensions)
}

fn parse_extensions(mut exts: Reader<'_>) -> Result<(Option<String>, bool), ClientHelloError> {
    use ClientHelloError::Malformed;
    let (mut sni, mut alpn) = (None, None);
    while !exts.is_empty() {
        let kind = exts.u16().ok_or(Malformed("truncated extension header"))?;
        let data = exts
            .vec_u16()
            .ok_or(Malformed("extension overruns the list"))?;
        match kind {
            EXT_SERVER_NAME if sni.is_some() => {
                return Err(Malformed("duplicate server_name extension"));
            }
            EXT_SERVER_NAME => sni = Some(server_name(data)?),
            EXT_ALPN if alpn.is_some() => return Err(Malformed("duplicate ALPN extension")),
            EXT_ALPN => alpn = Some(offers_h2(data)?),
            _ => {}
        }
    }
    Ok((sni, alpn.unwrap_or(false)))
}

/// The server_name extension (RFC 6066 §3): exactly one `host_name`.
fn server_name(mut ext: Reader<'_>) -> Result<String, ClientHelloError> {
    use ClientHelloError::Malformed;
    let mut list = ext
        .vec_u16()
        .ok_or(Malformed("server_name list overruns"))?;
    ext.end(Malformed("data after the server_name list"))?;
    let name_type = list.u8().ok_or(Malformed("empty server_name list"))?;
    if name_type != NAME_TYPE_HOST_NAME {
        return Err(Malformed("server name is not a host_name"));
    }
    let name = list
        .vec_u16()
        .ok_or(Malformed("host_name overruns the list"))?;
    list.end(Malformed("more than one server name"))?;
    host_name(name.0)
}

/// A plausible DNS host name, lowercased, one trailing dot stripped.
fn host_name(raw: &[u8]) -> Result<String, ClientHelloError> {
    use ClientHelloError::Malformed;
    let name = raw.strip_suffix(b".").unwrap_or(raw);
    if name.is_empty() {
        return Err(Malformed("empty host_name"));
    }
    if name.len() > MAX_HOST_NAME {
        return Err(Malformed("host_name longer than 253 bytes"));
    }
    if !name.split(|&c| c == b'.').all(dns_label) {
        return Err(Malformed("host_name is not a DNS name"));
    }
    // All ASCII by now, so this cannot fail; map rather than unwrap all the same.
    let name = std::str::from_utf8(name).map_err(|_| Malformed("host_name is not ASCII"))?;
    Ok(name.to_ascii_lowercase())
}

/// Letters, digits, `-` and `_` (seen in service names), 1–63 bytes, no `-` at either end.
fn dns_label(label: &[u8]) -> bool {
    let ok = |c: &u8| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_';
    (1..=63).contains(&label.len())
        && label.iter().all(ok)
        && label.first() != Some(&b'-')
        && label.last() != Some(&b'-')
}

/// The ALPN extension (RFC 7301 §3.1): a non-empty list of non-empty protocol names.
fn offers_h2(mut ext: Reader<'_>) -> Result<bool, ClientHelloError> {
    use ClientHelloError::Malformed;
    let mut list = ext.vec_u16().ok_or(Malformed("ALPN list overruns"))?;
    ext.end(Malformed("data after the ALPN list"))?;
    if list.is_empty() {
        return Err(Malformed("empty ALPN list"));
    }
    let mut h2 = false;
    while !list.is_empty() {
        let proto = list.vec_u8().ok_or(Malformed("ALPN protocol overruns"))?;
        if proto.is_empty() {
            return Err(Malformed("empty ALPN protocol name"));
        }
        h2 |= proto.0 == b"h2";
    }
    Ok(h2)
}

/// A cursor that never reads past its slice: every read is `Option`.
#[derive(Clone, Copy)]
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec_u8(&mut self) -> Option<Reader<'a>> {
        let n = self.u8()?;
        self.take(usize::from(n)).map(Reader)
    }

    fn vec_u16(&mut self) -> Option<Reader<'a>> {
        let n = self.u16()?;
        self.take(usize::from(n)).map(Reader)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn end(&self, err: ClientHelloError) -> Result<(), ClientHelloError> {
        if self.is_empty() { Ok(()) } else { Err(err) }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// Captured from `openssl s_client -servername Builders.Example.com -alpn h2,http/1.1`.
    const OPENSSL_HELLO: &[u8] = include_bytes!("../testdata/clienthello/openssl-sni-alpn-h2.bin");

    /// The first flight of a real rustls client: one record carrying its ClientHello.
    fn rustls_hello(server: &str, alpn: &[&str]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let name = ServerName::try_from(server.to_owned()).unwrap();
        let mut conn = ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// A hand-built ClientHello in one record, with the given extensions.
    fn hello_with(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut ext_block = Vec::new();
        for (kind, data) in exts {
            ext_block.extend_from_slice(&kind.to_be_bytes());
            ext_block.extend_from_slice(&u16_len(data));
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]); // random
        body.extend_from_slice(&[32]);
        body.extend_from_slice(&[9; 32]); // session id
        body.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]); // cipher suites
        body.extend_from_slice(&[1, 0]); // compression: null
        body.extend_from_slice(&u16_len(&ext_block));
        record(&handshake(&body))
    }

    fn u16_len(data: &[u8]) -> Vec<u8> {
        let mut out = (data.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(data);
        out
    }

    fn handshake(body: &[u8]) -> Vec<u8> {
        let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(body);
        msg
    }

    fn record(fragment: &[u8]) -> Vec<u8> {
        let mut out = vec![CONTENT_HANDSHAKE, 3, 1];
        out.extend_from_slice(&u16_len(fragment));
        out
    }

    fn sni(name: &[u8]) -> (u16, Vec<u8>) {
        let mut entry = vec![NAME_TYPE_HOST_NAME];
        entry.extend_from_slice(&u16_len(name));
        (EXT_SERVER_NAME, u16_len(&entry))
    }

    fn alpn(protos: &[&[u8]]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for p in protos {
            list.push(p.len() as u8);
            list.extend_from_slice(p);
        }
        (EXT_ALPN, u16_len(&list))
    }

    /// Re-frames a one-record hello so its handshake message is cut at `cuts` (offsets into
    /// the message) into several records, as a TLS stack may legally send it.
    fn fragmented(hello: &[u8], cuts: &[usize]) -> Vec<u8> {
        let msg = &hello[RECORD_HEADER..];
        let mut bounds = vec![0];
        bounds.extend_from_slice(cuts);
        bounds.push(msg.len());
        bounds
            .windows(2)
            .flat_map(|w| record(&msg[w[0]..w[1]]))
            .collect()
    }

    fn complete(buf: &[u8]) -> ClientHello {
        match parse(buf) {
            Ok(Progress::Complete(hello)) => hello,
            other => panic!("expected a complete ClientHello, got {other:?}"),
        }
    }

    fn malformed(buf: &[u8]) -> &'static str {
        match parse(buf) {
            Err(ClientHelloError::Malformed(why)) => why,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    /// Feeds every prefix: Incomplete until the last byte, then the same answer as the
    /// whole, which is also unchanged by bytes that follow (the client's next flight).
    fn every_prefix(bytes: &[u8]) -> ClientHello {
        for cut in 0..bytes.len() {
            assert!(
                matches!(parse(&bytes[..cut]), Ok(Progress::Incomplete)),
                "prefix of {cut}/{} bytes: {:?}",
                bytes.len(),
                parse(&bytes[..cut])
            );
        }
        let hello = complete(bytes);
        assert_eq!(hello.len, bytes.len());
        let mut more = bytes.to_vec();
        more.extend_from_slice(b"\x14\x03\x03\x00\x01\x01 next flight");
        assert_eq!(complete(&more), hello);
        hello
    }

    #[test]
    fn rustls_hello_with_sni_at_every_split() {
        let bytes = rustls_hello("builders.example.com", &[]);
        assert!(bytes.len() > 1000, "expected post-quantum key shares");
        let hello = every_prefix(&bytes);
        assert_eq!(hello.sni.as_deref(), Some("builders.example.com"));
        assert!(!hello.offers_h2);
    }

    #[test]
    fn rustls_hello_by_ip_address_has_no_sni() {
        let hello = every_prefix(&rustls_hello("10.1.2.3", &["h2"]));
        assert_eq!(hello.sni, None);
        assert!(hello.offers_h2);
    }

    #[test]
    fn rustls_hello_with_alpn() {
        let h2 = every_prefix(&rustls_hello("a.example", &["http/1.1", "h2"]));
        assert!(h2.offers_h2);
        let h1 = complete(&rustls_hello("a.example", &["http/1.1", "h2c"]));
        assert!(!h1.offers_h2);
    }

    #[test]
    fn openssl_hello_is_lowercased() {
        let hello = every_prefix(OPENSSL_HELLO);
        assert_eq!(hello.sni.as_deref(), Some("builders.example.com"));
        assert!(hello.offers_h2);
    }

    #[test]
    fn hello_fragmented_into_three_records() {
        let single = rustls_hello("frag.example.com", &["h2"]);
        let want = complete(&single);
        // Cut inside the handshake header and deep in the extensions.
        let three = fragmented(&single, &[2, 700]);
        let hello = every_prefix(&three);
        assert_eq!(hello.len, single.len() + 2 * RECORD_HEADER);
        assert_eq!((hello.sni, hello.offers_h2), (want.sni, want.offers_h2));
    }

    #[test]
    fn fragments_must_all_be_handshake_records() {
        let mut bytes = fragmented(&rustls_hello("x.example", &[]), &[100]);
        let second = RECORD_HEADER + 100;
        bytes[second] = 0x17; // application data in the middle of the hello
        assert_eq!(
            malformed(&bytes),
            "non-handshake record inside the ClientHello"
        );
        bytes[second] = CONTENT_HANDSHAKE;
        bytes[second + 1] = 2;
        assert_eq!(malformed(&bytes), "record version is not TLS");
    }

    #[test]
    fn hand_built_hello_reads_sni_and_alpn() {
        let hello = complete(&hello_with(&[
            (0x000a, vec![0, 2, 0, 0x1d]),
            alpn(&[b"h2", b"http/1.1"]),
            sni(b"Pool-A.NS.svc.cluster.local."),
        ]));
        assert_eq!(hello.sni.as_deref(), Some("pool-a.ns.svc.cluster.local"));
        assert!(hello.offers_h2);
    }

    #[test]
    fn hello_without_extensions_has_no_sni() {
        let mut bytes = hello_with(&[]);
        bytes.truncate(bytes.len() - 2); // drop the empty extensions length too
        patch_lengths(&mut bytes);
        let hello = complete(&bytes);
        assert_eq!((hello.sni, hello.offers_h2), (None, false));
    }

    /// Rewrites record and handshake lengths after a test changed the body's size.
    fn patch_lengths(bytes: &mut [u8]) {
        let frag = (bytes.len() - RECORD_HEADER) as u16;
        bytes[3..5].copy_from_slice(&frag.to_be_bytes());
        let body = (bytes.len() - RECORD_HEADER - HANDSHAKE_HEADER) as u32;
        bytes[6..9].copy_from_slice(&body.to_be_bytes()[1..]);
    }

    #[test]
    fn host_names_are_checked() {
        let long = [
            b"a".repeat(63),
            b"b".repeat(63),
            b"c".repeat(63),
            b"d".repeat(61),
        ]
        .join(&b'.');
        assert_eq!(long.len(), 253);
        let ok = complete(&hello_with(&[sni(&long)]));
        assert_eq!(ok.sni.map(|s| s.len()), Some(253));
        let mut with_dot = long.clone();
        with_dot.push(b'.');
        assert!(complete(&hello_with(&[sni(&with_dot)])).sni.is_some());

        let mut too_long = long.clone();
        too_long.extend_from_slice(b"d");
        assert_eq!(
            malformed(&hello_with(&[sni(&too_long)])),
            "host_name longer than 253 bytes"
        );
        for bad in [
            &b"a.example\0"[..],
            b"example..com",
            b"example.com..",
            b".example.com",
            b"-a.example",
            b"a b.example",
            "b\u{fc}cher.example".as_bytes(),
            b"x/y.example",
        ] {
            assert_eq!(
                malformed(&hello_with(&[sni(bad)])),
                "host_name is not a DNS name",
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(malformed(&hello_with(&[sni(b"")])), "empty host_name");
        assert_eq!(malformed(&hello_with(&[sni(b".")])), "empty host_name");
        assert_eq!(
            malformed(&hello_with(&[sni(&[b'a'; 64])])),
            "host_name is not a DNS name"
        );
    }

    #[test]
    fn server_name_extension_is_checked() {
        let dup = hello_with(&[sni(b"a.example"), sni(b"b.example")]);
        assert_eq!(malformed(&dup), "duplicate server_name extension");

        let mut two = vec![NAME_TYPE_HOST_NAME];
        two.extend_from_slice(&u16_len(b"a.example"));
        two.extend_from_slice(&[NAME_TYPE_HOST_NAME]);
        two.extend_from_slice(&u16_len(b"b.example"));
        let ext = (EXT_SERVER_NAME, u16_len(&two));
        assert_eq!(malformed(&hello_with(&[ext])), "more than one server name");

        let mut other_type = vec![1];
        other_type.extend_from_slice(&u16_len(b"a.example"));
        let ext = (EXT_SERVER_NAME, u16_len(&other_type));
        assert_eq!(
            malformed(&hello_with(&[ext])),
            "server name is not a host_name"
        );

        let ext = (EXT_SERVER_NAME, vec![0, 0]);
        assert_eq!(malformed(&hello_with(&[ext])), "empty server_name list");
        // host_name length runs past its list; list length runs past the extension.
        let ext = (EXT_SERVER_NAME, vec![0, 9, 0, 0, 2, b'a', b'b']);
        assert_eq!(malformed(&hello_with(&[ext])), "server_name list overruns");
        let ext = (EXT_SERVER_NAME, vec![0, 5, 0, 0, 9, b'a', b'b']);
        assert_eq!(
            malformed(&hello_with(&[ext])),
            "host_name overruns the list"
        );
        let ext = (EXT_SERVER_NAME, vec![0, 3, 0, 0, 0, 0]);
        assert_eq!(
            malformed(&hello_with(&[ext])),
            "data after the server_name list"
        );
    }

    #[test]
    fn alpn_extension_is_checked() {
        let cases: [(Vec<u8>, &str); 5] = [
            (vec![0, 0], "empty ALPN list"),
            (vec![0, 1, 0], "empty ALPN protocol name"),
            (vec![0, 3, 5, b'h', b'2'], "ALPN protocol overruns"),
            (vec![0, 9, 2, b'h', b'2'], "ALPN list overruns"),
            (vec![0, 3, 2, b'h', b'2', 0], "data after the ALPN list"),
        ];
        for (data, want) in cases {
            assert_eq!(malformed(&hello_with(&[(EXT_ALPN, data)])), want);
        }
        let dup = hello_with(&[alpn(&[b"h2"]), alpn(&[b"h2"])]);
        assert_eq!(malformed(&dup), "duplicate ALPN extension");
    }

    /// Offsets into a [`hello_with`] record.
    const SESSION_ID_LEN: usize = RECORD_HEADER + HANDSHAKE_HEADER + 2 + 32;
    const SUITES_LEN: usize = SESSION_ID_LEN + 1 + 32;
    const COMPRESSION_LEN: usize = SUITES_LEN + 2 + 4;
    const EXTENSIONS_LEN: usize = COMPRESSION_LEN + 2;

    #[test]
    fn length_fields_are_checked_against_their_containers() {
        let base = hello_with(&[sni(b"a.example")]);
        let with = |at: usize, value: &[u8]| {
            let mut bytes = base.clone();
            bytes[at..at + value.len()].copy_from_slice(value);
            bytes
        };
        let cases: [(usize, &[u8], &str); 10] = [
            (SESSION_ID_LEN, &[33], "session id longer than 32 bytes"),
            (SESSION_ID_LEN, &[255], "session id overruns the message"),
            (SUITES_LEN, &[0, 3], "cipher suite list is empty or odd"),
            (SUITES_LEN, &[0, 0], "cipher suite list is empty or odd"),
            (
                SUITES_LEN,
                &[0xff, 0xfe],
                "cipher suites overrun the message",
            ),
            (COMPRESSION_LEN, &[0], "no compression methods"),
            (COMPRESSION_LEN, &[200], "compression overruns the message"),
            (EXTENSIONS_LEN, &[0x10, 0], "extensions overrun the message"),
            (EXTENSIONS_LEN, &[0, 1], "data after the extensions"),
            (
                EXTENSIONS_LEN + 2,
                &[0, 0, 0x10, 0],
                "extension overruns the list",
            ),
        ];
        for (at, value, want) in cases {
            assert_eq!(malformed(&with(at, value)), want, "at {at} = {value:?}");
        }
        // Handshake length shorter than the record: trailing data; longer: wait for more.
        let hs_len = u32::from_be_bytes([0, base[6], base[7], base[8]]);
        let shorter = with(6, &(hs_len - 1).to_be_bytes()[1..]);
        assert_eq!(malformed(&shorter), "data after the ClientHello");
        let longer = with(6, &(hs_len + 1).to_be_bytes()[1..]);
        assert!(matches!(parse(&longer), Ok(Progress::Incomplete)));
        // Record longer than what follows: wait; then whatever fills it is trailing data.
        let rec_len = u16::from_be_bytes([base[3], base[4]]);
        let mut overlong = with(3, &(rec_len + 3).to_be_bytes());
        assert!(matches!(parse(&overlong), Ok(Progress::Incomplete)));
        overlong.extend_from_slice(b"abc");
        assert_eq!(malformed(&overlong), "data after the ClientHello");
        // Handshake message so short it cannot hold version and random.
        let tiny = record(&handshake(&[3, 3, 0]));
        assert_eq!(malformed(&tiny), "truncated version or random");
    }

    #[test]
    fn record_headers_are_checked() {
        assert_eq!(malformed(&[0x16, 3, 1, 0, 0]), "empty handshake record");
        assert_eq!(
            malformed(&[0x16, 3, 1, 0x40, 1]),
            "record longer than 16 KiB"
        );
        assert_eq!(
            malformed(&[0x16, 3, 1, 0, 4, 2, 0, 0, 0]),
            "first handshake message is not a ClientHello"
        );
    }

    #[test]
    fn not_tls_is_refused_from_the_first_bytes() {
        let not_tls = |buf: &[u8]| match parse(buf) {
            Err(e @ ClientHelloError::NotTls { http }) => (http, e.reason(), e.to_string()),
            other => panic!("expected NotTls for {buf:?}, got {other:?}"),
        };
        let (http, reason, msg) = not_tls(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(http, "{msg}");
        assert_eq!(reason, "not_tls");
        assert!(msg.contains("plaintext HTTP"), "{msg}");
        assert!(not_tls(b"G").0, "one byte is enough to refuse");
        assert!(not_tls(b"PRI * HTTP/2.0\r\n").0);
        // SSLv2-style hello (length with the high bit set, type 1 = CLIENT-HELLO).
        assert!(!not_tls(&[0x80, 0x2e, 0x01, 0x03, 0x01]).0);
        assert!(!not_tls(&[0x17, 3, 3, 0, 1, 0]).0);
        assert!(!not_tls(&[0x16, 0x47]).0);
        assert!(!not_tls(b"\0\0\0garbage").0);
        assert!(matches!(parse(&[]), Ok(Progress::Incomplete)));
        assert!(matches!(parse(&[0x16]), Ok(Progress::Incomplete)));
    }

    #[test]
    fn oversized_hellos_are_refused_early() {
        // A handshake header announcing 20 KiB is refused before the body arrives.
        let header = [0x16, 3, 1, 0x40, 0, 1, 0, 0x50, 0];
        assert!(matches!(parse(&header), Err(ClientHelloError::TooLarge)));
        // Tiny records whose headers alone push past the bound.
        let big = hello_with(&[(0xff01, vec![0; 15 * 1024])]);
        let cuts: Vec<usize> = (1..big.len() - RECORD_HEADER).step_by(16).collect();
        let err = parse(&fragmented(&big, &cuts)).unwrap_err();
        assert_eq!(err.reason(), "too_large");
        // The same hello in one record is fine.
        assert!(complete(&big).sni.is_none());
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let real = rustls_hello("g.example", &["h2"]);
        for _ in 0..2000 {
            let mut bytes = real.clone();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() as usize) % bytes.len();
                bytes[at] = next() as u8;
            }
            let cut = (next() as usize) % (bytes.len() + 1);
            let _ = parse(&bytes[..cut]);
        }
    }

    #[tokio::test]
    async fn reads_a_hello_trickled_one_byte_at_a_time() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hello = rustls_hello("slow.example.com", &["h2"]);
        let mut sent = hello.clone();
        sent.extend_from_slice(b"early bytes");
        let client = tokio::spawn({
            let addr = listener.local_addr().unwrap();
            let sent = sent.clone();
            async move {
                let mut tcp = TcpStream::connect(addr).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                for (i, byte) in sent.iter().enumerate() {
                    tcp.write_all(&[*byte]).await.unwrap();
                    // Pause often near the headers, then every 64 bytes: seconds, not minutes.
                    if i < 16 || i % 64 == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                tcp
            }
        });
        let (mut server, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let got = read(&mut server, &mut buf).await.unwrap();
        assert_eq!(got.sni.as_deref(), Some("slow.example.com"));
        assert!(got.offers_h2);
        assert_eq!(got.len, hello.len());
        assert_eq!(&buf[..got.len], &hello[..], "bytes kept for replay");
        assert!(sent.starts_with(&buf));
        drop(client.await.unwrap());
    }

    #[tokio::test]
    async fn read_reports_eof_and_keeps_what_arrived() {
        let hello = rustls_hello("eof.example", &[]);
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(&hello[..100]).await.unwrap();
        drop(client);
        let mut buf = Vec::new();
        let err = read(&mut server, &mut buf).await.unwrap_err();
        assert!(matches!(err, ClientHelloError::Eof), "{err:?}");
        assert_eq!(err.reason(), "eof");
        assert_eq!(buf, &hello[..100]);
    }

    #[tokio::test]
    async fn read_refuses_plaintext_http_and_oversized_hellos() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let err = read(&mut server, &mut Vec::new()).await.unwrap_err();
        assert!(
            matches!(err, ClientHelloError::NotTls { http: true }),
            "{err:?}"
        );

        // Endless 1-byte handshake records: refused at the bound, not buffered forever.
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let writer = tokio::spawn(async move {
            let mut bytes = record(&[HANDSHAKE_CLIENT_HELLO]);
            bytes.extend_from_slice(&record(&[0]));
            bytes.extend_from_slice(&record(&[0x20]));
            bytes.extend_from_slice(&record(&[0]));
            for _ in 0..MAX_CLIENT_HELLO / 6 + 1 {
                bytes.extend_from_slice(&record(&[0]));
            }
            let _ = client.write_all(&bytes).await;
        });
        let mut buf = Vec::new();
        let err = read(&mut server, &mut buf).await.unwrap_err();
        assert!(matches!(err, ClientHelloError::TooLarge), "{err:?}");
        assert!(buf.len() <= MAX_CLIENT_HELLO);
        drop(server);
        writer.await.unwrap();
    }

    /// Refreshes the rustls ClientHellos in the fuzz seed corpus.
    #[test]
    #[ignore = "writes fuzz/corpus; run on purpose with --ignored"]
    fn write_fuzz_seeds() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/clienthello");
        let seeds = [
            (
                "seed-rustls-sni-h2",
                rustls_hello("builders.example.com", &["h2"]),
            ),
            ("seed-rustls-ip", rustls_hello("127.0.0.1", &[])),
        ];
        for (name, bytes) in seeds {
            std::fs::write(format!("{dir}/{name}"), bytes).unwrap();
        }
    }

    #[test]
    fn io_errors_have_their_own_label() {
        let err = ClientHelloError::from(std::io::Error::other("reset"));
        assert_eq!(err.reason(), "io");
    }
}
