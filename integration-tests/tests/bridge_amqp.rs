//! AMQP shovels (`[[shovels]]`, ferry-bridge's `shovel` module) end to end: a Ferry shovelling
//! into and out of a real RabbitMQ (started once for this test binary on free loopback ports)
//! and into another Ferry, with lapin and rumqttc clients on either side. Every ack mode, a
//! remote outage (a TCP proxy the test cuts), a refused login, RabbitMQ's `x-shovelled`
//! header, and two Ferrys shovelling both ways without a loop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use ferry_bridge::{BridgeStatus, LinkState};
use ferry_integration_tests::mqtt::{text, v311};
use ferry_integration_tests::rabbitmq::rabbit;
use ferry_integration_tests::{within, TestServer};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};

const Q1: rumqttc::QoS = rumqttc::QoS::AtLeastOnce;

fn frontends() -> Vec<Arc<dyn ferry_core::frontend::Frontend>> {
    vec![Arc::new(ferry_mqtt::MqttFrontend::default()), Arc::new(ferry_amqp::AmqpFrontend::default())]
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A name no other test in this binary uses (they share one RabbitMQ).
fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

// ----- helpers -------------------------------------------------------------------------------

async fn declare(ch: &Channel, q: &str) -> u32 {
    let opts = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    within("queue.declare", ch.queue_declare(q.into(), opts, FieldTable::default()))
        .await
        .expect("declare")
        .message_count()
}

async fn consume(ch: &Channel, q: &str) -> Consumer {
    within(
        "basic.consume",
        ch.basic_consume(q.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()),
    )
    .await
    .expect("consume")
}

/// The next delivery: its body as text, its properties; acked.
async fn next(consumer: &mut Consumer) -> (String, BasicProperties) {
    let d = within("a delivery", consumer.next()).await.expect("consumer open").expect("delivery");
    within("ack", d.acker.ack(BasicAckOptions::default())).await.expect("ack");
    (String::from_utf8_lossy(&d.data).into_owned(), d.properties)
}

async fn publish(ch: &Channel, x: &str, key: &str, body: &[u8], props: BasicProperties) {
    let confirm =
        within("publish", ch.basic_publish(x.into(), key.into(), BasicPublishOptions::default(), body, props))
            .await
            .expect("publish");
    within("confirm", confirm).await.expect("confirmed");
}

fn header<'a>(p: &'a BasicProperties, k: &str) -> Option<&'a AMQPValue> {
    p.headers().as_ref()?.inner().get(k)
}

fn hops(p: &BasicProperties) -> Option<i64> {
    match header(p, ferry_bridge::HOPS)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        other => panic!("hops header {other:?}"),
    }
}

fn shovel_toml(fields: &str) -> String {
    format!(
        "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n\
         [[shovels]]\nname = \"s\"\nreconnect_initial_ms = 50\nreconnect_max_ms = 400\n{fields}"
    )
}

async fn ferry(fields: &str) -> TestServer {
    TestServer::start(&shovel_toml(fields), &frontends()).await
}

async fn status_when(server: &TestServer, what: &str, pred: impl Fn(&BridgeStatus) -> bool) -> BridgeStatus {
    within(what, server.server.bridges().wait_for("s", pred)).await.expect("shovel s is running")
}

async fn up(server: &TestServer) -> BridgeStatus {
    status_when(server, "shovel up", |s| s.state == LinkState::Up).await
}

fn out_to(rabbit_uri: &str, dest: &str, extra: &str) -> String {
    format!(
        "src_uri = \"local\"\nsrc_exchange = \"amq.topic\"\nsrc_exchange_key = \"telemetry.#\"\n\
         dest_uri = \"{rabbit_uri}\"\n{dest}\n{extra}"
    )
}

// ----- Ferry → RabbitMQ ----------------------------------------------------------------------

#[tokio::test]
async fn ferry_shovels_mqtt_and_amqp_publishes_into_a_rabbitmq_work_queue_in_order_with_properties() {
    let Some(rabbit) = rabbit().await else { return };
    let (_rc, rch) = rabbit.channel().await;
    let work = unique("work");
    declare(&rch, &work).await;
    let local = ferry(&out_to(&rabbit.uri(), &format!("dest_queue = \"{work}\""), "")).await;
    up(&local).await;
    let n = 25;
    let mut mqtt = v311::connect(&local, "pub").await;
    for i in 0..n {
        mqtt.publish("telemetry/temp", Q1, false, format!("mqtt {i}").as_bytes()).await;
    }
    mqtt.publish("other/x", Q1, false, b"stays local").await;
    let (_lc, lch) = ferry_integration_tests::amqp::lapin_channel(&local).await;
    within("confirms", lch.confirm_select(ConfirmSelectOptions::default())).await.unwrap();
    for i in 0..n {
        let mut h = FieldTable::default();
        h.insert("site".into(), AMQPValue::LongString("seven".into()));
        let props = BasicProperties::default()
            .with_message_id(format!("id-{i}").into())
            .with_content_type("text/plain".into())
            .with_delivery_mode(2)
            .with_headers(h);
        publish(&lch, "amq.topic", "telemetry.pressure", format!("amqp {i}").as_bytes(), props).await;
    }
    let mut c = consume(&rch, &work).await;
    for i in 0..n {
        let (body, p) = next(&mut c).await;
        assert_eq!(body, format!("mqtt {i}"));
        assert_eq!(hops(&p), Some(1), "one hop");
    }
    for i in 0..n {
        let (body, p) = next(&mut c).await;
        assert_eq!(body, format!("amqp {i}"));
        assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some(format!("id-{i}").as_str()));
        assert_eq!(p.content_type().as_ref().map(|s| s.as_str()), Some("text/plain"));
        assert_eq!(*p.delivery_mode(), Some(2));
        assert!(matches!(header(&p, "site"), Some(AMQPValue::LongString(s)) if s.as_bytes() == b"seven"), "{p:?}");
    }
    let st = status_when(&local, "all confirmed", |s| s.forwarded_out == 2 * n).await;
    assert_eq!((st.queued, st.in_flight, st.nacked), (0, 0, 0), "{st:?}");
    assert_eq!(st.remote, rabbit.uri());
    // The link is a connection in the registry while up.
    let listed = local.server.broker().connections().list();
    assert!(listed.iter().any(|c| c.peer == rabbit.addr()), "the shovel is listed");
}

