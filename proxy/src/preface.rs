//! The HTTP/2 server preface, answered by the gateway while it holds a connection for a
//! waking pool (terminate mode, ALPN `h2`).
//!
//! A gRPC client (grpc-go, so `buildctl` and buildx) gives up when the server's HTTP/2
//! preface (a SETTINGS frame) has not arrived 20 s after it connected. A wake that needs a new
//! node or an image pull takes longer, so the gateway sends an empty SETTINGS frame of its own
//! as soon as it holds the connection and the client has sent its connection preface (which
//! grpc-go does right after the TLS handshake); the client's transport is then up and its RPCs wait on
//! their own deadlines (none, for a build). The client's frames are kept, bounded, until a
//! backend is connected, and replayed to it unchanged but for one frame: the SETTINGS ACK that
//! answers the gateway's SETTINGS, which the backend never sent and must not see.
//!
//! Why the rest needs no rewriting:
//! - The client's SETTINGS is acknowledged exactly once, by the backend, when it is replayed.
//! - The backend's SETTINGS reaches the client as a second SETTINGS frame, which HTTP/2 allows
//!   at any time; the client applies it and acknowledges it to the backend.
//! - The gateway's empty SETTINGS announces HTTP/2's defaults, which bound what the client may
//!   send before the backend speaks: frames of at most 16 KiB, and at most 65,535 bytes of
//!   DATA on the connection until a WINDOW_UPDATE that only the backend can send.
//!
//! Anything unexpected (a malformed frame, a client that sends more than that, a client that
//! did not negotiate `h2`) stops the early answer: the gateway stops reading and holds the
//! connection as it would without this module. Each such fallback has a fixed reason.

/// The gateway's SETTINGS frame: empty, so every setting keeps HTTP/2's default.
pub const SETTINGS: [u8; 9] = [0, 0, 0, FRAME_SETTINGS, 0, 0, 0, 0, 0];

/// What every HTTP/2 client sends first (RFC 9113, section 3.4).
pub const CLIENT_MAGIC: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The largest frame payload a client may send before the backend raises it.
const MAX_FRAME: usize = 16_384;
/// The connection's initial flow-control window: the most DATA a client may send unanswered.
const INITIAL_WINDOW: u64 = 65_535;
/// Bytes kept for replay at most: the DATA window, plus room for HEADERS and control frames.
pub const DEFAULT_LIMIT: usize = 256 * 1024;

const FRAME_DATA: u8 = 0x0;
const FRAME_SETTINGS: u8 = 0x4;
const FLAG_ACK: u8 = 0x1;
const HEADER: usize = 9;

/// Why a held connection went back to plain holding. Each is a fixed metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Fallback {
    #[error("the client did not negotiate h2")]
    NotH2,
    #[error("the client did not start with the HTTP/2 connection preface")]
    BadMagic,
    #[error("the client's first frame is not SETTINGS")]
    NoSettings,
    #[error("the client sent a frame larger than the default maximum frame size")]
    FrameTooLarge,
    #[error("the client sent a malformed SETTINGS frame")]
    BadSettings,
    #[error("the client sent more DATA than the initial flow-control window")]
    FlowControl,
    #[error("the client sent more than the replay buffer holds")]
    BufferFull,
}

impl Fallback {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotH2 => "not_h2",
            Self::BadMagic => "bad_magic",
            Self::NoSettings => "no_settings",
            Self::FrameTooLarge => "frame_too_large",
            Self::BadSettings => "bad_settings",
            Self::FlowControl => "flow_control",
            Self::BufferFull => "buffer_full",
        }
    }

    /// Every reason, for metrics that are registered up front.
    pub const ALL: [Fallback; 7] = [
        Self::NotH2,
        Self::BadMagic,
        Self::NoSettings,
        Self::FrameTooLarge,
        Self::BadSettings,
        Self::FlowControl,
        Self::BufferFull,
    ];
}

