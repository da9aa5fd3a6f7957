//! MQTT 5.0 properties (§2.2.2): decoding with the per-packet rules of table 2-4, length and
//! encoding. 3.1.1 has no properties; callers do not come here for it.

use bytes::Bytes;

use super::encode::Out;
use super::error::{malformed, protocol, DecodeError};
use super::packet::{Properties, Str};
use super::reader::Reader;
use super::varint::{varint_len, write_varint, VARINT_MAX};

/// Where a property list sits; decides which properties are allowed (5.0 table 2-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PropCtx {
    Connect,
    Will,
    ConnAck,
    Publish,
    /// PUBACK, PUBREC, PUBREL, PUBCOMP.
    PubResp,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

impl PropCtx {
    const fn bit(self) -> u16 {
        1 << self as u16
    }

    fn name(self) -> &'static str {
        match self {
            PropCtx::Connect => "CONNECT",
            PropCtx::Will => "will properties",
            PropCtx::ConnAck => "CONNACK",
            PropCtx::Publish => "PUBLISH",
            PropCtx::PubResp => "PUBACK/PUBREC/PUBREL/PUBCOMP",
            PropCtx::Subscribe => "SUBSCRIBE",
            PropCtx::SubAck => "SUBACK",
            PropCtx::Unsubscribe => "UNSUBSCRIBE",
            PropCtx::UnsubAck => "UNSUBACK",
            PropCtx::Disconnect => "DISCONNECT",
            PropCtx::Auth => "AUTH",
        }
    }
}

const CONNECT: u16 = PropCtx::Connect.bit();
const WILL: u16 = PropCtx::Will.bit();
const CONNACK: u16 = PropCtx::ConnAck.bit();
const PUBLISH: u16 = PropCtx::Publish.bit();
const PUBRESP: u16 = PropCtx::PubResp.bit();
const SUBSCRIBE: u16 = PropCtx::Subscribe.bit();
const SUBACK: u16 = PropCtx::SubAck.bit();
const UNSUBSCRIBE: u16 = PropCtx::Unsubscribe.bit();
const UNSUBACK: u16 = PropCtx::UnsubAck.bit();
const DISCONNECT: u16 = PropCtx::Disconnect.bit();
const AUTH: u16 = PropCtx::Auth.bit();
const ALL: u16 =
    CONNECT | WILL | CONNACK | PUBLISH | PUBRESP | SUBSCRIBE | SUBACK | UNSUBSCRIBE | UNSUBACK | DISCONNECT | AUTH;

/// Table 2-4: the packets (and will properties) a property identifier may appear in; `None` for
/// an identifier 5.0 does not define.
fn allowed_in(id: u32) -> Option<u16> {
    Some(match id {
        0x01 | 0x02 | 0x03 | 0x08 | 0x09 => PUBLISH | WILL,
        0x0B => PUBLISH | SUBSCRIBE,
        0x11 => CONNECT | CONNACK | DISCONNECT,
        0x12 | 0x13 | 0x1A | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => CONNACK,
        0x15 | 0x16 => CONNECT | CONNACK | AUTH,
        0x17 | 0x19 => CONNECT,
        0x18 => WILL,
        0x1C => CONNACK | DISCONNECT,
        0x1F => CONNACK | PUBRESP | SUBACK | UNSUBACK | DISCONNECT | AUTH,
        0x21 | 0x22 | 0x27 => CONNECT | CONNACK,
        0x23 => PUBLISH,
        0x26 => ALL,
        _ => return None,
    })
}

fn once<T>(slot: &mut Option<T>, value: T, id: u32) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(protocol(format!("property 0x{id:02X} given twice")));
    }
    *slot = Some(value);
    Ok(())
}

/// A byte that must be 0 or 1.
fn flag(v: u8, id: u32) -> Result<u8, DecodeError> {
    if v > 1 {
        return Err(protocol(format!("property 0x{id:02X} must be 0 or 1, got {v}")));
    }
    Ok(v)
}

