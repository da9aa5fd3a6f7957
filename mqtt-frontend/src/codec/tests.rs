//! Codec tests across decode and encode: golden bytes written by hand from the specs,
//! incremental decoding, one test per validation rule, and property tests.

use bytes::{Bytes, BytesMut};

use super::*;

const V311: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

fn enc(p: &Packet, v: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(p, v, &mut out);
    out.to_vec()
}

/// Decodes `bytes` as one whole packet with a decoder that speaks `v` (or none yet).
fn dec(v: Option<ProtocolVersion>, bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
    let mut d = match v {
        Some(v) => Decoder::with_version(u32::MAX, v),
        None => Decoder::new(u32::MAX),
    };
    let mut buf = BytesMut::from(bytes);
    let r = d.decode(&mut buf);
    if let Ok(Some(_)) = r {
        assert!(buf.is_empty(), "packet did not consume all of {bytes:02X?}");
    }
    r
}

fn err(v: Option<ProtocolVersion>, bytes: &[u8]) -> DecodeError {
    match dec(v, bytes) {
        Err(e) => e,
        other => panic!("expected an error for {bytes:02X?}, got {other:?}"),
    }
}

fn is_malformed(v: Option<ProtocolVersion>, bytes: &[u8]) -> bool {
    matches!(err(v, bytes), DecodeError::Malformed(_))
}

fn is_protocol(v: Option<ProtocolVersion>, bytes: &[u8]) -> bool {
    matches!(err(v, bytes), DecodeError::Protocol(_))
}

fn is_topic_invalid(v: Option<ProtocolVersion>, bytes: &[u8]) -> bool {
    matches!(err(v, bytes), DecodeError::TopicNameInvalid(_))
}

/// `p` encodes to exactly `bytes`, `encoded_len` agrees, and `bytes` decode back to `p`.
#[track_caller]
fn golden(p: &Packet, v: ProtocolVersion, bytes: &[u8]) {
    assert_eq!(enc(p, v), bytes, "encoding");
    assert_eq!(encoded_len(p, v), bytes.len(), "encoded_len");
    let decoded = match p {
        Packet::Connect(_) => dec(None, bytes),
        _ => dec(Some(v), bytes),
    };
    assert_eq!(decoded.unwrap().as_ref(), Some(p), "decoding");
}

/// Only decoding is checked (the encoder picks a different, equally valid form).
#[track_caller]
fn decodes_to(v: ProtocolVersion, bytes: &[u8], p: &Packet) {
    assert_eq!(dec(Some(v), bytes).unwrap().as_ref(), Some(p));
}

fn s(x: &str) -> Str {
    Str::from(x)
}

fn publish(qos: QoS, topic: &str, packet_id: Option<u16>, payload: &'static [u8]) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: s(topic),
        packet_id,
        properties: Properties::default(),
        payload: Bytes::from_static(payload),
    }
}

mod golden {
    use super::*;

