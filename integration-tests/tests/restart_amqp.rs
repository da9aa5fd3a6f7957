//! What an AMQP client finds after the broker restarts on the same data directory (graceful
//! shutdown, store flushed and closed, new server recovering from `ferry.redb`): durable
//! exchanges, queues and bindings with their flags and arguments, persistent messages of durable
//! queues in order with their properties, the redelivered flag of the ones delivered but not
//! acked, priority order, TTLs that keep counting while the broker is down, and deletes and
//! purges that stay done. Transient, non-durable and exclusive things are gone.

use amqprs::channel::{
    BasicGetArguments, BasicPublishArguments, ConfirmSelectArguments, QueueDeclareArguments, QueueDeleteArguments,
};
use ferry_integration_tests::amqp::{amqprs_args, amqprs_open, args, assert_code, lapin_channel};
use ferry_integration_tests::cross::{consume, next_delivery, no_delivery};
use ferry_integration_tests::{within, TestServer};
use lapin::message::{BasicGetMessage, Delivery};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeBindOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ExchangeKind};

// ----- helpers ---------------------------------------------------------------------------------

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

fn transient() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(1)
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions { durable: true, ..Default::default() }
}

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions { passive: true, ..Default::default() }
}

fn durable_x() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions { durable: true, ..Default::default() }
}

async fn queue(ch: &Channel, name: &str, options: QueueDeclareOptions, arguments: FieldTable) -> lapin::Queue {
    within("queue.declare", ch.queue_declare(name.into(), options, arguments)).await.unwrap()
}

async fn durable_queue(ch: &Channel, name: &str) {
    queue(ch, name, durable(), FieldTable::default()).await;
}

async fn exchange(
    ch: &Channel,
    name: &str,
    kind: ExchangeKind,
    options: ExchangeDeclareOptions,
    arguments: FieldTable,
) {
    within("exchange.declare", ch.exchange_declare(name.into(), kind, options, arguments)).await.unwrap()
}

async fn bind(ch: &Channel, q: &str, x: &str, key: &str, arguments: FieldTable) {
    within("queue.bind", ch.queue_bind(q.into(), x.into(), key.into(), QueueBindOptions::default(), arguments))
        .await
        .unwrap()
}

async fn publish(ch: &Channel, x: &str, key: &str, body: &[u8], props: BasicProperties) -> Confirmation {
    within("basic.publish", async {
        ch.basic_publish(x.into(), key.into(), BasicPublishOptions::default(), body, props).await?.await
    })
    .await
    .unwrap()
}

/// The queue's ready-message count (passive declare). Methods on one channel are handled in
/// order, so this also proves every publish sent on `ch` before it was routed.
async fn count(ch: &Channel, q: &str) -> u32 {
    queue(ch, q, passive(), FieldTable::default()).await.message_count()
}

/// The next message of `q` taken with a no-ack get; `None` when empty.
async fn get(ch: &Channel, q: &str) -> Option<BasicGetMessage> {
    within("basic.get", ch.basic_get(q.into(), BasicGetOptions { no_ack: true })).await.unwrap()
}

/// Every message of `q`, taken with no-ack gets, as (body, redelivered).
async fn drain(ch: &Channel, q: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    while let Some(m) = get(ch, q).await {
        out.push((String::from_utf8_lossy(&m.delivery.data).into_owned(), m.delivery.redelivered));
    }
    out
}

/// The bodies of every message of `q`.
async fn bodies(ch: &Channel, q: &str) -> Vec<String> {
    drain(ch, q).await.into_iter().map(|(b, _)| b).collect()
}

/// A publish then a get on the same channel: whether the publish reached `q`.
async fn routed(ch: &Channel, x: &str, key: &str, props: BasicProperties, q: &str) -> bool {
    publish(ch, x, key, b"probe", props).await;
    get(ch, q).await.is_some()
}

/// A fresh channel on `conn` (the previous one may have been closed by a channel error).
async fn channel(conn: &Connection) -> Channel {
    within("channel.open", conn.create_channel()).await.unwrap()
}

/// Asserts that a passive declare of queue `q` fails with 404 (on a channel of its own).
async fn queue_is_gone(conn: &Connection, q: &str) {
    let ch = channel(conn).await;
    let r = within("passive queue.declare", ch.queue_declare(q.into(), passive(), FieldTable::default())).await;
    assert_code(r.map(|q| q.name().to_string()), 404);
}

/// Asserts that a passive declare of exchange `x` fails with 404 (on a channel of its own).
async fn exchange_is_gone(conn: &Connection, x: &str) {
    let ch = channel(conn).await;
    let options = ExchangeDeclareOptions { passive: true, ..Default::default() };
    let r = within(
        "passive exchange.declare",
        ch.exchange_declare(x.into(), ExchangeKind::Direct, options, FieldTable::default()),
    )
    .await;
    assert_code(r, 404);
}