#[tokio::test]
async fn every_ack_mode_delivers_out_and_leaves_nothing_behind() {
    let Some(rabbit) = rabbit().await else { return };
    for mode in ["on-confirm", "on-publish", "no-ack"] {
        let (_rc, rch) = rabbit.channel().await;
        let work = unique("modes");
        declare(&rch, &work).await;
        let local =
            ferry(&out_to(&rabbit.uri(), &format!("dest_queue = \"{work}\""), &format!("ack_mode = \"{mode}\"\n")))
                .await;
        up(&local).await;
        let mut mqtt = v311::connect(&local, "pub").await;
        for i in 0..10 {
            mqtt.publish("telemetry/m", Q1, false, format!("{mode} {i}").as_bytes()).await;
        }
        let mut c = consume(&rch, &work).await;
        for i in 0..10 {
            assert_eq!(next(&mut c).await.0, format!("{mode} {i}"));
        }
        let st = status_when(&local, "ten out", |s| s.forwarded_out == 10).await;
        status_when(&local, "local queue empty", |s| s.queued == 0 && s.in_flight == 0).await;
        assert_eq!(st.nacked, 0, "{mode}: {st:?}");
    }
}

#[tokio::test]
async fn x_shovelled_is_added_when_asked() {
    let Some(rabbit) = rabbit().await else { return };
    let (_rc, rch) = rabbit.channel().await;
    let work = unique("fwd");
    declare(&rch, &work).await;
    let local =
        ferry(&out_to(&rabbit.uri(), &format!("dest_queue = \"{work}\""), "add_forward_headers = true\n")).await;
    up(&local).await;
    let mut mqtt = v311::connect(&local, "pub").await;
    mqtt.publish("telemetry/a", Q1, false, b"x").await;
    let mut c = consume(&rch, &work).await;
    let (_, p) = next(&mut c).await;
    let Some(AMQPValue::FieldArray(list)) = header(&p, ferry_bridge::shovel::SHOVELLED) else { panic!("{p:?}") };
    let Some(AMQPValue::FieldTable(entry)) = list.as_slice().first() else { panic!("{list:?}") };
    let get = |k: &str| match entry.inner().get(k) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(get("shovel-name"), "s");
    assert_eq!(get("shovel-type"), "static");
    assert_eq!(get("src-uri"), "local");
    assert_eq!(get("src-exchange"), "amq.topic");
    assert_eq!(get("src-exchange-key"), "telemetry.#");
    assert_eq!(get("dest-uri"), rabbit.uri());
    assert_eq!(get("dest-queue"), work);
    assert!(get("shovelled-by").starts_with("ferry@"));
    assert!(!get("dest-uri").contains("guest:"), "no password in the header");
}

/// RabbitMQ's `dest-publish-properties`: what it names replaces the message's own properties
/// (here an MQTT QoS 0 publish, transient, made persistent), headers are merged, the rest kept.
#[tokio::test]
async fn dest_publish_properties_are_laid_over_the_messages() {
    let Some(rabbit) = rabbit().await else { return };
    let (_rc, rch) = rabbit.channel().await;
    let work = unique("props");
    declare(&rch, &work).await;
    let extra =
        "dest_publish_properties = { delivery_mode = 2, app_id = \"edge-7\", headers = { site = \"north\" } }\n";
    let local = ferry(&out_to(&rabbit.uri(), &format!("dest_queue = \"{work}\""), extra)).await;
    up(&local).await;
    let mut mqtt = v311::connect(&local, "pub").await;
    mqtt.publish("telemetry/a", rumqttc::QoS::AtMostOnce, false, b"x").await;
    let mut c = consume(&rch, &work).await;
    let (body, p) = next(&mut c).await;
    assert_eq!(body, "x");
    assert_eq!(*p.delivery_mode(), Some(2), "{p:?}");
    assert_eq!(p.app_id().as_ref().map(|s| s.as_str()), Some("edge-7"));
    assert!(matches!(header(&p, "site"), Some(AMQPValue::LongString(s)) if s.as_bytes() == b"north"), "{p:?}");
    assert_eq!(hops(&p), Some(1), "the shovel's own header is still there");
}

// ----- RabbitMQ → Ferry ----------------------------------------------------------------------

