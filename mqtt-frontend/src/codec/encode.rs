//! The encoder: every packet computes its remaining length first (shared with
//! [`encoded_len`]), reserves once and writes straight into the output buffer.

use bytes::{BufMut, BytesMut};

/// Where packets are encoded: a `BytesMut`, or a `Vec<u8>` (a session's write buffer: 8 bytes
/// smaller in every connection's state, issue 18).
pub trait Out: BufMut {
    /// Room for `n` more bytes.
    fn reserve_room(&mut self, n: usize);
}

impl Out for BytesMut {
    fn reserve_room(&mut self, n: usize) {
        self.reserve(n);
    }
}

impl Out for Vec<u8> {
    fn reserve_room(&mut self, n: usize) {
        self.reserve(n);
    }
}

use super::packet::*;
use super::properties::{properties_field_len, properties_len, put_bin, put_str, write_properties};
use super::varint::{varint_len, write_varint};

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V311;
const V31: ProtocolVersion = ProtocolVersion::V31;

/// Appends the packet's bytes. Infallible: callers ensure values are in range (string and binary
/// lengths up to 65,535, remaining length up to 268,435,455). 3.1.1 encoding drops 5.0-only fields
/// (properties, reason codes; a SUBACK failure becomes 0x80); AUTH does not exist in 3.1.1 and
/// writes nothing. 3.1 is written as 3.1.1 except that CONNECT carries `MQIsdp` level 3 and
/// CONNACK has no session present flag (its first byte is reserved there); 3.1 has no SUBACK
/// failure code either, so the session never asks for one (it closes instead). Properties are written as given, allowed in the packet or not.
pub fn encode(packet: &Packet, version: ProtocolVersion, out: &mut impl Out) {
    match packet {
        Packet::Publish(p) => write_publish(p, version, out),
        Packet::Connect(c) => write_connect(c, version, out),
        Packet::ConnAck(c) => {
            let (rl, plen) = connack_len(c, version);
            header(out, 0x20, rl);
            out.put_u8(u8::from(c.session_present && version != V31));
            out.put_u8(c.code);
            if version == V5 {
                write_properties(out, &c.properties, plen);
            }
        }
        Packet::PubAck(r) => write_pubresp(0x40, r, version, out),
        Packet::PubRec(r) => write_pubresp(0x50, r, version, out),
        Packet::PubRel(r) => write_pubresp(0x62, r, version, out),
        Packet::PubComp(r) => write_pubresp(0x70, r, version, out),
        Packet::Subscribe(s) => {
            let (rl, plen) = subscribe_len(s, version);
            header(out, 0x82, rl);
            out.put_u16(s.packet_id);
            if version == V5 {
                write_properties(out, &s.properties, plen);
            }
            for (filter, o) in &s.filters {
                put_str(out, filter);
                let mut byte = o.qos as u8;
                if version == V5 {
                    byte |=
                        u8::from(o.no_local) << 2 | u8::from(o.retain_as_published) << 3 | (o.retain_handling & 3) << 4;
                }
                out.put_u8(byte);
            }
        }
        Packet::SubAck(s) => {
            let (rl, plen) = suback_len(s, version);
            header(out, 0x90, rl);
            out.put_u16(s.packet_id);
            match version {
                V5 => {
                    write_properties(out, &s.properties, plen);
                    out.put_slice(&s.reasons);
                }
                V31 | V311 => {
                    for &code in &s.reasons {
                        out.put_u8(if code <= 2 { code } else { 0x80 });
                    }
                }
            }
        }
        Packet::Unsubscribe(u) => {
            let (rl, plen) = unsubscribe_len(u, version);
            header(out, 0xA2, rl);
            out.put_u16(u.packet_id);
            if version == V5 {
                write_properties(out, &u.properties, plen);
            }
            for filter in &u.filters {
                put_str(out, filter);
            }
        }
        Packet::UnsubAck(u) => {
            let (rl, plen) = unsuback_len(u, version);
            header(out, 0xB0, rl);
            out.put_u16(u.packet_id);
            if version == V5 {
                write_properties(out, &u.properties, plen);
                out.put_slice(&u.reasons);
            }
        }
        Packet::PingReq => out.put_slice(&[0xC0, 0]),
        Packet::PingResp => out.put_slice(&[0xD0, 0]),
        Packet::Disconnect(d) => {
            let (rl, plen) = reason_props_len(d.reason, &d.properties, version, 1);
            header(out, 0xE0, rl);
            write_reason_props(out, rl, d.reason, &d.properties, plen);
        }
        Packet::Auth(a) => {
            if version == V5 {
                let (rl, plen) = reason_props_len(a.reason, &a.properties, version, 2);
                header(out, 0xF0, rl);
                write_reason_props(out, rl, a.reason, &a.properties, plen);
            }
        }
    }
}