/// An exchange.declare on a channel of its own, for the equivalence checks.
async fn redeclare_exchange(
    conn: &Connection,
    x: &str,
    kind: ExchangeKind,
    options: ExchangeDeclareOptions,
    arguments: FieldTable,
) -> Result<(), lapin::Error> {
    let ch = channel(conn).await;
    within("exchange.declare", ch.exchange_declare(x.into(), kind, options, arguments)).await
}

/// A queue.declare on a channel of its own, for the equivalence checks.
async fn redeclare_queue(
    conn: &Connection,
    q: &str,
    options: QueueDeclareOptions,
    arguments: FieldTable,
) -> Result<u32, lapin::Error> {
    let ch = channel(conn).await;
    within("queue.declare", ch.queue_declare(q.into(), options, arguments)).await.map(|q| q.message_count())
}

/// Restarts the broker and opens a new lapin connection and channel to it.
async fn restart(server: TestServer) -> (TestServer, Connection, Channel) {
    let server = server.restart().await;
    let (conn, ch) = lapin_channel(&server).await;
    (server, conn, ch)
}

/// The first `x-death` entry of a dead-lettered message: (queue, reason).
fn x_death(headers: &FieldTable) -> (String, String) {
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!("no x-death in {headers:?}")
    };
    let Some(AMQPValue::FieldTable(first)) = deaths.as_slice().first() else { panic!("x-death {deaths:?}") };
    let text = |k: &str| match first.inner().get(k) {
        Some(AMQPValue::LongString(v)) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(v)) => v.as_str().to_string(),
        other => panic!("x-death {k}: {other:?}"),
    };
    (text("queue"), text("reason"))
}

// ----- exchanges -------------------------------------------------------------------------------

#[tokio::test]
async fn durable_exchanges_of_every_type_come_back_with_flags_and_arguments_transient_ones_do_not() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    exchange(&ch, "d-ae", ExchangeKind::Fanout, durable_x(), FieldTable::default()).await;
    exchange(&ch, "d-direct", ExchangeKind::Direct, durable_x(), args(&[("alternate-exchange", s("d-ae"))])).await;
    exchange(&ch, "d-topic", ExchangeKind::Topic, durable_x(), args(&[("x-custom", s("kept"))])).await;
    exchange(&ch, "d-headers", ExchangeKind::Headers, durable_x(), FieldTable::default()).await;
    let internal = ExchangeDeclareOptions { durable: true, internal: true, ..Default::default() };
    exchange(&ch, "d-internal", ExchangeKind::Topic, internal, FieldTable::default()).await;
    let auto_delete = ExchangeDeclareOptions { durable: true, auto_delete: true, ..Default::default() };
    exchange(&ch, "d-autodel", ExchangeKind::Direct, auto_delete, FieldTable::default()).await;
    // An auto-delete exchange with a binding: it must come back with the binding (it is deleted
    // only when its last binding goes).
    exchange(&ch, "d-autodel-bound", ExchangeKind::Direct, auto_delete, FieldTable::default()).await;
    durable_queue(&ch, "ae-q").await;
    bind(&ch, "ae-q", "d-ae", "", FieldTable::default()).await;
    bind(&ch, "ae-q", "d-autodel-bound", "k", FieldTable::default()).await;
    exchange(&ch, "t-direct", ExchangeKind::Direct, ExchangeDeclareOptions::default(), FieldTable::default()).await;
    exchange(&ch, "t-fanout", ExchangeKind::Fanout, ExchangeDeclareOptions::default(), FieldTable::default()).await;

    let (server, conn, ch) = restart(server).await;

    exchange_is_gone(&conn, "t-direct").await;
    exchange_is_gone(&conn, "t-fanout").await;
    for (x, kind, options, arguments) in [
        ("d-ae", ExchangeKind::Fanout, durable_x(), FieldTable::default()),
        ("d-direct", ExchangeKind::Direct, durable_x(), args(&[("alternate-exchange", s("d-ae"))])),
        ("d-topic", ExchangeKind::Topic, durable_x(), args(&[("x-custom", s("kept"))])),
        ("d-headers", ExchangeKind::Headers, durable_x(), FieldTable::default()),
        ("d-internal", ExchangeKind::Topic, internal, FieldTable::default()),
        ("d-autodel", ExchangeKind::Direct, auto_delete, FieldTable::default()),
        ("d-autodel-bound", ExchangeKind::Direct, auto_delete, FieldTable::default()),
    ] {
        let p = ExchangeDeclareOptions { passive: true, ..Default::default() };
        redeclare_exchange(&conn, x, kind.clone(), p, FieldTable::default())
            .await
            .unwrap_or_else(|e| panic!("{x} is back: {e}"));
        redeclare_exchange(&conn, x, kind, options, arguments)
            .await
            .unwrap_or_else(|e| panic!("{x} is equivalent to its declaration: {e}"));
    }
    // What came back is what was declared, not a default: the equivalence checks refuse a
    // different type, flag or alternate exchange.
    let refused = [
        redeclare_exchange(&conn, "d-direct", ExchangeKind::Fanout, durable_x(), FieldTable::default()).await,
        redeclare_exchange(&conn, "d-direct", ExchangeKind::Direct, durable_x(), FieldTable::default()).await,
        redeclare_exchange(
            &conn,
            "d-topic",
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await,
        redeclare_exchange(&conn, "d-headers", ExchangeKind::Direct, durable_x(), FieldTable::default()).await,
        redeclare_exchange(&conn, "d-internal", ExchangeKind::Topic, durable_x(), FieldTable::default()).await,
        redeclare_exchange(&conn, "d-autodel", ExchangeKind::Direct, durable_x(), FieldTable::default()).await,
    ];
    for r in refused {
        assert_code(r, 406);
    }
    // Arguments that take part in no equivalence check are kept all the same.
    let vhost = server.server.broker().vhost("/").expect("vhost /");
    let topic = vhost.exchange("d-topic").expect("d-topic");
    assert!(topic.options().arguments.get("x-custom").is_some(), "{:?}", topic.options().arguments);

    // Behaviour: the alternate exchange catches what d-direct cannot route; d-internal refuses
    // publishes; the auto-delete exchange still routes through its binding.
    assert!(routed(&ch, "d-direct", "unbound", BasicProperties::default(), "ae-q").await);
    assert!(routed(&ch, "d-autodel-bound", "k", BasicProperties::default(), "ae-q").await);
    let ich = channel(&conn).await;
    within(
        "publish to an internal exchange",
        ich.basic_publish("d-internal".into(), "k".into(), BasicPublishOptions::default(), b"x", transient()),
    )
    .await
    .unwrap();
    let r = within("next method", ich.queue_declare("ae-q".into(), passive(), FieldTable::default())).await;
    ferry_integration_tests::amqp::assert_closed_after_async(r.map(|q| q.message_count()), 403);
}

