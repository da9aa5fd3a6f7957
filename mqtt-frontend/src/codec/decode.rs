//! The decoder: check the fixed header (type, flags, size against the limit) as soon as its
//! bytes are there, wait until the whole packet is buffered, split it off and parse it with
//! strings and payload sliced from the packet's `Bytes`.

use bytes::{Buf, Bytes, BytesMut};

use super::error::{malformed, protocol, DecodeError};
use super::packet::*;
use super::properties::{decode_properties, PropCtx};
use super::reader::Reader;
use super::varint::{read_varint, Varint};

/// Reason codes each 5.0 packet may carry (§3.x.2.1 tables); anything else is malformed.
pub(crate) mod valid_reasons {
    pub const CONNACK: &[u8] = &[
        0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97, 0x99, 0x9A,
        0x9B, 0x9C, 0x9D, 0x9F,
    ];
    /// PUBACK and PUBREC.
    pub const PUBACK: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
    /// PUBREL and PUBCOMP.
    pub const PUBREL: &[u8] = &[0x00, 0x92];
    pub const SUBACK: &[u8] = &[0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2];
    pub const SUBACK_V311: &[u8] = &[0x00, 0x01, 0x02, 0x80];
    pub const UNSUBACK: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
    pub const DISCONNECT: &[u8] = &[
        0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97,
        0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
    ];
    pub const AUTH: &[u8] = &[0x00, 0x18, 0x19];
}

fn check_reason(code: u8, valid: &[u8], packet: &str) -> Result<u8, DecodeError> {
    if !valid.contains(&code) {
        return Err(malformed(format!("reason code 0x{code:02X} is not valid in {packet}")));
    }
    Ok(code)
}

/// Incremental MQTT decoder for one connection. It remembers the protocol version from the
/// CONNECT and the maximum packet size it accepts.
#[derive(Debug)]
pub struct Decoder {
    /// The MQTT 5.0 "Maximum Packet Size": the whole packet, fixed header included.
    max_packet_size: u32,
    /// `None` until a CONNECT was decoded; only CONNECT is accepted until then.
    version: Option<ProtocolVersion>,
}

impl Decoder {
    pub fn new(max_packet_size: u32) -> Decoder {
        Decoder { max_packet_size, version: None }
    }

    /// A decoder that already speaks `version`: for the client side of a connection (which
    /// decodes CONNACK and never a CONNECT), tests and benchmarks.
    pub fn with_version(max_packet_size: u32, version: ProtocolVersion) -> Decoder {
        Decoder { max_packet_size, version: Some(version) }
    }

    /// The version of the last CONNECT decoded.
    pub fn version(&self) -> Option<ProtocolVersion> {
        self.version
    }

    pub fn set_max_packet_size(&mut self, max: u32) {
        self.max_packet_size = max;
    }

    /// Whether `buf` starts with a whole PUBLISH (its type and length; nothing else checked,
    /// nothing consumed): what [`Decoder::decode`] will return next is that PUBLISH or an error.
    /// Lets a caller act before decoding it, so that no decoded packet is kept across a wait.
    pub fn whole_publish_next(buf: &[u8]) -> bool {
        match buf.first() {
            Some(&first) if first >> 4 == 3 => match read_varint(&buf[1..]) {
                Varint::Done(v, n) => buf.len() >= 1 + n + v as usize,
                Varint::Incomplete | Varint::TooLong => false,
            },
            _ => false,
        }
    }

