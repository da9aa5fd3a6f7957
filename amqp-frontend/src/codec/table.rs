//! Field tables (`F`) and arrays (`A`): every [`FieldValue`] type RabbitMQ and its clients put
//! on the wire.
//!
//! The type tags are RabbitMQ's, which differ from the 0-9-1 spec's own table in two places
//! (RabbitMQ's "errata"): `s` is a signed 16-bit integer (not a short string) and `l` a signed
//! 64-bit one; `x` is a byte array. The full set:
//!
//! | tag | value | tag | value | tag | value |
//! | --- | --- | --- | --- | --- | --- |
//! | `t` | bool (octet) | `I` | i32 | `D` | decimal (scale octet, u32) |
//! | `b` | i8 | `i` | u32 | `S` | long string |
//! | `B` | u8 | `l` | i64 | `x` | byte array (longstr) |
//! | `s` | i16 | `L` | u64 | `A` | array (u32 size, values) |
//! | `u` | u16 | `f` | f32 | `T` | timestamp (u64) |
//! |     |     | `d` | f64 | `F` | table (u32 size, entries) |
//! |     |     |     |     | `V` | void (nothing) |
//!
//! Strings and byte arrays are `Bytes` slices of the frame; nothing is copied.

use bytes::{BufMut, Bytes, BytesMut};
use ferry_core::message::{Decimal, FieldTable, FieldValue};

use super::error::{EncodeError, SyntaxError};
use super::wire::{patch_len, put_long_str, put_short_str, reserve_len, Reader};

/// How deep tables and arrays may nest. A 128 KiB frame could otherwise nest ~26,000 levels
/// (5 bytes each) and the recursive decoder would run out of stack; real tables nest 2–3 deep
/// (capabilities inside server-properties, `x-death` arrays of tables).
pub const MAX_NESTING: usize = 64;

/// How many entries one table may have. Real tables have a few dozen at most (client
/// properties ~10, capabilities ~8, an `x-death` entry 6), and applications rarely send more
/// than a few hundred headers. The core's `FieldTable` is now built in linear time (it was
/// quadratic: a 128 KiB frame of 16,000 4-byte entries took 8 s in a debug build); this bound
/// keeps one table's work and memory small whatever the frame max.
pub const MAX_TABLE_ENTRIES: usize = 4096;

/// Decodes the bytes of a field table (without its 32-bit size prefix).
pub fn decode_field_table(bytes: Bytes) -> Result<FieldTable, SyntaxError> {
    let mut r = Reader::new(bytes);
    table_entries(&mut r, 0)
}

/// Encodes a field table with its 32-bit size prefix, as it appears in a method or header.
pub fn encode_field_table(table: &FieldTable, out: &mut BytesMut) -> Result<(), EncodeError> {
    let start = out.len();
    write_table(out, table, "table").inspect_err(|_| out.truncate(start))
}

/// Reads a `table` argument: 32-bit size, then entries.
pub(crate) fn read_table(r: &mut Reader, field: &'static str) -> Result<FieldTable, SyntaxError> {
    read_table_at(r, field, 0)
}

fn read_table_at(r: &mut Reader, field: &'static str, depth: usize) -> Result<FieldTable, SyntaxError> {
    let bytes = r.long_str(field)?;
    table_entries(&mut Reader::new(bytes), depth)
}

fn table_entries(r: &mut Reader, depth: usize) -> Result<FieldTable, SyntaxError> {
    if depth > MAX_NESTING {
        return Err(SyntaxError::TooDeep);
    }
    let mut entries = Vec::new();
    while r.remaining() > 0 {
        if entries.len() == MAX_TABLE_ENTRIES {
            return Err(SyntaxError::TooManyEntries);
        }
        let key = r.short_str("field table key")?;
        let value = read_value(r, depth)?;
        entries.push((key, value));
    }
    // `FromIterator` keeps the first position of a repeated key with the last value.
    Ok(entries.into_iter().collect())
}

