//! Content header frames: `class-id:u16 weight:u16 body-size:u64 flags:u16 properties`.
//!
//! Written by hand rather than generated: the 14 basic properties map onto the core's
//! [`Properties`] with conversions the spec does not know (delivery-mode → [`DeliveryMode`],
//! `type` → `kind`). A test checks the order against the spec's property list.
//!
//! Flags: bit 15 is the first property (content-type) down to bit 2 for the 14th
//! (cluster-id); bit 0 would announce another flags word. RabbitMQ defines no 15th property,
//! so bit 0 or the unused bit 1 set is a syntax error.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ferry_core::message::{DeliveryMode, MoreProperties, Properties, ShortString};

use super::constants::{BASIC_CLASS_ID, FRAME_HEADER};
use super::error::{EncodeError, HeaderError, SyntaxError};
use super::table::{read_table, write_table};
use super::wire::{begin_frame, end_frame, put_short_str, Reader};

const CONTENT_TYPE: u16 = 1 << 15;
const CONTENT_ENCODING: u16 = 1 << 14;
const HEADERS: u16 = 1 << 13;
const DELIVERY_MODE: u16 = 1 << 12;
const PRIORITY: u16 = 1 << 11;
const CORRELATION_ID: u16 = 1 << 10;
const REPLY_TO: u16 = 1 << 9;
const EXPIRATION: u16 = 1 << 8;
const MESSAGE_ID: u16 = 1 << 7;
const TIMESTAMP: u16 = 1 << 6;
const TYPE: u16 = 1 << 5;
const USER_ID: u16 = 1 << 4;
const APP_ID: u16 = 1 << 3;
const CLUSTER_ID: u16 = 1 << 2;
/// Bit 1 (unused) and bit 0 (continuation).
const UNDEFINED: u16 = 0b11;

/// A decoded content header.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ContentHeader {
    /// Always [`BASIC_CLASS_ID`] once decoded; the channel checks it matches the method.
    pub class_id: u16,
    /// The total size of the body frames that follow.
    pub body_size: u64,
    pub properties: Properties,
}

impl ContentHeader {
    /// A basic-class header.
    pub fn basic(body_size: u64, properties: Properties) -> ContentHeader {
        ContentHeader { class_id: BASIC_CLASS_ID, body_size, properties }
    }

    /// Decodes a header frame's payload. Strings and the headers table are slices of
    /// `payload`. The weight field (unused, "must be zero") is ignored, as RabbitMQ does.
    pub fn decode(payload: Bytes) -> Result<ContentHeader, HeaderError> {
        let mut r = Reader::new(payload);
        let class_id = r.u16("class-id")?;
        if class_id != BASIC_CLASS_ID {
            return Err(HeaderError::WrongClass(class_id));
        }
        let _weight = r.u16("weight")?;
        let body_size = r.u64("body-size")?;
        let properties = read_properties(&mut r)?;
        r.finish()?;
        Ok(ContentHeader { class_id, body_size, properties })
    }

    /// Encodes the header frame's payload. On error (a short string over 255 bytes) `out` is
    /// left as it was.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        let start = out.len();
        out.put_u16(self.class_id);
        out.put_u16(0);
        out.put_u64(self.body_size);
        write_properties(out, &self.properties).inspect_err(|_| out.truncate(start))
    }
}

/// Writes `header` as one content header frame on `channel`. On error `out` is left as it was.
pub fn encode_header_frame(channel: u16, header: &ContentHeader, out: &mut BytesMut) -> Result<(), EncodeError> {
    let start = begin_frame(out, FRAME_HEADER, channel);
    header.encode(out).and_then(|()| end_frame(out, start)).inspect_err(|_| out.truncate(start))
}

