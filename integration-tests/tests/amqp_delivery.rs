//! AMQP delivery through the real frontend: consume / cancel, prefetch, consumer priority,
//! cancel notification, get, ack / nack / reject / recover, mandatory returns, immediate,
//! publisher confirms, transactions, direct reply-to, dead-lettering, TTL and max-length.

use std::time::{Duration, Instant};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{BasicConsumeArguments, BasicPublishArguments, ConfirmSelectArguments, QueueDeclareArguments};
use async_trait::async_trait;
use ferry_amqp::codec::{reply_code, BasicPublish, Method};
use ferry_amqp::connection::Settings;
use ferry_core::message::ShortString;
use ferry_integration_tests::amqp::{
    amqprs_args, amqprs_open, args, assert_closed_after_async, assert_code, lapin_channel, RawClient, QUIET,
};
use ferry_integration_tests::{within, TestServer};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, BasicRecoverOptions, BasicRejectOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Consumer};
use tokio::sync::mpsc;

const REPLY_TO: &str = "amq.rabbitmq.reply-to";

async fn queue_with(ch: &Channel, name: &str, arguments: FieldTable) {
    within("queue.declare", ch.queue_declare(name.into(), QueueDeclareOptions::default(), arguments)).await.unwrap();
}

async fn queue(ch: &Channel, name: &str) {
    queue_with(ch, name, FieldTable::default()).await
}

async fn publish_with(ch: &Channel, x: &str, key: &str, body: &[u8], props: BasicProperties) -> Confirmation {
    within("basic.publish", async {
        ch.basic_publish(x.into(), key.into(), BasicPublishOptions::default(), body, props).await?.await
    })
    .await
    .unwrap()
}

async fn publish(ch: &Channel, key: &str, body: &[u8]) -> Confirmation {
    publish_with(ch, "", key, body, BasicProperties::default()).await
}

async fn consume(ch: &Channel, q: &str, options: BasicConsumeOptions, arguments: FieldTable) -> Consumer {
    within("basic.consume", ch.basic_consume(q.into(), "".into(), options, arguments)).await.unwrap()
}

async fn next(c: &mut Consumer) -> Delivery {
    within("a delivery", c.next()).await.expect("consumer stream open").expect("delivery")
}

/// Bounded "nothing arrives" check.
async fn nothing_more(c: &mut Consumer) {
    if let Ok(d) = tokio::time::timeout(QUIET, c.next()).await {
        panic!("unexpected delivery {d:?}");
    }
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

#[tokio::test]
async fn consume_gets_a_server_generated_tag_and_the_published_messages_in_order() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    queue(&ch, "in-order").await;
    let mut c =
        consume(&ch, "in-order", BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
            .await;
    assert!(c.tag().as_str().starts_with("amq.ctag-"), "{}", c.tag());
    for i in 0..5u8 {
        publish(&ch, "in-order", &[i]).await;
    }
    for i in 0..5u8 {
        let d = next(&mut c).await;
        assert_eq!((d.data.as_slice(), d.redelivered, d.routing_key.as_str()), (&[i][..], false, "in-order"));
    }
}

#[tokio::test]
async fn basic_cancel_stops_deliveries() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    queue(&ch, "cancelled").await;
    let mut c =
        consume(&ch, "cancelled", BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
            .await;
    publish(&ch, "cancelled", b"1").await;
    next(&mut c).await;
    within("cancel", ch.basic_cancel(c.tag(), BasicCancelOptions::default())).await.unwrap();
    publish(&ch, "cancelled", b"2").await;
    let got = within("get", ch.basic_get("cancelled".into(), BasicGetOptions { no_ack: true })).await.unwrap();
    assert_eq!(got.expect("the message stayed in the queue").delivery.data, b"2");
}

#[tokio::test]
async fn per_consumer_prefetch_of_2_delivers_2_until_acked() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    queue(&ch, "pf").await;
    within("qos", ch.basic_qos(2, BasicQosOptions { global: false })).await.unwrap();
    for i in 0..4u8 {
        publish(&ch, "pf", &[i]).await;
    }
    let mut c = consume(&ch, "pf", BasicConsumeOptions::default(), FieldTable::default()).await;
    let _a = next(&mut c).await;
    let b = next(&mut c).await;
    nothing_more(&mut c).await;
    within("ack", b.acker.ack(BasicAckOptions::default())).await.unwrap();
    assert_eq!(next(&mut c).await.data, [2]);
    nothing_more(&mut c).await;
}

