//! MQTT 5.0 features through the real frontend: subscription identifiers, retain handling and
//! retain-as-published, no local, topic aliases both ways, message expiry, maximum packet size
//! both ways, request/response and other properties passed through, UNSUBACK reasons, receive
//! maximum.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use ferry_integration_tests::mqtt::{connect_packet, publish_packet, sub_options, v5, RawClient};
use ferry_integration_tests::TestServer;
use ferry_mqtt::codec::{
    Packet, Properties, PropertyValues, ProtocolVersion, PubResp, Publish, QoS, Str, SubOptions, Subscribe, Unsubscribe,
};
use rumqttc::v5::mqttbytes::v5::PublishProperties;

const V311: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

fn subscribe_with_id(id: u16, filter: &str, options: SubOptions, sub_id: Option<u32>) -> Subscribe {
    Subscribe {
        packet_id: id,
        properties: PropertyValues {
            subscription_identifiers: sub_id.into_iter().collect(),
            ..PropertyValues::default()
        }
        .into(),
        filters: vec![(Str::from(filter), options)],
    }
}

fn retained(topic: &str, qos: QoS, id: u16, payload: &[u8]) -> Publish {
    Publish { retain: true, ..publish_packet(topic, qos, id, payload) }
}

#[tokio::test]
async fn overlapping_subscriptions_give_one_copy_with_every_subscription_identifier() {
    let server = TestServer::mqtt().await;
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V5, "pub", true).await;
    for clean in [true, false] {
        let mut connect = connect_packet(V5, &format!("ids-{clean}"), true);
        connect.properties.session_expiry_interval = (!clean).then_some(60);
        let (mut c, _) = RawClient::connect(server.mqtt_addr(), connect).await;
        c.subscribe_with(subscribe_with_id(1, "s/#", sub_options(QoS::AtMostOnce), Some(11))).await;
        c.subscribe_with(subscribe_with_id(2, "s/+", sub_options(QoS::AtLeastOnce), Some(22))).await;
        c.subscribe_with(subscribe_with_id(3, "+/x", sub_options(QoS::AtMostOnce), None)).await;
        publisher.publish(publish_packet("s/x", QoS::AtLeastOnce, 1, b"ids")).await;
        let p = c.recv_publish().await;
        assert_eq!(p.qos, QoS::AtLeastOnce, "clean={clean}: maximum QoS");
        let ids: HashSet<u32> = p.properties.subscription_identifiers.iter().copied().collect();
        assert_eq!(ids, HashSet::from([11, 22]), "clean={clean}");
        c.send(&Packet::PubAck(PubResp::ok(p.packet_id.unwrap()))).await;
        // Bounded QUIET wait: one copy only.
        c.quiet().await;
    }
}

#[tokio::test]
async fn retain_handling_0_1_2_decide_when_retained_messages_are_sent() {
    let server = TestServer::mqtt().await;
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V5, "pub", true).await;
    publisher.publish(retained("rh/t", QoS::AtMostOnce, 0, b"r")).await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V5, "rh", true).await;
    for (handling, first, again) in [(0u8, true, true), (1, true, false), (2, false, false)] {
        let filter = format!("rh/{}", ["t", "+", "#"][handling as usize]);
        let options = SubOptions { retain_handling: handling, ..sub_options(QoS::AtMostOnce) };
        for (round, expected) in [(1u16, first), (2, again)] {
            c.subscribe(round, &filter, options).await;
            if expected {
                let p = c.recv_publish().await;
                assert!(p.retain && &p.payload[..] == b"r", "handling {handling}, round {round}: {p:?}");
            } else {
                // Bounded QUIET wait: no retained message for this subscribe.
                c.quiet().await;
            }
        }
        c.send(&Packet::Unsubscribe(Unsubscribe {
            packet_id: 9,
            properties: Properties::default(),
            filters: vec![Str::from(filter.as_str())],
        }))
        .await;
        assert!(matches!(c.recv().await, Packet::UnsubAck(_)));
    }
}

#[tokio::test]
async fn retain_as_published_keeps_the_retain_flag_on_live_deliveries() {
    let server = TestServer::mqtt().await;
    let mut rap = RawClient::connect_ok(server.mqtt_addr(), V5, "rap", true).await;
    rap.subscribe(1, "rap/#", SubOptions { retain_as_published: true, ..sub_options(QoS::AtMostOnce) }).await;
    let mut plain = RawClient::connect_ok(server.mqtt_addr(), V5, "plain", true).await;
    plain.subscribe(1, "rap/#", sub_options(QoS::AtMostOnce)).await;
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V5, "pub", true).await;
    publisher.publish(retained("rap/a", QoS::AtMostOnce, 0, b"kept")).await;
    publisher.publish(publish_packet("rap/b", QoS::AtMostOnce, 0, b"plain")).await;
    let (a, b) = (rap.recv_publish().await, rap.recv_publish().await);
    assert_eq!((a.retain, b.retain), (true, false), "retain-as-published");
    let (a, b) = (plain.recv_publish().await, plain.recv_publish().await);
    assert_eq!((a.retain, b.retain), (false, false), "without retain-as-published");
}

