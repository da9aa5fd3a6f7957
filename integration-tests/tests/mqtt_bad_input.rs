//! Malformed and forbidden input, as raw bytes, through the real MQTT frontend. For each case a
//! 5.0 client gets DISCONNECT with the reason code of MQTT 5.0 §2.4 and is closed, a 3.1.1 client
//! is closed without a word, and a client connected beforehand keeps publishing and receiving.
//! Invalid subscription filters are answered in the SUBACK instead (3.1.1 0x80, 5.0 0x8F).

use ferry_integration_tests::mqtt::{publish_packet, sub_options, RawClient};
use ferry_integration_tests::TestServer;
use ferry_mqtt::codec::{Packet, ProtocolVersion, QoS, Str, Subscribe};

const V311: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

/// A QoS 0 PUBLISH with `topic` as raw bytes (and an empty property list in 5.0).
fn raw_publish(version: ProtocolVersion, topic: &[u8], payload: &[u8]) -> Vec<u8> {
    let props: &[u8] = if version == V5 { &[0x00] } else { &[] };
    let rl = 2 + topic.len() + props.len() + payload.len();
    let mut b = vec![0x30, rl as u8, 0x00, topic.len() as u8];
    b.extend_from_slice(topic);
    b.extend_from_slice(props);
    b.extend_from_slice(payload);
    b
}

/// Connects a bystander, then a client of `version` that sends `bytes`: checks how the bad
/// client is closed (DISCONNECT `v5_reason` first in 5.0) and that the bystander still works.
async fn refused(server: &TestServer, version: ProtocolVersion, bytes: &[u8], v5_reason: u8) {
    let mut bystander = RawClient::connect_ok(server.mqtt_addr(), V5, "bystander", true).await;
    bystander.subscribe(1, "alive", sub_options(QoS::AtLeastOnce)).await;

    let mut bad = RawClient::connect_ok(server.mqtt_addr(), version, "bad", true).await;
    bad.send_bytes(bytes).await;
    bad.expect_close((version == V5).then_some(v5_reason)).await;

    bystander.publish(publish_packet("alive", QoS::AtLeastOnce, 1, b"still here")).await;
    let p = bystander.recv_publish().await;
    assert_eq!(&p.payload[..], b"still here", "the other connection is unaffected");
}

async fn refused_in_both(bytes: impl Fn(ProtocolVersion) -> Vec<u8>, v5_reason: u8) {
    let server = TestServer::mqtt().await;
    for version in [V311, V5] {
        refused(&server, version, &bytes(version), v5_reason).await;
    }
}

#[tokio::test]
async fn remaining_length_with_five_continuation_bytes_is_malformed() {
    refused_in_both(|_| vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F], 0x81).await;
}

#[tokio::test]
async fn invalid_utf8_in_a_topic_is_malformed() {
    refused_in_both(|v| raw_publish(v, &[b'a', 0xC3, 0x28], b"x"), 0x81).await;
}

#[tokio::test]
async fn u0000_in_a_topic_is_malformed() {
    refused_in_both(|v| raw_publish(v, b"a\0b", b"x"), 0x81).await;
}

/// MQTT 5.0 §3.3.2.1 makes a wildcard in a topic name a protocol violation; Ferry answers with
/// the more specific 0x90 Topic Name invalid (allowed in DISCONNECT by §3.14.2.1).
#[tokio::test]
async fn wildcard_in_a_publish_topic_gets_topic_name_invalid() {
    refused_in_both(|v| raw_publish(v, b"a/+/b", b"x"), 0x90).await;
    refused_in_both(|v| raw_publish(v, b"a/#", b"x"), 0x90).await;
}

#[tokio::test]
async fn packet_id_0_on_a_qos1_publish_is_malformed() {
    refused_in_both(
        |v| {
            let props: &[u8] = if v == V5 { &[0x00] } else { &[] };
            let mut b = vec![0x32, (2 + 1 + 2 + props.len() + 1) as u8, 0x00, 0x01, b't', 0x00, 0x00];
            b.extend_from_slice(props);
            b.push(b'x');
            b
        },
        0x81,
    )
    .await;
}

