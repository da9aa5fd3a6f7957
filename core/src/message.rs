//! The message model shared by every protocol.
//!
//! A [`Message`] is immutable once published and travels as `Arc<Message>`: a fan-out to a
//! thousand destinations clones one pointer per destination, and the payload (`Bytes`) is never
//! copied. A change on the way (dead-lettering rewrites the routing key and adds `x-death`)
//! makes a new `Message` that still shares the payload buffer.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

/// Milliseconds since the UNIX epoch. Every time-dependent operation in the core takes the
/// current time as an argument (no clock inside the core), so tests run on virtual time.
pub type Millis = u64;

/// The current wall-clock time in [`Millis`], for drivers (never called inside the core's logic).
pub fn now_millis() -> Millis {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as Millis).unwrap_or(0)
}

/// A random number drawn once per process, for names that must not repeat across restarts
/// (generated queue names, consumer tags) without reading a clock: std's hash keys are seeded
/// from the operating system's randomness.
pub fn process_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| std::collections::hash_map::RandomState::new().build_hasher().finish())
}

/// Which protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Mqtt,
    Amqp,
    /// Messages made by the broker itself (`$SYS`, dead letters, wills published on behalf of a
    /// client that is gone are still attributed to that client).
    Internal,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Mqtt => "mqtt",
            Protocol::Amqp => "amqp",
            Protocol::Internal => "internal",
        })
    }
}

/// A broker-wide unique connection number. Used for exclusive queues, MQTT no-local and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

impl ConnectionId {
    /// A fresh id, never handed out before in this process.
    pub fn next() -> ConnectionId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ConnectionId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn-{}", self.0)
    }
}

/// Where a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub protocol: Protocol,
    pub connection: ConnectionId,
}

impl Origin {
    pub fn internal() -> Origin {
        Origin { protocol: Protocol::Internal, connection: ConnectionId(0) }
    }
}

/// A short string: at most 255 bytes on the AMQP wire, usually UTF-8 but not required to be
/// (AMQP shortstr is a byte string). Backed by `Bytes`, so a codec can hand out a slice of the
/// frame without copying.
#[derive(Clone, Eq, PartialOrd, Ord, Default)]
pub struct ShortString(Bytes);

/// As its bytes (`Bytes` hashes as its slice), which keeps it in step with the equality below
/// and with maps looked up by `&[u8]` (`Borrow<[u8]>`).
impl std::hash::Hash for ShortString {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

/// The lengths first, and two empty ones equal without a look at their bytes. An empty `Bytes`
/// points at address 1 (`Bytes::new`, which is also what an empty slice of a frame is: the
/// default exchange's name in every AMQP publish), and glibc's AVX-512 `memcmp` reads even zero
/// bytes with a masked load, which at an unmapped address takes a fault-suppression assist
/// from the CPU: 5-6 % of the broker's CPU on AMQP auto-ack 1->1, most of it in the cached
/// exchange's name compared with the message's (`VHost::publish_cached`; issue 18).
impl PartialEq for ShortString {
    #[inline]
    fn eq(&self, other: &ShortString) -> bool {
        same_bytes(&self.0, &other.0)
    }
}

/// `a == b`, without a `memcmp` of empty slices (see [`ShortString`]'s `PartialEq`).
#[inline]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && (a.is_empty() || a == b)
}

impl ShortString {
    pub const MAX_LEN: usize = 255;

