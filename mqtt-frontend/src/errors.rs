//! Why the MQTT session and driver refuse or close, and the one table ([`MqttError::codes`]) that
//! says what each reason is on the wire: its MQTT 5.0 reason code, and what 3.1.1 / 3.1 send
//! instead (a CONNACK return code, a SUBACK failure, or nothing: the connection closes).
//!
//! The wire values themselves are the codec's [`reason`] and [`return_code`] constants; this table
//! only chooses among them. Success and informational codes (0x00, 0x10 No matching subscribers,
//! 0x11 No subscription existed) are not refusals and stay where they are sent.
//!
//! | refused or closed for | 5.0 | 3.1.1 / 3.1 |
//! |---|---|---|
//! | `MalformedPacket` | 0x81 DISCONNECT | close |
//! | `ProtocolError`, `TopicTooDeep` | 0x82 DISCONNECT | close |
//! | `UnsupportedProtocolVersion` | 0x84 CONNACK | CONNACK 1 |
//! | `ClientIdentifierNotValid` | 0x85 CONNACK | CONNACK 2 |
//! | `BadUserNameOrPassword` | 0x86 CONNACK | CONNACK 4 |
//! | `NotAuthorized` | 0x87 CONNACK | CONNACK 5 |
//! | `ServerUnavailable` | 0x88 CONNACK | CONNACK 3 |
//! | `ServerBusy` | 0x89 CONNACK | CONNACK 3 |
//! | `ConnectionLimit` | 0x97 CONNACK | CONNACK 3 |
//! | `ConnectionRateExceeded` | 0x9F CONNACK | CONNACK 3 |
//! | `BadAuthenticationMethod` | 0x8C CONNACK | close |
//! | `WillTopicInvalid` | 0x90 CONNACK | close |
//! | `TopicNameInvalid` | 0x90 DISCONNECT | close |
//! | `ReceiveMaximumExceeded` | 0x93 DISCONNECT | close |
//! | `TopicAliasInvalid` | 0x94 DISCONNECT | close |
//! | `PacketTooLarge` | 0x95 DISCONNECT | close |
//! | `KeepAliveTimeout` | 0x8D DISCONNECT | close |
//! | `SessionTakenOver` | 0x8E DISCONNECT | close |
//! | `ServerShuttingDown` | 0x8B DISCONNECT | close |
//! | `AdministrativeAction` | 0x98 DISCONNECT | close |
//! | `StoreFailed` | 0x83 PUBACK / PUBREC | close |
//! | `PublishNotAuthorized` | 0x87 PUBACK / PUBREC | acknowledged (0x00) |
//! | `PublishQuotaExceeded` | 0x97 PUBACK / PUBREC | acknowledged (0x97 kept, not sent) |
//! | `PacketIdentifierNotFound` | 0x92 PUBREL | nothing |
//! | `SubscribeNotAuthorized` | 0x87 SUBACK | SUBACK 0x80 |
//! | `SubscriptionQuotaExceeded` | 0x97 SUBACK | SUBACK 0x80 |
//! | `SharedFilterInvalid` | 0x8F SUBACK | SUBACK 0x80 |
//! | `SubscribeFailed` | 0x83 SUBACK | SUBACK 0x80 |
//! | `SubscribeRefusedIn31` | (0x80) | close: 3.1 has no SUBACK failure |

use crate::codec::{reason, return_code, DecodeError, ProtocolVersion};
use crate::session::Close;

