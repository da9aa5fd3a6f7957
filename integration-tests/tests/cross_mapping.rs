//! MQTT ↔ AMQP through one broker: one test per row of `docs/mapping.md`, both ways, through
//! rumqttc (3.1.1 and 5.0) and lapin, plus request/response across the protocols and the
//! per-listener MQTT exchange.

use std::collections::BTreeMap;

use bytes::Bytes;
use ferry_integration_tests::cross::{
    amqp_publish, bound_queue, consume, mqtt5_publish, next_delivery, no_delivery, MQTT_EXCHANGE,
};
use ferry_integration_tests::mqtt::{connect_packet, text, v311, v5, RawClient};
use ferry_integration_tests::{amqp::lapin_channel, within, TestServer};
use ferry_mqtt::codec::ProtocolVersion;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
};
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, ExchangeKind};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;

const QOS0: QoS = QoS::AtMostOnce;
const QOS1: QoS = QoS::AtLeastOnce;
const QOS2: QoS = QoS::ExactlyOnce;

fn headers(d: &Delivery) -> BTreeMap<String, AMQPValue> {
    d.properties
        .headers()
        .as_ref()
        .map(|h| h.inner().iter().map(|(k, v)| (k.to_string(), v.clone())).collect())
        .unwrap_or_default()
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// A server, an MQTT 5 client, and an AMQP consumer on a queue bound to `amq.topic` with `key`.
async fn mqtt_to_amqp(key: &str) -> (TestServer, v5::Client, lapin::Connection, lapin::Consumer) {
    let server = TestServer::both().await;
    let (conn, ch) = lapin_channel(&server).await;
    let q = bound_queue(&ch, MQTT_EXCHANGE, &[key]).await;
    let consumer = consume(&ch, &q, true).await;
    let mqtt = v5::connect(&server, "publisher").await;
    (server, mqtt, conn, consumer)
}

/// A server, an MQTT 5 subscriber on `filter` at `qos`, and an AMQP channel to publish with.
async fn amqp_to_mqtt(filter: &str, qos: QoS) -> (TestServer, v5::Client, lapin::Connection, lapin::Channel) {
    let server = TestServer::both().await;
    let mut mqtt = v5::connect(&server, "subscriber").await;
    mqtt.subscribe(filter, qos).await;
    let (conn, ch) = lapin_channel(&server).await;
    (server, mqtt, conn, ch)
}

fn props(p: &rumqttc::v5::mqttbytes::v5::Publish) -> PublishProperties {
    p.properties.clone().unwrap_or_default()
}

// ----- MQTT publish → AMQP consumer ---------------------------------------------------------------

#[tokio::test]
async fn mqtt_topic_becomes_the_swapped_routing_key_and_the_body_is_unchanged() {
    let (_s, mut mqtt, _c, mut amqp) = mqtt_to_amqp("plant.*.#").await;
    let body: Vec<u8> = (0..=255u8).collect();
    mqtt5_publish(&mut mqtt, "plant/7.1/temp", QOS0, false, body.clone(), Default::default()).await;
    let d = next_delivery(&mut amqp).await;
    assert_eq!(d.data, body, "payload bytes unchanged");
    assert_eq!(d.exchange.as_str(), MQTT_EXCHANGE);
    assert_eq!(d.routing_key.as_str(), "plant.7/1.temp", "`/` and `.` swapped");
}

#[tokio::test]
async fn mqtt_qos_becomes_the_delivery_mode() {
    let (_s, mut mqtt, _c, mut amqp) = mqtt_to_amqp("q.#").await;
    for (qos, mode, qos_header) in [(QOS0, 1, None), (QOS1, 2, None), (QOS2, 2, Some(AMQPValue::ShortShortUInt(2)))] {
        mqtt5_publish(&mut mqtt, "q/x", qos, false, "m", Default::default()).await;
        let d = next_delivery(&mut amqp).await;
        assert_eq!(*d.properties.delivery_mode(), Some(mode), "{qos:?}");
        assert_eq!(headers(&d).get("x-mqtt-qos").cloned(), qos_header, "{qos:?}");
    }
}

#[tokio::test]
async fn mqtt_content_type_becomes_content_type() {
    let (_s, mut mqtt, _c, mut amqp) = mqtt_to_amqp("ct").await;
    let p = PublishProperties { content_type: Some("application/json".into()), ..Default::default() };
    mqtt5_publish(&mut mqtt, "ct", QOS1, false, "{}", p).await;
    let d = next_delivery(&mut amqp).await;
    assert_eq!(d.properties.content_type().as_ref().map(ShortString::as_str), Some("application/json"));
}

#[tokio::test]
async fn mqtt_correlation_data_becomes_correlation_id_or_the_x_correlation_data_header() {
    let (_s, mut mqtt, _c, mut amqp) = mqtt_to_amqp("corr").await;
    let text_id = Bytes::from_static(b"req-42");
    let binary = Bytes::from_static(&[0, 0x9f, 0xff, 1]);
    let too_long = Bytes::from("c".repeat(300));
    for cd in [text_id.clone(), binary.clone(), too_long.clone()] {
        let p = PublishProperties { correlation_data: Some(cd), ..Default::default() };
        mqtt5_publish(&mut mqtt, "corr", QOS0, false, "r", p).await;
    }
    let d = next_delivery(&mut amqp).await;
    assert_eq!(d.properties.correlation_id().as_ref().map(ShortString::as_str), Some("req-42"));
    assert!(headers(&d).is_empty(), "{:?}", headers(&d));
    for cd in [binary, too_long] {
        let d = next_delivery(&mut amqp).await;
        assert_eq!(*d.properties.correlation_id(), None, "not a short string AMQP clients can read");
        assert_eq!(headers(&d).get("x-correlation-data"), Some(&AMQPValue::ByteArray(ByteArray::from(&cd[..]))));
    }
}

#[tokio::test]
async fn mqtt_response_topic_becomes_reply_to_converted() {
    let (_s, mut mqtt, _c, mut amqp) = mqtt_to_amqp("rt").await;
    let p = PublishProperties { response_topic: Some("replies/client.7".into()), ..Default::default() };
    mqtt5_publish(&mut mqtt, "rt", QOS0, false, "r", p).await;
    let d = next_delivery(&mut amqp).await;
    assert_eq!(d.properties.reply_to().as_ref().map(ShortString::as_str), Some("replies.client/7"));
}

#[tokio::test]
async fn mqtt_message_expiry_becomes_expiration_in_milliseconds() {
    let (_s, mut mqtt, _c, mut amqp) = mqtt_to_amqp("exp").await;
    let p = PublishProperties { message_expiry_interval: Some(90), ..Default::default() };
    mqtt5_publish(&mut mqtt, "exp", QOS1, false, "r", p).await;
    let d = next_delivery(&mut amqp).await;
    assert_eq!(d.properties.expiration().as_ref().map(ShortString::as_str), Some("90000"));
}

#[tokio::test]
async fn mqtt_user_properties_become_headers_with_repeated_keys_as_arrays() {
    let (_s, mut mqtt, _c, mut amqp) = mqtt_to_amqp("up").await;
    let user_properties = vec![
        ("site".to_string(), "north".to_string()),
        ("tag".to_string(), "a".to_string()),
        ("tag".to_string(), "b".to_string()),
    ];
    let p = PublishProperties { user_properties, ..Default::default() };
    mqtt5_publish(&mut mqtt, "up", QOS0, false, "r", p).await;
    let h = headers(&next_delivery(&mut amqp).await);
    assert_eq!(h.get("site"), Some(&long("north")));
    assert_eq!(h.get("tag"), Some(&AMQPValue::FieldArray(FieldArray::from(vec![long("a"), long("b")]))));
    assert_eq!(h.len(), 2, "{h:?}");
}

#[tokio::test]
async fn mqtt_payload_format_indicator_becomes_a_header() {
    let (_s, mut mqtt, _c, mut amqp) = mqtt_to_amqp("pf").await;
    let p = PublishProperties { payload_format_indicator: Some(1), ..Default::default() };
    mqtt5_publish(&mut mqtt, "pf", QOS0, false, "text", p).await;
    let h = headers(&next_delivery(&mut amqp).await);
    assert_eq!(h.get("x-mqtt-payload-format"), Some(&AMQPValue::ShortShortUInt(1)));
}

#[tokio::test]
async fn a_retained_mqtt_message_reaches_bound_queues_live_with_x_mqtt_retain_and_is_not_replayed_to_new_ones() {
    let (server, mut mqtt, _c, mut amqp) = mqtt_to_amqp("ret.#").await;
    mqtt5_publish(&mut mqtt, "ret/a", QOS1, true, "kept", Default::default()).await;
    let d = next_delivery(&mut amqp).await;
    assert_eq!(d.data, b"kept");
    assert_eq!(headers(&d).get("x-mqtt-retain"), Some(&AMQPValue::Boolean(true)));
    // Retained messages are an MQTT store: a queue bound afterwards gets nothing...
    let (_c2, ch2) = lapin_channel(&server).await;
    let q2 = bound_queue(&ch2, MQTT_EXCHANGE, &["ret.#"]).await;
    let mut late = consume(&ch2, &q2, true).await;
    no_delivery(&mut late).await;
    // ...while an MQTT subscriber gets it with RETAIN set.
    let mut sub = v5::connect(&server, "late-mqtt").await;
    sub.subscribe("ret/#", QOS1).await;
    let p = sub.publish_received().await;
    assert!(p.retain && p.payload == "kept");
}

#[tokio::test]
async fn an_mqtt_3_1_1_publish_reaches_amqp_with_only_body_routing_key_and_delivery_mode() {
    let server = TestServer::both().await;
    let (_conn, ch) = lapin_channel(&server).await;
    let q = bound_queue(&ch, MQTT_EXCHANGE, &["v3.#"]).await;
    let mut amqp = consume(&ch, &q, true).await;
    let mut mqtt = v311::connect(&server, "v3-publisher").await;
    mqtt.publish("v3/a.b", rumqttc::QoS::AtLeastOnce, false, b"x").await;
    let d = next_delivery(&mut amqp).await;
    assert_eq!((d.data.as_slice(), d.routing_key.as_str()), (&b"x"[..], "v3.a/b"));
    assert_eq!(d.properties, BasicProperties::default().with_delivery_mode(2));
}

#[tokio::test]
async fn an_mqtt_topic_too_long_for_a_routing_key_reaches_mqtt_and_does_not_block_amqp_consumers() {
    let server = TestServer::both().await;
    let mut mqtt = v5::connect(&server, "sub").await;
    mqtt.subscribe("long/#", QOS1).await;
    let (_conn, ch) = lapin_channel(&server).await;
    let q = bound_queue(&ch, MQTT_EXCHANGE, &["long.#"]).await;
    within("basic.qos", ch.basic_qos(1, BasicQosOptions::default())).await.unwrap();
    let mut amqp = consume(&ch, &q, false).await;
    let long_topic = format!("long/{}", "x".repeat(300));
    mqtt5_publish(&mut mqtt, &long_topic, QOS1, false, "too long", Default::default()).await;
    mqtt5_publish(&mut mqtt, "long/ok", QOS1, false, "fits", Default::default()).await;
    assert_eq!(mqtt.publish_received().await.topic.len(), long_topic.len(), "MQTT subscribers get it");
    // AMQP cannot carry the 305-byte routing key: that delivery is dropped (and settled, so it
    // does not hold the consumer's only prefetch credit); the next message arrives.
    let d = next_delivery(&mut amqp).await;
    assert_eq!((d.data.as_slice(), d.routing_key.as_str()), (&b"fits"[..], "long.ok"));
}

// ----- AMQP publish → MQTT subscriber -----------------------------------------------------------

#[tokio::test]
async fn amqp_delivery_mode_gives_the_mqtt_qos_capped_by_the_subscription() {
    let server = TestServer::both().await;
    let (_conn, ch) = lapin_channel(&server).await;
    let mut subs = Vec::new();
    for (id, qos) in [("s0", QOS0), ("s1", QOS1), ("s2", QOS2)] {
        let mut c = v5::connect(&server, id).await;
        c.subscribe("dm/#", qos).await;
        subs.push((c, qos));
    }
    let persistent = BasicProperties::default().with_delivery_mode(2);
    amqp_publish(&ch, MQTT_EXCHANGE, "dm.persistent", b"p", persistent).await;
    amqp_publish(&ch, MQTT_EXCHANGE, "dm.transient", b"t", BasicProperties::default()).await;
    for (c, sub_qos) in &mut subs {
        let p = c.publish_received().await;
        // A persistent AMQP message counts as QoS 1: min(1, subscription QoS).
        assert_eq!((p.topic.as_ref(), p.qos), (&b"dm/persistent"[..], if *sub_qos == QOS0 { QOS0 } else { QOS1 }));
        let t = c.publish_received().await;
        assert_eq!((t.topic.as_ref(), t.qos), (&b"dm/transient"[..], QOS0), "transient counts as QoS 0");
    }
}

#[tokio::test]
async fn amqp_routing_key_becomes_the_swapped_topic() {
    let (_s, mut mqtt, _c, ch) = amqp_to_mqtt("plant/+/temp", QOS0).await;
    amqp_publish(&ch, MQTT_EXCHANGE, "plant.7/1.temp", b"21.5", BasicProperties::default()).await;
    let p = mqtt.publish_received().await;
    assert_eq!((p.topic.as_ref(), p.payload.as_ref()), (&b"plant/7.1/temp"[..], &b"21.5"[..]));
}

#[tokio::test]
async fn amqp_content_type_correlation_id_and_reply_to_become_mqtt_properties() {
    let (_s, mut mqtt, _c, ch) = amqp_to_mqtt("req", QOS1).await;
    let sent = BasicProperties::default()
        .with_content_type("text/plain".into())
        .with_correlation_id("abc-1".into())
        .with_reply_to("replies.client/7".into());
    amqp_publish(&ch, MQTT_EXCHANGE, "req", b"q", sent).await;
    let p = props(&mqtt.publish_received().await);
    assert_eq!(p.content_type.as_deref(), Some("text/plain"));
    assert_eq!(p.correlation_data.as_deref(), Some(&b"abc-1"[..]));
    assert_eq!(p.response_topic.as_deref(), Some("replies/client.7"), "reply_to converted");
    assert!(p.user_properties.is_empty(), "{:?}", p.user_properties);
}

#[tokio::test]
async fn the_x_correlation_data_header_becomes_correlation_data_byte_for_byte() {
    let (_s, mut mqtt, _c, ch) = amqp_to_mqtt("corr", QOS0).await;
    let raw = vec![0u8, 0x9f, 0xff, 7];
    let mut h = FieldTable::default();
    h.insert("x-correlation-data".into(), AMQPValue::ByteArray(ByteArray::from(raw.clone())));
    amqp_publish(&ch, MQTT_EXCHANGE, "corr", b"q", BasicProperties::default().with_headers(h)).await;
    let p = props(&mqtt.publish_received().await);
    assert_eq!(p.correlation_data.as_deref(), Some(&raw[..]));
    assert!(p.user_properties.is_empty(), "Ferry's own header is not a user property");
}

#[tokio::test]
async fn amqp_expiration_becomes_the_remaining_message_expiry() {
    let (_s, mut mqtt, _c, ch) = amqp_to_mqtt("exp", QOS0).await;
    amqp_publish(&ch, MQTT_EXCHANGE, "exp", b"q", BasicProperties::default().with_expiration("60000".into())).await;
    let expiry = props(&mqtt.publish_received().await).message_expiry_interval.expect("message expiry");
    assert!((1..=60).contains(&expiry), "{expiry} s left of 60");
}

#[tokio::test]
async fn amqp_headers_become_user_properties_as_text_and_tables_voids_and_binary_are_not_sent() {
    let (_s, mut mqtt, _c, ch) = amqp_to_mqtt("h", QOS0).await;
    let mut nested = FieldTable::default();
    nested.insert("k".into(), long("v"));
    let mut h = FieldTable::default();
    for (k, v) in [
        ("str", long("plain")),
        ("int", AMQPValue::LongInt(-5)),
        ("big", AMQPValue::LongLongInt(1 << 40)),
        ("flag", AMQPValue::Boolean(true)),
        ("ts", AMQPValue::Timestamp(1_700_000_000)),
        ("dec", AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 1234 })),
        ("list", AMQPValue::FieldArray(FieldArray::from(vec![long("x"), AMQPValue::ShortInt(3)]))),
        ("utf8-bytes", AMQPValue::ByteArray(ByteArray::from(&b"ok"[..]))),
        ("table", AMQPValue::FieldTable(nested)),
        ("void", AMQPValue::Void),
        ("binary", AMQPValue::ByteArray(ByteArray::from(vec![0xff, 0xfe]))),
    ] {
        h.insert(k.into(), v);
    }
    amqp_publish(&ch, MQTT_EXCHANGE, "h", b"q", BasicProperties::default().with_headers(h)).await;
    let mut got = props(&mqtt.publish_received().await).user_properties;
    got.sort();
    let mut want: Vec<(String, String)> = [
        ("str", "plain"),
        ("int", "-5"),
        ("big", "1099511627776"),
        ("flag", "true"),
        ("ts", "1700000000"),
        ("dec", "1234e-2"),
        ("list", "x"),
        ("list", "3"),
        ("utf8-bytes", "ok"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test]
async fn amqp_only_properties_are_not_sent_to_mqtt_and_stay_on_the_message_for_amqp() {
    let server = TestServer::both().await;
    let mut mqtt = v5::connect(&server, "sub").await;
    mqtt.subscribe("only", QOS0).await;
    let (_conn, ch) = lapin_channel(&server).await;
    let q = bound_queue(&ch, MQTT_EXCHANGE, &["only"]).await;
    let mut amqp = consume(&ch, &q, true).await;
    let sent = BasicProperties::default()
        .with_message_id("m-1".into())
        .with_timestamp(1_700_000_000)
        .with_type("reading".into())
        .with_app_id("archiver".into())
        .with_user_id("guest".into())
        .with_priority(3)
        .with_content_encoding("gzip".into());
    amqp_publish(&ch, MQTT_EXCHANGE, "only", b"q", sent.clone()).await;
    let p = mqtt.publish_received().await;
    assert_eq!(p.payload, "q");
    assert_eq!(props(&p), PublishProperties::default(), "none of them has an MQTT field");
    assert_eq!(next_delivery(&mut amqp).await.properties, sent, "kept for AMQP consumers");
}

#[tokio::test]
async fn an_mqtt_3_1_1_subscriber_gets_payload_and_topic_only() {
    let server = TestServer::both().await;
    let mut mqtt = v311::connect(&server, "v3-sub").await;
    mqtt.subscribe("v3/#", rumqttc::QoS::AtLeastOnce).await;
    let (_conn, ch) = lapin_channel(&server).await;
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("text/plain".into())
        .with_correlation_id("c".into());
    amqp_publish(&ch, MQTT_EXCHANGE, "v3.a/b", b"hello", props).await;
    let p = mqtt.publish_received().await;
    assert_eq!((p.topic.as_str(), text(&p.payload), p.qos), ("v3/a.b", "hello", rumqttc::QoS::AtLeastOnce));
}

#[tokio::test]
async fn an_amqp_consumer_can_join_an_mqtt_shared_subscription_group() {
    let server = TestServer::both().await;
    let mut mqtt = v5::connect(&server, "member").await;
    mqtt.subscribe("$share/workers/jobs/#", QOS1).await;
    let (_conn, ch) = lapin_channel(&server).await;
    let mut amqp = consume(&ch, "mqtt-shared.workers.jobs/#", true).await;
    for i in 0..4 {
        amqp_publish(&ch, MQTT_EXCHANGE, "jobs.x", format!("{i}").as_bytes(), BasicProperties::default()).await;
    }
    // Round-robin between the two members: each job goes to exactly one of them.
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(text(&mqtt.publish_received().await.payload).to_string());
        got.push(String::from_utf8(next_delivery(&mut amqp).await.data).unwrap());
    }
    got.sort();
    assert_eq!(got, ["0", "1", "2", "3"]);
    mqtt.no_publish().await;
    no_delivery(&mut amqp).await;
}

