//! An edge Mosquitto bridged into Ferry (docs/bridges.md, the first worked example): Mosquitto's
//! own bridge, on its defaults, connects to Ferry as a 3.1.1 bridge (`try_private`: protocol
//! level 0x84) and is served as Mosquitto serves one: its subscriptions get *no local* and
//! *retain as published*, so a `both` rule does not echo and retained messages stay retained on
//! the edge.

use std::sync::Arc;

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