#[tokio::test]
async fn no_local_suppresses_the_clients_own_messages() {
    let server = TestServer::mqtt().await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V5, "self", true).await;
    c.subscribe(1, "echo/#", SubOptions { no_local: true, ..sub_options(QoS::AtLeastOnce) }).await;
    c.publish(publish_packet("echo/1", QoS::AtLeastOnce, 1, b"mine")).await;
    // Bounded QUIET wait: its own message does not come back.
    c.quiet().await;
    let mut other = RawClient::connect_ok(server.mqtt_addr(), V5, "other", true).await;
    other.publish(publish_packet("echo/2", QoS::AtLeastOnce, 1, b"theirs")).await;
    assert_eq!(&c.recv_publish().await.payload[..], b"theirs");
}

#[tokio::test]
async fn client_topic_alias_is_resolved_by_the_server() {
    let server = TestServer::mqtt().await;
    let mut sub = v5::connect(&server, "alias-sub").await;
    sub.subscribe("long/topic/name", rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await;
    let mut publisher = v5::connect(&server, "alias-pub").await;
    let props = |alias| PublishProperties { topic_alias: Some(alias), ..Default::default() };
    let q1 = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
    publisher.client.publish_with_properties("long/topic/name", q1, false, "first", props(3)).await.unwrap();
    publisher.published(q1).await;
    publisher.client.publish_with_properties("", q1, false, "second", props(3)).await.unwrap();
    publisher.published(q1).await;
    for expected in ["first", "second"] {
        let p = sub.publish_received().await;
        assert_eq!((&p.topic[..], &p.payload[..]), (&b"long/topic/name"[..], expected.as_bytes()));
    }
}

#[tokio::test]
async fn client_topic_alias_above_the_maximum_gets_disconnect_0x94() {
    let server = TestServer::mqtt().await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V5, "alias-big", true).await;
    let mut p = publish_packet("t", QoS::AtMostOnce, 0, b"x");
    p.properties.topic_alias = Some(11);
    c.send(&Packet::Publish(p)).await;
    c.expect_close(Some(0x94)).await;
}

#[tokio::test]
async fn server_uses_topic_aliases_when_the_client_sets_a_maximum() {
    let server = TestServer::mqtt().await;
    let mut connect = connect_packet(V5, "aliased", true);
    connect.properties.topic_alias_maximum = Some(5);
    let (mut c, _) = RawClient::connect(server.mqtt_addr(), connect).await;
    c.subscribe(1, "al/#", sub_options(QoS::AtMostOnce)).await;
    let mut plain = RawClient::connect_ok(server.mqtt_addr(), V5, "unaliased", true).await;
    plain.subscribe(1, "al/#", sub_options(QoS::AtMostOnce)).await;
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V5, "pub", true).await;
    for payload in [b"1", b"2"] {
        publisher.publish(publish_packet("al/very/long/topic", QoS::AtMostOnce, 0, payload)).await;
    }
    let first = c.recv_publish().await;
    let alias = first.properties.topic_alias.expect("an alias is set up");
    assert!((1..=5).contains(&alias));
    assert_eq!(first.topic.as_str(), "al/very/long/topic", "the first use carries the topic");
    let second = c.recv_publish().await;
    assert_eq!((second.topic.as_str(), second.properties.topic_alias), ("", Some(alias)), "then the alias alone");
    for _ in 0..2 {
        let p = plain.recv_publish().await;
        assert_eq!((p.topic.as_str(), p.properties.topic_alias), ("al/very/long/topic", None));
    }
}