#[tokio::test]
async fn a_mandatory_amqp_publish_counts_an_mqtt_subscriber_as_a_route() {
    let (_s, mut mqtt, _c, ch) = amqp_to_mqtt("m/sub", QOS0).await;
    within("confirm", ch.confirm_select(ConfirmSelectOptions::default())).await.unwrap();
    let mandatory = |key: &'static str| {
        let ch = ch.clone();
        async move {
            within("publish", async {
                let options = BasicPublishOptions { mandatory: true, ..Default::default() };
                ch.basic_publish(MQTT_EXCHANGE.into(), key.into(), options, b"x", BasicProperties::default())
                    .await?
                    .await
            })
            .await
            .unwrap()
        }
    };
    let routed = mandatory("m.sub").await;
    assert!(routed.is_ack() && routed.take_message().is_none(), "the MQTT subscriber is a route");
    assert_eq!(mqtt.publish_received().await.payload, "x");
    let returned = mandatory("m.nobody").await.take_message().expect("basic.return");
    assert_eq!(returned.reply_code, 312);
}

// ----- request / response -------------------------------------------------------------------------

#[tokio::test]
async fn an_mqtt_5_requester_is_answered_by_an_amqp_rpc_service_with_correlation_intact() {
    let server = TestServer::both().await;
    // The AMQP service: a queue bound to amq.topic, replies to reply_to on amq.topic.
    let (_conn, ch) = lapin_channel(&server).await;
    let q = bound_queue(&ch, MQTT_EXCHANGE, &["rpc.add"]).await;
    let mut requests = consume(&ch, &q, false).await;
    let mut requester = v5::connect(&server, "requester").await;
    requester.subscribe("replies/requester", QOS1).await;
    let text_id = Bytes::from_static(b"req-1");
    let binary_id = Bytes::from_static(&[0xde, 0xad, 0x00, 0xbe, 0xef]);
    for (cd, body) in [(text_id.clone(), "2+3"), (binary_id.clone(), "4+4")] {
        let p = PublishProperties {
            response_topic: Some("replies/requester".into()),
            correlation_data: Some(cd),
            ..Default::default()
        };
        mqtt5_publish(&mut requester, "rpc/add", QOS1, false, body, p).await;
    }
    for _ in 0..2 {
        let req = next_delivery(&mut requests).await;
        let sum: u32 = String::from_utf8(req.data.clone()).unwrap().split('+').map(|n| n.parse::<u32>().unwrap()).sum();
        let reply_to = req.properties.reply_to().clone().expect("reply_to");
        assert_eq!(reply_to.as_str(), "replies.requester");
        // What an AMQP RPC service does: copy correlation_id (and the headers, where binary
        // correlation data travels).
        let mut reply = BasicProperties::default();
        if let Some(c) = req.properties.correlation_id() {
            reply = reply.with_correlation_id(c.clone());
        }
        if let Some(h) = req.properties.headers() {
            reply = reply.with_headers(h.clone());
        }
        amqp_publish(&ch, MQTT_EXCHANGE, reply_to.as_str(), sum.to_string().as_bytes(), reply).await;
        req.ack(BasicAckOptions::default()).await.unwrap();
    }
    let mut replies = Vec::new();
    for _ in 0..2 {
        let p = requester.publish_received().await;
        assert_eq!(p.topic.as_ref(), b"replies/requester");
        replies.push((props(&p).correlation_data.unwrap(), text(&p.payload).to_string()));
    }
    replies.sort();
    let mut want = vec![(text_id, "5".to_string()), (binary_id, "8".to_string())];
    want.sort();
    assert_eq!(replies, want);
}

