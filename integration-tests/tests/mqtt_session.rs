//! Wills and session state through the real MQTT frontend: wills on abnormal loss (not on a
//! normal DISCONNECT), 5.0 will delay, persistent sessions (queued messages, redelivery with
//! DUP, session expiry) and clean start.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_integration_tests::mqtt::{connect_packet, publish_packet, sub_options, v311, will, RawClient};
use ferry_integration_tests::{within, TestServer};
use ferry_mqtt::codec::{Disconnect, Packet, Properties, PropertyValues, ProtocolVersion, PubResp, QoS, Str};

const V311: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;
const Q1: rumqttc::QoS = rumqttc::QoS::AtLeastOnce;

async fn watcher(server: &TestServer, filter: &str) -> RawClient {
    let mut w = RawClient::connect_ok(server.mqtt_addr(), V5, "watcher", true).await;
    w.subscribe(1, filter, sub_options(QoS::ExactlyOnce)).await;
    w
}

// ----- wills -------------------------------------------------------------------------------------

#[tokio::test]
async fn will_is_published_when_the_connection_drops() {
    let server = TestServer::mqtt().await;
    let mut w = watcher(&server, "wills/#").await;
    let mut connect = connect_packet(V311, "dropper", true);
    connect.will = Some(will("wills/dropper", b"lost", QoS::AtMostOnce, false));
    let (c, _) = RawClient::connect(server.mqtt_addr(), connect).await;
    c.drop_connection();
    let p = w.recv_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..], p.qos, p.retain),
        ("wills/dropper", &b"lost"[..], QoS::AtMostOnce, false)
    );
}

#[tokio::test]
async fn will_keeps_its_qos_and_retain_flag() {
    let server = TestServer::mqtt().await;
    let mut w = watcher(&server, "wills/#").await;
    let mut connect = connect_packet(V311, "retainer", true);
    connect.will = Some(will("wills/retainer", b"offline", QoS::AtLeastOnce, true));
    let (c, _) = RawClient::connect(server.mqtt_addr(), connect).await;
    c.drop_connection();
    let live = w.recv_publish().await;
    assert_eq!((live.qos, &live.payload[..]), (QoS::AtLeastOnce, &b"offline"[..]));
    assert!(!live.retain, "a live subscriber gets RETAIN=0 (no retain-as-published)");
    w.send(&Packet::PubAck(PubResp::ok(live.packet_id.unwrap()))).await;

    // The will was retained: a later subscriber gets it with RETAIN=1.
    let mut late = RawClient::connect_ok(server.mqtt_addr(), V311, "late", true).await;
    late.subscribe(1, "wills/retainer", sub_options(QoS::ExactlyOnce)).await;
    let r = late.recv_publish().await;
    assert_eq!((r.qos, r.retain, &r.payload[..]), (QoS::AtLeastOnce, true, &b"offline"[..]));
}

#[tokio::test]
async fn v5_will_properties_reach_a_v5_subscriber() {
    let server = TestServer::mqtt().await;
    let mut w = watcher(&server, "wills/#").await;
    let mut connect = connect_packet(V5, "props", true);
    let mut wl = will("wills/props", b"{\"state\":\"lost\"}", QoS::AtMostOnce, false);
    wl.properties = PropertyValues {
        payload_format_indicator: Some(1),
        content_type: Some(Str::from("application/json")),
        response_topic: Some(Str::from("replies/props")),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
        user_properties: vec![(Str::from("site"), Str::from("plant-7"))],
        ..PropertyValues::default()
    }
    .into();
    connect.will = Some(wl);
    let (c, _) = RawClient::connect(server.mqtt_addr(), connect).await;
    c.drop_connection();
    let p = w.recv_publish().await;
    assert_eq!(p.topic.as_str(), "wills/props");
    assert_eq!(p.properties.payload_format_indicator, Some(1));
    assert_eq!(p.properties.content_type.as_ref().map(Str::as_str), Some("application/json"));
    assert_eq!(p.properties.response_topic.as_ref().map(Str::as_str), Some("replies/props"));
    assert_eq!(p.properties.correlation_data.as_deref(), Some(&b"\x00\x01corr"[..]));
    assert_eq!(p.properties.user_properties, vec![(Str::from("site"), Str::from("plant-7"))]);
}

