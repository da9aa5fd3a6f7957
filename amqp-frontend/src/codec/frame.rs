//! Frames and the protocol header.
//!
//! A frame is `type:u8 channel:u16 size:u32 payload[size] 0xCE`. [`FrameDecoder::decode`]
//! follows "check, then parse": it reads the 7-byte header, refuses a bad type or a size over
//! the negotiated frame max at once (before a byte of payload is buffered), returns
//! `Ok(None)` without consuming or allocating until the whole frame is there, then checks the
//! frame-end octet, steps over the header and splits the payload off the buffer (one reference
//! count per frame). The payload is a `Bytes` slice of the read buffer: method arguments and
//! bodies decoded from it copy nothing.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::constants::{
    FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, FRAME_MIN_SIZE, FRAME_OVERHEAD, PROTOCOL_HEADER,
};
use super::error::{EncodeError, FrameError};
use super::wire::{begin_frame, end_frame};

/// One frame, its payload not yet decoded: methods go to
/// [`Method::decode_payload`](super::Method::decode_payload), headers to
/// [`ContentHeader::decode`](super::ContentHeader::decode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Type 1: class id, method id, arguments.
    Method { channel: u16, payload: Bytes },
    /// Type 2: a content header (class, body size, properties).
    Header { channel: u16, payload: Bytes },
    /// Type 3: a slice of a message body.
    Body { channel: u16, payload: Bytes },
    /// Type 8, always on channel 0 with an empty payload.
    Heartbeat,
}

impl Frame {
    pub fn channel(&self) -> u16 {
        match self {
            Frame::Method { channel, .. } | Frame::Header { channel, .. } | Frame::Body { channel, .. } => *channel,
            Frame::Heartbeat => 0,
        }
    }

    /// Writes the frame as it is (for tests and tools; the broker writes through the typed
    /// encoders). Fails only for a payload of 4 GiB or more.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        let (kind, channel, payload): (u8, u16, &[u8]) = match self {
            Frame::Method { channel, payload } => (FRAME_METHOD, *channel, payload),
            Frame::Header { channel, payload } => (FRAME_HEADER, *channel, payload),
            Frame::Body { channel, payload } => (FRAME_BODY, *channel, payload),
            Frame::Heartbeat => (FRAME_HEARTBEAT, 0, &[]),
        };
        let start = begin_frame(out, kind, channel);
        out.put_slice(payload);
        end_frame(out, start).inspect_err(|_| out.truncate(start))
    }
}

/// Splits frames off a read buffer, refusing any larger than `max_frame_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameDecoder {
    /// The largest whole frame accepted, payload + 8, as connection.tune-ok negotiated it.
    /// Before tuning, use [`FRAME_MIN_SIZE`] (the spec lets a peer send up to that much before
    /// the limit is agreed). The server always proposes a finite frame max, so the negotiated
    /// value is never the protocol's 0 = "unlimited"; 0 here accepts no frame at all.
    pub max_frame_size: u32,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder { max_frame_size: FRAME_MIN_SIZE }
    }
}

impl FrameDecoder {
    pub fn new(max_frame_size: u32) -> FrameDecoder {
        FrameDecoder { max_frame_size }
    }

    /// The next frame in `buf`, split off it; `Ok(None)` when more bytes are needed (then
    /// nothing is consumed and nothing allocated). Any error is a connection error 501
    /// FRAME_ERROR; `buf` is then left as it was.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(header) = buf.first_chunk::<7>() else { return Ok(None) };
        let kind = header[0];
        let channel = u16::from_be_bytes([header[1], header[2]]);
        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]);
        match kind {
            FRAME_METHOD | FRAME_HEADER | FRAME_BODY => {}
            FRAME_HEARTBEAT if channel != 0 => return Err(FrameError::HeartbeatOnChannel(channel)),
            FRAME_HEARTBEAT if size != 0 => return Err(FrameError::HeartbeatPayload(size)),
            FRAME_HEARTBEAT => {}
            other => return Err(FrameError::UnknownType(other)),
        }
        let frame_size = u64::from(size) + u64::from(FRAME_OVERHEAD);
        if frame_size > u64::from(self.max_frame_size) {
            return Err(FrameError::TooLarge { size: frame_size, max: self.max_frame_size });
        }
        // At most `max_frame_size`, a u32, so it fits a usize.
        let frame_size = frame_size as usize;
        if buf.len() < frame_size {
            return Ok(None);
        }
        let end = buf[frame_size - 1];
        if end != FRAME_END {
            return Err(FrameError::BadFrameEnd(end));
        }
        // The header and the end octet are stepped over and only the payload is split off: one
        // reference count taken per frame. Splitting the whole frame off, then its payload off
        // that, took two and gave two back (`split_off`, then the header's drop), on each of a
        // publish's three frames.
        buf.advance(7);
        let payload = buf.split_to(size as usize).freeze();
        buf.advance(1);
        Ok(Some(match kind {
            FRAME_METHOD => Frame::Method { channel, payload },
            FRAME_HEADER => Frame::Header { channel, payload },
            FRAME_BODY => Frame::Body { channel, payload },
            _ => Frame::Heartbeat,
        }))
    }
}

