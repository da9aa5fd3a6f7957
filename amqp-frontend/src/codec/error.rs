//! Every error the codec can report, and the AMQP reply code each one closes the connection with.
//!
//! This file is the one place where codec errors map to reply codes (CONVENTIONS.md, "Errors"),
//! so the mapping reads as a table:
//!
//! | error | reply code |
//! | --- | --- |
//! | [`FrameError`] (every variant) | 501 FRAME_ERROR |
//! | [`MethodError::Unknown`] | 503 COMMAND_INVALID |
//! | [`MethodError::NoMethodId`], [`MethodError::Syntax`] | 502 SYNTAX_ERROR |
//! | [`HeaderError::WrongClass`] | 501 FRAME_ERROR |
//! | [`HeaderError::Syntax`] | 502 SYNTAX_ERROR |
//!
//! All of them are connection errors (hard errors in the spec's words): the peer has sent bytes
//! that cannot be read, so nothing that follows on the connection can be trusted.
//!
//! [`EncodeError`] is ours, not the peer's: a value that has no AMQP wire form (a short string
//! longer than 255 bytes, typically a routing key that came from MQTT).

use ferry_core::message::ShortString;
use thiserror::Error;

use super::constants::reply_code;

/// An error in the frame layer: the 7-byte frame header or the frame-end octet.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// A frame type other than METHOD (1), HEADER (2), BODY (3) or HEARTBEAT (8).
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// Payload + 8 exceeds the negotiated frame max; detected from the frame header, before the
    /// payload is buffered.
    #[error("frame size {size} larger than negotiated maximum {max}")]
    TooLarge { size: u64, max: u32 },
    /// The octet after the payload is not 0xCE.
    #[error("frame end byte {0:#04x}, expected 0xce")]
    BadFrameEnd(u8),
    /// Heartbeats belong to the connection (channel 0) only.
    #[error("heartbeat frame on channel {0}")]
    HeartbeatOnChannel(u16),
    /// A heartbeat frame has an empty payload.
    #[error("heartbeat frame with a {0}-byte payload")]
    HeartbeatPayload(u32),
}

impl FrameError {
    pub fn reply_code(&self) -> u16 {
        reply_code::FRAME_ERROR
    }
    /// Text for connection.close's reply-text, RabbitMQ style: `"FRAME_ERROR - <detail>"`.
    pub fn reply_text(&self) -> ShortString {
        reply_text(self.reply_code(), self)
    }
}

/// A malformed value inside a method's arguments or a content header. Always 502 SYNTAX_ERROR
/// once wrapped in [`MethodError`] or [`HeaderError`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SyntaxError {
    /// The payload ends inside `field`.
    #[error("payload ends inside {0}")]
    Truncated(&'static str),
    /// Bytes left over after the last argument.
    #[error("{0} unexpected bytes after the last field")]
    TrailingBytes(usize),
    /// A field value type tag that is not one of `t b B s u I i l L f d D S x A T F V`.
    #[error("unknown field value type {tag:?} ({code:#04x})", tag = char::from(*.0), code = .0)]
    UnknownFieldType(u8),
    /// Field tables and arrays nested deeper than [`MAX_NESTING`](super::table::MAX_NESTING).
    #[error("field tables nested deeper than {}", super::table::MAX_NESTING)]
    TooDeep,
    /// A field table with more than [`MAX_TABLE_ENTRIES`](super::table::MAX_TABLE_ENTRIES) entries.
    #[error("field table with more than {} entries", super::table::MAX_TABLE_ENTRIES)]
    TooManyEntries,
    /// Content header flags beyond the 14 basic properties: the continuation bit (bit 0) or the
    /// unused bit 1. RabbitMQ defines no property past cluster-id and refuses these too.
    #[error("property flags {0:#06x} set undefined bits (continuation or reserved)")]
    UndefinedPropertyFlags(u16),
    /// delivery-mode other than 1 (transient) or 2 (persistent); RabbitMQ refuses these as well
    /// (`delivery_mode_unknown`).
    #[error("delivery-mode {0}, expected 1 or 2")]
    BadDeliveryMode(u8),
}

