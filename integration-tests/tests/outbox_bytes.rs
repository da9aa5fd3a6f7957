//! The outbox's byte bound (issue 18): a clean-session subscriber's outbox is full at
//! `outbox_bytes` as well as at 1,000 messages, and its publishers wait for it. Bounding by
//! bytes must cost no message: a subscriber that keeps up receives every QoS 1 message of a
//! flood, in order, and no QoS 0 message of one publisher's flood is dropped for it.

use std::sync::atomic::Ordering;

use ferry_integration_tests::mqtt::v311;
use ferry_integration_tests::{within, TestServer};

/// 1 KiB, the least `outbox_bytes` takes: every 4 KiB message fills the outbox alone, so the
/// publisher is held back by bytes at every message past the first.
const LISTENER: &str = "outbox_bytes = 1024\n";
const MESSAGES: u32 = 3_000;

fn numbered(i: u32) -> Vec<u8> {
    let mut body = vec![0x5a; 4096];
    body[..4].copy_from_slice(&i.to_be_bytes());
    body
}

fn dropped(server: &TestServer) -> u64 {
    server.server.broker().vhost("/").expect("vhost").stats().dropped_at_sinks.load(Ordering::Relaxed)
}

#[tokio::test]
async fn a_subscriber_receives_every_message_of_a_qos1_flood_held_back_by_bytes() {
    let server = TestServer::mqtt_with(LISTENER).await;
    let mut sub = v311::connect(&server, "flood-sub").await;
    sub.subscribe("flood/1", rumqttc::QoS::AtLeastOnce).await;
    let publisher = v311::connect(&server, "flood-pub").await;
    let p = publisher.client.clone();
    let sending = tokio::spawn(async move {
        for i in 0..MESSAGES {
            p.publish("flood/1", rumqttc::QoS::AtLeastOnce, false, numbered(i)).await.expect("publish request");
        }
    });
    for i in 0..MESSAGES {
        let m = sub.publish_received().await;
        assert_eq!(u32::from_be_bytes(m.payload[..4].try_into().unwrap()), i, "in order, none lost");
        assert_eq!(m.payload.len(), 4096);
    }
    within("the publisher is done", sending).await.unwrap();
    assert_eq!(dropped(&server), 0);
}

#[tokio::test]
async fn one_publishers_qos0_flood_is_held_back_not_dropped_for_a_subscriber_that_keeps_up() {
    let server = TestServer::mqtt_with(LISTENER).await;
    let mut sub = v311::connect(&server, "flood0-sub").await;
    sub.subscribe("flood/0", rumqttc::QoS::AtMostOnce).await;
    let publisher = v311::connect(&server, "flood0-pub").await;
    let p = publisher.client.clone();
    let sending = tokio::spawn(async move {
        for i in 0..MESSAGES {
            p.publish("flood/0", rumqttc::QoS::AtMostOnce, false, numbered(i)).await.expect("publish request");
        }
    });
    for i in 0..MESSAGES {
        let m = sub.publish_received().await;
        assert_eq!(u32::from_be_bytes(m.payload[..4].try_into().unwrap()), i, "in order, none dropped");
    }
    within("the publisher is done", sending).await.unwrap();
    assert_eq!(dropped(&server), 0, "the subscriber kept up: its publisher waited instead");
}
