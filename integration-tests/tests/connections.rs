//! The core's connection registry through real clients (issues 15 and 17): rumqttc 5.0 and
//! 3.1.1 and lapin connections are listed with their protocol, version, user, vhost, client id
//! and peer; their counters follow what they publish and receive; and a close from the registry
//! reaches each client in its protocol's terms (MQTT 5.0 DISCONNECT 0x98 with the reason, 3.1.1
//! a plain close, AMQP connection.close 320 with the reason), publishes an MQTT client's will,
//! and leaves the connection unregistered.

use std::net::SocketAddr;

use ferry_core::auth::PasswordHash;
use ferry_core::connections::ConnectionSnapshot;
use ferry_core::{ConnectionId, Protocol};
use ferry_integration_tests::amqp::reply_code;
use ferry_integration_tests::mqtt::{connect_packet, text, v311, v5, RawClient};
use ferry_integration_tests::{within, TestServer};
use futures_util::StreamExt;
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Event};
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;

/// A user with a password, an MQTT listener (0) and an AMQP listener (1) on loopback.
async fn server() -> TestServer {
    let hash = PasswordHash::argon2id(b"s3cret");
    let toml = format!(
        "[[users]]\nname = \"sensor\"\npassword_hash = \"{hash}\"\n\
         [[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n"
    );
    let frontends = ferry_server::frontends::builtin(&Default::default());
    TestServer::start(&toml, &frontends).await
}

/// The listed connection whose client id is `client_id`.
fn by_client_id(server: &TestServer, client_id: &str) -> ConnectionSnapshot {
    let all = server.server.broker().connections().list();
    all.iter()
        .find(|c| c.client_id.as_deref() == Some(client_id))
        .unwrap_or_else(|| panic!("no connection with client id {client_id:?} in {all:#?}"))
        .clone()
}

fn snapshot(server: &TestServer, id: ConnectionId) -> ConnectionSnapshot {
    server.server.broker().connections().get(id).expect("still registered").snapshot()
}

async fn gone(server: &TestServer, id: ConnectionId) {
    within("the connection is unregistered", server.server.broker().connections().gone(id)).await;
}

fn assert_peer(c: &ConnectionSnapshot, listener: SocketAddr) {
    assert!(c.peer.ip().is_loopback() && c.peer.port() != 0, "{c:?}");
    assert_eq!(c.local, listener, "{c:?}");
    assert!(c.tls.is_none());
}

#[tokio::test]
async fn an_mqtt_5_client_is_listed_counted_and_closed_with_disconnect_0x98_and_its_will() {
    let server = server().await;
    let mqtt = server.addr(0);
    // A 3.1.1 client watching for the 5.0 client's will.
    let mut watcher_options = v311::options(&server, "watcher");
    watcher_options.set_credentials("sensor", "s3cret");
    let (mut watcher, _) = v311::Client::connect(watcher_options).await;
    watcher.subscribe("wills/#", rumqttc::QoS::AtLeastOnce).await;

    let mut options = v5::options(&server, "five");
    options.set_credentials("sensor", "s3cret");
    options.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
        "wills/five",
        "gone",
        v5::QoSOf::AtLeastOnce,
        false,
        None,
    ));
    let (mut five, ack) = v5::Client::connect(options).await;
    assert_eq!(ack.code, rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success);

    let c = by_client_id(&server, "five");
    assert_eq!((c.protocol, c.version), (Protocol::Mqtt, "5.0"));
    assert_eq!(c.user.as_deref(), Some("sensor"));
    assert_eq!(c.vhost.as_deref(), Some("/"));
    assert_eq!(c.listener, Some(format!("mqtt {mqtt}")));
    assert_peer(&c, mqtt);
    assert_eq!((c.messages_in, c.messages_out), (0, 0));
    assert!(c.bytes_in > 0, "the CONNECT was read: {c:?}");
    assert_eq!(c.closing, None);
    let watcher_entry = by_client_id(&server, "watcher");
    assert_ne!(watcher_entry.peer, c.peer, "each connection has its own peer address");
    assert_eq!(watcher_entry.version, "3.1.1");

    // Three publishes to a topic it subscribes to: three in, three out.
    five.subscribe("counted/#", v5::QoSOf::AtLeastOnce).await;
    for i in 0..3 {
        five.publish("counted/x", v5::QoSOf::AtLeastOnce, false, format!("m{i}").as_bytes()).await;
    }
    for _ in 0..3 {
        five.publish_received().await;
    }
    // One more round trip: the writes before it have been counted.
    five.subscribe("flush", v5::QoSOf::AtMostOnce).await;
    let after = snapshot(&server, c.id);
    assert_eq!(after.messages_in, 3, "{after:?}");
    assert!(after.messages_out >= 3, "{after:?}");
    assert!(after.bytes_in > c.bytes_in + 3 * "counted/x".len() as u64, "{after:?} after {c:?}");
    assert!(after.bytes_out > c.bytes_out, "{after:?} after {c:?}");

    // Closed from the registry: DISCONNECT 0x98 with the reason, the will, and gone.
    assert!(server.server.broker().connections().close(c.id, "maintenance window"));
    match five.error().await {
        rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect {
            reason_code,
            reason_string,
        }) => {
            assert_eq!(reason_code, DisconnectReasonCode::AdministrativeAction);
            assert_eq!(reason_string.as_deref(), Some("maintenance window"));
        }
        other => panic!("expected DISCONNECT 0x98, got {other:?}"),
    }
    let will = watcher.publish_received().await;
    assert_eq!(will.topic, "wills/five");
    assert_eq!(text(&will.payload), "gone");
    gone(&server, c.id).await;
    assert!(!server.server.broker().connections().close(c.id, "again"), "no longer there to close");
    assert!(server.server.broker().connections().contains(watcher_entry.id), "the others stay");
}