/// An error decoding a method frame's payload.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MethodError {
    /// No method with these ids in AMQP 0-9-1 (with RabbitMQ's extensions).
    #[error("unknown method {class_id}.{method_id}")]
    Unknown { class_id: u16, method_id: u16 },
    /// The method frame's payload is shorter than the 4 bytes of class and method id.
    #[error("method frame payload of {0} bytes has no class and method id")]
    NoMethodId(usize),
    /// The arguments of a known method could not be read.
    #[error("{method}: {error}")]
    Syntax { method: &'static str, error: SyntaxError },
}

impl MethodError {
    pub fn reply_code(&self) -> u16 {
        match self {
            MethodError::Unknown { .. } => reply_code::COMMAND_INVALID,
            MethodError::NoMethodId(_) | MethodError::Syntax { .. } => reply_code::SYNTAX_ERROR,
        }
    }
    /// Text for connection.close's reply-text: `"COMMAND_INVALID - unknown method 60.99"`.
    pub fn reply_text(&self) -> ShortString {
        reply_text(self.reply_code(), self)
    }
}

/// An error decoding a content header frame's payload.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HeaderError {
    /// A content header for a class that has no content (only basic, 60, has). The spec
    /// (0-9-1 §4.2.6.1) asks for a 501 frame error on an invalid class-id.
    #[error("content header for class {0}, which has no content")]
    WrongClass(u16),
    #[error("content header: {0}")]
    Syntax(#[from] SyntaxError),
}

impl HeaderError {
    pub fn reply_code(&self) -> u16 {
        match self {
            HeaderError::WrongClass(_) => reply_code::FRAME_ERROR,
            HeaderError::Syntax(_) => reply_code::SYNTAX_ERROR,
        }
    }
    /// Text for connection.close's reply-text: `"SYNTAX_ERROR - content header: ..."`.
    pub fn reply_text(&self) -> ShortString {
        reply_text(self.reply_code(), self)
    }
}

/// A value that has no AMQP wire form. On this error the output buffer is left as it was before
/// the call.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// A shortstr is at most 255 bytes on the wire; truncating a routing key or consumer tag
    /// silently would deliver to the wrong place, so it is an error.
    #[error("{field}: short string of {len} bytes, at most 255 fit")]
    ShortStringTooLong { field: &'static str, len: usize },
    /// A longstr, table or array of 4 GiB or more.
    #[error("{field}: {len} bytes do not fit a 32-bit length")]
    TooLong { field: &'static str, len: usize },
}

/// `"CODE_NAME - detail"`, cut to the 255 bytes a shortstr holds (at a char boundary).
fn reply_text(code: u16, detail: &dyn std::fmt::Display) -> ShortString {
    let mut text = format!("{} - {detail}", reply_code::name(code).unwrap_or("ERROR"));
    if text.len() > ShortString::MAX_LEN {
        let mut end = ShortString::MAX_LEN;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    ShortString::from(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_text_is_rabbitmq_style() {
        assert_eq!(FrameError::BadFrameEnd(0).reply_text(), "FRAME_ERROR - frame end byte 0x00, expected 0xce");
        let e = MethodError::Unknown { class_id: 60, method_id: 99 };
        assert_eq!(e.reply_code(), 503);
        assert_eq!(e.reply_text(), "COMMAND_INVALID - unknown method 60.99");
        let e = MethodError::Syntax { method: "basic.publish", error: SyntaxError::Truncated("routing-key") };
        assert_eq!(e.reply_code(), 502);
        assert_eq!(e.reply_text(), "SYNTAX_ERROR - basic.publish: payload ends inside routing-key");
        assert_eq!(HeaderError::WrongClass(10).reply_code(), 501);
    }

    #[test]
    fn reply_text_fits_a_short_string_at_a_char_boundary() {
        let detail = "é".repeat(300);
        let t = reply_text(502, &detail);
        assert!(t.len() <= 255);
        assert!(t.as_str().is_some());
    }
}