/// What the session or the driver refuses a packet for, or closes the connection for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MqttError {
    #[error("malformed packet")]
    MalformedPacket,
    #[error("protocol error")]
    ProtocolError,
    /// A topic deeper than [`crate::topic::MAX_LEVELS`].
    #[error("topic too deep")]
    TopicTooDeep,
    #[error("unsupported protocol version")]
    UnsupportedProtocolVersion,
    #[error("client identifier not valid")]
    ClientIdentifierNotValid,
    #[error("bad user name or password")]
    BadUserNameOrPassword,
    /// A login not allowed, or a will topic the ACL does not let the client publish to.
    #[error("not authorized")]
    NotAuthorized,
    /// The session could not start (the store, say).
    #[error("server unavailable")]
    ServerUnavailable,
    /// The login check did not answer in time.
    #[error("server busy")]
    ServerBusy,
    /// Over the listener's or the broker's connection limit.
    #[error("connection limit reached")]
    ConnectionLimit,
    /// The address failed to log in too often.
    #[error("connection rate exceeded")]
    ConnectionRateExceeded,
    #[error("bad authentication method")]
    BadAuthenticationMethod,
    #[error("will topic invalid")]
    WillTopicInvalid,
    #[error("topic name invalid")]
    TopicNameInvalid,
    #[error("receive maximum exceeded")]
    ReceiveMaximumExceeded,
    #[error("topic alias invalid")]
    TopicAliasInvalid,
    #[error("packet too large")]
    PacketTooLarge,
    #[error("keep alive timeout")]
    KeepAliveTimeout,
    #[error("session taken over")]
    SessionTakenOver,
    #[error("server shutting down")]
    ServerShuttingDown,
    /// Closed from outside (management, `ferry ctl`) through the core's connection registry.
    #[error("administrative action")]
    AdministrativeAction,
    /// A publish could not be stored.
    #[error("a publish could not be stored")]
    StoreFailed,
    /// A publish the ACL refuses (or to `$SYS/`).
    #[error("publish not authorized")]
    PublishNotAuthorized,
    /// A publish a queue refused (reject-publish), or refused under the disk alarm.
    #[error("publish quota exceeded")]
    PublishQuotaExceeded,
    /// A PUBREC for a packet id not in flight.
    #[error("packet identifier not found")]
    PacketIdentifierNotFound,
    #[error("subscribe not authorized")]
    SubscribeNotAuthorized,
    /// Over `max_subscriptions_per_client` or `max_subscriptions_per_packet`.
    #[error("subscription quota exceeded")]
    SubscriptionQuotaExceeded,
    /// A `$share/` filter without a group or a filter.
    #[error("shared subscription filter invalid")]
    SharedFilterInvalid,
    /// The core refused the subscription's binding or queue.
    #[error("subscribe failed")]
    SubscribeFailed,
    /// A refused filter in a 3.1 SUBACK.
    #[error("a topic filter was refused and MQTT 3.1 cannot say so in its SUBACK")]
    SubscribeRefusedIn31,
}

/// What 3.1.1 and 3.1 do where 5.0 sends a reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Legacy {
    /// This code in the answering packet: a CONNACK return code (3.1.1 §3.2.2.3) or SUBACK's
    /// failure 0x80 (3.1.1 §3.9.3). A 3.1.1 PUBACK / PUBREC carries no code: there the value
    /// only steers the session (below 0x80, a QoS 2 packet id is taken).
    Code(u8),
    /// The connection closes without a packet: 3.1.1 has no server DISCONNECT.
    Close,
    /// Nothing is sent.
    Nothing,
}

