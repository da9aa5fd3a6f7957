//! AMQP channel and connection errors through the real frontend: a channel error closes only its
//! channel with the right reply code while the other channels and the connection keep working;
//! methods on channels that are not open are connection errors; channel.flow.

use ferry_amqp::codec::{reply_code, ChannelClose, Method, QueueDeclare};
use ferry_core::message::ShortString;
use ferry_integration_tests::amqp::{
    args, assert_closed_after_async, assert_code, lapin, lapin_channel, RawClient, QUIET,
};
use ferry_integration_tests::{within, TestServer};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ChannelFlowOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, ExchangeKind};

async fn declare(ch: &Channel, name: &str, options: QueueDeclareOptions) -> Result<lapin::Queue, lapin::Error> {
    within("queue.declare", ch.queue_declare(name.into(), options, FieldTable::default())).await
}

/// The channel is closed (by the server) and another channel on the same connection still works.
async fn only_the_channel_closed(conn: &lapin::Connection, closed: &Channel) {
    let r = declare(closed, "", QueueDeclareOptions::default()).await;
    assert!(r.is_err(), "the failed channel is closed: {r:?}");
    let other = within("another channel", conn.create_channel()).await.expect("the connection still works");
    declare(&other, "", QueueDeclareOptions::default()).await.expect("another channel still works");
}

#[tokio::test]
async fn passive_declare_of_a_missing_queue_closes_the_channel_with_404() {
    let server = TestServer::amqp().await;
    let (conn, ch) = lapin_channel(&server).await;
    let bystander = within("channel", conn.create_channel()).await.unwrap();
    assert_code(declare(&ch, "missing", QueueDeclareOptions { passive: true, ..Default::default() }).await, 404);
    declare(&bystander, "", QueueDeclareOptions::default()).await.expect("a channel opened before still works");
    only_the_channel_closed(&conn, &ch).await;
}

#[tokio::test]
async fn consume_from_a_queue_with_an_exclusive_consumer_closes_the_channel_with_403() {
    let server = TestServer::amqp().await;
    let (conn, ch) = lapin_channel(&server).await;
    declare(&ch, "excl-consumed", QueueDeclareOptions::default()).await.unwrap();
    let _first = within(
        "exclusive consume",
        ch.basic_consume(
            "excl-consumed".into(),
            "".into(),
            BasicConsumeOptions { exclusive: true, ..Default::default() },
            FieldTable::default(),
        ),
    )
    .await
    .unwrap();
    let ch2 = within("channel", conn.create_channel()).await.unwrap();
    let second = within(
        "second consume",
        ch2.basic_consume("excl-consumed".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()),
    )
    .await;
    assert_code(second.map(|_| ()), 403);
    only_the_channel_closed(&conn, &ch2).await;
    declare(&ch, "", QueueDeclareOptions::default()).await.expect("the exclusive consumer's channel is untouched");
}

#[tokio::test]
async fn another_connections_exclusive_queue_closes_the_channel_with_405() {
    let server = TestServer::amqp().await;
    let (_owner_conn, owner) = lapin_channel(&server).await;
    declare(&owner, "mine", QueueDeclareOptions { exclusive: true, ..Default::default() }).await.unwrap();
    let (conn, ch) = lapin_channel(&server).await;
    assert_code(declare(&ch, "mine", QueueDeclareOptions { exclusive: true, ..Default::default() }).await, 405);
    only_the_channel_closed(&conn, &ch).await;
    let ch2 = within("channel", conn.create_channel()).await.unwrap();
    let consume = within(
        "consume",
        ch2.basic_consume("mine".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()),
    )
    .await;
    assert_code(consume.map(|_| ()), 405);
}

#[tokio::test]
async fn redeclare_with_other_properties_closes_the_channel_with_406() {
    let server = TestServer::amqp().await;
    let (conn, ch) = lapin_channel(&server).await;
    declare(&ch, "shape", QueueDeclareOptions::default()).await.unwrap();
    assert_code(declare(&ch, "shape", QueueDeclareOptions { durable: true, ..Default::default() }).await, 406);
    only_the_channel_closed(&conn, &ch).await;
    let ch2 = within("channel", conn.create_channel()).await.unwrap();
    let r = within(
        "declare with another x-max-length",
        ch2.queue_declare(
            "shape".into(),
            QueueDeclareOptions::default(),
            args(&[("x-max-length", AMQPValue::LongInt(5))]),
        ),
    )
    .await;
    assert_code(r, 406);
}

