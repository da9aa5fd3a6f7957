//! The MQTT codec: pure functions over `BytesMut`, no tokio (see `Decoder` and `encode`).
pub mod packet;

pub use packet::*;