/// Where the parser stands in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// The 24-byte connection preface.
    Magic,
    /// The client's own SETTINGS, which must be its first frame.
    FirstSettings,
    /// Any frame; the gateway's SETTINGS is not acknowledged yet.
    Ack,
    /// Any frame; the acknowledgement was removed.
    Rest,
}

/// The client's bytes read while its connection is held, parsed frame by frame.
#[derive(Debug)]
pub struct Held {
    /// Everything read, minus the removed acknowledgement: what the backend will get.
    kept: Vec<u8>,
    /// Offset in `kept` of the first byte not yet parsed (the start of an incomplete frame).
    parsed: usize,
    expect: Expect,
    data: u64,
    limit: usize,
}

impl Held {
    /// Keeps at most `limit` bytes (at least one largest frame).
    pub fn new(limit: usize) -> Self {
        Self {
            kept: Vec::new(),
            parsed: 0,
            expect: Expect::Magic,
            data: 0,
            limit: limit.max(CLIENT_MAGIC.len() + HEADER + MAX_FRAME),
        }
    }

    /// How many more bytes may be read from the client; zero means stop reading.
    pub fn room(&self) -> usize {
        self.limit - self.kept.len()
    }

    /// Whether the client sent the whole HTTP/2 connection preface: only then is it answered.
    pub fn spoke_h2(&self) -> bool {
        self.expect != Expect::Magic
    }

    /// Whether the acknowledgement of the gateway's SETTINGS has arrived (and was removed).
    pub fn acknowledged(&self) -> bool {
        self.expect == Expect::Rest
    }

    /// Takes bytes read from the client (at most [`Held::room`]) and parses every whole frame.
    /// After an error, stop reading: what was kept is still replayed as it is.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), Fallback> {
        let take = bytes.len().min(self.room());
        self.kept.extend_from_slice(&bytes[..take]);
        self.parse()?;
        if take < bytes.len() || self.room() == 0 {
            return Err(Fallback::BufferFull);
        }
        Ok(())
    }

    /// The bytes to send to the backend before relaying the rest of the client's stream.
    pub fn into_replay(self) -> Vec<u8> {
        self.kept
    }

    fn parse(&mut self) -> Result<(), Fallback> {
        if self.expect == Expect::Magic {
            let have = &self.kept[..self.kept.len().min(CLIENT_MAGIC.len())];
            if !CLIENT_MAGIC.starts_with(have) {
                return Err(Fallback::BadMagic);
            }
            if have.len() < CLIENT_MAGIC.len() {
                return Ok(());
            }
            self.parsed = CLIENT_MAGIC.len();
            self.expect = Expect::FirstSettings;
        }
        while let Some(frame) = Frame::at(&self.kept[self.parsed..]) {
            self.check(&frame)?;
            let end = self.parsed + HEADER + frame.len;
            if end > self.kept.len() {
                // The payload is still arriving; parse the frame again once it is whole.
                return Ok(());
            }
            match self.expect {
                Expect::Ack if frame.is_settings_ack() => {
                    // The first acknowledgement answers the gateway's SETTINGS: the backend
                    // sent none yet, so it must not see one.
                    self.kept.drain(self.parsed..end);
                    self.expect = Expect::Rest;
                    continue;
                }
                Expect::FirstSettings => self.expect = Expect::Ack,
                _ => {}
            }
            if frame.kind == FRAME_DATA {
                self.data += frame.len as u64;
                if self.data > INITIAL_WINDOW {
                    return Err(Fallback::FlowControl);
                }
            }
            self.parsed = end;
        }
        Ok(())
    }

    /// Refuses a frame header that no conforming client sends at this point.
    fn check(&self, frame: &Frame) -> Result<(), Fallback> {
        if frame.len > MAX_FRAME {
            return Err(Fallback::FrameTooLarge);
        }
        if self.expect == Expect::FirstSettings
            && (frame.kind != FRAME_SETTINGS || frame.flags & FLAG_ACK != 0)
        {
            return Err(Fallback::NoSettings);
        }
        if frame.kind == FRAME_SETTINGS {
            let ack = frame.flags & FLAG_ACK != 0;
            if frame.stream != 0 || (ack && frame.len != 0) || !frame.len.is_multiple_of(6) {
                return Err(Fallback::BadSettings);
            }
        }
        Ok(())
    }
}
/// A frame header.
#[derive(Debug, Clone, Copy)]
struct Frame {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl Frame {
    /// The header at the start of `bytes`, once all nine bytes are there.
    fn at(bytes: &[u8]) -> Option<Self> {
        let h = bytes.get(..HEADER)?;
        Some(Self {
            len: usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]),
            kind: h[3],
            flags: h[4],
            stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
        })
    }

    fn is_settings_ack(&self) -> bool {
        self.kind == FRAME_SETTINGS && self.flags & FLAG_ACK != 0
    }
}