#[tokio::test]
async fn no_will_after_a_normal_disconnect() {
    let server = TestServer::mqtt().await;
    let mut w = watcher(&server, "wills/#").await;
    for version in [V311, V5] {
        let mut connect = connect_packet(version, "polite", true);
        connect.will = Some(will("wills/polite", b"unexpected", QoS::AtMostOnce, false));
        let (mut c, _) = RawClient::connect(server.mqtt_addr(), connect).await;
        c.send(&Packet::Disconnect(Disconnect { reason: 0, properties: Properties::default() })).await;
        c.expect_close(None).await;
    }
    // Nothing may arrive: bounded wait (QUIET) for a will that must not come.
    w.quiet().await;
}

#[tokio::test]
async fn v5_disconnect_with_will_message_0x04_publishes_the_will() {
    let server = TestServer::mqtt().await;
    let mut w = watcher(&server, "wills/#").await;
    let mut connect = connect_packet(V5, "leaver", true);
    connect.will = Some(will("wills/leaver", b"bye", QoS::AtMostOnce, false));
    let (mut c, _) = RawClient::connect(server.mqtt_addr(), connect).await;
    c.send(&Packet::Disconnect(Disconnect { reason: 0x04, properties: Properties::default() })).await;
    c.expect_close(None).await;
    assert_eq!(&w.recv_publish().await.payload[..], b"bye");
}

fn delayed_will_connect(client_id: &str, clean: bool) -> ferry_mqtt::codec::Connect {
    let mut connect = connect_packet(V5, client_id, clean);
    connect.properties.session_expiry_interval = Some(10);
    let mut wl = will("wills/delayed", b"late", QoS::AtMostOnce, false);
    wl.properties.will_delay_interval = Some(2);
    connect.will = Some(wl);
    connect
}

#[tokio::test]
async fn v5_will_delay_is_cancelled_by_a_reconnect_within_the_delay() {
    let server = TestServer::mqtt().await;
    let mut w = watcher(&server, "wills/#").await;
    let (c, _) = RawClient::connect(server.mqtt_addr(), delayed_will_connect("delayer", true)).await;
    c.drop_connection();
    let (mut back, ack) = RawClient::connect(server.mqtt_addr(), delayed_will_connect("delayer", false)).await;
    assert_eq!((ack.code, ack.session_present), (0, true));
    // The will would come 2 s after the drop: wait past that (bounded) to see it does not.
    assert!(w.next_within(Duration::from_millis(3000)).await.is_err(), "the will was published after a resume");
    back.ping().await;
}

#[tokio::test]
async fn v5_will_is_published_after_its_delay_when_the_client_does_not_return() {
    let server = TestServer::mqtt().await;
    let mut w = watcher(&server, "wills/#").await;
    let (c, _) = RawClient::connect(server.mqtt_addr(), delayed_will_connect("gone", true)).await;
    let dropped = Instant::now();
    c.drop_connection();
    let p = w.recv_publish().await;
    let took = dropped.elapsed();
    assert_eq!(&p.payload[..], b"late");
    assert!(took >= Duration::from_millis(1800), "will published before its delay: {took:?}");
}

// ----- persistent sessions ----------------------------------------------------------------------

#[tokio::test]
async fn v311_persistent_session_gets_messages_published_while_away_in_order() {
    let server = TestServer::mqtt().await;
    let mut o = v311::options(&server, "durable");
    o.set_clean_session(false);
    let (mut c, ack) = v311::Client::connect(o.clone()).await;
    assert!(!ack.session_present);
    c.subscribe("orders/#", Q1).await;
    c.disconnect().await;

    let mut publisher = v311::connect(&server, "publisher").await;
    for i in 0..5 {
        publisher.publish(&format!("orders/{i}"), Q1, false, format!("order {i}").as_bytes()).await;
    }

    let (mut c, ack) = v311::Client::connect(o).await;
    assert!(ack.session_present, "the session was kept");
    for i in 0..5 {
        let p = c.publish_received().await;
        assert_eq!(&p.topic[..], format!("orders/{i}"));
        assert_eq!(p.payload, format!("order {i}").as_bytes());
        assert_eq!(p.qos, Q1);
    }
}

/// Connects a persistent 3.1.1 session subscribed to `q0/#` at QoS 1, leaves, lets a QoS 0 and
/// a QoS 1 message be published, comes back and returns the connection.
async fn away_while_qos0_and_qos1_are_published(server: &TestServer) -> RawClient {
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V311, "q0", false).await;
    c.subscribe(1, "q0/#", sub_options(QoS::AtLeastOnce)).await;
    c.send(&Packet::Disconnect(Disconnect { reason: 0, properties: Properties::default() })).await;
    c.expect_close(None).await;

    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V311, "pub0", true).await;
    publisher.publish(publish_packet("q0/a", QoS::AtMostOnce, 0, b"zero")).await;
    publisher.publish(publish_packet("q0/b", QoS::AtLeastOnce, 1, b"one")).await;

    let (c, ack) = RawClient::connect(server.mqtt_addr(), connect_packet(V311, "q0", false)).await;
    assert!(ack.session_present);
    c
}