#[tokio::test]
async fn unknown_exchange_type_closes_the_channel_with_406() {
    let server = TestServer::amqp().await;
    let (conn, ch) = lapin_channel(&server).await;
    let r = within(
        "exchange.declare",
        ch.exchange_declare(
            "odd".into(),
            ExchangeKind::Custom("x-no-such-type".into()),
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_code(r, 406);
    only_the_channel_closed(&conn, &ch).await;
}

#[tokio::test]
async fn declaring_a_reserved_amq_exchange_closes_the_channel_with_403() {
    let server = TestServer::amqp().await;
    let (conn, ch) = lapin_channel(&server).await;
    let r = within(
        "exchange.declare",
        ch.exchange_declare(
            "amq.mine".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_code(r, 403);
    only_the_channel_closed(&conn, &ch).await;
}

#[tokio::test]
async fn publish_to_a_missing_exchange_closes_the_channel_with_404() {
    let server = TestServer::amqp().await;
    let (conn, ch) = lapin_channel(&server).await;
    within(
        "publish",
        ch.basic_publish(
            "nowhere".into(),
            "k".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        ),
    )
    .await
    .unwrap();
    // basic.publish has no reply: the channel.close arrives while the next method waits.
    assert_closed_after_async(declare(&ch, "", QueueDeclareOptions::default()).await, 404);
    only_the_channel_closed(&conn, &ch).await;
}

#[tokio::test]
async fn method_on_a_channel_never_opened_closes_the_connection_with_504() {
    let server = TestServer::amqp().await;
    let mut c = RawClient::connect(server.amqp_addr()).await;
    c.open_channel(1).await;
    c.send_method(5, Method::QueueDeclare(QueueDeclare::default())).await;
    let close = c.expect_connection_close().await;
    assert_eq!(close.reply_code, reply_code::CHANNEL_ERROR, "{close:?}");
}

#[tokio::test]
async fn method_on_a_closed_channel_closes_the_connection_with_504() {
    let server = TestServer::amqp().await;
    let mut c = RawClient::connect(server.amqp_addr()).await;
    c.open_channel(1).await;
    let close = ChannelClose { reply_code: 200, reply_text: ShortString::from("done"), class_id: 0, method_id: 0 };
    c.send_method(1, Method::ChannelClose(close)).await;
    assert!(matches!(c.recv_method().await, (1, Method::ChannelCloseOk(_))));
    c.send_method(1, Method::QueueDeclare(QueueDeclare::default())).await;
    assert_eq!(c.expect_connection_close().await.reply_code, reply_code::CHANNEL_ERROR);
}

#[tokio::test]
async fn channel_close_and_reopen_with_lapin() {
    let server = TestServer::amqp().await;
    let conn = lapin(&server).await;
    for _ in 0..3 {
        let ch = within("open", conn.create_channel()).await.unwrap();
        declare(&ch, "", QueueDeclareOptions::default()).await.unwrap();
        within("close", ch.close(200, "bye".into())).await.unwrap();
    }
    assert!(conn.status().connected());
}

#[tokio::test]
async fn channel_flow_off_holds_deliveries_until_flow_on() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    declare(&ch, "flowq", QueueDeclareOptions::default()).await.unwrap();
    let mut consumer = within(
        "consume",
        ch.basic_consume("flowq".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()),
    )
    .await
    .unwrap();
    let active = within("flow off", ch.channel_flow(ChannelFlowOptions { active: false })).await.unwrap();
    assert!(!active, "flow-ok echoes active=false");
    within(
        "publish",
        ch.basic_publish(
            "".into(),
            "flowq".into(),
            BasicPublishOptions::default(),
            b"held",
            BasicProperties::default(),
        ),
    )
    .await
    .unwrap();
    // Bounded "nothing arrives" check.
    assert!(tokio::time::timeout(QUIET, consumer.next()).await.is_err(), "nothing is delivered while flow is off");
    assert!(within("flow on", ch.channel_flow(ChannelFlowOptions { active: true })).await.unwrap());
    let d = within("delivery after flow on", consumer.next()).await.expect("stream").expect("delivery");
    assert_eq!(d.data, b"held");
}
