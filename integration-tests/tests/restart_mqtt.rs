//! What MQTT clients (rumqttc 3.1.1 and 5.0) find after the broker restarts on the same data
//! directory (graceful shutdown, store flushed and closed, a new server recovering from
//! `ferry.redb`): retained messages, persistent sessions with their subscriptions (QoS, 5.0
//! options and identifiers) and the messages queued for them, session expiry counted across the
//! restart, delayed wills of connections open at the restart, and MQTT publishes sitting in AMQP
//! durable queues.

use std::time::{Duration, Instant};

use ferry_integration_tests::cross::MQTT_EXCHANGE;
use ferry_integration_tests::mqtt::{text, v311, v5};
use ferry_integration_tests::{within, TestServer};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use rumqttc::v5::mqttbytes::v5::{Filter, LastWill, LastWillProperties, PublishProperties, SubscribeProperties};

const Q0: rumqttc::QoS = rumqttc::QoS::AtMostOnce;
const Q1: rumqttc::QoS = rumqttc::QoS::AtLeastOnce;
const Q2: rumqttc::QoS = rumqttc::QoS::ExactlyOnce;
const V5Q0: v5::QoSOf = v5::QoSOf::AtMostOnce;
const V5Q1: v5::QoSOf = v5::QoSOf::AtLeastOnce;

/// 3.1.1 options for a persistent session (clean session 0).
fn persistent_v311(server: &TestServer, id: &str) -> rumqttc::MqttOptions {
    let mut o = v311::options(server, id);
    o.set_clean_session(false);
    o
}

/// 5.0 options resuming a session (clean start 0) with the given session expiry interval.
fn persistent_v5(server: &TestServer, id: &str, expiry_secs: u32) -> rumqttc::v5::MqttOptions {
    let mut o = v5::options(server, id);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(expiry_secs));
    o
}

/// A 5.0 subscription with options and a subscription identifier, SUBACK awaited.
async fn subscribe_v5(c: &mut v5::Client, filter: Filter, id: usize) {
    let properties = SubscribeProperties { id: Some(id), user_properties: Vec::new() };
    c.client.subscribe_many_with_properties([filter], properties).await.expect("subscribe request");
    let ack = c.suback().await;
    assert!(
        ack.return_codes.iter().all(|r| matches!(r, rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_))),
        "{ack:?}"
    );
}

fn topic_of(p: &rumqttc::v5::mqttbytes::v5::Publish) -> String {
    String::from_utf8_lossy(&p.topic).into_owned()
}

fn sub_ids(p: &rumqttc::v5::mqttbytes::v5::Publish) -> Vec<usize> {
    p.properties.as_ref().map(|pp| pp.subscription_identifiers.clone()).unwrap_or_default()
}

// ----- retained messages -----------------------------------------------------------------------

#[tokio::test]
async fn retained_messages_reach_a_new_subscriber_after_a_restart_and_cleared_ones_stay_cleared() {
    let server = TestServer::mqtt().await;
    let mut p = v311::connect(&server, "retainer").await;
    p.publish("status/a", Q1, true, b"on").await;
    p.publish("status/b", Q1, true, b"old").await;
    p.publish("status/b", Q1, true, b"").await; // clears it
    p.publish("status/c", Q0, true, b"zero").await;
    let mut p5 = v5::connect(&server, "retainer5").await;
    let props = PublishProperties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("site".into(), "plant-7".into())],
        ..Default::default()
    };
    p5.client.publish_with_properties("status/d", V5Q1, true, b"five".to_vec(), props).await.expect("publish request");
    p5.published(V5Q1).await;
    // A QoS 1 publish after the QoS 0 one: its PUBACK proves the QoS 0 one was handled.
    p.publish("status/sync", Q1, false, b"").await;

    let server = server.restart().await;

    let mut s = v5::connect(&server, "late").await;
    s.subscribe("status/#", V5Q1).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(s.publish_received().await);
    }
    s.no_publish().await;
    got.sort_by_key(topic_of);
    let summary: Vec<(String, String, bool)> =
        got.iter().map(|p| (topic_of(p), text(&p.payload).to_string(), p.retain)).collect();
    assert_eq!(
        summary,
        [
            ("status/a".to_string(), "on".to_string(), true),
            ("status/c".to_string(), "zero".to_string(), true),
            ("status/d".to_string(), "five".to_string(), true),
        ],
        "the retained messages, not the cleared one"
    );
    let d = got[2].properties.clone().expect("5.0 properties");
    assert_eq!(d.content_type.as_deref(), Some("text/plain"));
    assert_eq!(d.user_properties, [("site".to_string(), "plant-7".to_string())]);
    assert_eq!(got[0].qos, V5Q1);

    // A 3.1.1 subscriber to the cleared topic alone gets nothing.
    let mut b = v311::connect(&server, "late-b").await;
    b.subscribe("status/b", Q1).await;
    b.no_publish().await;
}