    /// Ok(None) = need more bytes (cheap: no allocation, nothing consumed). On Ok(Some) exactly the
    /// packet's bytes are consumed.
    /// Before a CONNECT has been decoded, any other packet type is
    /// `DecodeError::Protocol("first packet must be CONNECT")`. Decoding a CONNECT sets the version
    /// used for all later packets (a second CONNECT is still decoded; the session rejects it).
    /// After an error the buffer's contents are unspecified: close the connection.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        check_first_byte(first, self.version)?;
        let (remaining, len_bytes) = match read_varint(&buf[1..]) {
            Varint::Done(v, n) => (v as usize, n),
            Varint::Incomplete => return Ok(None),
            Varint::TooLong => return Err(malformed("remaining length longer than 4 bytes")),
        };
        let header_len = 1 + len_bytes;
        let size = header_len + remaining;
        if size > self.max_packet_size as usize {
            return Err(DecodeError::TooLarge { size, max: self.max_packet_size });
        }
        if buf.len() < size {
            return Ok(None);
        }
        let mut frame = buf.split_to(size).freeze();
        let packet_type = first >> 4;
        if packet_type == 3 {
            // A PUBLISH's payload is the frame itself, advanced past the variable header: one
            // reference to the read buffer fewer to take and drop per message than a slice of it.
            let v = self.version.ok_or_else(|| protocol("first packet must be CONNECT"))?;
            let mut r = Reader::new(&frame, header_len);
            let mut publish = decode_publish(first, &mut r, v)?;
            let at = r.position();
            frame.advance(at);
            publish.payload = frame;
            return Ok(Some(Packet::Publish(publish)));
        }
        let mut r = Reader::new(&frame, header_len);
        if packet_type == 1 {
            let connect = decode_connect(&mut r)?;
            self.version = Some(connect.version);
            return Ok(Some(Packet::Connect(Box::new(connect))));
        }
        // `check_first_byte` refused everything but CONNECT while the version is unknown.
        let v = self.version.ok_or_else(|| protocol("first packet must be CONNECT"))?;
        let r = &mut r;
        let packet = match packet_type {
            2 => Packet::ConnAck(decode_connack(r, v)?),
            4 => Packet::PubAck(decode_pubresp(r, v, "PUBACK", valid_reasons::PUBACK)?),
            5 => Packet::PubRec(decode_pubresp(r, v, "PUBREC", valid_reasons::PUBACK)?),
            6 => Packet::PubRel(decode_pubresp(r, v, "PUBREL", valid_reasons::PUBREL)?),
            7 => Packet::PubComp(decode_pubresp(r, v, "PUBCOMP", valid_reasons::PUBREL)?),
            8 => Packet::Subscribe(decode_subscribe(r, v)?),
            9 => Packet::SubAck(decode_suback(r, v)?),
            10 => Packet::Unsubscribe(decode_unsubscribe(r, v)?),
            11 => Packet::UnsubAck(decode_unsuback(r, v)?),
            12 => {
                r.finish("PINGREQ")?;
                Packet::PingReq
            }
            13 => {
                r.finish("PINGRESP")?;
                Packet::PingResp
            }
            14 => Packet::Disconnect(decode_disconnect(r, v)?),
            _ => Packet::Auth(decode_auth(r)?),
        };
        Ok(Some(packet))
    }
}

/// Type and flags of the fixed header (3.1.1 §2.2, 5.0 §2.1.3), checked from the first byte alone.
fn check_first_byte(first: u8, version: Option<ProtocolVersion>) -> Result<(), DecodeError> {
    let packet_type = first >> 4;
    let flags = first & 0x0F;
    if packet_type == 0 {
        return Err(malformed("reserved packet type 0"));
    }
    if version.is_none() && packet_type != 1 {
        return Err(protocol("first packet must be CONNECT"));
    }
    if packet_type == 15 && version.is_some_and(|v| !v.is_v5()) {
        return Err(malformed("reserved packet type 15 (AUTH exists only in MQTT 5.0)"));
    }
    match packet_type {
        3 => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(malformed("PUBLISH with QoS 3"));
            }
            if flags & 0b1000 != 0 && qos == 0 {
                return Err(malformed("PUBLISH with DUP set and QoS 0"));
            }
        }
        // 3.1 (§2.1) sets DUP on a resent PUBREL, SUBSCRIBE or UNSUBSCRIBE; 3.1.1 fixed the bits.
        6 | 8 | 10 if version == Some(ProtocolVersion::V31) && flags == 0b1010 => {}
        6 | 8 | 10 if flags != 0b0010 => {
            return Err(malformed(format!("packet type {packet_type} with fixed header flags {flags:#06b}")));
        }
        6 | 8 | 10 => {}
        _ if flags != 0 => {
            return Err(malformed(format!("packet type {packet_type} with fixed header flags {flags:#06b}")));
        }
        _ => {}
    }
    Ok(())
}