#[tokio::test]
async fn an_amqp_direct_reply_to_requester_is_answered_by_an_mqtt_5_responder() {
    let server = TestServer::both().await;
    let mut responder = v5::connect(&server, "responder").await;
    responder.subscribe("svc/time/req", QOS1).await;
    let (_conn, ch) = lapin_channel(&server).await;
    let mut replies = consume(&ch, "amq.rabbitmq.reply-to", true).await;
    let props = BasicProperties::default()
        .with_reply_to("amq.rabbitmq.reply-to".into())
        .with_correlation_id("call-7".into())
        .with_delivery_mode(2);
    amqp_publish(&ch, MQTT_EXCHANGE, "svc.time.req", b"now?", props).await;

    let req = responder.publish_received().await;
    let rp = props_of(&req);
    let response_topic = rp.response_topic.clone().expect("response topic");
    assert!(response_topic.starts_with("amq/rabbitmq/reply-to/"), "{response_topic}");
    assert_eq!(rp.correlation_data.as_deref(), Some(&b"call-7"[..]));
    // The responder answers the usual MQTT 5 way: publish to the response topic with the
    // correlation data. Ferry routes it through the default exchange to the reply queue.
    let answer = PublishProperties { correlation_data: rp.correlation_data.clone(), ..Default::default() };
    mqtt5_publish(&mut responder, &response_topic, QOS1, false, "12:00", answer).await;

    let d = next_delivery(&mut replies).await;
    assert_eq!(d.data, b"12:00");
    assert_eq!(d.properties.correlation_id().as_ref().map(ShortString::as_str), Some("call-7"));
    assert_eq!(d.exchange.as_str(), "", "direct reply-to answers come through the default exchange");
}