fn read_properties(r: &mut Reader) -> Result<Properties, SyntaxError> {
    let flags = r.u16("property flags")?;
    if flags & UNDEFINED != 0 {
        return Err(SyntaxError::UndefinedPropertyFlags(flags));
    }
    let short = |r: &mut Reader, bit: u16, field: &'static str| -> Result<Option<ShortString>, SyntaxError> {
        if flags & bit != 0 {
            r.short_str(field).map(Some)
        } else {
            Ok(None)
        }
    };
    const MORE: u16 =
        CONTENT_ENCODING | CORRELATION_ID | REPLY_TO | EXPIRATION | MESSAGE_ID | TYPE | USER_ID | APP_ID | CLUSTER_ID;
    // Most messages carry none of the less common ones: no allocation for them, and their nine
    // flags are not looked at one by one (a header without properties was 3-4 % of the
    // broker's instructions on AMQP auto-ack 1->1 when each was read as an absent string).
    // They are read into their box where the wire has them, between the common ones.
    let mut more = (flags & MORE != 0).then(Box::<MoreProperties>::default);
    let content_type = short(r, CONTENT_TYPE, "content-type")?;
    if let Some(m) = more.as_deref_mut() {
        m.content_encoding = short(r, CONTENT_ENCODING, "content-encoding")?;
    }
    let headers = if flags & HEADERS != 0 { Some(read_table(r, "headers")?) } else { None };
    let delivery_mode = if flags & DELIVERY_MODE != 0 {
        Some(match r.u8("delivery-mode")? {
            1 => DeliveryMode::Transient,
            2 => DeliveryMode::Persistent,
            other => return Err(SyntaxError::BadDeliveryMode(other)),
        })
    } else {
        None
    };
    let priority = if flags & PRIORITY != 0 { Some(r.u8("priority")?) } else { None };
    if let Some(m) = more.as_deref_mut() {
        m.correlation_id = short(r, CORRELATION_ID, "correlation-id")?;
        m.reply_to = short(r, REPLY_TO, "reply-to")?;
        m.expiration = short(r, EXPIRATION, "expiration")?;
        m.message_id = short(r, MESSAGE_ID, "message-id")?;
    }
    let timestamp = if flags & TIMESTAMP != 0 { Some(r.u64("timestamp")?) } else { None };
    if let Some(m) = more.as_deref_mut() {
        m.kind = short(r, TYPE, "type")?;
        m.user_id = short(r, USER_ID, "user-id")?;
        m.app_id = short(r, APP_ID, "app-id")?;
        m.cluster_id = short(r, CLUSTER_ID, "cluster-id")?;
    }
    Ok(Properties { content_type, headers, delivery_mode, priority, timestamp, more })
}

/// Writes the flags word and the present properties. On error `out` may hold a partial
/// header; callers truncate.
pub(crate) fn write_properties(out: &mut BytesMut, p: &Properties) -> Result<(), EncodeError> {
    fn bit(present: bool, bit: u16) -> u16 {
        if present {
            bit
        } else {
            0
        }
    }
    fn short(out: &mut BytesMut, s: &Option<ShortString>, field: &'static str) -> Result<(), EncodeError> {
        match s {
            Some(s) => put_short_str(out, s.as_bytes(), field),
            None => Ok(()),
        }
    }
    // The less common ones only when the message has their box (as it was read).
    let more = p.more.as_deref();
    let mut flags = bit(p.content_type.is_some(), CONTENT_TYPE)
        | bit(p.headers.is_some(), HEADERS)
        | bit(p.delivery_mode.is_some(), DELIVERY_MODE)
        | bit(p.priority.is_some(), PRIORITY)
        | bit(p.timestamp.is_some(), TIMESTAMP);
    if let Some(m) = more {
        flags |= bit(m.content_encoding.is_some(), CONTENT_ENCODING)
            | bit(m.correlation_id.is_some(), CORRELATION_ID)
            | bit(m.reply_to.is_some(), REPLY_TO)
            | bit(m.expiration.is_some(), EXPIRATION)
            | bit(m.message_id.is_some(), MESSAGE_ID)
            | bit(m.kind.is_some(), TYPE)
            | bit(m.user_id.is_some(), USER_ID)
            | bit(m.app_id.is_some(), APP_ID)
            | bit(m.cluster_id.is_some(), CLUSTER_ID);
    }
    out.put_u16(flags);
    if flags == 0 {
        return Ok(());
    }
    short(out, &p.content_type, "content-type")?;
    if let Some(m) = more {
        short(out, &m.content_encoding, "content-encoding")?;
    }
    if let Some(h) = &p.headers {
        write_table(out, h, "headers")?;
    }
    if let Some(mode) = p.delivery_mode {
        out.put_u8(match mode {
            DeliveryMode::Transient => 1,
            DeliveryMode::Persistent => 2,
        });
    }
    if let Some(priority) = p.priority {
        out.put_u8(priority);
    }
    if let Some(m) = more {
        short(out, &m.correlation_id, "correlation-id")?;
        short(out, &m.reply_to, "reply-to")?;
        short(out, &m.expiration, "expiration")?;
        short(out, &m.message_id, "message-id")?;
    }
    if let Some(ts) = p.timestamp {
        out.put_u64(ts);
    }
    if let Some(m) = more {
        short(out, &m.kind, "type")?;
        short(out, &m.user_id, "user-id")?;
        short(out, &m.app_id, "app-id")?;
        short(out, &m.cluster_id, "cluster-id")?;
    }
    Ok(())
}