#[tokio::test]
async fn global_prefetch_limits_the_whole_channel() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    queue(&ch, "g1").await;
    queue(&ch, "g2").await;
    within("qos", ch.basic_qos(2, BasicQosOptions { global: true })).await.unwrap();
    for i in 0..3u8 {
        publish(&ch, "g1", &[i]).await;
        publish(&ch, "g2", &[i]).await;
    }
    let mut c1 = consume(&ch, "g1", BasicConsumeOptions::default(), FieldTable::default()).await;
    let mut c2 = consume(&ch, "g2", BasicConsumeOptions::default(), FieldTable::default()).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        tokio::select! {
            d = next(&mut c1) => got.push(d),
            d = next(&mut c2) => got.push(d),
        }
    }
    nothing_more(&mut c1).await;
    nothing_more(&mut c2).await;
    within("ack all", ch.basic_ack(0, BasicAckOptions { multiple: true })).await.unwrap();
    tokio::select! {
        _ = next(&mut c1) => {}
        _ = next(&mut c2) => {}
    }
}

#[tokio::test]
async fn higher_x_priority_consumer_gets_messages_first() {
    let server = TestServer::amqp().await;
    let (conn, ch) = lapin_channel(&server).await;
    queue(&ch, "prio").await;
    let low_ch = within("channel", conn.create_channel()).await.unwrap();
    let mut low =
        consume(&low_ch, "prio", BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
            .await;
    let mut high = consume(
        &ch,
        "prio",
        BasicConsumeOptions { no_ack: true, ..Default::default() },
        args(&[("x-priority", AMQPValue::LongInt(10))]),
    )
    .await;
    for i in 0..4u8 {
        publish(&ch, "prio", &[i]).await;
    }
    for i in 0..4u8 {
        assert_eq!(next(&mut high).await.data, [i]);
    }
    nothing_more(&mut low).await;
}

#[tokio::test]
async fn deleting_a_queue_sends_consumer_cancel_notification() {
    let server = TestServer::amqp().await;
    let (conn, ch) = lapin_channel(&server).await;
    queue(&ch, "doomed").await;
    let mut c = consume(&ch, "doomed", BasicConsumeOptions::default(), FieldTable::default()).await;
    let other = within("channel", conn.create_channel()).await.unwrap();
    within("delete", other.queue_delete("doomed".into(), QueueDeleteOptions::default())).await.unwrap();
    // lapin ends the consumer stream when the broker cancels it.
    assert!(within("stream ends", c.next()).await.is_none());
    within("channel still open", ch.queue_declare("".into(), QueueDeclareOptions::default(), FieldTable::default()))
        .await
        .unwrap();
}

#[tokio::test]
async fn get_returns_messages_with_the_remaining_count_then_get_empty() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    queue(&ch, "getq").await;
    for i in 0..3u8 {
        publish(&ch, "getq", &[i]).await;
    }
    for i in 0..3u8 {
        let m = within("get", ch.basic_get("getq".into(), BasicGetOptions { no_ack: false })).await.unwrap().unwrap();
        assert_eq!((m.delivery.data.as_slice(), m.message_count), (&[i][..], 2 - i as u32));
        within("ack", m.delivery.acker.ack(BasicAckOptions::default())).await.unwrap();
    }
    assert!(within("get-empty", ch.basic_get("getq".into(), BasicGetOptions::default())).await.unwrap().is_none());
}