#[tokio::test]
async fn expired_retained_and_queued_messages_are_not_delivered_and_expiry_is_decremented() {
    let server = TestServer::mqtt().await;
    // A persistent session that is away while the messages wait in its queue.
    let mut connect = connect_packet(V5, "expiring", true);
    connect.properties.session_expiry_interval = Some(60);
    let (mut c, _) = RawClient::connect(server.mqtt_addr(), connect.clone()).await;
    c.subscribe(1, "exp/queued/#", sub_options(QoS::AtLeastOnce)).await;
    c.drop_connection();

    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V5, "pub", true).await;
    let with_expiry = |mut p: Publish, secs| {
        p.properties.message_expiry_interval = Some(secs);
        p
    };
    publisher.publish(with_expiry(retained("exp/retained/short", QoS::AtLeastOnce, 1, b"short"), 1)).await;
    publisher.publish(with_expiry(retained("exp/retained/long", QoS::AtLeastOnce, 2, b"long"), 60)).await;
    publisher.publish(with_expiry(publish_packet("exp/queued/short", QoS::AtLeastOnce, 3, b"short"), 1)).await;
    publisher.publish(with_expiry(publish_packet("exp/queued/long", QoS::AtLeastOnce, 4, b"long"), 60)).await;

    // The behaviour under test is the passing of time itself (no event to wait for).
    tokio::time::sleep(Duration::from_millis(2100)).await;

    connect.clean_start = false;
    let (mut c, ack) = RawClient::connect(server.mqtt_addr(), connect).await;
    assert!(ack.session_present);
    let q = c.recv_publish().await;
    assert_eq!((q.topic.as_str(), &q.payload[..]), ("exp/queued/long", &b"long"[..]));
    let left = q.properties.message_expiry_interval.expect("expiry interval");
    assert!((50..=58).contains(&left), "queued: remaining interval decremented, got {left}");
    c.send(&Packet::PubAck(PubResp::ok(q.packet_id.unwrap()))).await;

    c.subscribe(2, "exp/retained/#", sub_options(QoS::AtLeastOnce)).await;
    let r = c.recv_publish().await;
    assert_eq!((r.topic.as_str(), &r.payload[..]), ("exp/retained/long", &b"long"[..]));
    let left = r.properties.message_expiry_interval.expect("expiry interval");
    assert!((50..=58).contains(&left), "retained: remaining interval decremented, got {left}");
    c.send(&Packet::PubAck(PubResp::ok(r.packet_id.unwrap()))).await;
    // Bounded QUIET wait: neither expired message comes.
    c.quiet().await;
}

#[tokio::test]
async fn messages_above_the_client_maximum_packet_size_are_not_sent_to_it() {
    let server = TestServer::mqtt().await;
    let mut connect = connect_packet(V5, "small", true);
    connect.properties.maximum_packet_size = Some(100);
    let (mut c, _) = RawClient::connect(server.mqtt_addr(), connect).await;
    c.subscribe(1, "size/#", sub_options(QoS::AtLeastOnce)).await;
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V5, "pub", true).await;
    publisher.publish(publish_packet("size/a", QoS::AtLeastOnce, 1, &[b'a'; 20])).await;
    publisher.publish(publish_packet("size/b", QoS::AtLeastOnce, 2, &[b'b'; 200])).await;
    publisher.publish(publish_packet("size/c", QoS::AtLeastOnce, 3, &[b'c'; 20])).await;
    for topic in ["size/a", "size/c"] {
        let p = c.recv_publish().await;
        assert_eq!(p.topic.as_str(), topic);
        c.send(&Packet::PubAck(PubResp::ok(p.packet_id.unwrap()))).await;
    }
    c.quiet().await;
}

#[tokio::test]
async fn a_packet_above_the_server_limit_gets_disconnect_0x95_in_5_and_a_close_in_311() {
    let server = TestServer::mqtt_with("max_frame_size = 200\n").await;
    let (mut c, ack) = RawClient::connect(server.mqtt_addr(), connect_packet(V5, "big5", true)).await;
    assert_eq!(ack.properties.maximum_packet_size, Some(200));
    c.send(&Packet::Publish(publish_packet("big", QoS::AtMostOnce, 0, &[0u8; 300]))).await;
    c.expect_close(Some(0x95)).await;

    let mut c = RawClient::connect_ok(server.mqtt_addr(), V311, "big3", true).await;
    c.send(&Packet::Publish(publish_packet("big", QoS::AtMostOnce, 0, &[0u8; 300]))).await;
    c.expect_close(None).await;

    // A packet just under the limit is fine.
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V5, "fits", true).await;
    c.subscribe(1, "big", sub_options(QoS::AtMostOnce)).await;
    c.publish(publish_packet("big", QoS::AtMostOnce, 0, &[7u8; 150])).await;
    assert_eq!(c.recv_publish().await.payload.len(), 150);
}

