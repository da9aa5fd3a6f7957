//! The codec's one error type; [`crate::errors`] maps it to MQTT 5.0 reason codes.

use ferry_core::size::ByteSize;

/// Why a packet could not be decoded. After any error the connection must be closed (with a
/// DISCONNECT or CONNACK carrying [`DecodeError::reason_code`] in 5.0); the decoder's buffer is
/// left in an unspecified state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Declared size above the limit; detected from the fixed header BEFORE buffering the body.
    #[error("packet of {} exceeds the maximum packet size of {}", ByteSize(*size as u64).exact(), ByteSize(u64::from(*max)))]
    TooLarge { size: usize, max: u32 },
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    /// CONNECT with a protocol name/level we do not speak (e.g. "MQIsdp" level 3, or level 6).
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol { name: String, level: u8 },
    /// PUBLISH topic name with wildcards / U+0000 / empty without alias, or a will topic with
    /// wildcards or empty.
    #[error("invalid topic name: {0}")]
    TopicNameInvalid(String),
}

impl DecodeError {
    /// The MQTT 5.0 reason code to send in the CONNACK or DISCONNECT that closes the connection
    /// (chosen by [`crate::errors`]' table).
    pub fn reason_code(&self) -> u8 {
        crate::errors::MqttError::from(self).reason()
    }
}

pub(crate) fn malformed(msg: impl Into<String>) -> DecodeError {
    DecodeError::Malformed(msg.into())
}

pub(crate) fn protocol(msg: impl Into<String>) -> DecodeError {
    DecodeError::Protocol(msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_codes_follow_the_mqtt5_table() {
        assert_eq!(DecodeError::TooLarge { size: 10, max: 5 }.reason_code(), 0x95);
        assert_eq!(malformed("x").reason_code(), 0x81);
        assert_eq!(protocol("x").reason_code(), 0x82);
        assert_eq!(DecodeError::UnsupportedProtocol { name: "MQIsdp".into(), level: 3 }.reason_code(), 0x84);
        assert_eq!(DecodeError::TopicNameInvalid("a/+".into()).reason_code(), 0x90);
    }

    #[test]
    fn a_packet_too_large_is_described_in_readable_sizes() {
        let e = DecodeError::TooLarge { size: 2_097_152, max: 131_072 };
        assert_eq!(e.to_string(), "packet of 2 MiB (2097152 bytes) exceeds the maximum packet size of 128 KiB");
    }
}