// ----- queues ----------------------------------------------------------------------------------

fn queue_arguments() -> FieldTable {
    args(&[
        ("x-message-ttl", AMQPValue::LongInt(600_000)),
        ("x-max-length", AMQPValue::LongInt(3)),
        ("x-dead-letter-exchange", s("")),
        ("x-dead-letter-routing-key", s("q-dlq")),
        ("x-max-priority", AMQPValue::ShortShortUInt(5)),
        ("x-expires", AMQPValue::LongInt(600_000)),
        ("x-custom", s("kept")),
    ])
}

#[tokio::test]
async fn durable_queues_come_back_with_their_arguments_transient_and_exclusive_ones_do_not() {
    let server = TestServer::amqp().await;
    let (conn, ch) = lapin_channel(&server).await;
    durable_queue(&ch, "q-dlq").await;
    queue(&ch, "q-args", durable(), queue_arguments()).await;
    queue(&ch, "q-transient", QueueDeclareOptions::default(), FieldTable::default()).await;
    queue(
        &ch,
        "q-exclusive",
        QueueDeclareOptions { durable: true, exclusive: true, ..Default::default() },
        FieldTable::default(),
    )
    .await;
    queue(
        &ch,
        "q-autodel",
        QueueDeclareOptions { durable: true, auto_delete: true, ..Default::default() },
        FieldTable::default(),
    )
    .await;
    // Persistent messages in the transient and exclusive queues go with them.
    publish(&ch, "", "q-transient", b"t", persistent()).await;
    publish(&ch, "", "q-exclusive", b"e", persistent()).await;
    assert_eq!(count(&ch, "q-exclusive").await, 1);
    // The exclusive queue's connection is still open when the broker stops.
    let _keep_open = conn;

    let (server, conn, ch) = restart(server).await;

    queue_is_gone(&conn, "q-transient").await;
    queue_is_gone(&conn, "q-exclusive").await;
    assert_eq!(redeclare_queue(&conn, "q-args", durable(), queue_arguments()).await.expect("equivalent"), 0);
    assert_eq!(
        redeclare_queue(
            &conn,
            "q-autodel",
            QueueDeclareOptions { durable: true, auto_delete: true, ..Default::default() },
            FieldTable::default()
        )
        .await
        .expect("the durable auto-delete queue is back"),
        0
    );
    // The arguments came back: leaving one out or changing it is refused.
    assert_code(redeclare_queue(&conn, "q-args", durable(), FieldTable::default()).await, 406);
    for (arg, other) in [
        ("x-message-ttl", AMQPValue::LongInt(1000)),
        ("x-max-length", AMQPValue::LongInt(4)),
        ("x-dead-letter-routing-key", s("elsewhere")),
        ("x-max-priority", AMQPValue::ShortShortUInt(6)),
        ("x-expires", AMQPValue::LongInt(1000)),
    ] {
        let mut changed = queue_arguments();
        changed.insert(arg.into(), other);
        assert_code(redeclare_queue(&conn, "q-args", durable(), changed).await, 406);
    }
    assert_code(redeclare_queue(&conn, "q-args", QueueDeclareOptions::default(), queue_arguments()).await, 406);
    let vhost = server.server.broker().vhost("/").expect("vhost /");
    let q = vhost.queue("q-args").expect("q-args");
    assert!(q.options().durable && !q.options().auto_delete && q.options().exclusive.is_none());
    assert!(q.options().arguments.get("x-custom").is_some(), "{:?}", q.options().arguments);

    // And they work: x-max-length 3 drops the head, which is dead-lettered to q-dlq.
    for i in 0..5 {
        publish(&ch, "", "q-args", format!("m{i}").as_bytes(), persistent()).await;
    }
    assert_eq!(bodies(&ch, "q-args").await, ["m2", "m3", "m4"]);
    let dead = get(&ch, "q-dlq").await.expect("a dropped head is dead-lettered");
    assert_eq!(dead.delivery.data, b"m0");
    let headers = dead.delivery.properties.headers().clone().expect("headers");
    assert_eq!(x_death(&headers), ("q-args".to_string(), "maxlen".to_string()));
}

