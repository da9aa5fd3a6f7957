//! An edge Mosquitto bridged into Ferry (docs/bridges.md, the first worked example): Mosquitto's
//! own bridge, on its defaults, connects to Ferry as a 3.1.1 bridge (`try_private`: protocol
//! level 0x84) and is served as Mosquitto serves one: its subscriptions get *no local* and
//! *retain as published*, so a `both` rule does not echo and retained messages stay retained on
//! the edge.

use std::sync::Arc;

use futures_util::StreamExt;

use ferry_integration_tests::mosquitto::Mosquitto;
use ferry_integration_tests::mqtt::{text, v311, v5, MQTT_LISTENER};
use ferry_integration_tests::{within, TestServer};

const Q1: rumqttc::QoS = rumqttc::QoS::AtLeastOnce;
const V5Q1: v5::QoSOf = v5::QoSOf::AtLeastOnce;

/// Ferry with one MQTT listener, and an edge Mosquitto bridged into it with `topic # both 1 ""
/// edge7/`, up: its state notification has reached Ferry. `None` without mosquitto.
async fn edge_bridged_into_ferry() -> Option<(TestServer, Mosquitto)> {
    let ferry = TestServer::start(MQTT_LISTENER, &[Arc::new(ferry_mqtt::MqttFrontend::default())]).await;
    let mut watcher = v5::connect(&ferry, "watcher").await;
    watcher.subscribe("$SYS/broker/connection/edge-7/state", V5Q1).await;
    let addr = ferry.mqtt_addr();
    let conf = format!(
        "connection ferry\naddress {addr}\nremote_clientid edge-7\nbridge_protocol_version mqttv311\n\
         restart_timeout 1\ntopic # both 1 \"\" edge7/\n"
    );
    let mosquitto = Mosquitto::start(&conf).await?;
    // Mosquitto publishes "1" there (retained) once Ferry has accepted the bridge's CONNECT.
    loop {
        let p = watcher.publish_received().await;
        if text(&p.payload) == "1" {
            break;
        }
    }
    Some((ferry, mosquitto))
}

#[tokio::test]
async fn an_edge_mosquitto_bridges_in_on_its_defaults_without_echo_and_keeps_retained_messages() {
    let Some((ferry, mosquitto)) = edge_bridged_into_ferry().await else { return };
    // The first CONNECT was taken: Mosquitto did not have to fall back to a plain client.
    let log = mosquitto.log();
    assert!(!log.iter().any(|l| l.contains("Connection Refused") || l.contains("unacceptable protocol")), "{log:?}");

    let mut central = v5::connect(&ferry, "central").await;
    central.subscribe("edge7/#", V5Q1).await;
    let (mut edge_sub, _) = v311::Client::connect(mosquitto.v311_options("edge-sub")).await;
    edge_sub.subscribe("#", Q1).await;
    let (mut edge_pub, _) = v311::Client::connect(mosquitto.v311_options("edge-pub")).await;

    // Out: an edge reading reaches Ferry under the remote prefix.
    edge_pub.publish("sensors/t1", Q1, false, b"21.5").await;
    let p = central.publish_received().await;
    assert_eq!((std::str::from_utf8(&p.topic).unwrap(), text(&p.payload)), ("edge7/sensors/t1", "21.5"));
    // In: a central command reaches the edge without the prefix. It is published after Ferry
    // routed the reading, so an echo of the reading (had the bridge no *no local*) would reach
    // the edge before it.
    central.publish("edge7/cmd/reboot", V5Q1, false, b"now").await;
    let mut seen = Vec::new();
    loop {
        let p = edge_sub.publish_received().await;
        seen.push((p.topic.clone(), text(&p.payload).to_string()));
        if p.topic == "cmd/reboot" {
            break;
        }
    }
    assert_eq!(
        seen,
        [("sensors/t1".to_string(), "21.5".to_string()), ("cmd/reboot".to_string(), "now".to_string())],
        "the edge saw its own reading come back"
    );
    // The command came back to `central` once, as its own subscription matches it, and the edge
    // did not send it back into Ferry a second time.
    let p = central.publish_received().await;
    assert_eq!((std::str::from_utf8(&p.topic).unwrap(), text(&p.payload)), ("edge7/cmd/reboot", "now"));
    central.no_publish().await;

    // A retained message from Ferry stays retained on the edge (retain as published): a client
    // that subscribes there later gets it.
    central.publish("edge7/cfg/rate", V5Q1, true, b"10s").await;
    assert_eq!(text(&central.publish_received().await.payload), "10s");
    let p = edge_sub.publish_received().await;
    assert_eq!((p.topic.as_str(), text(&p.payload)), ("cfg/rate", "10s"));
    let (mut late, _) = v311::Client::connect(mosquitto.v311_options("late")).await;
    late.subscribe("cfg/#", Q1).await;
    let p = late.publish_received().await;
    assert_eq!((p.topic.as_str(), text(&p.payload), p.retain), ("cfg/rate", "10s", true));

    // Ferry lists the bridge's connection under its client id.
    let listed = ferry.server.broker().connections().list();
    assert!(listed.iter().any(|c| c.client_id.as_deref() == Some("edge-7")), "{listed:?}");
    within("edge client gone", edge_pub.disconnect()).await;
}

