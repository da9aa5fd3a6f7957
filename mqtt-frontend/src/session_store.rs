//! The stored form of a persistent session: what [`StoredSession`] holds, as the bytes of a
//! core `StoreOp::PutSession` (the core keeps them opaque, keyed by vhost and client id).
//!
//! Hand-written and versioned like the core's own encoding (`docs/storage.md`): a format byte
//! (`1`), then big-endian integers and `u32`-length-prefixed strings:
//!
//! ```text
//! 1 | expiry u32 | disconnected_at u64 (ms since the epoch; 0 = connected) | exchange str
//!   | n u32 { filter str | options u8 | identifier u32 (0 = none) }
//!   | n u16 { incoming QoS 2 packet id u16 }
//!   | n u16 { PUBREL owed, packet id u16 }
//!   | n u32 { queue seq u64 | packet id u16 }
//!   | will: 0 | 1 len u32 (an MQTT 5.0 CONNECT carrying only the will, in the MQTT codec's form)
//! ```
//!
//! The will reuses the packet codec, so every will property round-trips without a second
//! encoding of them. Decoding checks every length and never panics.

use std::collections::{HashMap, HashSet};

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::{encode, Connect, Decoder, Packet, ProtocolVersion, QoS, Str, SubOptions};
use crate::registry::{StoredSession, StoredSubscription};

const FORMAT: u8 = 1;

/// Why stored bytes could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored MQTT session is unreadable: {0}")]
pub struct Corrupt(pub String);

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u32(s.len() as u32);
    out.put_slice(s.as_bytes());
}

fn options_byte(o: SubOptions) -> u8 {
    o.qos as u8 | (o.no_local as u8) << 2 | (o.retain_as_published as u8) << 3 | (o.retain_handling & 3) << 4
}

/// Encodes a session's state.
pub fn encode_session(st: &StoredSession) -> Bytes {
    let mut out = BytesMut::with_capacity(64 + st.subscriptions.len() * 32);
    out.put_u8(FORMAT);
    out.put_u32(st.expiry);
    out.put_u64(st.disconnected_at);
    put_str(&mut out, &st.exchange);
    out.put_u32(st.subscriptions.len() as u32);
    for s in &st.subscriptions {
        put_str(&mut out, &s.filter);
        out.put_u8(options_byte(s.options));
        out.put_u32(s.identifier.unwrap_or(0));
    }
    let mut incoming: Vec<u16> = st.incoming_qos2.iter().copied().collect();
    incoming.sort_unstable();
    out.put_u16(incoming.len() as u16);
    incoming.iter().for_each(|id| out.put_u16(*id));
    out.put_u16(st.outgoing_pubrel.len() as u16);
    st.outgoing_pubrel.iter().for_each(|id| out.put_u16(*id));
    let mut inflight: Vec<(u64, u16)> = st.inflight_ids.iter().map(|(s, i)| (*s, *i)).collect();
    inflight.sort_unstable();
    out.put_u32(inflight.len() as u32);
    for (seq, id) in inflight {
        out.put_u64(seq);
        out.put_u16(id);
    }
    match &st.will {
        None => out.put_u8(0),
        Some(w) => {
            let connect = Connect {
                bridge: false,
                version: ProtocolVersion::V5,
                clean_start: false,
                keep_alive: 0,
                client_id: Str::from("w"),
                will: Some(w.clone()),
                username: None,
                password: None,
                properties: Default::default(),
            };
            let mut packet = BytesMut::new();
            encode(&Packet::Connect(Box::new(connect)), ProtocolVersion::V5, &mut packet);
            out.put_u8(1);
            out.put_u32(packet.len() as u32);
            out.put_slice(&packet);
        }
    }
    out.freeze()
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Corrupt> {
        if self.0.len() < n {
            return Err(Corrupt(format!("{n} bytes wanted, {} left", self.0.len())));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, Corrupt> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Corrupt> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, Corrupt> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, Corrupt> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self) -> Result<String, Corrupt> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| Corrupt("a string is not UTF-8".into()))
    }
    /// A count of items of at least `min_size` bytes each, checked against what is left.
    fn count(&mut self, n: usize, min_size: usize) -> Result<usize, Corrupt> {
        if n.saturating_mul(min_size) > self.0.len() {
            return Err(Corrupt(format!("{n} items cannot fit in {} bytes", self.0.len())));
        }
        Ok(n)
    }
}