    #[test]
    fn connect_311_with_will_username_and_password() {
        let p = Packet::Connect(Box::new(Connect {
            bridge: false,
            version: V311,
            clean_start: true,
            keep_alive: 60,
            client_id: s("c1"),
            will: Some(Will {
                topic: s("w/t"),
                payload: Bytes::from_static(b"bye"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: Properties::default(),
            }),
            username: Some(s("u")),
            password: Some(Bytes::from_static(b"pw")),
            properties: Properties::default(),
        }));
        #[rustfmt::skip]
        let bytes = [
            0x10, 31,
            0, 4, b'M', b'Q', b'T', b'T', 4,
            0xEE, // user name, password, will retain, will QoS 1, will, clean session
            0, 60,
            0, 2, b'c', b'1',
            0, 3, b'w', b'/', b't',
            0, 3, b'b', b'y', b'e',
            0, 1, b'u',
            0, 2, b'p', b'w',
        ];
        golden(&p, V311, &bytes);
    }

    #[test]
    fn connect_5_with_properties_will_properties_and_password_only() {
        let p = Packet::Connect(Box::new(Connect {
            bridge: false,
            version: V5,
            clean_start: true,
            keep_alive: 10,
            client_id: s("id"),
            will: Some(Will {
                topic: s("t"),
                payload: Bytes::from_static(b"x"),
                qos: QoS::AtMostOnce,
                retain: false,
                properties: PropertyValues {
                    payload_format_indicator: Some(1),
                    will_delay_interval: Some(5),
                    ..PropertyValues::default()
                }
                .into(),
            }),
            username: None,
            password: Some(Bytes::from_static(b"p")),
            properties: PropertyValues {
                session_expiry_interval: Some(3600),
                receive_maximum: Some(20),
                user_properties: vec![(s("a"), s("b"))],
                ..PropertyValues::default()
            }
            .into(),
        }));
        #[rustfmt::skip]
        let bytes = [
            0x10, 47,
            0, 4, b'M', b'Q', b'T', b'T', 5,
            0x46, // password, will, clean start
            0, 10,
            15, 0x11, 0, 0, 0x0E, 0x10, 0x21, 0, 20, 0x26, 0, 1, b'a', 0, 1, b'b',
            0, 2, b'i', b'd',
            7, 0x01, 1, 0x18, 0, 0, 0, 5,
            0, 1, b't',
            0, 1, b'x',
            0, 1, b'p',
        ];
        golden(&p, V5, &bytes);
    }

    #[test]
    fn connack_311() {
        let p = Packet::ConnAck(ConnAck { session_present: true, code: 0, properties: Properties::default() });
        golden(&p, V311, &[0x20, 2, 1, 0]);
    }

    #[test]
    fn connack_5_with_properties() {
        let p = Packet::ConnAck(ConnAck {
            session_present: false,
            code: 0,
            properties: PropertyValues {
                assigned_client_identifier: Some(s("ab")),
                topic_alias_maximum: Some(10),
                ..PropertyValues::default()
            }
            .into(),
        });
        golden(&p, V5, &[0x20, 11, 0, 0, 8, 0x12, 0, 2, b'a', b'b', 0x22, 0, 10]);
    }

    #[test]
    fn publish_311_qos0() {
        let p = Packet::Publish(publish(QoS::AtMostOnce, "a/b", None, b"hi"));
        golden(&p, V311, &[0x30, 7, 0, 3, b'a', b'/', b'b', b'h', b'i']);
    }

    #[test]
    fn publish_311_qos1_retained() {
        let p = Packet::Publish(Publish { retain: true, ..publish(QoS::AtLeastOnce, "a/b", Some(10), b"hi") });
        golden(&p, V311, &[0x33, 9, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i']);
    }

    #[test]
    fn publish_311_qos2_dup() {
        let p = Packet::Publish(Publish { dup: true, ..publish(QoS::ExactlyOnce, "a/b", Some(0x1234), b"hi") });
        golden(&p, V311, &[0x3C, 9, 0, 3, b'a', b'/', b'b', 0x12, 0x34, b'h', b'i']);
    }

    #[test]
    fn publish_5_qos0_without_properties() {
        let p = Packet::Publish(publish(QoS::AtMostOnce, "a/b", None, b"hi"));
        golden(&p, V5, &[0x30, 8, 0, 3, b'a', b'/', b'b', 0, b'h', b'i']);
    }

    #[test]
    fn publish_5_qos1_with_properties() {
        let p = Packet::Publish(Publish {
            properties: PropertyValues {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(60),
                content_type: Some(s("j")),
                response_topic: Some(s("r")),
                correlation_data: Some(Bytes::from_static(&[1, 2])),
                subscription_identifiers: vec![5],
                topic_alias: Some(3),
                user_properties: vec![(s("k"), s("v"))],
                ..PropertyValues::default()
            }
            .into(),
            ..publish(QoS::AtLeastOnce, "a/b", Some(1), b"hi")
        });
        #[rustfmt::skip]
        let bytes = [
            0x32, 42,
            0, 3, b'a', b'/', b'b',
            0, 1,
            32,
            0x01, 1,
            0x02, 0, 0, 0, 60,
            0x03, 0, 1, b'j',
            0x08, 0, 1, b'r',
            0x09, 0, 2, 1, 2,
            0x0B, 5,
            0x23, 0, 3,
            0x26, 0, 1, b'k', 0, 1, b'v',
            b'h', b'i',
        ];
        golden(&p, V5, &bytes);
    }

    #[test]
    fn publish_5_qos2_with_empty_topic_and_topic_alias() {
        let p = Packet::Publish(Publish {
            properties: PropertyValues { topic_alias: Some(7), ..PropertyValues::default() }.into(),
            ..publish(QoS::ExactlyOnce, "", Some(1), b"")
        });
        golden(&p, V5, &[0x34, 8, 0, 0, 0, 1, 3, 0x23, 0, 7]);
    }

    #[test]
    fn puback_pubrec_pubrel_pubcomp_311() {
        golden(&Packet::PubAck(PubResp::ok(7)), V311, &[0x40, 2, 0, 7]);
        golden(&Packet::PubRec(PubResp::ok(7)), V311, &[0x50, 2, 0, 7]);
        golden(&Packet::PubRel(PubResp::ok(7)), V311, &[0x62, 2, 0, 7]);
        golden(&Packet::PubComp(PubResp::ok(7)), V311, &[0x70, 2, 0, 7]);
    }

    #[test]
    fn puback_5_short_form_for_success_without_properties() {
        golden(&Packet::PubAck(PubResp::ok(7)), V5, &[0x40, 2, 0, 7]);
    }

    #[test]
    fn puback_5_reason_only_form() {
        let p = Packet::PubAck(PubResp { reason: 0x10, ..PubResp::ok(7) });
        golden(&p, V5, &[0x40, 3, 0, 7, 0x10]);
    }

    #[test]
    fn puback_5_long_form_with_reason_string() {
        let p = Packet::PubAck(PubResp {
            packet_id: 7,
            reason: 0x87,
            properties: PropertyValues { reason_string: Some(s("no")), ..PropertyValues::default() }.into(),
        });
        golden(&p, V5, &[0x40, 9, 0, 7, 0x87, 5, 0x1F, 0, 2, b'n', b'o']);
    }

    #[test]
    fn puback_5_with_explicit_zero_property_length_decodes() {
        decodes_to(V5, &[0x40, 4, 0, 7, 0, 0], &Packet::PubAck(PubResp::ok(7)));
    }

    #[test]
    fn pubrel_5_with_reason() {
        let p = Packet::PubRel(PubResp { reason: 0x92, ..PubResp::ok(1) });
        golden(&p, V5, &[0x62, 3, 0, 1, 0x92]);
    }

    #[test]
    fn subscribe_311() {
        let p = Packet::Subscribe(Subscribe {
            packet_id: 1,
            properties: Properties::default(),
            filters: vec![
                (s("a/+"), SubOptions { qos: QoS::AtLeastOnce, ..SubOptions::default() }),
                (s("#"), SubOptions::default()),
            ],
        });
        golden(&p, V311, &[0x82, 12, 0, 1, 0, 3, b'a', b'/', b'+', 1, 0, 1, b'#', 0]);
    }

    #[test]
    fn subscribe_5_with_options_and_subscription_identifier() {
        let p = Packet::Subscribe(Subscribe {
            packet_id: 2,
            properties: PropertyValues { subscription_identifiers: vec![100], ..PropertyValues::default() }.into(),
            filters: vec![(
                s("x/#"),
                SubOptions { qos: QoS::ExactlyOnce, no_local: true, retain_as_published: true, retain_handling: 2 },
            )],
        });
        golden(&p, V5, &[0x82, 11, 0, 2, 2, 0x0B, 100, 0, 3, b'x', b'/', b'#', 0x2E]);
    }

    #[test]
    fn suback_311() {
        let p = Packet::SubAck(SubAck { packet_id: 1, properties: Properties::default(), reasons: vec![1, 0x80] });
        golden(&p, V311, &[0x90, 4, 0, 1, 1, 0x80]);
    }

    #[test]
    fn suback_311_encodes_any_failure_as_0x80() {
        let p = Packet::SubAck(SubAck { packet_id: 1, properties: Properties::default(), reasons: vec![0x87, 2] });
        assert_eq!(enc(&p, V311), [0x90, 4, 0, 1, 0x80, 2]);
    }

    #[test]
    fn suback_5_with_reason_string() {
        let p = Packet::SubAck(SubAck {
            packet_id: 2,
            properties: PropertyValues { reason_string: Some(s("r")), ..PropertyValues::default() }.into(),
            reasons: vec![2, 0xA2],
        });
        golden(&p, V5, &[0x90, 9, 0, 2, 4, 0x1F, 0, 1, b'r', 2, 0xA2]);
    }

    #[test]
    fn unsubscribe_311() {
        let p = Packet::Unsubscribe(Unsubscribe {
            packet_id: 3,
            properties: Properties::default(),
            filters: vec![s("a"), s("b/c")],
        });
        golden(&p, V311, &[0xA2, 10, 0, 3, 0, 1, b'a', 0, 3, b'b', b'/', b'c']);
    }

    #[test]
    fn unsubscribe_5_with_user_property() {
        let p = Packet::Unsubscribe(Unsubscribe {
            packet_id: 3,
            properties: PropertyValues { user_properties: vec![(s("k"), s("v"))], ..PropertyValues::default() }.into(),
            filters: vec![s("a")],
        });
        golden(&p, V5, &[0xA2, 13, 0, 3, 7, 0x26, 0, 1, b'k', 0, 1, b'v', 0, 1, b'a']);
    }

    #[test]
    fn unsuback_311() {
        let p = Packet::UnsubAck(UnsubAck { packet_id: 3, properties: Properties::default(), reasons: vec![] });
        golden(&p, V311, &[0xB0, 2, 0, 3]);
    }

    #[test]
    fn unsuback_5_with_reasons() {
        let p = Packet::UnsubAck(UnsubAck { packet_id: 3, properties: Properties::default(), reasons: vec![0, 0x11] });
        golden(&p, V5, &[0xB0, 5, 0, 3, 0, 0, 0x11]);
    }

    #[test]
    fn pingreq_and_pingresp() {
        for v in [V311, V5] {
            golden(&Packet::PingReq, v, &[0xC0, 0]);
            golden(&Packet::PingResp, v, &[0xD0, 0]);
        }
    }

    #[test]
    fn disconnect_311_and_5_short_form() {
        let p = Packet::Disconnect(Disconnect { reason: 0, properties: Properties::default() });
        golden(&p, V311, &[0xE0, 0]);
        golden(&p, V5, &[0xE0, 0]);
    }

    #[test]
    fn disconnect_5_with_reason_and_properties() {
        let p = Packet::Disconnect(Disconnect {
            reason: 0x04,
            properties: PropertyValues {
                session_expiry_interval: Some(0),
                reason_string: Some(s("bye")),
                ..PropertyValues::default()
            }
            .into(),
        });
        #[rustfmt::skip]
        let bytes = [0xE0, 13, 0x04, 11, 0x11, 0, 0, 0, 0, 0x1F, 0, 3, b'b', b'y', b'e'];
        golden(&p, V5, &bytes);
    }

    #[test]
    fn disconnect_5_reason_only_form() {
        let p = Packet::Disconnect(Disconnect { reason: 0x8E, properties: Properties::default() });
        golden(&p, V5, &[0xE0, 1, 0x8E]);
    }

    #[test]
    fn disconnect_5_is_written_empty_in_311() {
        let p = Packet::Disconnect(Disconnect { reason: 0x8E, properties: Properties::default() });
        assert_eq!(enc(&p, V311), [0xE0, 0]);
    }

    #[test]
    fn auth_with_method_and_data() {
        let p = Packet::Auth(Auth {
            reason: 0x18,
            properties: PropertyValues {
                authentication_method: Some(s("SCRAM")),
                authentication_data: Some(Bytes::from_static(&[1, 2, 3])),
                ..PropertyValues::default()
            }
            .into(),
        });
        #[rustfmt::skip]
        let bytes = [
            0xF0, 16, 0x18, 14,
            0x15, 0, 5, b'S', b'C', b'R', b'A', b'M',
            0x16, 0, 3, 1, 2, 3,
        ];
        golden(&p, V5, &bytes);
    }

    #[test]
    fn auth_short_form() {
        golden(&Packet::Auth(Auth { reason: 0, properties: Properties::default() }), V5, &[0xF0, 0]);
    }

    #[test]
    fn auth_is_not_written_in_311() {
        let p = Packet::Auth(Auth { reason: 0, properties: Properties::default() });
        assert_eq!(enc(&p, V311), [] as [u8; 0]);
        assert_eq!(encoded_len(&p, V311), 0);
    }
}

mod incremental {
    use super::*;

    fn connect_5_bytes() -> Vec<u8> {
        let p = Packet::Connect(Box::new(Connect {
            bridge: false,
            version: V5,
            clean_start: false,
            keep_alive: 30,
            client_id: s("client"),
            will: None,
            username: Some(s("user")),
            password: None,
            properties: PropertyValues { session_expiry_interval: Some(10), ..PropertyValues::default() }.into(),
        }));
        enc(&p, V5)
    }

    #[test]
    fn a_packet_fed_one_byte_at_a_time_decodes_only_when_complete() {
        let bytes = connect_5_bytes();
        let mut d = Decoder::new(1024);
        let mut buf = BytesMut::new();
        for (i, &b) in bytes.iter().enumerate() {
            buf.extend_from_slice(&[b]);
            let r = d.decode(&mut buf).unwrap();
            if i + 1 < bytes.len() {
                assert_eq!(r, None, "after {} bytes", i + 1);
                assert_eq!(buf.len(), i + 1, "nothing consumed");
            } else {
                assert!(matches!(r, Some(Packet::Connect(_))));
                assert!(buf.is_empty());
            }
        }
        assert_eq!(d.version(), Some(V5));
    }

    #[test]
    fn two_packets_in_one_buffer_decode_one_after_the_other() {
        let mut bytes = connect_5_bytes();
        let publish = Packet::Publish(publish(QoS::AtLeastOnce, "t", Some(1), b"p"));
        bytes.extend(enc(&publish, V5));
        bytes.extend([0xC0, 0]);
        bytes.push(0x30); // the start of a fourth packet
        let mut d = Decoder::new(1024);
        let mut buf = BytesMut::from(&bytes[..]);
        assert!(matches!(d.decode(&mut buf), Ok(Some(Packet::Connect(_)))));
        assert_eq!(d.decode(&mut buf), Ok(Some(publish)));
        assert_eq!(d.decode(&mut buf), Ok(Some(Packet::PingReq)));
        assert_eq!(d.decode(&mut buf), Ok(None));
        assert_eq!(&buf[..], [0x30]);
    }

    #[test]
    fn an_empty_buffer_needs_more_bytes() {
        assert_eq!(Decoder::new(10).decode(&mut BytesMut::new()), Ok(None));
    }

    #[test]
    fn version_is_unknown_until_a_connect_is_decoded() {
        let mut d = Decoder::new(1024);
        assert_eq!(d.version(), None);
        let mut buf = BytesMut::from(&connect_5_bytes()[..]);
        d.decode(&mut buf).unwrap();
        assert_eq!(d.version(), Some(V5));
    }

    #[test]
    fn a_second_connect_is_decoded_and_sets_the_version() {
        let mut d = Decoder::new(1024);
        let mut buf = BytesMut::from(&connect_5_bytes()[..]);
        d.decode(&mut buf).unwrap();
        let c311 = Packet::Connect(Box::new(Connect {
            bridge: false,
            version: V311,
            clean_start: true,
            keep_alive: 0,
            client_id: s(""),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        }));
        buf.extend_from_slice(&enc(&c311, V311));
        assert_eq!(d.decode(&mut buf), Ok(Some(c311)));
        assert_eq!(d.version(), Some(V311));
    }

    #[test]
    fn payload_and_topic_share_the_input_allocation() {
        let bytes = enc(&Packet::Publish(publish(QoS::AtMostOnce, "topic", None, b"payload")), V5);
        let mut buf = BytesMut::from(&bytes[..]);
        let start = buf.as_ptr() as usize;
        let Some(Packet::Publish(p)) = Decoder::with_version(1024, V5).decode(&mut buf).unwrap() else {
            panic!("not a PUBLISH");
        };
        assert_eq!(p.topic.bytes().as_ptr() as usize, start + 4);
        assert_eq!(p.payload.as_ptr() as usize, start + bytes.len() - 7);
    }
}

mod fixed_header {
    use super::*;

    #[test]
    fn remaining_length_with_a_fifth_byte_is_malformed() {
        assert!(is_malformed(Some(V5), &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]));
    }

    #[test]
    fn packet_type_0_is_malformed() {
        assert!(is_malformed(Some(V5), &[0x00, 0]));
        assert!(is_malformed(None, &[0x00, 0]));
    }

    #[test]
    fn packet_type_15_is_malformed_in_311() {
        assert!(is_malformed(Some(V311), &[0xF0, 0]));
    }

    #[test]
    fn pubrel_subscribe_unsubscribe_need_flags_0010() {
        assert!(is_malformed(Some(V5), &[0x60, 2, 0, 1]));
        assert!(is_malformed(Some(V5), &[0x80, 6, 0, 1, 0, 1, b'a', 0]));
        assert!(is_malformed(Some(V311), &[0xA0, 5, 0, 1, 0, 1, b'a']));
        assert!(is_malformed(Some(V5), &[0x63, 2, 0, 1]));
    }

    #[test]
    fn other_packets_need_flags_0000() {
        for first in [0x11, 0x21, 0x42, 0x51, 0x78, 0x91, 0xB2, 0xC1, 0xD4, 0xE8, 0xF1] {
            assert!(is_malformed(Some(V5), &[first, 0]), "{first:#04X}");
        }
        assert!(is_malformed(None, &[0x12, 0]));
    }

    #[test]
    fn publish_with_qos_3_is_malformed() {
        assert!(is_malformed(Some(V5), &[0x36, 5, 0, 1, b't', 0, 1]));
    }

    #[test]
    fn publish_with_dup_and_qos_0_is_malformed() {
        assert!(is_malformed(Some(V5), &[0x38, 4, 0, 1, b't', 0]));
        assert!(is_malformed(Some(V311), &[0x38, 3, 0, 1, b't']));
    }

    #[test]
    fn fixed_header_errors_are_found_from_the_first_byte_alone() {
        assert!(is_malformed(Some(V5), &[0x36]));
    }

    #[test]
    fn too_large_is_reported_from_the_fixed_header_alone() {
        // 5 bytes of a PUBLISH declaring 10 MiB (0x05 << 21) of remaining length.
        let mut d = Decoder::with_version(1024, V5);
        let mut buf = BytesMut::from(&[0x30, 0x80, 0x80, 0x80, 0x05][..]);
        assert_eq!(d.decode(&mut buf), Err(DecodeError::TooLarge { size: 10_485_765, max: 1024 }));
    }

    #[test]
    fn too_large_applies_to_the_first_connect() {
        let mut d = Decoder::new(100);
        let mut buf = BytesMut::from(&[0x10, 0xFF, 0x01][..]);
        assert_eq!(d.decode(&mut buf), Err(DecodeError::TooLarge { size: 258, max: 100 }));
    }

    #[test]
    fn maximum_packet_size_counts_the_fixed_header() {
        let bytes = [0x30, 3, 0, 1, b't']; // 5 bytes in all
        let mut d = Decoder::with_version(5, V311);
        assert!(d.decode(&mut BytesMut::from(&bytes[..])).unwrap().is_some());
        d.set_max_packet_size(4);
        assert_eq!(d.decode(&mut BytesMut::from(&bytes[..])), Err(DecodeError::TooLarge { size: 5, max: 4 }));
    }

    #[test]
    fn first_packet_must_be_connect() {
        assert_eq!(err(None, &[0xC0, 0]), DecodeError::Protocol("first packet must be CONNECT".into()));
        assert!(is_protocol(None, &[0x30, 3, 0, 1, b't']));
        assert!(is_protocol(None, &[0xF0, 0]));
    }
}

mod strings {
    use super::*;

    #[test]
    fn invalid_utf8_is_malformed() {
        assert!(is_malformed(Some(V311), &[0x30, 3, 0, 1, 0xFF]));
    }

    #[test]
    fn encoded_surrogate_is_malformed() {
        assert!(is_malformed(Some(V311), &[0x30, 5, 0, 3, 0xED, 0xA0, 0x80]));
    }

    #[test]
    fn nul_character_is_malformed() {
        assert!(is_malformed(Some(V5), &[0x30, 5, 0, 2, b'a', 0, 0]));
    }

    #[test]
    fn string_length_past_the_packet_is_malformed() {
        assert!(is_malformed(Some(V311), &[0x30, 3, 0, 9, b't']));
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        assert!(is_malformed(Some(V311), &[0x40, 3, 0, 1, 0]));
        assert!(is_malformed(Some(V5), &[0x40, 5, 0, 1, 0, 0, 0]));
        assert!(is_malformed(Some(V311), &[0x20, 3, 0, 0, 0]));
        assert!(is_malformed(Some(V5), &[0xB0, 3, 0, 1, 0]));
    }

    #[test]
    fn missing_bytes_are_malformed() {
        // SUBSCRIBE filter without its options byte.
        assert!(is_malformed(Some(V311), &[0x82, 5, 0, 1, 0, 1, b'a']));
        // PUBACK with a one-byte packet identifier.
        assert!(is_malformed(Some(V311), &[0x40, 1, 0]));
        // QoS 1 PUBLISH without a packet identifier.
        assert!(is_malformed(Some(V311), &[0x32, 3, 0, 1, b't']));
    }
}

mod connect {
    use super::*;

    /// A CONNECT body after the protocol name and level.
    fn connect(level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, flags, 0, 0];
        body.extend_from_slice(rest);
        let mut p = vec![0x10, body.len() as u8];
        p.extend(body);
        p
    }

    #[test]
    fn mqisdp_level_3_is_mqtt_31() {
        // Issue 14: 3.1 is supported (it was refused as unsupported before).
        let bytes = [0x10, 15, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 0, 0, 1, b'c'];
        let p = Packet::Connect(Box::new(Connect {
            bridge: false,
            version: ProtocolVersion::V31,
            clean_start: true,
            keep_alive: 0,
            client_id: s("c"),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        }));
        golden(&p, ProtocolVersion::V31, &bytes);
        // MQIsdp at another level, and MQTT at level 3, are not.
        let mut other = bytes;
        other[10] = 4;
        assert_eq!(err(None, &other), DecodeError::UnsupportedProtocol { name: "MQIsdp".into(), level: 4 });
    }

    #[test]
    fn mqtt_31_connack_has_no_session_present_flag() {
        let ack = Packet::ConnAck(ConnAck { session_present: true, code: 0, properties: Properties::default() });
        assert_eq!(enc(&ack, ProtocolVersion::V31), [0x20, 2, 0, 0]);
        assert_eq!(enc(&ack, V311), [0x20, 2, 1, 0]);
    }

    #[test]
    fn mqtt_31_allows_dup_on_pubrel_subscribe_and_unsubscribe() {
        let v31 = Some(ProtocolVersion::V31);
        assert_eq!(dec(v31, &[0x6A, 2, 0, 1]).unwrap(), Some(Packet::PubRel(PubResp::ok(1))));
        assert!(is_malformed(Some(V311), &[0x6A, 2, 0, 1]));
        assert!(is_malformed(v31, &[0x6B, 2, 0, 1]));
    }

    #[test]
    fn the_bridge_bit_on_31_and_311_levels_marks_a_bridge_and_round_trips() {
        // Mosquitto's bridges (try_private) send 0x84 for 3.1.1 and 0x83 for 3.1.
        for (name, level, version) in [(&b"MQTT"[..], 4u8, V311), (&b"MQIsdp"[..], 3, ProtocolVersion::V31)] {
            let mut bytes = vec![0x10, 0, 0, name.len() as u8];
            bytes.extend_from_slice(name);
            bytes.extend_from_slice(&[level | 0x80, 0x02, 0, 60, 0, 1, b'b']);
            bytes[1] = (bytes.len() - 2) as u8;
            let p = Packet::Connect(Box::new(Connect {
                bridge: true,
                version,
                clean_start: true,
                keep_alive: 60,
                client_id: s("b"),
                will: None,
                username: None,
                password: None,
                properties: Properties::default(),
            }));
            golden(&p, version, &bytes);
        }
        // 5.0 has no bridge mark: 0x85 is not a version, and `bridge` is not written for 5.0.
        assert_eq!(
            err(None, &connect(0x85, 0x02, &[0, 0, 0])),
            DecodeError::UnsupportedProtocol { name: "MQTT".into(), level: 0x85 }
        );
        let v5 = Connect {
            bridge: true,
            version: V5,
            clean_start: true,
            keep_alive: 0,
            client_id: s("b"),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        };
        assert_eq!(enc(&Packet::Connect(Box::new(v5)), V5)[8], 5);
    }

    #[test]
    fn mqtt_level_6_is_unsupported() {
        assert_eq!(
            err(None, &connect(6, 0x02, &[0, 0])),
            DecodeError::UnsupportedProtocol { name: "MQTT".into(), level: 6 }
        );
    }

    #[test]
    fn unsupported_protocol_leaves_the_version_unknown() {
        let mut d = Decoder::new(1024);
        let _ = d.decode(&mut BytesMut::from(&connect(6, 0x02, &[0, 0])[..]));
        assert_eq!(d.version(), None);
    }

    #[test]
    fn reserved_flag_is_malformed() {
        assert!(is_malformed(None, &connect(4, 0x03, &[0, 0])));
        assert!(is_malformed(None, &connect(5, 0x01, &[0, 0, 0])));
    }

    #[test]
    fn will_qos_3_is_malformed() {
        assert!(is_malformed(None, &connect(4, 0x1C, &[0, 0, 0, 1, b't', 0, 0])));
    }

    #[test]
    fn will_qos_without_will_flag_is_malformed() {
        assert!(is_malformed(None, &connect(4, 0x08, &[0, 0])));
    }

    #[test]
    fn will_retain_without_will_flag_is_malformed() {
        assert!(is_malformed(None, &connect(5, 0x20, &[0, 0, 0])));
    }

    #[test]
    fn password_without_user_name_is_malformed_in_311() {
        assert!(is_malformed(None, &connect(4, 0x40, &[0, 0, 0, 1, b'p'])));
    }

    #[test]
    fn password_without_user_name_is_allowed_in_5() {
        let Some(Packet::Connect(c)) = dec(None, &connect(5, 0x40, &[0, 0, 0, 0, 1, b'p'])).unwrap() else {
            panic!("not a CONNECT");
        };
        assert_eq!((c.username, c.password), (None, Some(Bytes::from_static(b"p"))));
    }

    #[test]
    fn will_topic_with_wildcard_is_invalid() {
        assert!(is_topic_invalid(None, &connect(4, 0x04, &[0, 0, 0, 1, b'#', 0, 0])));
    }

    #[test]
    fn empty_will_topic_is_invalid() {
        assert!(is_topic_invalid(None, &connect(4, 0x04, &[0, 0, 0, 0, 0, 0])));
    }

    #[test]
    fn property_not_allowed_in_connect_is_malformed() {
        // §2.2.2.2: malformed (issue 14; it was a protocol error before).
        // Topic alias (0x23) in CONNECT properties.
        assert!(is_malformed(None, &connect(5, 0x02, &[3, 0x23, 0, 1, 0, 0])));
    }

    #[test]
    fn will_property_not_allowed_in_will_is_malformed() {
        // §2.2.2.2: malformed (issue 14; it was a protocol error before).
        // Receive maximum (0x21) in the will properties.
        assert!(is_malformed(None, &connect(5, 0x06, &[0, 0, 0, 3, 0x21, 0, 1, 0, 1, b't', 0, 0])));
    }

    #[test]
    fn truncated_connect_is_malformed() {
        assert!(is_malformed(None, &[0x10, 7, 0, 4, b'M', b'Q', b'T', b'T', 4]));
    }

    #[test]
    fn missing_client_identifier_is_malformed() {
        assert!(is_malformed(None, &connect(4, 0x02, &[])));
    }
}

mod publish {
    use super::*;