// ----- bindings --------------------------------------------------------------------------------

#[tokio::test]
async fn bindings_between_durable_objects_come_back_and_route() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    durable_queue(&ch, "b-q").await;
    durable_queue(&ch, "b-any").await;
    durable_queue(&ch, "b-e2e").await;
    queue(&ch, "b-transient-q", QueueDeclareOptions::default(), FieldTable::default()).await;
    exchange(&ch, "b-direct", ExchangeKind::Direct, durable_x(), FieldTable::default()).await;
    exchange(&ch, "b-topic", ExchangeKind::Topic, durable_x(), FieldTable::default()).await;
    exchange(&ch, "b-headers", ExchangeKind::Headers, durable_x(), FieldTable::default()).await;
    exchange(&ch, "b-src", ExchangeKind::Topic, durable_x(), FieldTable::default()).await;
    exchange(&ch, "b-dst", ExchangeKind::Fanout, durable_x(), FieldTable::default()).await;
    exchange(&ch, "b-transient-x", ExchangeKind::Direct, ExchangeDeclareOptions::default(), FieldTable::default())
        .await;
    bind(&ch, "b-q", "b-direct", "k1", FieldTable::default()).await;
    bind(&ch, "b-q", "b-direct", "k2", FieldTable::default()).await;
    bind(&ch, "b-q", "b-topic", "plant.*.temp", FieldTable::default()).await;
    bind(&ch, "b-q", "b-topic", "alarm.#", FieldTable::default()).await;
    bind(&ch, "b-q", "amq.topic", "sensor.#", FieldTable::default()).await;
    bind(&ch, "b-q", "b-headers", "", args(&[("x-match", s("all")), ("site", s("a")), ("kind", s("t"))])).await;
    bind(&ch, "b-any", "b-headers", "", args(&[("x-match", s("any")), ("site", s("z")), ("kind", s("z"))])).await;
    bind(&ch, "b-e2e", "b-dst", "", FieldTable::default()).await;
    within(
        "exchange.bind",
        ch.exchange_bind(
            "b-dst".into(),
            "b-src".into(),
            "a.#".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .unwrap();
    // Bindings with a transient end are not kept.
    bind(&ch, "b-transient-q", "b-direct", "k3", FieldTable::default()).await;
    bind(&ch, "b-q", "b-transient-x", "k", FieldTable::default()).await;
    // An unbind before the restart stays done.
    within("queue.unbind", ch.queue_unbind("b-q".into(), "b-topic".into(), "alarm.#".into(), FieldTable::default()))
        .await
        .unwrap();
    assert!(routed(&ch, "b-direct", "k2", transient(), "b-q").await, "routes before the restart");

    let (_server, conn, ch) = restart(server).await;

    let headers = |pairs: &[(&str, &str)]| {
        let table = args(&pairs.iter().map(|(k, v)| (*k, s(v))).collect::<Vec<_>>());
        transient().with_headers(table)
    };
    assert!(routed(&ch, "b-direct", "k1", transient(), "b-q").await);
    assert!(routed(&ch, "b-direct", "k2", transient(), "b-q").await);
    assert!(!routed(&ch, "b-direct", "k9", transient(), "b-q").await);
    assert!(routed(&ch, "b-topic", "plant.7.temp", transient(), "b-q").await);
    assert!(!routed(&ch, "b-topic", "plant.7.humidity", transient(), "b-q").await);
    assert!(!routed(&ch, "b-topic", "alarm.fire", transient(), "b-q").await, "unbound before the restart");
    assert!(routed(&ch, "amq.topic", "sensor.1.temp", transient(), "b-q").await, "binding on amq.topic");
    assert!(routed(&ch, "b-headers", "", headers(&[("site", "a"), ("kind", "t")]), "b-q").await);
    assert!(!routed(&ch, "b-headers", "", headers(&[("site", "a")]), "b-q").await, "x-match all");
    assert!(routed(&ch, "b-headers", "", headers(&[("kind", "z")]), "b-any").await, "x-match any");
    assert!(!routed(&ch, "b-headers", "", headers(&[("kind", "y")]), "b-any").await);
    assert!(routed(&ch, "b-src", "a.b.c", transient(), "b-e2e").await, "exchange-to-exchange binding");
    assert!(!routed(&ch, "b-src", "b.c", transient(), "b-e2e").await);
    queue_is_gone(&conn, "b-transient-q").await;
    exchange_is_gone(&conn, "b-transient-x").await;
    // Persistent messages routed after the restart are stored as usual.
    publish(&ch, "b-src", "a.x", b"after", persistent()).await;
    assert_eq!(count(&ch, "b-e2e").await, 1);
}

// ----- messages --------------------------------------------------------------------------------

/// Properties with every field set and headers of many types.
fn rich_properties(i: u8) -> BasicProperties {
    let mut nested = FieldTable::default();
    nested.insert("k".into(), s("v"));
    nested.insert("n".into(), AMQPValue::LongInt(-7));
    let headers = args(&[
        ("str", s("plain")),
        ("index", AMQPValue::LongInt(i32::from(i))),
        ("big", AMQPValue::LongLongInt(1 << 40)),
        ("flag", AMQPValue::Boolean(true)),
        ("byte", AMQPValue::ShortShortInt(-3)),
        ("ubyte", AMQPValue::ShortShortUInt(200)),
        ("short", AMQPValue::ShortInt(-300)),
        ("ushort", AMQPValue::ShortUInt(60_000)),
        ("uint", AMQPValue::LongUInt(4_000_000_000)),
        ("float", AMQPValue::Float(1.5)),
        ("double", AMQPValue::Double(-2.25)),
        ("ts", AMQPValue::Timestamp(1_700_000_000)),
        ("dec", AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 1234 })),
        ("list", AMQPValue::FieldArray(FieldArray::from(vec![s("x"), AMQPValue::ShortInt(3), AMQPValue::Void]))),
        ("bytes", AMQPValue::ByteArray(ByteArray::from(vec![0u8, 0xff, 0x10]))),
        ("table", AMQPValue::FieldTable(nested)),
        ("void", AMQPValue::Void),
    ]);
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(3)
        .with_correlation_id(format!("corr-{i}").as_str().into())
        .with_reply_to("replies".into())
        .with_expiration("600000".into())
        .with_message_id(format!("msg-{i}").as_str().into())
        .with_timestamp(1_700_000_000 + u64::from(i))
        .with_type("reading".into())
        .with_user_id("guest".into())
        .with_app_id("restart-test".into())
        .with_cluster_id("c1".into())
}

