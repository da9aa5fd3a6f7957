//! MQTT connection set-up through the real frontend: CONNECT accepted and refused (client ids,
//! protocol levels, flags, order, timeout, authentication), session takeover, keep alive.

use std::time::{Duration, Instant};

use ferry_integration_tests::mqtt::{connect_packet, v311, v5, will, RawClient};
use ferry_integration_tests::{within, TestServer};
use ferry_mqtt::codec::{Packet, ProtocolVersion, Publish, QoS, Str};
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const V311: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

/// Sends `bytes` on a fresh connection and returns everything until the broker closes.
async fn bytes_until_close(server: &TestServer, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(server.mqtt_addr()).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut reply = Vec::new();
    within("the broker closes", s.read_to_end(&mut reply)).await.unwrap();
    reply
}

#[tokio::test]
async fn v311_client_connects_and_round_trips_a_message() {
    let server = TestServer::mqtt().await;
    let mut c = v311::connect(&server, "c311").await;
    let ack = c.subscribe("greet/#", rumqttc::QoS::AtLeastOnce).await;
    assert_eq!(ack.return_codes, [rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce)]);
    c.publish("greet/me", rumqttc::QoS::AtLeastOnce, false, b"hi").await;
    let p = c.publish_received().await;
    assert_eq!((&p.topic[..], &p.payload[..]), ("greet/me", &b"hi"[..]));
}

#[tokio::test]
async fn v5_client_connects_and_is_told_the_server_limits() {
    let server = TestServer::mqtt_with("max_frame_size = 65536\n").await;
    let (mut c, ack) = v5::Client::connect(v5::options(&server, "c5")).await;
    assert_eq!(ack.code, rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success);
    assert!(!ack.session_present);
    let props = ack.properties.expect("CONNACK properties");
    assert_eq!(props.receive_max, Some(100));
    assert_eq!(props.max_packet_size, Some(65_536), "the listener's max_frame_size");
    assert_eq!(props.topic_alias_max, Some(10));
    assert_eq!(props.assigned_client_identifier, None);
    c.subscribe("greet/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await;
    c.publish("greet/me", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, b"hi").await;
    assert_eq!(&c.publish_received().await.payload[..], b"hi");
}

#[tokio::test]
async fn v311_empty_client_id_with_clean_session_gets_a_working_session() {
    let server = TestServer::mqtt().await;
    let (mut c, ack) = RawClient::connect(server.mqtt_addr(), connect_packet(V311, "", true)).await;
    assert_eq!((ack.code, ack.session_present), (0, false));
    c.subscribe(1, "anon", ferry_integration_tests::mqtt::sub_options(QoS::AtMostOnce)).await;
    c.publish(ferry_integration_tests::mqtt::publish_packet("anon", QoS::AtMostOnce, 0, b"x")).await;
    assert_eq!(&c.recv_publish().await.payload[..], b"x");
}

#[tokio::test]
async fn v311_empty_client_id_without_clean_session_is_refused_with_0x02() {
    let server = TestServer::mqtt().await;
    let (mut c, ack) = RawClient::connect(server.mqtt_addr(), connect_packet(V311, "", false)).await;
    assert_eq!((ack.code, ack.session_present), (0x02, false));
    c.expect_close(None).await;
}

#[tokio::test]
async fn v5_empty_client_id_gets_an_assigned_client_identifier() {
    let server = TestServer::mqtt().await;
    let (_c, ack) = RawClient::connect(server.mqtt_addr(), connect_packet(V5, "", true)).await;
    assert_eq!(ack.code, 0);
    let assigned = ack.properties.assigned_client_identifier.clone().expect("Assigned Client Identifier");
    assert!(!assigned.is_empty());
    let (_d, ack2) = RawClient::connect(server.mqtt_addr(), connect_packet(V5, "", true)).await;
    assert_ne!(ack2.properties.assigned_client_identifier, Some(assigned), "identifiers are unique");
}

#[tokio::test]
async fn mqisdp_at_level_4_is_refused_with_0x01_then_closed() {
    // Issue 14: MQIsdp level 3 (MQTT 3.1) is supported now (tests/mqtt_conformance.rs); the
    // name at another level is still refused.
    let server = TestServer::mqtt().await;
    let mut connect = vec![0x10, 0x0f, 0x00, 0x06];
    connect.extend_from_slice(b"MQIsdp");
    connect.extend_from_slice(&[0x04, 0x02, 0x00, 0x3c, 0x00, 0x01, b'c']);
    assert_eq!(bytes_until_close(&server, &connect).await, [0x20, 0x02, 0x00, 0x01]);
}

#[tokio::test]
async fn protocol_level_6_is_refused_with_0x01_then_closed() {
    let server = TestServer::mqtt().await;
    let connect = [0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x06, 0x02, 0x00, 0x3c, 0x00, 0x01, b'c'];
    assert_eq!(bytes_until_close(&server, &connect).await, [0x20, 0x02, 0x00, 0x01]);
}

#[tokio::test]
async fn reserved_connect_flag_closes_the_connection_without_connack() {
    let server = TestServer::mqtt().await;
    // Connect flags 0x03: clean session plus the reserved bit (3.1.1 §3.1.2.3).
    let connect = [0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x03, 0x00, 0x3c, 0x00, 0x01, b'c'];
    assert_eq!(bytes_until_close(&server, &connect).await, b"");
}

#[tokio::test]
async fn packets_before_connect_close_the_connection() {
    let server = TestServer::mqtt().await;
    assert_eq!(bytes_until_close(&server, &[0xC0, 0x00]).await, b"", "PINGREQ first");
    let mut publish = vec![0x30, 0x05, 0x00, 0x01, b't'];
    publish.extend_from_slice(b"xy");
    assert_eq!(bytes_until_close(&server, &publish).await, b"", "PUBLISH first");
}

#[tokio::test]
async fn second_connect_closes_a_v311_connection() {
    let server = TestServer::mqtt().await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V311, "twice", true).await;
    c.send(&Packet::Connect(Box::new(connect_packet(V311, "twice", true)))).await;
    c.expect_close(None).await;
}