/// By default QoS 0 messages published while a persistent session is away are dropped
/// (Mosquitto's default, `queue_qos0_messages false`; the spec leaves it to the server), QoS 1
/// ones wait for the client.
#[tokio::test]
async fn v311_persistent_session_drops_qos0_messages_while_away_by_default() {
    let server = TestServer::mqtt().await;
    let mut c = away_while_qos0_and_qos1_are_published(&server).await;
    let b = c.recv_publish().await;
    assert_eq!((b.topic.as_str(), b.qos), ("q0/b", QoS::AtLeastOnce));
    c.send(&Packet::PubAck(PubResp::ok(b.packet_id.unwrap()))).await;
    // Bounded QUIET wait: the QoS 0 message was not kept.
    c.quiet().await;
}

/// With `queue_qos0_offline` they are queued too, and delivered at QoS 0 in publish order.
#[tokio::test]
async fn v311_persistent_session_queues_qos0_messages_while_away_when_configured() {
    let settings = ferry_mqtt::Settings { queue_qos0_offline: true, ..Default::default() };
    let server = TestServer::mqtt_with_settings(settings, "").await;
    let mut c = away_while_qos0_and_qos1_are_published(&server).await;
    let a = c.recv_publish().await;
    assert_eq!((a.topic.as_str(), a.qos), ("q0/a", QoS::AtMostOnce));
    let b = c.recv_publish().await;
    assert_eq!((b.topic.as_str(), b.qos), ("q0/b", QoS::AtLeastOnce));
}

#[tokio::test]
async fn unacked_qos1_deliveries_are_redelivered_with_dup_after_reconnect() {
    let server = TestServer::mqtt().await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V311, "forgetful", false).await;
    c.subscribe(1, "jobs", sub_options(QoS::AtLeastOnce)).await;
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V311, "boss", true).await;
    publisher.publish(publish_packet("jobs", QoS::AtLeastOnce, 1, b"job 1")).await;
    publisher.publish(publish_packet("jobs", QoS::AtLeastOnce, 2, b"job 2")).await;
    let first = c.recv_publish().await;
    let second = c.recv_publish().await;
    assert!(!first.dup && !second.dup);
    // Acknowledge only the first, then lose the connection.
    c.send(&Packet::PubAck(PubResp::ok(first.packet_id.unwrap()))).await;
    c.ping().await;
    c.drop_connection();

    let (mut c, ack) = RawClient::connect(server.mqtt_addr(), connect_packet(V311, "forgetful", false)).await;
    assert!(ack.session_present);
    let again = c.recv_publish().await;
    assert_eq!(&again.payload[..], b"job 2");
    assert!(again.dup, "a redelivery carries DUP");
    assert_eq!(again.packet_id, second.packet_id, "the same packet id (§4.4)");
    c.send(&Packet::PubAck(PubResp::ok(again.packet_id.unwrap()))).await;
    // Nothing else: the acknowledged message is not sent again (bounded QUIET wait).
    c.quiet().await;
}

#[tokio::test]
async fn v5_session_expiry_keeps_the_session_within_the_interval() {
    let server = TestServer::mqtt().await;
    let mut connect = connect_packet(V5, "kept", true);
    connect.properties.session_expiry_interval = Some(10);
    let (mut c, _) = RawClient::connect(server.mqtt_addr(), connect.clone()).await;
    c.subscribe(1, "kept/#", sub_options(QoS::AtLeastOnce)).await;
    c.drop_connection();
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V5, "pubk", true).await;
    publisher.publish(publish_packet("kept/x", QoS::AtLeastOnce, 1, b"waiting")).await;
    connect.clean_start = false;
    let (mut c, ack) = RawClient::connect(server.mqtt_addr(), connect).await;
    assert!(ack.session_present);
    assert_eq!(&c.recv_publish().await.payload[..], b"waiting");
}