/// The worked example in docs/bridges.md as written: Ferry with users and an ACL, the edge's
/// bridge logging in as `edge-7` with `sensors/# out` and `cmd/# in` under `edge7/`, and an AMQP
/// consumer of the readings. Without the ACL entry for the bridge's state topic (which is also
/// its will), Ferry would refuse the bridge's CONNECT, as Mosquitto does.
#[tokio::test]
async fn the_worked_example_with_a_login_an_acl_and_an_amqp_consumer() {
    use ferry_core::auth::PasswordHash;
    let hash = |p: &[u8]| PasswordHash::argon2id(p);
    let ferry_toml = format!(
        "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n\
         [[users]]\nname = \"edge-7\"\npassword_hash = \"{}\"\n\
         [[users]]\nname = \"backend\"\npassword_hash = \"{}\"\n\
         [[permissions]]\nuser = \"backend\"\nconfigure = \".*\"\nwrite = \".*\"\nread = \".*\"\n\
         [[acl]]\nuser = \"edge-7\"\ntopic = \"edge7/#\"\naccess = \"readwrite\"\n\
         [[acl]]\nuser = \"edge-7\"\ntopic = \"$SYS/broker/connection/%c/state\"\naccess = \"write\"\n\
         [[acl]]\nuser = \"backend\"\ntopic = \"edge7/#\"\naccess = \"readwrite\"\n\
         [[acl]]\nuser = \"backend\"\ntopic = \"$SYS/broker/connection/+/state\"\naccess = \"read\"\n",
        hash(b"edge-secret"),
        hash(b"backend-secret"),
    );
    let frontends: Vec<Arc<dyn ferry_core::frontend::Frontend>> =
        vec![Arc::new(ferry_mqtt::MqttFrontend::default()), Arc::new(ferry_amqp::AmqpFrontend::default())];
    let ferry = TestServer::start(&ferry_toml, &frontends).await;

    // The backend's queue is bound before anything is published.
    let amqp = lapin::Connection::connect(
        &format!("amqp://backend:backend-secret@{}/%2f", ferry.addr_of(ferry_core::Protocol::Amqp)),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("AMQP login");
    let ch = amqp.create_channel().await.expect("channel");
    let q = ch
        .queue_declare("readings".into(), lapin::options::QueueDeclareOptions::default(), Default::default())
        .await
        .expect("declare");
    ch.queue_bind(
        q.name().clone(),
        "amq.topic".into(),
        "edge7.sensors.#".into(),
        Default::default(),
        Default::default(),
    )
    .await
    .expect("bind");
    let mut consumer = ch
        .basic_consume(
            q.name().clone(),
            "backend".into(),
            lapin::options::BasicConsumeOptions { no_ack: true, ..Default::default() },
            Default::default(),
        )
        .await
        .expect("consume");

    let mut central = {
        let mut o = v5::options(&ferry, "central");
        o.set_credentials("backend", "backend-secret");
        v5::Client::connect(o).await.0
    };
    central.subscribe("$SYS/broker/connection/edge-7/state", V5Q1).await;
    let conf = format!(
        "connection central\naddress {}\nremote_clientid edge-7\nremote_username edge-7\nremote_password edge-secret\n\
         cleansession false\nrestart_timeout 1\ntopic sensors/# out 1 \"\" edge7/\ntopic cmd/# in 1 \"\" edge7/\n",
        ferry.mqtt_addr()
    );
    let Some(mosquitto) = Mosquitto::start(&conf).await else { return };
    // Mosquitto reports the link's state there (retained) once Ferry has taken its CONNECT.
    loop {
        let p = central.publish_received().await;
        if text(&p.payload) == "1" {
            break;
        }
    }

    // A reading on the edge reaches the AMQP queue under edge7.
    let (mut edge_pub, _) = v311::Client::connect(mosquitto.v311_options("sensor-1")).await;
    edge_pub.publish("sensors/t1", Q1, false, b"21.5").await;
    let got = within("the reading in the AMQP queue", consumer.next()).await.expect("a delivery").expect("delivery");
    assert_eq!((got.routing_key.as_str(), &got.data[..]), ("edge7.sensors.t1", &b"21.5"[..]));

    // A command from the centre reaches the edge without the prefix.
    let (mut edge_sub, _) = v311::Client::connect(mosquitto.v311_options("actuator-1")).await;
    edge_sub.subscribe("cmd/#", Q1).await;
    central.publish("edge7/cmd/fan", V5Q1, false, b"on").await;
    let p = edge_sub.publish_received().await;
    assert_eq!((p.topic.as_str(), text(&p.payload)), ("cmd/fan", "on"));
}