/// Exact size `encode` would write (for the client's Maximum Packet Size check).
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> usize {
    let rl = match packet {
        Packet::Publish(p) => publish_len(p, version).0,
        Packet::Connect(c) => connect_len(c, version).0,
        Packet::ConnAck(c) => connack_len(c, version).0,
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => pubresp_len(r, version).0,
        Packet::Subscribe(s) => subscribe_len(s, version).0,
        Packet::SubAck(s) => suback_len(s, version).0,
        Packet::Unsubscribe(u) => unsubscribe_len(u, version).0,
        Packet::UnsubAck(u) => unsuback_len(u, version).0,
        Packet::PingReq | Packet::PingResp => 0,
        Packet::Disconnect(d) => reason_props_len(d.reason, &d.properties, version, 1).0,
        Packet::Auth(a) => match version {
            V5 => reason_props_len(a.reason, &a.properties, version, 2).0,
            V31 | V311 => return 0,
        },
    };
    1 + varint_len(rl) + rl
}

#[inline]
fn header(out: &mut impl Out, first: u8, remaining: usize) {
    out.reserve_room(1 + varint_len(remaining) + remaining);
    out.put_u8(first);
    write_varint(out, remaining);
}

/// Properties' contribution to the remaining length (0 in 3.1.1) and their content length.
#[inline]
fn props(p: &Properties, version: ProtocolVersion) -> (usize, usize) {
    match version {
        V5 => {
            let len = properties_len(p);
            (properties_field_len(len), len)
        }
        V31 | V311 => (0, 0),
    }
}

fn publish_len(p: &Publish, version: ProtocolVersion) -> (usize, usize) {
    let (field, plen) = props(&p.properties, version);
    let id = if p.qos == QoS::AtMostOnce { 0 } else { 2 };
    (2 + p.topic.len() + id + field + p.payload.len(), plen)
}

fn write_publish(p: &Publish, version: ProtocolVersion, out: &mut impl Out) {
    let (rl, plen) = publish_len(p, version);
    let first = 0x30 | u8::from(p.dup) << 3 | (p.qos as u8) << 1 | u8::from(p.retain);
    header(out, first, rl);
    put_str(out, &p.topic);
    if p.qos != QoS::AtMostOnce {
        out.put_u16(p.packet_id.unwrap_or(0));
    }
    if version == V5 {
        write_properties(out, &p.properties, plen);
    }
    out.put_slice(&p.payload);
}

/// (remaining length, CONNECT property length, will property length).
fn connect_len(c: &Connect, version: ProtocolVersion) -> (usize, usize, usize) {
    // Protocol name "MQTT" (6) or "MQIsdp" (8), level (1), flags (1), keep alive (2).
    let mut rl = 2 + version.protocol_name().len() + 4 + 2 + c.client_id.len();
    let (field, plen) = props(&c.properties, version);
    rl += field;
    let mut wlen = 0;
    if let Some(w) = &c.will {
        let (field, len) = props(&w.properties, version);
        wlen = len;
        rl += field + 2 + w.topic.len() + 2 + w.payload.len();
    }
    rl += c.username.as_ref().map_or(0, |u| 2 + u.len());
    rl += c.password.as_ref().map_or(0, |p| 2 + p.len());
    (rl, plen, wlen)
}