#[tokio::test]
async fn reserved_packet_type_0_is_malformed() {
    refused_in_both(|_| vec![0x00, 0x00], 0x81).await;
}

#[tokio::test]
async fn reserved_packet_type_15_closes_a_v311_connection() {
    let server = TestServer::mqtt().await;
    refused(&server, V311, &[0xF0, 0x00], 0x81).await;
}

#[tokio::test]
async fn subscribe_with_wrong_fixed_header_flags_is_malformed() {
    // SUBSCRIBE must have flags 0b0010 (§3.8.1); here they are 0.
    refused_in_both(
        |v| {
            let props: &[u8] = if v == V5 { &[0x00] } else { &[] };
            let mut b = vec![0x80, (2 + props.len() + 3 + 1) as u8, 0x00, 0x01];
            b.extend_from_slice(props);
            b.extend_from_slice(&[0x00, 0x01, b't', 0x00]);
            b
        },
        0x81,
    )
    .await;
}

#[tokio::test]
async fn unknown_property_id_gets_v5_disconnect_0x81() {
    let server = TestServer::mqtt().await;
    // PUBLISH "t" with a property list holding id 0x7F (no such property).
    let bytes = [0x30, 0x07, 0x00, 0x01, b't', 0x02, 0x7F, 0x00, b'x'];
    refused(&server, V5, &bytes, 0x81).await;
}

#[tokio::test]
async fn oversized_packet_is_refused_from_its_header() {
    let server = TestServer::mqtt_with("max_frame_size = 200\n").await;
    for version in [V311, V5] {
        // Only the fixed header and a few bytes: the size is judged before the body arrives.
        let header = [0x30, 0xE8, 0x07, 0x00, 0x01, b't'];
        refused(&server, version, &header, 0x95).await;
    }
}

#[tokio::test]
async fn v311_refused_share_filter_gets_suback_0x80() {
    // Issue 14: a malformed filter closes the connection now (below); a correctly formed one
    // Ferry does not take is still answered 0x80.
    let server = TestServer::mqtt().await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V311, "filters", true).await;
    let ack = c.subscribe(1, "$share/g", sub_options(QoS::AtLeastOnce)).await;
    assert_eq!(ack.reasons, [0x80]);
    c.ping().await;
}

#[tokio::test]
async fn malformed_filters_close_the_connection() {
    // Issue 14 (it was SUBACK 0x80 / 0x8F): 5.0's 0x8F is for correctly formed filters; a
    // malformed one is a Malformed Packet (DISCONNECT 0x81), and 3.1.1 §4.8 closes.
    let server = TestServer::mqtt().await;
    for filter in ["a/#/b", "a+", ""] {
        for (version, reason) in [(V311, None), (V5, Some(0x81))] {
            let mut c = RawClient::connect_ok(server.mqtt_addr(), version, "filters", true).await;
            c.send(&Packet::Subscribe(Subscribe {
                packet_id: 1,
                properties: Default::default(),
                filters: vec![(Str::from(filter), sub_options(QoS::AtLeastOnce))],
            }))
            .await;
            c.expect_close(reason).await;
        }
    }
}

#[tokio::test]
async fn v5_invalid_filter_gets_suback_0x8f() {
    let server = TestServer::mqtt().await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V5, "filters", true).await;
    // Issue 14: only correctly formed filters are answered 0x8F now ("a/#/b" and "a+" close).
    for (i, filter) in ["$share/g", "$share//x"].into_iter().enumerate() {
        let ack = c
            .subscribe_with(Subscribe {
                packet_id: i as u16 + 1,
                properties: Default::default(),
                filters: vec![(Str::from(filter), sub_options(QoS::AtLeastOnce))],
            })
            .await;
        assert_eq!(ack.reasons, [0x8F], "{filter:?}");
    }
    c.ping().await;
}