    #[test]
    fn topic_with_plus_is_invalid() {
        assert!(is_topic_invalid(Some(V5), &[0x30, 6, 0, 3, b'a', b'/', b'+', 0]));
        assert!(is_topic_invalid(Some(V311), &[0x30, 5, 0, 3, b'a', b'/', b'+']));
    }

    #[test]
    fn topic_with_hash_is_invalid() {
        assert!(is_topic_invalid(Some(V5), &[0x30, 4, 0, 1, b'#', 0]));
    }

    #[test]
    fn empty_topic_is_malformed_in_311() {
        assert!(is_malformed(Some(V311), &[0x30, 2, 0, 0]));
    }

    #[test]
    fn empty_topic_without_alias_is_invalid_in_5() {
        assert!(is_topic_invalid(Some(V5), &[0x30, 3, 0, 0, 0]));
    }

    #[test]
    fn qos_1_with_packet_id_0_is_malformed() {
        assert!(is_malformed(Some(V311), &[0x32, 5, 0, 1, b't', 0, 0]));
        assert!(is_malformed(Some(V5), &[0x34, 6, 0, 1, b't', 0, 0, 0]));
    }

    #[test]
    fn topic_alias_0_is_a_protocol_error() {
        assert!(is_protocol(Some(V5), &[0x30, 7, 0, 1, b't', 3, 0x23, 0, 0]));
    }