#[tokio::test]
async fn ack_multiple_nack_multiple_with_requeue_and_reject_set_redelivered() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    queue(&ch, "settle").await;
    for i in 0..6u8 {
        publish(&ch, "settle", &[i]).await;
    }
    let mut c = consume(&ch, "settle", BasicConsumeOptions::default(), FieldTable::default()).await;
    let mut ds = Vec::new();
    for _ in 0..6 {
        ds.push(next(&mut c).await);
    }
    // Ack 0 and 1 with one multiple ack; nack 2 and 3 with requeue; reject 4 with requeue;
    // reject 5 without (dropped).
    within("ack multiple", ch.basic_ack(ds[1].delivery_tag, BasicAckOptions { multiple: true })).await.unwrap();
    within("nack multiple", ch.basic_nack(ds[3].delivery_tag, BasicNackOptions { multiple: true, requeue: true }))
        .await
        .unwrap();
    within("reject", ch.basic_reject(ds[4].delivery_tag, BasicRejectOptions { requeue: true })).await.unwrap();
    within("reject drop", ch.basic_reject(ds[5].delivery_tag, BasicRejectOptions { requeue: false })).await.unwrap();
    let mut again = Vec::new();
    for _ in 0..3 {
        let d = next(&mut c).await;
        assert!(d.redelivered, "requeued messages come back flagged");
        again.push(d.data[0]);
        within("ack", d.acker.ack(BasicAckOptions::default())).await.unwrap();
    }
    again.sort();
    assert_eq!(again, [2, 3, 4]);
    nothing_more(&mut c).await;
}

#[tokio::test]
async fn recover_requeues_unacked_deliveries_as_redelivered() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    queue(&ch, "recover").await;
    publish(&ch, "recover", b"r").await;
    let mut c = consume(&ch, "recover", BasicConsumeOptions::default(), FieldTable::default()).await;
    assert!(!next(&mut c).await.redelivered);
    within("recover", ch.basic_recover(BasicRecoverOptions { requeue: true })).await.unwrap();
    let d = next(&mut c).await;
    assert!(d.redelivered);
    assert_eq!(d.data, b"r");
}

#[tokio::test]
async fn mandatory_unroutable_publish_is_returned_with_312() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    within("confirm", ch.confirm_select(ConfirmSelectOptions::default())).await.unwrap();
    let confirmation = within("publish", async {
        ch.basic_publish(
            "amq.direct".into(),
            "nobody".into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            b"lost",
            BasicProperties::default(),
        )
        .await?
        .await
    })
    .await
    .unwrap();
    assert!(confirmation.is_ack(), "a returned message is still confirmed");
    let returned = confirmation.take_message().expect("basic.return");
    assert_eq!((returned.reply_code, returned.reply_text.as_str()), (312, "NO_ROUTE"));
    assert_eq!(returned.delivery.data, b"lost");
}

#[tokio::test]
async fn immediate_publish_closes_the_connection_with_540() {
    let server = TestServer::amqp().await;
    let mut c = RawClient::connect(server.amqp_addr()).await;
    c.open_channel(1).await;
    let p = BasicPublish { routing_key: ShortString::from("q"), immediate: true, ..BasicPublish::default() };
    c.send_method(1, Method::BasicPublish(p)).await;
    let close = c.expect_connection_close().await;
    assert_eq!((close.reply_code, close.class_id, close.method_id), (reply_code::NOT_IMPLEMENTED, 60, 40), "{close:?}");
}

#[tokio::test]
async fn ack_of_an_unknown_delivery_tag_closes_the_channel_with_406() {
    let server = TestServer::amqp().await;
    let (conn, ch) = lapin_channel(&server).await;
    queue(&ch, "twice").await;
    publish(&ch, "twice", b"x").await;
    let m = within("get", ch.basic_get("twice".into(), BasicGetOptions::default())).await.unwrap().unwrap();
    within("ack", ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())).await.unwrap();
    within("ack again", ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())).await.unwrap();
    let r = within("next", ch.queue_declare("".into(), QueueDeclareOptions::default(), FieldTable::default())).await;
    assert_closed_after_async(r, 406);
    let other = within("channel", conn.create_channel()).await.unwrap();
    queue(&other, "").await;
}