/// Reads a Property Length and the properties it covers.
pub(crate) fn decode_properties(r: &mut Reader<'_>, ctx: PropCtx) -> Result<Properties, DecodeError> {
    let len = r.varint("property length")? as usize;
    let mut r = r.sub(len, "properties")?;
    let mut p = Properties::default();
    while !r.is_empty() {
        let id = r.varint("property identifier")?;
        let Some(mask) = allowed_in(id) else {
            return Err(malformed(format!("unknown property identifier 0x{id:02X}")));
        };
        if mask & ctx.bit() == 0 {
            // §2.2.2.2: "A Control Packet which contains an Identifier which is not valid for
            // its packet type ... is a Malformed Packet."
            return Err(malformed(format!("property 0x{id:02X} is not allowed in {}", ctx.name())));
        }
        match id {
            // Any byte: §3.3.2.3.2 defines 0 and 1 but, unlike the other one-byte flags, does
            // not make other values an error, and Mosquitto forwards them unchanged. Only 1
            // promises UTF-8.
            0x01 => once(&mut p.payload_format_indicator, r.u8("payload format indicator")?, id)?,
            0x02 => once(&mut p.message_expiry_interval, r.u32("message expiry interval")?, id)?,
            0x03 => once(&mut p.content_type, r.string("content type")?, id)?,
            0x08 => once(&mut p.response_topic, r.string("response topic")?, id)?,
            0x09 => once(&mut p.correlation_data, r.binary("correlation data")?, id)?,
            0x0B => {
                let v = r.varint("subscription identifier")?;
                if v == 0 {
                    // §3.8.2.1.2 calls 0 a Protocol Error; §4.13.1 allows 0x81 or 0x82 for
                    // it, and Mosquitto (whose tests clients are written against) sends 0x81.
                    return Err(malformed("subscription identifier 0"));
                }
                if ctx == PropCtx::Subscribe && !p.subscription_identifiers.is_empty() {
                    return Err(protocol("more than one subscription identifier in SUBSCRIBE"));
                }
                p.subscription_identifiers.push(v);
            }
            0x11 => once(&mut p.session_expiry_interval, r.u32("session expiry interval")?, id)?,
            0x12 => once(&mut p.assigned_client_identifier, r.string("assigned client identifier")?, id)?,
            0x13 => once(&mut p.server_keep_alive, r.u16("server keep alive")?, id)?,
            0x15 => once(&mut p.authentication_method, r.string("authentication method")?, id)?,
            0x16 => once(&mut p.authentication_data, r.binary("authentication data")?, id)?,
            0x17 => once(&mut p.request_problem_information, flag(r.u8("request problem information")?, id)?, id)?,
            0x18 => once(&mut p.will_delay_interval, r.u32("will delay interval")?, id)?,
            0x19 => once(&mut p.request_response_information, flag(r.u8("request response information")?, id)?, id)?,
            0x1A => once(&mut p.response_information, r.string("response information")?, id)?,
            0x1C => once(&mut p.server_reference, r.string("server reference")?, id)?,
            0x1F => once(&mut p.reason_string, r.string("reason string")?, id)?,
            0x21 => {
                let v = r.u16("receive maximum")?;
                if v == 0 {
                    return Err(protocol("receive maximum 0"));
                }
                once(&mut p.receive_maximum, v, id)?
            }
            0x22 => once(&mut p.topic_alias_maximum, r.u16("topic alias maximum")?, id)?,
            0x23 => {
                let v = r.u16("topic alias")?;
                if v == 0 {
                    return Err(protocol("topic alias 0"));
                }
                once(&mut p.topic_alias, v, id)?
            }
            0x24 => once(&mut p.maximum_qos, flag(r.u8("maximum QoS")?, id)?, id)?,
            0x25 => once(&mut p.retain_available, flag(r.u8("retain available")?, id)?, id)?,
            0x26 => {
                let k = r.string("user property name")?;
                let v = r.string("user property value")?;
                p.user_properties.push((k, v));
            }
            0x27 => {
                let v = r.u32("maximum packet size")?;
                if v == 0 {
                    return Err(protocol("maximum packet size 0"));
                }
                once(&mut p.maximum_packet_size, v, id)?
            }
            0x28 => {
                once(&mut p.wildcard_subscription_available, flag(r.u8("wildcard subscription available")?, id)?, id)?
            }
            0x29 => once(
                &mut p.subscription_identifier_available,
                flag(r.u8("subscription identifier available")?, id)?,
                id,
            )?,
            0x2A => once(&mut p.shared_subscription_available, flag(r.u8("shared subscription available")?, id)?, id)?,
            // `allowed_in` returned Some only for the identifiers above.
            _ => return Err(malformed(format!("unknown property identifier 0x{id:02X}"))),
        }
    }
    Ok(p)
}