#[tokio::test]
async fn a_rabbitmq_queue_is_shovelled_into_ferry_and_emptied() {
    let Some(rabbit) = rabbit().await else { return };
    for mode in ["on-confirm", "on-publish", "no-ack"] {
        let (_rc, rch) = rabbit.channel().await;
        let orders = unique("orders");
        declare(&rch, &orders).await;
        let local = ferry(&format!(
            "src_uri = \"{}\"\nsrc_queue = \"{orders}\"\ndest_uri = \"local\"\n\
             dest_exchange = \"amq.direct\"\ndest_exchange_key = \"orders\"\nack_mode = \"{mode}\"\nprefetch_count = 7\n\
             add_forward_headers = true\n",
            rabbit.uri()
        ))
        .await;
        up(&local).await;
        let (_lc, lch) = ferry_integration_tests::amqp::lapin_channel(&local).await;
        declare(&lch, "got").await;
        within(
            "bind",
            lch.queue_bind(
                "got".into(),
                "amq.direct".into(),
                "orders".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
        .unwrap();
        within("confirms", rch.confirm_select(ConfirmSelectOptions::default())).await.unwrap();
        let n = 30;
        for i in 0..n {
            let props = BasicProperties::default().with_message_id(format!("o{i}").into());
            publish(&rch, "", &orders, format!("order {i}").as_bytes(), props).await;
        }
        let mut c = consume(&lch, "got").await;
        for i in 0..n {
            let (body, p) = next(&mut c).await;
            assert_eq!(body, format!("order {i}"), "{mode}");
            assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some(format!("o{i}").as_str()));
            assert_eq!(hops(&p), Some(1));
            // Federation's x-received-from and RabbitMQ's x-shovelled name where it came from.
            let Some(AMQPValue::FieldArray(from)) = header(&p, ferry_bridge::shovel::RECEIVED_FROM) else {
                panic!("{p:?}")
            };
            let Some(AMQPValue::FieldTable(from)) = from.as_slice().first() else { panic!("{from:?}") };
            let text = |t: &FieldTable, k: &str| match t.inner().get(k) {
                Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                other => panic!("{k}: {other:?}"),
            };
            assert_eq!((text(from, "uri"), text(from, "exchange")), (rabbit.uri(), String::new()));
            assert!(text(from, "cluster-name").starts_with("ferrytest"), "{from:?}");
            assert_eq!(from.inner().get("redelivered"), Some(&AMQPValue::Boolean(false)));
            let Some(AMQPValue::FieldArray(by)) = header(&p, ferry_bridge::shovel::SHOVELLED) else { panic!("{p:?}") };
            let Some(AMQPValue::FieldTable(by)) = by.as_slice().first() else { panic!("{by:?}") };
            assert_eq!((text(by, "src-queue"), text(by, "dest-uri")), (orders.clone(), "local".to_string()));
        }
        status_when(&local, "all in", |s| s.forwarded_in == n).await;
        // Every message was delivered to the shovel: none is ready on RabbitMQ.
        let (_rc2, rch2) = rabbit.channel().await;
        let ok = within(
            "passive declare",
            rch2.queue_declare(
                orders.as_str().into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            ),
        )
        .await
        .expect("passive declare");
        assert_eq!(ok.message_count(), 0);
        // Stopping the shovel leaves nothing unacked behind to be redelivered.
        local.stop().await;
        let ok = within(
            "declare",
            rch2.queue_declare(
                orders.as_str().into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            ),
        )
        .await
        .unwrap();
        assert_eq!((ok.message_count(), ok.consumer_count()), (0, 0), "{mode}: all acked on RabbitMQ");
    }
}

#[tokio::test]
async fn a_rabbitmq_exchange_is_shovelled_through_a_server_named_queue_and_hops_are_kept() {
    let Some(rabbit) = rabbit().await else { return };
    let key_prefix = unique("site").replace('-', "_");
    let local = ferry(&format!(
        "src_uri = \"{}\"\nsrc_exchange = \"amq.topic\"\nsrc_exchange_key = \"{key_prefix}.#\"\n\
         dest_uri = \"local\"\ndest_exchange = \"amq.topic\"\n",
        rabbit.uri()
    ))
    .await;
    // Up means the queue is bound on RabbitMQ: what is published there from now on comes.
    up(&local).await;
    let mut sub = v311::connect(&local, "sub").await;
    sub.subscribe(&format!("{key_prefix}/#"), Q1).await;
    let (_rc, rch) = rabbit.channel().await;
    within("confirms", rch.confirm_select(ConfirmSelectOptions::default())).await.unwrap();
    publish(&rch, "amq.topic", &format!("{key_prefix}.a"), b"first", BasicProperties::default()).await;
    // One that has crossed a shovel already: max_hops 1 stops it (acked on RabbitMQ, not
    // published here).
    let mut h = FieldTable::default();
    h.insert(ferry_bridge::HOPS.into(), AMQPValue::LongLongInt(1));
    publish(&rch, "amq.topic", &format!("{key_prefix}.b"), b"looped", BasicProperties::default().with_headers(h)).await;
    publish(&rch, "amq.topic", &format!("{key_prefix}.c"), b"last", BasicProperties::default()).await;
    let got = sub.publish_received().await;
    assert_eq!((got.topic.clone(), text(&got.payload).to_string()), (format!("{key_prefix}/a"), "first".to_string()));
    let got = sub.publish_received().await;
    assert_eq!((got.topic.clone(), text(&got.payload).to_string()), (format!("{key_prefix}/c"), "last".to_string()));
    let st = status_when(&local, "one dropped", |s| s.dropped_max_hops == 1 && s.forwarded_in == 2).await;
    assert_eq!(st.forwarded_out, 0, "{st:?}");
    sub.no_publish().await;
}

#[tokio::test]
async fn a_delivery_is_acked_to_rabbitmq_only_after_the_local_commit() {
    let Some(rabbit) = rabbit().await else { return };
    let (_rc, rch) = rabbit.channel().await;
    let orders = unique("commit");
    declare(&rch, &orders).await;
    let store = ferry_integration_tests::FailingStore::new();
    let toml = shovel_toml(&format!(
        "src_uri = \"{}\"\nsrc_queue = \"{orders}\"\ndest_uri = \"local\"\n\
         dest_exchange = \"amq.direct\"\ndest_exchange_key = \"orders\"\n",
        rabbit.uri()
    ));
    let local = TestServer::start_with_store(&toml, &frontends(), store.clone()).await;
    up(&local).await;
    let (_lc, lch) = ferry_integration_tests::amqp::lapin_channel(&local).await;
    declare(&lch, "kept").await;
    within(
        "bind",
        lch.queue_bind(
            "kept".into(),
            "amq.direct".into(),
            "orders".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .unwrap();
    // The local disk fails: persistent messages cannot be committed.
    store.set_failing(true);
    within("confirms", rch.confirm_select(ConfirmSelectOptions::default())).await.unwrap();
    for i in 0..5 {
        publish(&rch, "", &orders, format!("p{i}").as_bytes(), BasicProperties::default().with_delivery_mode(2)).await;
    }
    let st = status_when(&local, "the commit failure ends the link", |s| {
        s.last_error.as_deref().is_some_and(|e| e.contains("local store failed"))
    })
    .await;
    assert!(st.forwarded_in >= 1, "{st:?}");
    local.stop().await;
    // Nothing was acked on RabbitMQ: all five are there again.
    let (_rc2, rch2) = rabbit.channel().await;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let ok =
        within("declare", rch2.queue_declare(orders.as_str().into(), passive, FieldTable::default())).await.unwrap();
    assert_eq!(ok.message_count(), 5, "every message still on RabbitMQ");
}

// ----- failures ------------------------------------------------------------------------------

/// A TCP proxy in front of the remote that the test can cut (connections dropped, the port
/// refusing) and restore on the same port.
struct Proxy {
    port: u16,
    target: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let mut p = Proxy { port: free_port(), target, task: None };
        p.restore().await;
        p
    }

    async fn restore(&mut self) {
        let listener = within("proxy bind", async {
            loop {
                match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                    Ok(l) => return l,
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                }
            }
        })
        .await;
        let target = self.target;
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }

    /// Drops every proxied connection and stops listening.
    async fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    fn uri(&self) -> String {
        format!("amqp://127.0.0.1:{}/%2f", self.port)
    }
}

#[tokio::test]
async fn a_remote_outage_is_ridden_out_and_the_backlog_arrives_in_order() {
    let Some(rabbit) = rabbit().await else { return };
    let (_rc, rch) = rabbit.channel().await;
    let work = unique("outage");
    declare(&rch, &work).await;
    let mut proxy = Proxy::start(rabbit.addr()).await;
    let local = ferry(&out_to(&proxy.uri(), &format!("dest_queue = \"{work}\""), "")).await;
    up(&local).await;
    let mut mqtt = v311::connect(&local, "pub").await;
    mqtt.publish("telemetry/t", Q1, false, b"before").await;
    status_when(&local, "first out", |s| s.forwarded_out == 1).await;
    proxy.cut().await;
    let st = status_when(&local, "backing off", |s| s.state == LinkState::BackingOff).await;
    assert!(st.last_error.is_some(), "{st:?}");
    let n = 40;
    for i in 0..n {
        mqtt.publish("telemetry/t", Q1, false, format!("during {i}").as_bytes()).await;
    }
    status_when(&local, "backlog held locally", |s| s.queued + s.in_flight == n).await;
    // Down for at least one more attempt, which fails.
    status_when(&local, "an attempt failed", |s| s.attempts > s.connects && s.state == LinkState::BackingOff).await;
    proxy.restore().await;
    let st = status_when(&local, "up and drained", |s| s.state == LinkState::Up && s.forwarded_out == n + 1).await;
    assert!(st.connects >= 2 && st.attempts > st.connects, "{st:?}");
    let mut c = consume(&rch, &work).await;
    assert_eq!(next(&mut c).await.0, "before");
    for i in 0..n {
        assert_eq!(next(&mut c).await.0, format!("during {i}"));
    }
}

#[tokio::test]
async fn a_wrong_password_is_a_clear_error_and_rabbitmq_is_unaffected() {
    let Some(rabbit) = rabbit().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "not-the-password\n").unwrap();
    let local =
        ferry(&out_to(&rabbit.uri(), "dest_queue = \"nowhere\"", &format!("password_file = \"{}\"\n", pw.display())))
            .await;
    let st = status_when(&local, "refused", |s| s.state == LinkState::BackingOff && s.attempts >= 2).await;
    let e = st.last_error.expect("an error");
    assert!(e.contains("403") && e.contains("ACCESS_REFUSED"), "{e}");
    assert!(!e.contains("not-the-password"), "{e}");
    assert_eq!(st.connects, 0);
    // RabbitMQ goes on serving others.
    let (_rc, rch) = rabbit.channel().await;
    declare(&rch, &unique("fine")).await;
}

