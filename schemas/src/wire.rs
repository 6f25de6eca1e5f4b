//! The Confluent wire format: magic byte `0`, a 4-byte big-endian schema id, then the Avro body.

use crate::{Error, Result};

/// The first byte of every framed record.
pub const MAGIC_BYTE: u8 = 0;
/// Bytes before the Avro body: the magic byte and the schema id.
pub const HEADER_LEN: usize = 5;

/// Prefixes `body` with the wire-format header for `schema_id`.
pub fn frame(schema_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    write_header(schema_id, &mut out);
    out.extend_from_slice(body);
    out
}

/// Appends the wire-format header to `out`.
pub fn write_header(schema_id: u32, out: &mut Vec<u8>) {
    out.push(MAGIC_BYTE);
    out.extend_from_slice(&schema_id.to_be_bytes());
}

/// Splits a framed record into its schema id and Avro body.
pub fn unframe(bytes: &[u8]) -> Result<(u32, &[u8])> {
    if bytes.len() < HEADER_LEN {
        return Err(Error::Wire(format!(
            "record is {} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    if bytes[0] != MAGIC_BYTE {
        return Err(Error::Wire(format!(
            "magic byte is {}, expected {MAGIC_BYTE}",
            bytes[0]
        )));
    }
    let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    Ok((id, &bytes[HEADER_LEN..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_and_unframe_round_trip() {
        let framed = frame(258, b"avro");
        assert_eq!(framed, vec![0, 0, 0, 1, 2, b'a', b'v', b'r', b'o']);
        let (id, body) = unframe(&framed).unwrap();
        assert_eq!(id, 258);
        assert_eq!(body, b"avro");
    }

    #[test]
    fn rejects_short_and_foreign_bytes() {
        assert!(unframe(b"").is_err());
        assert!(unframe(&[0, 0, 1]).is_err());
        assert!(unframe(b"{\"json\": true}").is_err());
    }
}