#[tokio::test]
async fn persistent_messages_come_back_in_order_with_their_properties_transient_ones_do_not() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    // The same messages go to two durable queues: `m-control` is read before the restart, to
    // tell a storage problem from a mapping one.
    exchange(&ch, "m-fan", ExchangeKind::Fanout, durable_x(), FieldTable::default()).await;
    for q in ["m-kept", "m-control"] {
        durable_queue(&ch, q).await;
        bind(&ch, q, "m-fan", "", FieldTable::default()).await;
    }
    let mut sent = Vec::new();
    for i in 0..12u8 {
        if i % 3 == 2 {
            publish(&ch, "m-fan", "key", format!("transient-{i}").as_bytes(), transient()).await;
        } else {
            let props = rich_properties(i);
            publish(&ch, "m-fan", &format!("key.{i}"), format!("persistent-{i}").as_bytes(), props.clone()).await;
            sent.push((format!("persistent-{i}"), format!("key.{i}"), props));
        }
    }
    assert_eq!(count(&ch, "m-kept").await, 12);
    let mut control = Vec::new();
    while let Some(m) = get(&ch, "m-control").await {
        if m.delivery.properties.delivery_mode() == &Some(2) {
            control.push(m.delivery);
        }
    }
    assert_eq!(control.len(), sent.len());

    let (_server, _conn, ch) = restart(server).await;

    let mut kept: Vec<Delivery> = Vec::new();
    while let Some(m) = get(&ch, "m-kept").await {
        kept.push(m.delivery);
    }
    let kept_bodies: Vec<String> = kept.iter().map(|d| String::from_utf8_lossy(&d.data).into_owned()).collect();
    let sent_bodies: Vec<String> = sent.iter().map(|(b, _, _)| b.clone()).collect();
    assert_eq!(kept_bodies, sent_bodies, "the persistent messages, in order; no transient one");
    for ((d, c), (_, key, props)) in kept.iter().zip(&control).zip(&sent) {
        assert!(!d.redelivered, "never delivered before the restart");
        assert_eq!(d.exchange.as_str(), "m-fan");
        assert_eq!(d.routing_key.as_str(), key);
        assert_eq!(d.properties, c.properties, "the same properties as before the restart");
        assert_eq!(&d.properties, props, "the properties as published");
    }
}