#[tokio::test]
async fn a_user_allowed_only_to_write_the_default_exchange_can_shovel_into_a_queue() {
    // As docs/bridges.md's example sets the user up: no configure, no read, write on
    // amq.default only.
    let Some(rabbit) = rabbit().await else { return };
    let user = unique("edge");
    rabbit.ctl(&["add_user", &user, "edge-secret"]);
    rabbit.ctl(&["set_permissions", "-p", "/", &user, "^$", "^amq\\.default$", "^$"]);
    let (_rc, rch) = rabbit.channel().await;
    let work = unique("minimal");
    declare(&rch, &work).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), "edge-secret\n").unwrap();
    let uri = format!("amqp://{user}@127.0.0.1:{}/%2f", rabbit.port);
    let extra = format!("password_file = \"{}\"\nadd_forward_headers = true\n", dir.path().join("pw").display());
    let local = ferry(&out_to(&uri, &format!("dest_queue = \"{work}\""), &extra)).await;
    up(&local).await;
    let mut mqtt = v311::connect(&local, "pub").await;
    for i in 0..3 {
        mqtt.publish("telemetry/site7/t1", Q1, false, format!("21.{i}").as_bytes()).await;
    }
    let mut c = consume(&rch, &work).await;
    for i in 0..3 {
        assert_eq!(next(&mut c).await.0, format!("21.{i}"));
    }
    status_when(&local, "confirmed", |s| s.forwarded_out == 3).await;
}