#[tokio::test]
async fn message_larger_than_a_frame_round_trips_in_several_body_frames() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    queue(&ch, "big").await;
    let body: Vec<u8> = (0..400_000u32).map(|i| (i % 251) as u8).collect();
    let mut c =
        consume(&ch, "big", BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default()).await;
    publish(&ch, "big", &body).await;
    assert!(next(&mut c).await.data == body, "the body arrives whole");
}

#[tokio::test]
async fn message_above_max_message_size_closes_the_channel_with_406() {
    let settings = Settings { max_message_size: 16, ..Settings::default() };
    let server = TestServer::amqp_with(settings, "").await;
    let (conn, ch) = lapin_channel(&server).await;
    queue(&ch, "small").await;
    publish(&ch, "small", &[0u8; 16]).await;
    within(
        "publish",
        ch.basic_publish(
            "".into(),
            "small".into(),
            BasicPublishOptions::default(),
            &[0u8; 17],
            BasicProperties::default(),
        ),
    )
    .await
    .unwrap();
    let r = within("next", ch.queue_declare("".into(), QueueDeclareOptions::default(), FieldTable::default())).await;
    assert_closed_after_async(r, 406);
    let other = within("channel", conn.create_channel()).await.unwrap();
    let m = within("get", other.basic_get("small".into(), BasicGetOptions { no_ack: true })).await.unwrap();
    assert_eq!(m.expect("the 16-byte message").delivery.data.len(), 16);
}

#[tokio::test]
async fn publisher_confirms_ack_routed_messages_and_nack_reject_publish_overflow() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    queue_with(&ch, "full", args(&[("x-max-length", AMQPValue::LongInt(1)), ("x-overflow", s("reject-publish"))]))
        .await;
    within("confirm", ch.confirm_select(ConfirmSelectOptions::default())).await.unwrap();
    assert!(publish(&ch, "full", b"1").await.is_ack());
    assert!(publish(&ch, "full", b"2").await.is_nack(), "the full queue refuses it");
    assert!(publish(&ch, "unrouted-anywhere", b"3").await.is_ack(), "unroutable is acked");
    // Many in flight, confirmed in order.
    let mut pending = Vec::new();
    for i in 0..20u8 {
        pending.push(
            within(
                "publish",
                ch.basic_publish(
                    "".into(),
                    "nowhere".into(),
                    BasicPublishOptions::default(),
                    &[i],
                    BasicProperties::default(),
                ),
            )
            .await
            .unwrap(),
        );
    }
    within("wait for confirms", ch.wait_for_confirms()).await.unwrap();
    for p in pending {
        assert!(within("confirm", p).await.unwrap().is_ack());
    }
}

#[tokio::test]
async fn x_overflow_block_withholds_confirms_until_there_is_room_and_refuses_unconfirmed_publishes() {
    let server = TestServer::amqp().await;
    let (conn, ch) = lapin_channel(&server).await;
    queue_with(&ch, "held", args(&[("x-max-length", AMQPValue::LongInt(1)), ("x-overflow", s("block"))])).await;
    within("confirm", ch.confirm_select(ConfirmSelectOptions::default())).await.unwrap();
    assert!(publish(&ch, "held", b"1").await.is_ack());
    // Past the limit: taken, its confirm withheld.
    let mut confirm = within(
        "basic.publish",
        ch.basic_publish("".into(), "held".into(), BasicPublishOptions::default(), b"2", BasicProperties::default()),
    )
    .await
    .unwrap();
    assert!(tokio::time::timeout(QUIET, &mut confirm).await.is_err(), "the confirm is withheld");
    // A channel without confirms waits for nothing: refused.
    let other = within("channel", conn.create_channel()).await.unwrap();
    within(
        "basic.publish",
        other.basic_publish("".into(), "held".into(), BasicPublishOptions::default(), b"3", BasicProperties::default()),
    )
    .await
    .unwrap();
    // Taking one makes room (handled after the publish: same channel, in order).
    let get = |ch: Channel| async move {
        let m = within("get", ch.basic_get("held".into(), BasicGetOptions { no_ack: true })).await.unwrap();
        m.map(|m| m.delivery.data.clone())
    };
    assert_eq!(get(other.clone()).await.as_deref(), Some(&b"1"[..]));
    assert!(within("the confirm", confirm).await.unwrap().is_ack(), "acked once there is room");
    assert_eq!(get(other.clone()).await.as_deref(), Some(&b"2"[..]));
    assert_eq!(get(other).await, None, "the unconfirmed publish past the limit was refused");
}