#[tokio::test]
async fn second_connect_closes_a_v5_connection_without_disconnect() {
    // Issue 14: closed silently, as Mosquitto does (it was DISCONNECT 0x82 first).
    let server = TestServer::mqtt().await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V5, "twice5", true).await;
    c.send(&Packet::Connect(Box::new(connect_packet(V5, "twice5", true)))).await;
    c.expect_close(None).await;
}

#[tokio::test]
async fn a_connection_that_sends_no_connect_is_closed_after_the_handshake_timeout() {
    let server = TestServer::mqtt_with("handshake_timeout_secs = 1\n").await;
    let started = Instant::now();
    let mut c = RawClient::open(server.mqtt_addr(), V311).await;
    c.expect_close(None).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "closed too early: {took:?}");
}

#[tokio::test]
async fn v5_connect_with_an_authentication_method_is_refused_with_0x8c() {
    let server = TestServer::mqtt().await;
    let mut connect = connect_packet(V5, "auth", true);
    connect.properties.authentication_method = Some(Str::from("SCRAM-SHA-256"));
    let (mut c, ack) = RawClient::connect(server.mqtt_addr(), connect).await;
    assert_eq!(ack.code, 0x8C);
    c.expect_close(None).await;
}

#[tokio::test]
async fn v311_session_takeover_closes_the_first_connection() {
    let server = TestServer::mqtt().await;
    let mut first = RawClient::connect_ok(server.mqtt_addr(), V311, "same", true).await;
    let mut second = RawClient::connect_ok(server.mqtt_addr(), V311, "same", true).await;
    first.expect_close(None).await;
    second.ping().await;
}

