//! Issue 14: what Mosquitto's broker tests found, kept as our own tests (they stay if the suite
//! ever changes): MQTT 3.1, the client's Maximum Packet Size for the CONNACK, malformed
//! properties and filters, SUBACK before retained messages, `$SYS` and `$share` topics, wrong
//! acknowledgements, and the reason codes Ferry now picks (docs/conformance.md).

use ferry_integration_tests::mqtt::{connect_packet, will, RawClient};
use ferry_integration_tests::{within, TestServer};
use ferry_mqtt::codec::{Packet, ProtocolVersion, PubResp, Publish, QoS, Str, SubOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const V31: ProtocolVersion = ProtocolVersion::V31;
const V311: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

async fn bytes_until_close(server: &TestServer, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(server.mqtt_addr()).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut reply = Vec::new();
    within("the broker closes", s.read_to_end(&mut reply)).await.unwrap();
    reply
}

fn publish(topic: &str, qos: QoS, id: u16, retain: bool) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain,
        topic: Str::from(topic),
        packet_id: (qos > QoS::AtMostOnce).then_some(id),
        properties: Default::default(),
        payload: bytes::Bytes::from_static(b"m"),
    })
}

fn qos(q: QoS) -> SubOptions {
    SubOptions { qos: q, ..SubOptions::default() }
}

#[tokio::test]
async fn mqtt31_client_connects_subscribes_and_receives() {
    let server = TestServer::mqtt().await;
    // A 3.1 CONNECT on the wire: MQIsdp, level 3, and an id longer than 3.1's 23 characters.
    let id = "a-gateway-id-longer-than-23-characters";
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V31, id, true).await;
    let ack = c.subscribe(1, "old/#", qos(QoS::AtLeastOnce)).await;
    assert_eq!(ack.reasons, [1]);
    c.send(&publish("old/x", QoS::AtLeastOnce, 5, false)).await;
    let m = c.expect("PUBLISH", |p| if let Packet::Publish(m) = p { Some(m.clone()) } else { None }).await;
    assert_eq!(m.topic.as_str(), "old/x");
    c.expect("PUBACK", |p| matches!(p, Packet::PubAck(a) if a.packet_id == 5).then_some(())).await;
}

#[tokio::test]
async fn mqtt31_empty_client_id_is_rejected_with_2() {
    let server = TestServer::mqtt().await;
    let (_c, ack) = RawClient::connect(server.mqtt_addr(), connect_packet(V31, "", true)).await;
    assert_eq!(ack.code, 2);
}

#[tokio::test]
async fn mqtt31_resumed_session_has_no_session_present_flag() {
    let server = TestServer::mqtt().await;
    let c = RawClient::connect_ok(server.mqtt_addr(), V31, "old-persistent", false).await;
    drop(c);
    // The session is resumed (by takeover if the first connection is still going away), and
    // 3.1's CONNACK has no flag to say so: its first byte is reserved.
    let (_c, ack) = RawClient::connect(server.mqtt_addr(), connect_packet(V31, "old-persistent", false)).await;
    assert_eq!(ack.code, 0);
    assert!(!ack.session_present);
}

#[tokio::test]
async fn connack_larger_than_the_clients_maximum_packet_size_is_not_sent() {
    let server = TestServer::mqtt().await;
    let mut c = connect_packet(V5, "tiny-max", true);
    c.properties.maximum_packet_size = Some(2);
    let mut out = bytes::BytesMut::new();
    ferry_mqtt::codec::encode(&Packet::Connect(Box::new(c)), V5, &mut out);
    assert_eq!(bytes_until_close(&server, &out).await, b"");
}

#[tokio::test]
async fn a_property_not_allowed_in_subscribe_is_malformed() {
    let server = TestServer::mqtt().await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V5, "bad-prop", true).await;
    // SUBSCRIBE id 1, properties: Session Expiry Interval 0 (CONNECT/CONNACK/DISCONNECT only).
    let mut bytes = vec![0x82, 14, 0, 1, 5, 0x11, 0, 0, 0, 0, 0, 1, b't', 1];
    bytes[1] = (bytes.len() - 2) as u8;
    c.send_bytes(&bytes).await;
    c.expect_close(Some(0x81)).await;
}

