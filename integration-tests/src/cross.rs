//! Helpers for the cross-protocol tests: ONE broker with an MQTT listener (listener 0) and an
//! AMQP listener (listener 1) on the same vhost `/`, so MQTT clients and AMQP clients meet on
//! the MQTT exchange (`amq.topic` unless the MQTT listener sets `mqtt_exchange`).

use std::sync::Arc;

use bytes::Bytes;
use ferry_amqp::AmqpFrontend;
use ferry_core::frontend::Frontend;
use ferry_mqtt::MqttFrontend;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Consumer};
use rumqttc::v5::mqttbytes::v5::PublishProperties;

use crate::amqp::{AMQP_LISTENER, QUIET};
use crate::mqtt::v5;
use crate::mqtt::MQTT_LISTENER;
use crate::{within, TestServer};

/// The exchange MQTT listeners use unless configured otherwise.
pub const MQTT_EXCHANGE: &str = "amq.topic";

impl TestServer {
    /// One broker, both protocols: MQTT on listener 0, AMQP on listener 1, vhost `/`, MQTT
    /// exchange `amq.topic`. [`TestServer::mqtt_addr`] and [`TestServer::amqp_addr`] find them.
    pub async fn both() -> TestServer {
        TestServer::both_with("", "").await
    }

    /// [`TestServer::both`] with extra keys for the MQTT listener (`mqtt_exchange = "iot"\n`)
    /// and for the AMQP listener.
    pub async fn both_with(mqtt_keys: &str, amqp_keys: &str) -> TestServer {
        let frontends: [Arc<dyn Frontend>; 2] = [Arc::new(MqttFrontend::default()), Arc::new(AmqpFrontend::default())];
        TestServer::start(&format!("{MQTT_LISTENER}{mqtt_keys}{AMQP_LISTENER}{amqp_keys}"), &frontends).await
    }
}

// ----- AMQP side (lapin) -------------------------------------------------------------------------

/// Declares a server-named, exclusive queue bound to `exchange` with each of `keys`; returns its
/// name.
pub async fn bound_queue(ch: &Channel, exchange: &str, keys: &[&str]) -> String {
    let options = QueueDeclareOptions { exclusive: true, ..Default::default() };
    let q = within("queue.declare", ch.queue_declare("".into(), options, FieldTable::default())).await.unwrap();
    let name = q.name().to_string();
    for key in keys {
        within(
            "queue.bind",
            ch.queue_bind(
                name.as_str().into(),
                exchange.into(),
                (*key).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
        .unwrap();
    }
    name
}

/// Starts a consumer on `queue` (no-ack when `no_ack`).
pub async fn consume(ch: &Channel, queue: &str, no_ack: bool) -> Consumer {
    let options = BasicConsumeOptions { no_ack, ..Default::default() };
    within("basic.consume", ch.basic_consume(queue.into(), "".into(), options, FieldTable::default())).await.unwrap()
}

/// The next delivery (fails the test after [`crate::TIMEOUT`]).
pub async fn next_delivery(c: &mut Consumer) -> Delivery {
    within("an AMQP delivery", c.next()).await.expect("consumer stream open").expect("delivery")
}

/// Asserts no delivery arrives within [`QUIET`] (a bounded "nothing arrives" check).
pub async fn no_delivery(c: &mut Consumer) {
    if let Ok(d) = tokio::time::timeout(QUIET, c.next()).await {
        panic!("unexpected delivery {d:?}");
    }
}

/// basic.publish, awaited until the client has written it (and confirmed, in confirm mode).
pub async fn amqp_publish(ch: &Channel, exchange: &str, key: &str, body: &[u8], props: BasicProperties) {
    within("basic.publish", async {
        ch.basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), body, props).await?.await
    })
    .await
    .expect("basic.publish");
}

// ----- MQTT side (rumqttc 5) ---------------------------------------------------------------------

/// Publishes with MQTT 5 properties and waits for the acknowledgement its QoS gets.
pub async fn mqtt5_publish(
    c: &mut v5::Client,
    topic: &str,
    qos: v5::QoSOf,
    retain: bool,
    payload: impl Into<Bytes>,
    properties: PublishProperties,
) {
    c.client.publish_with_properties(topic, qos, retain, payload.into(), properties).await.expect("publish request");
    c.published(qos).await;
}