#[tokio::test]
async fn a_nack_from_a_full_rabbitmq_queue_is_retried_until_there_is_room() {
    let Some(rabbit) = rabbit().await else { return };
    let (_rc, rch) = rabbit.channel().await;
    let tight = unique("tight");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
    let opts = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    within("declare", rch.queue_declare(tight.as_str().into(), opts, args)).await.unwrap();
    let local = ferry(&out_to(&rabbit.uri(), &format!("dest_queue = \"{tight}\""), "")).await;
    up(&local).await;
    let mut mqtt = v311::connect(&local, "pub").await;
    for i in 0..3 {
        mqtt.publish("telemetry/n", Q1, false, format!("n{i}").as_bytes()).await;
    }
    // The queue holds one; the next is nacked and kept, tried again after each back-off.
    let st = status_when(&local, "nacked, the first confirmed", |s| {
        s.nacked >= 1 && s.last_error.as_deref().is_some_and(|e| e.contains("basic.nack"))
    })
    .await;
    assert_eq!(st.forwarded_out, 1, "{st:?}");
    let mut c = consume(&rch, &tight).await;
    for i in 0..3 {
        assert_eq!(next(&mut c).await.0, format!("n{i}"), "in order, none lost");
    }
    status_when(&local, "all confirmed", |s| s.forwarded_out == 3 && s.queued == 0 && s.in_flight == 0).await;
}

#[tokio::test]
async fn a_remote_that_never_answers_times_out() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("amqp://127.0.0.1:{}", silent.local_addr().unwrap().port());
    let local = ferry(&out_to(&uri, "dest_queue = \"q\"", "connect_timeout_secs = 1\n")).await;
    let st = status_when(&local, "timed out", |s| s.state == LinkState::BackingOff).await;
    assert_eq!(st.last_error.as_deref(), Some("no AMQP handshake within 1s"), "{st:?}");
}

#[tokio::test]
async fn a_missing_predeclared_remote_queue_is_named_in_the_error() {
    let Some(rabbit) = rabbit().await else { return };
    let missing = unique("missing");
    let local =
        ferry(&out_to(&rabbit.uri(), &format!("dest_queue = \"{missing}\""), "dest_predeclared = true\n")).await;
    let st = status_when(&local, "refused", |s| s.state == LinkState::BackingOff).await;
    let e = st.last_error.expect("an error");
    assert!(e.contains("404") && e.contains(&missing), "{e}");
}

/// As RabbitMQ's shovels do: a named queue that is not there is declared durable with the side's
/// queue arguments, on the remote (the destination of an `out` shovel, the source of an `in`
/// one) and locally (the destination of an `in` shovel).
#[tokio::test]
async fn missing_queues_are_declared_durable_with_their_arguments_on_either_side() {
    let Some(rabbit) = rabbit().await else { return };
    let (_rc, rch) = rabbit.channel().await;
    // Out: RabbitMQ's destination queue, at most 3 messages.
    let dest = unique("declared-dest");
    let local = ferry(&out_to(
        &rabbit.uri(),
        &format!("dest_queue = \"{dest}\"\ndest_queue_args = {{ \"x-max-length\" = 3 }}"),
        "",
    ))
    .await;
    up(&local).await;
    let mut mqtt = v311::connect(&local, "pub").await;
    for i in 0..5 {
        mqtt.publish("telemetry/n", Q1, false, format!("n{i}").as_bytes()).await;
    }
    status_when(&local, "all confirmed", |s| s.forwarded_out == 5).await;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(3));
    // Declaring it again durable with the same argument is accepted (another would be a 406).
    let opts = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    let ok = within("declare", rch.queue_declare(dest.as_str().into(), opts, args)).await.unwrap();
    assert_eq!(ok.message_count(), 3, "x-max-length 3 kept the newest three");
    let mut c = consume(&rch, &dest).await;
    for i in 2..5 {
        assert_eq!(next(&mut c).await.0, format!("n{i}"));
    }

    // In: RabbitMQ's source queue and Ferry's destination queue, neither there yet.
    let (src, kept) = (unique("declared-src"), unique("declared-local"));
    let local = ferry(&format!(
        "src_uri = \"{}\"\nsrc_queue = \"{src}\"\nsrc_queue_args = {{ \"x-message-ttl\" = 600000 }}\n\
         dest_uri = \"local\"\ndest_queue = \"{kept}\"\ndest_queue_args = {{ \"x-max-length\" = 10 }}\n",
        rabbit.uri()
    ))
    .await;
    up(&local).await;
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(600_000));
    let opts = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    within("declare", rch.queue_declare(src.as_str().into(), opts, args)).await.expect("the shovel declared it so");
    publish(&rch, "", &src, b"from rabbit", BasicProperties::default()).await;
    let (_lc, lch) = ferry_integration_tests::amqp::lapin_channel(&local).await;
    let mut c = consume(&lch, &kept).await;
    assert_eq!(next(&mut c).await.0, "from rabbit");
    let q = local.server.broker().vhost("/").unwrap().queue(&kept).expect("declared locally");
    assert!(q.options().durable, "durable");
    assert_eq!(q.args().max_length, Some(10));
}

/// A cluster's nodes as a list (RabbitMQ's `src-uri` / `dest-uri` lists): a node that is down
/// is left for another after its failure, and the status names the node connected to.
#[tokio::test]
async fn a_list_of_remote_uris_fails_over_to_a_node_that_is_up() {
    let Some(rabbit) = rabbit().await else { return };
    let (_rc, rch) = rabbit.channel().await;
    let work = unique("failover");
    declare(&rch, &work).await;
    let down = format!("amqp://127.0.0.1:{}/%2f", free_port());
    let dest = format!("dest_uri = [\"{down}\", \"{}\"]\ndest_queue = \"{work}\"\n", rabbit.uri());
    let local = ferry(&format!(
        "src_uri = \"local\"\nsrc_exchange = \"amq.topic\"\nsrc_exchange_key = \"telemetry.#\"\n{dest}"
    ))
    .await;
    let st = up(&local).await;
    assert_eq!(st.remote, rabbit.uri(), "{st:?}");
    let mut mqtt = v311::connect(&local, "pub").await;
    mqtt.publish("telemetry/a", Q1, false, b"via the live node").await;
    let mut c = consume(&rch, &work).await;
    assert_eq!(next(&mut c).await.0, "via the live node");
}