#[tokio::test]
async fn v5_session_expiry_of_one_second_ends_the_session() {
    let server = TestServer::mqtt().await;
    let mut connect = connect_packet(V5, "brief", true);
    connect.properties.session_expiry_interval = Some(1);
    let (mut c, _) = RawClient::connect(server.mqtt_addr(), connect.clone()).await;
    c.subscribe(1, "brief/#", sub_options(QoS::AtLeastOnce)).await;
    c.send(&Packet::Disconnect(Disconnect { reason: 0, properties: Properties::default() })).await;
    c.expect_close(None).await;
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V5, "pubb", true).await;
    publisher.publish(publish_packet("brief/x", QoS::AtLeastOnce, 1, b"too late")).await;

    // The behaviour under test is the passing of time itself (no event to wait for).
    tokio::time::sleep(Duration::from_secs(2)).await;
    connect.clean_start = false;
    let (mut c, ack) = RawClient::connect(server.mqtt_addr(), connect).await;
    assert!(!ack.session_present, "the session outlived its expiry interval");
    // Neither its subscription nor its queued message survived (bounded QUIET wait).
    c.quiet().await;
    publisher.publish(publish_packet("brief/y", QoS::AtLeastOnce, 2, b"new")).await;
    c.quiet().await;
}

#[tokio::test]
async fn clean_start_discards_a_stored_session() {
    let server = TestServer::mqtt().await;
    for version in [V311, V5] {
        let id = format!("cleaned-{version:?}");
        let mut connect = connect_packet(version, &id, false);
        connect.properties.session_expiry_interval = (version == V5).then_some(60);
        let (mut c, _) = RawClient::connect(server.mqtt_addr(), connect.clone()).await;
        c.subscribe(1, "cleaned/#", sub_options(QoS::AtLeastOnce)).await;
        c.drop_connection();

        connect.clean_start = true;
        let (mut c, ack) = RawClient::connect(server.mqtt_addr(), connect.clone()).await;
        assert!(!ack.session_present, "{version:?}: clean start gives a new session");
        let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V311, "pubc", true).await;
        publisher.publish(publish_packet("cleaned/x", QoS::AtLeastOnce, 1, b"x")).await;
        // The old subscription is gone (bounded QUIET wait).
        c.quiet().await;
        c.send(&Packet::Disconnect(Disconnect { reason: 0, properties: Properties::default() })).await;
        c.expect_close(None).await;
    }
}

#[tokio::test]
async fn a_persistent_session_resumes_its_subscriptions_without_resubscribing() {
    let server = TestServer::mqtt().await;
    let (mut c, _) = RawClient::connect(server.mqtt_addr(), connect_packet(V311, "resume", false)).await;
    c.subscribe(1, "resume/+", sub_options(QoS::AtLeastOnce)).await;
    c.drop_connection();
    let (mut c, ack) = RawClient::connect(server.mqtt_addr(), connect_packet(V311, "resume", false)).await;
    assert!(ack.session_present);
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V311, "pubr", true).await;
    publisher.publish(publish_packet("resume/now", QoS::AtLeastOnce, 1, b"live")).await;
    let p = within("live delivery", c.recv_publish()).await;
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("resume/now", &b"live"[..]));
}

// Which session expiry applies (the DISCONNECT's over the CONNECT's, a resuming connection's over
// the stored one) is decided without a clock and checked by
// `ferry_mqtt::session::tests::the_session_expiry_is_the_latest_one_given`; the tests here wait
// out a real expiry end to end.

/// Publishes one QoS 1 message on `topic` from a throwaway client.
async fn publish_one(server: &TestServer, topic: &str, payload: &[u8]) {
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V5, "one-shot", true).await;
    publisher.publish(publish_packet(topic, QoS::AtLeastOnce, 1, payload)).await;
}

#[tokio::test]
async fn v5_session_expiry_above_49_days_is_accepted() {
    let server = TestServer::mqtt().await;
    let mut connect = connect_packet(V5, "forever-ish", true);
    connect.properties.session_expiry_interval = Some(0xFFFF_FFFE);
    let (mut c, ack) = RawClient::connect(server.mqtt_addr(), connect.clone()).await;
    assert_eq!(ack.code, 0, "{ack:?}");
    c.subscribe(1, "long/#", sub_options(QoS::AtLeastOnce)).await;
    c.drop_connection();
    publish_one(&server, "long/x", b"waiting").await;
    connect.clean_start = false;
    let (mut c, ack) = RawClient::connect(server.mqtt_addr(), connect).await;
    assert!(ack.session_present);
    assert_eq!(&c.recv_publish().await.payload[..], b"waiting");
}

