//! Authentication (issue 7, first slice) through real clients and raw bytes: configured users
//! with argon2id hashes, anonymous access and `guest` only on loopback listeners, refusals in
//! each protocol's own terms, bypass attempts, and a flood of bad logins that must not stop the
//! broker serving its existing clients.

use std::time::Duration;

use ferry_amqp::codec::{reply_code, ConnectionStartOk, Method};
use ferry_core::auth::PasswordHash;
use ferry_core::message::FieldValue;
use ferry_integration_tests::amqp::{plain_start_ok, RawClient as AmqpRaw};
use ferry_integration_tests::mqtt::{connect_packet, publish_packet, sub_options, RawClient as MqttRaw};
use ferry_integration_tests::{within, TestServer};
use ferry_mqtt::codec::{reason, return_code, Packet, ProtocolVersion, QoS, Str};

fn users_toml() -> String {
    let hash = PasswordHash::argon2id(b"s3cret");
    format!("[[users]]\nname = \"sensor\"\npassword_hash = \"{hash}\"\n")
}

/// MQTT and AMQP listeners on `bind` with `keys`, and the users above.
async fn server(bind: &str, keys: &str) -> TestServer {
    let toml = format!(
        "{}[[listeners]]\nprotocol = \"mqtt\"\nbind = \"{bind}:0\"\n{keys}\n[[listeners]]\nprotocol = \"amqp\"\nbind = \"{bind}:0\"\n{keys}\n",
        users_toml()
    );
    let frontends = ferry_server::frontends::builtin(&Default::default());
    TestServer::start(&toml, &frontends).await
}

fn mqtt_addr(s: &TestServer) -> std::net::SocketAddr {
    let mut a = s.addr(0);
    a.set_ip([127, 0, 0, 1].into());
    a
}

fn amqp_addr(s: &TestServer) -> std::net::SocketAddr {
    let mut a = s.addr(1);
    a.set_ip([127, 0, 0, 1].into());
    a
}

fn mqtt_login(version: ProtocolVersion, user: Option<&str>, password: Option<&[u8]>) -> ferry_mqtt::codec::Connect {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let id = format!("auth-client-{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let mut c = connect_packet(version, &id, true);
    c.username = user.map(Str::from);
    c.password = password.map(bytes::Bytes::copy_from_slice);
    c
}

async fn mqtt_code(s: &TestServer, version: ProtocolVersion, user: Option<&str>, password: Option<&[u8]>) -> u8 {
    let (_c, ack) = MqttRaw::connect(mqtt_addr(s), mqtt_login(version, user, password)).await;
    ack.code
}

#[tokio::test]
async fn mqtt_users_log_in_and_bad_credentials_are_refused_in_each_version() {
    let s = server("127.0.0.1", "allow_anonymous = false").await;
    for v in [ProtocolVersion::V311, ProtocolVersion::V5] {
        assert_eq!(mqtt_code(&s, v, Some("sensor"), Some(b"s3cret")).await, 0, "{v:?} good password");
        let bad = if v == ProtocolVersion::V5 {
            reason::BAD_USER_NAME_OR_PASSWORD
        } else {
            return_code::BAD_USER_NAME_OR_PASSWORD
        };
        assert_eq!(mqtt_code(&s, v, Some("sensor"), Some(b"wrong")).await, bad, "{v:?} wrong password");
        assert_eq!(mqtt_code(&s, v, Some("nobody"), Some(b"s3cret")).await, bad, "{v:?} unknown user");
        let anonymous = if v == ProtocolVersion::V5 { reason::NOT_AUTHORIZED } else { return_code::NOT_AUTHORIZED };
        assert_eq!(mqtt_code(&s, v, None, None).await, anonymous, "{v:?} anonymous refused");
    }
}

#[tokio::test]
async fn a_loopback_listener_admits_anonymous_clients_by_default() {
    let s = server("127.0.0.1", "").await;
    assert_eq!(mqtt_code(&s, ProtocolVersion::V311, None, None).await, 0);
    assert_eq!(mqtt_code(&s, ProtocolVersion::V5, Some("sensor"), Some(b"s3cret")).await, 0);
    // Credentials that are given are still checked.
    assert_eq!(
        mqtt_code(&s, ProtocolVersion::V5, Some("sensor"), Some(b"nope")).await,
        reason::BAD_USER_NAME_OR_PASSWORD
    );
}

#[tokio::test]
async fn a_listener_on_every_interface_refuses_anonymous_clients_and_guest() {
    let s = server("0.0.0.0", "").await;
    assert_eq!(mqtt_code(&s, ProtocolVersion::V5, None, None).await, reason::NOT_AUTHORIZED);
    assert_eq!(mqtt_code(&s, ProtocolVersion::V5, Some("sensor"), Some(b"s3cret")).await, 0);
    // guest/guest only on loopback listeners (RabbitMQ's loopback_users).
    let mut c = AmqpRaw::start(amqp_addr(&s)).await.0;
    c.send_method(0, Method::ConnectionStartOk(start_ok_with_failure_close("guest", "guest"))).await;
    assert_eq!(c.expect_connection_close().await.reply_code, reply_code::ACCESS_REFUSED);
}

#[tokio::test]
async fn a_non_loopback_listener_without_a_way_to_authenticate_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let frontends = ferry_server::frontends::builtin(&Default::default());
    let toml = "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"0.0.0.0:0\"\n";
    let e = TestServer::start_in(dir, toml, &frontends).await.expect_err("must refuse to start").to_string();
    assert!(e.contains("listeners[0]") && e.contains("authenticate"), "{e}");
}

