//! One client must not hurt the others (issue 13): each test runs an attacker as a hostile
//! client would — a bad-login flood, an AMQP user aiming at an MQTT client's session queue, a
//! packet trickled a byte at a time — and asserts on the victim: its messages kept, its login.
//! (A subscriber that never reads is in `slow_subscriber.rs`, alone in its process: it measures
//! a rate.)

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_core::auth::PasswordHash;
use ferry_integration_tests::amqp::{args, assert_code, lapin_uri, AMQP_LISTENER};
use ferry_integration_tests::mqtt::{connect_packet, publish_packet, sub_options, RawClient, MQTT_LISTENER};
use ferry_integration_tests::{within, TestServer};
use ferry_mqtt::codec::{Packet, ProtocolVersion, QoS, Str};
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;

const V311: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

/// Every configured user's password.
const PASSWORD: &str = "pw";

fn password_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| PasswordHash::argon2id(PASSWORD.as_bytes()))
}

fn users(names: &[&str]) -> String {
    names.iter().map(|n| format!("[[users]]\nname = \"{n}\"\npassword_hash = \"{}\"\n", password_hash())).collect()
}

async fn start(toml: &str) -> TestServer {
    let frontends = ferry_server::frontends::builtin(&Default::default());
    TestServer::start(toml, &frontends).await
}

fn with_login(mut c: ferry_mqtt::codec::Connect, user: &str, password: &str) -> ferry_mqtt::codec::Connect {
    c.username = Some(Str::from(user));
    c.password = Some(Bytes::copy_from_slice(password.as_bytes()));
    c
}

// ----- 1. an AMQP user and an offline MQTT client's session queue --------------------------------