#[tokio::test]
async fn tx_commit_publishes_and_rollback_discards() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    queue(&ch, "txq").await;
    within("tx.select", ch.tx_select()).await.unwrap();
    publish(&ch, "txq", b"a").await;
    let peek = |ch: &Channel| {
        let ch = ch.clone();
        async move {
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            within("passive", ch.queue_declare("txq".into(), passive, FieldTable::default()))
                .await
                .unwrap()
                .message_count()
        }
    };
    assert_eq!(peek(&ch).await, 0, "not visible before commit");
    within("commit", ch.tx_commit()).await.unwrap();
    assert_eq!(peek(&ch).await, 1);
    publish(&ch, "txq", b"b").await;
    within("rollback", ch.tx_rollback()).await.unwrap();
    within("commit nothing", ch.tx_commit()).await.unwrap();
    assert_eq!(peek(&ch).await, 1, "the rolled back publish is gone");
    // An ack inside a transaction takes effect at commit.
    let m = within("get", ch.basic_get("txq".into(), BasicGetOptions::default())).await.unwrap().unwrap();
    within("ack", m.delivery.acker.ack(BasicAckOptions::default())).await.unwrap();
    within("rollback ack", ch.tx_rollback()).await.unwrap();
    within("recover", ch.basic_recover(BasicRecoverOptions { requeue: true })).await.unwrap();
    assert_eq!(peek(&ch).await, 1, "the rolled back ack left the message");
    let m = within("get", ch.basic_get("txq".into(), BasicGetOptions::default())).await.unwrap().unwrap();
    assert!(m.delivery.redelivered);
    within("ack", m.delivery.acker.ack(BasicAckOptions::default())).await.unwrap();
    within("commit", ch.tx_commit()).await.unwrap();
    assert_eq!(peek(&ch).await, 0);
}