#[tokio::test]
async fn confirmed_publishes_are_all_there_after_a_restart() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    exchange(&ch, "c-fan", ExchangeKind::Fanout, durable_x(), FieldTable::default()).await;
    for q in ["c-1", "c-2"] {
        durable_queue(&ch, q).await;
        bind(&ch, q, "c-fan", "", FieldTable::default()).await;
    }
    within("confirm.select", ch.confirm_select(ConfirmSelectOptions::default())).await.unwrap();
    let mut pending = Vec::new();
    for i in 0..300u32 {
        let p = within(
            "basic.publish",
            ch.basic_publish("c-fan".into(), "".into(), BasicPublishOptions::default(), &i.to_be_bytes(), persistent()),
        )
        .await
        .unwrap();
        pending.push(p);
    }
    for p in pending {
        assert!(within("confirm", p).await.unwrap().is_ack());
    }
    // Straight to the restart: the confirms are the only guarantee asked for.
    let (_server, _conn, ch) = restart(server).await;
    for q in ["c-1", "c-2"] {
        let mut got = Vec::new();
        while let Some(m) = get(&ch, q).await {
            got.push(u32::from_be_bytes(m.delivery.data[..].try_into().expect("4 bytes")));
        }
        assert_eq!(got, (0..300).collect::<Vec<u32>>(), "{q}: every confirmed message, in order");
    }
}

#[tokio::test]
async fn unacked_deliveries_come_back_redelivered_undelivered_ones_not_and_acked_ones_are_gone() {
    let server = TestServer::amqp().await;
    let (conn, ch) = lapin_channel(&server).await;
    durable_queue(&ch, "r-q").await;
    for i in 1..=8 {
        publish(&ch, "", "r-q", format!("m{i}").as_bytes(), persistent()).await;
    }
    assert_eq!(count(&ch, "r-q").await, 8);
    // m1 and m2 by basic.get: m1 acked, m2 left unacked.
    let getter = channel(&conn).await;
    let m1 = within("get", getter.basic_get("r-q".into(), BasicGetOptions { no_ack: false })).await.unwrap().unwrap();
    let m2 = within("get", getter.basic_get("r-q".into(), BasicGetOptions { no_ack: false })).await.unwrap().unwrap();
    assert_eq!((&m1.delivery.data[..], &m2.delivery.data[..]), (&b"m1"[..], &b"m2"[..]));
    within("ack", m1.delivery.acker.ack(BasicAckOptions::default())).await.unwrap();
    // m3..m5 to a consumer with prefetch 3; acking m3 lets m6 come; m4..m6 stay unacked.
    let consumer_ch = channel(&conn).await;
    within("basic.qos", consumer_ch.basic_qos(3, BasicQosOptions::default())).await.unwrap();
    let mut consumer = consume(&consumer_ch, "r-q", false).await;
    let mut delivered = Vec::new();
    for _ in 0..3 {
        delivered.push(next_delivery(&mut consumer).await);
    }
    let names: Vec<&[u8]> = delivered.iter().map(|d| &d.data[..]).collect();
    assert_eq!(names, [&b"m3"[..], b"m4", b"m5"]);
    within("ack", delivered[0].acker.ack(BasicAckOptions::default())).await.unwrap();
    let m6 = next_delivery(&mut consumer).await;
    assert_eq!(m6.data, b"m6");
    no_delivery(&mut consumer).await;
    // Every ack above was handled: a synchronous method on each channel after it.
    assert_eq!(count(&getter, "r-q").await, 2, "m7 and m8 are ready");
    assert_eq!(count(&consumer_ch, "r-q").await, 2);

    // The consumer's connection is still open, its deliveries unacked, when the broker stops.
    let (_server, _conn2, ch) = restart(server).await;
    drop(conn);

    let expected: Vec<(String, bool)> =
        [("m2", true), ("m4", true), ("m5", true), ("m6", true), ("m7", false), ("m8", false)]
            .iter()
            .map(|(b, r)| (b.to_string(), *r))
            .collect();
    assert_eq!(drain(&ch, "r-q").await, expected);
}

/// One multiple ack over deliveries of two queues taken in turns: the connection settles each
/// run of one queue's deliveries in one go (`Connection::settle`); a run cut short by the other
/// queue, or the last one, must still be settled, and in the store too.
#[tokio::test]
async fn a_multiple_ack_over_two_queues_taken_in_turns_stays_done_after_a_restart() {
    let server = TestServer::amqp().await;
    let (conn, ch) = lapin_channel(&server).await;
    for q in ["ma-a", "ma-b"] {
        durable_queue(&ch, q).await;
        for i in 1..=3 {
            publish(&ch, "", q, format!("{q}{i}").as_bytes(), persistent()).await;
        }
    }
    let getter = channel(&conn).await;
    let mut tags = Vec::new();
    for q in ["ma-a", "ma-b", "ma-a", "ma-a", "ma-b", "ma-b"] {
        let m = within("get", getter.basic_get(q.into(), BasicGetOptions { no_ack: false })).await.unwrap().unwrap();
        tags.push((String::from_utf8_lossy(&m.delivery.data).into_owned(), m.delivery.delivery_tag));
    }
    let got: Vec<&str> = tags.iter().map(|(b, _)| b.as_str()).collect();
    assert_eq!(got, ["ma-a1", "ma-b1", "ma-a2", "ma-a3", "ma-b2", "ma-b3"]);
    // Up to ma-b2: runs a1 | b1 | a2 a3 | b2; ma-b3 stays unacked.
    within("ack multiple", getter.basic_ack(tags[4].1, BasicAckOptions { multiple: true })).await.unwrap();
    // A synchronous method on the getter's channel: the ack was handled.
    assert_eq!(count(&getter, "ma-a").await, 0);
    assert_eq!(count(&ch, "ma-b").await, 0, "ma-b3 is unacked, not ready");

    let (_server, _conn2, ch) = restart(server).await;
    drop(conn);
    assert_eq!(drain(&ch, "ma-a").await, Vec::<(String, bool)>::new(), "every ma-a message was acked");
    assert_eq!(drain(&ch, "ma-b").await, [("ma-b3".to_string(), true)], "only the unacked one comes back");
}