#[tokio::test]
async fn an_mqtt_3_1_1_client_is_listed_and_closed_without_a_packet() {
    let server = server().await;
    let mut options = v311::options(&server, "three");
    options.set_credentials("sensor", "s3cret");
    let (mut three, _) = v311::Client::connect(options).await;
    let c = by_client_id(&server, "three");
    assert_eq!((c.protocol, c.version), (Protocol::Mqtt, "3.1.1"));
    assert_eq!(c.user.as_deref(), Some("sensor"));
    assert_peer(&c, server.addr(0));

    three.subscribe("t/#", rumqttc::QoS::AtLeastOnce).await;
    three.publish("t/1", rumqttc::QoS::AtLeastOnce, false, b"hello").await;
    three.publish_received().await;
    three.subscribe("flush", rumqttc::QoS::AtMostOnce).await;
    let after = snapshot(&server, c.id);
    assert_eq!((after.messages_in, after.messages_out), (1, 1), "{after:?}");
    assert!(after.bytes_in > c.bytes_in && after.bytes_out > c.bytes_out, "{after:?} after {c:?}");

    assert!(server.server.broker().connections().close(c.id, "maintenance"));
    // 3.1.1 has no server DISCONNECT: the connection just ends (that no packet comes first is
    // checked byte by byte in the raw client's test below).
    three.error().await;
    gone(&server, c.id).await;
}

#[tokio::test]
async fn a_3_1_1_client_closed_from_the_registry_sees_no_packet_and_its_peer_is_exact() {
    let server = server().await;
    let from: std::net::IpAddr = [127, 0, 0, 2].into();
    let mut raw = RawClient::open_from(server.addr(0), from, ferry_mqtt::codec::ProtocolVersion::V311).await;
    let mut connect = connect_packet(ferry_mqtt::codec::ProtocolVersion::V311, "raw", true);
    connect.username = Some("sensor".into());
    connect.password = Some(bytes::Bytes::from_static(b"s3cret"));
    raw.send(&ferry_mqtt::codec::Packet::Connect(Box::new(connect))).await;
    raw.expect("CONNACK", |p| matches!(p, ferry_mqtt::codec::Packet::ConnAck(_)).then_some(())).await;
    let c = by_client_id(&server, "raw");
    assert_eq!(c.peer.ip(), from);
    assert!(server.server.broker().connections().close(c.id, "bye"));
    raw.expect_close(None).await;
    gone(&server, c.id).await;
}

#[tokio::test]
async fn an_amqp_client_is_listed_counted_and_closed_with_320_and_the_reason() {
    let server = server().await;
    let uri = format!("amqp://sensor:s3cret@{}/%2f", server.addr(1));
    let properties = lapin::ConnectionProperties::default().with_connection_name("billing".into());
    let conn = within("lapin connects", lapin::Connection::connect(&uri, properties)).await.expect("connect");
    let mut events = conn.events_listener();
    let ch = within("channel", conn.create_channel()).await.expect("channel.open");

    let c = by_client_id(&server, "billing");
    assert_eq!((c.protocol, c.version), (Protocol::Amqp, "0-9-1"));
    assert_eq!(c.user.as_deref(), Some("sensor"));
    assert_eq!(c.vhost.as_deref(), Some("/"));
    assert_eq!(c.listener, Some(format!("amqp {}", server.addr(1))));
    assert_peer(&c, server.addr(1));
    assert_eq!(c.channels, 1, "{c:?}");

    // Two publishes in (confirmed), one get out.
    within("confirm.select", ch.confirm_select(ConfirmSelectOptions::default())).await.unwrap();
    within("declare", ch.queue_declare("q".into(), QueueDeclareOptions::default(), FieldTable::default()))
        .await
        .unwrap();
    for body in [&b"one"[..], b"two"] {
        let confirm = within(
            "publish",
            ch.basic_publish("".into(), "q".into(), BasicPublishOptions::default(), body, BasicProperties::default()),
        )
        .await
        .unwrap();
        assert!(within("confirm", confirm).await.unwrap().is_ack());
    }
    let got = within("basic.get", ch.basic_get("q".into(), BasicGetOptions { no_ack: true })).await.unwrap();
    assert!(got.is_some());
    // One more round trip: the writes before it have been counted.
    within("declare", ch.queue_declare("q".into(), QueueDeclareOptions::default(), FieldTable::default()))
        .await
        .unwrap();
    let after = snapshot(&server, c.id);
    assert_eq!((after.messages_in, after.messages_out), (2, 1), "{after:?}");
    assert!(after.bytes_in > c.bytes_in && after.bytes_out > c.bytes_out, "{after:?} after {c:?}");

    assert!(server.server.broker().connections().close(c.id, "maintenance window"));
    let error = within("connection.close", async {
        loop {
            match events.next().await {
                Some(Event::Error(e)) => return e,
                Some(_) => {}
                None => panic!("events ended without an error"),
            }
        }
    })
    .await;
    assert_eq!(reply_code(&error), Some(320), "{error:?}");
    assert!(error.to_string().contains("maintenance window"), "{error}");
    gone(&server, c.id).await;
    assert!(server.server.broker().connections().is_empty());
}