    #[test]
    fn property_not_allowed_in_publish_is_malformed() {
        // §2.2.2.2: malformed (issue 14; it was a protocol error before).
        // Reason string (0x1F).
        assert!(is_malformed(Some(V5), &[0x30, 8, 0, 1, b't', 4, 0x1F, 0, 1, b'r']));
    }

    #[test]
    fn payload_may_be_empty() {
        decodes_to(V311, &[0x30, 3, 0, 1, b't'], &Packet::Publish(publish(QoS::AtMostOnce, "t", None, b"")));
    }
}

mod acks {
    use super::*;

    #[test]
    fn packet_id_0_is_malformed_in_every_packet_that_has_one() {
        for v in [V311, V5] {
            for first in [0x40, 0x50, 0x62, 0x70] {
                assert!(is_malformed(Some(v), &[first, 2, 0, 0]), "{first:#04X} {v:?}");
            }
        }
        assert!(is_malformed(Some(V311), &[0x82, 6, 0, 0, 0, 1, b'a', 0]));
        assert!(is_malformed(Some(V5), &[0x82, 7, 0, 0, 0, 0, 1, b'a', 0]));
        assert!(is_malformed(Some(V311), &[0xA2, 5, 0, 0, 0, 1, b'a']));
        assert!(is_malformed(Some(V5), &[0xA2, 6, 0, 0, 0, 0, 1, b'a']));
    }