    pub fn from_static(s: &'static str) -> ShortString {
        ShortString(Bytes::from_static(s.as_bytes()))
    }
    pub fn from_bytes(b: Bytes) -> ShortString {
        ShortString(b)
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }
    /// The text, if it is valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
    /// The text with invalid UTF-8 replaced, for logs and keys that must be text.
    pub fn to_string_lossy(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Maps keyed by `ShortString` are looked up by `&[u8]` (or a `&str`'s bytes) without building
/// a key: `Bytes` hashes and compares as its slice.
impl std::borrow::Borrow<[u8]> for ShortString {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl From<&str> for ShortString {
    fn from(s: &str) -> Self {
        ShortString(Bytes::copy_from_slice(s.as_bytes()))
    }
}
impl From<String> for ShortString {
    fn from(s: String) -> Self {
        ShortString(Bytes::from(s.into_bytes()))
    }
}
impl PartialEq<str> for ShortString {
    fn eq(&self, other: &str) -> bool {
        same_bytes(&self.0, other.as_bytes())
    }
}
impl PartialEq<&str> for ShortString {
    fn eq(&self, other: &&str) -> bool {
        same_bytes(&self.0, other.as_bytes())
    }
}
impl fmt::Debug for ShortString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_str() {
            Some(s) => fmt::Debug::fmt(s, f),
            None => write!(f, "{:?}", self.0),
        }
    }
}
impl fmt::Display for ShortString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

/// An AMQP decimal: `value / 10^scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decimal {
    pub scale: u8,
    pub value: u32,
}

/// One value of a field table. Every type that RabbitMQ and its clients put on the wire has a
/// variant, so a table read from one client is written back to another unchanged.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    /// `t`
    Bool(bool),
    /// `b`
    I8(i8),
    /// `B`
    U8(u8),
    /// `s` (RabbitMQ and its clients use `s` for a signed 16-bit integer)
    I16(i16),
    /// `u`
    U16(u16),
    /// `I`
    I32(i32),
    /// `i`
    U32(u32),
    /// `l`
    I64(i64),
    /// `L` (sent by some clients; RabbitMQ reads it as a signed 64-bit integer)
    U64(u64),
    /// `f`
    F32(f32),
    /// `d`
    F64(f64),
    /// `D`
    Decimal(Decimal),
    /// `S`: a long string (bytes, not necessarily UTF-8)
    LongString(Bytes),
    /// `x`: a byte array
    Bytes(Bytes),
    /// `A`
    Array(Vec<FieldValue>),
    /// `T`: seconds since the epoch
    Timestamp(u64),
    /// `F`
    Table(FieldTable),
    /// `V`
    Void,
}

impl FieldValue {
    /// The value as a signed integer, for arguments that accept any integer type
    /// (clients send `x-max-length` as `b`, `s`, `I`, `l`... depending on the value and library).
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            FieldValue::I8(v) => v as i64,
            FieldValue::U8(v) => v as i64,
            FieldValue::I16(v) => v as i64,
            FieldValue::U16(v) => v as i64,
            FieldValue::I32(v) => v as i64,
            FieldValue::U32(v) => v as i64,
            FieldValue::I64(v) => v,
            FieldValue::U64(v) => i64::try_from(v).ok()?,
            _ => return None,
        })
    }
    /// The value as text, for string arguments (`S` long strings; UTF-8 only).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            FieldValue::LongString(b) | FieldValue::Bytes(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            FieldValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn string(s: &str) -> FieldValue {
        FieldValue::LongString(Bytes::copy_from_slice(s.as_bytes()))
    }
}

/// An ordered field table (AMQP `F`). Order is kept as received; lookups are linear because
/// tables are small (a handful of headers or arguments).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FieldTable(Vec<(ShortString, FieldValue)>);

impl FieldTable {
    pub fn new() -> FieldTable {
        FieldTable(Vec::new())
    }
    pub fn get(&self, key: &str) -> Option<&FieldValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    /// Sets `key`, replacing an existing entry in place.
    pub fn insert(&mut self, key: impl Into<ShortString>, value: FieldValue) {
        let key = key.into();
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key, value)),
        }
    }
    pub fn remove(&mut self, key: &str) -> Option<FieldValue> {
        let i = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.remove(i).1)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&ShortString, &FieldValue)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Order-insensitive equality, for declare equivalence checks (a client may send the same
    /// arguments in another order).
    pub fn same_entries(&self, other: &FieldTable) -> bool {
        self.len() == other.len() && self.0.iter().all(|(k, v)| other.0.iter().any(|(k2, v2)| k == k2 && v == v2))
    }
}

impl FromIterator<(ShortString, FieldValue)> for FieldTable {
    /// Later entries replace earlier ones with the same key, in the earlier one's place. Linear
    /// time (a hash index past a handful of entries), so a large table from the wire costs no
    /// quadratic work.
    fn from_iter<I: IntoIterator<Item = (ShortString, FieldValue)>>(iter: I) -> Self {
        let mut entries: Vec<(ShortString, FieldValue)> = Vec::new();
        let mut index: Option<std::collections::HashMap<ShortString, usize>> = None;
        for (k, v) in iter {
            if entries.len() == 16 && index.is_none() {
                index = Some(entries.iter().enumerate().map(|(i, (k, _))| (k.clone(), i)).collect());
            }
            let found = match &index {
                Some(ix) => ix.get(&k).copied(),
                None => entries.iter().position(|(x, _)| *x == k),
            };
            match found {
                Some(i) => entries[i].1 = v,
                None => {
                    if let Some(ix) = &mut index {
                        ix.insert(k.clone(), entries.len());
                    }
                    entries.push((k, v));
                }
            }
        }
        FieldTable(entries)
    }
}

/// AMQP delivery mode: 1 transient, 2 persistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeliveryMode {
    #[default]
    Transient,
    Persistent,
}

