//! AMQP exchange and queue methods through the real frontend, end to end: declare (every type and
//! flag), delete, bind / unbind (queue and exchange-to-exchange), alternate exchanges, purge, and
//! the queue arguments the core supports.

use amqprs::channel::{BasicPublishArguments, ExchangeDeclareArguments, QueueBindArguments, QueueDeclareArguments};
use ferry_integration_tests::amqp::{
    amqprs_args, amqprs_open, args, assert_closed_after_async, assert_code, lapin, lapin_channel,
};
use ferry_integration_tests::{within, TestServer};
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ExchangeBindOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, ExchangeUnbindOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, ExchangeKind};

async fn queue(ch: &Channel, name: &str) -> lapin::Queue {
    within("queue.declare", ch.queue_declare(name.into(), QueueDeclareOptions::default(), FieldTable::default()))
        .await
        .unwrap()
}

async fn exchange(ch: &Channel, name: &str, kind: ExchangeKind) {
    within(
        "exchange.declare",
        ch.exchange_declare(name.into(), kind, ExchangeDeclareOptions::default(), FieldTable::default()),
    )
    .await
    .unwrap()
}

async fn bind(ch: &Channel, q: &str, x: &str, key: &str) {
    within(
        "queue.bind",
        ch.queue_bind(q.into(), x.into(), key.into(), QueueBindOptions::default(), FieldTable::default()),
    )
    .await
    .unwrap()
}

async fn publish(ch: &Channel, x: &str, key: &str, body: &[u8]) {
    publish_with(ch, x, key, body, BasicProperties::default()).await
}

async fn publish_with(ch: &Channel, x: &str, key: &str, body: &[u8], props: BasicProperties) {
    within("basic.publish", ch.basic_publish(x.into(), key.into(), BasicPublishOptions::default(), body, props))
        .await
        .unwrap();
}

/// The next message's body on `q` (no-ack get), `None` when the queue is empty.
async fn get(ch: &Channel, q: &str) -> Option<Vec<u8>> {
    within("basic.get", ch.basic_get(q.into(), BasicGetOptions { no_ack: true }))
        .await
        .unwrap()
        .map(|m| m.delivery.data)
}

/// A publish, then a get on the same channel: methods on one channel are handled in order, so
/// the get sees whatever the publish routed.
async fn routed(ch: &Channel, x: &str, key: &str, q: &str) -> bool {
    publish(ch, x, key, b"probe").await;
    get(ch, q).await.is_some()
}

