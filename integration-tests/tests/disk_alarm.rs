//! The disk alarm: raised while store writes fail (a full or failing disk) or while the data
//! directory's free space is under `[broker] disk_free_limit_bytes`. While it is up, AMQP
//! publishers are blocked (connection.blocked "low on disk") and a publish whose store commit
//! failed is nacked; MQTT 5.0 QoS 1 publishes are answered PUBACK 0x97 and not routed (QoS 0
//! still goes); MQTT 3.1.1 publishers are not read. Consumers keep being served, and everything
//! resumes when the alarm clears.

use std::sync::Arc;
use std::time::Duration;

use ferry_amqp::AmqpFrontend;
use ferry_core::frontend::Frontend;
use ferry_core::store::Store;
use ferry_integration_tests::amqp::{assert_code, lapin, lapin_channel, AMQP_LISTENER, QUIET};
use ferry_integration_tests::mqtt::{v311, v5};
use ferry_integration_tests::{within, FailingStore, TestServer, TIMEOUT};
use futures_util::{Stream, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Event};
use rumqttc::v5::mqttbytes::v5::PubAckReason;

/// Housekeeping checks the alarms at least every second; raising or clearing one takes at most
/// two checks (a failing store clears on the check after the probe write that succeeded), so
/// about 2 s; the rest is slack for a loaded machine.
const ALARM_WAIT: Duration = Duration::from_secs(5);

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

async fn declare(ch: &Channel, name: &str, durable: bool) {
    let options = QueueDeclareOptions { durable, ..Default::default() };
    within("queue.declare", ch.queue_declare(name.into(), options, FieldTable::default())).await.unwrap();
}

/// Publishes and waits for the confirm.
async fn publish(ch: &Channel, queue: &str, body: &[u8], props: BasicProperties) -> Confirmation {
    within("publish and its confirm", async {
        ch.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, props).await?.await
    })
    .await
    .unwrap()
}

/// The next connection.blocked / unblocked lapin reports (other events skipped).
async fn next_block_event(events: &mut (impl Stream<Item = Event> + Unpin)) -> Event {
    within("connection.blocked / unblocked", async {
        loop {
            match events.next().await.expect("lapin's event stream") {
                e @ (Event::ConnectionBlocked(_) | Event::ConnectionUnblocked) => return e,
                Event::Error(e) => panic!("connection error: {e:?}"),
                _ => {}
            }
        }
    })
    .await
}

async fn expect_blocked(events: &mut (impl Stream<Item = Event> + Unpin), reason: &str) {
    match next_block_event(events).await {
        Event::ConnectionBlocked(r) => assert_eq!(r, reason),
        other => panic!("expected connection.blocked, got {other:?}"),
    }
}

async fn expect_unblocked(events: &mut (impl Stream<Item = Event> + Unpin)) {
    match next_block_event(events).await {
        Event::ConnectionUnblocked => {}
        other => panic!("expected connection.unblocked, got {other:?}"),
    }
}

/// Waits (bounded) until the disk alarm is `up`.
async fn disk_alarm_is(server: &TestServer, up: bool) {
    let mut rx = server.server.broker().disk().subscribe();
    let reached = tokio::time::timeout(ALARM_WAIT, async { rx.wait_for(|r| *r == up).await.is_ok() }).await;
    assert_eq!(reached, Ok(true), "the disk alarm is not {} after {ALARM_WAIT:?}", if up { "up" } else { "down" });
}

/// Sets the free-space minimum at run time: `u64::MAX` is more than any disk has free (the
/// alarm goes up), 0 turns the check off (it clears). The server's own probe stays.
async fn low_on_disk(server: &TestServer, low: bool) {
    server.server.broker().disk().watch_free_space(if low { u64::MAX } else { 0 }, Box::new(|| None));
    disk_alarm_is(server, low).await;
}

async fn amqp_on(store: &Arc<FailingStore>) -> TestServer {
    let frontend: Arc<dyn Frontend> = Arc::new(AmqpFrontend::default());
    TestServer::start_with_store(AMQP_LISTENER, &[frontend], store.clone()).await
}

// ----- AMQP: a failing store ---------------------------------------------------------------------

