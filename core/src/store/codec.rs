//! The redb store's binary encoding: keys made of length-prefixed parts, and values (messages,
//! exchange and queue records) behind a leading format byte.
//!
//! Hand-written rather than serde: the format is the on-disk contract, so every byte is spelled
//! out here and versioned by [`FORMAT`]. A decoder never panics on bad input; it returns
//! [`StoreError::Corrupt`].
//!
//! - Integers are big-endian (so a `u64` sequence number in a key sorts numerically).
//! - A byte string is a `u32` length and the bytes.
//! - A key is the concatenation of its parts, each a byte string: a key's prefix made of whole
//!   parts (the vhost; the vhost and the queue) selects exactly the keys with those parts.

use bytes::Bytes;

use super::{BindingRecord, StoreError};
use crate::message::{
    ConnectionId, Decimal, DeliveryMode, FieldTable, FieldValue, Message, MoreProperties, Origin, Properties, Protocol,
    ShortString,
};
use crate::queue::QueueOptions;

/// The format byte every encoded value starts with. Bump it when the layout changes and keep a
/// decoder for the old one.
pub(crate) const FORMAT: u8 = 1;

/// Nesting allowed for arrays and tables inside a field table: far beyond what clients send, and
/// low enough that a corrupt value cannot overflow the stack.
const MAX_DEPTH: usize = 64;

/// Builds keys and values.
#[derive(Debug, Default)]
pub(crate) struct Writer(Vec<u8>);

