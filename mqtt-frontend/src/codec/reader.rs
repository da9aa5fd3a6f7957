//! A bounds-checked cursor over one packet's bytes. Every read past the end is a malformed
//! packet; strings and binary data are returned as slices of the packet's `Bytes` (no copy).

use bytes::Bytes;

use super::error::{malformed, DecodeError};
use super::packet::Str;
use super::varint::{read_varint, Varint};

#[derive(Debug)]
pub(crate) struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    /// A reader over `data[start..]`.
    pub(crate) fn new(data: &'a Bytes, start: usize) -> Reader<'a> {
        Reader { data, pos: start, end: data.len() }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.end - self.pos
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos == self.end
    }

    fn need(&self, n: usize, what: &str) -> Result<(), DecodeError> {
        if self.remaining() < n {
            return Err(malformed(format!("{what}: {n} bytes needed, {} left", self.remaining())));
        }
        Ok(())
    }

    pub(crate) fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        let v = self.data[self.pos];
        self.pos += 1;
        Ok(v)
    }

    pub(crate) fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        self.need(2, what)?;
        let v = u16::from_be_bytes([self.data[self.pos], self.data[self.pos + 1]]);
        self.pos += 2;
        Ok(v)
    }

    pub(crate) fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        let d = &self.data[self.pos..self.pos + 4];
        self.pos += 4;
        Ok(u32::from_be_bytes([d[0], d[1], d[2], d[3]]))
    }

    pub(crate) fn varint(&mut self, what: &str) -> Result<u32, DecodeError> {
        match read_varint(&self.data[self.pos..self.end]) {
            Varint::Done(v, n) => {
                self.pos += n;
                Ok(v)
            }
            Varint::Incomplete => Err(malformed(format!("{what}: truncated variable byte integer"))),
            Varint::TooLong => Err(malformed(format!("{what}: variable byte integer longer than 4 bytes"))),
        }
    }

    pub(crate) fn take(&mut self, n: usize, what: &str) -> Result<Bytes, DecodeError> {
        self.need(n, what)?;
        let b = self.data.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }

    /// Binary Data: two-byte length, then that many bytes.
    pub(crate) fn binary(&mut self, what: &str) -> Result<Bytes, DecodeError> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }

    /// UTF-8 Encoded String: well-formed UTF-8 (no surrogates, which `from_utf8` refuses) and no
    /// U+0000 (3.1.1 §1.5.3, 5.0 §1.5.4).
    pub(crate) fn string(&mut self, what: &str) -> Result<Str, DecodeError> {
        let b = self.binary(what)?;
        let s = Str::from_utf8(b).ok_or_else(|| malformed(format!("{what}: invalid UTF-8")))?;
        if s.bytes().contains(&0) {
            return Err(malformed(format!("{what}: contains U+0000")));
        }
        Ok(s)
    }

    /// Where the next read starts, from the start of the data.
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    /// Everything up to the end.
    pub(crate) fn rest(&mut self) -> Bytes {
        let b = self.data.slice(self.pos..self.end);
        self.pos = self.end;
        b
    }

    /// Splits off the next `n` bytes as a reader of their own and skips them here.
    pub(crate) fn sub(&mut self, n: usize, what: &str) -> Result<Reader<'a>, DecodeError> {
        self.need(n, what)?;
        let sub = Reader { data: self.data, pos: self.pos, end: self.pos + n };
        self.pos += n;
        Ok(sub)
    }

    /// Trailing bytes after a packet's content make it malformed.
    pub(crate) fn finish(&self, what: &str) -> Result<(), DecodeError> {
        if !self.is_empty() {
            return Err(malformed(format!("{} unexpected trailing bytes in {what}", self.remaining())));
        }
        Ok(())
    }
}