#[tokio::test]
async fn exchange_declare_accepts_every_type_and_flag_and_passive_checks() {
    let server = TestServer::amqp().await;
    let (conn, ch) = lapin_channel(&server).await;
    for (name, kind) in [
        ("x-direct", ExchangeKind::Direct),
        ("x-fanout", ExchangeKind::Fanout),
        ("x-topic", ExchangeKind::Topic),
        ("x-headers", ExchangeKind::Headers),
    ] {
        for options in
            [ExchangeDeclareOptions::default(), ExchangeDeclareOptions { passive: true, ..Default::default() }]
        {
            within("declare", ch.exchange_declare(name.into(), kind.clone(), options, FieldTable::default()))
                .await
                .unwrap();
        }
    }
    let flagged = ExchangeDeclareOptions { durable: true, auto_delete: true, internal: true, ..Default::default() };
    within("flags", ch.exchange_declare("x-flags".into(), ExchangeKind::Topic, flagged, FieldTable::default()))
        .await
        .unwrap();
    within("same again", ch.exchange_declare("x-flags".into(), ExchangeKind::Topic, flagged, FieldTable::default()))
        .await
        .unwrap();
    within(
        "predeclared",
        ch.exchange_declare(
            "amq.topic".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        ),
    )
    .await
    .unwrap();
    let passive_missing = ExchangeDeclareOptions { passive: true, ..Default::default() };
    let r = within(
        "passive missing",
        ch.exchange_declare("x-missing".into(), ExchangeKind::Direct, passive_missing, FieldTable::default()),
    )
    .await;
    assert_code(r, 404);
    let ch2 = within("channel", conn.create_channel()).await.unwrap();
    let r = within(
        "other type",
        ch2.exchange_declare(
            "x-direct".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_code(r, 406);
}

#[tokio::test]
async fn direct_topic_fanout_and_headers_exchanges_route() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    queue(&ch, "route-q").await;
    exchange(&ch, "r-direct", ExchangeKind::Direct).await;
    exchange(&ch, "r-topic", ExchangeKind::Topic).await;
    exchange(&ch, "r-fanout", ExchangeKind::Fanout).await;
    exchange(&ch, "r-headers", ExchangeKind::Headers).await;
    bind(&ch, "route-q", "r-direct", "k").await;
    bind(&ch, "route-q", "r-topic", "plant.*.temp").await;
    bind(&ch, "route-q", "r-fanout", "").await;
    let hargs = args(&[
        ("x-match", AMQPValue::LongString(LongString::from("all"))),
        ("site", AMQPValue::LongString(LongString::from("a"))),
    ]);
    within(
        "headers bind",
        ch.queue_bind("route-q".into(), "r-headers".into(), "".into(), QueueBindOptions::default(), hargs),
    )
    .await
    .unwrap();
    assert!(routed(&ch, "r-direct", "k", "route-q").await);
    assert!(!routed(&ch, "r-direct", "other", "route-q").await);
    assert!(routed(&ch, "r-topic", "plant.7.temp", "route-q").await);
    assert!(!routed(&ch, "r-topic", "plant.7.humidity", "route-q").await);
    assert!(routed(&ch, "r-fanout", "anything", "route-q").await);
    assert!(routed(&ch, "", "route-q", "route-q").await, "the default exchange routes by queue name");
    let site = |v: &str| {
        BasicProperties::default().with_headers(args(&[("site", AMQPValue::LongString(LongString::from(v)))]))
    };
    publish_with(&ch, "r-headers", "", b"h", site("a")).await;
    assert_eq!(get(&ch, "route-q").await.as_deref(), Some(&b"h"[..]));
    publish_with(&ch, "r-headers", "", b"h", site("b")).await;
    assert_eq!(get(&ch, "route-q").await, None);
}

#[tokio::test]
async fn exchange_to_exchange_bind_routes_and_unbind_stops() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    exchange(&ch, "e2e-src", ExchangeKind::Topic).await;
    exchange(&ch, "e2e-dst", ExchangeKind::Fanout).await;
    queue(&ch, "e2e-q").await;
    bind(&ch, "e2e-q", "e2e-dst", "").await;
    within(
        "exchange.bind",
        ch.exchange_bind(
            "e2e-dst".into(),
            "e2e-src".into(),
            "a.#".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .unwrap();
    assert!(routed(&ch, "e2e-src", "a.b.c", "e2e-q").await);
    assert!(!routed(&ch, "e2e-src", "b.c", "e2e-q").await);
    within(
        "exchange.unbind",
        ch.exchange_unbind(
            "e2e-dst".into(),
            "e2e-src".into(),
            "a.#".into(),
            ExchangeUnbindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .unwrap();
    assert!(!routed(&ch, "e2e-src", "a.b.c", "e2e-q").await);
}

#[tokio::test]
async fn internal_exchange_takes_no_direct_publish_but_routes_through_a_binding() {
    let server = TestServer::amqp().await;
    let (conn, ch) = lapin_channel(&server).await;
    let internal = ExchangeDeclareOptions { internal: true, ..Default::default() };
    within("internal", ch.exchange_declare("inner".into(), ExchangeKind::Fanout, internal, FieldTable::default()))
        .await
        .unwrap();
    exchange(&ch, "outer", ExchangeKind::Fanout).await;
    queue(&ch, "inner-q").await;
    bind(&ch, "inner-q", "inner", "").await;
    within(
        "e2e",
        ch.exchange_bind(
            "inner".into(),
            "outer".into(),
            "".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .unwrap();
    assert!(routed(&ch, "outer", "", "inner-q").await);
    let ch2 = within("channel", conn.create_channel()).await.unwrap();
    publish(&ch2, "inner", "", b"x").await;
    let r = within("next method", ch2.basic_get("inner-q".into(), BasicGetOptions::default())).await;
    assert_closed_after_async(r.map(|_| ()), 403);
    assert!(conn.status().connected(), "a channel error must not close the connection");
}

#[tokio::test]
async fn alternate_exchange_receives_what_the_main_exchange_cannot_route() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    exchange(&ch, "ae", ExchangeKind::Fanout).await;
    queue(&ch, "ae-q").await;
    queue(&ch, "main-q").await;
    bind(&ch, "ae-q", "ae", "").await;
    let ae = args(&[("alternate-exchange", AMQPValue::LongString(LongString::from("ae")))]);
    within(
        "declare with AE",
        ch.exchange_declare("main".into(), ExchangeKind::Direct, ExchangeDeclareOptions::default(), ae),
    )
    .await
    .unwrap();
    bind(&ch, "main-q", "main", "known").await;
    assert!(routed(&ch, "main", "unknown", "ae-q").await);
    assert!(routed(&ch, "main", "known", "main-q").await);
    assert_eq!(get(&ch, "ae-q").await, None, "routed messages do not go to the alternate");
}

/// A channel keeps the exchange it last published to; deleted and declared again by another
/// channel, the name must route through the new exchange's bindings, not the old one's.
#[tokio::test]
async fn an_exchange_deleted_and_declared_again_routes_by_its_new_bindings_on_the_same_channel() {
    let server = TestServer::amqp().await;
    let (conn, ch) = lapin_channel(&server).await;
    exchange(&ch, "again-x", ExchangeKind::Fanout).await;
    queue(&ch, "again-old").await;
    queue(&ch, "again-new").await;
    bind(&ch, "again-old", "again-x", "").await;
    assert!(routed(&ch, "again-x", "k", "again-old").await);
    let other = within("channel", conn.create_channel()).await.unwrap();
    within("delete", other.exchange_delete("again-x".into(), ExchangeDeleteOptions::default())).await.unwrap();
    exchange(&other, "again-x", ExchangeKind::Fanout).await;
    bind(&other, "again-new", "again-x", "").await;
    publish(&ch, "again-x", "k", b"after").await;
    assert_eq!(get(&ch, "again-new").await.as_deref(), Some(&b"after"[..]), "through the new exchange");
    assert_eq!(get(&ch, "again-old").await, None, "not through the deleted one's binding");
}

#[tokio::test]
async fn exchange_delete_if_unused_refuses_a_bound_exchange_then_delete_works() {
    let server = TestServer::amqp().await;
    let (conn, ch) = lapin_channel(&server).await;
    exchange(&ch, "del-x", ExchangeKind::Direct).await;
    queue(&ch, "del-xq").await;
    bind(&ch, "del-xq", "del-x", "k").await;
    let r = within(
        "delete if-unused",
        ch.exchange_delete("del-x".into(), ExchangeDeleteOptions { if_unused: true, ..Default::default() }),
    )
    .await;
    assert_code(r, 406);
    let ch2 = within("channel", conn.create_channel()).await.unwrap();
    within("delete", ch2.exchange_delete("del-x".into(), ExchangeDeleteOptions::default())).await.unwrap();
    let passive = ExchangeDeclareOptions { passive: true, ..Default::default() };
    let r = within("gone", ch2.exchange_declare("del-x".into(), ExchangeKind::Direct, passive, FieldTable::default()))
        .await;
    assert_code(r, 404);
}

#[tokio::test]
async fn queue_declare_with_an_empty_name_gets_a_server_generated_name() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    let a = queue(&ch, "").await;
    let b = queue(&ch, "").await;
    assert!(a.name().as_str().starts_with("amq.gen-"), "{}", a.name());
    assert_eq!(a.name().as_str().len(), "amq.gen-".len() + 22);
    assert_ne!(a.name(), b.name());
    assert!(routed(&ch, "", b.name().as_str(), b.name().as_str()).await);
}

#[tokio::test]
async fn passive_queue_declare_reports_message_and_consumer_counts() {
    let server = TestServer::amqp().await;
    let (conn, ch) = lapin_channel(&server).await;
    queue(&ch, "counted").await;
    for _ in 0..3 {
        publish(&ch, "", "counted", b"m").await;
    }
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let q = within("passive", ch.queue_declare("counted".into(), passive, FieldTable::default())).await.unwrap();
    assert_eq!((q.message_count(), q.consumer_count()), (3, 0));
    let consumer_ch = within("channel", conn.create_channel()).await.unwrap();
    within("qos", consumer_ch.basic_qos(1, Default::default())).await.unwrap();
    let _c = within(
        "consume",
        consumer_ch.basic_consume("counted".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()),
    )
    .await
    .unwrap();
    let q = within("passive", ch.queue_declare("counted".into(), passive, FieldTable::default())).await.unwrap();
    assert_eq!((q.message_count(), q.consumer_count()), (2, 1), "one message is out to the consumer");
}

#[tokio::test]
async fn exclusive_queue_goes_with_its_connection() {
    let server = TestServer::amqp().await;
    let (conn, ch) = lapin_channel(&server).await;
    let excl = QueueDeclareOptions { exclusive: true, ..Default::default() };
    within("declare", ch.queue_declare("excl-q".into(), excl, FieldTable::default())).await.unwrap();
    within("close", conn.close(200, "bye".into())).await.unwrap();
    let (_c2, ch2) = lapin_channel(&server).await;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    assert_code(within("passive", ch2.queue_declare("excl-q".into(), passive, FieldTable::default())).await, 404);
}

#[tokio::test]
async fn auto_delete_queue_goes_when_its_last_consumer_cancels() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    let auto = QueueDeclareOptions { auto_delete: true, ..Default::default() };
    within("declare", ch.queue_declare("auto-q".into(), auto, FieldTable::default())).await.unwrap();
    let c = within(
        "consume",
        ch.basic_consume("auto-q".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()),
    )
    .await
    .unwrap();
    within("cancel", ch.basic_cancel(c.tag(), Default::default())).await.unwrap();
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    assert_code(within("passive", ch.queue_declare("auto-q".into(), passive, FieldTable::default())).await, 404);
}

#[tokio::test]
async fn durable_queue_declare_and_every_supported_queue_argument_are_accepted() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    exchange(&ch, "dlx", ExchangeKind::Fanout).await;
    let s = |v: &str| AMQPValue::LongString(LongString::from(v));
    let all = args(&[
        ("x-message-ttl", AMQPValue::LongInt(60_000)),
        ("x-expires", AMQPValue::LongInt(600_000)),
        ("x-max-length", AMQPValue::LongInt(100)),
        ("x-max-length-bytes", AMQPValue::LongInt(1_000_000)),
        ("x-overflow", s("reject-publish")),
        ("x-dead-letter-exchange", s("dlx")),
        ("x-dead-letter-routing-key", s("dead")),
        ("x-max-priority", AMQPValue::ShortShortUInt(5)),
        ("x-single-active-consumer", AMQPValue::Boolean(true)),
        ("x-queue-type", s("classic")),
    ]);
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    within("declare", ch.queue_declare("argful".into(), durable, all.clone())).await.unwrap();
    within("redeclare", ch.queue_declare("argful".into(), durable, all)).await.unwrap();
    let classic = args(&[("x-queue-type", s("classic"))]);
    within("classic", ch.queue_declare("classic-q".into(), QueueDeclareOptions::default(), classic)).await.unwrap();
    assert!(routed(&ch, "", "classic-q", "classic-q").await);
}

#[tokio::test]
async fn queue_unbind_stops_routing() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    queue(&ch, "unbind-q").await;
    bind(&ch, "unbind-q", "amq.direct", "k").await;
    assert!(routed(&ch, "amq.direct", "k", "unbind-q").await);
    within("unbind", ch.queue_unbind("unbind-q".into(), "amq.direct".into(), "k".into(), FieldTable::default()))
        .await
        .unwrap();
    assert!(!routed(&ch, "amq.direct", "k", "unbind-q").await);
}

#[tokio::test]
async fn purge_and_delete_report_message_counts_and_honour_if_empty_and_if_unused() {
    let server = TestServer::amqp().await;
    let (conn, ch) = lapin_channel(&server).await;
    queue(&ch, "pd").await;
    for _ in 0..4 {
        publish(&ch, "", "pd", b"m").await;
    }
    assert_eq!(within("purge", ch.queue_purge("pd".into(), QueuePurgeOptions::default())).await.unwrap(), 4);
    for _ in 0..2 {
        publish(&ch, "", "pd", b"m").await;
    }
    let r = within(
        "delete if-empty",
        ch.queue_delete("pd".into(), QueueDeleteOptions { if_empty: true, ..Default::default() }),
    )
    .await;
    assert_code(r, 406);
    let ch = within("channel", conn.create_channel()).await.unwrap();
    let consumer_ch = within("channel", conn.create_channel()).await.unwrap();
    let _c = within(
        "consume",
        consumer_ch.basic_consume("pd".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()),
    )
    .await
    .unwrap();
    let r = within(
        "delete if-unused",
        ch.queue_delete("pd".into(), QueueDeleteOptions { if_unused: true, ..Default::default() }),
    )
    .await;
    assert_code(r, 406);
    let ch = within("channel", conn.create_channel()).await.unwrap();
    within("cancel", consumer_ch.close(200, "done".into())).await.unwrap();
    assert_eq!(within("delete", ch.queue_delete("pd".into(), QueueDeleteOptions::default())).await.unwrap(), 2);
}

#[tokio::test]
async fn amqprs_declares_an_exchange_binds_and_routes() {
    let server = TestServer::amqp().await;
    let conn = amqprs_open(&amqprs_args(&server)).await;
    let ch = within("channel", conn.open_channel(None)).await.unwrap();
    within("exchange", ch.exchange_declare(ExchangeDeclareArguments::new("rs-topic", "topic"))).await.unwrap();
    let (q, _, _) = within("queue", ch.queue_declare(QueueDeclareArguments::default())).await.unwrap().unwrap();
    assert!(q.starts_with("amq.gen-"), "{q}");
    within("bind", ch.queue_bind(QueueBindArguments::new(&q, "rs-topic", "a.*"))).await.unwrap();
    within(
        "publish",
        ch.basic_publish(
            amqprs::BasicProperties::default(),
            b"rs".to_vec(),
            BasicPublishArguments::new("rs-topic", "a.b"),
        ),
    )
    .await
    .unwrap();
    // Checked from lapin: a second client sees what the first routed.
    let lc = lapin(&server).await;
    let lch = within("channel", lc.create_channel()).await.unwrap();
    let got = within("get", lch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })).await.unwrap();
    assert_eq!(got.expect("routed").delivery.data, b"rs");
    within("close", conn.close()).await.unwrap();
}