#[tokio::test]
async fn a_shovel_logs_in_to_rabbitmq_with_amqplain() {
    let Some(rabbit) = rabbit().await else { return };
    let (_rc, rch) = rabbit.channel().await;
    let work = unique("amqplain");
    declare(&rch, &work).await;
    let uri = format!("{}?auth_mechanism=amqplain", rabbit.uri());
    let local = ferry(&out_to(&uri, &format!("dest_queue = \"{work}\""), "")).await;
    up(&local).await;
    let mut mqtt = v311::connect(&local, "pub").await;
    mqtt.publish("telemetry/a", Q1, false, b"logged in").await;
    let mut c = consume(&rch, &work).await;
    assert_eq!(next(&mut c).await.0, "logged in");
}

// ----- Ferry ↔ Ferry -------------------------------------------------------------------------

#[tokio::test]
async fn two_ferrys_shovelling_both_ways_on_one_exchange_do_not_loop() {
    let (pa, pb) = (free_port(), free_port());
    let toml = |own: u16, other: u16| {
        format!(
            "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
             [[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:{own}\"\n\
             [[shovels]]\nname = \"s\"\nreconnect_initial_ms = 50\nreconnect_max_ms = 400\n\
             src_uri = \"local\"\nsrc_exchange = \"amq.topic\"\nsrc_exchange_key = \"t.#\"\n\
             dest_uri = \"amqp://127.0.0.1:{other}\"\ndest_exchange = \"amq.topic\"\n"
        )
    };
    let a = TestServer::start(&toml(pa, pb), &frontends()).await;
    let b = TestServer::start(&toml(pb, pa), &frontends()).await;
    up(&a).await;
    up(&b).await;
    let mut sub_a = v311::connect(&a, "sub-a").await;
    sub_a.subscribe("#", Q1).await;
    let mut sub_b = v311::connect(&b, "sub-b").await;
    sub_b.subscribe("#", Q1).await;
    let mut p = v311::connect(&a, "pub").await;
    p.publish("t/1", Q1, false, b"once").await;
    let got = sub_a.publish_received().await;
    assert_eq!((got.topic.as_str(), text(&got.payload)), ("t/1", "once"));
    let got = sub_b.publish_received().await;
    assert_eq!((got.topic.as_str(), text(&got.payload)), ("t/1", "once"));
    // B's shovel sees it with one hop already and does not send it back.
    let st = status_when(&b, "dropped at max_hops", |s| s.dropped_max_hops == 1).await;
    assert_eq!(st.forwarded_out, 0, "{st:?}");
    sub_a.no_publish().await;
    sub_b.no_publish().await;
    let st = status_when(&a, "a sent one", |s| s.forwarded_out == 1).await;
    assert_eq!(st.dropped_max_hops, 0);
}

// ----- amqps:// --------------------------------------------------------------------------------

#[tokio::test]
async fn amqps_to_a_ferry_tls_listener_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    ferry_integration_tests::write_pki(dir.path());
    let toml = "[[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n\
                [[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n\
                tls = { cert = \"server.pem\", key = \"server.key\", client_ca = \"ca.pem\", require_client_cert = true }\n";
    let remote = TestServer::start_in(dir, toml, &frontends()).await.unwrap_or_else(|e| panic!("{e}"));
    let (_rc, rch) = ferry_integration_tests::amqp::lapin_channel(&remote).await;
    declare(&rch, "secure").await;
    let d = remote.dir.path();
    let tls = |name: &str| {
        format!(
            "tls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\", server_name = \"{name}\" }}\n",
            d.join("ca.pem").display(),
            d.join("client.pem").display(),
            d.join("client.key").display()
        )
    };
    let uri = format!("amqps://127.0.0.1:{}", remote.addr(1).port());
    let local = ferry(&out_to(&uri, "dest_queue = \"secure\"", &tls("localhost"))).await;
    up(&local).await;
    let mut mqtt = v311::connect(&local, "pub").await;
    mqtt.publish("telemetry/tls", Q1, false, b"over TLS").await;
    let mut c = consume(&rch, "secure").await;
    assert_eq!(next(&mut c).await.0, "over TLS");
    status_when(&local, "confirmed", |s| s.forwarded_out == 1).await;
    // A certificate not valid for the name asked: a clear error, retried, nothing sent.
    let wrong = ferry(&out_to(&uri, "dest_queue = \"secure\"", &tls("wrong.example"))).await;
    let st = status_when(&wrong, "refused", |s| s.state == LinkState::BackingOff && s.attempts >= 2).await;
    let e = st.last_error.unwrap();
    assert!(e.contains("TLS handshake failed") && e.contains("not valid for name"), "{e}");
    assert_eq!(st.connects, 0);
}

/// RabbitMQ's way of saying it all in the URI: the TLS files, the name and
/// `auth_mechanism=external`, so that the client certificate is the login (the remote Ferry's
/// `cert_login`, as RabbitMQ's `rabbitmq_auth_mechanism_ssl`): no password anywhere.
#[tokio::test]
async fn amqps_with_external_login_and_tls_files_in_the_uri_query() {
    let dir = tempfile::tempdir().unwrap();
    ferry_integration_tests::write_pki(dir.path());
    let toml = "[[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n\
                [[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\ncert_login = \"common_name\"\n\
                tls = { cert = \"server.pem\", key = \"server.key\", client_ca = \"ca.pem\", require_client_cert = true }\n";
    let remote = TestServer::start_in(dir, toml, &frontends()).await.unwrap_or_else(|e| panic!("{e}"));
    let (_rc, rch) = ferry_integration_tests::amqp::lapin_channel(&remote).await;
    declare(&rch, "secure").await;
    let d = remote.dir.path();
    let file = |f: &str| d.join(f).display().to_string().replace('/', "%2F");
    let uri = format!(
        "amqps://127.0.0.1:{}/%2f?auth_mechanism=external&cacertfile={}&certfile={}&keyfile={}\
         &server_name_indication=localhost&verify=verify_peer&heartbeat=30",
        remote.addr(1).port(),
        file("ca.pem"),
        file("client.pem"),
        file("client.key")
    );
    let local = ferry(&out_to(&uri, "dest_queue = \"secure\"", "")).await;
    up(&local).await;
    let mut mqtt = v311::connect(&local, "pub").await;
    mqtt.publish("telemetry/tls", Q1, false, b"as edge").await;
    let mut c = consume(&rch, "secure").await;
    assert_eq!(next(&mut c).await.0, "as edge");
    status_when(&local, "confirmed", |s| s.forwarded_out == 1).await;
    let connections = remote.server.broker().connections().list();
    let shovel = connections.iter().find(|c| c.client_id.as_deref() == Some("Ferry shovel s"));
    let shovel = shovel.unwrap_or_else(|| panic!("the shovel's connection: {connections:?}"));
    assert_eq!(shovel.user.as_deref(), Some("edge"), "logged in as the certificate's CN: {shovel:?}");
}

#[test]
fn check_config_loads_a_shovels_password_file_and_tls_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.toml");
    let toml = shovel_toml(
        "src_uri = \"local\"\nsrc_queue = \"q\"\ndest_uri = \"amqps://ferry@localhost\"\n\
         password_file = \"missing.pw\"\ntls = { ca = \"missing-ca.pem\" }\n",
    );
    std::fs::write(&path, &toml).unwrap();
    let msg = ferry_server::check_file(&path).unwrap_err().to_string();
    assert!(msg.contains("shovels[0].password_file: ") && msg.contains("missing.pw"), "{msg}");
    assert!(msg.contains("shovels[0].tls.ca: cannot read ") && msg.contains("missing-ca.pem"), "{msg}");
    ferry_integration_tests::write_pki(dir.path());
    std::fs::write(dir.path().join("missing.pw"), "secret\n").unwrap();
    std::fs::write(&path, toml.replace("missing-ca.pem", "ca.pem")).unwrap();
    ferry_server::check_file(&path).unwrap_or_else(|e| panic!("{e}"));
}