// ----- persistent sessions ---------------------------------------------------------------------

#[tokio::test]
async fn v311_persistent_session_keeps_subscriptions_and_queued_messages_across_a_restart() {
    let server = TestServer::mqtt().await;
    let (mut c, ack) = v311::Client::connect(persistent_v311(&server, "v311-durable")).await;
    assert!(!ack.session_present);
    c.subscribe("orders/#", Q1).await;
    c.subscribe("events/#", Q2).await;
    c.subscribe("status/+", Q0).await;
    c.disconnect().await;

    let mut publisher = v311::connect(&server, "publisher").await;
    publisher.publish("orders/1", Q1, false, b"order 1").await;
    publisher.publish("orders/2", Q1, false, b"order 2").await;
    publisher.publish("events/1", Q2, false, b"event 1").await;

    let server = server.restart().await;

    // Published after the restart and before the client is back: the session's subscription
    // must already be bound again.
    let mut publisher = v311::connect(&server, "publisher").await;
    publisher.publish("orders/3", Q1, false, b"order 3").await;

    let (mut c, ack) = v311::Client::connect(persistent_v311(&server, "v311-durable")).await;
    assert!(ack.session_present, "the session survived the restart");
    let mut got = Vec::new();
    for _ in 0..4 {
        let p = c.publish_received().await;
        got.push((p.topic.clone(), text(&p.payload).to_string(), p.qos));
    }
    assert_eq!(
        got,
        [
            ("orders/1".to_string(), "order 1".to_string(), Q1),
            ("orders/2".to_string(), "order 2".to_string(), Q1),
            ("events/1".to_string(), "event 1".to_string(), Q2),
            ("orders/3".to_string(), "order 3".to_string(), Q1),
        ],
        "queued before and after the restart, in order, at the granted QoS"
    );
    // Live publishes reach it without a new SUBSCRIBE, at each subscription's QoS.
    publisher.publish("status/x", Q1, false, b"live status").await;
    let p = c.publish_received().await;
    assert_eq!((p.topic.as_str(), text(&p.payload), p.qos), ("status/x", "live status", Q0), "QoS 0 subscription");
    publisher.publish("orders/4", Q1, false, b"order 4").await;
    let p = c.publish_received().await;
    assert_eq!((p.topic.as_str(), text(&p.payload), p.qos), ("orders/4", "order 4", Q1));
    c.no_publish().await;
}