impl Writer {
    pub(crate) fn new() -> Writer {
        Writer(Vec::new())
    }
    /// A writer whose buffer holds `n` bytes before it grows (the store writer builds a key or
    /// a value per operation: growing the buffer in steps was 6 % of its time in a profile).
    pub(crate) fn with_capacity(n: usize) -> Writer {
        Writer(Vec::with_capacity(n))
    }
    /// A value writer: starts with the format byte.
    pub(crate) fn value() -> Writer {
        Writer(vec![FORMAT])
    }
    pub(crate) fn into_vec(self) -> Vec<u8> {
        self.0
    }
    pub(crate) fn u8(&mut self, v: u8) -> &mut Writer {
        self.0.push(v);
        self
    }
    pub(crate) fn u32(&mut self, v: u32) -> &mut Writer {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn u64(&mut self, v: u64) -> &mut Writer {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// A byte string (also a key part).
    pub(crate) fn bytes(&mut self, b: &[u8]) -> &mut Writer {
        // Lengths come from in-memory values; a part over 4 GiB cannot reach the store (redb
        // refuses values that large anyway).
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        self
    }
    fn opt_short(&mut self, s: &Option<ShortString>) -> &mut Writer {
        match s {
            None => self.u8(0),
            Some(s) => self.u8(1).bytes(s.as_bytes()),
        }
    }
    pub(crate) fn table(&mut self, t: &FieldTable) -> &mut Writer {
        self.u32(t.len() as u32);
        for (k, v) in t.iter() {
            self.bytes(k.as_bytes());
            self.field_value(v);
        }
        self
    }
    fn field_value(&mut self, v: &FieldValue) {
        match v {
            FieldValue::Bool(b) => self.u8(b't').u8(*b as u8),
            FieldValue::I8(x) => self.u8(b'b').u8(*x as u8),
            FieldValue::U8(x) => self.u8(b'B').u8(*x),
            FieldValue::I16(x) => self.u8(b's').bytes_raw(&x.to_be_bytes()),
            FieldValue::U16(x) => self.u8(b'u').bytes_raw(&x.to_be_bytes()),
            FieldValue::I32(x) => self.u8(b'I').bytes_raw(&x.to_be_bytes()),
            FieldValue::U32(x) => self.u8(b'i').u32(*x),
            FieldValue::I64(x) => self.u8(b'l').bytes_raw(&x.to_be_bytes()),
            FieldValue::U64(x) => self.u8(b'L').u64(*x),
            // Bit patterns, so NaN payloads and -0.0 survive.
            FieldValue::F32(x) => self.u8(b'f').u32(x.to_bits()),
            FieldValue::F64(x) => self.u8(b'd').u64(x.to_bits()),
            FieldValue::Decimal(d) => self.u8(b'D').u8(d.scale).u32(d.value),
            FieldValue::LongString(b) => self.u8(b'S').bytes(b),
            FieldValue::Bytes(b) => self.u8(b'x').bytes(b),
            FieldValue::Array(items) => {
                self.u8(b'A').u32(items.len() as u32);
                for i in items {
                    self.field_value(i);
                }
                self
            }
            FieldValue::Timestamp(t) => self.u8(b'T').u64(*t),
            FieldValue::Table(t) => self.u8(b'F').table(t),
            FieldValue::Void => self.u8(b'V'),
        };
    }
    fn bytes_raw(&mut self, b: &[u8]) -> &mut Writer {
        self.0.extend_from_slice(b);
        self
    }
}

/// Reads keys and values; every read checks the length first.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }
    /// A value reader: checks the format byte.
    pub(crate) fn value(buf: &'a [u8]) -> Result<Reader<'a>, StoreError> {
        let mut r = Reader::new(buf);
        match r.u8()? {
            FORMAT => Ok(r),
            v => Err(StoreError::Corrupt(format!("unknown value format {v}"))),
        }
    }
    /// Fails unless everything was read.
    pub(crate) fn finish(&self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(corrupt("trailing bytes"))
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.buf.len() < n {
            return Err(corrupt("truncated"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    pub(crate) fn bool(&mut self) -> Result<bool, StoreError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(corrupt("bad bool")),
        }
    }
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub(crate) fn short(&mut self) -> Result<ShortString, StoreError> {
        Ok(ShortString::from_bytes(Bytes::copy_from_slice(self.bytes()?)))
    }
    pub(crate) fn string(&mut self) -> Result<String, StoreError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| corrupt("bad utf-8"))
    }
    fn opt_short(&mut self) -> Result<Option<ShortString>, StoreError> {
        Ok(if self.bool()? { Some(self.short()?) } else { None })
    }
    pub(crate) fn table(&mut self) -> Result<FieldTable, StoreError> {
        self.table_at(0)
    }
    fn table_at(&mut self, depth: usize) -> Result<FieldTable, StoreError> {
        if depth > MAX_DEPTH {
            return Err(corrupt("field table nested too deep"));
        }
        let n = self.u32()? as usize;
        // Each entry takes at least 5 bytes; refuse a count the buffer cannot hold before
        // allocating for it.
        if n > self.buf.len() / 5 {
            return Err(corrupt("field table count"));
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let k = self.short()?;
            let v = self.field_value(depth)?;
            entries.push((k, v));
        }
        Ok(entries.into_iter().collect())
    }
    fn field_value(&mut self, depth: usize) -> Result<FieldValue, StoreError> {
        Ok(match self.u8()? {
            b't' => FieldValue::Bool(self.bool()?),
            b'b' => FieldValue::I8(self.u8()? as i8),
            b'B' => FieldValue::U8(self.u8()?),
            b's' => FieldValue::I16(i16::from_be_bytes(self.array()?)),
            b'u' => FieldValue::U16(u16::from_be_bytes(self.array()?)),
            b'I' => FieldValue::I32(i32::from_be_bytes(self.array()?)),
            b'i' => FieldValue::U32(self.u32()?),
            b'l' => FieldValue::I64(i64::from_be_bytes(self.array()?)),
            b'L' => FieldValue::U64(self.u64()?),
            b'f' => FieldValue::F32(f32::from_bits(self.u32()?)),
            b'd' => FieldValue::F64(f64::from_bits(self.u64()?)),
            b'D' => FieldValue::Decimal(Decimal { scale: self.u8()?, value: self.u32()? }),
            b'S' => FieldValue::LongString(Bytes::copy_from_slice(self.bytes()?)),
            b'x' => FieldValue::Bytes(Bytes::copy_from_slice(self.bytes()?)),
            b'A' => {
                if depth >= MAX_DEPTH {
                    return Err(corrupt("array nested too deep"));
                }
                let n = self.u32()? as usize;
                if n > self.buf.len() {
                    return Err(corrupt("array count"));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.field_value(depth + 1)?);
                }
                FieldValue::Array(items)
            }
            b'T' => FieldValue::Timestamp(self.u64()?),
            b'F' => FieldValue::Table(self.table_at(depth + 1)?),
            b'V' => FieldValue::Void,
            t => return Err(StoreError::Corrupt(format!("unknown field type {t:#04x}"))),
        })
    }
}

/// A key made of the given parts.
pub(crate) fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut w = Writer::with_capacity(parts.iter().map(|p| 4 + p.len()).sum());
    for p in parts {
        w.bytes(p);
    }
    w.into_vec()
}