#[tokio::test]
async fn a_failing_store_nacks_blocks_the_publisher_serves_consumers_and_everything_resumes() {
    let store = FailingStore::new();
    let server = amqp_on(&store).await;
    let broker = server.server.broker().clone();

    // The publisher: confirms on, one persistent message stored and acked while the disk is fine.
    let publisher = lapin(&server).await;
    let mut events = publisher.events_listener();
    let pch = within("channel", publisher.create_channel()).await.unwrap();
    within("confirm.select", pch.confirm_select(ConfirmSelectOptions::default())).await.unwrap();
    declare(&pch, "durable", true).await;
    declare(&pch, "work", false).await;
    assert!(publish(&pch, "durable", b"before", persistent()).await.is_ack());
    // A backlog of transient messages for the consumer.
    for i in 0..3 {
        assert!(publish(&pch, "work", format!("job {i}").as_bytes(), BasicProperties::default()).await.is_ack());
    }

    // The disk fails: the persistent publish cannot be stored, so it is nacked...
    store.set_failing(true);
    let c = publish(&pch, "durable", b"during", persistent()).await;
    assert!(c.is_nack(), "a publish whose commit failed is nacked, got {c:?}");
    assert!(store.refused() >= 1);
    // ...and the failed write raises the disk alarm, which blocks the publishing connection.
    expect_blocked(&mut events, "low on disk").await;
    assert!(broker.disk().is_raised());
    assert!(!broker.memory().is_raised());
    assert!(publisher.status().blocked());

    // A consumer on another connection drains the backlog meanwhile (acks included).
    let (consumer, cch) = lapin_channel(&server).await;
    within("qos", cch.basic_qos(1, BasicQosOptions::default())).await.unwrap();
    let mut deliveries = within(
        "basic.consume",
        cch.basic_consume("work".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()),
    )
    .await
    .unwrap();
    for i in 0..3 {
        let d = within("a delivery while the alarm is up", deliveries.next()).await.expect("stream").expect("delivery");
        assert_eq!(d.data, format!("job {i}").as_bytes());
        within("ack", d.acker.ack(BasicAckOptions::default())).await.unwrap();
    }
    assert!(!consumer.status().blocked(), "a connection that does not publish is not blocked");
    assert!(broker.disk().is_raised(), "the alarm was up all along");

    // The disk recovers: the broker's probe write succeeds, the alarm clears, the publisher is
    // unblocked and its next persistent publish is stored and acked.
    store.set_failing(false);
    expect_unblocked(&mut events).await;
    assert!(!broker.disk().is_raised());
    assert!(publish(&pch, "durable", b"after", persistent()).await.is_ack());
    let snapshot = store.inner().recover().unwrap();
    let stored: Vec<_> =
        snapshot.messages[&("/".to_string(), "durable".into())].iter().map(|m| m.message.payload.clone()).collect();
    assert_eq!(stored, vec![&b"before"[..], &b"after"[..]], "the nacked message was never stored");
}

#[tokio::test]
async fn a_tx_commit_whose_messages_cannot_be_stored_fails_instead_of_commit_ok() {
    let store = FailingStore::new();
    let server = amqp_on(&store).await;
    let (conn, ch) = lapin_channel(&server).await;
    declare(&ch, "durable", true).await;
    within("tx.select", ch.tx_select()).await.unwrap();
    within("a transient publish", async {
        ch.basic_publish("".into(), "durable".into(), BasicPublishOptions::default(), b"t", BasicProperties::default())
            .await
    })
    .await
    .unwrap();
    within("commit", ch.tx_commit()).await.expect("a transaction of transient messages needs no disk");

    store.set_failing(true);
    within("a persistent publish", async {
        ch.basic_publish("".into(), "durable".into(), BasicPublishOptions::default(), b"p", persistent()).await
    })
    .await
    .unwrap();
    // RabbitMQ closes the channel of a transaction that did not complete: 406 "partial tx
    // completion".
    assert_code(within("commit", ch.tx_commit()).await, 406);
    store.set_failing(false);
    // The connection is fine: a new channel works once the alarm is down.
    disk_alarm_is(&server, false).await;
    let ch2 = within("channel", conn.create_channel()).await.unwrap();
    declare(&ch2, "durable", true).await;
}

// ----- AMQP: the free-space watermark ---------------------------------------------------------------

#[tokio::test]
async fn a_free_space_limit_above_the_free_space_raises_the_alarm_and_blocks_publishers() {
    let frontend: Arc<dyn Frontend> = Arc::new(AmqpFrontend::default());
    let config = format!("[broker]\ndisk_free_limit_bytes = {}\n{AMQP_LISTENER}", free_limit_above_any_disk());
    let server = TestServer::start(&config, &[frontend]).await;
    let broker = server.server.broker().clone();
    // Checked on start-up's first housekeeping tick, at the latest a second later.
    disk_alarm_is(&server, true).await;
    assert!(broker.disk().free() < u64::MAX, "the data directory's free space was measured");
    assert!(!broker.memory().is_raised());

    let publisher = lapin(&server).await;
    let mut events = publisher.events_listener();
    let ch = within("channel", publisher.create_channel()).await.unwrap();
    within("confirm.select", ch.confirm_select(ConfirmSelectOptions::default())).await.unwrap();
    declare(&ch, "q", false).await;
    // A connection is held back once it publishes: its first publish goes through.
    assert!(publish(&ch, "q", b"first", BasicProperties::default()).await.is_ack());
    expect_blocked(&mut events, "low on disk").await;
    // lapin itself holds the publish back while blocked (it writes nothing), so it runs in a task.
    let held = tokio::spawn({
        let ch = ch.clone();
        async move { publish(&ch, "q", b"second", BasicProperties::default()).await }
    });
    let queue = broker.vhost("/").unwrap().queue("q").unwrap();
    // Bounded "nothing happens" check: the held publish is neither confirmed nor queued.
    tokio::time::sleep(QUIET).await;
    assert!(!held.is_finished(), "no confirm while blocked");
    assert_eq!(queue.stats().ready, 1);

    // Space comes back (here: the limit is lowered): unblocked, and the held publish lands.
    low_on_disk(&server, false).await;
    expect_unblocked(&mut events).await;
    assert!(within("the held publish's confirm", held).await.unwrap().is_ack());
    assert_eq!(queue.stats().ready, 2);
}