#[tokio::test]
async fn direct_reply_to_round_trip() {
    let server = TestServer::amqp().await;
    let (_sconn, server_ch) = lapin_channel(&server).await;
    queue(&server_ch, "rpc").await;
    let mut requests =
        consume(&server_ch, "rpc", BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
            .await;
    let (_cconn, client_ch) = lapin_channel(&server).await;
    let mut replies = consume(
        &client_ch,
        REPLY_TO,
        BasicConsumeOptions { no_ack: true, ..Default::default() },
        FieldTable::default(),
    )
    .await;
    publish_with(&client_ch, "", "rpc", b"ping", BasicProperties::default().with_reply_to(REPLY_TO.into())).await;
    let req = next(&mut requests).await;
    let reply_to = req.properties.reply_to().clone().expect("reply_to");
    assert!(reply_to.as_str().starts_with("amq.rabbitmq.reply-to."), "{reply_to}");
    publish_with(&server_ch, "", reply_to.as_str(), b"pong", BasicProperties::default()).await;
    assert_eq!(next(&mut replies).await.data, b"pong");
}

/// RabbitMQ treats `amq.rabbitmq.reply-to` as a queue that always exists: a declare, passive
/// or not, whatever the flags, answers declare-ok with 0 messages and 1 consumer. FastStream
/// (aio-pika) declares it passively before every RPC call.
#[tokio::test]
async fn declaring_the_direct_reply_to_pseudo_queue_succeeds_passive_or_not() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    for options in [
        QueueDeclareOptions { passive: true, ..Default::default() },
        QueueDeclareOptions::default(),
        QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
        QueueDeclareOptions { durable: true, ..Default::default() },
    ] {
        let q = within("queue.declare", ch.queue_declare(REPLY_TO.into(), options, FieldTable::default()))
            .await
            .unwrap_or_else(|e| panic!("{options:?}: {e}"));
        assert_eq!((q.name().as_str(), q.message_count(), q.consumer_count()), (REPLY_TO, 0, 1), "{options:?}");
    }
    // Then the RPC itself, on the same channel, as FastStream does it.
    queue(&ch, "rpc-after-declare").await;
    let mut replies =
        consume(&ch, REPLY_TO, BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default()).await;
    let props = BasicProperties::default().with_reply_to(REPLY_TO.into());
    publish_with(&ch, "", "rpc-after-declare", b"ping", props).await;
    let req = within("get", ch.basic_get("rpc-after-declare".into(), BasicGetOptions { no_ack: true }))
        .await
        .unwrap()
        .expect("the request");
    let reply_to = req.properties.reply_to().clone().expect("reply_to");
    // The channel's own reply queue exists too; a made-up name under the prefix does not.
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let own =
        within("declare", ch.queue_declare(reply_to.as_str().into(), passive, FieldTable::default())).await.unwrap();
    assert_eq!(own.name().as_str(), reply_to.as_str());
    publish_with(&ch, "", reply_to.as_str(), b"pong", BasicProperties::default()).await;
    assert_eq!(next(&mut replies).await.data, b"pong");
    let made_up = format!("{REPLY_TO}.no-such-token");
    let r = within("declare", ch.queue_declare(made_up.as_str().into(), passive, FieldTable::default())).await;
    assert_code(r, reply_code::NOT_FOUND);
}

#[tokio::test]
async fn direct_reply_to_consumer_must_be_no_ack_or_406() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    let r = within(
        "consume",
        ch.basic_consume(REPLY_TO.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()),
    )
    .await;
    assert_code(r.map(|_| ()), 406);
}

#[tokio::test]
async fn publish_with_direct_reply_to_and_no_reply_consumer_is_406() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    queue(&ch, "rpc2").await;
    within(
        "publish",
        ch.basic_publish(
            "".into(),
            "rpc2".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default().with_reply_to(REPLY_TO.into()),
        ),
    )
    .await
    .unwrap();
    let r = within("next", ch.queue_declare("".into(), QueueDeclareOptions::default(), FieldTable::default())).await;
    assert_closed_after_async(r, 406);
}

/// The `x-death` entry of a dead-lettered message: (queue, reason, count).
fn x_death(d: &Delivery) -> (String, String, i64) {
    let headers = d.properties.headers().as_ref().expect("headers");
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!("no x-death in {headers:?}")
    };
    let Some(AMQPValue::FieldTable(first)) = deaths.as_slice().first() else { panic!("x-death {deaths:?}") };
    let text = |k: &str| match first.inner().get(k) {
        Some(AMQPValue::LongString(v)) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(v)) => v.as_str().to_string(),
        other => panic!("x-death {k}: {other:?}"),
    };
    let count = match first.inner().get("count") {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        Some(AMQPValue::LongUInt(n)) => i64::from(*n),
        other => panic!("x-death count: {other:?}"),
    };
    (text("queue"), text("reason"), count)
}

#[tokio::test]
async fn rejected_message_is_dead_lettered_with_x_death() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    queue(&ch, "dead").await;
    queue_with(&ch, "work", args(&[("x-dead-letter-exchange", s("")), ("x-dead-letter-routing-key", s("dead"))])).await;
    publish(&ch, "work", b"bad").await;
    let m = within("get", ch.basic_get("work".into(), BasicGetOptions::default())).await.unwrap().unwrap();
    within("reject", m.delivery.acker.reject(BasicRejectOptions { requeue: false })).await.unwrap();
    let mut dead =
        consume(&ch, "dead", BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default()).await;
    let d = next(&mut dead).await;
    assert_eq!(d.data, b"bad");
    assert_eq!(x_death(&d), ("work".to_string(), "rejected".to_string(), 1));
}