fn str_len(s: &Option<Str>) -> usize {
    s.as_ref().map_or(0, |s| 3 + s.len())
}

fn bin_len(b: &Option<Bytes>) -> usize {
    b.as_ref().map_or(0, |b| 3 + b.len())
}

fn fixed_len<T>(v: &Option<T>, n: usize) -> usize {
    if v.is_some() {
        1 + n
    } else {
        0
    }
}

/// The bytes the properties take after the Property Length (which is not included).
pub(crate) fn properties_len(p: &Properties) -> usize {
    let Some(p) = p.values() else { return 0 };
    fixed_len(&p.payload_format_indicator, 1)
        + fixed_len(&p.message_expiry_interval, 4)
        + str_len(&p.content_type)
        + str_len(&p.response_topic)
        + bin_len(&p.correlation_data)
        + p.subscription_identifiers.iter().map(|&v| 1 + varint_len(v as usize)).sum::<usize>()
        + fixed_len(&p.session_expiry_interval, 4)
        + str_len(&p.assigned_client_identifier)
        + fixed_len(&p.server_keep_alive, 2)
        + str_len(&p.authentication_method)
        + bin_len(&p.authentication_data)
        + fixed_len(&p.request_problem_information, 1)
        + fixed_len(&p.will_delay_interval, 4)
        + fixed_len(&p.request_response_information, 1)
        + str_len(&p.response_information)
        + str_len(&p.server_reference)
        + str_len(&p.reason_string)
        + fixed_len(&p.receive_maximum, 2)
        + fixed_len(&p.topic_alias_maximum, 2)
        + fixed_len(&p.topic_alias, 2)
        + fixed_len(&p.maximum_qos, 1)
        + fixed_len(&p.retain_available, 1)
        + p.user_properties.iter().map(|(k, v)| 5 + k.len() + v.len()).sum::<usize>()
        + fixed_len(&p.maximum_packet_size, 4)
        + fixed_len(&p.wildcard_subscription_available, 1)
        + fixed_len(&p.subscription_identifier_available, 1)
        + fixed_len(&p.shared_subscription_available, 1)
}

/// Property Length plus properties: what a property list adds to the remaining length.
pub(crate) fn properties_field_len(content_len: usize) -> usize {
    varint_len(content_len) + content_len
}

pub(crate) fn put_str(out: &mut impl Out, s: &Str) {
    put_bin(out, s.bytes());
}

pub(crate) fn put_bin(out: &mut impl Out, b: &[u8]) {
    out.put_u16(b.len() as u16);
    out.put_slice(b);
}