fn packet_id(r: &mut Reader<'_>, packet: &str) -> Result<u16, DecodeError> {
    let id = r.u16(packet)?;
    if id == 0 {
        return Err(malformed(format!("packet identifier 0 in {packet}")));
    }
    Ok(id)
}

/// A topic name must not hold wildcards (both versions, §4.7.1). U+0000 is refused by the string
/// check already.
fn check_topic_name(topic: &Str) -> Result<(), DecodeError> {
    if topic.bytes().iter().any(|&b| b == b'+' || b == b'#') {
        return Err(DecodeError::TopicNameInvalid(format!("{topic:?} contains a wildcard")));
    }
    Ok(())
}

fn decode_connect(r: &mut Reader<'_>) -> Result<Connect, DecodeError> {
    let name = r.binary("protocol name")?;
    let level = r.u8("protocol level")?;
    // 0x80 on a 3.1 / 3.1.1 level marks a bridge (`Connect::bridge`); 5.0 has no such mark.
    let bridge = level & 0x80 != 0;
    let version = match (&name[..], level & 0x7F) {
        (b"MQIsdp", 3) => ProtocolVersion::V31,
        (b"MQTT", 4) => ProtocolVersion::V311,
        (b"MQTT", 5) if !bridge => ProtocolVersion::V5,
        _ => return Err(DecodeError::UnsupportedProtocol { name: String::from_utf8_lossy(&name).into_owned(), level }),
    };
    let flags = r.u8("connect flags")?;
    if flags & 0x01 != 0 {
        return Err(malformed("reserved connect flag set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    let Some(will_qos) = QoS::from_u8(will_qos) else {
        return Err(malformed("will QoS 3"));
    };
    if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(malformed("will QoS or will retain set without the will flag"));
    }
    if !version.is_v5() && password_flag && !username_flag {
        return Err(malformed("password flag without user name flag"));
    }
    let keep_alive = r.u16("keep alive")?;
    let properties =
        if version == ProtocolVersion::V5 { decode_properties(r, PropCtx::Connect)? } else { Properties::default() };
    let client_id = r.string("client identifier")?;
    let will = if will_flag {
        let properties =
            if version == ProtocolVersion::V5 { decode_properties(r, PropCtx::Will)? } else { Properties::default() };
        let topic = r.string("will topic")?;
        if topic.is_empty() {
            return Err(DecodeError::TopicNameInvalid("empty will topic".into()));
        }
        check_topic_name(&topic)?;
        let payload = r.binary("will payload")?;
        Some(Will { topic, payload, qos: will_qos, retain: will_retain, properties })
    } else {
        None
    };
    let username = if username_flag { Some(r.string("user name")?) } else { None };
    let password = if password_flag { Some(r.binary("password")?) } else { None };
    r.finish("CONNECT")?;
    Ok(Connect { version, bridge, clean_start, keep_alive, client_id, will, username, password, properties })
}

fn decode_connack(r: &mut Reader<'_>, v: ProtocolVersion) -> Result<ConnAck, DecodeError> {
    let flags = r.u8("connect acknowledge flags")?;
    if flags & 0xFE != 0 {
        return Err(malformed("reserved connect acknowledge flags set"));
    }
    let code = r.u8("connect return code")?;
    let properties = match v {
        ProtocolVersion::V31 | ProtocolVersion::V311 => {
            if code > 5 {
                return Err(malformed(format!("CONNACK return code {code}")));
            }
            Properties::default()
        }
        ProtocolVersion::V5 => {
            check_reason(code, valid_reasons::CONNACK, "CONNACK")?;
            decode_properties(r, PropCtx::ConnAck)?
        }
    };
    r.finish("CONNACK")?;
    Ok(ConnAck { session_present: flags & 0x01 != 0, code, properties })
}

fn decode_publish(first: u8, r: &mut Reader<'_>, v: ProtocolVersion) -> Result<Publish, DecodeError> {
    let dup = first & 0x08 != 0;
    let qos = QoS::from_u8((first >> 1) & 0b11).ok_or_else(|| malformed("PUBLISH with QoS 3"))?;
    let retain = first & 0x01 != 0;
    let topic = r.string("topic name")?;
    check_topic_name(&topic)?;
    let packet_id = if qos == QoS::AtMostOnce { None } else { Some(packet_id(r, "PUBLISH")?) };
    let properties = match v {
        ProtocolVersion::V31 | ProtocolVersion::V311 => Properties::default(),
        ProtocolVersion::V5 => decode_properties(r, PropCtx::Publish)?,
    };
    if topic.is_empty() {
        match v {
            ProtocolVersion::V31 | ProtocolVersion::V311 => return Err(malformed("empty topic name")),
            ProtocolVersion::V5 if properties.topic_alias.is_none() => {
                return Err(DecodeError::TopicNameInvalid("empty topic name without a topic alias".into()))
            }
            ProtocolVersion::V5 => {}
        }
    }
    // The payload is the rest of the frame; `Decoder::decode` puts it in.
    Ok(Publish { dup, qos, retain, topic, packet_id, properties, payload: Bytes::new() })
}

fn decode_pubresp(
    r: &mut Reader<'_>,
    v: ProtocolVersion,
    packet: &str,
    reasons: &[u8],
) -> Result<PubResp, DecodeError> {
    let packet_id = packet_id(r, packet)?;
    let mut resp = PubResp::ok(packet_id);
    // 5.0 §3.4.2.1: remaining length 2 means success and no properties; < 4 means no properties.
    if v == ProtocolVersion::V5 && !r.is_empty() {
        resp.reason = check_reason(r.u8(packet)?, reasons, packet)?;
        if !r.is_empty() {
            resp.properties = decode_properties(r, PropCtx::PubResp)?;
        }
    }
    r.finish(packet)?;
    Ok(resp)
}

fn sub_options(byte: u8, v: ProtocolVersion) -> Result<SubOptions, DecodeError> {
    let reserved = match v {
        ProtocolVersion::V31 | ProtocolVersion::V311 => 0xFC,
        ProtocolVersion::V5 => 0xC0,
    };
    if byte & reserved != 0 {
        return Err(malformed(format!("reserved subscription option bits set in {byte:#010b}")));
    }
    let qos = QoS::from_u8(byte & 0b11).ok_or_else(|| malformed("subscription with QoS 3"))?;
    let retain_handling = (byte >> 4) & 0b11;
    if retain_handling == 3 {
        return Err(malformed("retain handling 3"));
    }
    Ok(SubOptions { qos, no_local: byte & 0x04 != 0, retain_as_published: byte & 0x08 != 0, retain_handling })
}

/// A SUBSCRIBE or UNSUBSCRIBE that ends before its first filter. 5.0 §3.8.3 calls it a Protocol
/// Error, but §4.13.1 lets the server answer any such error with 0x81 or 0x82, and to a reader
/// of the bytes it is a truncated packet: Malformed (0x81), as Mosquitto and 3.1.1 say.
fn no_filters(packet: &str) -> DecodeError {
    malformed(format!("{packet} without a topic filter"))
}

fn decode_subscribe(r: &mut Reader<'_>, v: ProtocolVersion) -> Result<Subscribe, DecodeError> {
    let packet_id = packet_id(r, "SUBSCRIBE")?;
    let properties = match v {
        ProtocolVersion::V31 | ProtocolVersion::V311 => Properties::default(),
        ProtocolVersion::V5 => decode_properties(r, PropCtx::Subscribe)?,
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string("topic filter")?;
        let options = sub_options(r.u8("subscription options")?, v)?;
        filters.push((filter, options));
    }
    if filters.is_empty() {
        return Err(no_filters("SUBSCRIBE"));
    }
    Ok(Subscribe { packet_id, properties, filters })
}

fn decode_suback(r: &mut Reader<'_>, v: ProtocolVersion) -> Result<SubAck, DecodeError> {
    let packet_id = packet_id(r, "SUBACK")?;
    let (properties, valid) = match v {
        ProtocolVersion::V31 | ProtocolVersion::V311 => (Properties::default(), valid_reasons::SUBACK_V311),
        ProtocolVersion::V5 => (decode_properties(r, PropCtx::SubAck)?, valid_reasons::SUBACK),
    };
    let reasons = r.rest();
    if reasons.is_empty() {
        return Err(malformed("SUBACK without a reason code"));
    }
    for &code in reasons.iter() {
        check_reason(code, valid, "SUBACK")?;
    }
    Ok(SubAck { packet_id, properties, reasons: reasons.to_vec() })
}

fn decode_unsubscribe(r: &mut Reader<'_>, v: ProtocolVersion) -> Result<Unsubscribe, DecodeError> {
    let packet_id = packet_id(r, "UNSUBSCRIBE")?;
    let properties = match v {
        ProtocolVersion::V31 | ProtocolVersion::V311 => Properties::default(),
        ProtocolVersion::V5 => decode_properties(r, PropCtx::Unsubscribe)?,
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.string("topic filter")?);
    }
    if filters.is_empty() {
        return Err(no_filters("UNSUBSCRIBE"));
    }
    Ok(Unsubscribe { packet_id, properties, filters })
}