#[tokio::test]
async fn expired_message_ttl_dead_letters_with_reason_expired() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    queue(&ch, "expired").await;
    queue_with(
        &ch,
        "ttl",
        args(&[
            ("x-message-ttl", AMQPValue::LongInt(50)),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s("expired")),
        ]),
    )
    .await;
    let mut dead =
        consume(&ch, "expired", BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
            .await;
    publish(&ch, "ttl", b"old").await;
    let d = next(&mut dead).await;
    assert_eq!(x_death(&d), ("ttl".to_string(), "expired".to_string(), 1));
    let per_message = BasicProperties::default().with_expiration("30".into());
    queue(&ch, "plain-ttl").await;
    publish_with(&ch, "", "plain-ttl", b"m", per_message).await;
    // The per-message expiration goes by itself; wait on the event (the queue empties).
    within("message expires", async {
        loop {
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            let q = ch.queue_declare("plain-ttl".into(), passive, FieldTable::default()).await.unwrap();
            if q.message_count() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// How long after publishing a message with a 100 ms TTL it reaches the consumer of its
/// dead-letter queue. The bounds are generous for debug builds: this checks that expiry is
/// timed on the deadline (it used to wait for a 1 s sweep: 0.65–1.0 s), not how fast it is.
async fn ttl_round_trip(ch: &Channel, dead: &mut Consumer, queue: &str, props: BasicProperties) -> Duration {
    let sent = Instant::now();
    publish_with(ch, "", queue, b"late?", props).await;
    let d = next(dead).await;
    let took = sent.elapsed();
    assert_eq!(x_death(&d), (queue.to_string(), "expired".to_string(), 1));
    took
}

fn assert_on_time(what: &str, took: Duration) {
    // From 99 ms: a TTL counts in whole milliseconds of the broker's wall clock, from the
    // millisecond the publish arrived in, so it can end up to 1 ms before 100 ms have passed on
    // this test's clock (seen: 99.985 ms, once in about seven runs).
    assert!(
        (Duration::from_millis(99)..Duration::from_millis(400)).contains(&took),
        "{what}: a 100 ms TTL reached the dead-letter consumer after {took:?}"
    );
}

#[tokio::test]
async fn a_100_ms_ttl_reaches_the_dead_letter_consumer_on_time() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    queue(&ch, "retry").await;
    let dlx = |ttl: Option<i32>| {
        let mut a = vec![("x-dead-letter-exchange", s("")), ("x-dead-letter-routing-key", s("retry"))];
        a.extend(ttl.map(|t| ("x-message-ttl", AMQPValue::LongInt(t))));
        args(&a)
    };
    queue_with(&ch, "delay-100", dlx(Some(100))).await;
    queue_with(&ch, "delay-per-message", dlx(None)).await;
    queue_with(&ch, "delay-900", dlx(Some(900))).await;
    let mut dead =
        consume(&ch, "retry", BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default()).await;
    for _ in 0..3 {
        let took = ttl_round_trip(&ch, &mut dead, "delay-100", BasicProperties::default()).await;
        assert_on_time("x-message-ttl", took);
    }
    let per_message = BasicProperties::default().with_expiration("100".into());
    let took = ttl_round_trip(&ch, &mut dead, "delay-per-message", per_message).await;
    assert_on_time("expiration", took);
    // The timer sleeps until a later deadline (900 ms): an earlier one must wake it.
    publish_with(&ch, "", "delay-900", b"later", BasicProperties::default()).await;
    let took = ttl_round_trip(&ch, &mut dead, "delay-100", BasicProperties::default()).await;
    assert_on_time("an earlier deadline than the one armed", took);
    let d = next(&mut dead).await;
    assert_eq!((d.data.as_slice(), x_death(&d).0.as_str()), (&b"later"[..], "delay-900"));
}

#[tokio::test]
async fn x_expires_deletes_an_unused_queue_on_time() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    let vhost = server.server.broker().vhost("/").expect("vhost");
    // A queue with a long x-expires first: the timer sleeps until its deadline.
    queue_with(&ch, "idle-long", args(&[("x-expires", AMQPValue::LongInt(60_000))])).await;
    let declared = Instant::now();
    queue_with(&ch, "idle-100", args(&[("x-expires", AMQPValue::LongInt(100))])).await;
    within("x-expires deletes the queue", async {
        while vhost.queue("idle-100").is_some() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let took = declared.elapsed();
    assert!(took < Duration::from_millis(400), "x-expires 100 ms deleted the queue after {took:?}");
    assert!(vhost.queue("idle-long").is_some());
}

#[tokio::test]
async fn max_length_drops_the_head() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    queue_with(&ch, "short", args(&[("x-max-length", AMQPValue::LongInt(2))])).await;
    for i in 0..3u8 {
        publish(&ch, "short", &[i]).await;
    }
    let mut got = Vec::new();
    while let Some(m) = within("get", ch.basic_get("short".into(), BasicGetOptions { no_ack: true })).await.unwrap() {
        got.push(m.delivery.data[0]);
    }
    assert_eq!(got, [1, 2]);
}

/// Forwards amqprs publisher confirms to the test.
struct Confirms(mpsc::UnboundedSender<(bool, u64)>);

#[async_trait]
impl ChannelCallback for Confirms {
    async fn close(
        &mut self,
        _: &amqprs::channel::Channel,
        _: amqprs::CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn cancel(&mut self, _: &amqprs::channel::Channel, _: amqprs::Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _: &amqprs::channel::Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &amqprs::channel::Channel, ack: amqprs::Ack) {
        let _ = self.0.send((true, ack.delivery_tag()));
    }
    async fn publish_nack(&mut self, _: &amqprs::channel::Channel, nack: amqprs::Nack) {
        let _ = self.0.send((false, nack.delivery_tag()));
    }
    async fn publish_return(
        &mut self,
        _: &amqprs::channel::Channel,
        _: amqprs::Return,
        _: amqprs::BasicProperties,
        _: Vec<u8>,
    ) {
    }
}

#[tokio::test]
async fn amqprs_publishes_with_confirms_and_consumes_with_acks() {
    let server = TestServer::amqp().await;
    let conn = amqprs_open(&amqprs_args(&server)).await;
    let ch = within("channel", conn.open_channel(None)).await.unwrap();
    let (tx, mut confirms) = mpsc::unbounded_channel();
    within("callback", ch.register_callback(Confirms(tx))).await.unwrap();
    within("declare", ch.queue_declare(QueueDeclareArguments::new("rs-q"))).await.unwrap();
    within("confirm.select", ch.confirm_select(ConfirmSelectArguments::default())).await.unwrap();
    for i in 0..3u8 {
        within(
            "publish",
            ch.basic_publish(amqprs::BasicProperties::default(), vec![i], BasicPublishArguments::new("", "rs-q")),
        )
        .await
        .unwrap();
    }
    let mut acked = Vec::new();
    while acked.len() < 3 {
        let (ok, tag) = within("confirm", confirms.recv()).await.expect("confirm");
        assert!(ok);
        acked.push(tag);
    }
    assert_eq!(acked, [1, 2, 3]);
    let (_tag, mut rx) =
        within("consume", ch.basic_consume_rx(BasicConsumeArguments::new("rs-q", "").manual_ack(true).finish()))
            .await
            .unwrap();
    for i in 0..3u8 {
        let m = within("delivery", rx.recv()).await.expect("delivery");
        assert_eq!(m.content.as_deref(), Some(&[i][..]));
        let tag = m.deliver.expect("deliver").delivery_tag();
        within("ack", ch.basic_ack(amqprs::channel::BasicAckArguments::new(tag, false))).await.unwrap();
    }
    within("close", conn.close()).await.unwrap();
}