fn start_ok_with_failure_close(user: &str, password: &str) -> ConnectionStartOk {
    let mut ok = plain_start_ok(user, password);
    let mut caps = ferry_core::message::FieldTable::new();
    caps.insert("authentication_failure_close", FieldValue::Bool(true));
    ok.client_properties.insert("capabilities", FieldValue::Table(caps));
    ok
}

#[tokio::test]
async fn amqp_plain_users_log_in_and_bad_credentials_get_403() {
    let s = server("127.0.0.1", "allow_anonymous = false").await;
    let mut good = AmqpRaw::start(amqp_addr(&s)).await.0;
    good.send_method(0, Method::ConnectionStartOk(plain_start_ok("sensor", "s3cret"))).await;
    good.recv_tune().await;
    for (user, password) in [("sensor", "wrong"), ("nobody", "s3cret"), ("", "")] {
        let mut c = AmqpRaw::start(amqp_addr(&s)).await.0;
        c.send_method(0, Method::ConnectionStartOk(start_ok_with_failure_close(user, password))).await;
        let close = c.expect_connection_close().await;
        assert_eq!(close.reply_code, reply_code::ACCESS_REFUSED, "{user}/{password}");
        assert!(close.reply_text.to_string_lossy().contains("PLAIN"), "{:?}", close.reply_text);
    }
    // A client that did not ask for authentication_failure_close just sees the socket close.
    let mut c = AmqpRaw::start(amqp_addr(&s)).await.0;
    c.send_method(0, Method::ConnectionStartOk(plain_start_ok("sensor", "wrong"))).await;
    c.expect_eof().await;
}

#[tokio::test]
async fn lapin_and_amqprs_log_in_with_the_configured_user_and_are_refused_otherwise() {
    let s = server("127.0.0.1", "allow_anonymous = false").await;
    let addr = amqp_addr(&s);
    let ok = lapin::Connection::connect(&format!("amqp://sensor:s3cret@{addr}/%2f"), Default::default()).await;
    assert!(ok.is_ok(), "{ok:?}");
    let bad = lapin::Connection::connect(&format!("amqp://sensor:wrong@{addr}/%2f"), Default::default()).await;
    assert!(bad.is_err());
    let args =
        amqprs::connection::OpenConnectionArguments::new(&addr.ip().to_string(), addr.port(), "sensor", "s3cret");
    let conn = within("amqprs login", amqprs::connection::Connection::open(&args)).await;
    assert!(conn.is_ok(), "{:?}", conn.err());
    let args = amqprs::connection::OpenConnectionArguments::new(&addr.ip().to_string(), addr.port(), "sensor", "nope");
    assert!(within("amqprs bad login", amqprs::connection::Connection::open(&args)).await.is_err());
}

