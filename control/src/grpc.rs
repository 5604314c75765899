//! The few bytes of gRPC that bkpool speaks itself: the length-prefixed message frame and the
//! `grpc.health.v1` messages. They are hand-encoded: one varint field does not warrant a
//! protobuf toolchain.

use bytes::{BufMut, Bytes, BytesMut};

/// The one method bkpool calls on a backend, and the stand-in answers.
pub(crate) const HEALTH_CHECK_PATH: &str = "/grpc.health.v1.Health/Check";
/// The content type every gRPC request and response carries (possibly with a `+proto` suffix).
pub(crate) const CONTENT_TYPE: &str = "application/grpc";

/// `grpc-status` codes bkpool reads or writes.
pub(crate) const STATUS_OK: u32 = 0;
pub(crate) const STATUS_UNIMPLEMENTED: u32 = 12;

/// `HealthCheckResponse.ServingStatus` values.
pub(crate) const SERVING: u64 = 1;
pub(crate) const NOT_SERVING: u64 = 2;

/// Why a gRPC message body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WireError {
    #[error("gRPC message is truncated")]
    Truncated,
    #[error("gRPC message is compressed, but no compression was negotiated")]
    Compressed,
    #[error("{0} bytes follow the gRPC message")]
    Trailing(usize),
    #[error("protobuf field uses unsupported wire type {0}")]
    WireType(u64),
}

/// One uncompressed message behind the 5-byte gRPC header (flag byte, big-endian length).
pub(crate) fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// The single message of a unary response body.
pub(crate) fn unframe(body: &[u8]) -> Result<&[u8], WireError> {
    let (header, rest) = body.split_at_checked(5).ok_or(WireError::Truncated)?;
    if header[0] != 0 {
        return Err(WireError::Compressed);
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let message = rest.get(..len).ok_or(WireError::Truncated)?;
    match rest.len() - len {
        0 => Ok(message),
        extra => Err(WireError::Trailing(extra)),
    }
}

/// `HealthCheckResponse { status }`: field 1, varint. Zero (UNKNOWN) is the protobuf default
/// and is therefore encoded as nothing.
pub(crate) fn encode_health_response(status: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(11);
    if status != 0 {
        out.push(0x08);
        put_varint(&mut out, status);
    }
    out
}

/// The `status` field of a `HealthCheckResponse`, skipping fields a newer server may add.
pub(crate) fn decode_health_response(mut message: &[u8]) -> Result<u64, WireError> {
    let mut status = 0;
    while !message.is_empty() {
        let key = take_varint(&mut message)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = take_varint(&mut message)?,
            (_, 0) => drop(take_varint(&mut message)?),
            (_, 1) => skip(&mut message, 8)?,
            (_, 2) => {
                let len = take_varint(&mut message)?;
                skip(
                    &mut message,
                    usize::try_from(len).map_err(|_| WireError::Truncated)?,
                )?
            }
            (_, 5) => skip(&mut message, 4)?,
            (_, other) => return Err(WireError::WireType(other)),
        }
    }
    Ok(status)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn take_varint(input: &mut &[u8]) -> Result<u64, WireError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first().ok_or(WireError::Truncated)?;
        *input = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(WireError::Truncated)
}

fn skip(input: &mut &[u8], len: usize) -> Result<(), WireError> {
    *input = input.get(len..).ok_or(WireError::Truncated)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_is_two_bytes_in_a_five_byte_frame() {
        let framed = frame(&encode_health_response(SERVING));
        assert_eq!(&framed[..], &[0, 0, 0, 0, 2, 0x08, 0x01]);
        let message = unframe(&framed).unwrap();
        assert_eq!(decode_health_response(message), Ok(SERVING));
    }

    #[test]
    fn unknown_status_is_the_empty_message() {
        assert!(encode_health_response(0).is_empty());
        assert_eq!(decode_health_response(&[]), Ok(0));
    }

    #[test]
    fn fields_a_newer_server_adds_are_skipped() {
        // field 2 string "ab", field 3 fixed32, then status NOT_SERVING, then field 4 fixed64.
        let mut message = vec![0x12, 2, b'a', b'b', 0x1d, 1, 2, 3, 4, 0x08, 0x02, 0x21];
        message.extend_from_slice(&[0; 8]);
        assert_eq!(decode_health_response(&message), Ok(NOT_SERVING));
    }

    #[test]
    fn broken_messages_are_refused_not_guessed() {
        assert_eq!(unframe(&[0, 0, 0]), Err(WireError::Truncated));
        assert_eq!(unframe(&[0, 0, 0, 0, 3, 8, 1]), Err(WireError::Truncated));
        assert_eq!(unframe(&[1, 0, 0, 0, 0]), Err(WireError::Compressed));
        assert_eq!(unframe(&[0, 0, 0, 0, 0, 9]), Err(WireError::Trailing(1)));
        assert_eq!(decode_health_response(&[0x08]), Err(WireError::Truncated));
        assert_eq!(
            decode_health_response(&[0x08, 0x80]),
            Err(WireError::Truncated)
        );
        assert_eq!(decode_health_response(&[0x0b]), Err(WireError::WireType(3)));
        assert_eq!(
            decode_health_response(&[0x12, 5, 1]),
            Err(WireError::Truncated)
        );
    }
}
