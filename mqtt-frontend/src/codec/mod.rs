//! The MQTT codec: pure functions over `BytesMut`, no tokio (see `Decoder` and `encode`).
//!
//! Layout: `packet` holds the values; `decode` checks the fixed header and parses packets with
//! the help of `reader` (bounds-checked, zero-copy cursor), `properties` (5.0 properties and the
//! rules of which packet may carry which) and `varint`; `encode` writes packets back.
//! `error` maps every decoding failure to one 5.0 reason code.
mod decode;
mod encode;
mod error;
pub mod packet;
mod properties;
mod reader;
mod varint;

#[cfg(test)]
mod tests;

pub use decode::Decoder;
pub use encode::{encode, encoded_len, Out};
pub use error::DecodeError;
pub use packet::*;
pub use varint::VARINT_MAX;