#[tokio::test]
async fn takeover_of_a_persistent_session_redelivers_its_unacked_messages_to_the_new_connection() {
    let server = TestServer::mqtt().await;
    let mut first = RawClient::connect_ok(server.mqtt_addr(), V311, "moving", false).await;
    first.subscribe(1, "move", sub_options(QoS::AtLeastOnce)).await;
    publish_one(&server, "move", b"in flight").await;
    let p = first.recv_publish().await;
    let (mut second, ack) = RawClient::connect(server.mqtt_addr(), connect_packet(V311, "moving", false)).await;
    assert!(ack.session_present);
    first.expect_close(None).await;
    let again = second.recv_publish().await;
    assert_eq!((&again.payload[..], again.dup, again.packet_id), (&b"in flight"[..], true, p.packet_id));
}

#[tokio::test]
async fn outgoing_qos2_resumes_with_pubrel_after_reconnect() {
    let server = TestServer::mqtt().await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V311, "q2-out", false).await;
    c.subscribe(1, "q2", sub_options(QoS::ExactlyOnce)).await;
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V311, "q2-pub", true).await;
    publisher.publish(publish_packet("q2", QoS::ExactlyOnce, 1, b"exactly once")).await;
    let p = c.recv_publish().await;
    let id = p.packet_id.unwrap();
    c.send(&Packet::PubRec(PubResp::ok(id))).await;
    assert!(matches!(c.recv().await, Packet::PubRel(r) if r.packet_id == id));
    c.drop_connection();

    let (mut c, ack) = RawClient::connect(server.mqtt_addr(), connect_packet(V311, "q2-out", false)).await;
    assert!(ack.session_present);
    // §4.4: the PUBREL is sent again, not the PUBLISH.
    assert!(matches!(c.recv().await, Packet::PubRel(r) if r.packet_id == id));
    c.send(&Packet::PubComp(PubResp::ok(id))).await;
    c.quiet().await;
}

#[tokio::test]
async fn incoming_qos2_is_routed_once_across_a_reconnect() {
    let server = TestServer::mqtt().await;
    let mut sub = RawClient::connect_ok(server.mqtt_addr(), V311, "q2-sub", true).await;
    sub.subscribe(1, "q2in", sub_options(QoS::AtMostOnce)).await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V311, "q2-in", false).await;
    let p = publish_packet("q2in", QoS::ExactlyOnce, 77, b"once");
    c.send(&Packet::Publish(p.clone())).await;
    assert!(matches!(c.recv().await, Packet::PubRec(r) if r.packet_id == 77));
    c.drop_connection();
    assert_eq!(&sub.recv_publish().await.payload[..], b"once");

    let (mut c, ack) = RawClient::connect(server.mqtt_addr(), connect_packet(V311, "q2-in", false)).await;
    assert!(ack.session_present);
    c.send(&Packet::Publish(ferry_mqtt::codec::Publish { dup: true, ..p })).await;
    assert!(matches!(c.recv().await, Packet::PubRec(r) if r.packet_id == 77));
    c.send(&Packet::PubRel(PubResp::ok(77))).await;
    assert!(matches!(c.recv().await, Packet::PubComp(r) if r.packet_id == 77));
    // Bounded QUIET wait: the resent PUBLISH was not routed again.
    sub.quiet().await;
}

#[tokio::test]
async fn redelivery_after_reconnect_keeps_the_original_order() {
    let server = TestServer::mqtt().await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V311, "ordered", false).await;
    c.subscribe(1, "ord", sub_options(QoS::AtLeastOnce)).await;
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V311, "ord-pub", true).await;
    for i in 0..3u16 {
        publisher.publish(publish_packet("ord", QoS::AtLeastOnce, i + 1, format!("{i}").as_bytes())).await;
    }
    for _ in 0..3 {
        c.recv_publish().await;
    }
    c.drop_connection();
    for i in 3..5u16 {
        publisher.publish(publish_packet("ord", QoS::AtLeastOnce, i + 1, format!("{i}").as_bytes())).await;
    }
    let (mut c, ack) = RawClient::connect(server.mqtt_addr(), connect_packet(V311, "ordered", false)).await;
    assert!(ack.session_present);
    let mut got = Vec::new();
    for _ in 0..5 {
        let p = c.recv_publish().await;
        c.send(&Packet::PubAck(PubResp::ok(p.packet_id.unwrap()))).await;
        got.push((String::from_utf8(p.payload.to_vec()).unwrap(), p.dup));
    }
    let want: Vec<(String, bool)> = (0..5).map(|i| (i.to_string(), i < 3)).collect();
    assert_eq!(got, want, "unacked ones first with DUP, in order, then the queued ones");
}