/// The attack of issue 13: an AMQP user with `write = ".*"` but an MQTT ACL of `svc/#` fills an
/// offline MQTT client's session queue through the default exchange, pushing the client's own
/// messages out past `max_queued_messages`. Every way in is refused — the default exchange,
/// bindings, purge, delete, get, consume, declaring such a queue, dead-lettering into it — and
/// the client finds exactly its own messages when it comes back.
#[tokio::test]
async fn an_amqp_user_cannot_reach_an_offline_mqtt_clients_session_queue() {
    let toml = format!(
        "{}{}[[permissions]]\nuser = \"svc\"\nconfigure = \".*\"\nwrite = \".*\"\nread = \".*\"\n\
         [[permissions]]\nuser = \"admin\"\nconfigure = \".*\"\nwrite = \".*\"\nread = \".*\"\n\
         [[acl]]\nuser = \"svc\"\ntopic = \"svc/#\"\naccess = \"readwrite\"\n\
         [[acl]]\nuser = \"dash\"\ntopic = \"dash/#\"\naccess = \"readwrite\"\n\
         [[acl]]\nuser = \"admin\"\ntopic = \"#\"\naccess = \"readwrite\"\n\
         [mqtt]\nmax_queued_messages = 10\n",
        users(&["svc", "dash", "admin"]),
        format_args!("{MQTT_LISTENER}{AMQP_LISTENER}"),
    );
    let server = start(&toml).await;
    let mqtt = server.mqtt_addr();
    // dash-1 subscribes in a persistent session and goes away; 5 messages wait for it.
    let (mut dash, ack) =
        RawClient::connect(mqtt, with_login(connect_packet(V311, "dash-1", false), "dash", PASSWORD)).await;
    assert_eq!(ack.code, 0);
    dash.subscribe(1, "dash/#", sub_options(QoS::AtLeastOnce)).await;
    dash.send(&Packet::Disconnect(ferry_mqtt::codec::Disconnect { reason: 0, properties: Default::default() })).await;
    dash.closed().await;
    let (mut publisher, _) =
        RawClient::connect(mqtt, with_login(connect_packet(V311, "dash-pub", true), "dash", PASSWORD)).await;
    for i in 0..5u16 {
        publisher.publish(publish_packet("dash/x", QoS::AtLeastOnce, i + 1, format!("legit {i}").as_bytes())).await;
    }

    let queue = "mqtt-session.dash-1";
    for user in ["svc", "admin"] {
        let conn = lapin_uri(&format!("amqp://{user}:{PASSWORD}@{}/%2f", server.amqp_addr())).await;
        let refused = |what: &str| {
            format!("it holds an MQTT client's session and only MQTT subscriptions fill it ({what}, as {user})")
        };
        // The default exchange: refused at the publish, a channel error.
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        let published = async {
            let confirm = ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    b"flood",
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?;
            confirm.await
        };
        assert_code(within("publish", published).await, 403);
        let ch = conn.create_channel().await.unwrap();
        let bound = ch.queue_bind(
            queue.into(),
            "amq.topic".into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        );
        assert_code(within("bind", bound).await, 403);
        let ch = conn.create_channel().await.unwrap();
        assert_code(within("purge", ch.queue_purge(queue.into(), QueuePurgeOptions::default())).await, 403);
        let ch = conn.create_channel().await.unwrap();
        assert_code(within("delete", ch.queue_delete(queue.into(), QueueDeleteOptions::default())).await, 403);
        let ch = conn.create_channel().await.unwrap();
        assert_code(within("get", ch.basic_get(queue.into(), BasicGetOptions { no_ack: true })).await, 403);
        let ch = conn.create_channel().await.unwrap();
        let consumed = ch.basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default());
        assert_code(within("consume", consumed).await, 403);
        let ch = conn.create_channel().await.unwrap();
        let declared =
            ch.queue_declare("mqtt-session.not-yet".into(), QueueDeclareOptions::default(), FieldTable::default());
        assert_code(within("declare", declared).await, 403);
        // A passive declare changes nothing and is answered.
        let ch = conn.create_channel().await.unwrap();
        let passive = QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
        let q = within("passive declare", ch.queue_declare(queue.into(), passive, FieldTable::default())).await;
        assert_eq!(q.expect("passive declare").message_count(), 5, "{}", refused("passive"));
        // Dead letters addressed to it through the default exchange are not routed there.
        let dl = args(&[
            ("x-dead-letter-exchange", AMQPValue::LongString(LongString::from(""))),
            ("x-dead-letter-routing-key", AMQPValue::LongString(LongString::from(queue))),
            ("x-message-ttl", AMQPValue::LongInt(0)),
        ]);
        let dl_queue = format!("{user}.dl");
        within("declare", ch.queue_declare(dl_queue.as_str().into(), QueueDeclareOptions::default(), dl))
            .await
            .unwrap();
        for _ in 0..20 {
            ch.basic_publish(
                "".into(),
                dl_queue.as_str().into(),
                BasicPublishOptions::default(),
                b"dead",
                BasicProperties::default(),
            )
            .await
            .unwrap();
        }
        let q =
            within("passive declare", ch.queue_declare(queue.into(), passive, FieldTable::default())).await.unwrap();
        assert_eq!(q.message_count(), 5, "dead letters must not reach the session queue");
    }

    // dash-1 comes back to its five messages, in order, and nothing else.
    let (mut dash, ack) =
        RawClient::connect(mqtt, with_login(connect_packet(V311, "dash-1", false), "dash", PASSWORD)).await;
    assert!(ack.session_present);
    for i in 0..5 {
        let p = dash.recv_publish().await;
        assert_eq!(&p.payload[..], format!("legit {i}").as_bytes());
        dash.send(&Packet::PubAck(ferry_mqtt::codec::PubResp::ok(p.packet_id.unwrap()))).await;
    }
    dash.quiet().await;
}

// ----- 3. a bad-login flood ------------------------------------------------------------------------

