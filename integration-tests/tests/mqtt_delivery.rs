//! Message delivery through the real MQTT frontend: QoS 0/1/2 both ways and the effective QoS,
//! QoS 2 exactly once, overlapping subscriptions, retained messages, wildcards and the `$` rule,
//! `$SYS`, shared subscriptions, unsubscribe.

use std::collections::HashMap;

use ferry_integration_tests::mqtt::{publish_packet, sub_options, text, v311, v5, RawClient};
use ferry_integration_tests::TestServer;
use ferry_mqtt::codec::{Packet, ProtocolVersion, PubResp, Publish, QoS, Str, SubOptions, Subscribe, Unsubscribe};

const V311: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

fn retained(topic: &str, qos: QoS, id: u16, payload: &[u8]) -> Publish {
    Publish { retain: true, ..publish_packet(topic, qos, id, payload) }
}

#[tokio::test]
async fn v311_qos_0_1_2_are_delivered_at_their_qos_both_ways() {
    use rumqttc::QoS::*;
    let server = TestServer::mqtt().await;
    let mut sub = v311::connect(&server, "sub").await;
    sub.subscribe("q/#", ExactlyOnce).await;
    let mut publisher = v311::connect(&server, "pub").await;
    for qos in [AtMostOnce, AtLeastOnce, ExactlyOnce] {
        let topic = format!("q/{qos:?}");
        publisher.publish(&topic, qos, false, topic.as_bytes()).await;
        let p = sub.publish_received().await;
        assert_eq!((p.topic.as_str(), p.qos), (topic.as_str(), qos));
        assert_eq!(text(&p.payload), topic);
    }
}

#[tokio::test]
async fn v5_qos_0_1_2_are_delivered_at_their_qos_both_ways() {
    use rumqttc::v5::mqttbytes::QoS::*;
    let server = TestServer::mqtt().await;
    let mut sub = v5::connect(&server, "sub5").await;
    sub.subscribe("q/#", ExactlyOnce).await;
    let mut publisher = v5::connect(&server, "pub5").await;
    for qos in [AtMostOnce, AtLeastOnce, ExactlyOnce] {
        let topic = format!("q/{qos:?}");
        publisher.publish(&topic, qos, false, topic.as_bytes()).await;
        let p = sub.publish_received().await;
        assert_eq!((&p.topic[..], p.qos), (topic.as_bytes(), qos));
    }
}

#[tokio::test]
async fn effective_qos_is_the_minimum_of_publish_and_subscription() {
    let server = TestServer::mqtt().await;
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V311, "pub", true).await;
    for sub_qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let mut sub = RawClient::connect_ok(server.mqtt_addr(), V311, &format!("sub{sub_qos:?}"), true).await;
        sub.subscribe(1, "min", sub_options(sub_qos)).await;
        for (i, pub_qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].into_iter().enumerate() {
            publisher.publish(publish_packet("min", pub_qos, i as u16 + 1, b"m")).await;
            let p = sub.recv_publish().await;
            assert_eq!(p.qos, pub_qos.min(sub_qos), "published {pub_qos:?}, subscribed {sub_qos:?}");
            match p.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => sub.send(&Packet::PubAck(PubResp::ok(p.packet_id.unwrap()))).await,
                QoS::ExactlyOnce => {
                    sub.send(&Packet::PubRec(PubResp::ok(p.packet_id.unwrap()))).await;
                    match sub.recv().await {
                        Packet::PubRel(r) => assert_eq!(Some(r.packet_id), p.packet_id),
                        other => panic!("expected PUBREL, got {other:?}"),
                    }
                    sub.send(&Packet::PubComp(PubResp::ok(p.packet_id.unwrap()))).await;
                }
            }
        }
    }
}

#[tokio::test]
async fn qos2_publish_resent_before_pubrel_is_routed_once() {
    let server = TestServer::mqtt().await;
    let mut sub = RawClient::connect_ok(server.mqtt_addr(), V311, "once-sub", true).await;
    sub.subscribe(1, "once", sub_options(QoS::AtMostOnce)).await;
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V311, "once-pub", true).await;
    let p = publish_packet("once", QoS::ExactlyOnce, 9, b"exactly");
    publisher.send(&Packet::Publish(p.clone())).await;
    assert!(matches!(publisher.recv().await, Packet::PubRec(r) if r.packet_id == 9));
    publisher.send(&Packet::Publish(Publish { dup: true, ..p })).await;
    assert!(matches!(publisher.recv().await, Packet::PubRec(r) if r.packet_id == 9));
    publisher.send(&Packet::PubRel(PubResp::ok(9))).await;
    assert!(matches!(publisher.recv().await, Packet::PubComp(r) if r.packet_id == 9));
    assert_eq!(&sub.recv_publish().await.payload[..], b"exactly");
    // Bounded QUIET wait: the resend must not have produced a second copy.
    sub.quiet().await;
    // After PUBCOMP the id is free again: a new publish with it is a new message.
    publisher.publish(publish_packet("once", QoS::ExactlyOnce, 9, b"again")).await;
    assert_eq!(&sub.recv_publish().await.payload[..], b"again");
}

