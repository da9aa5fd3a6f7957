//! Publisher flow control is one component for both protocols (`ferry_core::flow`, issue 15):
//! a publisher that finds a subscriber congested stops decoding at that publish, whether it
//! speaks MQTT or AMQP. Before, the AMQP driver went on handling the rest of what it had read,
//! so one read of an AMQP publisher could overrun a congested MQTT subscriber by as many
//! publishes as the read held.
//!
//! What is counted is how far past its outbox's capacity a subscriber that never reads was
//! filled: it takes the publish that finds it full, then the publisher is held for a pause;
//! the subscriber, found not draining, is lagging from then on, and every later message for it
//! is dropped past `max_queued_messages` (its capacity here), so nothing that came after the
//! hold adds to its outbox. No timing is measured: counts only, waits bounded by timeouts.

use std::sync::Arc;

use ferry_core::exchange::Destination;
use ferry_core::sink::DirectSink;
use ferry_integration_tests::amqp::lapin_channel;
use ferry_integration_tests::cross::{bound_queue, consume, next_delivery, MQTT_EXCHANGE};
use ferry_integration_tests::mqtt::{packet_bytes, publish_packet, sub_options, v311, RawClient};
use ferry_integration_tests::{within, TestServer};
use ferry_mqtt::codec::{Packet, ProtocolVersion, QoS};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::BasicProperties;

const V311: ProtocolVersion = ProtocolVersion::V311;
/// Messages each publisher sends to the stuck subscriber's topic: well past what it can hold
/// (its inflight window, one batch waiting for the window, its outbox of 1,000).
const HELD: u16 = 4_000;
/// One message in this many goes to the bystanders' topic instead.
const EVERY: u16 = 10;

/// A clean-session subscriber of `filter` at QoS 1 that never reads a byte after its SUBACK
/// (nor acknowledges): its inflight window fills, then its outbox.
async fn stuck_subscriber(server: &TestServer, id: &str, filter: &str) -> RawClient {
    let mut c = RawClient::connect_ok(server.mqtt_addr(), V311, id, true).await;
    c.subscribe(1, filter, sub_options(QoS::AtLeastOnce)).await;
    c
}

/// The direct sink bound to `amq.topic` with routing key `key` (the stuck subscriber's).
fn sink_bound_to(server: &TestServer, key: &str) -> Arc<DirectSink> {
    let vhost = server.server.broker().vhost("/").expect("vhost /");
    let exchange = vhost.exchange(MQTT_EXCHANGE).expect("amq.topic");
    let mut sinks = exchange.bindings().into_iter().filter_map(|b| match b.destination {
        Destination::Sink(s) if b.key.routing_key.as_str() == Some(key) => Some(s.sink),
        _ => None,
    });
    let sink = sinks.next().expect("the stuck subscriber's binding");
    assert!(sinks.next().is_none(), "one subscriber of {key}");
    sink
}

/// Messages dropped for lagging subscribers so far (the vhost's count).
fn sink_drops(server: &TestServer) -> u64 {
    let vhost = server.server.broker().vhost("/").expect("vhost /");
    vhost.stats().dropped_at_sinks.load(std::sync::atomic::Ordering::Relaxed)
}

/// How far past its capacity the stuck subscriber's outbox was filled; checks it was congested
/// at all (`dropped` messages were dropped since it subscribed, and it is the only subscriber
/// that can lag), or the count proves nothing.
fn overrun(sink: &DirectSink, dropped: u64) -> usize {
    let (len, capacity) = (sink.outbox().len(), sink.outbox().capacity());
    assert!(dropped > 0, "the stuck subscriber never filled up ({len} of {capacity} waiting)");
    len.saturating_sub(capacity)
}

