//! The answer a listener gives when no frontend for its protocol is built in.
//!
//! Only the embedded defaults get here (a config file naming such a protocol is refused at
//! start): Ferry still binds 1883 and 5672, and a client is told in its own protocol that the
//! server cannot serve it, instead of hanging or seeing a bare reset.
//!
//! - AMQP: the server's protocol header `AMQP 0 0 9 1`, then close (AMQP 0-9-1 §4.2.2: a server
//!   that will not accept the client's header answers with the header it supports and closes).
//! - MQTT: a CONNACK refusing the connection as "server unavailable": return code 0x03 for MQTT
//!   3.1/3.1.1, reason code 0x88 for MQTT 5 (a 3.1.1 CONNACK would be malformed to a v5 client).
//!
//! The client's first packet (or header) is read first, bounded in time and size, so that the
//! answer does not race the client's bytes into a reset.

use std::time::Duration;

use ferry_core::frontend::ClientStream;
use ferry_core::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

/// AMQP 0-9-1's protocol header.
pub(crate) const AMQP_PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";
/// MQTT 3.1.1 CONNACK, return code 0x03 "server unavailable" (MQTT 3.1.1 §3.2.2.3).
pub(crate) const MQTT_311_REFUSAL: [u8; 4] = [0x20, 0x02, 0x00, 0x03];
/// MQTT 5 CONNACK, reason code 0x88 "server unavailable", no properties (MQTT 5 §3.2.2.2).
pub(crate) const MQTT_5_REFUSAL: [u8; 5] = [0x20, 0x03, 0x00, 0x88, 0x00];

/// How long the client gets to send its first bytes, and how long it gets to read the answer.
const CLIENT_WAIT: Duration = Duration::from_secs(2);
/// The most read of a client's first packet: enough for any real CONNECT's header.
const MAX_GREETING: usize = 1024;
/// The most discarded while waiting for the client to close after the answer.
const MAX_DRAIN: usize = 64 * 1024;