/// The default exchange cannot be declared, not even passively: 403 with RabbitMQ's text, the
/// channel closed.
#[tokio::test]
async fn declaring_the_default_exchange_is_refused_with_403_even_passive() {
    let server = TestServer::amqp().await;
    let conn = lapin(&server).await;
    for options in [ExchangeDeclareOptions { passive: true, ..Default::default() }, ExchangeDeclareOptions::default()] {
        let ch = within("channel", conn.create_channel()).await.unwrap();
        let r = within(
            "exchange.declare",
            ch.exchange_declare("".into(), ExchangeKind::Direct, options, FieldTable::default()),
        )
        .await;
        let e = r.expect_err("refused");
        assert_eq!(ferry_integration_tests::amqp::reply_code(&e), Some(403), "{options:?}: {e}");
        assert!(
            e.to_string().contains("ACCESS_REFUSED - operation not permitted on the default exchange"),
            "{options:?}: {e}"
        );
    }
    // Other exchanges pass a passive declare as before.
    let ch = within("channel", conn.create_channel()).await.unwrap();
    let passive = ExchangeDeclareOptions { passive: true, ..Default::default() };
    within(
        "exchange.declare",
        ch.exchange_declare("amq.direct".into(), ExchangeKind::Direct, passive, FieldTable::default()),
    )
    .await
    .unwrap();
}