#[tokio::test]
async fn request_response_properties_pass_through() {
    let server = TestServer::mqtt().await;
    let q1 = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
    let mut responder = v5::connect(&server, "responder").await;
    responder.subscribe("service/time", q1).await;
    let mut requester = v5::connect(&server, "requester").await;
    requester.subscribe("replies/requester", q1).await;

    let props = PublishProperties {
        response_topic: Some("replies/requester".into()),
        correlation_data: Some(Bytes::from_static(b"\x00req-42\xff")),
        ..Default::default()
    };
    requester.client.publish_with_properties("service/time", q1, false, "what time?", props).await.unwrap();
    requester.published(q1).await;

    let request = responder.publish_received().await;
    let rp = request.properties.expect("request properties");
    let reply_to = rp.response_topic.expect("response topic");
    assert_eq!(reply_to, "replies/requester");
    assert_eq!(rp.correlation_data.as_deref(), Some(&b"\x00req-42\xff"[..]));
    let back = PublishProperties { correlation_data: rp.correlation_data.clone(), ..Default::default() };
    responder.client.publish_with_properties(reply_to, q1, false, "noon", back).await.unwrap();
    responder.published(q1).await;

    let reply = requester.publish_received().await;
    assert_eq!(&reply.payload[..], b"noon");
    assert_eq!(reply.properties.unwrap().correlation_data.as_deref(), Some(&b"\x00req-42\xff"[..]));
}

#[tokio::test]
async fn user_properties_payload_format_and_content_type_pass_through() {
    let server = TestServer::mqtt().await;
    let q1 = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
    let mut sub = v5::connect(&server, "sub").await;
    sub.subscribe("props", q1).await;
    let mut publisher = v5::connect(&server, "pub").await;
    let user = vec![
        ("unit".to_string(), "celsius".to_string()),
        ("tag".to_string(), "a".to_string()),
        ("tag".to_string(), "b".to_string()),
    ];
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        user_properties: user.clone(),
        ..Default::default()
    };
    publisher.client.publish_with_properties("props", q1, false, "{\"t\":21}", props).await.unwrap();
    publisher.published(q1).await;
    let p = sub.publish_received().await.properties.expect("properties");
    assert_eq!(p.payload_format_indicator, Some(1));
    assert_eq!(p.content_type.as_deref(), Some("application/json"));
    let mut got = p.user_properties.clone();
    got.sort();
    let mut want = user;
    want.sort();
    assert_eq!(got, want, "repeated keys keep every value");
    let tags: Vec<&str> = p.user_properties.iter().filter(|(k, _)| k == "tag").map(|(_, v)| v.as_str()).collect();
    assert_eq!(tags, ["a", "b"], "the order of a repeated key's values is kept");
}

#[tokio::test]
async fn unsubscribe_of_an_unknown_filter_gets_0x11() {
    let server = TestServer::mqtt().await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V5, "unsub", true).await;
    c.subscribe(1, "known", sub_options(QoS::AtMostOnce)).await;
    c.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 2,
        properties: Properties::default(),
        filters: vec![Str::from("known"), Str::from("unknown")],
    }))
    .await;
    match c.recv().await {
        Packet::UnsubAck(a) => assert_eq!((a.packet_id, a.reasons), (2, vec![0x00, 0x11])),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn server_respects_the_client_receive_maximum() {
    let server = TestServer::mqtt().await;
    // A clean session is served from a direct sink, a persistent one from its queue.
    for clean in [true, false] {
        let mut connect = connect_packet(V5, &format!("slow-{clean}"), true);
        connect.properties.receive_maximum = Some(2);
        connect.properties.session_expiry_interval = (!clean).then_some(60);
        let (mut c, _) = RawClient::connect(server.mqtt_addr(), connect).await;
        c.subscribe(1, "flow", sub_options(QoS::AtLeastOnce)).await;
        let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V5, "fast", true).await;
        for i in 0..10u16 {
            publisher.publish(publish_packet("flow", QoS::AtLeastOnce, i + 1, format!("{i}").as_bytes())).await;
        }
        let first = c.recv_publish().await;
        let second = c.recv_publish().await;
        // Bounded QUIET wait: no third one while two are unacknowledged.
        c.quiet().await;
        let mut got = vec![first.payload.clone(), second.payload.clone()];
        c.send(&Packet::PubAck(PubResp::ok(first.packet_id.unwrap()))).await;
        let third = c.recv_publish().await;
        got.push(third.payload.clone());
        c.quiet().await;
        // Acknowledge as they come: the rest arrive, in order.
        let mut unacked = vec![second.packet_id.unwrap(), third.packet_id.unwrap()];
        while got.len() < 10 {
            c.send(&Packet::PubAck(PubResp::ok(unacked.remove(0)))).await;
            let p = c.recv_publish().await;
            unacked.push(p.packet_id.unwrap());
            got.push(p.payload.clone());
        }
        let got: Vec<String> = got.iter().map(|b| String::from_utf8(b.to_vec()).unwrap()).collect();
        assert_eq!(got, (0..10).map(|i| i.to_string()).collect::<Vec<_>>(), "clean={clean}");
    }
}