    #[test]
    fn puback_reason_code_not_in_the_table_is_malformed() {
        assert!(is_malformed(Some(V5), &[0x40, 3, 0, 1, 0x05]));
        // 0x92 is a PUBREL/PUBCOMP code only.
        assert!(is_malformed(Some(V5), &[0x40, 3, 0, 1, 0x92]));
        assert!(is_malformed(Some(V5), &[0x62, 3, 0, 1, 0x10]));
    }

    #[test]
    fn property_not_allowed_in_puback_is_malformed() {
        // §2.2.2.2: malformed (issue 14; it was a protocol error before).
        assert!(is_malformed(Some(V5), &[0x40, 6, 0, 1, 0, 2, 0x01, 1]));
    }

    #[test]
    fn connack_311_return_code_above_5_is_malformed() {
        assert!(is_malformed(Some(V311), &[0x20, 2, 0, 6]));
    }

    #[test]
    fn connack_reserved_flags_are_malformed() {
        assert!(is_malformed(Some(V311), &[0x20, 2, 2, 0]));
    }

    #[test]
    fn connack_5_reason_code_not_in_the_table_is_malformed() {
        assert!(is_malformed(Some(V5), &[0x20, 3, 0, 0x10, 0]));
    }

    #[test]
    fn suback_311_accepts_only_0_1_2_and_0x80() {
        assert!(is_malformed(Some(V311), &[0x90, 3, 0, 1, 0x87]));
        assert!(is_malformed(Some(V311), &[0x90, 3, 0, 1, 3]));
        decodes_to(
            V311,
            &[0x90, 6, 0, 1, 0, 1, 2, 0x80],
            &Packet::SubAck(SubAck { packet_id: 1, properties: Properties::default(), reasons: vec![0, 1, 2, 0x80] }),
        );
    }