fn decode_unsuback(r: &mut Reader<'_>, v: ProtocolVersion) -> Result<UnsubAck, DecodeError> {
    let packet_id = packet_id(r, "UNSUBACK")?;
    match v {
        ProtocolVersion::V31 | ProtocolVersion::V311 => {
            r.finish("UNSUBACK")?;
            Ok(UnsubAck { packet_id, properties: Properties::default(), reasons: Vec::new() })
        }
        ProtocolVersion::V5 => {
            let properties = decode_properties(r, PropCtx::UnsubAck)?;
            let reasons = r.rest();
            if reasons.is_empty() {
                return Err(malformed("UNSUBACK without a reason code"));
            }
            for &code in reasons.iter() {
                check_reason(code, valid_reasons::UNSUBACK, "UNSUBACK")?;
            }
            Ok(UnsubAck { packet_id, properties, reasons: reasons.to_vec() })
        }
    }
}

fn decode_disconnect(r: &mut Reader<'_>, v: ProtocolVersion) -> Result<Disconnect, DecodeError> {
    let mut d = Disconnect { reason: 0, properties: Properties::default() };
    // 5.0 §3.14.2: remaining length 0 means normal disconnection, < 2 means no properties.
    if v == ProtocolVersion::V5 && !r.is_empty() {
        d.reason = check_reason(r.u8("DISCONNECT")?, valid_reasons::DISCONNECT, "DISCONNECT")?;
        if !r.is_empty() {
            d.properties = decode_properties(r, PropCtx::Disconnect)?;
        }
    }
    r.finish("DISCONNECT")?;
    Ok(d)
}

fn decode_auth(r: &mut Reader<'_>) -> Result<Auth, DecodeError> {
    let mut a = Auth { reason: 0, properties: Properties::default() };
    // 5.0 §3.15.2: reason code and property length are omitted together (remaining length 0).
    if !r.is_empty() {
        a.reason = check_reason(r.u8("AUTH")?, valid_reasons::AUTH, "AUTH")?;
        a.properties = decode_properties(r, PropCtx::Auth)?;
    }
    r.finish("AUTH")?;
    Ok(a)
}
