//! The seed scenarios of issue 5, end to end on one broker speaking both protocols: farm
//! telemetry (MQTT sensors → MQTT dashboard + AMQP archive), an AMQP order pipeline with a
//! dead-letter queue, and a vehicle fleet (MQTT telemetry to MQTT dashboards, MQTT alerts to a
//! durable AMQP queue acknowledged by an AMQP service).

use std::collections::{BTreeMap, HashSet};

use ferry_integration_tests::amqp::lapin_channel;
use ferry_integration_tests::cross::{amqp_publish, bound_queue, consume, next_delivery, no_delivery, MQTT_EXCHANGE};
use ferry_integration_tests::mqtt::{packet_bytes, publish_packet, v5, RawClient};
use ferry_integration_tests::{within, TestServer};
use ferry_mqtt::codec::{Packet, ProtocolVersion, QoS};
use lapin::options::{
    BasicAckOptions, BasicQosOptions, BasicRejectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, ExchangeKind};
use rumqttc::v5::mqttbytes::QoS as RQoS;

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

// ----- (a) farm telemetry --------------------------------------------------------------------------

const SENSORS: usize = 1_000;
const READINGS: usize = 3;
const SENSOR_CONNECTIONS: usize = 10;

/// Sensor `i`'s topic: even sensors measure soil, odd ones air (which the dashboard must not get).
fn sensor_topic(i: usize) -> String {
    if i.is_multiple_of(2) {
        format!("farm/dev{i}/soil/moisture")
    } else {
        format!("farm/dev{i}/air/temp")
    }
}

#[tokio::test]
async fn farm_telemetry_reaches_the_mqtt_dashboard_and_the_amqp_archive_with_exact_counts() {
    let server = TestServer::both().await;
    let mut dashboard = v5::connect(&server, "dashboard").await;
    dashboard.subscribe("farm/+/soil/#", RQoS::AtMostOnce).await;
    let (_conn, ch) = lapin_channel(&server).await;
    let archive = bound_queue(&ch, MQTT_EXCHANGE, &["farm.#"]).await;
    let mut archive = consume(&ch, &archive, true).await;

    // 1,000 devices, each with its own topic, over a handful of connections (gateways), each
    // sending every reading of its devices in one write: QoS 0, as sensors do.
    let mut gateways = Vec::new();
    for g in 0..SENSOR_CONNECTIONS {
        let mut c = RawClient::connect_ok(server.mqtt_addr(), ProtocolVersion::V311, &format!("gw-{g}"), true).await;
        let mut bytes = Vec::new();
        for reading in 0..READINGS {
            for i in (g..SENSORS).step_by(SENSOR_CONNECTIONS) {
                let p = publish_packet(&sensor_topic(i), QoS::AtMostOnce, 0, format!("{i}:{reading}").as_bytes());
                bytes.extend(packet_bytes(&Packet::Publish(p), ProtocolVersion::V311));
            }
        }
        c.send_bytes(&bytes).await;
        gateways.push(c);
    }
    // A PINGRESP comes after every publish before it has been routed.
    for c in &mut gateways {
        c.ping().await;
    }

    // Exact counts. No loss is expected, and none is allowed: the archive is a queue without a
    // length limit, and the dashboard's direct sink (outbox capacity 1,000) slows publishers
    // when full and drops QoS 0 only past twice its capacity; the dashboard gets 1,500
    // messages in all, so even unread they would all fit.
    let soil = SENSORS / 2 * READINGS;
    let mut per_device: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..soil {
        let p = dashboard.publish_received().await;
        let topic = String::from_utf8(p.topic.to_vec()).unwrap();
        assert!(topic.contains("/soil/"), "{topic}");
        *per_device.entry(topic).or_default() += 1;
    }
    assert_eq!(per_device.len(), SENSORS / 2, "every soil sensor");
    assert!(per_device.values().all(|&n| n == READINGS), "every reading of each");
    let mut keys = HashSet::new();
    for _ in 0..SENSORS * READINGS {
        let d = next_delivery(&mut archive).await;
        keys.insert(d.routing_key.to_string());
    }
    assert_eq!(keys.len(), SENSORS, "1,000 distinct devices archived");
    assert!(keys.contains("farm.dev0.soil.moisture") && keys.contains("farm.dev1.air.temp"));
    dashboard.no_publish().await;
    no_delivery(&mut archive).await;
}