    #[test]
    fn suback_without_reasons_is_malformed() {
        assert!(is_malformed(Some(V311), &[0x90, 2, 0, 1]));
    }

    #[test]
    fn unsuback_5_reason_code_not_in_the_table_is_malformed() {
        assert!(is_malformed(Some(V5), &[0xB0, 4, 0, 1, 0, 0x10]));
    }
}

mod subscribe {
    use super::*;

    #[test]
    fn subscribe_without_filters_is_malformed_in_5() {
        assert!(is_malformed(Some(V5), &[0x82, 3, 0, 1, 0]));
    }

    #[test]
    fn subscribe_without_filters_is_malformed_in_311() {
        assert!(is_malformed(Some(V311), &[0x82, 2, 0, 1]));
    }

    #[test]
    fn reserved_option_bits_are_malformed() {
        assert!(is_malformed(Some(V5), &[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x40]));
        assert!(is_malformed(Some(V5), &[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x80]));
    }

    #[test]
    fn subscription_qos_3_is_malformed() {
        assert!(is_malformed(Some(V5), &[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x03]));
        assert!(is_malformed(Some(V311), &[0x82, 6, 0, 1, 0, 1, b'a', 0x03]));
    }

    #[test]
    fn retain_handling_3_is_malformed() {
        assert!(is_malformed(Some(V5), &[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x30]));
    }

    #[test]
    fn options_of_5_are_malformed_in_311() {
        for byte in [0x04, 0x08, 0x10] {
            assert!(is_malformed(Some(V311), &[0x82, 6, 0, 1, 0, 1, b'a', byte]), "{byte:#04X}");
        }
    }

    #[test]
    fn two_subscription_identifiers_are_a_protocol_error() {
        assert!(is_protocol(Some(V5), &[0x82, 11, 0, 1, 4, 0x0B, 1, 0x0B, 2, 0, 1, b'a', 0]));
    }

    #[test]
    fn subscription_identifier_0_is_malformed() {
        assert!(is_malformed(Some(V5), &[0x82, 9, 0, 1, 2, 0x0B, 0, 0, 1, b'a', 0]));
    }

    #[test]
    fn filters_are_not_checked_for_wildcard_placement() {
        let Some(Packet::Subscribe(s)) = dec(Some(V311), &[0x82, 7, 0, 1, 0, 2, b'a', b'#', 0]).unwrap() else {
            panic!("not a SUBSCRIBE");
        };
        assert_eq!(s.filters[0].0.as_str(), "a#");
    }

    #[test]
    fn unsubscribe_without_filters_is_malformed_in_5() {
        assert!(is_malformed(Some(V5), &[0xA2, 3, 0, 1, 0]));
    }

    #[test]
    fn unsubscribe_without_filters_is_malformed_in_311() {
        assert!(is_malformed(Some(V311), &[0xA2, 2, 0, 1]));
    }

    #[test]
    fn property_not_allowed_in_unsubscribe_is_malformed() {
        // §2.2.2.2: malformed (issue 14; it was a protocol error before).
        // Subscription identifier in UNSUBSCRIBE.
        assert!(is_malformed(Some(V5), &[0xA2, 8, 0, 1, 2, 0x0B, 1, 0, 1, b'a']));
    }
}

mod empty_bodies {
    use super::*;

    #[test]
    fn pingreq_with_a_body_is_malformed() {
        assert!(is_malformed(Some(V311), &[0xC0, 1, 0]));
        assert!(is_malformed(Some(V5), &[0xC0, 1, 0]));
    }

    #[test]
    fn pingresp_with_a_body_is_malformed() {
        assert!(is_malformed(Some(V5), &[0xD0, 1, 0]));
    }

    #[test]
    fn disconnect_311_with_a_body_is_malformed() {
        assert!(is_malformed(Some(V311), &[0xE0, 1, 0]));
    }

    #[test]
    fn disconnect_5_reason_code_not_in_the_table_is_malformed() {
        assert!(is_malformed(Some(V5), &[0xE0, 1, 0x01]));
    }

    #[test]
    fn disconnect_5_with_zero_remaining_length_is_normal_disconnection() {
        decodes_to(V5, &[0xE0, 0], &Packet::Disconnect(Disconnect { reason: 0, properties: Properties::default() }));
    }