fn topic_of(i: u16, held: &'static str) -> &'static str {
    if i.is_multiple_of(EVERY) {
        "other/t"
    } else {
        held
    }
}

/// An MQTT subscriber that does not read holds back an AMQP publisher (lapin, publisher
/// confirms) exactly as it holds back an MQTT publisher: each stops at the publish that found
/// it full, so it is filled one message past its outbox, not by the rest of a read. An MQTT
/// subscriber and an AMQP consumer of another topic get every message the held publishers
/// send them, in order.
#[tokio::test]
async fn an_amqp_publisher_is_held_back_by_a_congested_mqtt_subscriber_as_an_mqtt_publisher_is() {
    let server = TestServer::both().await;
    // The bystanders: an MQTT subscriber and an AMQP consumer of `other/t`.
    let mut healthy = v311::connect(&server, "healthy").await;
    healthy.subscribe("other/t", rumqttc::QoS::AtLeastOnce).await;
    let (_consumer_conn, consumer_ch) = lapin_channel(&server).await;
    let queue = bound_queue(&consumer_ch, MQTT_EXCHANGE, &["other.t"]).await;
    let mut consumer = consume(&consumer_ch, &queue, true).await;
    let persistent = BasicProperties::default().with_delivery_mode(2);

    // An AMQP publisher, pipelining persistent messages with publisher confirms.
    let _stuck_a = stuck_subscriber(&server, "stuck-a", "held/amqp").await;
    let drops = sink_drops(&server);
    let (_publisher_conn, ch) = lapin_channel(&server).await;
    within("confirm.select", ch.confirm_select(ConfirmSelectOptions::default())).await.unwrap();
    // All handed to lapin at once, so that they reach the broker in large reads.
    let messages: Vec<(String, [u8; 2])> =
        (0..HELD).map(|i| (topic_of(i, "held/amqp").replace('/', "."), i.to_be_bytes())).collect();
    let publishes = messages.iter().map(|(key, body)| {
        let options = BasicPublishOptions::default();
        ch.basic_publish(MQTT_EXCHANGE.into(), key.as_str().into(), options, body, persistent.clone())
    });
    let confirms = within("every basic.publish", futures_util::future::join_all(publishes)).await;
    let confirms = confirms.into_iter().map(|c| c.expect("basic.publish"));
    let confirmed = within("every confirm", futures_util::future::join_all(confirms)).await;
    for c in confirmed {
        assert!(c.expect("confirm").is_ack(), "a message dropped for a lagging subscriber is still confirmed");
    }
    let amqp_overrun = overrun(&sink_bound_to(&server, "held.amqp"), sink_drops(&server) - drops);

    // An MQTT publisher in the same situation: QoS 1 publishes, all in one write.
    let _stuck_m = stuck_subscriber(&server, "stuck-m", "held/mqtt").await;
    let drops = sink_drops(&server);
    let mut publisher = RawClient::connect_ok(server.mqtt_addr(), V311, "publisher", true).await;
    let mut burst = Vec::new();
    for i in 0..HELD {
        let p = publish_packet(topic_of(i, "held/mqtt"), QoS::AtLeastOnce, i + 1, &i.to_be_bytes());
        burst.extend(packet_bytes(&Packet::Publish(p), V311));
    }
    publisher.send_bytes(&burst).await;
    for i in 0..HELD {
        let id = publisher.expect("PUBACK", |p| if let Packet::PubAck(a) = p { Some(a.packet_id) } else { None }).await;
        assert_eq!(id, i + 1, "PUBACKs in order");
    }
    let mqtt_overrun = overrun(&sink_bound_to(&server, "held.mqtt"), sink_drops(&server) - drops);

    assert_eq!(mqtt_overrun, 1, "the MQTT publisher stops decoding at the publish that found the subscriber full");
    assert_eq!(
        amqp_overrun, mqtt_overrun,
        "the AMQP publisher overran the congested MQTT subscriber by {amqp_overrun} messages, the MQTT one by {mqtt_overrun}"
    );

    // The bystanders got every message of theirs from both publishers, in order: the AMQP
    // publisher's first, then the MQTT publisher's.
    let expected: Vec<u16> = (0..HELD).filter(|i| i.is_multiple_of(EVERY)).collect();
    for from in ["AMQP", "MQTT"] {
        for &i in &expected {
            let m = healthy.publish_received().await;
            assert_eq!(m.payload.as_ref(), i.to_be_bytes(), "MQTT subscriber, message {i} from the {from} publisher");
            let d = next_delivery(&mut consumer).await;
            assert_eq!(d.data, i.to_be_bytes(), "AMQP consumer, message {i} from the {from} publisher");
        }
    }
}
