//! Variable Byte Integer (MQTT 3.1.1 §2.2.3 "Remaining Length", 5.0 §1.5.5): 7 bits per byte,
//! least significant group first, at most 4 bytes, so at most 268,435,455.

use super::encode::Out;

/// The largest value a Variable Byte Integer can hold (4 bytes of 7 bits).
pub const VARINT_MAX: u32 = 268_435_455;

/// Result of reading a varint from the front of a byte slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Varint {
    /// The value and how many bytes it took.
    Done(u32, usize),
    /// The slice ends before the last byte (every byte seen so far had the continuation bit).
    Incomplete,
    /// A fifth byte would be needed: malformed by both specs.
    TooLong,
}

/// Reads a varint from the start of `buf` without consuming anything.
#[inline]
pub(crate) fn read_varint(buf: &[u8]) -> Varint {
    let mut value: u32 = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(i) else {
            return Varint::Incomplete;
        };
        value |= u32::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Varint::Done(value, i + 1);
        }
    }
    Varint::TooLong
}

/// How many bytes `write_varint(v)` writes.
#[inline]
pub(crate) const fn varint_len(v: usize) -> usize {
    if v < 128 {
        1
    } else if v < 16_384 {
        2
    } else if v < 2_097_152 {
        3
    } else {
        4
    }
}

/// Appends `v` as a varint. Values above [`VARINT_MAX`] are the caller's bug; they are
/// truncated to 4 bytes rather than producing a fifth byte.
#[inline]
pub(crate) fn write_varint(out: &mut impl Out, v: usize) {
    let mut v = v;
    for _ in 0..4 {
        let mut byte = (v & 0x7F) as u8;
        v >>= 7;
        if v > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if v == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: usize) -> Vec<u8> {
        let mut out = bytes::BytesMut::new();
        write_varint(&mut out, v);
        out.to_vec()
    }

    #[test]
    fn encodes_the_spec_boundary_values() {
        // The table in 3.1.1 §2.2.3 / 5.0 §1.5.5.
        assert_eq!(enc(0), [0x00]);
        assert_eq!(enc(127), [0x7F]);
        assert_eq!(enc(128), [0x80, 0x01]);
        assert_eq!(enc(16_383), [0xFF, 0x7F]);
        assert_eq!(enc(16_384), [0x80, 0x80, 0x01]);
        assert_eq!(enc(2_097_151), [0xFF, 0xFF, 0x7F]);
        assert_eq!(enc(2_097_152), [0x80, 0x80, 0x80, 0x01]);
        assert_eq!(enc(VARINT_MAX as usize), [0xFF, 0xFF, 0xFF, 0x7F]);
    }

    #[test]
    fn length_matches_encoding_at_boundaries() {
        for v in [0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, VARINT_MAX as usize] {
            assert_eq!(varint_len(v), enc(v).len(), "{v}");
            assert_eq!(read_varint(&enc(v)), Varint::Done(v as u32, enc(v).len()));
        }
    }

    #[test]
    fn a_fifth_continuation_byte_is_too_long() {
        assert_eq!(read_varint(&[0xFF, 0xFF, 0xFF, 0xFF, 0x01]), Varint::TooLong);
        assert_eq!(read_varint(&[0x80, 0x80, 0x80, 0x80]), Varint::TooLong);
    }

    #[test]
    fn a_truncated_varint_is_incomplete() {
        assert_eq!(read_varint(&[]), Varint::Incomplete);
        assert_eq!(read_varint(&[0x80, 0x80, 0x80]), Varint::Incomplete);
    }
}