#[tokio::test]
async fn overlapping_subscriptions_give_one_copy_at_the_maximum_qos() {
    let server = TestServer::mqtt().await;
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V311, "pub", true).await;
    // Transient (clean) and persistent (session queue) subscribers take different paths.
    for clean in [true, false] {
        let id = format!("overlap-{clean}");
        let mut sub = RawClient::connect_ok(server.mqtt_addr(), V311, &id, clean).await;
        sub.subscribe(1, "a/#", sub_options(QoS::AtMostOnce)).await;
        sub.subscribe(2, "a/+", sub_options(QoS::AtLeastOnce)).await;
        sub.subscribe(3, "a/b", sub_options(QoS::AtMostOnce)).await;
        publisher.publish(publish_packet("a/b", QoS::ExactlyOnce, 1, b"one copy")).await;
        let p = sub.recv_publish().await;
        assert_eq!(p.qos, QoS::AtLeastOnce, "clean={clean}");
        sub.send(&Packet::PubAck(PubResp::ok(p.packet_id.unwrap()))).await;
        // Bounded QUIET wait: no second copy.
        sub.quiet().await;
    }
}

#[tokio::test]
async fn retained_message_is_delivered_on_subscribe_with_retain_set() {
    let server = TestServer::mqtt().await;
    let mut publisher = v311::connect(&server, "pub").await;
    publisher.publish("status/door", rumqttc::QoS::AtLeastOnce, true, b"open").await;
    let mut sub = v311::connect(&server, "sub").await;
    sub.subscribe("status/+", rumqttc::QoS::AtLeastOnce).await;
    let p = sub.publish_received().await;
    assert_eq!((p.topic.as_str(), &p.payload[..], p.retain), ("status/door", &b"open"[..], true));
    // A live delivery of a retained publish to an existing subscription has RETAIN=0.
    publisher.publish("status/door", rumqttc::QoS::AtLeastOnce, true, b"closed").await;
    let live = sub.publish_received().await;
    assert_eq!((&live.payload[..], live.retain), (&b"closed"[..], false));
}

#[tokio::test]
async fn empty_retained_payload_clears_the_retained_message() {
    let server = TestServer::mqtt().await;
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V311, "pub", true).await;
    publisher.publish(retained("clear/me", QoS::AtLeastOnce, 1, b"x")).await;
    publisher.publish(retained("clear/me", QoS::AtLeastOnce, 2, b"")).await;
    publisher.publish(retained("clear/other", QoS::AtLeastOnce, 3, b"kept")).await;
    let mut sub = RawClient::connect_ok(server.mqtt_addr(), V311, "sub", true).await;
    sub.subscribe(1, "clear/#", sub_options(QoS::AtMostOnce)).await;
    let p = sub.recv_publish().await;
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("clear/other", &b"kept"[..]));
    // Bounded QUIET wait: the cleared topic sends nothing (not even an empty message).
    sub.quiet().await;
}

#[tokio::test]
async fn wildcards_plus_and_hash_match_whole_levels() {
    let server = TestServer::mqtt().await;
    let mut sub = RawClient::connect_ok(server.mqtt_addr(), V311, "wild", true).await;
    sub.subscribe(1, "plant/+/temp", sub_options(QoS::AtMostOnce)).await;
    sub.subscribe(2, "alarm/#", sub_options(QoS::AtMostOnce)).await;
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V311, "pub", true).await;
    for topic in [
        "plant/7/temp",       // + matches one level
        "plant/7/8/temp",     // no: two levels
        "plant/7.1/temp",     // a dot is not a separator
        "plant//temp",        // + matches an empty level
        "alarm",              // # matches the parent level too
        "alarm/fire/floor/2", // # matches many levels
        "alarmx",             // no
        "plant/7/temperature",
    ] {
        publisher.publish(publish_packet(topic, QoS::AtMostOnce, 0, topic.as_bytes())).await;
    }
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(sub.recv_publish().await.topic.as_str().to_string());
    }
    assert_eq!(got, ["plant/7/temp", "plant/7.1/temp", "plant//temp", "alarm", "alarm/fire/floor/2"]);
    sub.quiet().await;
}