#[tokio::test]
async fn plain_responses_with_nuls_in_odd_places_are_refused() {
    let s = server("127.0.0.1", "allow_anonymous = false").await;
    let odd: [&[u8]; 6] = [b"", b"\0", b"\0\0", b"sensor\0s3cret", b"\0sensor", b"\0sensor\0s3cret\0extra"];
    for response in odd {
        let mut c = AmqpRaw::start(amqp_addr(&s)).await.0;
        let mut ok = start_ok_with_failure_close("x", "y");
        ok.response = bytes::Bytes::copy_from_slice(response);
        c.send_method(0, Method::ConnectionStartOk(ok)).await;
        let close = c.expect_connection_close().await;
        assert_eq!(close.reply_code, reply_code::ACCESS_REFUSED, "{response:?}");
    }
}

#[tokio::test]
async fn a_flood_of_bad_logins_does_not_stop_the_broker_serving_its_clients() {
    let s = server("127.0.0.1", "allow_anonymous = false").await;
    let addr = mqtt_addr(&s);
    let mut sub = MqttRaw::connect(addr, mqtt_login(ProtocolVersion::V5, Some("sensor"), Some(b"s3cret"))).await.0;
    sub.subscribe(1, "flood/t", sub_options(QoS::AtLeastOnce)).await;
    let mut publisher =
        MqttRaw::connect(addr, mqtt_login(ProtocolVersion::V5, Some("sensor"), Some(b"s3cret"))).await.0;
    // 200 bad logins at once, over both protocols.
    let amqp = amqp_addr(&s);
    let flood: Vec<_> = (0..200)
        .map(|i| {
            tokio::spawn(async move {
                if i % 2 == 0 {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(20),
                        MqttRaw::connect(addr, mqtt_login(ProtocolVersion::V311, Some("sensor"), Some(b"guess"))),
                    )
                    .await;
                } else {
                    let _ = tokio::time::timeout(Duration::from_secs(20), async {
                        let mut c = AmqpRaw::start(amqp).await.0;
                        c.send_method(0, Method::ConnectionStartOk(start_ok_with_failure_close("sensor", "guess")))
                            .await;
                        c.bytes_until_close().await
                    })
                    .await;
                }
            })
        })
        .collect();
    // Meanwhile the logged-in clients go on.
    for i in 1..=20u16 {
        publisher.publish(publish_packet("flood/t", QoS::AtLeastOnce, i, b"still here")).await;
        let p = within("delivery during the flood", sub.recv_publish()).await;
        assert_eq!(&p.payload[..], b"still here");
        if let Some(id) = p.packet_id {
            sub.send(&Packet::PubAck(ferry_mqtt::codec::PubResp::ok(id))).await;
        }
    }
    for f in flood {
        let _ = f.await;
    }
}