/// Message properties: the AMQP basic properties, which are a superset of what MQTT 5 carries
/// (the frontends map the rest into headers, see `docs/mapping.md`).
///
/// Every queued message holds one, so it is kept small: the properties most messages carry are
/// fields, the nine string properties few messages carry are in [`MoreProperties`], allocated
/// only once one of them is set ([`Properties::more_mut`]). With all fourteen as fields a
/// `Message` was 488 bytes, 368 of them properties; it is 208 now (a test pins the sizes).
#[derive(Debug, Clone, Default)]
pub struct Properties {
    pub content_type: Option<ShortString>,
    pub headers: Option<FieldTable>,
    /// `None` when the publisher did not say; treated as transient.
    pub delivery_mode: Option<DeliveryMode>,
    pub priority: Option<u8>,
    /// Seconds since the epoch.
    pub timestamp: Option<u64>,
    /// Read with [`Properties::more`], set with [`Properties::more_mut`] or
    /// [`Properties::with_more`]; public so that literals can use `..Default::default()`.
    pub more: Option<Box<MoreProperties>>,
}

/// The string properties few messages carry (see [`Properties`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MoreProperties {
    pub content_encoding: Option<ShortString>,
    pub correlation_id: Option<ShortString>,
    pub reply_to: Option<ShortString>,
    /// Per-message TTL in milliseconds, as the AMQP `expiration` string carries it.
    pub expiration: Option<ShortString>,
    pub message_id: Option<ShortString>,
    /// AMQP `type`.
    pub kind: Option<ShortString>,
    pub user_id: Option<ShortString>,
    pub app_id: Option<ShortString>,
    pub cluster_id: Option<ShortString>,
}

static NO_MORE: MoreProperties = MoreProperties {
    content_encoding: None,
    correlation_id: None,
    reply_to: None,
    expiration: None,
    message_id: None,
    kind: None,
    user_id: None,
    app_id: None,
    cluster_id: None,
};

impl PartialEq for Properties {
    fn eq(&self, other: &Properties) -> bool {
        self.content_type == other.content_type
            && self.headers == other.headers
            && self.delivery_mode == other.delivery_mode
            && self.priority == other.priority
            && self.timestamp == other.timestamp
            && self.more() == other.more()
    }
}

impl Properties {
    pub fn is_persistent(&self) -> bool {
        self.delivery_mode == Some(DeliveryMode::Persistent)
    }
    /// The per-message TTL, if `expiration` holds a valid non-negative integer of milliseconds.
    pub fn ttl_millis(&self) -> Option<u64> {
        self.more().expiration.as_ref()?.as_str()?.parse().ok()
    }
    pub fn header(&self, key: &str) -> Option<&FieldValue> {
        self.headers.as_ref()?.get(key)
    }
    /// The less common string properties (all `None` when none was set).
    pub fn more(&self) -> &MoreProperties {
        self.more.as_deref().unwrap_or(&NO_MORE)
    }
    /// The less common string properties, to set one (allocates them on first use).
    pub fn more_mut(&mut self) -> &mut MoreProperties {
        self.more.get_or_insert_with(Box::default)
    }
    /// These properties with `more` set (a builder for literals).
    pub fn with_more(mut self, more: MoreProperties) -> Properties {
        self.more = (more != NO_MORE).then(|| Box::new(more));
        self
    }
    /// Removes the `expiration` property, returning it.
    pub fn take_expiration(&mut self) -> Option<ShortString> {
        self.more.as_mut()?.expiration.take()
    }
}

/// Validates an AMQP `expiration` value: RabbitMQ refuses anything that is not a non-negative
/// integer of milliseconds (PRECONDITION_FAILED).
pub fn valid_expiration(s: &ShortString) -> bool {
    s.as_str().is_some_and(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) && t.parse::<u64>().is_ok())
}

/// A published message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The exchange it was published to (AMQP deliveries report it).
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub properties: Properties,
    pub payload: Bytes,
    pub origin: Origin,
    /// When the broker accepted it; per-message TTL counts from here.
    pub published_at: Millis,
}