    #[test]
    fn auth_with_reason_but_no_property_length_is_malformed() {
        assert!(is_malformed(Some(V5), &[0xF0, 1, 0x18]));
    }

    #[test]
    fn auth_reason_code_not_in_the_table_is_malformed() {
        assert!(is_malformed(Some(V5), &[0xF0, 2, 0x80, 0]));
    }

    #[test]
    fn property_not_allowed_in_disconnect_is_malformed() {
        // §2.2.2.2: malformed (issue 14; it was a protocol error before).
        // Receive maximum in DISCONNECT.
        assert!(is_malformed(Some(V5), &[0xE0, 5, 0, 3, 0x21, 0, 1]));
    }
}

mod properties {
    use super::super::properties::{restrict, PropCtx};
    use super::*;
    use crate::codec::decode::valid_reasons;
    use proptest::collection::vec;
    use proptest::option::weighted;
    use proptest::prelude::*;
    use proptest::sample::select;

    fn string() -> impl Strategy<Value = Str> {
        "[^\\x00]{0,6}".prop_map(Str::from)
    }

    /// A valid PUBLISH/will topic name: not empty, no wildcards, no U+0000.
    fn topic() -> impl Strategy<Value = Str> {
        "[^\\x00+#]{1,6}".prop_map(Str::from)
    }

    fn bytes() -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..8).prop_map(Bytes::from)
    }

    fn qos() -> impl Strategy<Value = QoS> {
        prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
    }

    fn id() -> impl Strategy<Value = u16> {
        1..=u16::MAX
    }

    fn o<T: std::fmt::Debug + Clone>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Option<T>> {
        weighted(0.15, s)
    }

    /// Any set of properties with valid values, whatever the packet.
    fn any_properties() -> impl Strategy<Value = Properties> {
        let a = (
            o(0u8..=1),
            o(any::<u32>()),
            o(string()),
            o(string()),
            o(bytes()),
            vec(1..=VARINT_MAX, 0..3),
            o(any::<u32>()),
            o(string()),
            o(any::<u16>()),
            o(string()),
            o(bytes()),
            o(0u8..=1),
        );
        let b = (
            o(any::<u32>()),
            o(0u8..=1),
            o(string()),
            o(string()),
            o(string()),
            o(1..=u16::MAX),
            o(any::<u16>()),
            o(1..=u16::MAX),
            o(0u8..=1),
            o(0u8..=1),
            vec((string(), string()), 0..3),
            o(1..=u32::MAX),
        );
        let c = (o(0u8..=1), o(0u8..=1), o(0u8..=1));
        (a, b, c).prop_map(|(a, b, c)| {
            PropertyValues {
                payload_format_indicator: a.0,
                message_expiry_interval: a.1,
                content_type: a.2,
                response_topic: a.3,
                correlation_data: a.4,
                subscription_identifiers: a.5,
                session_expiry_interval: a.6,
                assigned_client_identifier: a.7,
                server_keep_alive: a.8,
                authentication_method: a.9,
                authentication_data: a.10,
                request_problem_information: a.11,
                will_delay_interval: b.0,
                request_response_information: b.1,
                response_information: b.2,
                server_reference: b.3,
                reason_string: b.4,
                receive_maximum: b.5,
                topic_alias_maximum: b.6,
                topic_alias: b.7,
                maximum_qos: b.8,
                retain_available: b.9,
                user_properties: b.10,
                maximum_packet_size: b.11,
                wildcard_subscription_available: c.0,
                subscription_identifier_available: c.1,
                shared_subscription_available: c.2,
            }
            .into()
        })
    }

    /// Properties for `ctx` in 5.0; none in 3.1.1.
    fn props(v: ProtocolVersion, ctx: PropCtx) -> BoxedStrategy<Properties> {
        match v {
            ProtocolVersion::V5 => any_properties().prop_map(move |p| restrict(p, ctx)).boxed(),
            ProtocolVersion::V31 | ProtocolVersion::V311 => Just(Properties::default()).boxed(),
        }
    }

    /// A reason code valid in the packet (5.0) or the only value 3.1.1 has.
    fn reason(v: ProtocolVersion, valid: &'static [u8]) -> BoxedStrategy<u8> {
        match v {
            ProtocolVersion::V5 => select(valid).boxed(),
            ProtocolVersion::V31 | ProtocolVersion::V311 => Just(0).boxed(),
        }
    }

    fn connect(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
        let will = (topic(), bytes(), qos(), any::<bool>(), props(v, PropCtx::Will))
            .prop_map(|(topic, payload, qos, retain, properties)| Will { topic, payload, qos, retain, properties });
        (any::<bool>(), any::<u16>(), string(), o(will), o(string()), o(bytes()), props(v, PropCtx::Connect)).prop_map(
            move |(clean_start, keep_alive, client_id, will, mut username, password, properties)| {
                if v == ProtocolVersion::V311 && password.is_some() && username.is_none() {
                    username = Some(Str::default());
                }
                Packet::Connect(Box::new(Connect {
                    bridge: false,
                    version: v,
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                    properties,
                }))
            },
        )
    }

    fn publish(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
        (any::<bool>(), qos(), any::<bool>(), topic(), any::<bool>(), id(), props(v, PropCtx::Publish), bytes())
            .prop_map(move |(dup, qos, retain, mut topic, drop_topic, id, properties, payload)| {
                if properties.topic_alias.is_some() && drop_topic {
                    topic = Str::default();
                }
                let packet_id = (qos != QoS::AtMostOnce).then_some(id);
                let dup = dup && packet_id.is_some();
                Packet::Publish(Publish { dup, qos, retain, topic, packet_id, properties, payload })
            })
    }

    fn pubresp(v: ProtocolVersion, valid: &'static [u8]) -> impl Strategy<Value = PubResp> {
        (id(), reason(v, valid), props(v, PropCtx::PubResp)).prop_map(|(packet_id, reason, properties)| PubResp {
            packet_id,
            reason,
            properties,
        })
    }

    fn sub_options(v: ProtocolVersion) -> impl Strategy<Value = SubOptions> {
        (qos(), any::<bool>(), any::<bool>(), 0u8..=2).prop_map(move |(qos, no_local, rap, rh)| match v {
            ProtocolVersion::V5 => SubOptions { qos, no_local, retain_as_published: rap, retain_handling: rh },
            ProtocolVersion::V31 | ProtocolVersion::V311 => SubOptions { qos, ..SubOptions::default() },
        })
    }

    fn packet(v: ProtocolVersion) -> BoxedStrategy<Packet> {
        let suback_reasons = match v {
            ProtocolVersion::V5 => valid_reasons::SUBACK,
            ProtocolVersion::V31 | ProtocolVersion::V311 => valid_reasons::SUBACK_V311,
        };
        let unsuback_reasons = match v {
            ProtocolVersion::V5 => vec(select(valid_reasons::UNSUBACK), 1..4).boxed(),
            ProtocolVersion::V31 | ProtocolVersion::V311 => Just(Vec::new()).boxed(),
        };
        let connack_code = match v {
            ProtocolVersion::V5 => select(valid_reasons::CONNACK).boxed(),
            ProtocolVersion::V31 | ProtocolVersion::V311 => (0u8..=5).boxed(),
        };
        let common = prop_oneof![
            connect(v),
            (any::<bool>(), connack_code, props(v, PropCtx::ConnAck)).prop_map(
                |(session_present, code, properties)| {
                    Packet::ConnAck(ConnAck { session_present, code, properties })
                }
            ),
            publish(v),
            pubresp(v, valid_reasons::PUBACK).prop_map(Packet::PubAck),
            pubresp(v, valid_reasons::PUBACK).prop_map(Packet::PubRec),
            pubresp(v, valid_reasons::PUBREL).prop_map(Packet::PubRel),
            pubresp(v, valid_reasons::PUBREL).prop_map(Packet::PubComp),
            (id(), props(v, PropCtx::Subscribe), vec((string(), sub_options(v)), 1..4)).prop_map(
                |(packet_id, properties, filters)| Packet::Subscribe(Subscribe { packet_id, properties, filters })
            ),
            (id(), props(v, PropCtx::SubAck), vec(select(suback_reasons), 1..4))
                .prop_map(|(packet_id, properties, reasons)| Packet::SubAck(SubAck { packet_id, properties, reasons })),
            (id(), props(v, PropCtx::Unsubscribe), vec(string(), 1..4)).prop_map(|(packet_id, properties, filters)| {
                Packet::Unsubscribe(Unsubscribe { packet_id, properties, filters })
            }),
            (id(), props(v, PropCtx::UnsubAck), unsuback_reasons).prop_map(|(packet_id, properties, reasons)| {
                Packet::UnsubAck(UnsubAck { packet_id, properties, reasons })
            }),
            Just(Packet::PingReq),
            Just(Packet::PingResp),
            (reason(v, valid_reasons::DISCONNECT), props(v, PropCtx::Disconnect))
                .prop_map(|(reason, properties)| Packet::Disconnect(Disconnect { reason, properties })),
        ];
        match v {
            ProtocolVersion::V5 => prop_oneof![
                14 => common,
                1 => (select(valid_reasons::AUTH), props(v, PropCtx::Auth))
                    .prop_map(|(reason, properties)| Packet::Auth(Auth { reason, properties })),
            ]
            .boxed(),
            ProtocolVersion::V31 | ProtocolVersion::V311 => common.boxed(),
        }
    }

    fn round_trip(p: &Packet, v: ProtocolVersion) -> Result<(), TestCaseError> {
        let mut buf = BytesMut::new();
        encode(p, v, &mut buf);
        prop_assert_eq!(encoded_len(p, v), buf.len());
        let mut d = Decoder::with_version(u32::MAX, v);
        let decoded = d.decode(&mut buf);
        prop_assert_eq!(decoded, Ok(Some(p.clone())));
        prop_assert!(buf.is_empty());
        Ok(())
    }

    /// Decodes everything in `buf`, checking that `Ok(None)` consumes nothing and `Ok(Some)`
    /// consumes something.
    fn drain(mut d: Decoder, bytes: &[u8]) -> Result<(), TestCaseError> {
        let mut buf = BytesMut::from(bytes);
        loop {
            let before = buf.len();
            match d.decode(&mut buf) {
                Ok(None) => {
                    prop_assert_eq!(buf.len(), before);
                    return Ok(());
                }
                Ok(Some(_)) => prop_assert!(buf.len() < before),
                Err(_) => return Ok(()),
            }
        }
    }

    fn decoders() -> [Decoder; 3] {
        [Decoder::new(4096), Decoder::with_version(4096, V311), Decoder::with_version(4096, V5)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn round_trip_311(p in packet(V311)) {
            round_trip(&p, V311)?;
        }

        #[test]
        fn round_trip_5(p in packet(V5)) {
            round_trip(&p, V5)?;
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..64)) {
            for d in decoders() {
                drain(d, &bytes)?;
            }
        }

        #[test]
        fn mutated_packets_never_panic(
            p in packet(V5),
            v in prop_oneof![Just(V311), Just(V5)],
            edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = enc(&p, v);
            prop_assume!(!bytes.is_empty()); // AUTH is not written in 3.1.1
            for (i, b) in edits {
                let i = i.index(bytes.len());
                bytes[i] = b;
            }
            bytes.truncate(cut.index(bytes.len() + 1).max(1));
            for d in decoders() {
                drain(d, &bytes)?;
            }
        }
    }
}