/// Unbinding names an exchange or a queue that no longer exists (an auto-delete exchange went
/// with its last binding): unbind-ok, as RabbitMQ answers, so clean-up code is idempotent.
#[tokio::test]
async fn unbind_of_a_vanished_exchange_or_queue_is_ok_and_idempotent() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    let auto_delete = ExchangeDeclareOptions { auto_delete: true, ..Default::default() };
    let declare_ad = |name: &'static str| {
        within(
            "exchange.declare",
            ch.exchange_declare(name.into(), ExchangeKind::Direct, auto_delete, FieldTable::default()),
        )
    };
    let unbind_x = |dest: &'static str, source: &'static str| {
        within(
            "exchange.unbind",
            ch.exchange_unbind(
                dest.into(),
                source.into(),
                "k".into(),
                ExchangeUnbindOptions::default(),
                FieldTable::default(),
            ),
        )
    };
    let unbind_q = |q: &'static str, x: &'static str| {
        within("queue.unbind", ch.queue_unbind(q.into(), x.into(), "k".into(), FieldTable::default()))
    };
    declare_ad("ad-src").await.unwrap();
    exchange(&ch, "ad-dest", ExchangeKind::Fanout).await;
    within(
        "exchange.bind",
        ch.exchange_bind(
            "ad-dest".into(),
            "ad-src".into(),
            "k".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .unwrap();
    unbind_x("ad-dest", "ad-src").await.unwrap();
    // The cascade removed ad-src; the same unbind again, and every missing combination.
    unbind_x("ad-dest", "ad-src").await.expect("unbind from a vanished source");
    unbind_x("no-such-dest", "amq.direct").await.expect("unbind of a missing destination");
    unbind_x("no-such-dest", "no-such-src").await.expect("both missing");
    declare_ad("ad-q-src").await.unwrap();
    queue(&ch, "ad-q").await;
    bind(&ch, "ad-q", "ad-q-src", "k").await;
    unbind_q("ad-q", "ad-q-src").await.unwrap();
    unbind_q("ad-q", "ad-q-src").await.expect("queue.unbind from a vanished exchange");
    unbind_q("no-such-q", "amq.direct").await.expect("queue.unbind of a missing queue");
    unbind_q("no-such-q", "no-such-x").await.expect("both missing");
    // The channel is still open and the exchange really is gone.
    let passive = ExchangeDeclareOptions { passive: true, ..Default::default() };
    let r = within(
        "exchange.declare",
        ch.exchange_declare("ad-src".into(), ExchangeKind::Direct, passive, FieldTable::default()),
    )
    .await;
    assert_code(r, 404);
}
