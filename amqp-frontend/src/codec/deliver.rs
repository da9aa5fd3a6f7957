//! The hot path: a whole message to a client (method frame, content header frame, body frames)
//! written in one call.
//!
//! Hand-written rather than going through the generated [`Method`](super::Method): building a
//! `Method::BasicDeliver` would clone three `ShortString`s (reference-count traffic) into an
//! enum only to match on it again, and the generic frame writer cannot size its buffer up
//! front. Here the exact size is reserved once, every field is written straight from borrowed
//! values, and nothing is allocated except (at most) growing `out`. A test checks the bytes are
//! identical to the generic encoding.

use bytes::{BufMut, BytesMut};
use ferry_core::message::{Properties, ShortString};

use super::constants::{BASIC_CLASS_ID, FRAME_HEADER, FRAME_METHOD, FRAME_OVERHEAD};
use super::content::write_properties;
use super::error::EncodeError;
use super::frame::{encode_body_frames, max_body_chunk};
use super::wire::{begin_frame, end_frame, put_short_str};

const BASIC_RETURN: u16 = 50;
const BASIC_DELIVER: u16 = 60;
const BASIC_GET_OK: u16 = 71;

/// Writes basic.deliver + content header + body frames (split at `frame_max`; 0 = no limit).
/// On error (a short string over 255 bytes) `out` is left as it was.
///
/// The content header is written whole even if it exceeds `frame_max` (a huge headers
/// table); the caller's publish path bounds headers well below the minimum frame max.
#[allow(clippy::too_many_arguments)] // mirrors the method's wire fields; a struct would only be destructured
pub fn encode_deliver(
    out: &mut BytesMut,
    channel: u16,
    consumer_tag: &ShortString,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &ShortString,
    routing_key: &ShortString,
    properties: &Properties,
    body: &[u8],
    frame_max: u32,
) -> Result<(), EncodeError> {
    let start = out.len();
    reserve(out, consumer_tag.len() + exchange.len() + routing_key.len() + 12, body.len(), frame_max);
    let result = (|| {
        let frame = method_frame(out, channel, BASIC_DELIVER);
        put_short_str(out, consumer_tag.as_bytes(), "consumer-tag")?;
        out.put_u64(delivery_tag);
        out.put_u8(u8::from(redelivered));
        put_short_str(out, exchange.as_bytes(), "exchange")?;
        put_short_str(out, routing_key.as_bytes(), "routing-key")?;
        end_frame(out, frame)?;
        content(out, channel, properties, body, frame_max)
    })();
    result.inspect_err(|_| out.truncate(start))
}

/// Writes basic.get-ok + content header + body frames; see [`encode_deliver`].
#[allow(clippy::too_many_arguments)] // as encode_deliver
pub fn encode_get_ok(
    out: &mut BytesMut,
    channel: u16,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &ShortString,
    routing_key: &ShortString,
    message_count: u32,
    properties: &Properties,
    body: &[u8],
    frame_max: u32,
) -> Result<(), EncodeError> {
    let start = out.len();
    reserve(out, exchange.len() + routing_key.len() + 15, body.len(), frame_max);
    let result = (|| {
        let frame = method_frame(out, channel, BASIC_GET_OK);
        out.put_u64(delivery_tag);
        out.put_u8(u8::from(redelivered));
        put_short_str(out, exchange.as_bytes(), "exchange")?;
        put_short_str(out, routing_key.as_bytes(), "routing-key")?;
        out.put_u32(message_count);
        end_frame(out, frame)?;
        content(out, channel, properties, body, frame_max)
    })();
    result.inspect_err(|_| out.truncate(start))
}

/// Writes basic.return + content header + body frames (an unroutable mandatory publish);
/// see [`encode_deliver`].
#[allow(clippy::too_many_arguments)] // as encode_deliver
pub fn encode_return(
    out: &mut BytesMut,
    channel: u16,
    reply_code: u16,
    reply_text: &ShortString,
    exchange: &ShortString,
    routing_key: &ShortString,
    properties: &Properties,
    body: &[u8],
    frame_max: u32,
) -> Result<(), EncodeError> {
    let start = out.len();
    reserve(out, reply_text.len() + exchange.len() + routing_key.len() + 5, body.len(), frame_max);
    let result = (|| {
        let frame = method_frame(out, channel, BASIC_RETURN);
        out.put_u16(reply_code);
        put_short_str(out, reply_text.as_bytes(), "reply-text")?;
        put_short_str(out, exchange.as_bytes(), "exchange")?;
        put_short_str(out, routing_key.as_bytes(), "routing-key")?;
        end_frame(out, frame)?;
        content(out, channel, properties, body, frame_max)
    })();
    result.inspect_err(|_| out.truncate(start))
}

/// One reservation for the whole message: method frame, a header frame (properties guessed at
/// 64 bytes; a larger one grows `out` once more), body frames.
fn reserve(out: &mut BytesMut, method_args: usize, body: usize, frame_max: u32) {
    let overhead = FRAME_OVERHEAD as usize;
    let body_frames = body.div_ceil(max_body_chunk(frame_max));
    out.reserve((overhead + 4 + method_args) + (overhead + 14 + 64) + body + body_frames * overhead);
}