#[tokio::test]
async fn hash_does_not_match_sys_topics_but_sys_hash_does() {
    let server = TestServer::mqtt().await;
    let mut all = RawClient::connect_ok(server.mqtt_addr(), V311, "all", true).await;
    all.subscribe(1, "#", sub_options(QoS::AtMostOnce)).await;
    all.subscribe(2, "+/broker/version", sub_options(QoS::AtMostOnce)).await;
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V311, "pub", true).await;
    publisher.publish(publish_packet("$app/x", QoS::AtMostOnce, 0, b"dollar")).await;
    publisher.publish(publish_packet("normal", QoS::AtMostOnce, 0, b"plain")).await;
    let p = all.recv_publish().await;
    assert_eq!(p.topic.as_str(), "normal", "a leading wildcard must not match a $ topic (retained $SYS included)");
    all.quiet().await;

    let mut sys = RawClient::connect_ok(server.mqtt_addr(), V311, "sys", true).await;
    sys.subscribe(1, "$SYS/#", sub_options(QoS::AtMostOnce)).await;
    assert!(sys.recv_publish().await.topic.as_str().starts_with("$SYS/"));
}

#[tokio::test]
async fn sys_broker_version_and_clients_connected_are_retained() {
    let server = TestServer::mqtt().await;
    let _first = RawClient::connect_ok(server.mqtt_addr(), V311, "first", true).await;
    let mut sys = RawClient::connect_ok(server.mqtt_addr(), V311, "sys", true).await;
    sys.subscribe(1, "$SYS/broker/version", sub_options(QoS::AtMostOnce)).await;
    sys.subscribe(2, "$SYS/broker/clients/connected", sub_options(QoS::AtMostOnce)).await;
    let mut seen = HashMap::new();
    while seen.len() < 2 {
        let p = sys.recv_publish().await;
        assert!(p.retain, "{p:?} is retained");
        seen.insert(p.topic.as_str().to_string(), String::from_utf8(p.payload.to_vec()).unwrap());
    }
    assert!(seen["$SYS/broker/version"].starts_with("ferry "), "{seen:?}");
    let connected: u64 = seen["$SYS/broker/clients/connected"].parse().unwrap();
    assert!(connected >= 1, "{seen:?}");
}

#[tokio::test]
async fn shared_subscription_round_robins_across_members() {
    let server = TestServer::mqtt().await;
    let mut a = RawClient::connect_ok(server.mqtt_addr(), V5, "member-a", true).await;
    let mut b = RawClient::connect_ok(server.mqtt_addr(), V5, "member-b", true).await;
    assert_eq!(a.subscribe(1, "$share/g/work/+", sub_options(QoS::AtLeastOnce)).await.reasons, [1]);
    assert_eq!(b.subscribe(1, "$share/g/work/+", sub_options(QoS::AtLeastOnce)).await.reasons, [1]);
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V5, "pub", true).await;
    for i in 0..10u16 {
        publisher.publish(publish_packet("work/item", QoS::AtLeastOnce, i + 1, format!("{i}").as_bytes())).await;
    }
    let mut got = Vec::new();
    for (c, name) in [(&mut a, "a"), (&mut b, "b")] {
        for _ in 0..5 {
            let p = c.recv_publish().await;
            c.send(&Packet::PubAck(PubResp::ok(p.packet_id.unwrap()))).await;
            got.push((name, text(&p.payload).parse::<u32>().unwrap()));
        }
        // Bounded QUIET wait: each member got exactly its half.
        c.quiet().await;
    }
    let mut all: Vec<u32> = got.iter().map(|(_, n)| *n).collect();
    all.sort_unstable();
    assert_eq!(all, (0..10).collect::<Vec<_>>(), "each message to exactly one member: {got:?}");
}