#[tokio::test]
async fn v311_unacked_qos1_delivery_is_sent_again_with_dup_after_a_restart() {
    let server = TestServer::mqtt().await;
    let mut o = persistent_v311(&server, "slow");
    o.set_manual_acks(true);
    let (mut c, _) = v311::Client::connect(o).await;
    c.subscribe("jobs", Q1).await;
    let mut publisher = v311::connect(&server, "boss").await;
    publisher.publish("jobs", Q1, false, b"job 1").await;
    let first = c.publish_received().await;
    assert_eq!((text(&first.payload), first.dup), ("job 1", false));
    // Not acknowledged when the broker stops.

    let server = server.restart().await;
    drop(c);

    let (mut c, ack) = v311::Client::connect(persistent_v311(&server, "slow")).await;
    assert!(ack.session_present);
    let again = c.publish_received().await;
    assert_eq!(text(&again.payload), "job 1");
    assert!(again.dup, "a resend after the restart carries DUP");
    c.no_publish().await;
}

#[tokio::test]
async fn v5_persistent_session_keeps_subscription_options_and_identifiers_across_a_restart() {
    let server = TestServer::mqtt().await;
    let (mut c, ack) = v5::Client::connect(persistent_v5(&server, "v5-durable", 300)).await;
    assert!(!ack.session_present);
    subscribe_v5(&mut c, Filter { nolocal: true, ..Filter::new("opts/local", V5Q1) }, 1).await;
    subscribe_v5(&mut c, Filter { preserve_retain: true, ..Filter::new("opts/rap", V5Q1) }, 2).await;
    subscribe_v5(&mut c, Filter::new("opts/plain", V5Q1), 3).await;
    subscribe_v5(&mut c, Filter::new("opts/zero", V5Q0), 4).await;
    c.disconnect().await;

    let mut publisher = v5::connect(&server, "pub5").await;
    publisher.publish("opts/plain", V5Q1, false, b"queued 1").await;

    let server = server.restart().await;

    let mut publisher = v5::connect(&server, "pub5").await;
    publisher.publish("opts/plain", V5Q1, false, b"queued 2").await;
    publisher.publish("opts/rap", V5Q1, true, b"retained live").await;

    let (mut c, ack) = v5::Client::connect(persistent_v5(&server, "v5-durable", 300)).await;
    assert!(ack.session_present, "the session survived the restart");
    let mut got = Vec::new();
    for _ in 0..3 {
        let p = c.publish_received().await;
        got.push((topic_of(&p), text(&p.payload).to_string(), p.retain, sub_ids(&p)));
    }
    assert_eq!(
        got,
        [
            ("opts/plain".to_string(), "queued 1".to_string(), false, vec![3]),
            ("opts/plain".to_string(), "queued 2".to_string(), false, vec![3]),
            ("opts/rap".to_string(), "retained live".to_string(), true, vec![2]),
        ],
        "queued messages in order, with their subscription identifiers and retain-as-published"
    );
    // No local: its own publish on opts/local does not come back; another client's does.
    c.publish("opts/local", V5Q1, false, b"mine").await;
    c.no_publish().await;
    publisher.publish("opts/local", V5Q1, false, b"theirs").await;
    let p = c.publish_received().await;
    assert_eq!((topic_of(&p), text(&p.payload), sub_ids(&p)), ("opts/local".to_string(), "theirs", vec![1]));
    // Without retain-as-published a live retained message arrives with RETAIN=0.
    publisher.publish("opts/plain", V5Q1, true, b"retained plain").await;
    let p = c.publish_received().await;
    assert_eq!((text(&p.payload), p.retain, sub_ids(&p)), ("retained plain", false, vec![3]));
    // The QoS 0 subscription's grant is kept.
    publisher.publish("opts/zero", V5Q1, false, b"downgraded").await;
    let p = c.publish_received().await;
    assert_eq!((text(&p.payload), p.qos, sub_ids(&p)), ("downgraded", V5Q0, vec![4]));
}