/// Answers one connection with the protocol's "not available" reply and closes it.
pub(crate) async fn serve(protocol: Protocol, mut stream: ClientStream) -> std::io::Result<()> {
    let reply: &[u8] = match protocol {
        Protocol::Amqp => {
            read_greeting(&mut stream, |buf| buf.len() >= AMQP_PROTOCOL_HEADER.len()).await;
            &AMQP_PROTOCOL_HEADER
        }
        Protocol::Mqtt => mqtt_refusal(&read_greeting(&mut stream, mqtt_packet_complete).await),
        Protocol::Internal => &[],
    };
    stream.write_all(reply).await?;
    stream.shutdown().await?;
    // Closing with unread input makes the kernel send a reset, which can destroy the answer
    // before the client reads it: wait (bounded) for the client to close first.
    let _ = timeout(CLIENT_WAIT, async {
        let mut buf = [0u8; 1024];
        let mut drained = 0;
        while drained < MAX_DRAIN {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
    Ok(())
}

/// Reads until `complete` says the first packet is in, the buffer is full, the peer stops
/// sending, or [`CLIENT_WAIT`] passes; returns what arrived.
async fn read_greeting(stream: &mut ClientStream, complete: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64);
    let _ = timeout(CLIENT_WAIT, async {
        let mut chunk = [0u8; 256];
        while buf.len() < MAX_GREETING && !complete(&buf) {
            let room = (MAX_GREETING - buf.len()).min(chunk.len());
            match stream.read(&mut chunk[..room]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    buf
}

/// Whether `buf` holds a whole MQTT packet (or a fixed header too broken to wait for more).
fn mqtt_packet_complete(buf: &[u8]) -> bool {
    match mqtt_fixed_header(buf) {
        FixedHeader::Incomplete => false,
        FixedHeader::Malformed => true,
        FixedHeader::Complete { header_len, remaining } => buf.len() >= header_len + remaining,
    }
}

enum FixedHeader {
    Incomplete,
    Malformed,
    Complete { header_len: usize, remaining: usize },
}

/// Decodes the type byte and the variable-length "remaining length" (MQTT 3.1.1 §2.2.3: at most
/// four bytes, seven bits each).
fn mqtt_fixed_header(buf: &[u8]) -> FixedHeader {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else { return FixedHeader::Incomplete };
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return FixedHeader::Complete { header_len: 2 + i, remaining };
        }
    }
    FixedHeader::Malformed
}

/// The CONNACK for whatever the client sent: the MQTT 5 form if it is a CONNECT with protocol
/// level 5, the 3.1.1 form otherwise.
fn mqtt_refusal(first_packet: &[u8]) -> &'static [u8] {
    if mqtt_protocol_level(first_packet) == Some(5) {
        &MQTT_5_REFUSAL
    } else {
        &MQTT_311_REFUSAL
    }
}

/// The protocol level of a CONNECT packet (MQTT 3.1.1 §3.1.2.2): after the fixed header, a
/// two-byte length, the protocol name, then the level byte.
fn mqtt_protocol_level(packet: &[u8]) -> Option<u8> {
    const CONNECT: u8 = 1;
    if packet.first()? >> 4 != CONNECT {
        return None;
    }
    let FixedHeader::Complete { header_len, .. } = mqtt_fixed_header(packet) else { return None };
    let body = packet.get(header_len..)?;
    let name_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    body.get(2 + name_len).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal CONNECT: protocol name "MQTT", the given level, clean session, keep-alive 60,
    /// client id "c" (plus an empty property block for level 5).
    fn connect(level: u8) -> Vec<u8> {
        let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', level, 0x02, 0x00, 0x3c];
        if level == 5 {
            body.push(0x00);
        }
        body.extend_from_slice(&[0x00, 0x01, b'c']);
        let mut packet = vec![0x10, body.len() as u8];
        packet.extend(body);
        packet
    }

    #[test]
    fn mqtt_311_connect_gets_return_code_3() {
        assert_eq!(mqtt_refusal(&connect(4)), MQTT_311_REFUSAL);
    }

    #[test]
    fn mqtt_31_connect_gets_return_code_3() {
        // MQTT 3.1 says "MQIsdp" with level 3.
        let mut packet = vec![0x10, 0x0f, 0x00, 0x06];
        packet.extend_from_slice(b"MQIsdp");
        packet.extend_from_slice(&[0x03, 0x02, 0x00, 0x3c, 0x00, 0x01, b'c']);
        assert!(mqtt_packet_complete(&packet));
        assert_eq!(mqtt_protocol_level(&packet), Some(3));
        assert_eq!(mqtt_refusal(&packet), MQTT_311_REFUSAL);
    }

    #[test]
    fn mqtt_5_connect_gets_reason_code_0x88() {
        assert_eq!(mqtt_refusal(&connect(5)), MQTT_5_REFUSAL);
    }

    #[test]
    fn anything_else_gets_the_311_form() {
        assert_eq!(mqtt_refusal(b""), MQTT_311_REFUSAL);
        assert_eq!(mqtt_refusal(&[0x30, 0x00]), MQTT_311_REFUSAL);
        assert_eq!(mqtt_refusal(&[0x10]), MQTT_311_REFUSAL);
        assert_eq!(mqtt_refusal(&[0x10, 0x05, 0x00]), MQTT_311_REFUSAL);
    }

    #[test]
    fn packet_completeness_follows_the_remaining_length() {
        let packet = connect(4);
        for cut in 0..packet.len() {
            assert!(!mqtt_packet_complete(&packet[..cut]), "complete after {cut} bytes");
        }
        assert!(mqtt_packet_complete(&packet));
    }

    #[test]
    fn multi_byte_remaining_length_is_decoded() {
        // 321 = 0xC1 0x02 (MQTT 3.1.1 §2.2.3 example encoding).
        let mut packet = vec![0x10, 0xc1, 0x02];
        assert!(!mqtt_packet_complete(&packet));
        packet.resize(3 + 321, 0);
        assert!(mqtt_packet_complete(&packet));
    }

    #[test]
    fn a_fifth_length_byte_is_malformed_and_stops_the_read() {
        assert!(mqtt_packet_complete(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]));
    }
}