/// A GOAWAY frame telling the client that no stream was processed, so it may retry: sent when
/// a held connection that was answered early fails (wake timeout, no backend). `reason` goes
/// in the debug data, which grpc-go shows in its error.
pub fn goaway(reason: &str) -> Vec<u8> {
    let debug = reason.as_bytes();
    let len = 8 + debug.len();
    let mut frame = Vec::with_capacity(HEADER + len);
    frame.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(&[0x7, 0, 0, 0, 0, 0]);
    frame.extend_from_slice(&0u32.to_be_bytes()); // last stream id: none processed
    frame.extend_from_slice(&0u32.to_be_bytes()); // NO_ERROR: nothing was processed
    frame.extend_from_slice(debug);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn settings(params: &[(u16, u32)]) -> Vec<u8> {
        let payload: Vec<u8> = params
            .iter()
            .flat_map(|(id, v)| [&id.to_be_bytes()[..], &v.to_be_bytes()[..]].concat())
            .collect();
        frame(FRAME_SETTINGS, 0, 0, &payload)
    }

    fn ack() -> Vec<u8> {
        frame(FRAME_SETTINGS, FLAG_ACK, 0, &[])
    }

    fn headers(stream: u32) -> Vec<u8> {
        frame(0x1, 0x4, stream, b"\x82\x86\x84")
    }

    fn data(stream: u32, len: usize) -> Vec<u8> {
        frame(FRAME_DATA, 0, stream, &vec![7; len])
    }

    /// What grpc-go sends: magic, SETTINGS, WINDOW_UPDATE, then (after ours) the ACK and a call.
    fn client_stream() -> (Vec<u8>, Vec<u8>) {
        let before = [
            CLIENT_MAGIC.to_vec(),
            settings(&[(0x2, 0), (0x4, 4_194_304)]),
            frame(0x8, 0, 0, &4_128_769u32.to_be_bytes()),
        ]
        .concat();
        let after = [headers(1), data(1, 100)].concat();
        let all = [before.clone(), ack(), after.clone()].concat();
        (all, [before, after].concat())
    }

    #[test]
    fn the_one_acknowledgement_is_removed_and_everything_else_kept_in_order() {
        let (stream, expected) = client_stream();
        let mut held = Held::new(DEFAULT_LIMIT);
        held.push(&stream).unwrap();
        assert!(held.acknowledged());
        assert_eq!(held.into_replay(), expected);
    }

    #[test]
    fn bytes_split_anywhere_give_the_same_replay() {
        let (stream, expected) = client_stream();
        for cut in 0..stream.len() {
            for second in cut..stream.len() {
                let mut held = Held::new(DEFAULT_LIMIT);
                held.push(&stream[..cut]).unwrap();
                held.push(&stream[cut..second]).unwrap();
                held.push(&stream[second..]).unwrap();
                assert!(held.acknowledged(), "cuts at {cut} and {second}");
                assert_eq!(held.into_replay(), expected, "cuts at {cut} and {second}");
            }
        }
    }

    #[test]
    fn a_second_acknowledgement_answers_the_backend_and_is_kept() {
        let (stream, expected) = client_stream();
        let mut held = Held::new(DEFAULT_LIMIT);
        held.push(&stream).unwrap();
        held.push(&ack()).unwrap();
        assert_eq!(held.into_replay(), [expected, ack()].concat());
    }

    #[test]
    fn a_client_that_has_not_acknowledged_yet_says_so() {
        let mut held = Held::new(DEFAULT_LIMIT);
        held.push(CLIENT_MAGIC).unwrap();
        held.push(&settings(&[])).unwrap();
        assert!(!held.acknowledged());
        held.push(&ack()[..4]).unwrap();
        assert!(!held.acknowledged());
        held.push(&ack()[4..]).unwrap();
        assert!(held.acknowledged());
    }

    #[test]
    fn malformed_streams_fall_back_with_their_reason() {
        let start = [CLIENT_MAGIC.to_vec(), settings(&[])].concat();
        let cases: Vec<(Vec<u8>, Fallback)> = vec![
            (b"GET / HTTP/1.1\r\n".to_vec(), Fallback::BadMagic),
            (b"PRI * HTTP/1.1".to_vec(), Fallback::BadMagic),
            (
                [CLIENT_MAGIC.to_vec(), headers(1)].concat(),
                Fallback::NoSettings,
            ),
            (
                [CLIENT_MAGIC.to_vec(), ack()].concat(),
                Fallback::NoSettings,
            ),
            (
                [start.clone(), data(1, MAX_FRAME + 1)].concat(),
                Fallback::FrameTooLarge,
            ),
            (
                [start.clone(), frame(FRAME_SETTINGS, FLAG_ACK, 0, &[0; 6])].concat(),
                Fallback::BadSettings,
            ),
            (
                [start.clone(), frame(FRAME_SETTINGS, 0, 1, &[])].concat(),
                Fallback::BadSettings,
            ),
            (
                [start.clone(), frame(FRAME_SETTINGS, 0, 0, &[0; 5])].concat(),
                Fallback::BadSettings,
            ),
            (
                [
                    start.clone(),
                    ack(),
                    headers(1),
                    data(1, 16_384).repeat(4),
                    data(1, 10),
                ]
                .concat(),
                Fallback::FlowControl,
            ),
        ];
        for (bytes, expected) in cases {
            let mut held = Held::new(DEFAULT_LIMIT);
            assert_eq!(held.push(&bytes), Err(expected), "{bytes:?}");
        }
    }

    #[test]
    fn the_whole_window_fits_and_a_full_buffer_stops_reading() {
        let window = [
            CLIENT_MAGIC.to_vec(),
            settings(&[]),
            ack(),
            headers(1),
            data(1, 16_384).repeat(3),
            data(1, 16_383),
        ]
        .concat();
        let mut held = Held::new(DEFAULT_LIMIT);
        held.push(&window).unwrap();
        assert!(held.acknowledged());
        let mut small = Held::new(0);
        let filler = [CLIENT_MAGIC.to_vec(), settings(&[]), headers(1)].concat();
        small.push(&filler).unwrap();
        let rest = vec![0u8; small.room()];
        // Bytes that complete no frame still fill the buffer: reading must stop.
        assert_eq!(
            small.push(&[&headers(3)[..], &rest[..]].concat()),
            Err(Fallback::BufferFull)
        );
        assert_eq!(small.room(), 0);
    }

    #[test]
    fn goaway_is_a_well_formed_frame() {
        let f = goaway("wake_timeout");
        assert_eq!(f.len(), 9 + 8 + 12);
        assert_eq!(&f[..3], &[0, 0, 20]);
        assert_eq!(f[3], 0x7);
        assert_eq!(&f[9..17], &[0; 8]);
        assert_eq!(&f[17..], b"wake_timeout");
    }
}