/// Issue 13: ~1,000 bad MQTT logins a second from 100 connections locked good clients out with
/// 0x89 "server busy". Failures now slow down, then refuse, the address they come from only: a
/// client with the right password from another address gets in within a second throughout.
#[tokio::test]
async fn a_bad_login_flood_from_one_address_does_not_keep_good_clients_elsewhere_out() {
    let toml = format!("{}{MQTT_LISTENER}", users(&["good"]));
    let server = start(&toml).await;
    let addr = server.mqtt_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    let throttled = Arc::new(AtomicU64::new(0));
    let mut attackers = Vec::new();
    for n in 0..100 {
        let (stop, attempts, throttled) = (stop.clone(), attempts.clone(), throttled.clone());
        attackers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let connect = with_login(connect_packet(V5, &format!("bad-{n}"), true), "good", "wrong");
                let mut c = RawClient::open(addr, V5).await;
                c.send(&Packet::Connect(Box::new(connect))).await;
                attempts.fetch_add(1, Ordering::Relaxed);
                if let Ok(Some(Packet::ConnAck(a))) = c.next_within(Duration::from_secs(30)).await {
                    assert_ne!(a.code, 0, "a wrong password let in");
                    if a.code == 0x9F {
                        throttled.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // Good clients from 127.0.0.2, one after another, for a few seconds of flood.
    let good_from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let flood_started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut logins = 0;
    while flood_started.elapsed() < Duration::from_secs(4) {
        let started = Instant::now();
        let mut c = RawClient::open_from(addr, good_from, V5).await;
        let connect = with_login(connect_packet(V5, &format!("good-{logins}"), true), "good", PASSWORD);
        c.send(&Packet::Connect(Box::new(connect))).await;
        match c.recv().await {
            Packet::ConnAck(a) => assert_eq!(a.code, 0, "the good client was refused: {a:?}"),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        slowest = slowest.max(started.elapsed());
        logins += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        within("an attacker stops", a).await.unwrap();
    }
    let attempts = attempts.load(Ordering::Relaxed);
    let throttled = throttled.load(Ordering::Relaxed);
    println!("{logins} good logins, slowest {slowest:?}; {attempts} bad logins, {throttled} refused as throttled");
    assert!(logins >= 10, "only {logins} good logins in 4 s");
    assert!(slowest < Duration::from_secs(1), "a good login took {slowest:?} during the flood");
    assert!(attempts > 1_000 && throttled > attempts / 2, "the flood was not throttled: {throttled} of {attempts}");
}

// ----- 6. keep alive counts packets ------------------------------------------------------------------

/// MQTT 3.1.2.10: the client must send a control packet within 1.5 × its keep alive. A PUBLISH
/// trickled one byte every 300 ms (which kept a connection with keep alive 5 open forever) does
/// not: with keep alive 1 the connection is closed about 1.5 s after the CONNECT.
#[tokio::test]
async fn a_packet_trickled_a_byte_at_a_time_does_not_keep_a_connection_alive() {
    let server = TestServer::mqtt().await;
    let mut connect = connect_packet(V311, "trickler", true);
    connect.keep_alive = 1;
    let (mut c, ack) = RawClient::connect(server.mqtt_addr(), connect).await;
    assert_eq!(ack.code, 0);
    let publish = ferry_integration_tests::mqtt::packet_bytes(
        &Packet::Publish(publish_packet("t", QoS::AtMostOnce, 0, &[0u8; 64])),
        V311,
    );
    let started = Instant::now();
    let mut sent = 0;
    let closed = loop {
        if sent == publish.len() {
            break false;
        }
        if c.try_send_bytes(&publish[sent..sent + 1]).await.is_err() {
            break true;
        }
        sent += 1;
        if let Ok(None) = c.next_within(Duration::from_millis(300)).await {
            break true;
        }
    };
    assert!(closed, "the connection outlived its keep alive while {sent} bytes trickled in");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "closed only after {took:?} (keep alive 1 s: 1.5 s)");
    assert!(sent < publish.len(), "the whole packet got through");
}