// ----- throughput ------------------------------------------------------------------------------

/// Not a benchmark (debug build, one machine shared with the broker): a backlog of 5000
/// messages each way, in order, with the rate printed (`--nocapture`) for the record.
#[tokio::test]
async fn a_backlog_of_5000_goes_each_way_in_order() {
    let Some(rabbit) = rabbit().await else { return };
    let n: u64 = 5000;
    let (_rc, rch) = rabbit.channel().await;
    // Out: the backlog is made while the remote is cut off, then sent at once.
    let work = unique("bulk-out");
    declare(&rch, &work).await;
    let mut proxy = Proxy::start(rabbit.addr()).await;
    proxy.cut().await;
    let local = ferry(&out_to(&proxy.uri(), &format!("dest_queue = \"{work}\""), "")).await;
    let (_lc, lch) = ferry_integration_tests::amqp::lapin_channel(&local).await;
    within("confirms", lch.confirm_select(ConfirmSelectOptions::default())).await.unwrap();
    let mut confirms = Vec::new();
    for i in 0..n {
        let body = format!("m{i}");
        let props = BasicProperties::default().with_delivery_mode(2);
        let c = lch.basic_publish(
            "amq.topic".into(),
            "telemetry.bulk".into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            props,
        );
        confirms.push(within("publish", c).await.expect("publish"));
    }
    for c in confirms {
        within("confirm", c).await.expect("confirmed");
    }
    status_when(&local, "backlog queued", |s| s.queued + s.in_flight == n).await;
    let started = std::time::Instant::now();
    proxy.restore().await;
    status_when(&local, "backlog confirmed", |s| s.forwarded_out == n).await;
    let out_secs = started.elapsed().as_secs_f64();
    let mut c = consume(&rch, &work).await;
    for i in 0..n {
        let d = within("delivery", c.next()).await.expect("open").expect("delivery");
        assert_eq!(d.data, format!("m{i}").into_bytes());
        within("ack", d.acker.ack(BasicAckOptions::default())).await.unwrap();
    }
    // In: a backlog on RabbitMQ, shovelled into a durable local queue.
    let orders = unique("bulk-in");
    declare(&rch, &orders).await;
    within("confirms", rch.confirm_select(ConfirmSelectOptions::default())).await.unwrap();
    let mut confirms = Vec::new();
    for i in 0..n {
        let body = format!("m{i}");
        let props = BasicProperties::default().with_delivery_mode(2);
        let c = rch.basic_publish(
            "".into(),
            orders.as_str().into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            props,
        );
        confirms.push(within("publish", c).await.expect("publish"));
    }
    for c in confirms {
        within("confirm", c).await.expect("confirmed");
    }
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n\
         [[shovels]]\nname = \"s\"\nsrc_uri = \"{}\"\nsrc_queue = \"{orders}\"\ndest_uri = \"local\"\n\
         dest_queue = \"kept\"\n",
        rabbit.uri()
    );
    // The local destination queue exists before the shovel starts: made by a first start.
    let first = TestServer::start_in(dir, "[[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n", &frontends())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (_c1, ch1) = ferry_integration_tests::amqp::lapin_channel(&first).await;
    declare(&ch1, "kept").await;
    drop((_c1, ch1));
    let dir = first.stop().await;
    std::fs::write(dir.path().join("ferry.toml"), &toml).unwrap();
    let started = std::time::Instant::now();
    let local = TestServer::resume(dir).await;
    status_when(&local, "backlog in", |s| s.forwarded_in == n).await;
    let in_secs = started.elapsed().as_secs_f64();
    let (_c2, ch2) = ferry_integration_tests::amqp::lapin_channel(&local).await;
    let mut c = consume(&ch2, "kept").await;
    for i in 0..n {
        let d = within("delivery", c.next()).await.expect("open").expect("delivery");
        assert_eq!(d.data, format!("m{i}").into_bytes());
        within("ack", d.acker.ack(BasicAckOptions::default())).await.unwrap();
    }
    eprintln!(
        "shovel backlog of {n} persistent messages: out (Ferry → RabbitMQ, on-confirm) {:.2} s = {:.0} msg/s; \
         in (RabbitMQ → Ferry durable queue, on-confirm) {:.2} s = {:.0} msg/s",
        out_secs,
        n as f64 / out_secs,
        in_secs,
        n as f64 / in_secs
    );
}