fn write_connect(c: &Connect, version: ProtocolVersion, out: &mut impl Out) {
    let (rl, plen, wlen) = connect_len(c, version);
    header(out, 0x10, rl);
    put_bin(out, version.protocol_name());
    let bridge = if c.bridge && version != V5 { 0x80 } else { 0 };
    out.put_u8(version.level() | bridge);
    let mut flags = u8::from(c.clean_start) << 1;
    if let Some(w) = &c.will {
        flags |= 0x04 | (w.qos as u8) << 3 | u8::from(w.retain) << 5;
    }
    flags |= u8::from(c.password.is_some()) << 6 | u8::from(c.username.is_some()) << 7;
    out.put_u8(flags);
    out.put_u16(c.keep_alive);
    if version == V5 {
        write_properties(out, &c.properties, plen);
    }
    put_str(out, &c.client_id);
    if let Some(w) = &c.will {
        if version == V5 {
            write_properties(out, &w.properties, wlen);
        }
        put_str(out, &w.topic);
        put_bin(out, &w.payload);
    }
    if let Some(u) = &c.username {
        put_str(out, u);
    }
    if let Some(p) = &c.password {
        put_bin(out, p);
    }
}

fn connack_len(c: &ConnAck, version: ProtocolVersion) -> (usize, usize) {
    let (field, plen) = props(&c.properties, version);
    (2 + field, plen)
}

/// 5.0 short forms (§3.4.2.1): 2 bytes for success without properties, 3 for a reason without
/// properties.
fn pubresp_len(r: &PubResp, version: ProtocolVersion) -> (usize, usize) {
    match version {
        V31 | V311 => (2, 0),
        V5 => {
            let plen = properties_len(&r.properties);
            if plen == 0 {
                (if r.reason == 0 { 2 } else { 3 }, 0)
            } else {
                (3 + properties_field_len(plen), plen)
            }
        }
    }
}

fn write_pubresp(first: u8, r: &PubResp, version: ProtocolVersion, out: &mut impl Out) {
    let (rl, plen) = pubresp_len(r, version);
    header(out, first, rl);
    out.put_u16(r.packet_id);
    if rl > 2 {
        out.put_u8(r.reason);
    }
    if rl > 3 {
        write_properties(out, &r.properties, plen);
    }
}

fn subscribe_len(s: &Subscribe, version: ProtocolVersion) -> (usize, usize) {
    let (field, plen) = props(&s.properties, version);
    (2 + field + s.filters.iter().map(|(f, _)| 3 + f.len()).sum::<usize>(), plen)
}

fn suback_len(s: &SubAck, version: ProtocolVersion) -> (usize, usize) {
    let (field, plen) = props(&s.properties, version);
    (2 + field + s.reasons.len(), plen)
}

fn unsubscribe_len(u: &Unsubscribe, version: ProtocolVersion) -> (usize, usize) {
    let (field, plen) = props(&u.properties, version);
    (2 + field + u.filters.iter().map(|f| 2 + f.len()).sum::<usize>(), plen)
}

fn unsuback_len(u: &UnsubAck, version: ProtocolVersion) -> (usize, usize) {
    match version {
        V31 | V311 => (2, 0),
        V5 => {
            let (field, plen) = props(&u.properties, version);
            (2 + field + u.reasons.len(), plen)
        }
    }
}

/// DISCONNECT and AUTH (5.0): remaining length 0 for success without properties; otherwise the
/// reason code, then the properties (DISCONNECT, `reason_only_len` 1, may stop after the reason
/// code; AUTH, `reason_only_len` 2, always carries the property length).
fn reason_props_len(reason: u8, p: &Properties, version: ProtocolVersion, reason_only_len: usize) -> (usize, usize) {
    match version {
        V31 | V311 => (0, 0),
        V5 => {
            let plen = properties_len(p);
            if plen == 0 {
                (if reason == 0 { 0 } else { reason_only_len }, 0)
            } else {
                (1 + properties_field_len(plen), plen)
            }
        }
    }
}

fn write_reason_props(out: &mut impl Out, rl: usize, reason: u8, p: &Properties, plen: usize) {
    if rl > 0 {
        out.put_u8(reason);
    }
    if rl > 1 {
        write_properties(out, p, plen);
    }
}