/// Writes the Property Length (`content_len`, from [`properties_len`]) and the properties, in
/// identifier order. Properties are written as given, whether or not the packet allows them.
pub(crate) fn write_properties(out: &mut impl Out, p: &Properties, content_len: usize) {
    write_varint(out, content_len);
    if content_len == 0 {
        return;
    }
    if let Some(v) = p.payload_format_indicator {
        out.put_slice(&[0x01, v]);
    }
    if let Some(v) = p.message_expiry_interval {
        out.put_u8(0x02);
        out.put_u32(v);
    }
    if let Some(v) = &p.content_type {
        out.put_u8(0x03);
        put_str(out, v);
    }
    if let Some(v) = &p.response_topic {
        out.put_u8(0x08);
        put_str(out, v);
    }
    if let Some(v) = &p.correlation_data {
        out.put_u8(0x09);
        put_bin(out, v);
    }
    for &v in &p.subscription_identifiers {
        out.put_u8(0x0B);
        write_varint(out, v.min(VARINT_MAX) as usize);
    }
    if let Some(v) = p.session_expiry_interval {
        out.put_u8(0x11);
        out.put_u32(v);
    }
    if let Some(v) = &p.assigned_client_identifier {
        out.put_u8(0x12);
        put_str(out, v);
    }
    if let Some(v) = p.server_keep_alive {
        out.put_u8(0x13);
        out.put_u16(v);
    }
    if let Some(v) = &p.authentication_method {
        out.put_u8(0x15);
        put_str(out, v);
    }
    if let Some(v) = &p.authentication_data {
        out.put_u8(0x16);
        put_bin(out, v);
    }
    if let Some(v) = p.request_problem_information {
        out.put_slice(&[0x17, v]);
    }
    if let Some(v) = p.will_delay_interval {
        out.put_u8(0x18);
        out.put_u32(v);
    }
    if let Some(v) = p.request_response_information {
        out.put_slice(&[0x19, v]);
    }
    if let Some(v) = &p.response_information {
        out.put_u8(0x1A);
        put_str(out, v);
    }
    if let Some(v) = &p.server_reference {
        out.put_u8(0x1C);
        put_str(out, v);
    }
    if let Some(v) = &p.reason_string {
        out.put_u8(0x1F);
        put_str(out, v);
    }
    if let Some(v) = p.receive_maximum {
        out.put_u8(0x21);
        out.put_u16(v);
    }
    if let Some(v) = p.topic_alias_maximum {
        out.put_u8(0x22);
        out.put_u16(v);
    }
    if let Some(v) = p.topic_alias {
        out.put_u8(0x23);
        out.put_u16(v);
    }
    if let Some(v) = p.maximum_qos {
        out.put_slice(&[0x24, v]);
    }
    if let Some(v) = p.retain_available {
        out.put_slice(&[0x25, v]);
    }
    for (k, v) in &p.user_properties {
        out.put_u8(0x26);
        put_str(out, k);
        put_str(out, v);
    }
    if let Some(v) = p.maximum_packet_size {
        out.put_u8(0x27);
        out.put_u32(v);
    }
    if let Some(v) = p.wildcard_subscription_available {
        out.put_slice(&[0x28, v]);
    }
    if let Some(v) = p.subscription_identifier_available {
        out.put_slice(&[0x29, v]);
    }
    if let Some(v) = p.shared_subscription_available {
        out.put_slice(&[0x2A, v]);
    }
}