// ----- (b) order pipeline ---------------------------------------------------------------------------

#[tokio::test]
async fn order_pipeline_fans_out_and_dead_letters_a_rejected_order_with_x_death() {
    let server = TestServer::both().await;
    let (_conn, ch) = lapin_channel(&server).await;
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    ch.exchange_declare("orders".into(), ExchangeKind::Topic, durable, FieldTable::default()).await.unwrap();
    ch.exchange_declare("orders.dlx".into(), ExchangeKind::Fanout, durable, FieldTable::default()).await.unwrap();
    let qd = QueueDeclareOptions { durable: true, ..Default::default() };
    let mut dl_args = FieldTable::default();
    dl_args.insert("x-dead-letter-exchange".into(), long("orders.dlx"));
    for (queue, key, arguments) in [
        ("payment", "order.created", dl_args),
        ("inventory", "order.created", FieldTable::default()),
        ("fulfillment", "order.*", FieldTable::default()),
        ("orders.dead", "", FieldTable::default()),
    ] {
        ch.queue_declare(queue.into(), qd, arguments).await.unwrap();
        let x = if queue == "orders.dead" { "orders.dlx" } else { "orders" };
        ch.queue_bind(queue.into(), x.into(), key.into(), QueueBindOptions::default(), FieldTable::default())
            .await
            .unwrap();
    }
    for id in 1..=3 {
        let props = BasicProperties::default().with_delivery_mode(2).with_message_id(format!("o-{id}").into());
        amqp_publish(&ch, "orders", "order.created", format!("order {id}").as_bytes(), props).await;
    }
    amqp_publish(&ch, "orders", "order.shipped", b"order 1 shipped", BasicProperties::default()).await;

    // Payment accepts orders 1 and 3 and rejects order 2 without requeue.
    let mut payment = consume(&ch, "payment", false).await;
    for id in 1..=3 {
        let d = next_delivery(&mut payment).await;
        assert_eq!(d.data, format!("order {id}").as_bytes());
        if id == 2 {
            d.reject(BasicRejectOptions { requeue: false }).await.unwrap();
        } else {
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    }
    let mut inventory = consume(&ch, "inventory", true).await;
    let mut fulfillment = consume(&ch, "fulfillment", true).await;
    for id in 1..=3 {
        assert_eq!(next_delivery(&mut inventory).await.data, format!("order {id}").as_bytes());
        assert_eq!(next_delivery(&mut fulfillment).await.data, format!("order {id}").as_bytes());
    }
    assert_eq!(next_delivery(&mut fulfillment).await.routing_key.as_str(), "order.shipped");

    let mut dead = consume(&ch, "orders.dead", true).await;
    let d = next_delivery(&mut dead).await;
    assert_eq!(d.data, b"order 2");
    assert_eq!(d.properties.message_id().as_ref().map(ShortString::as_str), Some("o-2"), "properties kept");
    let headers = d.properties.headers().clone().expect("headers");
    let deaths = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        other => panic!("x-death: {other:?}"),
    };
    assert_eq!(deaths.len(), 1);
    let AMQPValue::FieldTable(death) = &deaths[0] else { panic!("x-death entry: {:?}", deaths[0]) };
    let death = death.inner();
    assert_eq!(death.get("reason"), Some(&long("rejected")));
    assert_eq!(death.get("queue"), Some(&long("payment")));
    assert_eq!(death.get("exchange"), Some(&long("orders")));
    assert_eq!(death.get("count").and_then(AMQPValue::as_long_long_int), Some(1));
    assert_eq!(
        death.get("routing-keys"),
        Some(&AMQPValue::FieldArray(vec![long("order.created")].into())),
        "the key it was published with"
    );
    assert!(matches!(death.get("time"), Some(AMQPValue::Timestamp(t)) if *t > 1_600_000_000));
    assert_eq!(headers.inner().get("x-first-death-reason"), Some(&long("rejected")));
    no_delivery(&mut dead).await;
    no_delivery(&mut payment).await;
}