/// Frames meant to skip the login: methods before start-ok, and a bad login with tune-ok,
/// connection.open, channel.open and a publish pipelined behind it. None gets an answer but the
/// close, and nothing is routed (the legitimate message sent afterwards is the queue's first).
#[tokio::test]
async fn amqp_frames_before_the_login_completes_get_nothing_done() {
    use ferry_amqp::codec::{BasicGet, ChannelOpen, ConnectionOpen, ConnectionTuneOk, QueueDeclare};
    use ferry_core::message::ShortString;
    let s = server("127.0.0.1", "allow_anonymous = false").await;
    let addr = amqp_addr(&s);
    let mut admin = AmqpRaw::start(addr).await.0;
    admin.send_method(0, Method::ConnectionStartOk(plain_start_ok("sensor", "s3cret"))).await;
    let tune = admin.recv_tune().await;
    let tune_ok = ConnectionTuneOk { channel_max: tune.channel_max, frame_max: tune.frame_max, heartbeat: 0 };
    admin.send_method(0, Method::ConnectionTuneOk(tune_ok.clone())).await;
    admin.open_vhost("/").await;
    assert!(matches!(admin.recv_method().await, (0, Method::ConnectionOpenOk(_))));
    admin.open_channel(1).await;
    let declare = QueueDeclare { queue: ShortString::from("bypass.q"), ..QueueDeclare::default() };
    admin.send_method(1, Method::QueueDeclare(declare)).await;
    assert!(matches!(admin.recv_method().await, (1, Method::QueueDeclareOk(_))));

    // A channel opened before any login: a connection error, and no channel.
    let mut c = AmqpRaw::start(addr).await.0;
    c.send_method(1, Method::ChannelOpen(ChannelOpen::default())).await;
    let close = c.expect_connection_close().await;
    assert_eq!(close.reply_code, reply_code::CHANNEL_ERROR);
    // connection.open in place of start-ok.
    let mut c = AmqpRaw::start(addr).await.0;
    let open = ConnectionOpen { virtual_host: ShortString::from("/"), ..ConnectionOpen::default() };
    c.send_method(0, Method::ConnectionOpen(open.clone())).await;
    let close = c.expect_connection_close().await;
    assert_eq!(close.reply_code, reply_code::COMMAND_INVALID);
    // A bad login with everything a client would send next pipelined behind it.
    let mut c = AmqpRaw::start(addr).await.0;
    c.send_method(0, Method::ConnectionStartOk(start_ok_with_failure_close("sensor", "guess"))).await;
    c.send_method(0, Method::ConnectionTuneOk(tune_ok)).await;
    c.send_method(0, Method::ConnectionOpen(open)).await;
    c.send_method(1, Method::ChannelOpen(ChannelOpen::default())).await;
    c.publish(1, "", "bypass.q", b"smuggled").await;
    let close = c.expect_connection_close().await;
    assert_eq!(close.reply_code, reply_code::ACCESS_REFUSED, "the first answer is the refusal");

    admin.publish(1, "", "bypass.q", b"legit").await;
    admin
        .send_method(1, Method::BasicGet(BasicGet { queue: ShortString::from("bypass.q"), ..BasicGet::default() }))
        .await;
    match admin.recv_method().await {
        (1, Method::BasicGetOk(ok)) => assert_eq!(ok.message_count, 0, "only the legitimate message is queued"),
        other => panic!("expected get-ok, got {other:?}"),
    }
}

/// MQTT packets meant to skip the login: a PUBLISH before CONNECT, one after a refused
/// CONNECT, and a second CONNECT with other credentials on an authenticated connection. Each
/// connection is closed and nothing it sent is routed.
#[tokio::test]
async fn mqtt_packets_around_the_login_are_not_routed() {
    let s = server("127.0.0.1", "allow_anonymous = false").await;
    let addr = mqtt_addr(&s);
    let mut sub = MqttRaw::connect(addr, mqtt_login(ProtocolVersion::V5, Some("sensor"), Some(b"s3cret"))).await.0;
    sub.subscribe(1, "bypass/#", sub_options(QoS::AtMostOnce)).await;

    let mut early = MqttRaw::open(addr, ProtocolVersion::V311).await;
    early.send(&Packet::Publish(publish_packet("bypass/early", QoS::AtMostOnce, 0, b"smuggled"))).await;
    assert!(early.closed().await.is_empty(), "closed without an answer");

    let mut refused = MqttRaw::open(addr, ProtocolVersion::V311).await;
    refused.send(&Packet::Connect(Box::new(mqtt_login(ProtocolVersion::V311, Some("sensor"), Some(b"guess"))))).await;
    refused.send(&Packet::Publish(publish_packet("bypass/after-refusal", QoS::AtMostOnce, 0, b"smuggled"))).await;
    match refused.closed().await.as_slice() {
        [Packet::ConnAck(ack)] => assert_eq!(ack.code, return_code::BAD_USER_NAME_OR_PASSWORD),
        other => panic!("expected only CONNACK 4, got {other:?}"),
    }

    let mut twice = MqttRaw::connect(addr, mqtt_login(ProtocolVersion::V311, Some("sensor"), Some(b"s3cret"))).await.0;
    twice.send(&Packet::Connect(Box::new(mqtt_login(ProtocolVersion::V311, Some("admin"), Some(b"x"))))).await;
    twice.send(&Packet::Publish(publish_packet("bypass/second-connect", QoS::AtMostOnce, 0, b"smuggled"))).await;
    twice.closed().await;

    let mut publisher =
        MqttRaw::connect(addr, mqtt_login(ProtocolVersion::V5, Some("sensor"), Some(b"s3cret"))).await.0;
    publisher.send(&Packet::Publish(publish_packet("bypass/legit", QoS::AtMostOnce, 0, b"legit"))).await;
    let p = within("the legitimate message", sub.recv_publish()).await;
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("bypass/legit", &b"legit"[..]), "it is the first one routed");
}