fn read_array(r: &mut Reader, depth: usize) -> Result<Vec<FieldValue>, SyntaxError> {
    if depth > MAX_NESTING {
        return Err(SyntaxError::TooDeep);
    }
    let mut r = Reader::new(r.long_str("field array")?);
    let mut values = Vec::new();
    while r.remaining() > 0 {
        values.push(read_value(&mut r, depth)?);
    }
    Ok(values)
}

fn read_value(r: &mut Reader, depth: usize) -> Result<FieldValue, SyntaxError> {
    const F: &str = "field value";
    Ok(match r.u8("field value type")? {
        b't' => FieldValue::Bool(r.u8(F)? != 0),
        b'b' => FieldValue::I8(r.u8(F)? as i8),
        b'B' => FieldValue::U8(r.u8(F)?),
        b's' => FieldValue::I16(r.u16(F)? as i16),
        b'u' => FieldValue::U16(r.u16(F)?),
        b'I' => FieldValue::I32(r.u32(F)? as i32),
        b'i' => FieldValue::U32(r.u32(F)?),
        b'l' => FieldValue::I64(r.u64(F)? as i64),
        b'L' => FieldValue::U64(r.u64(F)?),
        b'f' => FieldValue::F32(f32::from_bits(r.u32(F)?)),
        b'd' => FieldValue::F64(f64::from_bits(r.u64(F)?)),
        b'D' => FieldValue::Decimal(Decimal { scale: r.u8(F)?, value: r.u32(F)? }),
        b'S' => FieldValue::LongString(r.long_str(F)?),
        b'x' => FieldValue::Bytes(r.long_str(F)?),
        b'A' => FieldValue::Array(read_array(r, depth + 1)?),
        b'T' => FieldValue::Timestamp(r.u64(F)?),
        b'F' => FieldValue::Table(read_table_at(r, "field table", depth + 1)?),
        b'V' => FieldValue::Void,
        tag => return Err(SyntaxError::UnknownFieldType(tag)),
    })
}

/// Writes a `table` argument: 32-bit size, then entries. On error `out` may hold a partial
/// table; the public entry points truncate it.
pub(crate) fn write_table(out: &mut BytesMut, table: &FieldTable, field: &'static str) -> Result<(), EncodeError> {
    let at = reserve_len(out);
    for (key, value) in table.iter() {
        put_short_str(out, key.as_bytes(), "field table key")?;
        write_value(out, value)?;
    }
    patch_len(out, at, field)
}

