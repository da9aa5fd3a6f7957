//! Frames → methods and content headers, from arbitrary bytes: nothing may panic, whatever
//! decodes must encode, and encoding is stable (encode ∘ decode ∘ encode = encode). Bytes are
//! compared rather than values because a float field may be NaN, and a table with a repeated
//! key or a bit octet with unused bits set does not come back byte for byte from the peer's
//! encoding.
//!
//! Run: `cd amqp-frontend/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run frame -- -max_total_time=60`

#![no_main]

use bytes::BytesMut;
use ferry_amqp::codec::{ContentHeader, Frame, FrameDecoder, Method};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the frame max, so both the size check and big frames are reached.
    let Some((&pick, data)) = data.split_first() else { return };
    let max = match pick % 4 {
        0 => 4096,
        1 => 131_072,
        2 => 64,
        _ => 8,
    };
    let decoder = FrameDecoder::new(max);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = decoder.decode(&mut buf) {
        match frame {
            Frame::Method { payload, .. } => {
                if let Ok(m) = Method::decode_payload(payload) {
                    let _ = (m.name(), m.is_synchronous(), m.has_content());
                    let mut once = BytesMut::new();
                    m.encode(&mut once).expect("a decoded method encodes");
                    let again = Method::decode_payload(once.clone().freeze()).expect("re-decodes");
                    let mut twice = BytesMut::new();
                    again.encode(&mut twice).expect("encodes again");
                    assert_eq!(once, twice);
                }
            }
            Frame::Header { payload, .. } => {
                if let Ok(h) = ContentHeader::decode(payload) {
                    let mut once = BytesMut::new();
                    h.encode(&mut once).expect("a decoded header encodes");
                    let again = ContentHeader::decode(once.clone().freeze()).expect("re-decodes");
                    let mut twice = BytesMut::new();
                    again.encode(&mut twice).expect("encodes again");
                    assert_eq!(once, twice);
                }
            }
            Frame::Body { .. } | Frame::Heartbeat => {}
        }
    }
});