/// Keeps only the properties `ctx` allows (test generators build arbitrary properties and then
/// restrict them to a packet).
#[cfg(test)]
pub(crate) fn restrict(mut p: Properties, ctx: PropCtx) -> Properties {
    let ok = |id: u32| allowed_in(id).is_some_and(|m| m & ctx.bit() != 0);
    fn clear<T>(keep: bool, v: &mut Option<T>) {
        if !keep {
            *v = None;
        }
    }
    clear(ok(0x01), &mut p.payload_format_indicator);
    clear(ok(0x02), &mut p.message_expiry_interval);
    clear(ok(0x03), &mut p.content_type);
    clear(ok(0x08), &mut p.response_topic);
    clear(ok(0x09), &mut p.correlation_data);
    if !ok(0x0B) {
        p.subscription_identifiers.clear();
    } else if ctx == PropCtx::Subscribe {
        p.subscription_identifiers.truncate(1);
    }
    clear(ok(0x11), &mut p.session_expiry_interval);
    clear(ok(0x12), &mut p.assigned_client_identifier);
    clear(ok(0x13), &mut p.server_keep_alive);
    clear(ok(0x15), &mut p.authentication_method);
    clear(ok(0x16), &mut p.authentication_data);
    clear(ok(0x17), &mut p.request_problem_information);
    clear(ok(0x18), &mut p.will_delay_interval);
    clear(ok(0x19), &mut p.request_response_information);
    clear(ok(0x1A), &mut p.response_information);
    clear(ok(0x1C), &mut p.server_reference);
    clear(ok(0x1F), &mut p.reason_string);
    clear(ok(0x21), &mut p.receive_maximum);
    clear(ok(0x22), &mut p.topic_alias_maximum);
    clear(ok(0x23), &mut p.topic_alias);
    clear(ok(0x24), &mut p.maximum_qos);
    clear(ok(0x25), &mut p.retain_available);
    clear(ok(0x27), &mut p.maximum_packet_size);
    clear(ok(0x28), &mut p.wildcard_subscription_available);
    clear(ok(0x29), &mut p.subscription_identifier_available);
    clear(ok(0x2A), &mut p.shared_subscription_available);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8], ctx: PropCtx) -> Result<Properties, DecodeError> {
        let b = Bytes::copy_from_slice(bytes);
        let mut r = Reader::new(&b, 0);
        let p = decode_properties(&mut r, ctx)?;
        r.finish("test")?;
        Ok(p)
    }

    fn encode(p: &Properties) -> Vec<u8> {
        let mut out = bytes::BytesMut::new();
        write_properties(&mut out, p, properties_len(p));
        out.to_vec()
    }

    #[test]
    fn empty_property_list_is_a_single_zero_byte() {
        assert_eq!(encode(&Properties::default()), [0]);
        assert_eq!(decode(&[0], PropCtx::Publish).unwrap(), Properties::default());
    }

    #[test]
    fn every_property_is_encoded_with_its_identifier() {
        let p = crate::codec::PropertyValues {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(0x0102_0304),
            content_type: Some("t".into()),
            subscription_identifiers: vec![200],
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        }
        .into();
        let bytes = encode(&p);
        #[rustfmt::skip]
        let expected = [
            21,
            0x01, 1,
            0x02, 1, 2, 3, 4,
            0x03, 0, 1, b't',
            0x0B, 0xC8, 0x01,
            0x26, 0, 1, b'k', 0, 1, b'v',
        ];
        assert_eq!(bytes, expected);
        assert_eq!(decode(&bytes, PropCtx::Publish).unwrap(), p);
    }

    #[test]
    fn unknown_property_identifier_is_malformed() {
        assert!(matches!(decode(&[2, 0x04, 0], PropCtx::Publish), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn property_not_allowed_in_the_packet_is_malformed() {
        // §2.2.2.2 (issue 14; it was a protocol error, 0x82, before).
        // Topic alias in CONNECT.
        assert!(matches!(decode(&[3, 0x23, 0, 1], PropCtx::Connect), Err(DecodeError::Malformed(_))));
        // Will delay interval outside the will properties.
        assert!(matches!(decode(&[5, 0x18, 0, 0, 0, 1], PropCtx::Connect), Err(DecodeError::Malformed(_))));
        // Session expiry interval in the will properties.
        assert!(matches!(decode(&[5, 0x11, 0, 0, 0, 1], PropCtx::Will), Err(DecodeError::Malformed(_))));
        // Reason string in PUBLISH.
        assert!(matches!(decode(&[4, 0x1F, 0, 1, b'x'], PropCtx::Publish), Err(DecodeError::Malformed(_))));
        // Session expiry interval in SUBSCRIBE and UNSUBSCRIBE (Mosquitto's 13-malformed-*-v5).
        assert!(matches!(decode(&[5, 0x11, 0, 0, 0, 0], PropCtx::Subscribe), Err(DecodeError::Malformed(_))));
        assert!(matches!(decode(&[5, 0x11, 0, 0, 0, 0], PropCtx::Unsubscribe), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn single_property_given_twice_is_a_protocol_error() {
        assert!(matches!(decode(&[4, 0x01, 0, 0x01, 1], PropCtx::Publish), Err(DecodeError::Protocol(_))));
    }

    #[test]
    fn user_properties_may_repeat_and_keep_their_order() {
        let p = decode(&[12, 0x26, 0, 1, b'a', 0, 0, 0x26, 0, 1, b'a', 0, 0], PropCtx::SubAck).unwrap();
        assert_eq!(p.user_properties, vec![("a".into(), "".into()), ("a".into(), "".into())]);
    }

    #[test]
    fn subscription_identifier_may_repeat_in_publish() {
        let p = decode(&[4, 0x0B, 1, 0x0B, 2], PropCtx::Publish).unwrap();
        assert_eq!(p.subscription_identifiers, vec![1, 2]);
    }

    #[test]
    fn two_subscription_identifiers_in_subscribe_are_a_protocol_error() {
        assert!(matches!(decode(&[4, 0x0B, 1, 0x0B, 2], PropCtx::Subscribe), Err(DecodeError::Protocol(_))));
    }

    #[test]
    fn subscription_identifier_zero_is_malformed_as_mosquitto_says() {
        assert!(matches!(decode(&[2, 0x0B, 0], PropCtx::Subscribe), Err(DecodeError::Malformed(_))));
        assert!(matches!(decode(&[2, 0x0B, 0], PropCtx::Publish), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn out_of_range_values_are_protocol_errors() {
        let cases: &[(&[u8], PropCtx)] = &[
            (&[2, 0x17, 2], PropCtx::Connect),          // request problem information
            (&[2, 0x19, 2], PropCtx::Connect),          // request response information
            (&[3, 0x21, 0, 0], PropCtx::Connect),       // receive maximum 0
            (&[5, 0x27, 0, 0, 0, 0], PropCtx::Connect), // maximum packet size 0
            (&[2, 0x24, 2], PropCtx::ConnAck),          // maximum QoS 2
            (&[2, 0x25, 2], PropCtx::ConnAck),          // retain available
            (&[2, 0x28, 2], PropCtx::ConnAck),          // wildcard subscription available
            (&[2, 0x29, 2], PropCtx::ConnAck),          // subscription identifier available
            (&[2, 0x2A, 2], PropCtx::ConnAck),          // shared subscription available
            (&[3, 0x23, 0, 0], PropCtx::Publish),       // topic alias 0
        ];
        for (bytes, ctx) in cases {
            assert!(matches!(decode(bytes, *ctx), Err(DecodeError::Protocol(_))), "{bytes:?}");
        }
    }

    #[test]
    fn any_payload_format_indicator_is_forwarded() {
        assert_eq!(decode(&[2, 0x01, 0xED], PropCtx::Publish).unwrap().payload_format_indicator, Some(0xED));
        assert_eq!(decode(&[2, 0x01, 2], PropCtx::Will).unwrap().payload_format_indicator, Some(2));
    }

    #[test]
    fn property_length_past_the_packet_is_malformed() {
        assert!(matches!(decode(&[5, 0x01, 1], PropCtx::Publish), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn property_value_past_the_property_length_is_malformed() {
        // Property length 3 but the u32 needs 4 bytes; the fifth byte belongs to what follows.
        assert!(matches!(decode(&[3, 0x02, 0, 0, 0, 1], PropCtx::Publish), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn invalid_utf8_in_a_string_property_is_malformed() {
        assert!(matches!(decode(&[4, 0x03, 0, 1, 0xFF], PropCtx::Publish), Err(DecodeError::Malformed(_))));
        assert!(matches!(decode(&[4, 0x03, 0, 1, 0x00], PropCtx::Publish), Err(DecodeError::Malformed(_))));
    }
}