fn write_value(out: &mut BytesMut, value: &FieldValue) -> Result<(), EncodeError> {
    match value {
        FieldValue::Bool(v) => {
            out.put_u8(b't');
            out.put_u8(u8::from(*v));
        }
        FieldValue::I8(v) => {
            out.put_u8(b'b');
            out.put_i8(*v);
        }
        FieldValue::U8(v) => {
            out.put_u8(b'B');
            out.put_u8(*v);
        }
        FieldValue::I16(v) => {
            out.put_u8(b's');
            out.put_i16(*v);
        }
        FieldValue::U16(v) => {
            out.put_u8(b'u');
            out.put_u16(*v);
        }
        FieldValue::I32(v) => {
            out.put_u8(b'I');
            out.put_i32(*v);
        }
        FieldValue::U32(v) => {
            out.put_u8(b'i');
            out.put_u32(*v);
        }
        FieldValue::I64(v) => {
            out.put_u8(b'l');
            out.put_i64(*v);
        }
        FieldValue::U64(v) => {
            out.put_u8(b'L');
            out.put_u64(*v);
        }
        FieldValue::F32(v) => {
            out.put_u8(b'f');
            out.put_f32(*v);
        }
        FieldValue::F64(v) => {
            out.put_u8(b'd');
            out.put_f64(*v);
        }
        FieldValue::Decimal(d) => {
            out.put_u8(b'D');
            out.put_u8(d.scale);
            out.put_u32(d.value);
        }
        FieldValue::LongString(b) => {
            out.put_u8(b'S');
            put_long_str(out, b, "long string field value")?;
        }
        FieldValue::Bytes(b) => {
            out.put_u8(b'x');
            put_long_str(out, b, "byte array field value")?;
        }
        FieldValue::Array(values) => {
            out.put_u8(b'A');
            let at = reserve_len(out);
            for v in values {
                write_value(out, v)?;
            }
            patch_len(out, at, "field array")?;
        }
        FieldValue::Timestamp(v) => {
            out.put_u8(b'T');
            out.put_u64(*v);
        }
        FieldValue::Table(t) => {
            out.put_u8(b'F');
            write_table(out, t, "field table")?;
        }
        FieldValue::Void => out.put_u8(b'V'),
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ferry_core::message::ShortString;
    use proptest::prelude::*;

    fn table(entries: Vec<(&str, FieldValue)>) -> FieldTable {
        entries.into_iter().map(|(k, v)| (ShortString::from(k), v)).collect()
    }

    fn round_trip(t: &FieldTable) -> FieldTable {
        let mut out = BytesMut::new();
        encode_field_table(t, &mut out).unwrap();
        let mut r = Reader::new(out.freeze());
        let back = read_table(&mut r, "t").unwrap();
        r.finish().unwrap();
        back
    }

    #[test]
    fn every_field_value_type_round_trips_with_its_tag() {
        let cases: Vec<(FieldValue, &[u8])> = vec![
            (FieldValue::Bool(true), b"t\x01"),
            (FieldValue::I8(-2), b"b\xfe"),
            (FieldValue::U8(200), b"B\xc8"),
            (FieldValue::I16(-2), b"s\xff\xfe"),
            (FieldValue::U16(0xfffe), b"u\xff\xfe"),
            (FieldValue::I32(-2), b"I\xff\xff\xff\xfe"),
            (FieldValue::U32(0xffff_fffe), b"i\xff\xff\xff\xfe"),
            (FieldValue::I64(-2), b"l\xff\xff\xff\xff\xff\xff\xff\xfe"),
            (FieldValue::U64(u64::MAX - 1), b"L\xff\xff\xff\xff\xff\xff\xff\xfe"),
            (FieldValue::F32(1.5), b"f\x3f\xc0\x00\x00"),
            (FieldValue::F64(1.5), b"d\x3f\xf8\x00\x00\x00\x00\x00\x00"),
            (FieldValue::Decimal(Decimal { scale: 2, value: 314 }), b"D\x02\x00\x00\x01\x3a"),
            (FieldValue::string("hi"), b"S\x00\x00\x00\x02hi"),
            (FieldValue::Bytes(Bytes::from_static(b"\x00\xff")), b"x\x00\x00\x00\x02\x00\xff"),
            (FieldValue::Array(vec![FieldValue::I8(1), FieldValue::Void]), b"A\x00\x00\x00\x03b\x01V"),
            (FieldValue::Timestamp(1), b"T\x00\x00\x00\x00\x00\x00\x00\x01"),
            (FieldValue::Table(table(vec![("k", FieldValue::Void)])), b"F\x00\x00\x00\x03\x01kV"),
            (FieldValue::Void, b"V"),
        ];
        for (value, wire) in cases {
            let t = table(vec![("a", value.clone())]);
            let mut out = BytesMut::new();
            encode_field_table(&t, &mut out).unwrap();
            let mut expected = vec![0, 0, 0, (2 + wire.len()) as u8, 1, b'a'];
            expected.extend_from_slice(wire);
            assert_eq!(&out[..], &expected[..], "{value:?}");
            assert_eq!(round_trip(&t), t, "{value:?}");
        }
    }

    #[test]
    fn unknown_field_type_is_a_syntax_error() {
        let err = decode_field_table(Bytes::from_static(b"\x01az")).unwrap_err();
        assert_eq!(err, SyntaxError::UnknownFieldType(b'z'));
    }

    #[test]
    fn truncated_value_is_a_syntax_error() {
        let err = decode_field_table(Bytes::from_static(b"\x01aI\x00\x00")).unwrap_err();
        assert_eq!(err, SyntaxError::Truncated("field value"));
        // A nested table whose size runs past the outer table.
        let err = decode_field_table(Bytes::from_static(b"\x01aF\x00\x00\x00\x09\x01kV")).unwrap_err();
        assert_eq!(err, SyntaxError::Truncated("field table"));
    }

    #[test]
    fn decoded_strings_share_the_frame_buffer() {
        let wire = Bytes::from_static(b"\x03keyS\x00\x00\x00\x05value");
        let t = decode_field_table(wire.clone()).unwrap();
        let Some(FieldValue::LongString(v)) = t.get("key") else { panic!("{t:?}") };
        assert_eq!(v.as_ptr(), wire[9..].as_ptr());
        assert_eq!(t.iter().next().unwrap().0.bytes().as_ptr(), wire[1..].as_ptr());
    }

    #[test]
    fn nesting_deeper_than_the_limit_is_refused() {
        fn nested(depth: usize) -> FieldTable {
            let mut t = FieldTable::new();
            for _ in 0..depth {
                t = table(vec![("n", FieldValue::Table(t))]);
            }
            t
        }
        assert_eq!(round_trip(&nested(MAX_NESTING)), nested(MAX_NESTING));
        let mut out = BytesMut::new();
        encode_field_table(&nested(MAX_NESTING + 2), &mut out).unwrap();
        let err = decode_field_table(out.freeze().slice(4..)).unwrap_err();
        assert_eq!(err, SyntaxError::TooDeep);
    }

    #[test]
    fn tables_with_more_entries_than_the_limit_are_refused() {
        let mut wire = BytesMut::new();
        for i in 0..MAX_TABLE_ENTRIES as u16 {
            wire.put_u8(2);
            wire.put_u16(i);
            wire.put_u8(b'V');
        }
        assert_eq!(decode_field_table(wire.clone().freeze()).unwrap().len(), MAX_TABLE_ENTRIES);
        wire.put_slice(b"\x01zV");
        assert_eq!(decode_field_table(wire.freeze()).unwrap_err(), SyntaxError::TooManyEntries);
    }

    #[test]
    fn too_long_key_is_an_encode_error_and_writes_nothing() {
        let t = table(vec![(&"k".repeat(256), FieldValue::Void)]);
        let mut out = BytesMut::from(&b"xy"[..]);
        let err = encode_field_table(&t, &mut out).unwrap_err();
        assert_eq!(err, EncodeError::ShortStringTooLong { field: "field table key", len: 256 });
        assert_eq!(&out[..], b"xy");
    }

    pub(crate) fn arb_short_string() -> impl Strategy<Value = ShortString> {
        prop_oneof![
            "[a-z.#*]{0,12}".prop_map(ShortString::from),
            proptest::collection::vec(any::<u8>(), 0..=255).prop_map(|v| ShortString::from_bytes(Bytes::from(v))),
        ]
    }

    pub(crate) fn arb_long_string() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from)
    }

    /// Any value; floats exclude NaN because NaN != NaN would fail the comparison, not the codec.
    pub(crate) fn arb_field_value() -> impl Strategy<Value = FieldValue> {
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
            any::<f32>().prop_filter("NaN", |f| !f.is_nan()).prop_map(FieldValue::F32),
            any::<f64>().prop_filter("NaN", |f| !f.is_nan()).prop_map(FieldValue::F64),
            (any::<u8>(), any::<u32>()).prop_map(|(scale, value)| FieldValue::Decimal(Decimal { scale, value })),
            arb_long_string().prop_map(FieldValue::LongString),
            arb_long_string().prop_map(FieldValue::Bytes),
            any::<u64>().prop_map(FieldValue::Timestamp),
            Just(FieldValue::Void),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(FieldValue::Array),
                proptest::collection::vec((arb_short_string(), inner), 0..6)
                    .prop_map(|e| FieldValue::Table(e.into_iter().collect())),
            ]
        })
    }

    pub(crate) fn arb_field_table() -> impl Strategy<Value = FieldTable> {
        proptest::collection::vec((arb_short_string(), arb_field_value()), 0..8).prop_map(|e| e.into_iter().collect())
    }

    proptest! {
        #[test]
        fn arbitrary_tables_round_trip(t in arb_field_table()) {
            prop_assert_eq!(round_trip(&t), t);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_table_decoder(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_field_table(Bytes::from(b));
        }
    }
}