/// More free bytes than any disk has. The brief's `u64::MAX` (18446744073709551615) is not a
/// TOML integer (TOML integers are signed 64-bit), so the largest one is used.
fn free_limit_above_any_disk() -> i64 {
    i64::MAX
}

// ----- MQTT ----------------------------------------------------------------------------------------

/// Waits for the PUBACK of the last QoS 1 publish and returns its reason.
async fn puback_reason(c: &mut v5::Client) -> PubAckReason {
    c.expect("PUBACK", |p| match p {
        v5::Incoming::PubAck(a) => Some(a.reason),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn mqtt5_qos1_publishes_get_quota_exceeded_while_the_disk_alarm_is_up_and_qos0_still_go() {
    let server = TestServer::mqtt().await;
    let mut subscriber = v5::connect(&server, "disk-sub").await;
    subscriber.subscribe("disk/#", v5::QoSOf::AtLeastOnce).await;
    let mut publisher = v5::connect(&server, "disk-pub").await;
    publisher.client.publish("disk/a", v5::QoSOf::AtLeastOnce, false, "before").await.unwrap();
    assert_eq!(puback_reason(&mut publisher).await, PubAckReason::Success);
    assert_eq!(&subscriber.publish_received().await.payload[..], b"before");

    low_on_disk(&server, true).await;
    publisher.client.publish("disk/a", v5::QoSOf::AtLeastOnce, false, "refused").await.unwrap();
    assert_eq!(puback_reason(&mut publisher).await, PubAckReason::QuotaExceeded);
    subscriber.no_publish().await;
    // QoS 0 is never stored: it is still routed.
    publisher.client.publish("disk/a", v5::QoSOf::AtMostOnce, false, "qos0").await.unwrap();
    assert_eq!(&subscriber.publish_received().await.payload[..], b"qos0");

    low_on_disk(&server, false).await;
    publisher.client.publish("disk/a", v5::QoSOf::AtLeastOnce, false, "after").await.unwrap();
    assert_eq!(puback_reason(&mut publisher).await, PubAckReason::Success);
    assert_eq!(&subscriber.publish_received().await.payload[..], b"after");
    publisher.client.publish("nobody/listens", v5::QoSOf::AtLeastOnce, false, "x").await.unwrap();
    assert_eq!(puback_reason(&mut publisher).await, PubAckReason::NoMatchingSubscribers);
}

#[tokio::test]
async fn an_mqtt311_publisher_is_held_while_the_disk_alarm_is_up_and_acked_when_it_clears() {
    let server = TestServer::mqtt().await;
    let mut subscriber = v311::connect(&server, "disk-sub-311").await;
    subscriber.subscribe("disk/#", v311::QoSOf::AtLeastOnce).await;
    let mut publisher = v311::connect(&server, "disk-pub-311").await;
    publisher.publish("disk/a", v311::QoSOf::AtLeastOnce, false, b"before").await;
    assert_eq!(&subscriber.publish_received().await.payload[..], b"before");

    low_on_disk(&server, true).await;
    publisher.client.publish("disk/a", v311::QoSOf::AtLeastOnce, false, b"held".to_vec()).await.unwrap();
    // Bounded "nothing happens" check: the connection is not read, so no PUBACK and no routing.
    let puback = publisher.expect("PUBACK", |p| matches!(p, v311::Incoming::PubAck(_)).then_some(()));
    assert!(tokio::time::timeout(QUIET * 2, puback).await.is_err(), "no PUBACK while the alarm is up");
    subscriber.no_publish().await;

    low_on_disk(&server, false).await;
    within(
        "the PUBACK after the alarm cleared",
        publisher.expect("PUBACK", |p| matches!(p, v311::Incoming::PubAck(_)).then_some(())),
    )
    .await;
    assert_eq!(&subscriber.publish_received().await.payload[..], b"held");
    // And the connection is read as before.
    tokio::time::timeout(TIMEOUT, publisher.publish("disk/a", v311::QoSOf::AtLeastOnce, false, b"again"))
        .await
        .expect("a publish after the alarm");
    assert_eq!(&subscriber.publish_received().await.payload[..], b"again");
}