/// Decodes what [`encode_session`] wrote.
pub fn decode_session(bytes: &[u8]) -> Result<StoredSession, Corrupt> {
    let mut r = Reader(bytes);
    let format = r.u8()?;
    if format != FORMAT {
        return Err(Corrupt(format!("unknown format {format}")));
    }
    let expiry = r.u32()?;
    let disconnected_at = r.u64()?;
    let exchange = r.string()?;
    let n = r.u32()? as usize;
    let n = r.count(n, 9)?;
    let mut subscriptions = Vec::with_capacity(n);
    for _ in 0..n {
        let filter = r.string()?;
        let o = r.u8()?;
        let qos = QoS::from_u8(o & 3).ok_or_else(|| Corrupt(format!("subscription QoS {}", o & 3)))?;
        let options =
            SubOptions { qos, no_local: o & 4 != 0, retain_as_published: o & 8 != 0, retain_handling: (o >> 4) & 3 };
        let identifier = Some(r.u32()?).filter(|&i| i != 0);
        subscriptions.push(StoredSubscription { filter, options, identifier });
    }
    let n = r.u16()? as usize;
    let n = r.count(n, 2)?;
    let mut incoming_qos2 = HashSet::with_capacity(n);
    for _ in 0..n {
        incoming_qos2.insert(r.u16()?);
    }
    let n = r.u16()? as usize;
    let n = r.count(n, 2)?;
    let mut outgoing_pubrel = Vec::with_capacity(n);
    for _ in 0..n {
        outgoing_pubrel.push(r.u16()?);
    }
    let n = r.u32()? as usize;
    let n = r.count(n, 10)?;
    let mut inflight_ids = HashMap::with_capacity(n);
    for _ in 0..n {
        let seq = r.u64()?;
        inflight_ids.insert(seq, r.u16()?);
    }
    let will = match r.u8()? {
        0 => None,
        1 => {
            let n = r.u32()? as usize;
            let mut packet = BytesMut::from(r.take(n)?);
            match Decoder::new(u32::MAX).decode(&mut packet) {
                Ok(Some(Packet::Connect(c))) if packet.is_empty() => c.will,
                _ => return Err(Corrupt("the stored will does not decode".into())),
            }
        }
        b => return Err(Corrupt(format!("will flag {b}"))),
    };
    if !r.0.is_empty() {
        return Err(Corrupt(format!("{} bytes after the end", r.0.len())));
    }
    Ok(StoredSession {
        subscriptions,
        incoming_qos2,
        outgoing_pubrel,
        inflight_ids,
        expiry,
        exchange,
        will,
        disconnected_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Properties, Will};

    fn sample() -> StoredSession {
        let will_props: Properties = crate::codec::PropertyValues {
            will_delay_interval: Some(30),
            content_type: Some(Str::from("text/plain")),
            user_properties: vec![(Str::from("k"), Str::from("v"))],
            ..Default::default()
        }
        .into();
        StoredSession {
            subscriptions: vec![
                StoredSubscription {
                    filter: "a/+/b".into(),
                    options: SubOptions {
                        qos: QoS::ExactlyOnce,
                        no_local: true,
                        retain_as_published: false,
                        retain_handling: 2,
                    },
                    identifier: Some(268_435_455),
                },
                StoredSubscription {
                    filter: "$share/g/x/#".into(),
                    options: SubOptions {
                        qos: QoS::AtMostOnce,
                        no_local: false,
                        retain_as_published: true,
                        retain_handling: 1,
                    },
                    identifier: None,
                },
            ],
            incoming_qos2: [1, 65535].into_iter().collect(),
            outgoing_pubrel: vec![7, 9],
            inflight_ids: [(42, 3), (43, 4)].into_iter().collect(),
            expiry: u32::MAX,
            exchange: "amq.topic".into(),
            will: Some(Will {
                topic: Str::from("dev/7/status"),
                payload: Bytes::from_static(b"offline"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: will_props,
            }),
            disconnected_at: 1_790_000_000_000,
        }
    }

    fn same(a: &StoredSession, b: &StoredSession) -> bool {
        a.subscriptions == b.subscriptions
            && a.incoming_qos2 == b.incoming_qos2
            && a.outgoing_pubrel == b.outgoing_pubrel
            && a.inflight_ids == b.inflight_ids
            && a.expiry == b.expiry
            && a.exchange == b.exchange
            && a.will == b.will
            && a.disconnected_at == b.disconnected_at
    }

    #[test]
    fn a_session_round_trips() {
        let st = sample();
        assert!(same(&decode_session(&encode_session(&st)).unwrap(), &st));
        let empty = StoredSession::default();
        assert!(same(&decode_session(&encode_session(&empty)).unwrap(), &empty));
    }

    #[test]
    fn every_truncation_and_a_trailing_byte_are_refused() {
        let bytes = encode_session(&sample());
        for n in 0..bytes.len() {
            assert!(decode_session(&bytes[..n]).is_err(), "truncated at {n}");
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(decode_session(&longer).is_err());
        let mut other_format = bytes.to_vec();
        other_format[0] = 9;
        assert!(decode_session(&other_format).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u32 = 12345;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = decode_session(&bytes);
            let mut framed = vec![FORMAT];
            framed.extend_from_slice(&bytes);
            let _ = decode_session(&framed);
        }
    }
}