/// Reads just the body size of a header payload without decoding properties, for a driver
/// that wants to check the size limit first.
pub fn peek_body_size(payload: &[u8]) -> Option<u64> {
    let mut p = payload.get(4..12)?;
    Some(p.get_u64())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::codec::method::{BASIC_PROPERTY_NAMES, BASIC_PROPERTY_TYPES};
    use crate::codec::table::tests::{arb_field_table, arb_short_string};
    use ferry_core::message::{FieldTable, FieldValue};
    use proptest::prelude::*;

    #[test]
    fn property_order_matches_the_spec() {
        assert_eq!(
            BASIC_PROPERTY_NAMES,
            [
                "content-type",
                "content-encoding",
                "headers",
                "delivery-mode",
                "priority",
                "correlation-id",
                "reply-to",
                "expiration",
                "message-id",
                "timestamp",
                "type",
                "user-id",
                "app-id",
                "cluster-id"
            ]
        );
        assert_eq!(BASIC_PROPERTY_TYPES[2], "table");
        assert_eq!(BASIC_PROPERTY_TYPES[3], "octet");
        assert_eq!(BASIC_PROPERTY_TYPES[4], "octet");
        assert_eq!(BASIC_PROPERTY_TYPES[9], "timestamp");
        let shortstrs = [0, 1, 5, 6, 7, 8, 10, 11, 12, 13];
        assert!(shortstrs.iter().all(|&i| BASIC_PROPERTY_TYPES[i] == "shortstr"));
    }

    #[test]
    fn golden_header_with_some_properties() {
        let mut headers = FieldTable::new();
        headers.insert("k", FieldValue::I32(1));
        let p = Properties {
            content_type: Some("text/plain".into()),
            headers: Some(headers),
            delivery_mode: Some(DeliveryMode::Persistent),
            timestamp: Some(0x0102),
            ..Default::default()
        }
        .with_more(MoreProperties { cluster_id: Some("c".into()), ..Default::default() });
        let mut out = BytesMut::new();
        ContentHeader::basic(5, p.clone()).encode(&mut out).unwrap();
        let mut expected = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
        expected.extend_from_slice(&(CONTENT_TYPE | HEADERS | DELIVERY_MODE | TIMESTAMP | CLUSTER_ID).to_be_bytes());
        expected.extend_from_slice(b"\x0atext/plain");
        expected.extend_from_slice(b"\x00\x00\x00\x07\x01kI\x00\x00\x00\x01");
        expected.push(2);
        expected.extend_from_slice(&0x0102u64.to_be_bytes());
        expected.extend_from_slice(b"\x01c");
        assert_eq!(&out[..], &expected[..]);
        assert_eq!(ContentHeader::decode(out.freeze()).unwrap(), ContentHeader::basic(5, p));
    }

    #[test]
    fn golden_header_with_every_property() {
        // The less common properties sit between the common ones on the wire: each in its place.
        let mut headers = FieldTable::new();
        headers.insert("h", FieldValue::Bool(true));
        let p = Properties {
            content_type: Some("a".into()),
            headers: Some(headers),
            delivery_mode: Some(DeliveryMode::Transient),
            priority: Some(9),
            timestamp: Some(7),
            ..Default::default()
        }
        .with_more(MoreProperties {
            content_encoding: Some("b".into()),
            correlation_id: Some("c".into()),
            reply_to: Some("d".into()),
            expiration: Some("5".into()),
            message_id: Some("e".into()),
            kind: Some("f".into()),
            user_id: Some("g".into()),
            app_id: Some("h".into()),
            cluster_id: Some("i".into()),
        });
        let mut out = BytesMut::new();
        ContentHeader::basic(0, p.clone()).encode(&mut out).unwrap();
        let mut expected = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfc];
        expected.extend_from_slice(b"\x01a\x01b");
        expected.extend_from_slice(b"\x00\x00\x00\x04\x01ht\x01");
        expected.extend_from_slice(&[1, 9]);
        expected.extend_from_slice(b"\x01c\x01d\x015\x01e");
        expected.extend_from_slice(&7u64.to_be_bytes());
        expected.extend_from_slice(b"\x01f\x01g\x01h\x01i");
        assert_eq!(&out[..], &expected[..]);
        assert_eq!(ContentHeader::decode(out.freeze()).unwrap(), ContentHeader::basic(0, p));

        // Only the common ones: no box for the others, and the same bytes back.
        let common = Properties { priority: Some(1), timestamp: Some(2), ..Default::default() };
        let mut out = BytesMut::new();
        ContentHeader::basic(0, common.clone()).encode(&mut out).unwrap();
        let decoded = ContentHeader::decode(out.freeze()).unwrap();
        assert!(decoded.properties.more.is_none());
        assert_eq!(decoded.properties, common);
        // A box of nothing writes what no box writes.
        let mut a = BytesMut::new();
        let mut b = BytesMut::new();
        write_properties(&mut a, &common).unwrap();
        write_properties(&mut b, &common.clone().with_more(MoreProperties::default())).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn continuation_and_unused_flag_bits_are_syntax_errors() {
        for flags in [0x0001u16, 0x0002, 0x8001] {
            let mut wire = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            wire.extend_from_slice(&flags.to_be_bytes());
            let err = ContentHeader::decode(Bytes::from(wire)).unwrap_err();
            assert_eq!(err, HeaderError::Syntax(SyntaxError::UndefinedPropertyFlags(flags)));
            assert_eq!(err.reply_code(), 502);
        }
    }

    #[test]
    fn header_for_a_class_without_content_is_a_frame_error() {
        let wire = Bytes::from_static(&[0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let err = ContentHeader::decode(wire).unwrap_err();
        assert_eq!(err, HeaderError::WrongClass(10));
        assert_eq!(err.reply_code(), 501);
    }

    #[test]
    fn delivery_mode_other_than_1_or_2_is_refused() {
        let mut wire = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        wire.extend_from_slice(&DELIVERY_MODE.to_be_bytes());
        wire.push(3);
        let err = ContentHeader::decode(Bytes::from(wire)).unwrap_err();
        assert_eq!(err, HeaderError::Syntax(SyntaxError::BadDeliveryMode(3)));
    }

    #[test]
    fn truncated_and_trailing_bytes_are_syntax_errors() {
        let mut wire = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        wire.extend_from_slice(&CONTENT_TYPE.to_be_bytes());
        wire.extend_from_slice(b"\x05ab");
        let err = ContentHeader::decode(Bytes::from(wire)).unwrap_err();
        assert_eq!(err, HeaderError::Syntax(SyntaxError::Truncated("content-type")));
        let wire = Bytes::from_static(&[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]);
        assert_eq!(ContentHeader::decode(wire).unwrap_err(), HeaderError::Syntax(SyntaxError::TrailingBytes(1)));
    }

    #[test]
    fn peek_body_size_reads_without_decoding() {
        let mut out = BytesMut::new();
        ContentHeader::basic(123_456, Properties::default()).encode(&mut out).unwrap();
        assert_eq!(peek_body_size(&out), Some(123_456));
        assert_eq!(peek_body_size(&out[..11]), None);
    }

    pub(crate) fn arb_properties() -> impl Strategy<Value = Properties> {
        let s = || proptest::option::of(arb_short_string());
        (
            (s(), s(), proptest::option::of(arb_field_table())),
            proptest::option::of(prop_oneof![Just(DeliveryMode::Transient), Just(DeliveryMode::Persistent)]),
            proptest::option::of(any::<u8>()),
            (s(), s(), s(), s()),
            proptest::option::of(any::<u64>()),
            (s(), s(), s(), s()),
        )
            .prop_map(
                |(
                    (content_type, content_encoding, headers),
                    delivery_mode,
                    priority,
                    (correlation_id, reply_to, expiration, message_id),
                    timestamp,
                    (kind, user_id, app_id, cluster_id),
                )| {
                    Properties { content_type, headers, delivery_mode, priority, timestamp, more: None }.with_more(
                        MoreProperties {
                            content_encoding,
                            correlation_id,
                            reply_to,
                            expiration,
                            message_id,
                            kind,
                            user_id,
                            app_id,
                            cluster_id,
                        },
                    )
                },
            )
    }

    proptest! {
        #[test]
        fn arbitrary_properties_round_trip(p in arb_properties(), size in any::<u64>()) {
            let h = ContentHeader::basic(size, p);
            let mut out = BytesMut::new();
            h.encode(&mut out).unwrap();
            prop_assert_eq!(ContentHeader::decode(out.freeze()).unwrap(), h);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_header_decoder(
            basic in any::<bool>(),
            b in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            // Half the cases get past the class check into the properties.
            let wire = if basic { [&[0, 60, 0, 0][..], &b].concat() } else { b };
            let _ = ContentHeader::decode(Bytes::from(wire));
        }
    }
}