impl MqttError {
    /// The table: the 5.0 reason code and the 3.1.1 / 3.1 equivalent.
    pub const fn codes(self) -> (u8, Legacy) {
        use Legacy::{Close, Code, Nothing};
        use MqttError::*;
        match self {
            MalformedPacket => (reason::MALFORMED_PACKET, Close),
            ProtocolError => (reason::PROTOCOL_ERROR, Close),
            // Mosquitto closes with 0x82 past its limit of 200 levels.
            TopicTooDeep => (reason::PROTOCOL_ERROR, Close),
            // 3.1.1 §3.1.2.2 / 5.0 §3.1.2.2: answered in the 3.1.1 form, which both understand.
            UnsupportedProtocolVersion => {
                (reason::UNSUPPORTED_PROTOCOL_VERSION, Code(return_code::UNACCEPTABLE_PROTOCOL_VERSION))
            }
            ClientIdentifierNotValid => (reason::CLIENT_IDENTIFIER_NOT_VALID, Code(return_code::IDENTIFIER_REJECTED)),
            BadUserNameOrPassword => (reason::BAD_USER_NAME_OR_PASSWORD, Code(return_code::BAD_USER_NAME_OR_PASSWORD)),
            NotAuthorized => (reason::NOT_AUTHORIZED, Code(return_code::NOT_AUTHORIZED)),
            ServerUnavailable => (reason::SERVER_UNAVAILABLE, Code(return_code::SERVER_UNAVAILABLE)),
            ServerBusy => (reason::SERVER_BUSY, Code(return_code::SERVER_UNAVAILABLE)),
            // 5.0 §3.2.2.2 0x97, as EMQX answers at its connection limit; 3.1.1 has no such code.
            ConnectionLimit => (reason::QUOTA_EXCEEDED, Code(return_code::SERVER_UNAVAILABLE)),
            // 5.0 §3.2.2.2 0x9F.
            ConnectionRateExceeded => (reason::CONNECTION_RATE_EXCEEDED, Code(return_code::SERVER_UNAVAILABLE)),
            // Only a 5.0 CONNECT has an authentication method.
            BadAuthenticationMethod => (reason::BAD_AUTHENTICATION_METHOD, Close),
            WillTopicInvalid => (reason::TOPIC_NAME_INVALID, Close),
            TopicNameInvalid => (reason::TOPIC_NAME_INVALID, Close),
            ReceiveMaximumExceeded => (reason::RECEIVE_MAXIMUM_EXCEEDED, Close),
            // 5.0 §3.3.2.3.4.
            TopicAliasInvalid => (reason::TOPIC_ALIAS_INVALID, Close),
            PacketTooLarge => (reason::PACKET_TOO_LARGE, Close),
            KeepAliveTimeout => (reason::KEEP_ALIVE_TIMEOUT, Close),
            SessionTakenOver => (reason::SESSION_TAKEN_OVER, Close),
            ServerShuttingDown => (reason::SERVER_SHUTTING_DOWN, Close),
            // 5.0 §3.14.2.1 0x98 Administrative action; 3.1.1 has no server DISCONNECT.
            AdministrativeAction => (reason::ADMINISTRATIVE_ACTION, Close),
            // 3.1.1 has no negative PUBACK: the client resends what was not acknowledged.
            StoreFailed => (reason::IMPLEMENTATION_SPECIFIC_ERROR, Close),
            // Mosquitto's behaviour: 3.1.1 QoS 1/2 publishes are acknowledged all the same.
            PublishNotAuthorized => (reason::NOT_AUTHORIZED, Code(reason::SUCCESS)),
            PublishQuotaExceeded => (reason::QUOTA_EXCEEDED, Code(reason::QUOTA_EXCEEDED)),
            PacketIdentifierNotFound => (reason::PACKET_IDENTIFIER_NOT_FOUND, Nothing),
            SubscribeNotAuthorized => (reason::NOT_AUTHORIZED, Code(return_code::SUBSCRIBE_FAILURE)),
            SubscriptionQuotaExceeded => (reason::QUOTA_EXCEEDED, Code(return_code::SUBSCRIBE_FAILURE)),
            // 5.0's 0x8F is for correctly formed filters.
            SharedFilterInvalid => (reason::TOPIC_FILTER_INVALID, Code(return_code::SUBSCRIBE_FAILURE)),
            SubscribeFailed => (reason::IMPLEMENTATION_SPECIFIC_ERROR, Code(return_code::SUBSCRIBE_FAILURE)),
            // 3.1's SUBACK has no failure code (0x80 came with 3.1.1): the only refusal left is
            // closing (docs/conformance.md).
            SubscribeRefusedIn31 => (reason::UNSPECIFIED_ERROR, Close),
        }
    }

    /// The MQTT 5.0 reason code.
    pub const fn reason(self) -> u8 {
        self.codes().0
    }

    /// The code to send in `version`'s answering packet; `None` when nothing is sent (the
    /// connection closes, or 3.1.1 has no such answer).
    pub const fn code(self, version: ProtocolVersion) -> Option<u8> {
        match (version, self.codes()) {
            (ProtocolVersion::V5, (code, _)) => Some(code),
            (_, (_, Legacy::Code(code))) => Some(code),
            (_, (_, Legacy::Close | Legacy::Nothing)) => None,
        }
    }