/// The key of a queue's message: `(vhost, queue)` then the sequence number, big-endian.
pub(crate) fn message_key(vhost: &str, queue: &ShortString, seq: u64) -> Vec<u8> {
    let mut w = Writer::with_capacity(4 + vhost.len() + 4 + queue.as_bytes().len() + 8);
    w.bytes(vhost.as_bytes()).bytes(queue.as_bytes()).u64(seq);
    w.into_vec()
}

/// Splits a message key into `(vhost, queue, seq)`.
pub(crate) fn decode_message_key(k: &[u8]) -> Result<(String, ShortString, u64), StoreError> {
    let mut r = Reader::new(k);
    let out = (r.string()?, r.short()?, r.u64()?);
    r.finish()?;
    Ok(out)
}

/// The key of a binding: every field of it, so a put of the same binding is idempotent and a
/// delete names exactly one key. `to_exchange` is a one-byte part; the arguments are the last
/// part, an encoded field table.
pub(crate) fn binding_key(b: &BindingRecord) -> Vec<u8> {
    let mut args = Writer::new();
    args.table(&b.arguments);
    key(&[
        b.vhost.as_bytes(),
        b.source.as_bytes(),
        &[b.to_exchange as u8],
        b.destination.as_bytes(),
        b.routing_key.as_bytes(),
        &args.into_vec(),
    ])
}

pub(crate) fn decode_binding_key(k: &[u8]) -> Result<BindingRecord, StoreError> {
    let mut r = Reader::new(k);
    let vhost = r.string()?;
    let source = r.short()?;
    let to_exchange = match r.bytes()? {
        [0] => false,
        [1] => true,
        _ => return Err(corrupt("binding kind")),
    };
    let destination = r.short()?;
    let routing_key = r.short()?;
    let mut args = Reader::new(r.bytes()?);
    let arguments = args.table()?;
    args.finish()?;
    r.finish()?;
    Ok(BindingRecord { vhost, source, to_exchange, destination, routing_key, arguments })
}

/// Encodes a message: every field, properties and headers included.
pub(crate) fn encode_message(m: &Message) -> Vec<u8> {
    encode_message_after(m, &[])
}

/// [`encode_message`] after the bytes `lead` (a `queued` entry's flags byte).
pub(crate) fn encode_message_after(m: &Message, lead: &[u8]) -> Vec<u8> {
    // Room for the fixed fields, the names and the payload; properties and headers beyond that
    // grow it once.
    let mut w = Writer::with_capacity(
        128 + lead.len() + m.exchange.as_bytes().len() + m.routing_key.as_bytes().len() + m.payload.len(),
    );
    w.0.extend_from_slice(lead);
    w.u8(FORMAT);
    w.bytes(m.exchange.as_bytes()).bytes(m.routing_key.as_bytes());
    let p = &m.properties;
    let more = p.more();
    w.opt_short(&p.content_type).opt_short(&more.content_encoding);
    match &p.headers {
        None => w.u8(0),
        Some(t) => w.u8(1).table(t),
    };
    w.u8(match p.delivery_mode {
        None => 0,
        Some(DeliveryMode::Transient) => 1,
        Some(DeliveryMode::Persistent) => 2,
    });
    match p.priority {
        None => w.u8(0),
        Some(v) => w.u8(1).u8(v),
    };
    w.opt_short(&more.correlation_id).opt_short(&more.reply_to).opt_short(&more.expiration).opt_short(&more.message_id);
    match p.timestamp {
        None => w.u8(0),
        Some(v) => w.u8(1).u64(v),
    };
    w.opt_short(&more.kind).opt_short(&more.user_id).opt_short(&more.app_id).opt_short(&more.cluster_id);
    w.bytes(&m.payload);
    w.u8(match m.origin.protocol {
        Protocol::Mqtt => 0,
        Protocol::Amqp => 1,
        Protocol::Internal => 2,
    });
    w.u64(m.origin.connection.0).u64(m.published_at);
    w.into_vec()
}

/// The body size of an encoded message, without decoding it (recovery counts a queue's tail
/// this way): the fields before the payload are skipped, not copied.
pub(crate) fn payload_len(buf: &[u8]) -> Result<u64, StoreError> {
    let mut r = Reader::value(buf)?;
    r.bytes()?;
    r.bytes()?;
    for _ in 0..2 {
        if r.bool()? {
            r.bytes()?;
        }
    }
    if r.bool()? {
        r.table()?;
    }
    r.u8()?;
    if r.bool()? {
        r.u8()?;
    }
    for _ in 0..4 {
        if r.bool()? {
            r.bytes()?;
        }
    }
    if r.bool()? {
        r.u64()?;
    }
    for _ in 0..4 {
        if r.bool()? {
            r.bytes()?;
        }
    }
    Ok(r.bytes()?.len() as u64)
}