#[tokio::test]
async fn unacked_shared_deliveries_go_to_the_other_member_when_one_disconnects() {
    let server = TestServer::mqtt().await;
    let mut a = RawClient::connect_ok(server.mqtt_addr(), V5, "member-a", true).await;
    let mut b = RawClient::connect_ok(server.mqtt_addr(), V5, "member-b", true).await;
    a.subscribe(1, "$share/g/jobs", sub_options(QoS::AtLeastOnce)).await;
    b.subscribe(1, "$share/g/jobs", sub_options(QoS::AtLeastOnce)).await;
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V5, "pub", true).await;
    for i in 0..4u16 {
        publisher.publish(publish_packet("jobs", QoS::AtLeastOnce, i + 1, format!("{i}").as_bytes())).await;
    }
    // a takes its two and never acknowledges them; b acknowledges its own.
    let a1 = text(&a.recv_publish().await.payload).to_string();
    let a2 = text(&a.recv_publish().await.payload).to_string();
    let mut b_got = Vec::new();
    for _ in 0..2 {
        let p = b.recv_publish().await;
        b.send(&Packet::PubAck(PubResp::ok(p.packet_id.unwrap()))).await;
        b_got.push(text(&p.payload).to_string());
    }
    a.drop_connection();
    for _ in 0..2 {
        let p = b.recv_publish().await;
        b.send(&Packet::PubAck(PubResp::ok(p.packet_id.unwrap()))).await;
        b_got.push(text(&p.payload).to_string());
    }
    assert!(b_got[2..].contains(&a1) && b_got[2..].contains(&a2), "a's unacked {a1}, {a2} went to b: {b_got:?}");
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let server = TestServer::mqtt().await;
    let mut c = v311::connect(&server, "unsub").await;
    c.subscribe("u/#", rumqttc::QoS::AtLeastOnce).await;
    c.publish("u/1", rumqttc::QoS::AtLeastOnce, false, b"before").await;
    assert_eq!(&c.publish_received().await.payload[..], b"before");
    c.client.unsubscribe("u/#").await.unwrap();
    c.expect("UNSUBACK", |p| matches!(p, rumqttc::Incoming::UnsubAck(_)).then_some(())).await;
    c.publish("u/2", rumqttc::QoS::AtLeastOnce, false, b"after").await;
    // Bounded QUIET wait: nothing after unsubscribing.
    c.no_publish().await;
}

#[tokio::test]
async fn persistent_subscriber_unsubscribe_stops_delivery() {
    let server = TestServer::mqtt().await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V311, "p-unsub", false).await;
    c.subscribe(1, "pu/#", sub_options(QoS::AtLeastOnce)).await;
    c.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 2,
        properties: Default::default(),
        filters: vec![Str::from("pu/#")],
    }))
    .await;
    assert!(matches!(c.recv().await, Packet::UnsubAck(a) if a.packet_id == 2));
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V311, "pub", true).await;
    publisher.publish(publish_packet("pu/x", QoS::AtLeastOnce, 1, b"x")).await;
    c.quiet().await;
}

#[tokio::test]
async fn subscribe_with_several_filters_answers_each_in_order() {
    let server = TestServer::mqtt().await;
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V311, "multi", true).await;
    let ack = c
        .subscribe_with(Subscribe {
            packet_id: 4,
            properties: Default::default(),
            filters: vec![
                (Str::from("m/0"), sub_options(QoS::AtMostOnce)),
                // Issue 14: a malformed filter ("m/#/bad") closes the connection now; a
                // correctly formed one Ferry refuses still gets 0x80 in its place.
                (Str::from("$share/bad"), sub_options(QoS::AtLeastOnce)),
                (Str::from("m/2"), SubOptions { qos: QoS::ExactlyOnce, ..Default::default() }),
            ],
        })
        .await;
    assert_eq!(ack.reasons, [0x00, 0x80, 0x02]);
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_stalls_neither_publishers_nor_other_subscribers() {
    const COUNT: usize = 1500;
    let server = TestServer::mqtt().await;
    // Subscribed, then never reads: its socket buffers and its outbox fill up.
    let mut stuck = RawClient::connect_ok(server.mqtt_addr(), V311, "stuck", true).await;
    stuck.subscribe(1, "flood", sub_options(QoS::AtMostOnce)).await;
    let mut fast = RawClient::connect_ok(server.mqtt_addr(), V311, "fast", true).await;
    fast.subscribe(1, "flood", sub_options(QoS::AtLeastOnce)).await;
    let reader = tokio::spawn(async move {
        for i in 0..COUNT {
            let p = fast.recv_publish().await;
            assert_eq!(u32::from_be_bytes(p.payload[..4].try_into().unwrap()) as usize, i, "in order, none lost");
            fast.send(&Packet::PubAck(PubResp::ok(p.packet_id.unwrap()))).await;
        }
    });
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V311, "flooder", true).await;
    let mut payload = vec![0u8; 8 * 1024];
    for i in 0..COUNT {
        payload[..4].copy_from_slice(&(i as u32).to_be_bytes());
        // Each publish waits for its PUBACK (within the test timeout): a stall fails here.
        publisher.publish(publish_packet("flood", QoS::AtLeastOnce, (i % 60_000) as u16 + 1, &payload)).await;
    }
    ferry_integration_tests::within("the reading subscriber gets everything", reader).await.unwrap();
    drop(stuck);
}