// ----- the backlog's limits --------------------------------------------------------------------

#[tokio::test]
async fn a_full_backlog_drops_the_oldest_and_the_remote_gets_the_newest_in_order() {
    let pb = free_port();
    let local = ferry(&format!(
        "src_uri = \"local\"\nsrc_exchange = \"amq.topic\"\nsrc_exchange_key = \"t.#\"\n\
         dest_uri = \"amqp://127.0.0.1:{pb}\"\ndest_queue = \"work\"\nmax_queued_messages = 5\nprefetch_count = 2\n"
    ))
    .await;
    status_when(&local, "remote down", |s| s.state == LinkState::BackingOff).await;
    let mut p = v311::connect(&local, "pub").await;
    for i in 0..8 {
        p.publish("t/1", Q1, false, format!("m{i}").as_bytes()).await;
    }
    // The first two wait in the shovel's window (prefetch), the newest five in the queue; the
    // one between was dropped when the sixth waiting message came.
    let st = local.server.bridges().status().remove(0);
    assert_eq!((st.queued, st.in_flight, st.dropped_overflow), (5, 2, 1), "{st:?}");
    // The remote comes up with the queue the shovel delivers to.
    let remote =
        TestServer::start(&format!("[[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:{pb}\"\n"), &frontends())
            .await;
    let conn = within("lapin", Connection::connect(&remote.amqp_uri(""), ConnectionProperties::default()))
        .await
        .expect("lapin connects");
    let ch = within("channel", conn.create_channel()).await.expect("channel");
    declare(&ch, "work").await;
    status_when(&local, "drained", |s| s.forwarded_out == 7).await;
    let mut c = consume(&ch, "work").await;
    for i in [0, 1, 3, 4, 5, 6, 7] {
        assert_eq!(next(&mut c).await.0, format!("m{i}"));
    }
}

#[tokio::test]
async fn a_changed_src_exchange_key_takes_the_old_binding_away_at_the_next_start() {
    let toml = |key: &str| {
        shovel_toml(&format!(
            "src_uri = \"local\"\nsrc_exchange = \"amq.topic\"\nsrc_exchange_key = \"{key}\"\n\
             dest_uri = \"amqp://127.0.0.1:{}\"\ndest_queue = \"work\"\nprefetch_count = 1\n",
            free_port()
        ))
    };
    let bindings = |server: &TestServer| {
        let x = server.server.broker().vhost("/").expect("vhost").exchange("amq.topic").expect("amq.topic");
        let mut keys: Vec<String> = x
            .bindings()
            .into_iter()
            .filter(|b| b.destination.describe() == "queue 'ferry-bridge.s'")
            .map(|b| b.key.routing_key.to_string_lossy())
            .collect();
        keys.sort();
        keys
    };
    let local = TestServer::start(&toml("old.#"), &frontends()).await;
    assert_eq!(bindings(&local), ["old.#"]);
    let local = TestServer::start_in(local.stop().await, &toml("new.#"), &frontends()).await.expect("restart");
    assert_eq!(bindings(&local), ["new.#"], "the old key's binding is gone");
    let mut p = v311::connect(&local, "pub").await;
    p.publish("old/1", Q1, false, b"not for the shovel any more").await;
    p.publish("new/1", Q1, false, b"for the shovel").await;
    let st = local.server.bridges().status().remove(0);
    assert_eq!(st.queued + st.in_flight, 1, "only the new key's message is queued: {st:?}");
}

#[tokio::test]
async fn a_stalled_remote_leaves_the_backlog_in_the_queue_not_in_memory_even_on_publish() {
    let remote = TestServer::start("[[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n", &frontends()).await;
    let conn = within("lapin", Connection::connect(&remote.amqp_uri(""), ConnectionProperties::default()))
        .await
        .expect("lapin connects");
    let ch = within("channel", conn.create_channel()).await.expect("channel");
    declare(&ch, "work").await;
    let (port, stall) = ferry_integration_tests::stalling_proxy(remote.amqp_addr()).await;
    let local = ferry(&format!(
        "src_uri = \"local\"\nsrc_exchange = \"amq.topic\"\nsrc_exchange_key = \"t.#\"\n\
         dest_uri = \"amqp://127.0.0.1:{port}\"\ndest_queue = \"work\"\nack_mode = \"on-publish\"\nheartbeat_secs = 0\n"
    ))
    .await;
    up(&local).await;
    stall.send_replace(true);
    let n = 500;
    let body = vec![b'x'; 64 * 1024];
    let lc = within("lapin", Connection::connect(&local.amqp_uri(""), ConnectionProperties::default()))
        .await
        .expect("lapin connects");
    let lch = within("channel", lc.create_channel()).await.expect("channel");
    for i in 0..n {
        let mut m = format!("{i:04}").into_bytes();
        m.extend_from_slice(&body);
        publish(&lch, "amq.topic", "t.1", &m, BasicProperties::default().with_delivery_mode(2)).await;
    }
    // The bound holds at every moment of the stall, so it is checked as soon as everything
    // was published.
    // What was settled left the local queue for good: at most what the socket buffers and the
    // shovel's 1 MiB writer backlog hold (a few hundred KiB to ~10 MiB of 64 KiB messages),
    // not all 32 MiB.
    let st = local.server.bridges().status().remove(0);
    assert!(st.forwarded_out < 300 && st.queued + st.in_flight > 0, "{st:?}");
    stall.send_replace(false);
    status_when(&local, "all sent", |s| s.forwarded_out == n).await;
    let mut c = consume(&ch, "work").await;
    for i in 0..n {
        assert_eq!(&next(&mut c).await.0[..4], format!("{i:04}"));
    }
}