fn method_frame(out: &mut BytesMut, channel: u16, method_id: u16) -> usize {
    let frame = begin_frame(out, FRAME_METHOD, channel);
    out.put_u16(BASIC_CLASS_ID);
    out.put_u16(method_id);
    frame
}

fn content(
    out: &mut BytesMut,
    channel: u16,
    properties: &Properties,
    body: &[u8],
    frame_max: u32,
) -> Result<(), EncodeError> {
    let frame = begin_frame(out, FRAME_HEADER, channel);
    out.put_u16(BASIC_CLASS_ID);
    out.put_u16(0); // weight
    out.put_u64(body.len() as u64);
    write_properties(out, properties)?;
    end_frame(out, frame)?;
    encode_body_frames(out, channel, body, frame_max);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::content::tests::arb_properties;
    use crate::codec::content::{encode_header_frame, ContentHeader};
    use crate::codec::method::{encode_method_frame, BasicDeliver, BasicGetOk, BasicReturn, Method};
    use crate::codec::table::tests::arb_short_string;
    use ferry_core::message::DeliveryMode;
    use proptest::prelude::*;

    fn generic(channel: u16, method: Method, properties: &Properties, body: &[u8], frame_max: u32) -> BytesMut {
        let mut out = BytesMut::new();
        encode_method_frame(channel, &method, &mut out).unwrap();
        encode_header_frame(channel, &ContentHeader::basic(body.len() as u64, properties.clone()), &mut out).unwrap();
        encode_body_frames(&mut out, channel, body, frame_max);
        out
    }

    #[test]
    fn deliver_equals_the_generic_encoding() {
        let props = Properties {
            content_type: Some("application/json".into()),
            delivery_mode: Some(DeliveryMode::Persistent),
            ..Default::default()
        };
        let body = vec![b'x'; 10_000];
        let (ctag, ex, rk) = (ShortString::from("ctag-1"), ShortString::from("amq.topic"), ShortString::from("a.b"));
        let mut out = BytesMut::new();
        encode_deliver(&mut out, 7, &ctag, 42, true, &ex, &rk, &props, &body, 4096).unwrap();
        let method = Method::BasicDeliver(BasicDeliver {
            consumer_tag: ctag,
            delivery_tag: 42,
            redelivered: true,
            exchange: ex,
            routing_key: rk,
        });
        assert_eq!(out, generic(7, method, &props, &body, 4096));
    }

    #[test]
    fn deliver_with_a_too_long_routing_key_writes_nothing() {
        let long = ShortString::from("r".repeat(256));
        let mut out = BytesMut::from(&b"prefix"[..]);
        let err =
            encode_deliver(&mut out, 1, &"c".into(), 1, false, &"".into(), &long, &Properties::default(), b"x", 0)
                .unwrap_err();
        assert_eq!(err, EncodeError::ShortStringTooLong { field: "routing-key", len: 256 });
        assert_eq!(&out[..], b"prefix");
    }

    proptest! {
        #[test]
        fn hot_path_equals_generic(
            channel in any::<u16>(),
            tag in any::<u64>(),
            redelivered in any::<bool>(),
            (ctag, ex, rk) in (arb_short_string(), arb_short_string(), arb_short_string()),
            count in any::<u32>(),
            code in any::<u16>(),
            props in arb_properties(),
            body in proptest::collection::vec(any::<u8>(), 0..9000),
            frame_max in prop_oneof![Just(0u32), Just(4096), Just(5000), Just(131_072)],
        ) {
            let mut out = BytesMut::new();
            encode_deliver(&mut out, channel, &ctag, tag, redelivered, &ex, &rk, &props, &body, frame_max).unwrap();
            let m = Method::BasicDeliver(BasicDeliver {
                consumer_tag: ctag.clone(), delivery_tag: tag, redelivered, exchange: ex.clone(), routing_key: rk.clone(),
            });
            prop_assert_eq!(&out, &generic(channel, m, &props, &body, frame_max));

            let mut out = BytesMut::new();
            encode_get_ok(&mut out, channel, tag, redelivered, &ex, &rk, count, &props, &body, frame_max).unwrap();
            let m = Method::BasicGetOk(BasicGetOk {
                delivery_tag: tag, redelivered, exchange: ex.clone(), routing_key: rk.clone(), message_count: count,
            });
            prop_assert_eq!(&out, &generic(channel, m, &props, &body, frame_max));

            let mut out = BytesMut::new();
            encode_return(&mut out, channel, code, &ctag, &ex, &rk, &props, &body, frame_max).unwrap();
            let m = Method::BasicReturn(BasicReturn { reply_code: code, reply_text: ctag, exchange: ex, routing_key: rk });
            prop_assert_eq!(&out, &generic(channel, m, &props, &body, frame_max));
        }
    }
}
