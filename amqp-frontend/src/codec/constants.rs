//! Protocol constants. Frame constants and reply codes are generated from the spec's
//! `constants` by `build.rs`.

include!(concat!(env!("OUT_DIR"), "/constants.rs"));

/// The protocol header a 0-9-1 client sends first, and the server answers with when it refuses
/// the client's (`AMQP`, 0, 0-9-1).
pub const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";

/// The basic class: the only one with content (properties, body).
pub const BASIC_CLASS_ID: u16 = 60;

/// Bytes a frame adds around its payload: type (1), channel (2), size (4), frame-end (1).
pub const FRAME_OVERHEAD: u32 = 8;