// ----- (c) vehicle fleet -------------------------------------------------------------------------------

const VEHICLES: usize = 20;
const TELEMETRY: usize = 10;
const ALERTS: usize = 3;

#[tokio::test]
async fn vehicle_fleet_telemetry_goes_to_mqtt_dashboards_and_alerts_to_a_durable_amqp_queue() {
    let server = TestServer::both().await;
    let mut dashboards = Vec::new();
    for name in ["ops-dashboard", "map-dashboard"] {
        let mut d = v5::connect(&server, name).await;
        d.subscribe("fleet/+/telemetry/#", RQoS::AtMostOnce).await;
        dashboards.push(d);
    }
    // The alert service: a durable queue bound to the MQTT exchange, manual acks, prefetch 10.
    let (_conn, ch) = lapin_channel(&server).await;
    let qd = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare("fleet.alerts".into(), qd, FieldTable::default()).await.unwrap();
    ch.queue_bind(
        "fleet.alerts".into(),
        MQTT_EXCHANGE.into(),
        "fleet.*.alert.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    // Vehicles publish telemetry at QoS 0 and alerts at QoS 1 (each PUBACK means the alert is
    // stored in the durable queue).
    for v in 0..VEHICLES {
        let mut c = RawClient::connect_ok(server.mqtt_addr(), ProtocolVersion::V5, &format!("truck-{v}"), true).await;
        let mut id = 1;
        for t in 0..TELEMETRY {
            let topic = format!("fleet/truck-{v}/telemetry/speed");
            c.publish(publish_packet(&topic, QoS::AtMostOnce, 0, format!("{t}").as_bytes())).await;
            if t % (TELEMETRY / ALERTS) == 0 && id <= ALERTS as u16 {
                let topic = format!("fleet/truck-{v}/alert/overheat");
                c.publish(publish_packet(&topic, QoS::AtLeastOnce, id, format!("a{id}").as_bytes())).await;
                id += 1;
            }
        }
        c.ping().await;
    }

    for d in &mut dashboards {
        for _ in 0..VEHICLES * TELEMETRY {
            let p = d.publish_received().await;
            assert!(p.topic.starts_with(b"fleet/truck-") && p.topic.ends_with(b"/telemetry/speed"));
            assert_eq!(p.qos, RQoS::AtMostOnce);
        }
        d.no_publish().await;
    }

    within("basic.qos", ch.basic_qos(10, BasicQosOptions::default())).await.unwrap();
    let mut service = consume(&ch, "fleet.alerts", false).await;
    for _ in 0..VEHICLES * ALERTS {
        let d = next_delivery(&mut service).await;
        assert_eq!(*d.properties.delivery_mode(), Some(2), "QoS 1 alerts are persistent");
        assert!(d.routing_key.as_str().ends_with(".alert.overheat"), "{}", d.routing_key);
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    no_delivery(&mut service).await;
    // Nothing left: closing the channel would requeue anything unacknowledged; a passive
    // declare on a fresh channel sees an empty queue.
    within("channel.close", ch.close(200, "done".into())).await.unwrap();
    let (_conn2, ch2) = lapin_channel(&server).await;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let q = ch2.queue_declare("fleet.alerts".into(), passive, FieldTable::default()).await.unwrap();
    assert_eq!(q.message_count(), 0, "every alert acknowledged");
}