#[tokio::test]
async fn v5_session_whose_expiry_passes_while_the_broker_is_down_is_gone() {
    let server = TestServer::mqtt().await;
    let (mut c, _) = v5::Client::connect(persistent_v5(&server, "brief", 2)).await;
    c.subscribe("brief/#", V5Q1).await;
    c.disconnect().await;
    let mut publisher = v5::connect(&server, "pubb").await;
    publisher.publish("brief/x", V5Q1, false, b"too late").await;

    let dir = server.stop().await;
    // The passing of time is what is tested: the 2 s session expiry runs out while down.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let server = TestServer::resume(dir).await;

    // The expired session is dropped right after start-up (its expiry timer fires at once).
    let vhost = server.server.broker().vhost("/").expect("vhost /");
    within("the expired session's queue is deleted", async {
        while vhost.queue("mqtt-session.brief").is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let (mut c, ack) = v5::Client::connect(persistent_v5(&server, "brief", 2)).await;
    assert!(!ack.session_present, "the session expired during the restart");
    c.no_publish().await;
    let mut publisher = v5::connect(&server, "pubb").await;
    publisher.publish("brief/y", V5Q1, false, b"new").await;
    c.no_publish().await;
}

#[tokio::test]
async fn v5_session_whose_expiry_passes_after_the_restart_is_gone() {
    let server = TestServer::mqtt().await;
    let (mut c, _) = v5::Client::connect(persistent_v5(&server, "brief-after", 2)).await;
    c.subscribe("after/#", V5Q1).await;
    c.disconnect().await;
    let mut publisher = v5::connect(&server, "puba").await;
    publisher.publish("after/x", V5Q1, false, b"too late").await;

    let server = server.restart().await;
    // The passing of time is what is tested: the session expiry (2 s, counted from the
    // disconnect) runs out after the new broker started.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let (mut c, ack) = v5::Client::connect(persistent_v5(&server, "brief-after", 2)).await;
    assert!(!ack.session_present, "the session expired after the restart");
    c.no_publish().await;
}

// ----- wills -----------------------------------------------------------------------------------

/// Options of a 5.0 client with a session (expiry 60 s) and a retained QoS 1 will on
/// `wills/<id>` delayed by `delay` seconds.
fn delayed_will_options(server: &TestServer, id: &str, delay: u32) -> rumqttc::v5::MqttOptions {
    let mut o = persistent_v5(server, id, 60);
    let properties = LastWillProperties {
        delay_interval: Some(delay),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    };
    o.set_last_will(LastWill::new(format!("wills/{id}"), b"gone".to_vec(), V5Q1, true, Some(properties)));
    o
}

/// Expected: a client whose connection was open when the broker stopped, and which does not
/// come back, has its delayed will published once the delay (counted from the stop) has passed,
/// by the new broker. The will is retained so that one published by the old broker at the stop
/// would still be seen, as a retained replay (RETAIN=1), and told apart.
#[tokio::test]
async fn v5_delayed_will_of_a_connection_open_at_the_restart_is_published_after_the_delay() {
    let server = TestServer::mqtt().await;
    let (_c, _) = v5::Client::connect(delayed_will_options(&server, "willer", 2)).await;

    let stopped = Instant::now();
    let server = server.restart().await;

    let mut w = v5::connect(&server, "watcher").await;
    w.subscribe("wills/#", V5Q1).await;
    let p = within("the will after the restart", w.publish_received()).await;
    let took = stopped.elapsed();
    assert_eq!((topic_of(&p), text(&p.payload)), ("wills/willer".to_string(), "gone"));
    // Live (RETAIN=0 for a subscriber without retain-as-published), not replayed from the
    // retained store: published by the new broker once the delay had passed.
    assert!(!p.retain, "published before the watcher subscribed (at the stop?): {p:?}");
    assert!(took >= Duration::from_millis(1800), "published before its delay: {took:?}");
}

/// Expected: a client that resumes its session within the will delay after the restart cancels
/// the will.
#[tokio::test]
async fn v5_delayed_will_is_not_published_when_the_session_resumes_after_the_restart() {
    let server = TestServer::mqtt().await;
    let (_c, _) = v5::Client::connect(delayed_will_options(&server, "returner", 3)).await;

    let server = server.restart().await;

    let mut w = v5::connect(&server, "watcher").await;
    w.subscribe("wills/#", V5Q1).await;
    let (_back, ack) = v5::Client::connect(delayed_will_options(&server, "returner", 3)).await;
    assert!(ack.session_present, "the session survived the restart");
    // The will would come 3 s after the stop: wait past that (bounded) to see it does not.
    let quiet = tokio::time::timeout(Duration::from_millis(3500), w.publish_received()).await;
    assert!(quiet.is_err(), "the will was published although the session resumed: {quiet:?}");
}

// ----- MQTT into AMQP durable queues -----------------------------------------------------------

#[tokio::test]
async fn mqtt_qos1_publishes_to_an_amqp_durable_queue_survive_a_restart() {
    let server = TestServer::both().await;
    let (_conn, ch) = ferry_integration_tests::amqp::lapin_channel(&server).await;
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    within("queue.declare", ch.queue_declare("from-mqtt".into(), durable, FieldTable::default())).await.unwrap();
    within(
        "queue.bind",
        ch.queue_bind(
            "from-mqtt".into(),
            MQTT_EXCHANGE.into(),
            "plant.*.temp".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .unwrap();
    let mut p = v311::connect(&server, "sensor").await;
    for i in 0..5 {
        p.publish(&format!("plant/{i}/temp"), Q1, false, format!("t{i}").as_bytes()).await;
    }
    p.publish("plant/9/temp", Q0, false, b"qos0").await;
    p.publish("plant/6/temp", Q2, false, b"t6").await;
    let mut p5 = v5::connect(&server, "sensor5").await;
    let props = PublishProperties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("unit".into(), "C".into())],
        ..Default::default()
    };
    p5.client
        .publish_with_properties("plant/7/temp", V5Q1, false, b"t7".to_vec(), props)
        .await
        .expect("publish request");
    p5.published(V5Q1).await;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let q = within("passive", ch.queue_declare("from-mqtt".into(), passive, FieldTable::default())).await.unwrap();
    assert_eq!(q.message_count(), 8);

    let server = server.restart().await;

    let (_conn, ch) = ferry_integration_tests::amqp::lapin_channel(&server).await;
    let mut got = Vec::new();
    while let Some(m) =
        within("basic.get", ch.basic_get("from-mqtt".into(), BasicGetOptions { no_ack: true })).await.unwrap()
    {
        got.push(m.delivery);
    }
    let summary: Vec<(String, String, Option<u8>)> = got
        .iter()
        .map(|d| {
            (d.routing_key.to_string(), String::from_utf8_lossy(&d.data).into_owned(), *d.properties.delivery_mode())
        })
        .collect();
    let mut want: Vec<(String, String, Option<u8>)> =
        (0..5).map(|i| (format!("plant.{i}.temp"), format!("t{i}"), Some(2))).collect();
    want.push(("plant.6.temp".into(), "t6".into(), Some(2)));
    want.push(("plant.7.temp".into(), "t7".into(), Some(2)));
    assert_eq!(summary, want, "every acknowledged QoS 1/2 publish, in order; not the QoS 0 one");
    for d in &got {
        assert_eq!(d.exchange.as_str(), MQTT_EXCHANGE);
    }
    let t6 = got[5].properties.headers().clone().expect("QoS 2 header");
    let qos = match t6.inner().get("x-mqtt-qos") {
        Some(AMQPValue::ShortShortUInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortShortInt(n)) => i64::from(*n),
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        other => panic!("x-mqtt-qos: {other:?}"),
    };
    assert_eq!(qos, 2);
    let t7 = &got[6].properties;
    assert_eq!(t7.content_type().as_ref().map(|c| c.as_str()), Some("text/plain"));
    let headers = t7.headers().clone().expect("user properties");
    assert!(
        matches!(headers.inner().get("unit"), Some(AMQPValue::LongString(v)) if v.as_bytes() == b"C"),
        "{headers:?}"
    );
}