#[tokio::test]
async fn v5_session_takeover_sends_disconnect_0x8e_to_the_first_client() {
    let server = TestServer::mqtt().await;
    let mut first = v5::connect(&server, "same5").await;
    let (_second, ack) = v5::Client::connect(v5::options(&server, "same5")).await;
    assert_eq!(ack.code, rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success);
    match first.error().await {
        rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect { reason_code, .. }) => {
            assert_eq!(reason_code, DisconnectReasonCode::SessionTakenOver)
        }
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
}

#[tokio::test]
async fn silent_client_is_closed_after_one_and_a_half_keep_alives_and_its_will_is_published() {
    let server = TestServer::mqtt().await;
    let mut watcher = v311::connect(&server, "watcher").await;
    watcher.subscribe("wills/#", rumqttc::QoS::AtLeastOnce).await;

    let mut connect = connect_packet(V311, "sleepy", true);
    connect.keep_alive = 1;
    connect.will = Some(will("wills/sleepy", b"gone", QoS::AtLeastOnce, false));
    let (mut sleepy, ack) = RawClient::connect(server.mqtt_addr(), connect).await;
    assert_eq!(ack.code, 0);
    let started = Instant::now();
    sleepy.expect_close(None).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1400), "closed before 1.5 × keep alive: {took:?}");
    assert!(took < Duration::from_secs(4), "closed long after 1.5 × keep alive: {took:?}");
    let w = watcher.publish_received().await;
    assert_eq!((&w.topic[..], &w.payload[..]), ("wills/sleepy", &b"gone"[..]));
}

#[tokio::test]
async fn pingreq_gets_pingresp_and_keeps_the_connection_alive() {
    let server = TestServer::mqtt().await;
    let mut connect = connect_packet(V5, "pinger", true);
    connect.keep_alive = 1;
    let (mut c, _) = RawClient::connect(server.mqtt_addr(), connect).await;
    // Three pings 700 ms apart span more than 1.5 × keep alive: each one resets the timer.
    for _ in 0..3 {
        c.ping().await;
        assert!(c.next_within(Duration::from_millis(700)).await.is_err(), "nothing else arrives, no close");
    }
    c.ping().await;
}

#[tokio::test]
async fn v5_publish_after_connect_reaches_a_v311_subscriber() {
    let server = TestServer::mqtt().await;
    let mut sub = RawClient::connect_ok(server.mqtt_addr(), V311, "sub", true).await;
    sub.subscribe(1, "x/y", ferry_integration_tests::mqtt::sub_options(QoS::AtLeastOnce)).await;
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V5, "pub", true).await;
    let p =
        Publish { retain: false, ..ferry_integration_tests::mqtt::publish_packet("x/y", QoS::AtLeastOnce, 7, b"5to3") };
    publisher.publish(p).await;
    let got = sub.recv_publish().await;
    assert_eq!((got.topic.as_str(), &got.payload[..], got.qos), ("x/y", &b"5to3"[..], QoS::AtLeastOnce));
}

#[tokio::test]
async fn v5_keep_alive_timeout_is_reported_with_disconnect_0x8d() {
    let server = TestServer::mqtt().await;
    let mut connect = connect_packet(V5, "sleepy5", true);
    connect.keep_alive = 1;
    let (mut c, _) = RawClient::connect(server.mqtt_addr(), connect).await;
    c.expect_close(Some(0x8D)).await;
}

#[tokio::test]
async fn v5_more_unreleased_qos2_publishes_than_receive_maximum_get_disconnect_0x93() {
    let server = TestServer::mqtt().await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V5, "greedy", true).await;
    // The server's Receive Maximum is 100: the 101st QoS 2 publish without PUBREL is too many.
    for id in 1..=100u16 {
        c.send(&Packet::Publish(ferry_integration_tests::mqtt::publish_packet("g", QoS::ExactlyOnce, id, b"x"))).await;
        assert!(matches!(c.recv().await, Packet::PubRec(r) if r.packet_id == id));
    }
    c.send(&Packet::Publish(ferry_integration_tests::mqtt::publish_packet("g", QoS::ExactlyOnce, 101, b"x"))).await;
    c.expect_close(Some(0x93)).await;
}