pub(crate) fn decode_message(buf: &[u8]) -> Result<Message, StoreError> {
    let mut r = Reader::value(buf)?;
    let exchange = r.short()?;
    let routing_key = r.short()?;
    let content_type = r.opt_short()?;
    let content_encoding = r.opt_short()?;
    let headers = if r.bool()? { Some(r.table()?) } else { None };
    let delivery_mode = match r.u8()? {
        0 => None,
        1 => Some(DeliveryMode::Transient),
        2 => Some(DeliveryMode::Persistent),
        _ => return Err(corrupt("delivery mode")),
    };
    let priority = if r.bool()? { Some(r.u8()?) } else { None };
    let correlation_id = r.opt_short()?;
    let reply_to = r.opt_short()?;
    let expiration = r.opt_short()?;
    let message_id = r.opt_short()?;
    let timestamp = if r.bool()? { Some(r.u64()?) } else { None };
    let kind = r.opt_short()?;
    let user_id = r.opt_short()?;
    let app_id = r.opt_short()?;
    let cluster_id = r.opt_short()?;
    let payload = Bytes::copy_from_slice(r.bytes()?);
    let protocol = match r.u8()? {
        0 => Protocol::Mqtt,
        1 => Protocol::Amqp,
        2 => Protocol::Internal,
        _ => return Err(corrupt("origin protocol")),
    };
    let connection = ConnectionId(r.u64()?);
    let published_at = r.u64()?;
    r.finish()?;
    Ok(Message {
        exchange,
        routing_key,
        properties: Properties { content_type, headers, delivery_mode, priority, timestamp, ..Properties::default() }
            .with_more(MoreProperties {
                content_encoding,
                correlation_id,
                reply_to,
                expiration,
                message_id,
                kind,
                user_id,
                app_id,
                cluster_id,
            }),
        payload,
        origin: Origin { protocol, connection },
        published_at,
    })
}

/// An exchange's value (its key holds vhost and name).
pub(crate) fn encode_exchange(kind: &str, auto_delete: bool, internal: bool, arguments: &FieldTable) -> Vec<u8> {
    let mut w = Writer::value();
    w.bytes(kind.as_bytes()).u8(auto_delete as u8).u8(internal as u8).table(arguments);
    w.into_vec()
}

pub(crate) fn decode_exchange(buf: &[u8]) -> Result<(String, bool, bool, FieldTable), StoreError> {
    let mut r = Reader::value(buf)?;
    let out = (r.string()?, r.bool()?, r.bool()?, r.table()?);
    r.finish()?;
    Ok(out)
}

/// A queue's options (its key holds vhost and name).
pub(crate) fn encode_queue_options(o: &QueueOptions) -> Vec<u8> {
    let mut w = Writer::value();
    w.u8(o.durable as u8);
    match o.exclusive {
        None => w.u8(0),
        Some(c) => w.u8(1).u64(c.0),
    };
    w.u8(o.auto_delete as u8).table(&o.arguments);
    w.into_vec()
}