/// What the first bytes of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolHeader {
    /// Fewer than 8 bytes so far, all matching `AMQP\0\0\x09\x01`.
    Incomplete,
    /// The 8 bytes of the AMQP 0-9-1 header: the driver consumes them and sends connection.start.
    Ok,
    /// Anything else (another AMQP version, HTTP, TLS on a plain port): the server writes its
    /// own [`PROTOCOL_HEADER`] and closes, as the spec (§4.2.2) and RabbitMQ do.
    Wrong,
}

/// Checks the protocol header at the start of `buf` (which the driver then advances by 8 on
/// `Ok`). A mismatch in a prefix is `Wrong` at once, without waiting for 8 bytes.
pub fn check_protocol_header(buf: &[u8]) -> ProtocolHeader {
    let n = buf.len().min(PROTOCOL_HEADER.len());
    if buf[..n] != PROTOCOL_HEADER[..n] {
        ProtocolHeader::Wrong
    } else if n < PROTOCOL_HEADER.len() {
        ProtocolHeader::Incomplete
    } else {
        ProtocolHeader::Ok
    }
}

/// Writes a heartbeat frame.
pub fn encode_heartbeat(out: &mut BytesMut) {
    out.put_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

/// Writes `body` as body frames on `channel`, each at most `frame_max` bytes in all (payload
/// `frame_max - 8`). `frame_max` 0 means no limit (one frame); values below
/// [`FRAME_MIN_SIZE`] are raised to it, as no peer may negotiate less. An empty body writes
/// no frame.
pub fn encode_body_frames(out: &mut BytesMut, channel: u16, body: &[u8], frame_max: u32) {
    let chunk = max_body_chunk(frame_max);
    for part in body.chunks(chunk) {
        out.put_u8(FRAME_BODY);
        out.put_u16(channel);
        out.put_u32(part.len() as u32); // ≤ chunk ≤ u32::MAX - 8
        out.put_slice(part);
        out.put_u8(FRAME_END);
    }
}

/// The largest body frame payload for a frame max.
pub(crate) fn max_body_chunk(frame_max: u32) -> usize {
    let frame_max = if frame_max == 0 { u32::MAX } else { frame_max.max(FRAME_MIN_SIZE) };
    (frame_max - FRAME_OVERHEAD) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn method_frame(channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![FRAME_METHOD];
        v.extend_from_slice(&channel.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v.push(FRAME_END);
        v
    }

    #[test]
    fn decodes_a_frame_and_leaves_the_rest() {
        let mut wire = method_frame(3, b"\x00\x14\x00\x0a\x00");
        wire.extend_from_slice(b"\x08\x00");
        let mut buf = BytesMut::from(&wire[..]);
        let frame = FrameDecoder::new(4096).decode(&mut buf).unwrap().unwrap();
        assert_eq!(frame, Frame::Method { channel: 3, payload: Bytes::from_static(b"\x00\x14\x00\x0a\x00") });
        assert_eq!(&buf[..], b"\x08\x00");
    }

    #[test]
    fn incremental_one_byte_at_a_time() {
        let mut wire = method_frame(1, b"abcdef");
        wire.extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
        let decoder = FrameDecoder::new(4096);
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for &b in &wire {
            buf.put_u8(b);
            let before = buf.len();
            match decoder.decode(&mut buf).unwrap() {
                Some(f) => frames.push(f),
                None => assert_eq!(buf.len(), before, "Ok(None) consumed bytes"),
            }
        }
        assert_eq!(
            frames,
            vec![Frame::Method { channel: 1, payload: Bytes::from_static(b"abcdef") }, Frame::Heartbeat]
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_frame_is_refused_from_the_header_alone() {
        // 4089 + 8 = 4097 > 4096; only the 7 header bytes are in the buffer.
        let mut buf = BytesMut::from(&[FRAME_BODY, 0, 1, 0, 0, 0x0f, 0xf9][..]);
        let err = FrameDecoder::new(4096).decode(&mut buf).unwrap_err();
        assert_eq!(err, FrameError::TooLarge { size: 4097, max: 4096 });
        assert_eq!(err.reply_code(), 501);
        // Exactly the limit is fine (and needs the rest of the frame).
        let mut buf = BytesMut::from(&[FRAME_BODY, 0, 1, 0, 0, 0x0f, 0xf8][..]);
        assert_eq!(FrameDecoder::new(4096).decode(&mut buf), Ok(None));
        // A size near u32::MAX does not overflow.
        let mut buf = BytesMut::from(&[FRAME_BODY, 0, 1, 0xff, 0xff, 0xff, 0xff][..]);
        let err = FrameDecoder::new(u32::MAX).decode(&mut buf).unwrap_err();
        assert_eq!(err, FrameError::TooLarge { size: u64::from(u32::MAX) + 8, max: u32::MAX });
    }

    #[test]
    fn bad_frame_end_is_a_frame_error() {
        let mut wire = method_frame(1, b"abc");
        *wire.last_mut().unwrap() = 0;
        let err = FrameDecoder::new(4096).decode(&mut BytesMut::from(&wire[..])).unwrap_err();
        assert_eq!(err, FrameError::BadFrameEnd(0));
        assert_eq!(err.reply_text(), "FRAME_ERROR - frame end byte 0x00, expected 0xce");
    }

    #[test]
    fn unknown_frame_type_is_a_frame_error() {
        let mut buf = BytesMut::from(&[4, 0, 0, 0, 0, 0, 0][..]);
        assert_eq!(FrameDecoder::new(4096).decode(&mut buf), Err(FrameError::UnknownType(4)));
    }

    #[test]
    fn heartbeat_must_be_on_channel_zero_and_empty() {
        let decoder = FrameDecoder::new(4096);
        let mut buf = BytesMut::from(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END][..]);
        assert_eq!(decoder.decode(&mut buf), Ok(Some(Frame::Heartbeat)));
        let mut buf = BytesMut::from(&[FRAME_HEARTBEAT, 0, 5, 0, 0, 0, 0, FRAME_END][..]);
        assert_eq!(decoder.decode(&mut buf), Err(FrameError::HeartbeatOnChannel(5)));
        let mut buf = BytesMut::from(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 1][..]);
        assert_eq!(decoder.decode(&mut buf), Err(FrameError::HeartbeatPayload(1)));
        let mut out = BytesMut::new();
        encode_heartbeat(&mut out);
        assert_eq!(decoder.decode(&mut out), Ok(Some(Frame::Heartbeat)));
    }

    #[test]
    fn payload_is_a_slice_of_the_read_buffer() {
        let mut buf = BytesMut::from(&method_frame(1, b"abcdef")[..]);
        let at = buf[7..].as_ptr();
        let Some(Frame::Method { payload, .. }) = FrameDecoder::new(4096).decode(&mut buf).unwrap() else {
            panic!("not a method frame")
        };
        assert_eq!(payload.as_ptr(), at);
    }

    #[test]
    fn protocol_header() {
        assert_eq!(check_protocol_header(b""), ProtocolHeader::Incomplete);
        assert_eq!(check_protocol_header(b"AMQP\x00"), ProtocolHeader::Incomplete);
        assert_eq!(check_protocol_header(b"AMQP\x00\x00\x09\x01"), ProtocolHeader::Ok);
        assert_eq!(check_protocol_header(b"AMQP\x00\x00\x09\x01\x01\x00"), ProtocolHeader::Ok);
        assert_eq!(check_protocol_header(b"AMQP\x01\x01\x00\x09"), ProtocolHeader::Wrong);
        assert_eq!(check_protocol_header(b"AMQP\x00\x00\x08\x00"), ProtocolHeader::Wrong);
        assert_eq!(check_protocol_header(b"GET"), ProtocolHeader::Wrong);
    }

    #[test]
    fn body_frames_split_at_frame_max() {
        let body = vec![7u8; 4088 * 2 + 1];
        let mut out = BytesMut::new();
        encode_body_frames(&mut out, 2, &body, 4096);
        let decoder = FrameDecoder::new(4096);
        let mut sizes = Vec::new();
        while let Some(Frame::Body { channel: 2, payload }) = decoder.decode(&mut out).unwrap() {
            sizes.push(payload.len());
        }
        assert_eq!(sizes, vec![4088, 4088, 1]);
        assert!(out.is_empty());
        encode_body_frames(&mut out, 2, b"", 4096);
        assert!(out.is_empty());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            max in prop_oneof![Just(0u32), Just(8), Just(16), Just(4096), any::<u32>()],
        ) {
            let decoder = FrameDecoder::new(max);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decoder.decode(&mut buf) {}
        }

        #[test]
        fn frames_round_trip(channel in any::<u16>(), kind in 0..3u8, payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let payload = Bytes::from(payload);
            let frame = match kind {
                0 => Frame::Method { channel, payload },
                1 => Frame::Header { channel, payload },
                _ => Frame::Body { channel, payload },
            };
            let mut out = BytesMut::new();
            frame.encode(&mut out).unwrap();
            prop_assert_eq!(FrameDecoder::new(4096).decode(&mut out), Ok(Some(frame)));
            prop_assert!(out.is_empty());
        }
    }
}