    /// The code in an acknowledgement that is sent whatever it says (PUBACK, PUBREC, SUBACK):
    /// [`MqttError::code`], or the 5.0 reason where 3.1.1 has none (the caller closes).
    pub const fn ack_code(self, version: ProtocolVersion) -> u8 {
        match self.code(version) {
            Some(code) => code,
            None => self.reason(),
        }
    }

    /// Closes the connection for this reason (5.0: DISCONNECT with [`MqttError::reason`]).
    pub fn close(self, detail: impl Into<String>) -> Close {
        Close::Violation { reason: self.reason(), detail: detail.into() }
    }
}

impl From<&DecodeError> for MqttError {
    fn from(e: &DecodeError) -> MqttError {
        match e {
            DecodeError::TooLarge { .. } => MqttError::PacketTooLarge,
            DecodeError::Malformed(_) => MqttError::MalformedPacket,
            DecodeError::Protocol(_) => MqttError::ProtocolError,
            DecodeError::UnsupportedProtocol { .. } => MqttError::UnsupportedProtocolVersion,
            DecodeError::TopicNameInvalid(_) => MqttError::TopicNameInvalid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MqttError::*;

    const ALL: [MqttError; 30] = [
        MalformedPacket,
        ProtocolError,
        TopicTooDeep,
        UnsupportedProtocolVersion,
        ClientIdentifierNotValid,
        BadUserNameOrPassword,
        NotAuthorized,
        ServerUnavailable,
        ServerBusy,
        ConnectionLimit,
        ConnectionRateExceeded,
        BadAuthenticationMethod,
        WillTopicInvalid,
        TopicNameInvalid,
        ReceiveMaximumExceeded,
        TopicAliasInvalid,
        PacketTooLarge,
        KeepAliveTimeout,
        SessionTakenOver,
        ServerShuttingDown,
        AdministrativeAction,
        StoreFailed,
        PublishNotAuthorized,
        PublishQuotaExceeded,
        PacketIdentifierNotFound,
        SubscribeNotAuthorized,
        SubscriptionQuotaExceeded,
        SharedFilterInvalid,
        SubscribeFailed,
        SubscribeRefusedIn31,
    ];

    #[test]
    fn every_refusal_is_a_5_0_error_code() {
        for e in ALL {
            assert!(e.reason() >= 0x80, "{e:?}");
        }
    }

    #[test]
    fn a_refused_connect_is_one_of_the_five_3_1_1_return_codes() {
        let connect = [
            UnsupportedProtocolVersion,
            ClientIdentifierNotValid,
            BadUserNameOrPassword,
            NotAuthorized,
            ServerUnavailable,
            ServerBusy,
            ConnectionLimit,
            ConnectionRateExceeded,
        ];
        for e in connect {
            assert!(matches!(e.codes().1, Legacy::Code(1..=5)), "{e:?}");
        }
    }

    #[test]
    fn the_codes_are_the_bytes_sent_before_the_table() {
        assert_eq!(ConnectionLimit.code(ProtocolVersion::V5), Some(0x97));
        assert_eq!(ConnectionLimit.code(ProtocolVersion::V311), Some(3));
        assert_eq!(ConnectionRateExceeded.code(ProtocolVersion::V311), Some(3));
        assert_eq!(ClientIdentifierNotValid.code(ProtocolVersion::V31), Some(2));
        assert_eq!(NotAuthorized.code(ProtocolVersion::V311), Some(5));
        assert_eq!(WillTopicInvalid.code(ProtocolVersion::V311), None);
        assert_eq!(PublishNotAuthorized.code(ProtocolVersion::V311), Some(0));
        assert_eq!(SubscribeNotAuthorized.code(ProtocolVersion::V311), Some(0x80));
        assert_eq!(ServerShuttingDown.reason(), 0x8B);
        assert_eq!(AdministrativeAction.reason(), 0x98);
        assert_eq!(AdministrativeAction.code(ProtocolVersion::V311), None);
        assert_eq!(PacketIdentifierNotFound.code(ProtocolVersion::V311), None);
    }
}