#[tokio::test]
async fn amqprs_unacked_get_comes_back_redelivered_and_confirmed_messages_keep_their_ids() {
    let server = TestServer::amqp().await;
    let conn = amqprs_open(&amqprs_args(&server)).await;
    let ch = within("channel", conn.open_channel(None)).await.unwrap();
    within("queue.declare", ch.queue_declare(QueueDeclareArguments::durable_client_named("rs-q"))).await.unwrap();
    within("queue.declare", ch.queue_declare(QueueDeclareArguments::new("rs-transient"))).await.unwrap();
    within("confirm.select", ch.confirm_select(ConfirmSelectArguments::default())).await.unwrap();
    for i in 0..4 {
        let mut props = amqprs::BasicProperties::default();
        props.with_persistence(true).with_message_id(&format!("id-{i}"));
        within(
            "basic.publish",
            ch.basic_publish(props.clone(), format!("rs-{i}").into_bytes(), BasicPublishArguments::new("", "rs-q")),
        )
        .await
        .unwrap();
        within(
            "basic.publish",
            ch.basic_publish(props, b"gone".to_vec(), BasicPublishArguments::new("", "rs-transient")),
        )
        .await
        .unwrap();
    }
    // rs-0 taken and left unacked.
    let (get_ok, _, body) =
        within("basic.get", ch.basic_get(BasicGetArguments::new("rs-q"))).await.unwrap().expect("a message");
    assert!(!get_ok.redelivered());
    assert_eq!(body, b"rs-0");
    // basic.get is synchronous: every publish before it was handled.

    let server = server.restart().await;
    let conn2 = amqprs_open(&amqprs_args(&server)).await;
    let ch = within("channel", conn2.open_channel(None)).await.unwrap();
    let mut got = Vec::new();
    while let Some((ok, props, body)) =
        within("basic.get", ch.basic_get(BasicGetArguments { no_ack: true, ..BasicGetArguments::new("rs-q") }))
            .await
            .unwrap()
    {
        got.push((String::from_utf8(body).unwrap(), props.message_id().cloned().unwrap_or_default(), ok.redelivered()));
    }
    let want: Vec<(String, String, bool)> = (0..4).map(|i| (format!("rs-{i}"), format!("id-{i}"), i == 0)).collect();
    assert_eq!(got, want);
    let gone =
        within("passive", ch.queue_declare(QueueDeclareArguments::new("rs-transient").passive(true).finish())).await;
    assert!(gone.is_err(), "the transient queue is gone: {gone:?}");
    drop(conn);
    let ch = within("channel", conn2.open_channel(None)).await.unwrap();
    within("queue.delete", ch.queue_delete(QueueDeleteArguments::new("rs-q"))).await.unwrap();
    within("close", conn2.close()).await.unwrap();
}

#[tokio::test]
async fn a_priority_queue_keeps_priority_order_after_a_restart() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    queue(&ch, "prio", durable(), args(&[("x-max-priority", AMQPValue::ShortShortUInt(10))])).await;
    let sent = [(1, "a"), (5, "b"), (9, "c"), (0, "d"), (5, "e"), (9, "f"), (3, "g"), (12, "h")];
    for (p, body) in sent {
        publish(&ch, "", "prio", body.as_bytes(), persistent().with_priority(p)).await;
    }
    assert_eq!(count(&ch, "prio").await, 8);

    let (_server, _conn, ch) = restart(server).await;

    // Highest first (12 counts as the maximum, 10), first in first out within a priority.
    assert_eq!(bodies(&ch, "prio").await, ["h", "c", "f", "b", "e", "g", "a", "d"]);
}

/// The TTL the two tests below let run out while the broker is down. Wall-clock time on
/// purpose: a message's TTL counts from its publish in `Millis` stored with it, which no paused
/// tokio clock moves. These are the end-to-end checks; the logic at exact deadlines is unit
/// tested on injected time (ferry-core's `a_restored_message_counts_its_ttl_from_its_publish_before_the_restart`).
const TTL: std::time::Duration = std::time::Duration::from_millis(1000);