#[tokio::test]
async fn a_malformed_filter_in_unsubscribe_is_malformed() {
    let server = TestServer::mqtt().await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V5, "bad-unsub", true).await;
    c.send(&Packet::Unsubscribe(ferry_mqtt::codec::Unsubscribe {
        packet_id: 1,
        properties: Default::default(),
        filters: vec![Str::from("#/x")],
    }))
    .await;
    c.expect_close(Some(0x81)).await;
}

#[tokio::test]
async fn suback_comes_before_the_retained_messages() {
    let server = TestServer::mqtt().await;
    let mut p = RawClient::connect_ok(server.mqtt_addr(), V311, "retainer", true).await;
    p.send(&publish("kept/1", QoS::AtLeastOnce, 1, true)).await;
    p.expect("PUBACK", |x| matches!(x, Packet::PubAck(_)).then_some(())).await;
    for version in [V311, V5] {
        let mut s = RawClient::connect_ok(server.mqtt_addr(), version, "sub-first", true).await;
        s.send(&Packet::Subscribe(ferry_mqtt::codec::Subscribe {
            packet_id: 9,
            properties: Default::default(),
            filters: vec![(Str::from("kept/#"), qos(QoS::AtLeastOnce))],
        }))
        .await;
        assert!(matches!(s.recv().await, Packet::SubAck(a) if a.packet_id == 9), "{version:?}: SUBACK first");
        assert!(matches!(s.recv().await, Packet::Publish(m) if m.retain), "{version:?}: then the retained message");
    }
}

#[tokio::test]
async fn clients_cannot_publish_into_sys() {
    let server = TestServer::mqtt().await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V5, "sys-writer", true).await;
    c.send(&publish("$SYS/broker/uptime", QoS::AtLeastOnce, 1, true)).await;
    let code = c.expect("PUBACK", |p| if let Packet::PubAck(a) = p { Some(a.reason) } else { None }).await;
    assert_eq!(code, 0x87);
    // 3.1.1: acknowledged and dropped, so nothing was retained.
    let mut old = RawClient::connect_ok(server.mqtt_addr(), V311, "sys-writer-3", true).await;
    old.send(&publish("$SYS/broker/mine", QoS::AtLeastOnce, 1, true)).await;
    old.expect("PUBACK", |p| matches!(p, Packet::PubAck(_)).then_some(())).await;
    let mut s = RawClient::connect_ok(server.mqtt_addr(), V311, "sys-reader", true).await;
    s.subscribe(1, "$SYS/broker/mine", qos(QoS::AtMostOnce)).await;
    s.quiet().await;
}

#[tokio::test]
async fn a_share_topic_name_is_refused_as_not_authorized() {
    let server = TestServer::mqtt().await;
    let mut s = RawClient::connect_ok(server.mqtt_addr(), V311, "share-reader", true).await;
    s.subscribe(1, "$share/#", qos(QoS::AtMostOnce)).await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V5, "share-writer", true).await;
    c.send(&publish("$share/g/t", QoS::AtLeastOnce, 1, false)).await;
    let code = c.expect("PUBACK", |p| if let Packet::PubAck(a) = p { Some(a.reason) } else { None }).await;
    assert_eq!(code, 0x87);
    // The connection stays: the next publish is answered.
    c.send(&publish("t", QoS::AtLeastOnce, 2, false)).await;
    c.expect("PUBACK", |p| if let Packet::PubAck(a) = p { (a.packet_id == 2).then_some(()) } else { None }).await;
    s.quiet().await;
}

#[tokio::test]
async fn a_mosquitto_bridge_reports_its_state_under_sys() {
    // A Mosquitto bridge connected to Ferry publishes `$SYS/broker/connection/<id>/state`
    // (retained, "1" / "0") when its notifications are on, the default.
    let server = TestServer::mqtt().await;
    let mut bridge = RawClient::connect_ok(server.mqtt_addr(), V5, "edge-1", true).await;
    bridge.send(&publish("$SYS/broker/connection/edge-1/state", QoS::AtLeastOnce, 1, true)).await;
    let code = bridge.expect("PUBACK", |p| if let Packet::PubAck(a) = p { Some(a.reason) } else { None }).await;
    assert_eq!(code, 0x10, "accepted, nobody subscribed yet");
    let mut s = RawClient::connect_ok(server.mqtt_addr(), V311, "ops", true).await;
    s.subscribe(1, "$SYS/broker/connection/+/state", qos(QoS::AtMostOnce)).await;
    let topic = s
        .expect("PUBLISH", |p| if let Packet::Publish(m) = p { Some(m.topic.as_str().to_string()) } else { None })
        .await;
    assert_eq!(topic, "$SYS/broker/connection/edge-1/state");
}

