//! Primitive AMQP wire types: the reader over a frame payload and the writers for strings and
//! frames. Integers are big-endian (network order) throughout.
//!
//! The reader owns a `Bytes` and hands out strings as `Bytes` slices of it (`split_to` is a
//! reference-count increment), so decoding copies no string data.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ferry_core::message::ShortString;

use super::constants::FRAME_END;
use super::error::{EncodeError, SyntaxError};

/// A cursor over a method or content-header payload. Every read names the field it reads so a
/// truncation error says where the payload ended.
#[derive(Debug)]
pub(crate) struct Reader {
    buf: Bytes,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Reader {
        Reader { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Fails if any byte is left: every AMQP payload is read to its end.
    pub(crate) fn finish(&self) -> Result<(), SyntaxError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(SyntaxError::TrailingBytes(n)),
        }
    }

    #[inline]
    fn need(&self, n: usize, field: &'static str) -> Result<(), SyntaxError> {
        if self.buf.len() < n {
            Err(SyntaxError::Truncated(field))
        } else {
            Ok(())
        }
    }

    #[inline]
    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, SyntaxError> {
        self.need(1, field)?;
        Ok(self.buf.get_u8())
    }

    #[inline]
    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, SyntaxError> {
        self.need(2, field)?;
        Ok(self.buf.get_u16())
    }

    #[inline]
    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, SyntaxError> {
        self.need(4, field)?;
        Ok(self.buf.get_u32())
    }

    #[inline]
    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, SyntaxError> {
        self.need(8, field)?;
        Ok(self.buf.get_u64())
    }

    /// The next `n` bytes as a slice of the payload (no copy).
    #[inline]
    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<Bytes, SyntaxError> {
        self.need(n, field)?;
        Ok(self.buf.split_to(n))
    }

    /// `shortstr`: one length octet, then the bytes.
    #[inline]
    pub(crate) fn short_str(&mut self, field: &'static str) -> Result<ShortString, SyntaxError> {
        let len = self.u8(field)? as usize;
        Ok(ShortString::from_bytes(self.take(len, field)?))
    }

    /// `longstr`: a 32-bit length, then the bytes.
    #[inline]
    pub(crate) fn long_str(&mut self, field: &'static str) -> Result<Bytes, SyntaxError> {
        let len = self.u32(field)? as usize;
        self.take(len, field)
    }
}

/// Writes a `shortstr`; more than 255 bytes is an error (nothing is written then).
#[inline]
pub(crate) fn put_short_str(out: &mut BytesMut, s: &[u8], field: &'static str) -> Result<(), EncodeError> {
    let len = u8::try_from(s.len()).map_err(|_| EncodeError::ShortStringTooLong { field, len: s.len() })?;
    out.put_u8(len);
    out.put_slice(s);
    Ok(())
}

/// Writes a `longstr` (also used for the byte array field value `x`).
#[inline]
pub(crate) fn put_long_str(out: &mut BytesMut, s: &[u8], field: &'static str) -> Result<(), EncodeError> {
    out.put_u32(long_len(s.len(), field)?);
    out.put_slice(s);
    Ok(())
}

pub(crate) fn long_len(len: usize, field: &'static str) -> Result<u32, EncodeError> {
    u32::try_from(len).map_err(|_| EncodeError::TooLong { field, len })
}

/// Reserves a 32-bit length in `out` and returns where it is, for [`patch_len`]: tables and
/// arrays are written first and measured after, which saves a sizing pass over nested values.
#[inline]
pub(crate) fn reserve_len(out: &mut BytesMut) -> usize {
    let at = out.len();
    out.put_u32(0);
    at
}

/// Fills in the length reserved at `at` with the number of bytes written since.
#[inline]
pub(crate) fn patch_len(out: &mut BytesMut, at: usize, field: &'static str) -> Result<(), EncodeError> {
    let len = long_len(out.len() - at - 4, field)?;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Starts a frame (type, channel, a size to patch) and returns the frame's start offset.
#[inline]
pub(crate) fn begin_frame(out: &mut BytesMut, frame_type: u8, channel: u16) -> usize {
    let start = out.len();
    out.put_u8(frame_type);
    out.put_u16(channel);
    out.put_u32(0);
    start
}

/// Patches the payload size of the frame begun at `start` and writes the frame-end octet.
#[inline]
pub(crate) fn end_frame(out: &mut BytesMut, start: usize) -> Result<(), EncodeError> {
    patch_len(out, start + 3, "frame payload")?;
    out.put_u8(FRAME_END);
    Ok(())
}