impl Message {
    pub fn new(exchange: impl Into<ShortString>, routing_key: impl Into<ShortString>, payload: Bytes) -> Message {
        Message {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            properties: Properties::default(),
            payload,
            origin: Origin::internal(),
            published_at: 0,
        }
    }
    pub fn with_properties(mut self, properties: Properties) -> Message {
        self.properties = properties;
        self
    }
    pub fn with_origin(mut self, origin: Origin) -> Message {
        self.origin = origin;
        self
    }
    pub fn at(mut self, now: Millis) -> Message {
        self.published_at = now;
        self
    }
    /// Size counted against `x-max-length-bytes` (the body only, as RabbitMQ counts it).
    pub fn body_size(&self) -> usize {
        self.payload.len()
    }
    pub fn is_persistent(&self) -> bool {
        self.properties.is_persistent()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_stays_small() {
        // Every queued message holds one (see `Properties`); `queue::MESSAGE_MEMORY` follows it.
        assert_eq!(std::mem::size_of::<Properties>(), 88);
        assert_eq!(std::mem::size_of::<Message>(), 208);
    }

    #[test]
    fn field_table_insert_replaces_in_place() {
        let mut t = FieldTable::new();
        t.insert("a", FieldValue::I32(1));
        t.insert("b", FieldValue::Bool(true));
        t.insert("a", FieldValue::I32(2));
        assert_eq!(t.len(), 2);
        assert_eq!(t.get("a"), Some(&FieldValue::I32(2)));
        assert_eq!(t.iter().next().unwrap().0, "a");
    }

    #[test]
    fn same_entries_ignores_order() {
        let a: FieldTable = [("x".into(), FieldValue::I8(1)), ("y".into(), FieldValue::Void)].into_iter().collect();
        let b: FieldTable = [("y".into(), FieldValue::Void), ("x".into(), FieldValue::I8(1))].into_iter().collect();
        let c: FieldTable = [("y".into(), FieldValue::Void), ("x".into(), FieldValue::I8(2))].into_iter().collect();
        assert!(a.same_entries(&b));
        assert!(!a.same_entries(&c));
    }

    #[test]
    fn a_large_table_keeps_order_and_the_last_value_of_a_repeated_key() {
        let t: FieldTable =
            (0..1000).map(|i| (ShortString::from(format!("k{}", i % 500)), FieldValue::I32(i))).collect();
        assert_eq!(t.len(), 500);
        assert_eq!(t.iter().next().unwrap().0, "k0");
        assert_eq!(t.get("k7"), Some(&FieldValue::I32(507)));
    }

    #[test]
    fn integer_arguments_of_any_width_read_as_i64() {
        for v in [FieldValue::I8(5), FieldValue::U16(5), FieldValue::I32(5), FieldValue::I64(5), FieldValue::U64(5)] {
            assert_eq!(v.as_i64(), Some(5));
        }
        assert_eq!(FieldValue::U64(u64::MAX).as_i64(), None);
        assert_eq!(FieldValue::string("5").as_i64(), None);
    }

    #[test]
    fn expiration_must_be_digits() {
        assert!(valid_expiration(&"1000".into()));
        assert!(valid_expiration(&"0".into()));
        assert!(!valid_expiration(&"-1".into()));
        assert!(!valid_expiration(&"1e3".into()));
        assert!(!valid_expiration(&"".into()));
        let p =
            Properties::default().with_more(MoreProperties { expiration: Some("250".into()), ..Default::default() });
        assert_eq!(p.ttl_millis(), Some(250));
    }

    #[test]
    fn short_string_keeps_non_utf8_bytes() {
        let s = ShortString::from_bytes(Bytes::from_static(&[0xff, 0x00]));
        assert_eq!(s.as_str(), None);
        assert_eq!(s.as_bytes(), &[0xff, 0x00]);
    }

    /// Equality is the bytes' (the empty case skips the comparison, not its answer), and agrees
    /// with the order, the comparisons with text and the hash.
    #[test]
    fn short_strings_are_equal_when_their_bytes_are() {
        let frame = Bytes::from_static(b"xamq.directx");
        let cases = [
            (ShortString::default(), ShortString::from_bytes(frame.slice(1..1)), true),
            (ShortString::from(""), ShortString::from_static(""), true),
            (ShortString::from_bytes(frame.slice(1..11)), ShortString::from("amq.direct"), true),
            (ShortString::from("amq.direct"), ShortString::from("amq.topic"), false),
            (ShortString::from("amq"), ShortString::from("amq.direct"), false),
            (ShortString::default(), ShortString::from("a"), false),
        ];
        for (a, b, equal) in cases {
            assert_eq!(a == b, equal, "{a:?} == {b:?}");
            assert_eq!(b == a, equal);
            assert_eq!(a.cmp(&b) == std::cmp::Ordering::Equal, equal);
            assert_eq!(a == *b.as_str().unwrap(), equal);
            assert_eq!(a == b.as_str().unwrap(), equal);
            if equal {
                // Equal strings hash alike, and as their bytes (maps looked up by `&[u8]`).
                use std::hash::BuildHasher;
                let state = std::collections::hash_map::RandomState::new();
                assert_eq!(state.hash_one(&a), state.hash_one(&b));
                assert_eq!(state.hash_one(&a), state.hash_one(b.as_bytes()));
            }
        }
    }
}