#[tokio::test]
async fn an_ack_of_the_wrong_type_closes_the_connection() {
    let server = TestServer::mqtt().await;
    for (version, wrong) in [(V311, Packet::PubComp(PubResp::ok(1))), (V5, Packet::PubRec(PubResp::ok(1)))] {
        let mut s = RawClient::connect_ok(server.mqtt_addr(), version, "wrong-ack", true).await;
        s.subscribe(1, "wa", qos(QoS::AtLeastOnce)).await;
        s.send(&publish("wa", QoS::AtLeastOnce, 7, false)).await;
        let m = s.expect("PUBLISH", |p| if let Packet::Publish(m) = p { Some(m.clone()) } else { None }).await;
        assert_eq!(m.packet_id, Some(1));
        s.send(&wrong).await;
        // Whatever came before (our PUBACK), then a close without DISCONNECT.
        let seen = s.closed().await;
        assert!(seen.iter().all(|p| !matches!(p, Packet::Disconnect(_))), "{version:?}: {seen:?}");
    }
}

#[tokio::test]
async fn pubrel_for_an_unknown_id_is_answered_pubcomp_success() {
    let server = TestServer::mqtt().await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V5, "late-pubrel", true).await;
    c.send(&Packet::PubRel(PubResp::ok(77))).await;
    let (id, code) =
        c.expect("PUBCOMP", |p| if let Packet::PubComp(r) = p { Some((r.packet_id, r.reason)) } else { None }).await;
    assert_eq!((id, code), (77, 0));
}

#[tokio::test]
async fn a_payload_format_indicator_is_forwarded_whatever_its_value() {
    // §3.3.2.3.2 defines 0 and 1 and forbids nothing else; Mosquitto forwards the byte.
    let server = TestServer::mqtt().await;
    let mut s = RawClient::connect_ok(server.mqtt_addr(), V5, "pfi-reader", true).await;
    s.subscribe(1, "pfi", qos(QoS::AtMostOnce)).await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V5, "pfi-writer", true).await;
    let Packet::Publish(mut p) = publish("pfi", QoS::AtLeastOnce, 1, false) else { unreachable!() };
    p.properties.payload_format_indicator = Some(0xED);
    c.send(&Packet::Publish(p)).await;
    let code = c.expect("PUBACK", |p| if let Packet::PubAck(a) = p { Some(a.reason) } else { None }).await;
    assert_eq!(code, 0);
    let pfi = s
        .expect(
            "PUBLISH",
            |p| if let Packet::Publish(m) = p { Some(m.properties.payload_format_indicator) } else { None },
        )
        .await;
    assert_eq!(pfi, Some(0xED));
}

#[tokio::test]
async fn a_will_on_sys_refuses_the_connect() {
    // Otherwise a client could overwrite `$SYS/broker/uptime` by going away (Mosquitto refuses
    // it too); a Mosquitto bridge's notification will on its state topic is accepted.
    let server = TestServer::mqtt().await;
    for (version, refused) in [(V5, 0x87), (V311, 5)] {
        let mut c = connect_packet(version, "sys-will", true);
        c.will = Some(will("$SYS/broker/uptime", b"0", QoS::AtMostOnce, true));
        let (_, ack) = RawClient::connect(server.mqtt_addr(), c).await;
        assert_eq!(ack.code, refused, "{version:?}");
    }
    let mut c = connect_packet(V311, "edge-1", true);
    c.will = Some(will("$SYS/broker/connection/edge-1/state", b"0", QoS::AtLeastOnce, true));
    let (_, ack) = RawClient::connect(server.mqtt_addr(), c).await;
    assert_eq!(ack.code, 0);
}