pub(crate) fn decode_queue_options(buf: &[u8]) -> Result<QueueOptions, StoreError> {
    let mut r = Reader::value(buf)?;
    let durable = r.bool()?;
    let exclusive = if r.bool()? { Some(ConnectionId(r.u64()?)) } else { None };
    let auto_delete = r.bool()?;
    let arguments = r.table()?;
    r.finish()?;
    Ok(QueueOptions { durable, exclusive, auto_delete, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn short() -> impl Strategy<Value = ShortString> {
        proptest::collection::vec(any::<u8>(), 0..20).prop_map(|v| ShortString::from_bytes(Bytes::from(v)))
    }
    fn opt_short() -> impl Strategy<Value = Option<ShortString>> {
        proptest::option::of(short())
    }
    fn blob() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from)
    }

    fn field_value() -> impl Strategy<Value = FieldValue> {
        let leaf = prop_oneof![
            any::<bool>().prop_map(FieldValue::Bool),
            any::<i8>().prop_map(FieldValue::I8),
            any::<u8>().prop_map(FieldValue::U8),
            any::<i16>().prop_map(FieldValue::I16),
            any::<u16>().prop_map(FieldValue::U16),
            any::<i32>().prop_map(FieldValue::I32),
            any::<u32>().prop_map(FieldValue::U32),
            any::<i64>().prop_map(FieldValue::I64),
            any::<u64>().prop_map(FieldValue::U64),
            // Finite floats: NaN != NaN would fail the equality, not the codec (bits are kept).
            (-1e30f32..1e30f32).prop_map(FieldValue::F32),
            (-1e300f64..1e300f64).prop_map(FieldValue::F64),
            (any::<u8>(), any::<u32>()).prop_map(|(scale, value)| FieldValue::Decimal(Decimal { scale, value })),
            blob().prop_map(FieldValue::LongString),
            blob().prop_map(FieldValue::Bytes),
            any::<u64>().prop_map(FieldValue::Timestamp),
            Just(FieldValue::Void),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(FieldValue::Array),
                proptest::collection::vec((short(), inner), 0..4)
                    .prop_map(|v| FieldValue::Table(v.into_iter().collect())),
            ]
        })
    }

    fn table() -> impl Strategy<Value = FieldTable> {
        proptest::collection::vec((short(), field_value()), 0..6).prop_map(|v| v.into_iter().collect())
    }

    prop_compose! {
        fn properties()(
            content_type in opt_short(), content_encoding in opt_short(),
            headers in proptest::option::of(table()),
            delivery_mode in prop_oneof![Just(None), Just(Some(DeliveryMode::Transient)),
                Just(Some(DeliveryMode::Persistent))],
            priority in proptest::option::of(any::<u8>()),
            correlation_id in opt_short(), reply_to in opt_short(), expiration in opt_short(),
            message_id in opt_short(), timestamp in proptest::option::of(any::<u64>()),
            kind in opt_short(), user_id in opt_short(), app_id in opt_short(), cluster_id in opt_short(),
        ) -> Properties {
            Properties { content_type, headers, delivery_mode, priority, timestamp, ..Properties::default() }
                .with_more(MoreProperties { content_encoding, correlation_id, reply_to, expiration, message_id,
                    kind, user_id, app_id, cluster_id })
        }
    }

    prop_compose! {
        fn message()(
            exchange in short(), routing_key in short(), properties in properties(), payload in blob(),
            protocol in prop_oneof![Just(Protocol::Mqtt), Just(Protocol::Amqp), Just(Protocol::Internal)],
            connection in any::<u64>(), published_at in any::<u64>(),
        ) -> Message {
            Message { exchange, routing_key, properties, payload,
                origin: Origin { protocol, connection: ConnectionId(connection) }, published_at }
        }
    }

    proptest! {
        #[test]
        fn decode_of_encode_is_the_same_message(m in message()) {
            let buf = encode_message(&m);
            prop_assert_eq!(buf[0], FORMAT);
            prop_assert_eq!(decode_message(&buf).unwrap(), m.clone());
            prop_assert_eq!(payload_len(&buf).unwrap(), m.payload.len() as u64);
        }

        #[test]
        fn a_truncated_message_is_corrupt_not_a_panic(m in message(), cut in any::<prop::sample::Index>()) {
            let buf = encode_message(&m);
            let n = cut.index(buf.len());
            prop_assert!(matches!(decode_message(&buf[..n]), Err(StoreError::Corrupt(_))));
        }

        #[test]
        fn queue_options_round_trip(durable in any::<bool>(), excl in proptest::option::of(any::<u64>()),
                                    auto_delete in any::<bool>(), arguments in table()) {
            let o = QueueOptions { durable, exclusive: excl.map(ConnectionId), auto_delete, arguments };
            prop_assert_eq!(decode_queue_options(&encode_queue_options(&o)).unwrap(), o);
        }

        #[test]
        fn message_keys_sort_by_sequence(a in any::<u64>(), b in any::<u64>()) {
            let q = ShortString::from("q");
            prop_assert_eq!(message_key("/", &q, a).cmp(&message_key("/", &q, b)), a.cmp(&b));
            prop_assert_eq!(decode_message_key(&message_key("/", &q, a)).unwrap(), ("/".to_string(), q, a));
        }
    }

    #[test]
    fn an_unknown_format_byte_is_refused() {
        let mut buf = encode_message(&Message::new("", "k", Bytes::new()));
        buf[0] = 99;
        assert!(matches!(decode_message(&buf), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn deep_nesting_is_corrupt_not_a_stack_overflow() {
        let mut w = Writer::new();
        w.u32(1).bytes(b"k");
        for _ in 0..10_000 {
            w.u8(b'A').u32(1);
        }
        w.u8(b'V');
        let buf = w.into_vec();
        assert!(Reader::new(&buf).table().is_err());
    }
}