/// Stops the broker, lets `down` pass, and starts it again on the same directory.
async fn restart_after(server: TestServer, down: std::time::Duration) -> (TestServer, Connection, Channel) {
    let dir = server.stop().await;
    // The passing of time is what the callers test: TTLs run out while the broker is down.
    tokio::time::sleep(down).await;
    let server = TestServer::resume(dir).await;
    let (conn, ch) = lapin_channel(&server).await;
    (server, conn, ch)
}

#[tokio::test]
async fn a_queue_message_ttl_keeps_counting_while_the_broker_is_down() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    durable_queue(&ch, "ttl-dead").await;
    let ttl_args = args(&[
        ("x-message-ttl", AMQPValue::LongInt(TTL.as_millis() as i32)),
        ("x-dead-letter-exchange", s("")),
        ("x-dead-letter-routing-key", s("ttl-dead")),
    ]);
    queue(&ch, "ttl-q", durable(), ttl_args).await;
    publish(&ch, "", "ttl-q", b"queue-ttl", persistent()).await;
    assert_eq!(count(&ch, "ttl-q").await, 1);

    // The TTL runs out while the broker is down.
    let (_server, _conn, ch) = restart_after(server, TTL + std::time::Duration::from_millis(100)).await;

    // Straight after the start, well before a TTL counted afresh from the restart would end.
    let started = std::time::Instant::now();
    assert!(get(&ch, "ttl-q").await.is_none(), "the queue-TTL message expired while the broker was down");
    let mut dead = consume(&ch, "ttl-dead", true).await;
    let d = next_delivery(&mut dead).await;
    assert_eq!(d.data, b"queue-ttl");
    let headers = d.properties.headers().clone().expect("headers");
    assert_eq!(x_death(&headers), ("ttl-q".to_string(), "expired".to_string()));
    assert!(
        started.elapsed() < TTL * 3 / 4,
        "dead-lettered at once, not after a TTL counted from the restart ({:?})",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_per_message_expiration_keeps_counting_while_the_broker_is_down() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    durable_queue(&ch, "exp-q").await;
    publish(&ch, "", "exp-q", b"expires", persistent().with_expiration(TTL.as_millis().to_string().into())).await;
    publish(&ch, "", "exp-q", b"keeps", persistent().with_expiration("600000".into())).await;
    assert_eq!(count(&ch, "exp-q").await, 2);

    // The expiration runs out while the broker is down.
    let (_server, _conn, ch) = restart_after(server, TTL + std::time::Duration::from_millis(100)).await;

    assert_eq!(bodies(&ch, "exp-q").await, ["keeps"], "the expired message is not delivered");
}

#[tokio::test]
async fn a_deleted_queue_stays_deleted_and_purged_messages_stay_gone() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    exchange(&ch, "del-x", ExchangeKind::Direct, durable_x(), FieldTable::default()).await;
    durable_queue(&ch, "del-q").await;
    durable_queue(&ch, "purge-q").await;
    bind(&ch, "del-q", "del-x", "k", FieldTable::default()).await;
    for i in 0..5 {
        publish(&ch, "", "del-q", format!("d{i}").as_bytes(), persistent()).await;
        publish(&ch, "", "purge-q", format!("p{i}").as_bytes(), persistent()).await;
    }
    let purged = within("queue.purge", ch.queue_purge("purge-q".into(), QueuePurgeOptions::default())).await.unwrap();
    assert_eq!(purged, 5);
    publish(&ch, "", "purge-q", b"after-purge", persistent()).await;
    assert_eq!(
        within("queue.delete", ch.queue_delete("del-q".into(), QueueDeleteOptions::default())).await.unwrap(),
        5
    );
    within("exchange.delete", ch.exchange_delete("del-x".into(), ExchangeDeleteOptions::default())).await.unwrap();
    assert_eq!(count(&ch, "purge-q").await, 1);

    let (_server, conn, ch) = restart(server).await;

    queue_is_gone(&conn, "del-q").await;
    exchange_is_gone(&conn, "del-x").await;
    assert_eq!(bodies(&ch, "purge-q").await, ["after-purge"]);
    // A queue of the deleted one's name starts empty.
    durable_queue(&ch, "del-q").await;
    assert_eq!(count(&ch, "del-q").await, 0);
}

#[tokio::test]
async fn two_restarts_in_a_row_keep_everything_and_messages_acked_in_between_stay_gone() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    durable_queue(&ch, "twice").await;
    for i in 0..4 {
        publish(&ch, "", "twice", format!("m{i}").as_bytes(), persistent()).await;
    }
    assert_eq!(count(&ch, "twice").await, 4);
    let (server, _conn, ch) = restart(server).await;
    // Take one (acked by no-ack), and add one.
    assert_eq!(get(&ch, "twice").await.expect("m0").delivery.data, b"m0");
    publish(&ch, "", "twice", b"m4", persistent()).await;
    assert_eq!(count(&ch, "twice").await, 4);
    let (_server, _conn, ch) = restart(server).await;
    assert_eq!(bodies(&ch, "twice").await, ["m1", "m2", "m3", "m4"]);
}