mod peek {
    use super::*;

    #[test]
    fn a_whole_publish_is_seen_before_it_is_decoded() {
        // PUBLISH QoS 0, topic "a", payload "hi": 0x30, remaining 5.
        let publish = [0x30, 5, 0, 1, b'a', b'h', b'i'];
        assert!(Decoder::whole_publish_next(&publish));
        // Followed by more bytes: still the first packet that counts.
        assert!(Decoder::whole_publish_next(&[&publish[..], &[0xC0, 0][..]].concat()));
        // Not all there yet, or the length not all there.
        assert!(!Decoder::whole_publish_next(&publish[..6]));
        assert!(!Decoder::whole_publish_next(&[0x30, 0x80]));
        // Another type (PINGREQ), or nothing.
        assert!(!Decoder::whole_publish_next(&[0xC0, 0]));
        assert!(!Decoder::whole_publish_next(&[]));
        // What it saw is what decode returns.
        let mut buf = BytesMut::from(&publish[..]);
        let mut d = Decoder::with_version(u32::MAX, V311);
        assert!(matches!(d.decode(&mut buf), Ok(Some(Packet::Publish(_)))));
    }
}

/// A decoded packet is moved from the decoder to the session, and an outgoing PUBLISH is built
/// and handed to the encoder, once per message: with the properties inline a `Packet` was 472
/// bytes and those moves were 4–8 % of the broker's CPU on QoS 0 1→1 (x86_64).
#[test]
fn a_packet_stays_small() {
    let size = std::mem::size_of::<Packet>();
    assert!(size <= 96, "Packet is {size} bytes");
    assert_eq!(std::mem::size_of::<Properties>(), 8);
}

/// Reading an absent property costs no box, and neither does a packet without properties.
#[test]
fn properties_are_boxed_only_once_written() {
    let mut p = Properties::default();
    assert!(p.values().is_none() && p.is_empty());
    assert_eq!(p.topic_alias, None);
    assert!(p.user_properties.is_empty());
    assert!(p.values().is_none(), "reading made the box");
    p.topic_alias = Some(3);
    assert_eq!(p.values().map(|v| v.topic_alias), Some(Some(3)));
    assert!(!p.is_empty());
    p.topic_alias = None;
    assert!(p.is_empty());
    assert_eq!(p, Properties::default(), "an emptied box equals no box");
    assert_eq!(Properties::from(PropertyValues::default()).values(), None);
}