fn props_of(p: &rumqttc::v5::mqttbytes::v5::Publish) -> PublishProperties {
    props(p)
}

// ----- the listener's MQTT exchange ---------------------------------------------------------------

#[tokio::test]
async fn a_configured_mqtt_exchange_is_declared_as_a_durable_topic_exchange_and_used_both_ways() {
    let server = TestServer::both_with("mqtt_exchange = \"iot\"\n", "").await;
    let mut mqtt = v5::connect(&server, "device").await;
    mqtt.subscribe("cmd/#", QOS1).await;
    let (_conn, ch) = lapin_channel(&server).await;
    // It exists now: a passive declare succeeds, and a redeclare as durable topic is equivalent.
    let passive = ExchangeDeclareOptions { passive: true, ..Default::default() };
    ch.exchange_declare("iot".into(), ExchangeKind::Topic, passive, FieldTable::default()).await.unwrap();
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    ch.exchange_declare("iot".into(), ExchangeKind::Topic, durable, FieldTable::default()).await.unwrap();
    let on_iot = bound_queue(&ch, "iot", &["telemetry.#"]).await;
    let on_default = bound_queue(&ch, MQTT_EXCHANGE, &["telemetry.#"]).await;
    let mut iot = consume(&ch, &on_iot, true).await;
    let mut default = consume(&ch, &on_default, true).await;

    mqtt5_publish(&mut mqtt, "telemetry/t1", QOS1, false, "7", Default::default()).await;
    assert_eq!(next_delivery(&mut iot).await.exchange.as_str(), "iot");
    no_delivery(&mut default).await;

    amqp_publish(&ch, MQTT_EXCHANGE, "cmd.reboot", b"not for MQTT", BasicProperties::default()).await;
    amqp_publish(&ch, "iot", "cmd.reboot", b"now", BasicProperties::default()).await;
    assert_eq!(mqtt.publish_received().await.payload, "now");
    mqtt.no_publish().await;
}

#[tokio::test]
async fn an_mqtt_exchange_of_another_type_refuses_connections() {
    let server = TestServer::both_with("mqtt_exchange = \"iot-direct\"\n", "").await;
    let (_conn, ch) = lapin_channel(&server).await;
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    ch.exchange_declare("iot-direct".into(), ExchangeKind::Direct, durable, FieldTable::default()).await.unwrap();
    let connect = connect_packet(ProtocolVersion::V5, "device", true);
    let (_c, ack) = RawClient::connect(server.mqtt_addr(), connect).await;
    assert_eq!(ack.code, 0x88, "server unavailable");
}