#[tokio::test]
async fn retained_messages_carry_the_subscription_identifier() {
    let server = TestServer::mqtt().await;
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V5, "pub", true).await;
    publisher.publish(retained("rid/x", QoS::AtMostOnce, 0, b"r")).await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V5, "rid", true).await;
    c.subscribe_with(subscribe_with_id(1, "rid/#", sub_options(QoS::AtMostOnce), Some(42))).await;
    let p = c.recv_publish().await;
    assert_eq!((p.retain, p.properties.subscription_identifiers.clone()), (true, vec![42]));
}

#[tokio::test]
async fn an_unknown_client_topic_alias_is_a_protocol_error() {
    let server = TestServer::mqtt().await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V5, "alias-unknown", true).await;
    let mut p = publish_packet("", QoS::AtMostOnce, 0, b"x");
    p.properties.topic_alias = Some(2);
    c.send(&Packet::Publish(p)).await;
    c.expect_close(Some(0x82)).await;
}

#[tokio::test]
async fn publish_without_subscribers_gets_puback_0x10() {
    let server = TestServer::mqtt().await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V5, "lonely", true).await;
    c.send(&Packet::Publish(publish_packet("nobody/listens", QoS::AtLeastOnce, 5, b"?"))).await;
    match c.recv().await {
        Packet::PubAck(a) => assert_eq!((a.packet_id, a.reason), (5, 0x10)),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn a_message_skipped_for_the_client_maximum_packet_size_does_not_use_up_a_topic_alias() {
    let server = TestServer::mqtt().await;
    let mut connect = connect_packet(V5, "small-aliased", true);
    connect.properties.maximum_packet_size = Some(100);
    connect.properties.topic_alias_maximum = Some(5);
    let (mut c, _) = RawClient::connect(server.mqtt_addr(), connect).await;
    c.subscribe(1, "sa/#", sub_options(QoS::AtMostOnce)).await;
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V5, "pub", true).await;
    publisher.publish(publish_packet("sa/topic", QoS::AtMostOnce, 0, &[b'b'; 200])).await;
    publisher.publish(publish_packet("sa/topic", QoS::AtMostOnce, 0, b"small")).await;
    let p = c.recv_publish().await;
    assert_eq!(&p.payload[..], b"small");
    assert_eq!(p.topic.as_str(), "sa/topic", "the client never saw this alias set up: {p:?}");
}

#[tokio::test]
async fn shared_subscriptions_get_no_retained_messages() {
    let server = TestServer::mqtt().await;
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V5, "pub", true).await;
    publisher.publish(retained("sh/r", QoS::AtMostOnce, 0, b"retained")).await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V5, "member", true).await;
    c.subscribe(1, "$share/g/sh/#", sub_options(QoS::AtMostOnce)).await;
    // Bounded QUIET wait: §4.8.2, retained messages are not sent for a shared subscription.
    c.quiet().await;
    publisher.publish(publish_packet("sh/live", QoS::AtMostOnce, 0, b"live")).await;
    assert_eq!(&c.recv_publish().await.payload[..], b"live");
}

#[tokio::test]
async fn session_expiry_on_disconnect_after_zero_at_connect_is_a_protocol_error() {
    let server = TestServer::mqtt().await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V5, "zero", true).await;
    let properties: Properties =
        PropertyValues { session_expiry_interval: Some(30), ..PropertyValues::default() }.into();
    c.send(&Packet::Disconnect(ferry_mqtt::codec::Disconnect { reason: 0, properties })).await;
    c.expect_close(Some(0x82)).await;
}

#[tokio::test]
async fn resubscribing_a_persistent_session_changes_the_qos_without_a_second_copy() {
    let server = TestServer::mqtt().await;
    let mut connect = connect_packet(V5, "resub", true);
    connect.properties.session_expiry_interval = Some(60);
    let (mut c, _) = RawClient::connect(server.mqtt_addr(), connect).await;
    c.subscribe(1, "rs", sub_options(QoS::AtMostOnce)).await;
    c.subscribe(2, "rs", sub_options(QoS::AtLeastOnce)).await;
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V5, "pub", true).await;
    publisher.publish(publish_packet("rs", QoS::AtLeastOnce, 1, b"x")).await;
    let p = c.recv_publish().await;
    assert_eq!(p.qos, QoS::AtLeastOnce);
    c.send(&Packet::PubAck(PubResp::ok(p.packet_id.unwrap()))).await;
    c.quiet().await;
}
